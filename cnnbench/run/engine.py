"""One engine for grid studies and sweeps: an Optuna study shared through its storage.

A grid study and a sweep differ only in how trials are chosen. A sweep's trials come
from a sampler over the spec's `search:` block (or a grid of it, queued); a grid study's
trials are its plan's runs (values x seeds, `config.space.plan`), each queued once with
its key. Everything else is this module's, for both:

- `open_session`: check everything, then create or join the Optuna study and the MLflow
  parent run (the first process creates them; later ones, here or on other machines,
  join: the study's user attributes hold the parent run's id);
- `work`: a worker's loop. Under the claim lock: recover the trials of lost workers,
  count, take the next trial, or a group of up to K that train fused (claimed as one
  unit). Outside the lock: train it while its heartbeat beats, tell Optuna the outcome,
  tag its MLflow run. A killed worker's trials are failed and queued again (by heartbeat
  on other machines, by a dead pid here) and resume from their checkpoints;
- `launch_workers`: N worker processes on this machine (multiprocessing, one per GPU
  where there are GPUs), their progress shown one line per running trial;
- `claim_results`: exactly one process writes the results, the one that ends it.

With `fuse_k` K > 1 (the default on CUDA and MPS; on the CPU, a study's wide groups) a
worker claims up to K trials at once (batched ask-and-tell: each is suggested before the
next is asked, so that TPE's constant liar sees it), splits them into groups that can
train fused (fused.group_key) and trains each group as one engine. Every member stays
its own trial: its own reports, pruning (only it stops), outcome, MLflow child run and
checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState, create_trial

from cnnbench.config.space import OBJECTIVES, Plan, check_spec, describe, grid_points, spec_hash, suggest, trial_config
from cnnbench.config.spec import StudySpec
from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir, load_arrays
from cnnbench.errors import ConfigError, DataError, DeviceError, TrackingError
from cnnbench.run import storage as sweep_storage
from cnnbench.run.cores import CoreShare
from cnnbench.run.progress import Board
from cnnbench.run.search import PruningRecorder, make_pruner, make_sampler, objective_value
from cnnbench.track import stores
from cnnbench.track.schema import (
    ATTR_BEST_EPOCH,
    ATTR_FUSED_WITH,
    ATTR_KEY,
    ATTR_MLFLOW_RUN_ID,
    ATTR_REASON,
    ATTR_REUSED,
    ATTR_SEED,
    ATTR_STATUS,
    ATTR_TRAIN_SECONDS,
    ATTR_WORKER_BOOT,
    ATTR_WORKER_HOST,
    ATTR_WORKER_PID,
    CLAIM_DONE,
    CLAIM_FINGERPRINT,
    CLAIM_SINCE,
    EPOCH,
    METRIC_OPTUNA_VALUE,
    MLFLOW_PARENT_RUN_ID,
    OPTUNA_FAILED_TRIAL,
    OPTUNA_FIXED_PARAMS,
    PARAM_N_TRIALS,
    PARAM_RUNS,
    PARAM_SEED,
    PARAM_SEEDS,
    PARAM_TRIALS,
    PREFIX_FIXED,
    PREFIX_NUISANCE,
    PREFIX_SCIENTIFIC,
    PREFIX_SEARCH,
    PREFIX_SWEEP,
    STUDY_EXPERIMENT,
    STUDY_FINAL_CLAIM,
    STUDY_KIND,
    STUDY_PARENT_RUN_ID,
    STUDY_READY,
    STUDY_SAMPLER,
    STUDY_SPEC,
    STUDY_SPEC_HASH,
    STUDY_TRACKING_URI,
    TAG_COMMAND,
    TAG_FUSE,
    TAG_FUSE_K,
    TAG_KIND,
    TAG_NUISANCE,
    TAG_OPTUNA_STORAGE,
    TAG_OPTUNA_STUDY,
    TAG_PHASE,
    TAG_REASON,
    TAG_RETRY_OF,
    TAG_SCIENTIFIC,
    TAG_SEARCHED,
    TAG_SPEC,
    TAG_STATE,
    TAG_STATUS,
    TAG_TRIAL,
    TAG_TRIAL_THREADS,
    TEST_ACC,
    worker_name,
)
from cnnbench.track.writer import Tracker, check_reachable, quiet_mlflow, run_name, tracking_uri
from cnnbench.train.checkpoint import resume_epoch
from cnnbench.train.device import resolve_device
from cnnbench.train.fused import fusable, fuse_groups, group_key
from cnnbench.train.loop import load_data, run_trial, train_group
from cnnbench.train.result import DIVERGED, FINISHED, INTERRUPTED, PRUNED
from cnnbench.util import fileio, interrupt
from cnnbench.util.paths import state_dir
from cnnbench.util.text import fmt, masked


def trial_id(trial: Any) -> int:
    """The storage's id of an Optuna trial (live or frozen). Optuna has no public accessor
    for it: its storage API takes this id, and the trial keeps it as `_trial_id`. This is the
    one place in cnnbench that reads it (tests/test_layers.py allows exactly this use)."""
    return trial._trial_id


FUSE_K = 16  # trials a worker trains fused on CUDA and MPS by default (a study's --max-fuse default too)
MAX_RETRY = 3  # a trial whose worker is lost this many times is given up
MAX_FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing (a broken device, say) stops
POLL_S = 5.0  # an idle worker looks for work (or lost trials) this often


# ----------------------------------------------------------------------------------------
# opening a study or sweep: storage, Optuna study, MLflow parent run


@dataclass
class Session:
    """This process's handle on a shared study or sweep."""
    spec: StudySpec
    kind: str  # "study" (a grid of planned runs) or "sweep" (a sampler over search:)
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
    wide_only: bool = False  # fuse only models that widen (the CPU default)
    configs: dict[str, TrialConfig] = field(default_factory=dict)  # a study's runs by key, in queue order
    plan: Plan | None = None
    skipped: int = 0  # a study's runs already finished when this process opened it
    threads: int | None = None  # CPU threads per trial, where the runner chose them
    events: Any = None  # a queue that the parent's progress board reads (worker processes)
    cores: CoreShare | None = None  # worker processes: the machine's workers training (cores.py)
    open_args: dict[str, Any] = field(default_factory=dict)  # how a worker process joins

    @property
    def metric(self) -> str | None:
        """The per-epoch metric reported to Optuna (a sweep's objective); none for a study."""
        return OBJECTIVES[self.spec.sweep.objective] if self.kind == "sweep" and self.spec.sweep else None

    @property
    def names(self) -> list[str]:
        """The hyperparameters in a run's name."""
        return list(self.spec.varied) if self.kind == "study" else [d.name for d in self.spec.search]

    def config_of(self, trial: Any) -> TrialConfig:
        """A claimed trial's settings: a study's planned run, or the sweep's suggestion."""
        if self.kind == "study":
            return self.configs[trial.user_attrs[ATTR_KEY]]
        return trial_config(self.spec, trial.params)

    def say(self, line: str, *, ended: str | None = None) -> None:
        """A line for the person watching: through the progress board when there is one
        (`ended`: the label of the trial whose end it tells)."""
        if self.events is not None:
            self.events.put(("line", self.worker, line, ended))
        else:
            print(line, flush=True)



