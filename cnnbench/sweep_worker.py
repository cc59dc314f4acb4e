"""A sweep's workers: open or join the sweep, then train its trials, one or K at a time.

The first worker creates the Optuna study, queues a grid's points and creates the MLflow
parent run; later ones, here or on other machines, join them (the study's user
attributes hold the parent run's id and a hash of the spec). Each worker loops: under
the claim lock, recover the trials of lost workers, count, and take the next trial (a
queued one first: retries and grid points); then train it outside the lock while its
heartbeat beats, tell Optuna the outcome and tag the MLflow run with it.

With `fuse_k` K > 1 (the default on CUDA and MPS) a worker claims up to K trials at once
(batched ask-and-tell: each is suggested before the next is asked, so that TPE's constant
liar sees it), splits them into groups that can train fused (fused.group_key: the same
architecture, batch size, epochs and data; lr, momentum, weight decay may differ) and
trains each group as one FusedEngine. Every member stays its own trial: its own reports,
pruning (only it stops), outcome, MLflow child run and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnbench import interrupt, sweep_storage
from cnnbench.config import ConfigError, StudySpec, TrialConfig
from cnnbench.sweep import (ATTR, OBJECTIVES, TAG_OPTUNA_STUDY, TAG_PHASE, TAG_STATE, TAG_TRIAL, PruningRecorder,
                            _describe, check_spec, grid_points, make_pruner, make_sampler, objective_value,
                            spec_hash, suggest, trial_config)
from cnnbench.train import DIVERGED, FINISHED, INTERRUPTED, PRUNED

FUSE_K = 16  # trials a worker trains fused on CUDA and MPS by default (a study's --max-fuse default too)
MAX_RETRY = 3  # a trial whose worker is lost this many times is given up
MAX_FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing (a broken device, say) stops
POLL_S = 5.0  # an idle worker looks for work (or lost trials) this often


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
    fuse_k: int = 1  # trials claimed and trained fused at once (1: one at a time)

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
    check_reachable(uri)  # workers started together on a fresh store: see stores.py


def open_sweep(spec: StudySpec, *, storage: str | None = None, tracking: str | None = None,
               state: Any = None, results_root: Any = "results", n_trials: int | None = None,
               sampler_seed: int | None = None, data_root: Any = None, command: str = "",
               worker: str = "", fuse_k: int | None = None) -> Sweep:
    """Check everything, then create or join the sweep's study and MLflow parent run.
    `fuse_k` None: `default_fuse_k` of the spec's device."""
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

    tracker = Tracker(spec.name, uri)
    holder: dict[str, Sweep] = {}
    store = sweep_storage.open_storage(url, lambda study, trial: _lost(holder["sweep"], trial))
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
                  worker=worker or sweep_storage.describe(sweep_storage.identity()), grid_size=grid,
                  fuse_k=fuse_k or default_fuse_k(spec.base_config().device))
    holder["sweep"] = sweep
    try:
        with interrupt.shielded():  # the parent run is created and recorded, or not created
            with sweep.lock():
                sweep.parent = _initialise(sweep)
        # runs of this sweep whose process died here before Optuna knew their run id
        tracker.close_orphans("the process running it died", extra=f"tags.`mlflow.parentRunId` = '{sweep.parent}'")
        # parent runs of a start that died before the study recorded them (the sweep's own
        # parent stays RUNNING while the sweep goes on, whoever created it)
        tracker.close_orphans("a start of the sweep that died before it was recorded",
                              extra="tags.`cnnbench.kind` = 'sweep'", keep=(sweep.parent,))
    except KeyboardInterrupt:
        if sweep.parent:
            with interrupt.shielded():
                pause_parent(sweep)
        raise
    return sweep


