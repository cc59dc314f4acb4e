"""Optuna sweeps: find the best settings over a spec's `search:` space.

A sweep is an Optuna study run by the same engine as a grid study (`SWEEP`, its
`session.Kind`): the space and its `trial.suggest_*` calls are `config.space`'s, the
sampler, pruner and pruning recorder `run.search`'s. Tuning never reads the test set: the
objective is the best validation score over epochs, on the fixed, seeded split that
`val_size` holds out of the training set. At the end (`run.final`) the best trial is
trained again over `sweep.final_seeds` and tested once, and `results/<sweep>/` is written.

With K > 1 (`fuse_k`; the default on CUDA and MPS) a worker claims up to K trials at once
(batched ask-and-tell, so that TPE's constant liar sees each) and trains those that fuse
as one engine; every member stays its own trial (its reports, pruning, outcome, run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cnnbench.config.space import OBJECTIVES, Plan, check_spec, describe, grid_points, spec_hash, suggest, trial_config
from cnnbench.config.spec import StudySpec
from cnnbench.config.trial import TrialConfig
from cnnbench.errors import ConfigError
from cnnbench.run.final import finalize
from cnnbench.run.opening import join, leading, mark_ready, open_session, pause_parent, reopen
from cnnbench.run.phases import Timed
from cnnbench.run.search import make_pruner, make_sampler, objective_value
from cnnbench.run.session import Kind, Member, Opened, Outcome, Session, trial_id
from cnnbench.run.executors import detached, prepare
from cnnbench.run.executors.local import LocalPlan
from cnnbench.run.networks import networks, notebook_workers
from cnnbench.run.pool import supervise
from cnnbench.run.trials import say_engine
from cnnbench.run.workers import WorkerReport, work
from cnnbench.track.schema import (
    ATTR_BEST_EPOCH,
    ATTR_FUSED_WITH,
    ATTR_REASON,
    ATTR_STATUS,
    ATTR_TRAIN_SECONDS,
    OPTUNA_FAILED_TRIAL,
    OPTUNA_FIXED_PARAMS,
    PARAM_N_TRIALS,
    PARAM_SEED,
    PREFIX_FIXED,
    PREFIX_SEARCH,
    PREFIX_SWEEP,
    STUDY_READY,
    STUDY_SAMPLER,
    STUDY_SPEC_HASH,
    TAG_COMMAND,
    TAG_OPTUNA_STORAGE,
    TAG_OPTUNA_STUDY,
    TAG_PHASE,
    TAG_RETRY_OF,
    TAG_SEARCHED,
    TAG_SPEC,
    TAG_STATE,
    TAG_TRIAL,
)
from cnnbench.track.writer import run_name
from cnnbench.train.device import resolve_device, usable_cores
from cnnbench.train.result import DIVERGED, FINISHED, PRUNED, TrialResult
from cnnbench.util import interrupt
from cnnbench.util.text import masked
from cnnbench.util.timings import phase

FUSE_K = 16  # trials a worker trains fused on CUDA and MPS by default (a study's --max-fuse default too)
MAX_FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing (a broken device, say) stops


def default_fuse_k(device: str) -> int:
    """Trials a worker trains at once by default: FUSE_K on CUDA and MPS, where K fused
    LeNets take little longer per step than one; 1 on the CPU, where they take about K
    times as long and one trial at a time is as fast (see run.layout.execution)."""
    return 1 if resolve_device(device).type == "cpu" else FUSE_K


class Sweep(Kind):
    name = "sweep"
    evaluate_test = False  # tuning never reads the test set
    max_failures_in_a_row = MAX_FAILURES_IN_A_ROW

    # -- opening ------------------------------------------------------------------------------

    def configs_to_check(self, spec: StudySpec, plan: Plan | None) -> list[TrialConfig]:
        check_spec(spec)
        return [spec.base_config()]

    def execution(self, spec: StudySpec, plan: Plan | None, *, uri: str, url: str) -> tuple[str, str]:
        return spec.name, f"{spec.name} {spec_hash(spec)} in {masked(url)}, tracked in {masked(uri)}"

    def create(self, spec: StudySpec, *, plan: Plan | None, store: Any, uri: str, n_trials: int | None,
               sampler_seed: int | None, fuse_k: int | None) -> Opened:
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
        return Opened(study, target, grid, {}, fuse_k or default_fuse_k(spec.base_config().device))

    def initialise(self, session: Session) -> str:
        """The first worker queues the grid and creates the MLflow parent run; every later
        one checks that it runs the same sweep and joins it."""
        spec, s = session.spec, session.spec.sweep
        assert s is not None
        attrs = session.study.user_attrs
        if attrs.get(STUDY_READY):
            return self.rejoin(session)
        if s.sampler == "grid":  # every point once; workers pop queued trials atomically
            queued = {json.dumps(t.system_attrs.get(OPTUNA_FIXED_PARAMS, t.params), sort_keys=True, default=str)
                      for t in session.study.get_trials(deepcopy=False)}
            for point in grid_points(spec):
                if json.dumps(point, sort_keys=True, default=str) not in queued:
                    session.study.enqueue_trial(point)
        parent = start_parent(session)
        mark_ready(session, parent, {STUDY_SPEC_HASH: spec_hash(spec), STUDY_SAMPLER: s.sampler})
        return parent

    def rejoin(self, session: Session) -> str:
        """A later worker: the same sweep (space, fixed settings, objective, sampler kind)."""
        spec, s, attrs = session.spec, session.spec.sweep, session.study.user_attrs
        assert s is not None
        if attrs.get(STUDY_SPEC_HASH) != spec_hash(spec):
            raise ConfigError(f"{spec.path}: the study {spec.name!r} in {masked(session.url)} was started "
                              "with another search space, fixed settings or objective; give the sweep another name, "
                              "undo the change, or use another --storage")
        if (attrs.get(STUDY_SAMPLER) == "grid") != (s.sampler == "grid"):
            raise ConfigError(f"{spec.path}: sweep.sampler: study {spec.name!r} was started with sampler "
                              f"{attrs.get(STUDY_SAMPLER)}; a grid is chosen when a sweep starts")
        parent = join(session)
        assert parent is not None
        if session.counts()["done"] < session.target:
            reopen(session, parent)  # the sweep goes on
        return parent

    # -- claiming -------------------------------------------------------------------------------

    def claimed(self, session: Session, trial: Any) -> None:
        suggest(trial, session.spec)  # now, before the next ask

    # -- a trial --------------------------------------------------------------------------------

    def metric(self, spec: StudySpec) -> str | None:
        assert spec.sweep is not None
        return OBJECTIVES[spec.sweep.objective]

    def names(self, spec: StudySpec) -> list[str]:
        return [d.name for d in spec.search]

    def config_of(self, session: Session, trial: Any) -> TrialConfig:
        return trial_config(session.spec, trial.params)

    def label(self, session: Session, trial: Any, config: TrialConfig) -> str:
        return f"trial {trial.number}"

    def run_of(self, session: Session, trial: Any, config: TrialConfig) -> tuple[Path, str, dict[str, str]]:
        """A retried trial resumes from the checkpoints of the trial it repeats."""
        names = session.names
        origin = session.storage.get_trial(trial_id(trial)).system_attrs.get(OPTUNA_FAILED_TRIAL, trial.number)
        tags = {TAG_PHASE: "search", TAG_TRIAL: str(trial.number), TAG_STATE: "RUNNING",
                TAG_OPTUNA_STUDY: session.spec.name, TAG_SEARCHED: ",".join(names),
                **({TAG_RETRY_OF: str(origin)} if origin != trial.number else {})}
        return session.ckpt_root / f"trial-{origin:05d}", f"trial {trial.number}: {run_name(config, names)}", tags

    def outcome(self, session: Session, result: TrialResult) -> Outcome:
        """A diverged trial counts with its best epoch before diverging (the tuning
        playbook's retrospective choice): the sampler learns that region is bad."""
        assert session.spec.sweep is not None and session.metric is not None
        value = objective_value(result, session.spec.sweep.objective)
        if result.status == PRUNED:
            state, told, shown = TrialState.PRUNED, None, value
        elif result.status in (FINISHED, DIVERGED) and math.isfinite(value):
            state, told, shown = TrialState.COMPLETE, value, value
        else:
            state, told, shown = TrialState.FAIL, None, math.nan
        attrs = {ATTR_STATUS: result.status, ATTR_BEST_EPOCH: result.best(session.metric)[1] or 0,
                 ATTR_TRAIN_SECONDS: round(result.train_seconds, 3), ATTR_REASON: result.reason[:500],
                 ATTR_FUSED_WITH: result.fused_with}
        return Outcome(state, told, shown, attrs)

    def ended(self, session: Session, member: Member, result: TrialResult, outcome: Outcome, took: str) -> None:
        """MLflow holds the checkpoints; .cnnbench is for resuming, so they go."""
        assert session.spec.sweep is not None
        shutil.rmtree(member.ckpt, ignore_errors=True)
        name = "val acc" if session.spec.sweep.objective == "val_acc" else "val loss"
        value_text = f"{name} {outcome.shown:.4g}" if math.isfinite(outcome.shown) else result.status
        number = member.trial.number
        session.say(f"[{session.worker}] trial {number} {outcome.state.name.lower()}: {value_text} {took}; "
                    f"{run_name(member.config, session.names)}", ended=f"trial {number}")

    def done_at_start(self, session: Session) -> int:
        return session.counts()["done"]


SWEEP = Sweep()


def start_parent(session: Session) -> str:
    """The sweep's MLflow parent run, with the spec as its artifact."""
    spec, s = session.spec, session.spec.sweep
    assert s is not None
    parent = session.tracker.start_parent(
        f"{spec.name} (sweep, {s.sampler}, {session.target} trials)", kind=SWEEP.name,
        tags={TAG_OPTUNA_STUDY: spec.name, TAG_OPTUNA_STORAGE: masked(session.url),
              TAG_SPEC: spec.path, TAG_COMMAND: session.command[:500],
              TAG_SEARCHED: ",".join(d.name for d in spec.search)},
        params={**{f"{PREFIX_FIXED}{k}": v for k, v in spec.fixed.items()},
                **{f"{PREFIX_SEARCH}{d.name}": describe(d) for d in spec.search},
                **{f"{PREFIX_SWEEP}{k}": v for k, v in dataclasses.asdict(s).items()},
                PARAM_N_TRIALS: session.target, PARAM_SEED: spec.seeds[0]},
        note=spec.description)
    session.tracker.log_artifacts(parent, [Path(spec.path)], "spec")
    return parent


def open_sweep(spec: StudySpec, *, storage: str | None = None, tracking: str | None = None, state: Any = None,
               results_root: Any = "results", n_trials: int | None = None, sampler_seed: int | None = None,
               data_root: Any = None, command: str = "", fuse_k: int | None = None, worker: str = "",
               check_stores: Any = None, checkpoint_uri: str | None = None) -> Session:
    """Check everything, then create or join the sweep's Optuna study and MLflow parent run.
    `fuse_k` None: `default_fuse_k` of the spec's device. `worker`: the label of this
    process's lines (default: host and pid)."""
    return open_session(spec, SWEEP, storage=storage, tracking=tracking, state=state, results_root=results_root,
                        n_trials=n_trials, sampler_seed=sampler_seed, data_root=data_root, command=command,
                        fuse_k=fuse_k, worker=worker, check_stores=check_stores, checkpoint_uri=checkpoint_uri)


def run_sweep(spec: StudySpec, *, workers: int = 1, final: bool = True, share_cores: bool = False,
              storage: str | None = None, tracking: str | None = None, state: Any = None,
              results_root: Any = "results", n_trials: int | None = None, sampler_seed: int | None = None,
              data_root: Any = None, command: str = "", fuse_k: int | None = None, executor: Any = "local",
              checkpoint_uri: str | None = None, timings: bool = False) -> tuple[Session, WorkerReport, Any]:
    """Open (or join) the sweep, train trials here (or in `workers` workers of `executor`),
    and finish it when this is the process that ends it. Returns (session, report,
    outcome); the outcome is None where another process writes the results, a Submitted
    where a Slurm executor without `wait` only submitted the workers. `share_cores`,
    `executor`, `checkpoint_uri` and `timings`: as for a study (study.run_study)."""
    timer = Timed(timings)
    workers = notebook_workers(f"sweep {spec.name}", networks(spec), workers) or 1
    # on the CPU the workers share the cores: N workers with every core each spend their
    # time waiting for each other's threads (measured: 6x slower for LeNet with 2 on 2)
    on_cpu = resolve_device(spec.base_config().device).type == "cpu"
    runner = prepare(executor, threads=max(1, usable_cores() // workers) if on_cpu else None, share_cores=share_cores)
    session = open_sweep(spec, storage=storage, tracking=tracking, state=state, results_root=results_root,
                         n_trials=n_trials, sampler_seed=sampler_seed, data_root=data_root, command=command,
                         fuse_k=fuse_k, check_stores=runner.check_stores, checkpoint_uri=checkpoint_uri)
    with leading(session):
        say_engine(session, True)
        if detached(runner):  # Slurm's --no-wait: the tasks train, the one that ends the sweep finishes it
            return session, WorkerReport(), runner.submit(session, workers, final=finalize if final else None)
        if workers > 1 or not isinstance(runner, LocalPlan):
            with phase("workers/start, then wait for them"):
                report = supervise(session, runner.for_workers(workers), workers)
        else:
            report = work(session)
        if report.stopped:
            with interrupt.shielded():
                pause_parent(session, "FAILED", f"sweep {spec.name}: {report.stopped}")
            return session, report, None
        outcome = finalize(session) if final else None
        if outcome is not None:
            outcome.timings = timer.report(session.tracker, session.parent, f"sweep {spec.name}")
        return session, report, outcome
