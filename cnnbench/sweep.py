"""Optuna sweeps: find the best settings over a spec's `search:` space.

A sweep is an Optuna study. `suggest` is the one place that turns the spec's search
block into `trial.suggest_*` calls; the suggested values over the spec's fixed settings
make a `TrialConfig`, trained by the same loop as every other trial (`run_trial`) with
a recorder that writes the trial's MLflow child run and reports each epoch's validation
score to Optuna, which may prune it. Tuning never reads the test set: the objective is
the best validation score over epochs, on the fixed, seeded split that `val_size`
holds out of the training set. At the end the best trial is trained again over
`sweep.final_seeds`, each run tested once with its best-validation checkpoint, and
`results/<sweep>/` is written (sweep_report.py).

Many workers, here (`--workers N`) or on other machines (`--storage postgresql://...`),
share one study and one MLflow parent run. Each worker loops: under the claim lock,
recover trials of lost workers, count, and take the next trial (a queued one first:
retries and grid points); then train it outside the lock while its heartbeat beats.
The study's user attributes hold what the workers share: the MLflow parent run, a
hash of the spec, who writes the results. See sweep_storage.py for the lock and the
heartbeat. This module knows nothing of the loop's internals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnbench import sweep_storage
from cnnbench.config import ConfigError, SearchDim, StudySpec, TrialConfig
from cnnbench.train import DIVERGED, FINISHED, INTERRUPTED, PRUNED, Recorder, TrialResult

OBJECTIVES = {"val_acc": "val/acc", "val_loss": "val/loss"}  # spec name -> per-epoch metric
DIRECTION_OF = {"val_acc": "maximize", "val_loss": "minimize"}
PRUNE_FROM_EPOCH = 2  # median pruning judges a trial from its second epoch on: epoch 1 is too noisy
MAX_RETRY = 3  # a trial whose worker is lost this many times is given up
MAX_FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing (a broken device, say) stops
POLL_S = 5.0  # an idle worker looks for work (or lost trials) this often
GRID_LIMIT = 10_000

TAG_PHASE = "cnnbench.phase"  # search | final
TAG_TRIAL = "optuna.trial_number"
TAG_STATE = "optuna.state"
TAG_OPTUNA_STUDY = "optuna.study"
ATTR = "cnnbench."  # prefix of the study's user attributes


# ----------------------------------------------------------------------------------------
# the search space


def check_spec(spec: StudySpec) -> None:
    """What a sweep needs beyond what load_spec checks."""
    if not spec.search or spec.sweep is None:
        raise ConfigError(f"{spec.path}: search: a sweep needs a non-empty search block "
                          "(a spec with only a scientific block is run by `cnnbench study`)")
    s = spec.sweep
    if s.direction != DIRECTION_OF[s.objective]:
        raise ConfigError(f"{spec.path}: sweep.direction: objective {s.objective} is "
                          f"{DIRECTION_OF[s.objective]}d, got direction {s.direction}")
    base = spec.base_config()
    if base.val_size <= 0:
        raise ConfigError(f"{spec.path}: fixed.val_size: a sweep is scored on a validation split held out of the "
                          "training set, never on the test set; set val_size (e.g. 10000 for MNIST)")
    for dim in spec.search:
        if dim.name in spec.fixed:
            raise ConfigError(f"{spec.path}: fixed.{dim.name}: also searched; remove one of the two")
        if dim.name == "seed":
            raise ConfigError(f"{spec.path}: search.seed: the seed is not a hyperparameter; the best trial is "
                              "repeated over sweep.final_seeds")
        # every end of every range, with the fixed settings, must make a valid trial
        for value in (dim.choices if dim.type == "categorical" else _ends(dim)):
            TrialConfig.from_dict({**spec.fixed, dim.name: value}, where=f"{spec.path}: search.{dim.name}")
    if s.sampler == "grid":
        grid_points(spec)


def _ends(dim: SearchDim) -> tuple[Any, ...]:
    assert dim.low is not None and dim.high is not None
    return (int(dim.low), int(dim.high)) if dim.type == "int" else (dim.low, dim.high)


def grid_values(dim: SearchDim, where: str = "") -> list[Any]:
    """The values a grid takes along one dimension: its choices, or its stepped range."""
    if dim.type == "categorical":
        return list(dim.choices)
    assert dim.low is not None and dim.high is not None
    if dim.type == "int":
        step = int(dim.step or 1)
        return list(range(int(dim.low), int(dim.high) + 1, step))
    if dim.step is None:
        raise ConfigError(f"{where}search.{dim.name}: a grid needs a step for a float range (or a list of choices)")
    n = int(math.floor((dim.high - dim.low) / dim.step + 1e-9)) + 1
    return [round(dim.low + i * dim.step, 12) for i in range(n)]


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    values = [grid_values(d, f"{spec.path}: ") for d in spec.search]
    size = math.prod(len(v) for v in values)
    if size > GRID_LIMIT:
        raise ConfigError(f"{spec.path}: search: the grid has {size} points (more than {GRID_LIMIT}); "
                          "use a coarser step or another sampler")
    names = [d.name for d in spec.search]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def suggest(trial: Any, spec: StudySpec) -> dict[str, Any]:
    """The one translation of `spec.search` into Optuna: name -> suggested value."""
    out: dict[str, Any] = {}
    for d in spec.search:
        if d.type == "categorical":
            out[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.type == "int":
            out[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            out[d.name] = trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)
    return out


def trial_config(spec: StudySpec, params: dict[str, Any], seed: int | None = None) -> TrialConfig:
    """The fixed settings, the suggested values and the seed (the spec's first by default)."""
    values = {**spec.fixed, **params, "seed": spec.seeds[0] if seed is None else seed}
    return TrialConfig.from_dict(values, where=f"{spec.path}: trial")


def make_sampler(spec: StudySpec, seed: int | None):
    import optuna

    s = spec.sweep
    assert s is not None
    if s.sampler == "tpe":  # Optuna 5: multivariate with the constant liar by default, good with many workers
        return optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=seed)
    if s.sampler == "qmc":
        # every worker must walk the same scrambled sequence: one seed per sweep
        fixed = seed if seed is not None else int(hashlib.sha256(spec.name.encode()).hexdigest()[:8], 16)
        with sweep_storage._quiet():  # "experimental" since Optuna 3
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=fixed)
    # random; and grid, whose points are all queued when the sweep starts (workers pop them
    # atomically), so that this sampler is never asked
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: StudySpec):
    import optuna

    s = spec.sweep
    assert s is not None
    epochs = spec.base_config().epochs
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=PRUNE_FROM_EPOCH)
    if s.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def with_overrides(spec: StudySpec, overrides: dict[str, Any]) -> StudySpec:
    """`--set` changes fixed settings; a searched one cannot be fixed this way."""
    searched = {d.name for d in spec.search}
    for key in overrides:
        if key in searched:
            raise ConfigError(f"--set {key}: {key} is searched by sweep {spec.name}; edit {spec.path} to change its range")
        if key == "seed":
            raise ConfigError("--set seed: a sweep's trials use the spec's first seed; the best one is repeated "
                              "over sweep.final_seeds")
    if not overrides:
        return spec
    fixed = {**spec.fixed, **overrides}
    TrialConfig.from_dict(fixed, where="--set")
    return dataclasses.replace(spec, fixed=fixed)