def preflight(spec: StudySpec, configs: list[TrialConfig], *, url: str, uri: str, data_root: Any,
              out_dir: Path) -> None:
    """Everything that can be checked before anything is created: storage, device, data,
    results folder, tracking store. Bad input fails here and writes nothing."""

    sweep_storage.check(url)
    for device in sorted({c.device for c in configs}):
        resolve_device(device)
    for dataset in sorted({c.dataset for c in configs}):
        load_arrays(dataset, data_dir(data_root))
    fileio.check_writable(out_dir)
    check_reachable(uri)  # workers started together on a fresh store: see stores.py


def study_name(spec: StudySpec, plan: Plan, uri: str) -> str:
    """A grid study's Optuna study: one per spec, planned runs and tracking store, so that
    the same command on several machines joins one study, and a study run with other
    `--set` values or seeds (or into another MLflow store) is its own."""

    identity = json.dumps({"runs": [c.key() for c in plan.runs], "tracking": masked(uri)}, sort_keys=True)
    return f"{spec.name}.{hashlib.sha1(identity.encode()).hexdigest()[:10]}"


def open_sweep(spec: StudySpec, **kwargs: Any) -> Session:
    """Check everything, then create or join the sweep's Optuna study and MLflow parent run.
    `fuse_k` None: `default_fuse_k` of the spec's device."""
    return open_session(spec, "sweep", **kwargs)