def pause_parent(sweep: Sweep) -> None:
    """Ctrl-C: the parent run shows KILLED unless other workers go on with the sweep."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        if not sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if sweep.tracker.client.get_run(sweep.parent).info.status == "RUNNING":
                sweep.tracker.end(sweep.parent, "KILLED")


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
    _kill_run(sweep, trial.user_attrs.get("mlflow_run_id"), why)
    with sweep_storage._quiet():
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(sweep.study, trial)
    print(f"[{sweep.worker}] trial {trial.number} lost ({why}); queued again", flush=True)


def _kill_run(sweep: Sweep, run_id: str | None, why: str | None = None) -> None:
    """A failed trial's MLflow run: KILLED if it was still RUNNING (with `why`), and
    tagged FAIL. Best effort: the Optuna record is what counts."""
    if not run_id:
        return
    client = sweep.tracker.client
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "cnnbench.status", INTERRUPTED)
            if why:
                client.set_tag(run_id, "cnnbench.reason", why)
            client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, TAG_STATE, "FAIL")


def recover(sweep: Sweep) -> None:
    """Under the claim lock: fail and requeue the running trials of lost workers."""
    import optuna
    from optuna.trial import TrialState

    with sweep_storage._quiet():
        optuna.storages.fail_stale_trials(sweep.study)  # other machines: by heartbeat
    for t in sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # a trial is taken under this lock with its worker's identity: one without it was
        # taken by a worker that died before it could say who it was
        taken = "worker_pid" in t.user_attrs
        if taken and not sweep_storage.dead_here(t.user_attrs):  # this machine: the process is gone
            continue
        try:
            changed = sweep.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if changed:
            _lost(sweep, sweep.storage.get_trial(t._trial_id),
                  f"its process {sweep_storage.describe(t.user_attrs)} is gone" if taken
                  else "its worker died while taking it")


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
        batch: list[Any] = []
        try:
            with interrupt.shielded():  # trials are taken whole (identity, heartbeat) or not at all
                with sweep.lock():
                    if sweep.fuse_k > 1:
                        batch, counts = next_batch(sweep, sweep.fuse_k)
                    else:
                        trial, counts = _next_trial(sweep)
                        batch = [trial] if trial is not None else []
            if not batch:
                if _finished(sweep, counts):
                    return report
                time.sleep(POLL_S)  # the rest runs elsewhere: wait, in case a worker is lost
                continue
            if sweep.fuse_k > 1:  # train_batch fails and re-queues its own members on Ctrl-C
                states = train_batch(sweep, batch, data_cache)
            else:
                states = [_train(sweep, batch[0], data_cache)]
        except KeyboardInterrupt:  # Ctrl-C: fail the trial, queue it again, resume it next time
            if len(batch) == 1 and sweep.fuse_k <= 1:
                with interrupt.shielded():
                    _interrupted(sweep, batch[0])
            raise
        for state in states:
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
    ckpt, inner = _checkpoints_and_run(sweep, trial, config)
    recorder = PruningRecorder(inner, trial, sweep.metric)
    t0 = time.perf_counter()
    try:
        with sweep_storage.Heartbeat(sweep.storage, trial._trial_id):
            result = run_trial(config, recorder=recorder, checkpoint_dir=ckpt, evaluate_test=False,
                               data=_data(sweep, config, data_cache))
    except KeyboardInterrupt:  # see work
        raise
    except BaseException as err:
        _tell(sweep, trial, inner, TrialState.FAIL, None, f"{type(err).__name__}: {err}")
        raise

    return _conclude(sweep, trial, inner, result, ckpt, run_name(config, names), t0)


def _checkpoints_and_run(sweep: Sweep, trial: Any, config: TrialConfig) -> tuple[Path, Any]:
    """A trial's checkpoint folder (a retried trial resumes from the checkpoints of the
    trial it repeats) and its MLflow recorder (the child run is created when it starts)."""
    from cnnbench.tracking import run_name

    names = [d.name for d in sweep.spec.search]
    origin = sweep.storage.get_trial(trial._trial_id).system_attrs.get("failed_trial", trial.number)
    inner = sweep.tracker.recorder(config, parent=sweep.parent, name=f"trial {trial.number}: {run_name(config, names)}",
                                   tags={TAG_PHASE: "search", TAG_TRIAL: str(trial.number), TAG_STATE: "RUNNING",
                                         TAG_OPTUNA_STUDY: sweep.spec.name, "cnnbench.searched": ",".join(names),
                                         **({"optuna.retry_of": str(origin)} if origin != trial.number else {})})
    return sweep.ckpt_root / f"trial-{origin:05d}", inner


def _conclude(sweep: Sweep, trial: Any, inner: Any, result: Any, ckpt: Path, label: str, t0: float) -> str:
    """A trained trial's outcome to Optuna and MLflow; its resume checkpoints removed.
    Returns the state."""
    with interrupt.shielded():  # the outcome is recorded whole (a Ctrl-C is raised after)
        state, value, shown = _record(sweep, trial, inner, result)
    s = sweep.spec.sweep
    assert s is not None
    shutil.rmtree(ckpt, ignore_errors=True)  # MLflow holds the checkpoints; .cnnbench is for resuming
    name = "val acc" if s.objective == "val_acc" else "val loss"
    value_text = f"{name} {shown:.4g}" if math.isfinite(shown) else result.status
    fused = f" (fused with {result.fused_with - 1} other(s))" if result.fused_with > 1 else ""
    print(f"[{sweep.worker}] trial {trial.number} {state.name.lower()}: {value_text} after "
          f"{len(result.history)} epoch(s), {time.perf_counter() - t0:.1f} s{fused}; {label}", flush=True)
    return state.name


def _record(sweep: Sweep, trial: Any, inner: Any, result: Any) -> tuple[Any, float, float]:
    """Tell Optuna a trained trial's outcome and tag its MLflow run: (state, value, shown)."""
    from optuna.trial import TrialState

    s = sweep.spec.sweep
    assert s is not None
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
                   "train_seconds": round(result.train_seconds, 3), "reason": result.reason[:500],
                   "fused_with": result.fused_with}.items():
        trial.set_user_attr(key, v)
    _tell(sweep, trial, inner, state, value if state == TrialState.COMPLETE else None, result.reason)
    return state, value, shown


