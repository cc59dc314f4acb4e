"""A trial's own figure, logged with its run: the training loss against samples seen and
the accuracy per epoch (`curves.png`), in tens of milliseconds (it is drawn once per
trial). Drawn on a bare matplotlib Figure: no pyplot, so no backend is chosen or switched
(a notebook keeps its inline figures)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from cnnbench.track.schema import EPOCH, TEST_ACC, VAL_ACC
from cnnbench.train.result import TrialResult
from cnnbench.util.text import fmt


def save_trial_figure(result: TrialResult, path: Path) -> Path:
    """The loss curve and accuracy of one trial (an MLflow artifact)."""
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    if result.curve:
        xs, ys = zip(*result.curve)
        axes[0].plot(xs, ys, linewidth=1)
    axes[0].set(title="training loss", xlabel="samples seen", ylabel="cross-entropy")
    for key in (TEST_ACC, VAL_ACC):
        pts = [(r[EPOCH], r[key]) for r in result.history if key in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set(title="accuracy", xlabel="epoch", ylabel="%")
    if axes[1].lines:
        axes[1].legend()
    fig.suptitle(" ".join(f"{k}={fmt(v)}" for k, v in result.config.to_dict().items()
                          if k in ("model", "lr", "batch_size", "activation", "seed")), fontsize=9)
    # margins fixed for this size and these labels: tight_layout measured every text once
    # more (a third of the figure's 0.1 s); PNG's fastest compression (the file is 10 % larger)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.84, wspace=0.22)
    fig.savefig(path, format="png", dpi=90, pil_kwargs={"compress_level": 1})
    return path
