"""A trial's own figure, logged with its run: the training loss against samples seen and
the accuracy per epoch (`curves.png`), drawn once per trial. Drawn on a bare matplotlib
Figure: no pyplot, so no backend is chosen or switched (a notebook keeps its inline
figures).

The figure is the same for every trial but its lines and title, so a process builds it
once (`TrialFigure`) and each trial only swaps those: building the axes (their ticks,
spines and labels) was 40 % of a figure's time, and a trial's end waits for it on the
CPU. A trial's image does not depend on the trials drawn before it in the process (tested
pixel for pixel against a figure built for it alone).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cnnbench.track.schema import EPOCH, TEST_ACC, VAL_ACC
from cnnbench.train.result import TrialResult
from cnnbench.util.text import fmt

TITLE_KEYS = ("model", "lr", "batch_size", "activation", "seed")
# how every figure is saved: PNG's fastest compression (the file is 10 % larger); warm-up
# draws at the same size, so that the fonts it loads are those of the trials' figures
SAVE = {"format": "png", "dpi": 90, "pil_kwargs": {"compress_level": 1}}


class TrialFigure:
    """The two axes of a trial's figure, built on first use, redrawn for each trial."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # one trial at a time (the API may end runs from threads)
        self.parts: tuple[Figure, Any, Any, Any] | None = None

    def build(self) -> tuple[Figure, Any, Any, Any]:
        fig = Figure(figsize=(10, 3.6))
        loss, acc = fig.subplots(1, 2)
        # titles at a fixed height (nothing is drawn above the axes): matplotlib would
        # otherwise measure every tick label at each draw to place them
        loss.set_title("training loss", y=1.0)
        loss.set(xlabel="samples seen", ylabel="cross-entropy")
        acc.set_title("accuracy", y=1.0)
        acc.set(xlabel="epoch", ylabel="%")
        title = fig.suptitle("", fontsize=9)
        # margins fixed for this size and these labels: tight_layout measured every text once
        # more (a third of the figure's 0.1 s)
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.84, wspace=0.22)
        return fig, loss, acc, title

    def canvas(self) -> tuple[Figure, Any, Any, Any]:
        """The figure and its parts, built on first use (under the lock)."""
        if self.parts is None:
            self.parts = self.build()
        return self.parts

    def warm(self) -> None:
        """Build the figure and draw it once, unsaved: the fonts loaded (a first figure
        takes twice as long), for a writer process to do before the first trial ends."""
        with self.lock:
            self.canvas()[0].savefig(io.BytesIO(), **SAVE)

    def draw(self, result: TrialResult, path: Path) -> Path:
        """The loss curve and accuracy of one trial, saved as a PNG at `path`."""
        with self.lock:
            fig, loss, acc, title = self.canvas()
            for ax in (loss, acc):  # what the last trial left: its lines, legend, colours
                for line in list(ax.lines):
                    line.remove()
                if ax.get_legend() is not None:
                    ax.get_legend().remove()
                ax.set_prop_cycle(None)
            if result.curve:
                xs, ys = zip(*result.curve)
                loss.plot(xs, ys, linewidth=1)
            for key in (TEST_ACC, VAL_ACC):
                pts = [(r[EPOCH], r[key]) for r in result.history if key in r]
                if pts:
                    acc.plot(*zip(*pts), marker="o", label=key)
            for ax in (loss, acc):  # the limits from this trial's lines alone, as a new figure's
                ax.relim()
                if ax.lines:
                    ax.set_autoscale_on(True)
                    ax.autoscale_view()
                else:
                    ax.set(xlim=(0, 1), ylim=(0, 1))
            if acc.lines:
                acc.legend()
            title.set_text(" ".join(f"{k}={fmt(v)}" for k, v in result.config.to_dict().items() if k in TITLE_KEYS))
            fig.savefig(path, **SAVE)
        return path


SHARED = TrialFigure()  # this process's


def save_trial_figure(result: TrialResult, path: Path) -> Path:
    """The loss curve and accuracy of one trial (an MLflow artifact)."""
    return SHARED.draw(result, path)


def warm_trial_figure() -> None:
    """This process's trial figure built and drawn once (see `TrialFigure.warm`)."""
    SHARED.warm()