def open_session(spec: StudySpec, kind: str, *, plan: Plan | None = None, storage: str | None = None,
                 tracking: str | None = None, state: Any = None, results_root: Any = "results",
                 n_trials: int | None = None, sampler_seed: int | None = None, data_root: Any = None,
                 command: str = "", worker: str = "", fuse_k: int | None = None,
                 wide_only: bool = False, checked: bool = False) -> Session:
    """Check everything, then create or join the study's (or sweep's) Optuna study and
    MLflow parent run. `checked`: a worker process whose parent checked the same input
    (`preflight`) a moment ago."""

    quiet_mlflow()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    open_args = dict(plan=plan, storage=storage, tracking=tracking, state=state, results_root=results_root,
                     n_trials=n_trials, sampler_seed=sampler_seed, data_root=data_root, command=command,
                     fuse_k=fuse_k, wide_only=wide_only)
    root = state_dir(state)
    url = storage or stores.default_url(spec.name, root)
    uri = tracking_uri(tracking)
    out_dir = Path(results_root) / spec.name
    if kind == "sweep":
        check_spec(spec)
        configs = [spec.base_config()]
    else:
        assert plan is not None
        configs = plan.runs
    if not checked:
        preflight(spec, configs, url=url, uri=uri, data_root=data_root, out_dir=out_dir)

    tracker = Tracker(spec.name, uri)
    holder: dict[str, Session] = {}
    store = sweep_storage.open_storage(url, lambda study, trial: _lost(holder["session"], trial))
    if kind == "sweep":
        s = spec.sweep
        assert s is not None
        study = optuna.create_study(storage=store, study_name=spec.name, direction=s.direction,
                                    sampler=make_sampler(spec, sampler_seed), pruner=make_pruner(spec),
                                    load_if_exists=True)
        grid = len(grid_points(spec)) if s.sampler == "grid" else 0
        target = n_trials or s.n_trials
        if grid and target > grid:
            print(f"sweep {spec.name}: the grid has {grid} points; the sweep ends after {grid} trials")
            target = grid
        by_key: dict[str, TrialConfig] = {}
        k = fuse_k or default_fuse_k(spec.base_config().device)
    else:
        assert plan is not None
        # every trial is queued: the sampler is never asked, and nothing is pruned
        study = optuna.create_study(storage=store, study_name=study_name(spec, plan, uri), direction="maximize",
                                    sampler=optuna.samplers.RandomSampler(seed=0),
                                    pruner=optuna.pruners.NopPruner(), load_if_exists=True)

        runs = sorted(plan.runs, key=lambda c: repr(group_key(c)))  # trials that fuse, side by side
        by_key = {c.key(): c for c in runs}
        grid = target = len(by_key)
        k = fuse_k or 1
    session = Session(spec=spec, kind=kind, url=url, storage=store, study=study,
                      lock=sweep_storage.ClaimLock(url, study.study_name), tracker=tracker, parent="",
                      target=target, out_dir=out_dir, ckpt_root=root / "checkpoints" / spec.name,
                      data_root=data_root, command=command,
                      worker=worker or worker_name(sweep_storage.identity()), grid_size=grid, fuse_k=k,
                      wide_only=wide_only, configs=by_key, plan=plan, open_args=open_args)
    holder["session"] = session
    try:
        with interrupt.shielded():  # the parent run is created and recorded, or not created
            with session.lock():
                session.parent = _initialise(session) if kind == "sweep" else _initialise_study(session)
        # runs of this study whose process died here before Optuna knew their run id
        tracker.close_orphans("the process running it died",
                              extra=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{session.parent}'")
        # parent runs of a start that died before the study recorded them (the current
        # parent stays RUNNING while the study goes on, whoever created it)
        tracker.close_orphans(f"a start of the {kind} that died before it was recorded",
                              extra=f"tags.`{TAG_KIND}` = '{kind}'", keep=(session.parent,))
    except KeyboardInterrupt:
        if session.parent:
            with interrupt.shielded():
                pause_parent(session)
        raise
    return session


def pause_parent(sweep: Session) -> None:
    """Ctrl-C: the parent run shows KILLED unless other workers go on with the study."""

    with contextlib.suppress(Exception):
        if not sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if sweep.tracker.client.get_run(sweep.parent).info.status == "RUNNING":
                sweep.tracker.end(sweep.parent, "KILLED")


def _join(sweep: Session) -> str | None:
    """A later worker: the parent run that the first one recorded (None: it is the first)."""
    attrs = sweep.study.user_attrs
    if not attrs.get(STUDY_READY):
        return None
    parent = attrs[STUDY_PARENT_RUN_ID]
    try:
        sweep.tracker.client.get_run(parent)
    except Exception:
        raise ConfigError(f"MLflow tracking URI {sweep.tracker.uri} does not hold this {sweep.kind}'s parent run "
                          f"{parent}; every worker must use the tracking store it was started with "
                          f"({attrs.get(STUDY_TRACKING_URI)})") from None
    return parent


def _reopen(sweep: Session, parent: str) -> None:
    """The study goes on: its parent run shows RUNNING again."""
    if sweep.tracker.client.get_run(parent).info.status != "RUNNING":
        sweep.tracker.client.update_run(parent, status="RUNNING")


def _mark_ready(sweep: Session, parent: str, extra: dict[str, Any]) -> None:
    for key, value in {STUDY_PARENT_RUN_ID: parent, STUDY_EXPERIMENT: sweep.spec.name,
                       STUDY_TRACKING_URI: sweep_storage.masked(sweep.tracker.uri), STUDY_SPEC: sweep.spec.path,
                       STUDY_KIND: sweep.kind, **extra, STUDY_READY: True}.items():
        sweep.study.set_user_attr(key, value)


def _initialise(sweep: Session) -> str:
    """A sweep, under the claim lock: the first worker queues the grid and creates the
    MLflow parent run; every later one checks that it runs the same sweep and joins it."""
    spec, study, s = sweep.spec, sweep.study, sweep.spec.sweep
    assert s is not None
    attrs = study.user_attrs
    if attrs.get(STUDY_READY):
        if attrs.get(STUDY_SPEC_HASH) != spec_hash(spec):
            raise ConfigError(f"{spec.path}: the study {spec.name!r} in {sweep_storage.masked(sweep.url)} was started "
                              "with another search space, fixed settings or objective; give the sweep another name, "
                              "undo the change, or use another --storage")
        if (attrs.get(STUDY_SAMPLER) == "grid") != (s.sampler == "grid"):
            raise ConfigError(f"{spec.path}: sweep.sampler: study {spec.name!r} was started with sampler "
                              f"{attrs.get(STUDY_SAMPLER)}; a grid is chosen when a sweep starts")
        parent = _join(sweep)
        assert parent is not None
        if _done(sweep) < sweep.target:
            _reopen(sweep, parent)  # the sweep goes on
        return parent

    if s.sampler == "grid":  # every point once; workers pop queued trials atomically
        queued = {json.dumps(t.system_attrs.get(OPTUNA_FIXED_PARAMS, t.params), sort_keys=True, default=str)
                  for t in study.get_trials(deepcopy=False)}
        for point in grid_points(spec):
            if json.dumps(point, sort_keys=True, default=str) not in queued:
                study.enqueue_trial(point)
    parent = sweep.tracker.start_parent(
        f"{spec.name} (sweep, {s.sampler}, {sweep.target} trials)", kind="sweep",
        tags={TAG_OPTUNA_STUDY: spec.name, TAG_OPTUNA_STORAGE: sweep_storage.masked(sweep.url),
              TAG_SPEC: spec.path, TAG_COMMAND: sweep.command[:500],
              TAG_SEARCHED: ",".join(d.name for d in spec.search)},
        params={**{f"{PREFIX_FIXED}{k}": v for k, v in spec.fixed.items()},
                **{f"{PREFIX_SEARCH}{d.name}": describe(d) for d in spec.search},
                **{f"{PREFIX_SWEEP}{k}": v for k, v in dataclasses.asdict(s).items()},
                PARAM_N_TRIALS: sweep.target, PARAM_SEED: spec.seeds[0]},
        note=spec.description)
    sweep.tracker.log_artifacts(parent, [Path(spec.path)], "spec")
    _mark_ready(sweep, parent, {STUDY_SPEC_HASH: spec_hash(spec), STUDY_SAMPLER: s.sampler})
    return parent


def _enqueue_run(sweep: Session, key: str) -> None:
    config = sweep.configs[key]
    sweep.study.enqueue_trial({}, user_attrs={ATTR_KEY: key, **{n: fmt(getattr(config, n)) for n in sweep.names},
                                              ATTR_SEED: config.seed})


def _initialise_study(sweep: Session) -> str:
    """A grid study, under the claim lock. The first process of an execution queues every
    planned run not finished yet (one that MLflow holds finished, from an earlier
    execution, is added as complete) and creates the execution's MLflow parent run; the
    processes that come while the execution goes on join it. Once an execution has
    written its results, the next command is a new execution: a new parent run, and the
    runs that failed are queued again."""
    study = sweep.study
    trials = study.get_trials(deepcopy=False)
    complete = {t.user_attrs.get(ATTR_KEY) for t in trials if t.state == TrialState.COMPLETE}
    parent = _join(sweep)
    if parent is not None and not _results_written_for(sweep, parent):
        sweep.skipped = len(complete & set(sweep.configs))
        _reopen(sweep, parent)  # the execution goes on
        return parent
    if parent is not None:  # a new execution of a study whose runs are all in the storage
        busy = {t.user_attrs.get(ATTR_KEY) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        for key in sweep.configs:
            if key not in complete and key not in busy:  # failed before: tried again
                _enqueue_run(sweep, key)
        sweep.skipped = len(complete & set(sweep.configs))
    else:
        done = sweep.tracker.finished_trials()
        for key in sweep.configs:
            if key in done:  # trained by an earlier execution: read back, not trained again
                run = done[key]
                acc = run.data.metrics.get(TEST_ACC)
                study.add_trial(create_trial(state=TrialState.COMPLETE,
                                             value=acc if acc is not None and math.isfinite(acc) else 0.0,
                                             user_attrs={ATTR_KEY: key, ATTR_MLFLOW_RUN_ID: run.info.run_id,
                                                         ATTR_STATUS: run.data.tags.get(TAG_STATUS, ""),
                                                         ATTR_REUSED: True}))
                sweep.skipped += 1
            else:
                _enqueue_run(sweep, key)
    parent = _start_study_parent(sweep)
    _mark_ready(sweep, parent, {})
    return parent


def _results_written_for(sweep: Session, parent: str) -> bool:
    """Whether the execution of `parent` ended: its results are written."""
    claim = sweep.study.user_attrs.get(STUDY_FINAL_CLAIM) or {}
    return bool(claim.get(CLAIM_DONE)) and str(claim.get(CLAIM_FINGERPRINT, "")).startswith(f"{parent}|")


def _start_study_parent(sweep: Session) -> str:
    """An execution's MLflow parent run, with the spec as its artifact."""
    spec, plan = sweep.spec, sweep.plan
    assert plan is not None
    parent = sweep.tracker.start_parent(
        f"{spec.name} ({len(plan.trials)} trials)", kind="study",
        tags={TAG_SCIENTIFIC: ",".join(spec.scientific), TAG_NUISANCE: ",".join(spec.nuisance),
              TAG_SPEC: spec.path, TAG_COMMAND: sweep.command[:500],
              TAG_FUSE: str(sweep.fuse_k > 1), TAG_FUSE_K: str(sweep.fuse_k),
              TAG_OPTUNA_STUDY: sweep.study.study_name, TAG_OPTUNA_STORAGE: sweep_storage.masked(sweep.url)},
        params={**{f"{PREFIX_FIXED}{k}": v for k, v in spec.fixed.items()},
                **{f"{PREFIX_SCIENTIFIC}{k}": list(v) for k, v in spec.scientific.items()},
                **{f"{PREFIX_NUISANCE}{k}": list(v) for k, v in spec.nuisance.items()},
                PARAM_SEEDS: list(spec.seeds), PARAM_TRIALS: len(plan.trials), PARAM_RUNS: len(plan.runs)},
        note=spec.description)
    sweep.tracker.log_artifacts(parent, [Path(spec.path)], "spec")
    return parent


# ----------------------------------------------------------------------------------------
# the worker loop


def count_states(trials: list[Any]) -> dict[str, int]:

    out = {state.name: 0 for state in TrialState}
    for t in trials:
        out[t.state.name] += 1
    out["done"] = out["COMPLETE"] + out["PRUNED"]
    return out


def _done(sweep: Session) -> int:
    return count_states(sweep.study.get_trials(deepcopy=False))["done"]


def is_finished(sweep: Session, counts: dict[str, int]) -> bool:
    """The target is reached, or a grid has no point left to run (a point that failed for
    good, diverging at once say, is not run again)."""
    if counts["done"] >= sweep.target:
        return True
    return bool(sweep.grid_size) and counts["WAITING"] == 0 and counts["RUNNING"] == 0


def _lost(sweep: Session, trial: Any, why: str = "") -> None:
    """A trial whose worker is gone (no heartbeat, or a dead process here): close its
    MLflow run and queue the same parameters again (Optuna's retry callback)."""

    why = why or f"worker {worker_name(trial.user_attrs)} stopped beating for {sweep_storage.GRACE_S} s"
    if _recorded(sweep, trial):
        return
    _kill_run(sweep, trial.user_attrs.get(ATTR_MLFLOW_RUN_ID), why)
    with sweep_storage.quiet():
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(sweep.study, trial)
    sweep.say(f"[{sweep.worker}] trial {trial.number} lost ({why}); queued again")


def _recorded(sweep: Session, trial: Any) -> bool:
    """A lost trial whose worker died after its MLflow run had ended (finished, diverged or
    pruned: result.json and all) but before Optuna was told: its outcome is in MLflow, so
    Optuna gets it (a trial with its params and outcome) instead of a retry that would
    train it twice. Returns whether it did."""
    run_id = trial.user_attrs.get(ATTR_MLFLOW_RUN_ID)
    if not run_id:
        return False
    try:
        run = sweep.tracker.client.get_run(run_id)
        status = run.data.tags.get(TAG_STATUS)
        if run.info.status not in ("FINISHED", "FAILED") or status not in (FINISHED, DIVERGED, PRUNED):
            return False
        result = sweep.tracker.load_result(run)
    except Exception:  # no such run, or no result.json: not recorded whole
        return False
    if sweep.kind == "study":
        value = result.metric(TEST_ACC)
        state, value = TrialState.COMPLETE, value if math.isfinite(value) else 0.0
    else:
        assert sweep.spec.sweep is not None
        value = objective_value(result, sweep.spec.sweep.objective)
        if status == PRUNED:
            state, value = TrialState.PRUNED, None
        elif math.isfinite(value):
            state = TrialState.COMPLETE
        else:
            return False
    workers = (ATTR_WORKER_HOST, ATTR_WORKER_BOOT, ATTR_WORKER_PID)
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in workers}
    sweep.study.add_trial(create_trial(state=state, value=value, params=trial.params, distributions=trial.distributions,
                                       user_attrs={**attrs, ATTR_STATUS: status},
                                       intermediate_values=trial.intermediate_values))
    with contextlib.suppress(Exception):  # the run's own record is complete without it
        sweep.tracker.client.set_tag(run_id, TAG_STATE, state.name)
    sweep.say(f"[{sweep.worker}] trial {trial.number}: its worker died after recording it; {state.name.lower()}")
    return True


def _kill_run(sweep: Session, run_id: str | None, why: str | None = None) -> None:
    """A failed trial's MLflow run: KILLED if it was still RUNNING (with `why`), and
    tagged FAIL. Best effort: the Optuna record is what counts."""
    if not run_id:
        return
    client = sweep.tracker.client
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, TAG_STATUS, INTERRUPTED)
            if why:
                client.set_tag(run_id, TAG_REASON, why)
            client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, TAG_STATE, "FAIL")


