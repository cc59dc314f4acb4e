"""The notebooks' figures, drawn with seaborn from `cnnbench.report.analysis`'s frames.

The curves are `cnnbench.report.tables`'s own panels (the same as `results/<study>/curves.png`);
what only a notebook shows is here: the tuning playbook's isolation plot (the best
trial per scientific value, nuisance hyperparameters optimised away) and the
learning-rate × batch-size heatmap. Every function returns its matplotlib Figure
(shown by the notebook's inline backend) or None when the study has nothing to draw.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from cnnbench.config.spec import StudySpec
from cnnbench.report import stats
from cnnbench.report.analysis import isolated
from cnnbench.report.sweep import plot
from cnnbench.report.tables import draw_accuracy, draw_loss, isolate, theme

HEATMAP_AXES = ("batch_size", "lr")  # (columns, rows) of the heatmap


def _count(per: pd.Series, *, band: bool = True, what: str = "") -> str:
    """`n=3 seeds, 95% CI`, `n=1 seed`, `n=2..3 seeds, 95% CI` from seeds per value."""
    lo, hi = int(per.min()), int(per.max())
    count = f"n={lo}" if lo == hi else f"n={lo}..{hi}"
    return f"{count} seed{'s' if hi > 1 else ''}{what}" + (", 95% CI" if band and hi > 1 else "")


def _seeds(frame: pd.DataFrame) -> str:
    return _count(frame.drop_duplicates("trial").groupby("value", observed=True).size(), what=" per line")


def curves(frame: pd.DataFrame, curve: pd.DataFrame, spec: StudySpec):
    """Three panels: the first epoch's training loss against samples seen; test accuracy
    per epoch, one line per scientific value with the 95% interval of the mean over seeds as
    its band (the loss: ±1 sd); the same zoomed."""
    best = isolated(frame, spec)
    keep = set(best["run_id"])
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    draw_loss(axes[0], curve[curve["run_id"].isin(keep)] if not curve.empty else curve)
    draw_accuracy(axes[1], best)
    draw_accuracy(axes[2], best, zoom=True)
    nuisance = f"; best {', '.join(spec.nuisance)} per value" if spec.nuisance else ""
    fig.suptitle(f"{spec.title} ({_seeds(best)}{nuisance})")
    fig.tight_layout()
    return fig


def score_column(trials: pd.DataFrame) -> str:
    """What the isolation ranks by: best validation accuracy when there is a validation
    split, else best test accuracy over the epochs (as `report.isolate`)."""
    return "best_val_acc" if "best_val_acc" in trials and trials["best_val_acc"].notna().any() else "best_test_acc"


def _numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def isolation(trials: pd.DataFrame, spec: StudySpec):
    """The playbook's isolation plot: per value of the first scientific hyperparameter, the
    best trial's score (mean over seeds with its 95% Student-t interval, `stats.mean_interval`,
    each seed a dot); with nuisance
    hyperparameters, every other setting's mean as a grey cross behind it."""
    if trials.empty:
        return None
    score = score_column(trials)
    sci = list(spec.scientific)
    x, hue = sci[0], (sci[1] if len(sci) > 1 else None)
    best = isolate(spec, trials)
    numeric = _numeric(best[x])
    order = None if numeric else [str(v) for v in spec.scientific[x] if str(v) in set(best[x].astype(str))]
    data = best.copy()
    if not numeric:
        data[x] = data[x].astype(str)
    if hue:
        data[hue] = data[hue].astype(str)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if spec.nuisance:  # every other nuisance setting, its mean over seeds
        others = trials.groupby(list(spec.varied), dropna=False)[score].mean().reset_index()
        xs = others[x] if numeric else others[x].astype(str).map({v: i for i, v in enumerate(order)})
        ax.scatter(xs, others[score], marker="x", color="0.55", s=30, zorder=1, label="other nuisance settings")
    # with a hue the legend names its levels; a label as well makes seaborn pass it twice
    label = {} if hue else {"label": "best setting: mean, 95% CI"}
    if numeric:
        sns.lineplot(data, x=x, y=score, hue=hue, errorbar=stats.mean_interval, err_style="bars", marker="o", ax=ax,
                     **label)
    else:
        sns.pointplot(data, x=x, y=score, hue=hue, order=order, errorbar=stats.mean_interval, capsize=0.1, ax=ax,
                      **label)
    sns.stripplot(data, x=x, y=score, hue=hue, order=order, native_scale=numeric, jitter=False, alpha=0.45, size=4,
                  ax=ax, legend=False, **({} if hue else {"color": "0.25"}))
    if numeric and (best[x] > 0).all():
        ratio = best[x].max() / best[x].min()
        powers_of_two = all(float(v).is_integer() and int(v) & (int(v) - 1) == 0 for v in best[x])
        if ratio >= 10:
            ax.set_xscale("log")
        elif ratio >= 4 and powers_of_two:  # batch sizes
            ax.set_xscale("log", base=2)
        ticks = sorted(best[x].unique())
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.minorticks_off()
        ax.margins(y=0.15)
    if spec.nuisance and not hue:  # which nuisance setting won, above each point
        means = best.groupby([x, *spec.nuisance], dropna=False)[score].agg(["mean", "std"]).reset_index()
        for i, row in enumerate(means.to_dict("records")):
            pos = row[x] if numeric else order.index(str(row[x]))
            label = " ".join(f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in spec.nuisance)
            ax.annotate(label, (pos, row["mean"] + (row["std"] if row["std"] == row["std"] else 0)),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=9, color="C0")
    label = {"best_val_acc": "best validation accuracy (%)", "best_test_acc": "best test accuracy (%)"}[score]
    nuisance = f"; {', '.join(spec.nuisance)} optimised away" if spec.nuisance else ""
    ax.set(title=f"Isolation: the best trial per {x}{nuisance} ({_count(best.groupby(sci, dropna=False).size())})",
           xlabel=x, ylabel=label)
    fig.tight_layout()
    return fig