def spec_hash(spec: StudySpec) -> str:
    """What the stored trials depend on: the space, the fixed settings (not the runtime
    ones: device, progress...), the objective. Sampler, pruner, n_trials and final seeds
    may change between runs of a sweep."""
    s = spec.sweep
    assert s is not None
    identity = {"search": [dataclasses.asdict(d) for d in spec.search], "fixed": spec.base_config().identity(),
                "seed": spec.seeds[0], "objective": s.objective, "direction": s.direction}
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# recording one trial: MLflow (the wrapped recorder) and Optuna (reports, pruning)


class PruningRecorder(Recorder):
    """Passes every event to the trial's MLflow recorder and reports each epoch's
    validation score to Optuna; asks the loop to stop when Optuna prunes the trial."""

    def __init__(self, inner: Any, trial: Any, metric: str) -> None:
        self.inner, self.trial, self.metric = inner, trial, metric

    def start(self, config: TrialConfig, info: dict[str, Any], resumed: TrialResult | None) -> None:
        self.inner.start(config, info, resumed)
        self.trial.set_user_attr("mlflow_run_id", self.inner.run_id or "")
        if resumed is not None:  # a retried trial: the epochs its checkpoint restored count too
            for record in resumed.history:
                if self.metric in record:
                    self.trial.report(record[self.metric], int(record["epoch"]))

    def train_loss(self, samples: int, loss: float) -> None:
        self.inner.train_loss(samples, loss)

    def epoch(self, record: dict[str, float]) -> str | None:
        self.inner.epoch(record)
        self.trial.report(record[self.metric], int(record["epoch"]))
        return "prune" if self.trial.should_prune() else None

    def finish(self, result: TrialResult) -> None:
        self.inner.finish(result)


