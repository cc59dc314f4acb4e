"""The one reader of runs: MLflow (and a sweep's Optuna study) → tidy pandas frames.

`runs_frame` is a tracking store's runs as `mlflow.search_runs` lays them out (run_id,
experiment_id, status, artifact_uri, start_time, end_time, and `metrics.*`, `params.*`,
`tags.*`), read through the client of one tracking URI (never the process-wide one, so a
notebook's own MLflow setting is left alone).

`load_runs(study)` reads a study's trial runs and each run's per-epoch metric histories
(`MlflowClient.get_metric_history`), and returns one row per trial × epoch: the trial's
hyperparameters as typed columns (`lr` a float, `batch_size` an int, every param of the
resolved config), its seed, and that epoch's metrics (`test_acc`, `test_loss`, `val_acc`,
`val_loss`, `train_epoch_loss`, `epoch_lr`: the rate in effect that epoch, ...). Which
hyperparameters are scientific, nuisance and fixed travels in `frame.attrs`.
`load_loss_curve` reads the first epoch's `train/loss` (step = samples seen), `study_spec`
the spec as last executed. The statistics of such a frame are `cnnbench.report.analysis`'s.

Which runs: the trials of the study as it was last executed (the newest study run's
fixed settings, values and seeds), one run per trial; with epoch reuse (`epochs`
scientific) a shorter trial is the first epochs of the longest run, as in `study.py`.
For sweeps: `load_sweep` (the Optuna study), `sweep_objective` and `best_trial_runs`
(the `load_runs` frame of its best trials' runs).
"""

from __future__ import annotations

import ast
import contextlib
import math
import tempfile
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from mlflow import MlflowClient

from cnnbench.config.spec import StudySpec, load_spec, parse_value
from cnnbench.config.trial import FIELD_TYPES, RUNTIME_FIELDS
from cnnbench.data.tensors import train_size
from cnnbench.track.schema import (
    ATTR_MLFLOW_RUN_ID,
    ATTR_RUN_ID,
    METRIC_IMAGES_PER_SECOND,
    METRIC_TRAIN_LOSS,
    METRIC_TRAIN_SECONDS,
    METRIC_WALL_SECONDS,
    MLFLOW_RUN_NAME,
    PARAM_SEED,
    PARAM_SEEDS,
    PARAM_SWEEP_OBJECTIVE,
    PREFIX_FIXED,
    PREFIX_NUISANCE,
    PREFIX_SCIENTIFIC,
    STUDY_EXPERIMENT,
    STUDY_PARENT_RUN_ID,
    SUMMARY_METRICS,
    TAG_DEVICE,
    TAG_FUSED_WITH,
    TAG_KEY,
    TAG_KIND,
    TAG_NUISANCE,
    TAG_SCIENTIFIC,
    TAG_STATUS,
)
from cnnbench.track.stores import default_url
from cnnbench.track.writer import quiet_mlflow
from cnnbench.track.writer import tracking_uri as resolve_uri
from cnnbench.util.paths import state_dir
from cnnbench.util.text import fmt


def runs_frame(client: Any, experiment_ids: list[str], *, filter_string: str = "",
               order_by: list[str] | None = None, max_results: int | None = None) -> pd.DataFrame:
    """Every run that matches (all pages, or the first `max_results`), one row each."""
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, order_by=order_by,
                                  max_results=min(max_results or 1000, 1000), page_token=token)
        for run in page:
            info, data = run.info, run.data
            row: dict[str, Any] = {
                "run_id": info.run_id, "experiment_id": info.experiment_id, "status": info.status,
                "artifact_uri": info.artifact_uri,
                "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
                "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
            }
            row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
            row.update({f"params.{k}": v for k, v in data.params.items()})
            row.update({f"tags.{k}": v for k, v in data.tags.items()})
            rows.append(row)
        token = page.token
        if not token or (max_results is not None and len(rows) >= max_results):
            break
    return pd.DataFrame(rows[:max_results] if max_results is not None else rows)


# SUMMARY_METRICS (the schema's): metrics logged once per trial (step 0), not per epoch
CURVE_METRIC = METRIC_TRAIN_LOSS  # step = training samples seen
FINAL_OUTCOMES = ("finished", "diverged")  # trials whose numbers are complete


class NoRuns(LookupError):
    """The tracking store holds no finished trial of this study (or no such sweep)."""