def recover(sweep: Session) -> None:
    """Under the claim lock: fail and requeue the running trials of lost workers."""

    with sweep_storage.quiet():
        optuna.storages.fail_stale_trials(sweep.study)  # other machines: by heartbeat
    for t in sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # a trial is taken under this lock with its worker's identity: one without it was
        # taken by a worker that died before it could say who it was
        taken = ATTR_WORKER_PID in t.user_attrs
        if taken and not sweep_storage.dead_here(t.user_attrs):  # this machine: the process is gone
            continue
        try:
            changed = sweep.storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if changed:
            _lost(sweep, sweep.storage.get_trial(trial_id(t)),
                  f"its process {worker_name(t.user_attrs)} is gone" if taken
                  else "its worker died while taking it")


def _next_trial(sweep: Session) -> tuple[Any | None, dict[str, int]]:
    """Under the claim lock: the next trial to train, or None when there is nothing to do
    (the target is reached, or the remaining trials are running elsewhere)."""
    recover(sweep)
    counts = count_states(sweep.study.get_trials(deepcopy=False))
    if counts["done"] >= sweep.target or counts["done"] + counts["RUNNING"] >= sweep.target:
        return None, counts
    if sweep.grid_size and counts["WAITING"] == 0:
        return None, counts  # every grid point is taken
    with sweep_storage.quiet():  # "heartbeat is meant for optimize()": we beat ourselves
        trial = sweep.study.ask()
    me = sweep_storage.identity()
    for key, value in {**me, ATTR_MLFLOW_RUN_ID: ""}.items():
        trial.set_user_attr(key, value)
    sweep.storage.record_heartbeat(trial_id(trial))  # a lost worker is visible from the start
    return trial, counts