def objective_value(result: TrialResult, objective: str) -> float:
    """The best validation score over the trial's epochs (NaN when none is finite)."""
    metric = OBJECTIVES[objective]
    values = [r[metric] for r in result.history if metric in r and math.isfinite(r[metric])]
    if not values:
        return math.nan
    return max(values) if objective == "val_acc" else min(values)


# ----------------------------------------------------------------------------------------
# opening a sweep: storage, study, MLflow parent run


@dataclass
class Sweep:
    spec: StudySpec
    url: str
    storage: Any
    study: Any
    lock: sweep_storage.ClaimLock
    tracker: Any
    parent: str
    target: int  # finished (complete + pruned) trials the study must reach
    out_dir: Path
    ckpt_root: Path
    data_root: Any
    command: str
    worker: str = ""  # a label for this process's lines
    grid_size: int = 0

    @property
    def metric(self) -> str:
        assert self.spec.sweep is not None
        return OBJECTIVES[self.spec.sweep.objective]


def preflight(spec: StudySpec, *, url: str, uri: str, data_root: Any, out_dir: Path) -> None:
    """Everything that can be checked before anything is created: spec, storage, device,
    data, results folder, tracking store. Bad input fails here and writes nothing."""
    from cnnbench import fileio
    from cnnbench.data import data_dir, load_arrays
    from cnnbench.tracking import check_reachable
    from cnnbench.train import resolve_device

    check_spec(spec)
    sweep_storage.check(url)
    base = spec.base_config()
    resolve_device(base.device)
    load_arrays(base.dataset, data_dir(data_root))
    fileio.check_writable(out_dir)
    # workers started together on a fresh tracking database race to create MLflow's
    # tables; the loser's transaction fails with a duplicate, and a second look finds them
    _again(lambda: check_reachable(uri), when=lambda err: any(
        word in str(err) for word in ("already exists", "UniqueViolation", "IntegrityError")))


def open_sweep(spec: StudySpec, *, storage: str | None = None, tracking: str | None = None,
               state: Any = None, results_root: Any = "results", n_trials: int | None = None,
               sampler_seed: int | None = None, data_root: Any = None, command: str = "",
               worker: str = "") -> Sweep:
    """Check everything, then create or join the sweep's study and MLflow parent run."""
    import optuna

    from cnnbench.study import state_dir
    from cnnbench.tracking import Tracker, quiet_mlflow, tracking_uri

    quiet_mlflow()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = state_dir(state)
    url = storage or sweep_storage.default_url(spec.name, root)
    uri = tracking_uri(tracking)
    out_dir = Path(results_root) / spec.name
    preflight(spec, url=url, uri=uri, data_root=data_root, out_dir=out_dir)
    s = spec.sweep
    assert s is not None

    # workers started at the same moment on an empty database race to create its tables:
    # the loser's transaction fails and a second attempt finds them
    tracker = _again(lambda: Tracker(spec.name, uri))
    holder: dict[str, Sweep] = {}
    store = _again(lambda: sweep_storage.open_storage(url, lambda study, trial: _lost(holder["sweep"], trial)))
    study = optuna.create_study(storage=store, study_name=spec.name, direction=s.direction,
                                sampler=make_sampler(spec, sampler_seed), pruner=make_pruner(spec),
                                load_if_exists=True)
    grid = len(grid_points(spec)) if s.sampler == "grid" else 0
    target = n_trials or s.n_trials
    if grid and target > grid:
        print(f"sweep {spec.name}: the grid has {grid} points; the sweep ends after {grid} trials")
        target = grid
    sweep = Sweep(spec=spec, url=url, storage=store, study=study, lock=sweep_storage.ClaimLock(url, spec.name),
                  tracker=tracker, parent="", target=target, out_dir=out_dir,
                  ckpt_root=root / "checkpoints" / spec.name, data_root=data_root, command=command,
                  worker=worker or sweep_storage.describe(sweep_storage.identity()), grid_size=grid)
    holder["sweep"] = sweep
    with sweep.lock():
        sweep.parent = _initialise(sweep)
    # runs of this sweep whose process died here before Optuna knew their run id
    tracker.close_orphans("the process running it died", extra=f"tags.`mlflow.parentRunId` = '{sweep.parent}'")
    return sweep


def _again(make: Any, attempts: int = 3, when: Any = lambda err: True) -> Any:
    """`make()`, tried again after a short random pause when it fails (and `when(err)`)."""
    import random

    for attempt in range(attempts):
        try:
            return make()
        except Exception as err:
            if attempt == attempts - 1 or not when(err):
                raise
            time.sleep(1 + 2 * random.random())