def has_heatmap(spec: StudySpec) -> bool:
    return all(k in spec.varied for k in HEATMAP_AXES)


def heatmap(trials: pd.DataFrame, spec: StudySpec, metric: str = "final_test_acc"):
    """Mean `metric` over seeds for every learning rate × batch size; where other
    hyperparameters vary too, each cell shows the best of them. None unless the study
    varies both."""
    if not has_heatmap(spec) or trials.empty:
        return None
    cols, rows = HEATMAP_AXES
    means = trials.groupby(list(spec.varied), dropna=False)[metric].mean().reset_index()
    grid = means.groupby([rows, cols])[metric].max().unstack(cols).sort_index(ascending=False)
    fig, ax = plt.subplots(figsize=(1.3 * grid.shape[1] + 3, 0.6 * grid.shape[0] + 2))
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", ax=ax, cbar_kws={"label": metric.replace("_", " ") + " (%)"},
                mask=grid.isna())
    for (i, j) in zip(*np.where(grid.isna().to_numpy())):
        ax.text(j + 0.5, i + 0.5, "–", ha="center", va="center", color="0.4")
    others = [k for k in spec.varied if k not in HEATMAP_AXES]
    best = f", best over {', '.join(others)}" if others else ""
    n = _count(trials.groupby(list(spec.varied), dropna=False).size(), band=False)
    ax.set(title=f"{metric.replace('_', ' ')}: learning rate × batch size (mean, {n}{best})", xlabel=cols, ylabel=rows)
    fig.tight_layout()
    return fig


# -- sweeps --------------------------------------------------------------------------------------


def optuna_plot(study, function: str):
    """One of Optuna's matplotlib plots of the sweep (`plot_optimization_history`,
    `plot_param_importances`, `plot_slice`, ...: the ones `results/<sweep>/` saves), as a
    Figure; None, with the reason printed, when Optuna cannot draw it (too few trials)."""

    fig, why_not = plot(study, function)
    if fig is None:
        print(f"{function}: not drawn ({why_not})")
    return fig


def sweep_curves(frame: pd.DataFrame):
    """Per-epoch validation (else test) accuracy of the best trials' runs, one line each."""
    if frame.empty:
        return None
    metric = "val_acc" if "val_acc" in frame and frame["val_acc"].notna().any() else "test_acc"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    sns.lineplot(frame, x="epoch", y=metric, hue="value", errorbar="sd", marker="o", ax=ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"The best trials' {metric.replace('_', ' ')} per epoch (from MLflow)", ylabel=f"{metric} (%)")
    ax.legend(title="trial (objective)")
    fig.tight_layout()
    return fig


# -- architectures ---------------------------------------------------------------------------------


def tradeoffs(models: pd.DataFrame):
    """Parameters and MACs per image against final test accuracy (mean ± sd over seeds)
    and training time, one labelled point per architecture. Columns: model, params,
    macs_per_image, final_test_acc, final_test_acc_sd, train_seconds."""
    if models.empty or "final_test_acc" not in models:
        return None
    panels = [("params", "final_test_acc"), ("macs_per_image", "final_test_acc"), ("macs_per_image", "train_seconds")]
    labels = {"params": "parameters", "macs_per_image": "multiply-accumulates per image",
              "final_test_acc": "final test accuracy (%)", "train_seconds": "training time (s)"}
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    for ax, (x, y) in zip(axes, panels):
        sd = models.get(f"{y}_sd")
        ax.errorbar(models[x], models[y], yerr=sd if sd is not None and sd.notna().any() else None, fmt="o",
                    capsize=3)
        for _, row in models.iterrows():
            ax.annotate(row["model"], (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=9)
        ax.set_xscale("log")
        ax.set(xlabel=labels[x], ylabel=labels[y])
    fig.suptitle("Architectures: size and compute against accuracy and training time (mean over seeds, ±1 sd)")
    fig.tight_layout()
    return fig


__all__ = ["theme", "curves", "isolation", "heatmap", "has_heatmap", "score_column", "optuna_plot",
           "sweep_curves", "tradeoffs"]