def _interrupted(sweep: Sweep, trial: Any) -> None:
    """Ctrl-C: a trial still running is failed and queued again (its checkpoints resume it);
    its MLflow run, if it has one, is KILLED."""
    import optuna
    from optuna.trial import TrialState

    frozen = sweep.storage.get_trial(trial._trial_id)
    if frozen.state != TrialState.RUNNING:
        return
    trial.set_user_attr("reason", "interrupted (Ctrl-C)")
    sweep.study.tell(trial, state=TrialState.FAIL)
    _kill_run(sweep, frozen.user_attrs.get("mlflow_run_id"))
    with sweep_storage._quiet():
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
            sweep.study, sweep.storage.get_trial(trial._trial_id))


def _tell(sweep: Sweep, trial: Any, recorder: Any, state: Any, value: float | None, reason: str) -> None:
    from optuna.trial import TrialState

    if state == TrialState.FAIL and reason:
        trial.set_user_attr("reason", reason[:500])
    sweep.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    if getattr(recorder, "run_id", None):  # None: a member of a batch that never started
        with contextlib.suppress(Exception):  # the run's own record is complete without these tags
            sweep.tracker.client.set_tag(recorder.run_id, TAG_STATE, state.name)
            if value is not None:
                sweep.tracker.client.log_metric(recorder.run_id, "optuna/value", float(value))



# ----------------------------------------------------------------------------------------
# fused sweeps: up to K trials claimed at once, trained as fused groups, each its own trial


def default_fuse_k(device: str) -> int:
    """Trials a worker trains at once by default: FUSE_K on CUDA and MPS, where K fused
    LeNets take little longer per step than one; 1 on the CPU, where they take about K
    times as long and one trial at a time is as fast (see study.execution)."""
    from cnnbench.train import resolve_device

    return 1 if resolve_device(device).type == "cpu" else FUSE_K


def next_batch(sweep: Sweep, k: int) -> tuple[list[Any], dict[str, int]]:
    """Under the claim lock: up to `k` trials to train (a group is claimed as a unit),
    none when the target is reached or the remaining trials run elsewhere.

    Batched ask-and-tell: each trial is suggested before the next is asked, so that TPE's
    constant liar sees the running ones and K asks are K different points; queued trials
    (retries, grid points) come first, in order, and a QMC sweep takes K consecutive points.
    Every trial carries this worker's identity and a heartbeat from the start, so that a
    worker killed mid-group leaves all K to be recovered."""
    import warnings

    recover(sweep)
    counts = _counts(sweep.study.get_trials(deepcopy=False))
    room = sweep.target - counts["done"] - counts["RUNNING"]  # never more than --n-trials
    if sweep.grid_size:
        room = min(room, counts["WAITING"])  # every grid point is taken once
    me = {**sweep_storage.identity(), "mlflow_run_id": ""}
    batch = []
    for _ in range(max(0, min(k, room))):
        with warnings.catch_warnings():  # "heartbeat is meant for optimize()": we beat ourselves
            warnings.simplefilter("ignore")
            trial = sweep.study.ask()
        for key, value in me.items():
            trial.set_user_attr(key, value)
        sweep.storage.record_heartbeat(trial._trial_id)
        suggest(trial, sweep.spec)  # now, before the next ask
        batch.append(trial)
    return batch, counts