def _initialise(sweep: Sweep) -> str:
    """Under the claim lock: the first worker queues the grid and creates the MLflow
    parent run; every later one checks that it runs the same sweep and joins it."""
    spec, study, s = sweep.spec, sweep.study, sweep.spec.sweep
    assert s is not None
    attrs = study.user_attrs
    if attrs.get(ATTR + "ready"):
        if attrs.get(ATTR + "spec_hash") != spec_hash(spec):
            raise ConfigError(f"{spec.path}: the study {spec.name!r} in {sweep_storage.masked(sweep.url)} was started "
                              "with another search space, fixed settings or objective; give the sweep another name, "
                              "undo the change, or use another --storage")
        if (attrs.get(ATTR + "sampler") == "grid") != (s.sampler == "grid"):
            raise ConfigError(f"{spec.path}: sweep.sampler: study {spec.name!r} was started with sampler "
                              f"{attrs.get(ATTR + 'sampler')}; a grid is chosen when a sweep starts")
        parent = attrs[ATTR + "mlflow_parent_run_id"]
        try:
            run = sweep.tracker.client.get_run(parent)
        except Exception:
            raise ConfigError(f"MLflow tracking URI {sweep.tracker.uri} does not hold this sweep's parent run "
                              f"{parent}; every worker must use the tracking store it was started with "
                              f"({attrs.get(ATTR + 'tracking_uri')})") from None
        if run.info.status != "RUNNING" and _done(sweep) < sweep.target:
            sweep.tracker.client.update_run(parent, status="RUNNING")  # the sweep goes on
        return parent

    if s.sampler == "grid":  # every point once; workers pop queued trials atomically
        queued = {json.dumps(t.system_attrs.get("fixed_params", t.params), sort_keys=True, default=str)
                  for t in study.get_trials(deepcopy=False)}
        for point in grid_points(spec):
            if json.dumps(point, sort_keys=True, default=str) not in queued:
                study.enqueue_trial(point)
    parent = sweep.tracker.start_parent(
        f"{spec.name} (sweep, {s.sampler}, {sweep.target} trials)", kind="sweep",
        tags={TAG_OPTUNA_STUDY: spec.name, "optuna.storage": sweep_storage.masked(sweep.url),
              "cnnbench.spec": spec.path, "cnnbench.command": sweep.command[:500],
              "cnnbench.searched": ",".join(d.name for d in spec.search)},
        params={**{f"fixed.{k}": v for k, v in spec.fixed.items()},
                **{f"search.{d.name}": _describe(d) for d in spec.search},
                **{f"sweep.{k}": v for k, v in dataclasses.asdict(s).items()},
                "n_trials": sweep.target, "seed": spec.seeds[0]},
        note=spec.description)
    sweep.tracker.log_artifacts(parent, [Path(spec.path)], "spec")
    for key, value in {"mlflow_parent_run_id": parent, "mlflow_experiment": spec.name,
                       "tracking_uri": sweep_storage.masked(sweep.tracker.uri), "spec_hash": spec_hash(spec),
                       "sampler": s.sampler, "spec": spec.path, "ready": True}.items():
        study.set_user_attr(ATTR + key, value)
    return parent


def _describe(d: SearchDim) -> str:
    if d.type == "categorical":
        return "{" + ", ".join(map(str, d.choices)) + "}"
    text = f"{d.type} [{d.low:g}, {d.high:g}]"
    return text + (" log" if d.log else "") + (f" step {d.step:g}" if d.step else "")


# ----------------------------------------------------------------------------------------
# the worker loop


def _counts(trials: list[Any]) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {state.name: 0 for state in TrialState}
    for t in trials:
        out[t.state.name] += 1
    out["done"] = out["COMPLETE"] + out["PRUNED"]
    return out


def _done(sweep: Sweep) -> int:
    return _counts(sweep.study.get_trials(deepcopy=False))["done"]


def _finished(sweep: Sweep, counts: dict[str, int]) -> bool:
    """The target is reached, or a grid has no point left to run (a point that failed for
    good, diverging at once say, is not run again)."""
    if counts["done"] >= sweep.target:
        return True
    return bool(sweep.grid_size) and counts["WAITING"] == 0 and counts["RUNNING"] == 0


