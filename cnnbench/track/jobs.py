"""What the background writer's process does for the record (util/background.py): a
trial's params and metrics, the end of its run (summary, result.json, config.json, its
figure, checkpoints, status) and its Optuna outcome, as module-level functions of plain
values (URIs, run and trial ids, metrics, a TrialResult), so that they travel to that
process. Each opens its stores once per process (`client`, `storage`, `study`). They
import neither torch nor cnnbench's training code: the writer process starts in about
the time MLflow takes to import. Under CNNBENCH_SYNC_BOOKKEEPING they run in the
training thread, as they did before the writer existed.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Metric, Param, RunTag
from optuna.trial import TrialState

from cnnbench.config.trial import TrialConfig
from cnnbench.track import stores
from cnnbench.track.figure import save_trial_figure, warm_trial_figure
from cnnbench.track.schema import (
    ATTR_REASON,
    METRIC_BEST_ACC,
    METRIC_BEST_EPOCH,
    METRIC_FINAL_TEST_ACC,
    METRIC_IMAGES_PER_SECOND,
    METRIC_OPTUNA_VALUE,
    METRIC_TRAIN_SECONDS,
    METRIC_WALL_SECONDS,
    TAG_DIVERGED,
    TAG_REASON,
    TAG_STATE,
    TAG_STATUS,
    TEST_ACC,
    VAL_ACC,
)
from cnnbench.train.result import DIVERGED, FAILED, FINISHED, INTERRUPTED, PRUNED, TrialResult
from cnnbench.util.text import fmt

# how each outcome shows in MLflow's own run status
MLFLOW_STATUS = {FINISHED: "FINISHED", PRUNED: "FINISHED", DIVERGED: "FAILED", FAILED: "FAILED",
                 INTERRUPTED: "KILLED"}
STORES = 4  # stores kept open per process (a test session opens many, one after another)


@functools.lru_cache(maxsize=STORES)
def client(uri: str) -> Any:
    """This process's MlflowClient on `uri` (an absolute one: stores.absolute)."""
    stores.quiet_mlflow()
    return stores.mlflow_client(uri)


@functools.lru_cache(maxsize=STORES)
def storage(url: str) -> Any:
    """This process's Optuna storage on `url` (an absolute one)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return stores.optuna_storage(url)


def study(url: str, name: str) -> Any:
    """The Optuna study `name` in `url`, to be told outcomes (its sampler is not asked
    here). Loaded each time (one query): a study deleted and created again under its
    name (grid.GridStudy.start_over) is another."""
    return optuna.load_study(study_name=name, storage=storage(url), sampler=optuna.samplers.RandomSampler())


def warm() -> None:
    """The writer process's first job: importing this module is its start-up, and the
    trials' figure is built and its fonts loaded before the first trial ends."""
    warm_trial_figure()


# ----------------------------------------------------------------------------------------
# MLflow