@dataclass
class WorkerReport:
    trained: int = 0
    states: dict[str, int] = field(default_factory=dict)
    failed_in_a_row: int = 0
    stopped: str = ""  # why this worker gave up before the sweep's end (empty when it did not)


def work(sweep: Session) -> WorkerReport:
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
                if sweep.cores is not None:
                    sweep.cores.idle()
                if is_finished(sweep, counts):
                    return report
                # the rest runs elsewhere: wait, in case a worker is lost (or until one here ends)
                if sweep.cores is not None:
                    sweep.cores.wait(POLL_S)
                else:
                    time.sleep(POLL_S)
                continue
            if sweep.cores is not None:
                sweep.cores.busy()
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
        if sweep.kind == "sweep" and report.failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
            report.stopped = f"{report.failed_in_a_row} trials failed in a row"
            return report


def trial_data(sweep: Session, config: TrialConfig, cache: dict[tuple, Any]) -> Any:

    c = config
    key = (c.dataset, c.normalize, c.train_subset, c.test_subset, c.val_size, c.channels_last, c.device)
    if key not in cache:
        cache.clear()  # one data set on the device at a time
        cache[key] = load_data(c, sweep.data_root, resolve_device(c.device))
    return cache[key]


def _config_or_fail(sweep: Session, trial: Any) -> TrialConfig | None:
    """A claimed trial's settings; a combination of values that no trial can take fails
    the trial (None)."""
    try:
        return sweep.config_of(trial)
    except ConfigError as err:
        trial.set_user_attr(ATTR_REASON, str(err)[:500])
        sweep.study.tell(trial, state=TrialState.FAIL)
        sweep.say(f"[{sweep.worker}] trial {trial.number} failed: {err}")
        return None


def _train(sweep: Session, trial: Any, data_cache: dict[tuple, Any]) -> str:
    """Train one trial, tell Optuna its outcome, tag its MLflow run. Returns the state."""

    if sweep.kind == "sweep":
        suggest(trial, sweep.spec)
    config = _config_or_fail(sweep, trial)
    if config is None:
        return "FAIL"
    ckpt, inner = _checkpoints_and_run(sweep, trial, config)
    recorder = _recorder(sweep, inner, trial, config)
    t0 = time.perf_counter()
    try:
        with sweep_storage.Heartbeat(sweep.storage, trial_id(trial)):
            result = run_trial(config, recorder=recorder, checkpoint_dir=ckpt, evaluate_test=sweep.kind == "study",
                               data=trial_data(sweep, config, data_cache))
    except KeyboardInterrupt:  # see work
        raise
    except BaseException as err:
        _tell(sweep, trial, inner, TrialState.FAIL, None, f"{type(err).__name__}: {err}")
        raise

    return _conclude(sweep, trial, inner, result, ckpt, run_name(config, sweep.names), t0)


def _checkpoints_and_run(sweep: Session, trial: Any, config: TrialConfig) -> tuple[Path, Any]:
    """A trial's checkpoint folder and its MLflow recorder (the child run is created when it
    starts). A study's run resumes from the checkpoints of its key; a sweep's retried trial
    from those of the trial it repeats."""

    names = sweep.names
    if sweep.kind == "study":
        spec = sweep.spec
        tags = {TAG_SCIENTIFIC: ",".join(spec.scientific), TAG_TRIAL: str(trial.number),
                TAG_OPTUNA_STUDY: sweep.study.study_name,
                **{f"{PREFIX_SCIENTIFIC}{k}": fmt(getattr(config, k)) for k in spec.scientific},
                **{f"{PREFIX_NUISANCE}{k}": fmt(getattr(config, k)) for k in spec.nuisance}}
        inner = sweep.tracker.recorder(config, parent=sweep.parent, name=run_name(config, names),
                                       tags={**tags, TAG_TRIAL_THREADS: str(sweep.threads or "")})
        return sweep.ckpt_root / config.key(), inner
    origin = sweep.storage.get_trial(trial_id(trial)).system_attrs.get(OPTUNA_FAILED_TRIAL, trial.number)
    inner = sweep.tracker.recorder(config, parent=sweep.parent, name=f"trial {trial.number}: {run_name(config, names)}",
                                   tags={TAG_PHASE: "search", TAG_TRIAL: str(trial.number), TAG_STATE: "RUNNING",
                                         TAG_OPTUNA_STUDY: sweep.spec.name, TAG_SEARCHED: ",".join(names),
                                         **({TAG_RETRY_OF: str(origin)} if origin != trial.number else {})})
    return sweep.ckpt_root / f"trial-{origin:05d}", inner