def _lost(sweep: Sweep, trial: Any, why: str = "") -> None:
    """A trial whose worker is gone (no heartbeat, or a dead process here): close its
    MLflow run and queue the same parameters again (Optuna's retry callback)."""
    import optuna

    why = why or f"worker {sweep_storage.describe(trial.user_attrs)} stopped beating for {sweep_storage.GRACE_S} s"
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        client = sweep.tracker.client
        with contextlib.suppress(Exception):
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "cnnbench.status", INTERRUPTED)
                client.set_tag(run_id, "cnnbench.reason", why)
                client.set_terminated(run_id, status="KILLED")
            client.set_tag(run_id, TAG_STATE, "FAIL")
    with sweep_storage._quiet():
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(sweep.study, trial)
    print(f"[{sweep.worker}] trial {trial.number} lost ({why}); queued again", flush=True)


def recover(sweep: Sweep) -> None:
    """Under the claim lock: fail and requeue the running trials of lost workers."""
    import optuna
    from optuna.trial import TrialState

    with sweep_storage._quiet():
        optuna.storages.fail_stale_trials(sweep.study)  # other machines: by heartbeat
    for t in sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not sweep_storage.dead_here(t.user_attrs):  # this machine: the process is gone
            continue
        try:
            changed = sweep.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if changed:
            _lost(sweep, sweep.storage.get_trial(t._trial_id),
                  f"its process {sweep_storage.describe(t.user_attrs)} is gone")


def _next_trial(sweep: Sweep) -> tuple[Any | None, dict[str, int]]:
    """Under the claim lock: the next trial to train, or None when there is nothing to do
    (the target is reached, or the remaining trials are running elsewhere)."""
    recover(sweep)
    counts = _counts(sweep.study.get_trials(deepcopy=False))
    if counts["done"] >= sweep.target or counts["done"] + counts["RUNNING"] >= sweep.target:
        return None, counts
    if sweep.grid_size and counts["WAITING"] == 0:
        return None, counts  # every grid point is taken
    with sweep_storage._quiet():  # "heartbeat is meant for optimize()": we beat ourselves
        trial = sweep.study.ask()
    me = sweep_storage.identity()
    for key, value in {**me, "mlflow_run_id": ""}.items():
        trial.set_user_attr(key, value)
    sweep.storage.record_heartbeat(trial._trial_id)  # a lost worker is visible from the start
    return trial, counts


@dataclass
class WorkerReport:
    trained: int = 0
    states: dict[str, int] = field(default_factory=dict)
    failed_in_a_row: int = 0
    stopped: str = ""  # why this worker gave up before the sweep's end (empty when it did not)


def work(sweep: Sweep) -> WorkerReport:
    """Train trials until the study holds `sweep.target` finished ones."""
    report = WorkerReport()
    data_cache: dict[tuple, Any] = {}
    while True:
        with sweep.lock():
            trial, counts = _next_trial(sweep)
        if trial is None:
            if _finished(sweep, counts):
                return report
            time.sleep(POLL_S)  # the rest runs elsewhere: wait, in case a worker is lost
            continue
        state = _train(sweep, trial, data_cache)
        report.trained += 1
        report.states[state] = report.states.get(state, 0) + 1
        report.failed_in_a_row = report.failed_in_a_row + 1 if state == "FAIL" else 0
        if report.failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
            report.stopped = f"{report.failed_in_a_row} trials failed in a row"
            return report


def _data(sweep: Sweep, config: TrialConfig, cache: dict[tuple, Any]) -> Any:
    from cnnbench.train import load_data, resolve_device

    c = config
    key = (c.dataset, c.normalize, c.train_subset, c.test_subset, c.val_size, c.channels_last, c.device)
    if key not in cache:
        cache.clear()  # one data set on the device at a time
        cache[key] = load_data(c, sweep.data_root, resolve_device(c.device))
    return cache[key]


