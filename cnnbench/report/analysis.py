"""The notebooks' statistics of a study, from the frames `cnnbench.track.reader` loads.

`summary`, `table`, `statistics` and `verdicts` hand `reader.load_runs`'s frame to
`cnnbench.report.tables` (whose statistics are `cnnbench.report.stats`'), so a notebook
shows the numbers `results/<study>/` shows; `isolated` keeps the best nuisance setting
per scientific value, `describe` is a study's Markdown header, `compare` is
`cnnbench compare` without files, and `model_costs` the architectures' parameters and
MACs. Pure functions of frames: reading MLflow and Optuna is the reader's job.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from cnnbench.config.spec import StudySpec
from cnnbench.config.trial import FIELD_TYPES, TrialConfig
from cnnbench.data.tensors import dataset_info
from cnnbench.models import list_models
from cnnbench.models.summary import model_cost
from cnnbench.report import compare as comparing
from cnnbench.report.tables import TrialRow, headline, isolate, summary_frame, table_markdown, truncate
from cnnbench.report.tables import statistics as study_statistics
from cnnbench.track.reader import study_spec, train_images
from cnnbench.track.schema import EPOCH
from cnnbench.train.result import TrialResult
from cnnbench.util.text import fmt


# -- the study's trials, summary and table, through cnnbench.report.tables -----------------


def trial_rows(frame: pd.DataFrame) -> list:
    """`frame` as `report.TrialRow`s (config, result from the metric histories, run id)."""
    inverse = frame.attrs["metrics"]
    known = set(FIELD_TYPES)
    full: dict[str, TrialResult] = {}
    rows = []
    for i, (trial, group) in enumerate(frame.groupby("trial", sort=False)):
        first = group.iloc[0]
        run_id = first["run_id"]
        if run_id not in full:
            longest = frame[frame["run_id"] == run_id]
            longest = longest[longest["epochs"] == longest["epochs"].max()]
            full[run_id] = _result(longest, inverse, known)
        result = full[run_id]
        epochs = int(first["epochs"])
        if epochs < result.config.epochs:
            result = truncate(result, epochs, train_images(first.to_dict()))
        rows.append(TrialRow(i, result.config, result, run_id))
    return rows


def _result(rows: pd.DataFrame, inverse: dict[str, str], known: set[str]):
    first = rows.iloc[0]
    config = TrialConfig.from_dict({k: _py(first[k]) for k in known if k in rows and _present(first[k])},
                                   where=f"run {first['run_id']}")
    history = [{EPOCH: int(r["epoch"]), **{key: float(r[col]) for col, key in inverse.items()
                                            if col in r and pd.notna(r[col])}}
               for r in rows.sort_values("epoch").to_dict("records")]
    ips, seconds = float(first["images_per_second"]), float(first["train_seconds"])
    return TrialResult(config=config, status=str(first["status"]), history=history,
                       train_seconds=seconds if seconds == seconds else 0.0,
                       wall_seconds=float(first["wall_seconds"]) if pd.notna(first["wall_seconds"]) else 0.0,
                       images=int(round(ips * seconds)) if ips == ips and seconds == seconds else 0,
                       device=str(first["ran_on"] or ""), fused_with=int(first["fused_with"]))


def _py(value: Any) -> Any:
    """numpy scalars (as pandas hands them out) to Python ones, for TrialConfig's strict types."""
    return value.item() if hasattr(value, "item") else value


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def summary(frame: pd.DataFrame, spec: StudySpec | None = None) -> pd.DataFrame:
    """One row per trial, as `results/<study>/summary.csv` (report.summary_frame), with
    the run's name."""

    out = summary_frame(spec or study_spec(frame), trial_rows(frame))
    names = frame.drop_duplicates("run_id").set_index("run_id")["run_name"]
    out.insert(2, "run_name", out["mlflow_run_id"].map(names))  # as the MLflow UI lists it
    return out


def table(frame: pd.DataFrame, spec: StudySpec | None = None, *, title: bool = False) -> str:
    """The Markdown table beside the document's figures, as `results/<study>/table.md`
    (without its title and source lines unless `title`)."""

    spec = spec or study_spec(frame)
    text = table_markdown(spec, summary(frame, spec))
    return text if title else text.split("\n", 2)[2].lstrip("\n").removeprefix(f"Source: {spec.source}.\n\n")