def _recorder(sweep: Session, inner: Any, trial: Any, config: TrialConfig) -> PruningRecorder:
    """The trial's MLflow recorder, wrapped: the run id to Optuna, a sweep's score each
    epoch (which may prune it), and each epoch to the progress board."""
    return PruningRecorder(inner, trial, sweep.metric, on_epoch=_epoch_events(sweep, trial, config),
                           on_log=sweep.cores.adjust if sweep.cores is not None else None)


def _epoch_events(sweep: Session, trial: Any, config: TrialConfig) -> Callable[[dict[str, float]], None] | None:
    """Each epoch of a trial as an event for the parent's progress board (worker processes)."""
    if sweep.events is None:
        return None
    label = run_name(config, sweep.names) if sweep.kind == "study" else f"trial {trial.number}"
    metric = TEST_ACC if sweep.kind == "study" else (sweep.metric or "")
    events, worker = sweep.events, sweep.worker

    def send(record: dict[str, float]) -> None:
        events.put(("epoch", worker, label, int(record[EPOCH]), config.epochs, metric,
                    float(record.get(metric, math.nan))))

    return send


def _conclude(sweep: Session, trial: Any, inner: Any, result: Any, ckpt: Path, label: str, t0: float) -> str:
    """A trained trial's outcome to Optuna and MLflow; a sweep trial's resume checkpoints
    removed (MLflow holds them; a study keeps its own, as `checkpoints:` asks). Returns the
    state."""
    with interrupt.shielded():  # the outcome is recorded whole (a Ctrl-C is raised after)
        state, value, shown = _record(sweep, trial, inner, result)
    fused = f" (fused with {result.fused_with - 1} other(s))" if result.fused_with > 1 else ""
    took = f"after {len(result.history)} epoch(s), {time.perf_counter() - t0:.1f} s{fused}"
    if sweep.kind == "study":
        if sweep.cores is not None and sweep.threads and inner.run_id and sweep.cores.current != sweep.threads:
            # it took the cores of workers that ended before it: "1-2" (started with 1, ended with 2)
            sweep.tracker.client.set_tag(inner.run_id, TAG_TRIAL_THREADS, f"{sweep.threads}-{sweep.cores.current}")
        acc = result.metric(TEST_ACC)
        value_text = f"test acc {acc:.2f}%" if math.isfinite(acc) else result.status
        sweep.say(f"[{sweep.worker}] {label}: {result.status}, {value_text} {took}", ended=label)
        return state.name
    s = sweep.spec.sweep
    assert s is not None
    shutil.rmtree(ckpt, ignore_errors=True)  # MLflow holds the checkpoints; .cnnbench is for resuming
    name = "val acc" if s.objective == "val_acc" else "val loss"
    value_text = f"{name} {shown:.4g}" if math.isfinite(shown) else result.status
    sweep.say(f"[{sweep.worker}] trial {trial.number} {state.name.lower()}: {value_text} {took}; {label}",
              ended=f"trial {trial.number}")
    return state.name


def _record(sweep: Session, trial: Any, inner: Any, result: Any) -> tuple[Any, float, float]:
    """Tell Optuna a trained trial's outcome and tag its MLflow run: (state, value, shown)."""

    if sweep.kind == "study":  # a diverged run is an outcome too: it is not trained again
        value = result.metric(TEST_ACC)
        state = TrialState.COMPLETE if result.status in (FINISHED, DIVERGED) else TrialState.FAIL
        value = value if math.isfinite(value) else 0.0
        for key, v in {ATTR_STATUS: result.status, ATTR_TRAIN_SECONDS: round(result.train_seconds, 3),
                       ATTR_REASON: result.reason[:500], ATTR_FUSED_WITH: result.fused_with}.items():
            trial.set_user_attr(key, v)
        _tell(sweep, trial, inner, state, value if state == TrialState.COMPLETE else None, result.reason)
        return state, value, value
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
    assert sweep.metric is not None
    for key, v in {ATTR_STATUS: result.status, ATTR_BEST_EPOCH: result.best(sweep.metric)[1] or 0,
                   ATTR_TRAIN_SECONDS: round(result.train_seconds, 3), ATTR_REASON: result.reason[:500],
                   ATTR_FUSED_WITH: result.fused_with}.items():
        trial.set_user_attr(key, v)
    _tell(sweep, trial, inner, state, value if state == TrialState.COMPLETE else None, result.reason)
    return state, value, shown


def _interrupted(sweep: Session, trial: Any) -> None:
    """Ctrl-C: a trial still running is failed and queued again (its checkpoints resume it);
    its MLflow run, if it has one, is KILLED."""

    frozen = sweep.storage.get_trial(trial_id(trial))
    if frozen.state != TrialState.RUNNING:
        return
    trial.set_user_attr(ATTR_REASON, "interrupted (Ctrl-C)")
    sweep.study.tell(trial, state=TrialState.FAIL)
    _kill_run(sweep, frozen.user_attrs.get(ATTR_MLFLOW_RUN_ID))
    with sweep_storage.quiet():
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
            sweep.study, sweep.storage.get_trial(trial_id(trial)))