def _train(sweep: Sweep, trial: Any, data_cache: dict[tuple, Any]) -> str:
    """Train one trial, tell Optuna its outcome, tag its MLflow run. Returns the state."""
    from optuna.trial import TrialState

    from cnnbench.tracking import run_name
    from cnnbench.train import run_trial

    spec = sweep.spec
    s = spec.sweep
    assert s is not None
    names = [d.name for d in spec.search]
    params = suggest(trial, spec)
    try:
        config = trial_config(spec, params)
    except ConfigError as err:  # a combination of values that no trial can take
        trial.set_user_attr("reason", str(err)[:500])
        sweep.study.tell(trial, state=TrialState.FAIL)
        print(f"[{sweep.worker}] trial {trial.number} failed: {err}", flush=True)
        return "FAIL"
    # a retried trial resumes from the checkpoints of the trial it repeats
    origin = sweep.storage.get_trial(trial._trial_id).system_attrs.get("failed_trial", trial.number)
    ckpt = sweep.ckpt_root / f"trial-{origin:05d}"
    inner = sweep.tracker.recorder(config, parent=sweep.parent, name=f"trial {trial.number}: {run_name(config, names)}",
                                   tags={TAG_PHASE: "search", TAG_TRIAL: str(trial.number), TAG_STATE: "RUNNING",
                                         TAG_OPTUNA_STUDY: spec.name, "cnnbench.searched": ",".join(names),
                                         **({"optuna.retry_of": str(origin)} if origin != trial.number else {})})
    recorder = PruningRecorder(inner, trial, sweep.metric)
    t0 = time.perf_counter()
    try:
        with sweep_storage.Heartbeat(sweep.storage, trial._trial_id):
            result = run_trial(config, recorder=recorder, checkpoint_dir=ckpt, evaluate_test=False,
                               data=_data(sweep, config, data_cache))
    except KeyboardInterrupt:  # Ctrl-C: fail it, queue it again, resume it next time
        _tell(sweep, trial, inner, TrialState.FAIL, None, "interrupted (Ctrl-C)")
        with sweep_storage._quiet():
            import optuna

            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
                sweep.study, sweep.storage.get_trial(trial._trial_id))
        raise
    except BaseException as err:
        _tell(sweep, trial, inner, TrialState.FAIL, None, f"{type(err).__name__}: {err}")
        raise

    value = objective_value(result, s.objective)
    if result.status == PRUNED:
        state, shown = TrialState.PRUNED, value
    elif result.status in (FINISHED, DIVERGED) and math.isfinite(value):
        # a diverged trial counts with its best epoch before diverging (the tuning
        # playbook's retrospective choice): the sampler learns that region is bad
        state, shown = TrialState.COMPLETE, value
    else:
        state, shown = TrialState.FAIL, math.nan
    for key, v in {"status": result.status, "best_epoch": result.best(sweep.metric)[1] or 0,
                   "train_seconds": round(result.train_seconds, 3), "reason": result.reason[:500]}.items():
        trial.set_user_attr(key, v)
    _tell(sweep, trial, inner, state, value if state == TrialState.COMPLETE else None, result.reason)
    shutil.rmtree(ckpt, ignore_errors=True)  # MLflow holds the checkpoints; .cnnbench is for resuming
    label = "val acc" if s.objective == "val_acc" else "val loss"
    value_text = f"{label} {shown:.4g}" if math.isfinite(shown) else result.status
    print(f"[{sweep.worker}] trial {trial.number} {state.name.lower()}: {value_text} after "
          f"{len(result.history)} epoch(s), {time.perf_counter() - t0:.1f} s; {run_name(config, names)}", flush=True)
    return state.name


def _tell(sweep: Sweep, trial: Any, recorder: Any, state: Any, value: float | None, reason: str) -> None:
    from optuna.trial import TrialState

    if state == TrialState.FAIL and reason:
        trial.set_user_attr("reason", reason[:500])
    sweep.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    if recorder.run_id:
        with contextlib.suppress(Exception):  # the run's own record is complete without these tags
            sweep.tracker.client.set_tag(recorder.run_id, TAG_STATE, state.name)
            if value is not None:
                sweep.tracker.client.log_metric(recorder.run_id, "optuna/value", float(value))


# ----------------------------------------------------------------------------------------
# the end: the best trial over seeds, tested once, and the results


@dataclass
class FinalRun:
    seed: int
    run_id: str
    status: str
    best_val: float  # the objective's metric at the best-validation epoch
    best_epoch: int
    test_acc: float  # of the best-validation checkpoint, measured once
    test_loss: float


@dataclass
class Outcome:
    sweep: Sweep
    best: Any  # optuna FrozenTrial
    finals: list[FinalRun]
    files: list[Path]


def _fingerprint(sweep: Sweep) -> str:
    """What the results depend on: the trials, the final seeds."""
    assert sweep.spec.sweep is not None
    return f"{len(sweep.study.get_trials(deepcopy=False))} trials, seeds {list(sweep.spec.sweep.final_seeds)}"