def typed(name: str, text: Any) -> Any:
    """A param's string (as `tracking` logs it) back to the setting's Python type."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    text = str(text)
    kind = FIELD_TYPES.get(name, "")
    if text == "null" and (not kind or "None" in kind):
        return None
    base = kind.replace(" | None", "")
    try:
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
    except ValueError:
        return text
    if base == "bool":
        return text.lower() == "true"
    return text if base == "str" else parse_value(text)


def _literal(text: Any) -> Any:
    try:
        return ast.literal_eval(text) if isinstance(text, str) else None
    except (ValueError, SyntaxError):
        return None


def _experiment(client: MlflowClient, study: str, uri: str):
    exp = client.get_experiment_by_name(study)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise NoRuns(f"no MLflow experiment {study!r} in {uri}")
    return exp


def trial_runs(study: str, uri: str | None = None, *, run_ids: list[str] | None = None) -> pd.DataFrame:
    """One row per trial run of `study` (`runs_frame`, the `mlflow.search_runs` frame, selected as the
    module docstring says), with `frame.attrs` naming the study's hyperparameters."""
    quiet_mlflow()
    uri = resolve_uri(uri)
    client = MlflowClient(uri)
    exp = _experiment(client, study, uri)
    runs = runs_frame(client, [exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'trial'")
    parents = runs_frame(client, [exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'study'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if runs.empty:
        raise NoRuns(f"experiment {study!r} in {uri} has no trial runs")
    if f"tags.{TAG_STATUS}" in runs:
        runs = runs[runs[f"tags.{TAG_STATUS}"].isin(FINAL_OUTCOMES)]
    parent = parents.iloc[0] if not parents.empty else None
    scientific = _names(runs, parent, PREFIX_SCIENTIFIC)
    nuisance = _names(runs, parent, PREFIX_NUISANCE)
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(run_ids)]
    elif parent is not None:
        runs = _as_last_executed(runs, parent)
    if runs.empty:
        raise NoRuns(f"experiment {study!r} in {uri} has no finished trial of the study as last run")
    runs = runs.sort_values("start_time", ascending=False)
    if f"tags.{TAG_KEY}" in runs:
        runs = runs.drop_duplicates(f"tags.{TAG_KEY}")
    if run_ids is None and scientific:  # one run per trial: the newest
        runs = runs.drop_duplicates([f"params.{k}" for k in scientific + nuisance + [PARAM_SEED]
                                     if f"params.{k}" in runs])
    runs = runs.reset_index(drop=True)
    fixed: dict[str, Any] = {}
    if parent is not None:
        column = f"params.{PREFIX_FIXED}"
        fixed = {k[len(column):]: typed(k[len(column):], v) for k, v in parent.items()
                 if k.startswith(column) and isinstance(v, str)}
    seed_column = f"params.{PARAM_SEED}"
    seeds = sorted({typed("seed", s) for s in runs[seed_column]}) if seed_column in runs else []
    runs.attrs = {"study": study, "tracking_uri": uri, "experiment_id": exp.experiment_id,
                  "parent_run_id": parent["run_id"] if parent is not None else None,
                  "scientific": scientific, "nuisance": nuisance, "fixed": fixed, "seeds": seeds,
                  "epochs_values": _parent_values(parent, PREFIX_SCIENTIFIC, "epochs")}
    return runs


def _names(runs: pd.DataFrame, parent: Any, prefix: str) -> list[str]:
    """Scientific or nuisance hyperparameter names (`prefix` PREFIX_SCIENTIFIC or
    PREFIX_NUISANCE), from the study run, else the trials' tags."""
    if parent is not None:
        names = [k[len(f"params.{prefix}"):] for k, v in parent.items()
                 if k.startswith(f"params.{prefix}") and isinstance(v, str)]
        if names:
            tag = parent.get(f"tags.{TAG_SCIENTIFIC if prefix == PREFIX_SCIENTIFIC else TAG_NUISANCE}")
            order = [n for n in str(tag or "").split(",") if n in names]
            return order + [n for n in names if n not in order]
    if prefix == PREFIX_SCIENTIFIC and f"tags.{TAG_SCIENTIFIC}" in runs:
        tags = runs[f"tags.{TAG_SCIENTIFIC}"].dropna()
        return [n for n in tags.iloc[0].split(",") if n] if not tags.empty else []
    return sorted(c[len(f"tags.{prefix}"):] for c in runs.columns if c.startswith(f"tags.{prefix}"))


def _parent_values(parent: Any, prefix: str, name: str) -> list[Any] | None:
    if parent is None:
        return None
    values = _literal(parent.get(f"params.{prefix}{name}"))
    return [typed(name, fmt(v)) for v in values] if isinstance(values, list) else None


def _as_last_executed(runs: pd.DataFrame, parent: Any) -> pd.DataFrame:
    """The runs that match the newest study run's fixed settings, values and seeds."""
    keep = pd.Series(True, index=runs.index)
    for key, value in parent.items():
        if not isinstance(value, str) or not key.startswith("params."):
            continue
        name = key[len("params."):]
        if name.startswith(PREFIX_FIXED):
            setting = name[len(PREFIX_FIXED):]
            if f"params.{setting}" in runs and setting not in RUNTIME_FIELDS:
                want = typed(setting, value)
                keep &= runs[f"params.{setting}"].map(lambda v, s=setting, w=want: typed(s, v) == w)
        elif name.startswith((PREFIX_SCIENTIFIC, PREFIX_NUISANCE)):
            prefix = PREFIX_SCIENTIFIC if name.startswith(PREFIX_SCIENTIFIC) else PREFIX_NUISANCE
            setting = name[len(prefix):]
            values = _parent_values(parent, prefix, setting)
            if values is not None and f"params.{setting}" in runs:
                keep &= runs[f"params.{setting}"].map(lambda v, s=setting, w=values: typed(s, v) in w)
        elif name == PARAM_SEEDS:
            seeds = _literal(value)
            if isinstance(seeds, list) and f"params.{PARAM_SEED}" in runs:
                keep &= runs[f"params.{PARAM_SEED}"].map(lambda v, w=seeds: typed("seed", v) in w)
    return runs[keep]


def _column(metric: str) -> str:
    """`test/acc` → `test_acc`; the per-epoch `lr` metric → `epoch_lr` (the param `lr` is the setting)."""
    name = metric.replace("/", "_")
    return f"epoch_{name}" if name in FIELD_TYPES else name


def _label(values: dict[str, Any], names: list[str]) -> str:
    return " ".join(f"{k}={fmt(values[k])}" for k in names)


def load_runs(study: str, tracking_uri: str | None = None, *, run_ids: list[str] | None = None) -> pd.DataFrame:
    """The study's trials as one row per trial × epoch (see the module docstring).

    Columns: study, trial (`lr=0.01 seed=0`), value (the scientific values, `lr=0.01`:
    what a plot's legend shows), run_id, run_name, status, the scientific and nuisance
    hyperparameters, seed, epoch, the per-epoch metrics, every other param (typed), and
    the run's train_seconds, wall_seconds, images_per_second and ran_on (the device it
    trained on; `device` is the setting, e.g. auto). `frame.attrs`:
    study, scientific, nuisance, fixed (the spec's fixed settings), seeds, metrics (column
    → MLflow key), tracking_uri, experiment_id, parent_run_id.
    Raises `NoRuns` when the study has no finished trial in the store.
    """
    runs = trial_runs(study, tracking_uri, run_ids=run_ids)
    meta = dict(runs.attrs)
    client = MlflowClient(meta["tracking_uri"])
    sci, nui = meta["scientific"], meta["nuisance"]
    metric_keys: dict[str, str] = {}
    records = []
    for _, run in runs.iterrows():
        params = {k[len("params."):]: typed(k[len("params."):], v) for k, v in run.items()
                  if k.startswith("params.") and isinstance(v, str)}
        per_epoch: dict[int, dict[str, float]] = {}
        keys = [k[len("metrics."):] for k, v in run.items() if k.startswith("metrics.") and pd.notna(v)]
        for key in keys:
            if key in SUMMARY_METRICS or key == CURVE_METRIC:
                continue
            column = _column(key)
            metric_keys[column] = key
            for m in sorted(client.get_metric_history(run["run_id"], key), key=lambda m: m.timestamp):
                per_epoch.setdefault(int(m.step), {})[column] = m.value  # a re-logged step: the newest
        base = {"study": study, "run_id": run["run_id"], "run_name": run.get(f"tags.{MLFLOW_RUN_NAME}"),
                "status": run.get(f"tags.{TAG_STATUS}"), **params,
                **{k: run.get(f"metrics.{k}", math.nan)
                   for k in (METRIC_TRAIN_SECONDS, METRIC_WALL_SECONDS, METRIC_IMAGES_PER_SECOND)},
                "ran_on": run.get(f"tags.{TAG_DEVICE}"), "fused_with": _count(run.get(f"tags.{TAG_FUSED_WITH}")),
                "start_time": run["start_time"]}
        for epoch in sorted(per_epoch):
            if epoch >= 1:
                records.append({**base, "epoch": epoch, **per_epoch[epoch]})
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        raise NoRuns(f"the trial runs of {study!r} have no per-epoch metrics")
    frame = _reuse_epochs(frame, meta)
    if sci:
        frame["trial"] = [_label(r, sci + nui + ["seed"]) for r in frame.to_dict("records")]
        frame["value"] = [_label(r, sci) for r in frame.to_dict("records")]
        order = _value_order(frame, sci)
    else:  # runs of no study (a sweep's trials): each is its own line, named as in MLflow
        frame["trial"] = frame["run_name"].fillna(frame["run_id"])
        twins = frame.groupby("trial")["run_id"].transform("nunique") > 1
        frame.loc[twins, "trial"] += " (" + frame.loc[twins, "run_id"].str[:8] + ")"
        frame["value"] = frame["trial"]
        order = list(dict.fromkeys(frame["value"]))
    frame["value"] = pd.Categorical(frame["value"], categories=order, ordered=True)
    first = ["study", "trial", "value", "run_id", "run_name", "status", *sci, *nui, "seed", "epoch", *metric_keys]
    frame = frame[[c for c in first if c in frame] + sorted(c for c in frame if c not in first)]
    frame = frame.sort_values([*sci, *nui, "seed", "epoch"], ignore_index=True)
    frame.attrs = {**meta, "metrics": metric_keys}
    return frame


def _value_order(frame: pd.DataFrame, sci: list[str]) -> list[str]:
    rows = frame.drop_duplicates(sci).to_dict("records")
    rows.sort(key=lambda r: tuple((0, r[k], "") if isinstance(r[k], (int, float)) and r[k] is not None
                                  else (1, 0, str(r[k])) for k in sci))
    return list(dict.fromkeys(_label(r, sci) for r in rows))


def _reuse_epochs(frame: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
    """With `epochs` scientific, a shorter trial that has no run of its own reads the first
    epochs of the longest run with the same other settings (study.py's epoch reuse)."""
    values = meta.get("epochs_values")
    if "epochs" not in meta["scientific"] or not values:
        return frame
    others = [k for k in meta["scientific"] + meta["nuisance"] if k != "epochs"] + ["seed"]
    have = {tuple(r[k] for k in others + ["epochs"]) for r in frame.drop_duplicates("run_id").to_dict("records")}
    extra = []
    for run_id, rows in frame.groupby("run_id", sort=False):
        longest = int(rows["epochs"].iloc[0])
        key = tuple(rows[k].iloc[0] for k in others)
        for e in values:
            if e < longest and key + (e,) not in have:
                extra.append(rows[rows["epoch"] <= e].assign(epochs=e))
                have.add(key + (e,))
    return pd.concat([frame, *extra], ignore_index=True) if extra else frame


def load_loss_curve(frame: pd.DataFrame, *, first_epoch: bool = True) -> pd.DataFrame:
    """`train/loss` of each run in `frame` (step = samples seen): columns trial, value,
    run_id, the scientific and nuisance hyperparameters, seed, samples, loss. With
    `first_epoch`, only the first pass over the training set, as document 003 draws it."""
    client = MlflowClient(frame.attrs["tracking_uri"])
    names = frame.attrs["scientific"] + frame.attrs["nuisance"]
    trials = frame.sort_values("epochs", ascending=False).drop_duplicates("run_id")
    records = []
    for row in trials.to_dict("records"):
        limit = train_images(row) if first_epoch else math.inf
        for m in client.get_metric_history(row["run_id"], CURVE_METRIC):
            if m.step <= limit:
                records.append({"trial": row["trial"], "value": row["value"], "run_id": row["run_id"],
                                **{k: row[k] for k in names + ["seed"]}, "samples": int(m.step), "loss": m.value})
    out = pd.DataFrame.from_records(records)
    if not out.empty:
        out["value"] = pd.Categorical(out["value"], categories=frame["value"].cat.categories, ordered=True)
        out = out.sort_values(["value", "seed", "samples"], ignore_index=True)
    out.attrs = dict(frame.attrs)
    return out


def train_images(row: dict[str, Any]) -> int:
    """Training images per epoch of a trial (its subset, less its validation split)."""
    return train_size(row["dataset"], val_size=int(row.get("val_size") or 0),
                      train_subset=int(row.get("train_subset") or 0),
                      test_fraction=float(row.get("test_fraction") or 0.0))


def _count(tag: Any) -> int:
    return int(tag) if isinstance(tag, str) and tag.isdigit() else 1


# -- the study's spec as last executed ------------------------------------------------------


def study_spec(frame: pd.DataFrame) -> StudySpec:
    """The spec as last executed: the study run's `spec/` artifact with its `--set`
    overrides and seeds; without one, a spec made of what the runs show."""
    meta = frame.attrs
    parent = meta.get("parent_run_id")
    if parent:
        client = MlflowClient(meta["tracking_uri"])
        with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:
            folder = Path(client.download_artifacts(parent, "spec", tmp))
            spec = load_spec(next(folder.glob("*.y*ml")))
            overrides = {k: v for k, v in meta["fixed"].items() if spec.fixed.get(k, object()) != v}
            seeds = tuple(meta["seeds"]) if meta["seeds"] else None
            return spec.with_overrides(overrides, seeds)
    sci, nui = meta["scientific"], meta["nuisance"]
    values = {k: tuple(sorted(frame[k].dropna().unique().tolist())) for k in sci + nui}
    return StudySpec(name=meta["study"], path=f"mlflow:{meta['study']}", title=meta["study"], source="",
                     description="", scientific={k: values[k] for k in sci}, nuisance={k: values[k] for k in nui},
                     fixed=dict(meta["fixed"]), seeds=tuple(meta["seeds"]), reported=())


# -- sweeps: the Optuna study, and the MLflow runs of its best trials ------------------------
# (its trials table and importances are cnnbench.report.sweep's, as in results/<sweep>/)


def optuna_storage(sweep: str, storage: str | None = None) -> str:
    """The sweep's Optuna storage: `sqlite:///<state dir>/optuna/<sweep>.db` unless given."""
    if storage:
        return storage

    return default_url(sweep, state_dir())


def load_sweep(sweep: str, storage: str | None = None):
    """The Optuna study of `sweep`. Raises `NoRuns` when its storage or study is missing."""

    url = optuna_storage(sweep, storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise NoRuns(f"no Optuna storage for sweep {sweep!r} at {url[len('sqlite:///'):]}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = optuna.get_all_study_names(url)
    name = sweep if sweep in names else (names[0] if len(names) == 1 else None)
    if name is None:
        raise NoRuns(f"{url} holds no Optuna study named {sweep!r} (it holds: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=url)


def sweep_objective(study, tracking_uri: str | None = None) -> str:
    """What the sweep optimises (`val_acc`, ...), from its MLflow sweep run; else "objective"."""
    parent = study.user_attrs.get(STUDY_PARENT_RUN_ID)
    if parent:
        with contextlib.suppress(Exception):
            params = MlflowClient(resolve_uri(tracking_uri)).get_run(parent).data.params
            return params.get(PARAM_SWEEP_OBJECTIVE, "objective")
    return "objective"


def best_trial_runs(sweep: str, study, tracking_uri: str | None = None, *, top: int = 5) -> pd.DataFrame:
    """The per-epoch frame (`load_runs`) of the MLflow runs of the `top` best complete
    trials, found by a run id the trial records (user attribute `mlflow_run_id` or
    `run_id`) or else by equal parameters; column `optuna_trial` names the trial."""

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = sorted(complete, key=lambda t: -t.value if maximize else t.value)[:top]
    experiment = study.user_attrs.get(STUDY_EXPERIMENT, sweep)
    runs = trial_runs(experiment, tracking_uri, run_ids=None) if best else pd.DataFrame()
    chosen: dict[str, tuple[int, float]] = {}
    for t in best:
        attr = t.user_attrs.get(ATTR_MLFLOW_RUN_ID) or t.user_attrs.get(ATTR_RUN_ID)
        if attr and attr in set(runs["run_id"]):
            chosen[attr] = (t.number, t.value)
            continue
        match = pd.Series(True, index=runs.index)
        for k, v in t.params.items():
            if f"params.{k}" not in runs:
                match &= False
                continue
            match &= runs[f"params.{k}"].map(lambda r, k=k, v=v: typed(k, r) == typed(k, fmt(v)))
        for run_id in runs.loc[match, "run_id"]:
            chosen.setdefault(run_id, (t.number, t.value))
    if not chosen:
        raise NoRuns(f"no MLflow run of sweep {sweep!r} matches its best trials")
    frame = load_runs(experiment, tracking_uri, run_ids=list(chosen))
    frame["optuna_trial"] = frame["run_id"].map(lambda r: chosen[r][0])
    label = {r: f"trial {n} ({value:.4g})" for r, (n, value) in chosen.items()}
    ranked = list(dict.fromkeys(label[r] for r in chosen))  # best first
    frame["value"] = pd.Categorical(frame["run_id"].map(label), categories=ranked, ordered=True)
    return frame