@dataclass
class Member:
    """One trial of a claimed batch."""
    trial: Any
    config: TrialConfig
    ckpt: Path
    inner: Any  # its MLflow recorder
    told: bool = False


def fused_groups(members: list[Member], max_k: int) -> list[list[Member]]:
    """Members that can train as one FusedEngine together (fused.group_key), split by
    what breaks fusing (batch size, model, activation, epochs...) and by the epoch their
    checkpoints resume from (a group starts at one epoch); order kept, nothing dropped."""
    from cnnbench.fused import fuse_groups
    from cnnbench.train import resume_epoch

    out = []
    for idx in fuse_groups([m.config for m in members], max_k=max_k):
        by_epoch: dict[int, list[Member]] = {}
        for i in idx:
            by_epoch.setdefault(resume_epoch(members[i].ckpt, members[i].config), []).append(members[i])
        out.extend(by_epoch.values())
    return out


def train_batch(sweep: Sweep, batch: list[Any], data_cache: dict[tuple, Any]) -> list[str]:
    """Train a claimed batch group by group; tell Optuna each member's outcome. Returns
    the states. Every member's heartbeat beats until the whole batch is done."""
    import optuna
    from optuna.trial import TrialState

    members: list[Member] = []
    states: list[str] = []
    for trial in batch:
        try:
            config = trial_config(sweep.spec, trial.params)
        except ConfigError as err:  # a combination of values that no trial can take
            trial.set_user_attr("reason", str(err)[:500])
            sweep.study.tell(trial, state=TrialState.FAIL)
            print(f"[{sweep.worker}] trial {trial.number} failed: {err}", flush=True)
            states.append("FAIL")
            continue
        ckpt, inner = _checkpoints_and_run(sweep, trial, config)
        members.append(Member(trial, config, ckpt, inner))
    try:
        with contextlib.ExitStack() as beats:
            for m in members:
                beats.enter_context(sweep_storage.Heartbeat(sweep.storage, m.trial._trial_id))
            for group in fused_groups(members, sweep.fuse_k):
                states += train_fused(sweep, group, data_cache)
    except KeyboardInterrupt:  # Ctrl-C: fail every member not told yet, queue it again
        import warnings

        for m in members:
            if not m.told:
                _tell(sweep, m.trial, m.inner, TrialState.FAIL, None, "interrupted (Ctrl-C)")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
                        sweep.study, sweep.storage.get_trial(m.trial._trial_id))
        raise
    except BaseException as err:
        for m in members:
            if not m.told:
                _tell(sweep, m.trial, m.inner, TrialState.FAIL, None, f"{type(err).__name__}: {err}")
        raise
    return states


def train_fused(sweep: Sweep, group: list[Member], data_cache: dict[tuple, Any]) -> list[str]:
    """One group through train_group: one FusedEngine (a lone member: the SingleEngine),
    one PruningRecorder per member reporting to its own trial and MLflow run. A pruned or
    diverging member stops alone (FusedEngine.deactivate); the group ends when none is left."""
    from cnnbench.tracking import run_name
    from cnnbench.train import train_group

    names = [d.name for d in sweep.spec.search]
    configs = [m.config for m in group]
    t0 = time.perf_counter()
    results = train_group(configs, recorders=[PruningRecorder(m.inner, m.trial, sweep.metric) for m in group],
                          checkpoint_dirs=[m.ckpt for m in group], evaluate_test=False,
                          data=_data(sweep, configs[0], data_cache))
    states = []
    for m, result in zip(group, results):
        states.append(_conclude(sweep, m.trial, m.inner, result, m.ckpt, run_name(m.config, names), t0))
        m.told = True
    return states