def _claim_final(sweep: Sweep) -> str | None:
    """Under the claim lock: become the one worker that finishes the sweep. Returns why
    not when another (live) worker does, or did for these very trials."""
    claim = sweep.study.user_attrs.get(ATTR + "final_claim")
    me = sweep_storage.identity()
    if claim and claim.get("done") and claim.get("fingerprint") == _fingerprint(sweep):
        return (f"the results are up to date (written by {sweep_storage.describe(claim)}; also in MLflow run "
                f"{sweep.parent})")
    if claim and not claim.get("done"):
        mine = {k: claim.get(k) for k in me} == me
        if not mine and not sweep_storage.dead_here(claim):
            return f"worker {sweep_storage.describe(claim)} is writing the results"
    sweep.study.set_user_attr(ATTR + "final_claim", {**me, "done": False, "since": time.time()})
    return None


def finalize(sweep: Sweep) -> Outcome | None:
    """When every trial is done: re-run the best over the final seeds and write results.
    Exactly one worker does it; the others return None."""
    from optuna.trial import TrialState

    with sweep.lock():
        counts = _counts(sweep.study.get_trials(deepcopy=False))
        if not _finished(sweep, counts) or counts["RUNNING"]:
            print(f"sweep {sweep.spec.name}: {counts['done']}/{sweep.target} trials done, {counts['RUNNING']} running "
                  "elsewhere; the worker that ends the sweep writes the results", flush=True)
            return None
        why = _claim_final(sweep)
    if why:
        print(f"sweep {sweep.spec.name}: all trials done; {why}", flush=True)
        return None
    complete = sweep.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = sweep.study.best_trial if complete else None
    finals = _final_runs(sweep, best) if best is not None else []
    from cnnbench import sweep_report

    files = sweep_report.write(sweep, best, finals)
    sweep.tracker.log_artifacts(sweep.parent, files, "results")
    _close_parent(sweep, best, finals, counts)
    sweep.study.set_user_attr(ATTR + "final_claim", {**sweep_storage.identity(), "done": True, "since": time.time(),
                                                     "fingerprint": _fingerprint(sweep)})
    return Outcome(sweep, best, finals, files)


def _close_parent(sweep: Sweep, best: Any, finals: list[FinalRun], counts: dict[str, int]) -> None:
    import statistics

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = {"trials/complete": counts["COMPLETE"], "trials/pruned": counts["PRUNED"], "trials/failed": counts["FAIL"]}
    if best is not None:
        metrics["best/value"] = best.value
        metrics["best/trial_number"] = best.number
    accs = [f.test_acc for f in finals if math.isfinite(f.test_acc)]
    if accs:
        metrics["final/test_acc_mean"] = statistics.fmean(accs)
        metrics["final/n"] = len(accs)
        if len(accs) > 1:
            metrics["final/test_acc_std"] = statistics.stdev(accs)
    sweep.tracker.client.log_batch(sweep.parent, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()],
                                   synchronous=True)
    ok = best is not None and all(f.status == FINISHED for f in finals)
    sweep.tracker.end(sweep.parent, "FINISHED" if ok else "FAILED")


def _final_runs(sweep: Sweep, best: Any) -> list[FinalRun]:
    """The best trial's config over the final seeds, trained with the same validation
    split and tested once, with the best-validation checkpoint. Runs already finished
    (an earlier, interrupted finalisation) are read back from MLflow."""
    from cnnbench.fused import fuse_groups
    from cnnbench.tracking import run_name
    from cnnbench.train import train_group

    spec, s = sweep.spec, sweep.spec.sweep
    assert s is not None
    names = [d.name for d in spec.search]
    configs = [trial_config(spec, best.params, seed) for seed in s.final_seeds]
    sweep.tracker.close_orphans("the process running it died", extra=f"tags.`mlflow.parentRunId` = '{sweep.parent}'")
    done: dict[str, FinalRun] = {}
    for run in sweep.tracker.trial_runs(parent=sweep.parent, extra=f"tags.`{TAG_PHASE}` = 'final'"):
        m, key = run.data.metrics, run.data.tags.get("cnnbench.trial_key")
        if run.info.status in ("FINISHED", "FAILED") and "test/acc" in m and key and key not in done:
            done[key] = FinalRun(int(run.data.tags.get("seed", -1)), run.info.run_id, run.data.tags.get("cnnbench.status", ""),
                                 m.get("best/acc", math.nan), int(m.get("best/epoch", 0)), m["test/acc"],
                                 m.get("test/loss", math.nan))
    pending = [c for c in configs if c.key() not in done]
    ckpt_root = sweep.ckpt_root / "final"
    data_cache: dict[tuple, Any] = {}
    for idx in fuse_groups(pending):
        group = [pending[i] for i in idx]
        recorders = [sweep.tracker.recorder(c, parent=sweep.parent, name=f"final: {run_name(c, names)}",
                                            tags={TAG_PHASE: "final", TAG_TRIAL: str(best.number),
                                                  TAG_OPTUNA_STUDY: spec.name, "cnnbench.searched": ",".join(names)})
                     for c in group]
        data = _data(sweep, group[0], data_cache)
        results = train_group(group, recorders=recorders, data=data, evaluate_test=False,
                              checkpoint_dirs=[ckpt_root / c.key() for c in group],
                              progress=f"final: best trial {best.number}, seeds {','.join(str(c.seed) for c in group)}")
        for c, r, rec in zip(group, results, recorders):
            done[c.key()] = _test_once(sweep, c, r, rec.run_id or "", data)
            shutil.rmtree(ckpt_root / c.key(), ignore_errors=True)
    return [done[c.key()] for c in configs]