def log_params(mlflow: Any, run_id: str, params: dict[str, Any]) -> None:
    """`params` on the run, 100 to a batch (MLflow's limit)."""
    items = [Param(k, fmt(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_batch(run_id, params=items[i:i + 100], synchronous=True)


def log_metrics(mlflow: Any, run_id: str, metrics: list[Metric], tags: list[RunTag] | None = None) -> None:
    """`metrics` on the run and `tags` (at most 100) with the last of them, in batches of
    at most 1000 entries of both together (MLflow's limit)."""
    tags = tags or []
    if not metrics and not tags:
        return
    size = 1000 - len(tags)
    for i in range(0, max(len(metrics), 1), size):
        last = i + size >= len(metrics)
        mlflow.log_batch(run_id, metrics=metrics[i:i + size], tags=tags if last else [], synchronous=True)


def log_run(uri: str, run_id: str, params: dict[str, Any], metrics: list[Metric]) -> None:
    """A trial's params (at its start) and metrics (each epoch's)."""
    mlflow = client(uri)
    if params:
        log_params(mlflow, run_id, params)
    log_metrics(mlflow, run_id, metrics)


def end_run(uri: str, run_id: str, result: TrialResult, metrics: list[Metric]) -> None:
    """A trial's run ended: its last metrics, summary, artifacts and status. The run is
    closed whatever happened; one whose record is incomplete (no result.json) is not a
    finished trial that a resumed study may skip."""
    mlflow = client(uri)
    status = MLFLOW_STATUS.get(result.status, "FAILED")
    try:
        log_metrics(mlflow, run_id, *summarized(result, metrics))  # one batch where they fit
        artifacts(mlflow, run_id, result)
    except BaseException:
        status = "KILLED" if status == "FINISHED" else status
        raise
    finally:
        mlflow.set_terminated(run_id, status=status)


def summarized(result: TrialResult, metrics: list[Metric]) -> tuple[list[Metric], list[RunTag]]:
    """`metrics` (the epochs not written yet) and the run's summary: its metrics and tags."""
    best, best_epoch = result.best(VAL_ACC if any(VAL_ACC in r for r in result.history) else TEST_ACC)
    summary = {METRIC_TRAIN_SECONDS: result.train_seconds, METRIC_WALL_SECONDS: result.wall_seconds,
               METRIC_IMAGES_PER_SECOND: result.images_per_second}
    if result.history:
        summary.update({METRIC_FINAL_TEST_ACC: result.metric(TEST_ACC), METRIC_BEST_ACC: best,
                        METRIC_BEST_EPOCH: float(best_epoch or 0)})
    ts = int(time.time() * 1000)
    tags = [RunTag(TAG_STATUS, result.status)]
    if result.reason:
        tags.append(RunTag(TAG_REASON, result.reason[:5000]))
    if result.status == DIVERGED:
        tags.append(RunTag(TAG_DIVERGED, "true"))
    return [*metrics, *(Metric(k, float(v), ts, 0) for k, v in summary.items() if v == v)], tags


def artifacts(mlflow: Any, run_id: str, result: TrialResult) -> None:
    """result.json, config.json, curves.png and the checkpoints (last, best)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "result.json").write_text(json.dumps(result_to_json(result), indent=1))
        (folder / "config.json").write_text(json.dumps(result.config.to_dict(), indent=1))
        paths = [folder / "result.json", folder / "config.json"]
        if result.curve or result.history:
            paths.append(save_trial_figure(result, folder / "curves.png"))
        for path in paths:
            mlflow.log_artifact(run_id, str(path))
    for path in (result.final_checkpoint, result.best_checkpoint):
        if path and Path(path).exists():
            mlflow.log_artifact(run_id, str(path), "checkpoints")


def result_to_json(r: TrialResult) -> dict[str, Any]:
    return {"config": r.config.to_dict(), "status": r.status, "reason": r.reason, "history": r.history,
            "curve": r.curve, "train_seconds": r.train_seconds, "wall_seconds": r.wall_seconds,
            "images": r.images, "device": r.device, "fused_with": r.fused_with, "best_epoch": r.best_epoch}


def result_from_json(d: dict[str, Any]) -> TrialResult:
    return TrialResult(config=TrialConfig.from_dict(d["config"]), status=d["status"], reason=d.get("reason", ""),
                       history=d["history"], curve=[tuple(p) for p in d["curve"]],
                       train_seconds=d["train_seconds"], wall_seconds=d.get("wall_seconds", 0.0),
                       images=d["images"], device=d.get("device", ""), fused_with=d.get("fused_with", 1),
                       best_epoch=d.get("best_epoch"))


# ----------------------------------------------------------------------------------------
# Optuna


def record_outcome(store: Any, optuna_study: Any, mlflow: Any, trial_id: int, trial: Any, run_id: str | None,
                   state: TrialState, value: float | None, attrs: dict[str, Any], reason: str = "") -> None:
    """Tell Optuna a trial's outcome (`trial`: the trial or its number), its user
    attributes first, and tag its MLflow run with it."""
    for key, attr in attrs.items():
        store.set_trial_user_attr(trial_id, key, attr)
    if state == TrialState.FAIL and reason:
        store.set_trial_user_attr(trial_id, ATTR_REASON, reason[:500])
    optuna_study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    if run_id:  # None: a member of a batch that never started
        try:  # the run's own record is complete without these
            told = value is not None and state == TrialState.COMPLETE
            mlflow.log_batch(run_id, tags=[RunTag(TAG_STATE, state.name)], synchronous=True,
                             metrics=[Metric(METRIC_OPTUNA_VALUE, float(value), int(time.time() * 1000), 0)]
                             if told else [])
        except Exception:
            pass


def tell(url: str, study_name: str, uri: str, trial_id: int, number: int, run_id: str | None, state: TrialState,
         value: float | None, attrs: dict[str, Any], reason: str) -> None:
    """`record_outcome` in the writer process, from plain values."""
    record_outcome(storage(url), study(url, study_name), client(uri), trial_id, number, run_id, state, value, attrs,
                   reason)