def _tell(sweep: Session, trial: Any, recorder: Any, state: Any, value: float | None, reason: str) -> None:

    if state == TrialState.FAIL and reason:
        trial.set_user_attr(ATTR_REASON, reason[:500])
    sweep.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    if getattr(recorder, "run_id", None):  # None: a member of a batch that never started
        with contextlib.suppress(Exception):  # the run's own record is complete without these tags
            sweep.tracker.client.set_tag(recorder.run_id, TAG_STATE, state.name)
            if value is not None:
                sweep.tracker.client.log_metric(recorder.run_id, METRIC_OPTUNA_VALUE, float(value))



# ----------------------------------------------------------------------------------------
# fused sweeps: up to K trials claimed at once, trained as fused groups, each its own trial


def default_fuse_k(device: str) -> int:
    """Trials a worker trains at once by default: FUSE_K on CUDA and MPS, where K fused
    LeNets take little longer per step than one; 1 on the CPU, where they take about K
    times as long and one trial at a time is as fast (see study.execution)."""

    return 1 if resolve_device(device).type == "cpu" else FUSE_K


def next_batch(sweep: Session, k: int) -> tuple[list[Any], dict[str, int]]:
    """Under the claim lock: up to `k` trials to train (a group is claimed as a unit),
    none when the target is reached or the remaining trials run elsewhere.

    Batched ask-and-tell: each trial is suggested before the next is asked, so that TPE's
    constant liar sees the running ones and K asks are K different points; queued trials
    (retries, grid points) come first, in order, and a QMC sweep takes K consecutive points.
    Every trial carries this worker's identity and a heartbeat from the start, so that a
    worker killed mid-group leaves all K to be recovered."""

    recover(sweep)
    trials = sweep.study.get_trials(deepcopy=False)
    counts = count_states(trials)
    room = sweep.target - counts["done"] - counts["RUNNING"]  # never more than --n-trials
    if sweep.grid_size:
        room = min(room, counts["WAITING"])  # every grid point is taken once
    if sweep.kind == "study":
        room = min(room, _next_group_size(sweep, trials, k))
    me = {**sweep_storage.identity(), ATTR_MLFLOW_RUN_ID: ""}
    batch = []
    for _ in range(max(0, min(k, room))):
        with warnings.catch_warnings():  # "heartbeat is meant for optimize()": we beat ourselves
            warnings.simplefilter("ignore")
            trial = sweep.study.ask()
        for key, value in me.items():
            trial.set_user_attr(key, value)
        sweep.storage.record_heartbeat(trial_id(trial))
        if sweep.kind == "sweep":
            suggest(trial, sweep.spec)  # now, before the next ask
        batch.append(trial)
    return batch, counts


def _next_group_size(sweep: Session, trials: list[Any], k: int) -> int:
    """How many of a study's queued trials (taken in queue order) make one fused group
    with the first: the same group key, each fusable (one that is not trains alone)."""

    waiting = [t for t in sorted(trials, key=lambda t: t.number) if t.state == TrialState.WAITING]
    configs = [sweep.configs.get(t.user_attrs.get(ATTR_KEY, "")) for t in waiting]
    if not configs or configs[0] is None or k <= 1 or not fusable(configs[0], wide_only=sweep.wide_only):
        return 1
    first, n = group_key(configs[0]), 1
    for c in configs[1:k]:
        if c is None or group_key(c) != first or not fusable(c, wide_only=sweep.wide_only):
            break
        n += 1
    return n


@dataclass
class Member:
    """One trial of a claimed batch."""
    trial: Any
    config: TrialConfig
    ckpt: Path
    inner: Any  # its MLflow recorder
    told: bool = False


def fused_groups(members: list[Member], max_k: int, *, wide_only: bool = False) -> list[list[Member]]:
    """Members that can train as one FusedEngine together (fused.group_key), split by
    what breaks fusing (batch size, model, activation, epochs...) and by the epoch their
    checkpoints resume from (a group starts at one epoch); order kept, nothing dropped."""

    out = []
    for idx in fuse_groups([m.config for m in members], max_k=max_k, wide_only=wide_only):
        by_epoch: dict[int, list[Member]] = {}
        for i in idx:
            by_epoch.setdefault(resume_epoch(members[i].ckpt, members[i].config), []).append(members[i])
        out.extend(by_epoch.values())
    return out


def train_batch(sweep: Session, batch: list[Any], data_cache: dict[tuple, Any]) -> list[str]:
    """Train a claimed batch group by group; tell Optuna each member's outcome. Returns
    the states. Every member's heartbeat beats until the whole batch is done."""

    members: list[Member] = []
    states: list[str] = []
    for trial in batch:
        config = _config_or_fail(sweep, trial)
        if config is None:
            states.append("FAIL")
            continue
        ckpt, inner = _checkpoints_and_run(sweep, trial, config)
        members.append(Member(trial, config, ckpt, inner))
    try:
        with contextlib.ExitStack() as beats:
            for m in members:
                beats.enter_context(sweep_storage.Heartbeat(sweep.storage, trial_id(m.trial)))
            for group in fused_groups(members, sweep.fuse_k, wide_only=sweep.wide_only):
                states += train_fused(sweep, group, data_cache)
    except KeyboardInterrupt:  # Ctrl-C: fail every member not told yet, queue it again

        for m in members:
            if not m.told:
                _tell(sweep, m.trial, m.inner, TrialState.FAIL, None, "interrupted (Ctrl-C)")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
                        sweep.study, sweep.storage.get_trial(trial_id(m.trial)))
        raise
    except BaseException as err:
        for m in members:
            if not m.told:
                _tell(sweep, m.trial, m.inner, TrialState.FAIL, None, f"{type(err).__name__}: {err}")
        raise
    return states


def train_fused(sweep: Session, group: list[Member], data_cache: dict[tuple, Any]) -> list[str]:
    """One group through train_group: one FusedEngine (a lone member: the SingleEngine),
    one PruningRecorder per member reporting to its own trial and MLflow run. A pruned or
    diverging member stops alone (FusedEngine.deactivate); the group ends when none is left."""

    names = sweep.names
    configs = [m.config for m in group]
    t0 = time.perf_counter()
    label = ", ".join(run_name(c, names) for c in configs)[:60]
    results = train_group(configs, recorders=[_recorder(sweep, m.inner, m.trial, m.config) for m in group],
                          checkpoint_dirs=[m.ckpt for m in group], evaluate_test=sweep.kind == "study",
                          data=trial_data(sweep, configs[0], data_cache), progress=label)
    states = []
    for m, result in zip(group, results):
        states.append(_conclude(sweep, m.trial, m.inner, result, m.ckpt, run_name(m.config, names), t0))
        m.told = True
    return states