def statistics(frame: pd.DataFrame, spec: StudySpec | None = None) -> pd.DataFrame:
    """The study's statistics as `results/<study>/stats.csv` (`report.statistics`, computed
    by `cnnbench.report.stats`): per value and accuracy, n, mean, std, the 95% interval of the mean,
    the difference to the best value with its interval, Holm p, verdict, seeds needed, and
    the document's figure against our prediction interval."""

    spec = spec or study_spec(frame)
    return study_statistics(spec, summary(frame, spec))


def verdicts(frame: pd.DataFrame, spec: StudySpec | None = None) -> pd.DataFrame:
    """The table's verdicts, readable: per value, the headline accuracy (final, else best)
    with its interval, the difference to the best value, Holm p, the verdict and the seeds
    that would settle it; then each document figure and whether our prediction interval
    holds it."""

    spec = spec or study_spec(frame)
    trials = summary(frame, spec)
    table = statistics(frame, spec)
    keys = list(spec.scientific) + list(spec.nuisance)
    main = table[table["metric"] == headline(trials)]
    out = main[keys + ["n", "mean", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high", "test", "p_holm",
                       "verdict", "seeds_needed"]].reset_index(drop=True)
    docs = table[table["doc_verdict"].fillna("") != ""]
    for metric, rows in docs.groupby("metric", sort=False):
        name = metric.replace("_test_acc", "")
        rows = rows.set_index(keys)[["doc", "pi_low", "pi_high", "doc_verdict"]].add_prefix(f"{name}_")
        out = out.merge(rows, left_on=keys, right_index=True, how="left")
    out.attrs["metric"] = headline(trials)
    return out


def compare(a: str, b: str, *, labels: tuple[str, str] | None = None,
            tracking_uri: str | None = None) -> pd.DataFrame:
    """Two executions of one study, trial by trial, as `cnnbench compare A B` computes them
    (without writing files): A and B are results/<study>/ folders or MLflow study run ids."""

    la, lb = labels or (None, None)
    return comparing.compare(comparing.load_execution(a, label=la, tracking_uri=tracking_uri),
                             comparing.load_execution(b, label=lb, tracking_uri=tracking_uri))


def isolated(frame: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """The rows of the best nuisance setting per scientific value (the tuning playbook's
    isolation, `report.isolate`); every row when the study has no nuisance hyperparameter."""

    if not spec.nuisance:
        return frame
    best = isolate(spec, summary(frame, spec))
    keys = list(spec.varied)
    return frame.merge(best[keys].drop_duplicates(), on=keys)


def describe(frame: pd.DataFrame, spec: StudySpec) -> str:
    """A Markdown header: the study, what it varies and holds, and how many trials and seeds."""
    fixed = ", ".join(f"`{k}={fmt(v)}`" for k, v in spec.fixed.items()) or "(the defaults)"
    sci = "; ".join(f"`{k}` ∈ {{{', '.join(fmt(v) for v in vals)}}}" for k, vals in spec.scientific.items())
    nui = "; ".join(f"`{k}` ∈ {{{', '.join(fmt(v) for v in vals)}}}" for k, vals in spec.nuisance.items())
    n_trials, n_runs = frame["trial"].nunique(), frame["run_id"].nunique()
    lines = [f"## Study `{spec.name}`: {spec.title}", ""]
    if spec.source:
        lines += [f"Source: {spec.source}.", ""]
    lines += [f"- **scientific** (measured): {sci or '–'}",
              f"- **nuisance** (optimised away per scientific value): {nui or '–'}",
              f"- **fixed**: {fixed}",
              f"- **seeds**: {', '.join(map(str, spec.seeds))}; {n_trials} trials from {n_runs} MLflow runs "
              f"in experiment `{spec.name}` (`{frame.attrs['tracking_uri']}`)"]
    return "\n".join(lines)


# -- architectures: parameters and MACs -------------------------------------------------------


def model_costs(models: list[str] | None = None, dataset: str = "mnist") -> pd.DataFrame:
    """Parameters and multiply-accumulates per image (forward) of each model (all registered
    when None), built for `dataset`'s images: `cnnbench.models.summary.model_cost`, the same
    numbers `cnnbench summary` and the models study's table show."""

    info = dataset_info(dataset)
    records = []
    for name in models or list_models():
        cost = model_cost(name, (info.channels, info.size, info.size), num_classes=info.classes)
        records.append({"model": name, "params": cost["params"], "macs_per_image": cost["macs"],
                        "activation_bytes": cost["activation_bytes"]})
    return pd.DataFrame.from_records(records)


__all__ = ["summary", "table", "statistics", "verdicts", "compare", "isolated", "trial_rows", "describe",
           "model_costs"]