def _test_once(sweep: Sweep, config: TrialConfig, result: TrialResult, run_id: str, data: Any) -> FinalRun:
    """The test set, read once: the best-validation checkpoint's loss and accuracy."""
    import torch

    from cnnbench.train import SingleEngine, evaluate, load_checkpoint

    assert sweep.spec.sweep is not None
    best_val, best_epoch = objective_value(result, sweep.spec.sweep.objective), result.best_epoch
    path = result.best_checkpoint or result.final_checkpoint
    test_loss = test_acc = math.nan
    if path is not None and Path(path).exists():
        payload = load_checkpoint(path, map_location=data.device)
        engine = SingleEngine([config], data.device, data.info)
        engine.load_trial_state(0, payload)
        engine.train(False)
        with torch.no_grad():
            (test_loss,), (test_acc,) = evaluate(engine, data, data.test, config.test_batch_size)
        best_epoch = int(payload["epoch"])
        if run_id:
            client = sweep.tracker.client
            client.log_metric(run_id, "test/acc", test_acc, step=best_epoch)
            client.log_metric(run_id, "test/loss", test_loss, step=best_epoch)
            client.set_tag(run_id, "cnnbench.tested", f"once, with the best-validation checkpoint (epoch {best_epoch})")
    return FinalRun(config.seed, run_id, result.status, best_val, int(best_epoch or 0), test_acc, test_loss)


# ----------------------------------------------------------------------------------------
# entry points


def run_sweep(spec: StudySpec, *, workers: int = 1, final: bool = True, worker_argv: list[str] | None = None,
              **kwargs: Any) -> tuple[Sweep, WorkerReport, Outcome | None]:
    """Open (or join) the sweep, train trials here (or in `workers` processes), and
    finish it when this is the worker that ends it."""
    sweep = open_sweep(spec, **kwargs)
    if workers > 1:
        report = launch_workers(sweep, workers, worker_argv or [])
    else:
        try:
            report = work(sweep)
        except KeyboardInterrupt:
            _pause_parent(sweep)
            raise
    if report.stopped:
        return sweep, report, None
    return sweep, report, finalize(sweep) if final else None


def _pause_parent(sweep: Sweep) -> None:
    """Ctrl-C: the parent run shows KILLED unless other workers go on with the sweep."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        if not sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            sweep.tracker.end(sweep.parent, "KILLED")


def launch_workers(sweep: Sweep, n: int, argv: list[str]) -> WorkerReport:
    """`n` worker processes on this machine, one per GPU where there are GPUs; they share
    the storage and the parent run that this process opened. Returns when all end."""
    import torch

    gpus = torch.cuda.device_count()
    # on the CPU the workers share the cores: N workers with every core each spend their
    # time waiting for each other's threads (measured: 6x slower for LeNet with 2 on 2)
    threads = str(max(1, (os.cpu_count() or 1) // n))
    procs = []
    for i in range(n):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        else:
            env.setdefault("OMP_NUM_THREADS", threads)
        cmd = [sys.executable, "-m", "cnnbench", "sweep", *argv, "--storage", sweep.url, "--worker-label", f"w{i}",
               "--no-final", "--set", "progress=false"]
        procs.append(subprocess.Popen(cmd, env=env))
    print(f"sweep {sweep.spec.name}: {n} workers started (pids {', '.join(str(p.pid) for p in procs)})"
          + (f" on {gpus} GPU(s)" if gpus else ""), flush=True)
    report = WorkerReport()
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the terminal sent SIGINT to the workers too; let them fail cleanly
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=60)
        _pause_parent(sweep)
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        report.stopped = f"{len(bad)} worker(s) ended with status {', '.join(map(str, bad))}"
    return report