# ----------------------------------------------------------------------------------------
# the end: exactly one process writes the results


def claim_results(sweep: Session, fingerprint: str) -> str | None:
    """Under the claim lock: become the one process that writes the results. Returns why
    not when another (live) one does, or did for the same trials (`fingerprint`)."""
    claim = sweep.study.user_attrs.get(STUDY_FINAL_CLAIM)
    me = sweep_storage.identity()
    if claim and claim.get(CLAIM_DONE) and claim.get(CLAIM_FINGERPRINT) == fingerprint:
        return f"the results are up to date (written by {worker_name(claim)}; also in MLflow run {sweep.parent})"
    if claim and not claim.get(CLAIM_DONE):
        mine = {k: claim.get(k) for k in me} == me
        if not mine and not sweep_storage.dead_here(claim):
            return f"worker {worker_name(claim)} is writing the results"
    sweep.study.set_user_attr(STUDY_FINAL_CLAIM, {**me, CLAIM_DONE: False, CLAIM_SINCE: time.time()})
    return None


def results_written(sweep: Session, fingerprint: str) -> None:
    """The results of these trials are written: a later end with the same ones is not redone."""
    sweep.study.set_user_attr(STUDY_FINAL_CLAIM, {**sweep_storage.identity(), CLAIM_DONE: True,
                                                  CLAIM_SINCE: time.time(), CLAIM_FINGERPRINT: fingerprint})


# ----------------------------------------------------------------------------------------
# worker processes


def launch_workers(sweep: Session, n: int, *, threads: int | None = None, share_cores: bool = False) -> WorkerReport:
    """`n` worker processes on this machine (one GPU each, round robin, where there are
    GPUs; `threads` CPU threads each) that join this session's study and train its
    trials, their progress shown here one line per running trial. Returns when all end.
    `share_cores`: a CPU worker that runs out of work gives its threads to those still
    training (cores.CoreShare); off, every trial keeps `threads` from start to end, so its
    numbers are the same bits whenever the others end."""

    gpus = torch.cuda.device_count()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or MLflow state
    events = ctx.Queue()
    training = ctx.Value("i", n)  # workers training: CPU threads go to those still at it
    procs: list[Any] = []
    report = WorkerReport()
    counts = count_states(sweep.study.get_trials(deepcopy=False))
    done = sweep.skipped if sweep.kind == "study" else counts["done"]
    board = Board(f"{sweep.kind} {sweep.spec.name}", sweep.target, min(done, sweep.target))
    with board.listening(events):  # read for the workers' whole life, Ctrl-C included
        try:
            with interrupt.blocked():  # a Ctrl-C while they start is raised once all are started
                for i in range(n):
                    proc = ctx.Process(target=worker_main, name=f"cnnbench-w{i}",
                                       args=(sweep.spec, sweep.kind,
                                             {**sweep.open_args, "storage": sweep.url, "checked": True},
                                             f"w{i}", threads, i % gpus if gpus else None, events,
                                             (training, n * threads if threads and share_cores else None)))
                    proc.start()
                    procs.append(proc)
            board.handle(("line", "", f"{sweep.kind} {sweep.spec.name}: {n} workers started (pids "
                          f"{', '.join(str(p.pid) for p in procs)})" + (f" on {gpus} GPU(s)" if gpus else ""), None))
            for proc in procs:
                while proc.is_alive():
                    proc.join(timeout=1.0)  # bounded: this thread looks at its signals every second
        except KeyboardInterrupt:
            # Ctrl-C to this process alone: pass it on (a worker that has it already, from the
            # terminal, holds the second one); each stops at its next safe point
            with interrupt.shielded():
                for proc in procs:
                    if proc.is_alive() and proc.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGINT)
                for proc in procs:
                    proc.join()
            raise
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        report.stopped = f"{len(bad)} worker(s) ended with status {', '.join(map(str, bad))}"
    return report


def worker_main(spec: StudySpec, kind: str, open_args: dict[str, Any], label: str, threads: int | None,
                gpu: int | None, events: Any, share: tuple[Any, int | None] | None = None) -> None:
    """A worker process: join the study, train until nothing is left, exit (0; 3 when its
    trials kept failing; 2 on bad input; 130 on Ctrl-C). `share`: the counter of workers
    training, to wake when one ends, and the threads of all together, to share the CPU's
    cores out as workers end (None: off the CPU, or without --share-cores; cores.CoreShare)."""
    try:

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except (OSError, AttributeError):
        pass
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    # the parent shows progress: no bar per trial here
    spec = dataclasses.replace(spec, fixed={**spec.fixed, "progress": False})
    plan = open_args.get("plan")
    if plan is not None:
        plan = dataclasses.replace(plan, runs=[c.replace(progress=False) for c in plan.runs],
                                   trials=[c.replace(progress=False) for c in plan.trials])
    try:
        interrupt.install()  # a Ctrl-C that came while the parent started us is raised here
        if threads:

            torch.set_num_threads(threads)
        session = open_session(spec, kind, **{**open_args, "plan": plan}, worker=label)
        session.events, session.threads = events, threads
        if share is not None:
            session.cores = CoreShare(share[0], share[1], threads)
        report = work(session)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ConfigError, DataError, DeviceError, TrackingError) as err:
        events.put(("line", label, f"[{label}] error: {err}", None))
        sys.exit(2)
    if report.stopped:
        events.put(("line", label, f"[{label}] stopped: {report.stopped}", None))
        sys.exit(3)
    # Done, every outcome recorded (MLflow and Optuna write synchronously): exit without the
    # interpreter's teardown of torch, MLflow and SQLAlchemy, which took 2-3 s of a study's
    # wall time here, once the progress lines are sent.
    events.close()
    events.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
