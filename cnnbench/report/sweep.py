"""`results/<sweep>/`: what a sweep found, as files that a reader can open without
MLflow or Optuna.

- `trials.csv`: Optuna's trials table (number, state, value, parameters, worker, run id);
- `best.yaml`: the best trial's parameters and fully resolved config, the command that
  trains it alone, and its re-run over the final seeds;
- `final.md`: the sweep in a page: trials complete / pruned / failed, time, the best
  trial, its test accuracy over seeds (mean ± std, n), the top trials, the importances;
- `history.png`, `importance.png`, `parallel_coordinate.png`, `slice.png`,
  `intermediate.png`: Optuna's matplotlib plots (no browser or kaleido needed).

Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
import optuna.visualization.matplotlib as ovm
import yaml

from cnnbench.config.space import describe, trial_config
from cnnbench.config.trial import RUNTIME_FIELDS, TrialConfig
from cnnbench.track.schema import (
    ATTR_BEST_EPOCH,
    ATTR_MLFLOW_RUN_ID,
    ATTR_WORKER_HOST,
    OPTUNA_USER_ATTRS_COLUMN,
    worker_name,
)
from cnnbench.util import fileio
from cnnbench.util.text import masked

PLOTS = {  # file -> optuna.visualization.matplotlib function
    "history.png": "plot_optimization_history",
    "importance.png": "plot_param_importances",
    "parallel_coordinate.png": "plot_parallel_coordinate",
    "slice.png": "plot_slice",
    "intermediate.png": "plot_intermediate_values",
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's matplotlib plots are marked experimental; the warning says nothing new."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def write(sweep: Any, best: Any, finals: list[Any]) -> list[Path]:
    out = sweep.out_dir
    out.mkdir(parents=True, exist_ok=True)
    study = sweep.study
    files = [out / "trials.csv", out / "best.yaml", out / "final.md"]
    frame = trials_frame(study)
    fileio.write_text(files[0], frame.to_csv(index=False))
    importances, why_not = importance(study)
    fileio.write_text(files[1], best_yaml(sweep, best, finals))
    fileio.write_text(files[2], final_markdown(sweep, best, finals, frame, importances, why_not))
    files += save_plots(study, out)
    return files


def trials_frame(study: Any):
    with _quiet():
        frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs",
                                              "datetime_start", "datetime_complete", "duration"))
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds().round(2)
    return frame


def importance(study: Any) -> tuple[dict[str, float], str]:
    """Optuna's parameter importances (PED-ANOVA by default in Optuna 5) of the
    complete trials; empty, with the reason, when they cannot be computed."""

    try:
        with _quiet():
            return dict(optuna.importance.get_param_importances(study)), ""
    except Exception as err:  # too few complete trials, a single parameter...
        return {}, " ".join(str(err).split())[:200] or type(err).__name__


def plot(study: Any, function: str) -> tuple[Any, str]:
    """One of Optuna's matplotlib plots (`plot_slice`, ...) as a Figure and ""; or None and
    the reason when Optuna cannot draw it (e.g. importances of a single complete trial)."""
    import matplotlib.pyplot as plt  # Optuna's plots draw through pyplot: imported where they are drawn

    try:  # Optuna switches matplotlib to its ggplot style: keep that to its own figure
        with _quiet(), plt.rc_context():
            axes = getattr(ovm, function)(study)
    except Exception as err:
        return None, " ".join(str(err).split())[:160]
    axes = np.atleast_1d(axes).flat
    fig = axes[0].figure
    if function == "plot_slice":
        fig.set_size_inches(4.5 * max(1, len(axes)), 4)
    return fig, ""


def save_plots(study: Any, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt  # Optuna's plots draw through pyplot; each figure is closed once saved

    files = []
    for name, function in PLOTS.items():
        plt.close("all")
        fig, why_not = plot(study, function)
        if fig is None:
            print(f"results: {name} skipped ({why_not})")
            continue
        fileio.write_with(out / name, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        files.append(out / name)
    return files


# ----------------------------------------------------------------------------------------
# text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "null" if value is None else str(value)


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def reproduce_command(config: TrialConfig) -> str:
    """`cnnbench run` with every setting that differs from its default."""
    defaults = TrialConfig().to_dict()
    sets = [f"--set {k}={_fmt(v) if not isinstance(v, float) else repr(v)}"
            for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS and v != defaults[k]]
    return " ".join(["cnnbench run", *sets])


def best_yaml(sweep: Any, best: Any, finals: list[Any]) -> str:

    spec, s = sweep.spec, sweep.spec.sweep
    if best is None:
        return yaml.safe_dump({"sweep": spec.name, "best": None, "why": "no trial completed"}, sort_keys=False)
    config = trial_config(spec, best.params)
    accs = [f.test_acc for f in finals if math.isfinite(f.test_acc)]
    doc = {
        "sweep": spec.name,
        "objective": f"{s.objective} ({s.direction}): the best over epochs, on {config.val_size} validation images",
        "trial": best.number,
        "value": round(float(best.value), 4),
        "best_epoch": best.user_attrs.get(ATTR_BEST_EPOCH),
        "params": {k: (float(v) if isinstance(v, float) else v) for k, v in best.params.items()},
        "config": {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS},
        "reproduce": reproduce_command(config),
        "mlflow_run_id": best.user_attrs.get(ATTR_MLFLOW_RUN_ID, ""),
        "final": {
            "seeds": [f.seed for f in finals],
            "test_acc": [round(f.test_acc, 2) for f in finals],
            "test_acc_mean": round(statistics.fmean(accs), 3) if accs else None,
            "test_acc_std": round(statistics.stdev(accs), 3) if len(accs) > 1 else None,
            "n": len(accs),
            "tested_with": "each run's best-validation checkpoint, once",
        },
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def final_markdown(sweep: Any, best: Any, finals: list[Any], frame: Any, importances: dict[str, float],
                   why_not: str) -> str:
    """results/<sweep>/final.md: the search, its trials and time, the best trial, the best
    settings re-trained over seeds and tested once, the top trials and the importances."""
    spec, s = sweep.spec, sweep.spec.sweep
    label = "validation accuracy (%)" if s.objective == "val_acc" else "validation loss"
    out = _search_lines(spec, label) + _trials_lines(sweep)
    if best is None:
        return "\n".join(out + ["No trial completed, so there is no best trial to re-run.", ""])
    out += _best_lines(sweep, best, label) + _finals_lines(spec, best, finals, label)
    out += _top_table(frame, [d.name for d in spec.search], s.direction)
    out += ["## Parameter importance", ""]
    if importances:
        out += ["Optuna's default evaluator (PED-ANOVA in Optuna 5) over the complete trials:", "",
                "| parameter | importance |", "|---|---|"]
        out += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    else:
        out += [f"Not computed: {why_not}."]
    out += ["", "Plots: history.png, importance.png, parallel_coordinate.png, slice.png, intermediate.png.", ""]
    if sweep.command:
        out += [f"Produced by `{sweep.command}` (storage {masked(sweep.url)}).", ""]
    return "\n".join(out)


def _search_lines(spec: Any, label: str) -> list[str]:
    s, base = spec.sweep, spec.base_config()
    return [f"# Sweep {spec.name}: {spec.title}", "",
            f"Search space: {', '.join(f'{d.name} {describe(d)}' for d in spec.search)}.",
            f"Fixed: {', '.join(f'{k}={_fmt(v)}' for k, v in spec.fixed.items())}; seed {spec.seeds[0]} for every trial.",
            f"Sampler {s.sampler}, pruner {s.pruner} (per-epoch {label}), objective: the best {label} over epochs "
            f"on {base.val_size} images held out of the training set (a fixed, seeded split); the test set is "
            "never read while tuning.", ""]


def _trials_lines(sweep: Any) -> list[str]:
    """How many trials ended how, and the time they took on which workers."""
    trials = sweep.study.get_trials(deepcopy=False)
    states = {st: sum(t.state.name == st for t in trials) for st in ("COMPLETE", "PRUNED", "FAIL")}
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else math.nan
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
               if t.datetime_start and t.datetime_complete)
    workers: dict[str, int] = {}
    for t in trials:
        if t.user_attrs.get(ATTR_WORKER_HOST):
            w = worker_name(t.user_attrs)
            workers[w] = workers.get(w, 0) + 1
    return [f"**Trials:** {states['COMPLETE'] + states['PRUNED']} finished of {sweep.target} requested: "
            f"{states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed "
            "(lost workers' trials, which were queued again, count here).",
            f"**Time:** {_duration(wall)} from the first trial's start to the last one's end; "
            f"{_duration(busy)} of trial time in all, on {len(workers)} worker(s)"
            + (f" ({', '.join(f'{w}: {n}' for w, n in sorted(workers.items()))})" if workers else "") + ".", ""]


def _best_lines(sweep: Any, best: Any, label: str) -> list[str]:
    out = [f"## Best trial: #{best.number}", "",
           f"{label} {best.value:.4g} at epoch {best.user_attrs.get(ATTR_BEST_EPOCH, '?')} "
           f"(MLflow run `{best.user_attrs.get(ATTR_MLFLOW_RUN_ID, '')}`).", "",
           "| parameter | value |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in best.params.items()]
    return out + ["", f"Alone: `{reproduce_command(_config(sweep, best))}`", ""]


def _finals_lines(spec: Any, best: Any, finals: list[Any], label: str) -> list[str]:
    """The best settings over seeds, tested once, and the sweep's own seed against its trial."""
    out = ["## The best trial over seeds, tested once", "",
           "Each seed trains the best settings again on the same split; the test set is read once per run, "
           "with its best-validation checkpoint.", "",
           f"| seed | status | best epoch | {label} | test acc (%) | test loss | MLflow run |", "|---|---|---|---|---|---|---|"]
    for f in finals:
        out.append(f"| {f.seed} | {f.status} | {f.best_epoch} | {f.best_val:.4g} | {f.test_acc:.2f} | "
                   f"{f.test_loss:.4f} | `{f.run_id}` |")
    out += ["", f"**Test accuracy of the best settings: {_mean_std([f.test_acc for f in finals])}** "
                f"(mean ± std over seeds {', '.join(str(f.seed) for f in finals)}).", ""]
    same = [f for f in finals if f.seed == spec.seeds[0]]
    if same and math.isfinite(same[0].best_val):
        # the final seeds train fused (one vmapped model): same maths as a trial trained
        # alone, other float rounding, so the sweep's own seed need not repeat to the digit
        out += [f"Seed {spec.seeds[0]}, the sweep's own, re-trained with the others gives {label} "
                f"{same[0].best_val:.4g} against the sweep's {best.value:.4g} (Δ {same[0].best_val - best.value:+.2g}; "
                "seeds trained together are fused, which changes float rounding, not the maths).", ""]
    return out


def _config(sweep: Any, best: Any) -> TrialConfig:

    return trial_config(sweep.spec, best.params)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec:02d} s" if minutes else f"{sec} s"


def _top_table(frame: Any, names: list[str], direction: str, n: int = 10) -> list[str]:
    if frame.empty or "value" not in frame:
        return []
    done = frame[frame["state"].isin(["COMPLETE", "PRUNED"])]
    done = done.sort_values("value", ascending=direction == "minimize").head(n)
    cols = [f"params_{k}" for k in names if f"params_{k}" in done]
    head = ["trial", "state", "value", *[c[len("params_"):] for c in cols], "best epoch"]
    lines = [f"## Top {len(done)} trials", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in done.iterrows():
        epochs = row.get(f"{OPTUNA_USER_ATTRS_COLUMN}{ATTR_BEST_EPOCH}", "")
        cells = [str(row["number"]), row["state"].lower(), _fmt(float(row["value"]))]
        cells += [_fmt(row[c]) for c in cols]
        cells.append(_fmt(epochs))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
