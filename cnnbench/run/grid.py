"""A grid study as the engine sees it (`GRID`, a `session.Kind`): its trials are the
plan's runs (values x seeds, `config.space.plan`), each queued once with its key, those of
one fused group side by side; the sampler is never asked and nothing is pruned.

An execution of a study is one MLflow parent run. The first process of an execution
queues every planned run not finished yet (one that MLflow holds finished, from an
earlier execution or another state folder, is added as complete and not trained again)
and creates the parent run; processes that come while the execution goes on join it.
Once an execution has written its results, the next command is a new execution: a new
parent run, and the runs that failed are queued again.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState, create_trial

from cnnbench.config.space import Plan
from cnnbench.config.spec import StudySpec
from cnnbench.config.trial import TrialConfig
from cnnbench.errors import ConfigError
from cnnbench.run.claims import results_written_for
from cnnbench.run.opening import ParentLost, join, mark_ready, reopen
from cnnbench.run.storage import dead_here
from cnnbench.run.session import Kind, Member, Opened, Outcome, Session
from cnnbench.track.schema import (
    ATTR_FUSED_WITH,
    ATTR_KEY,
    ATTR_MLFLOW_RUN_ID,
    ATTR_REASON,
    ATTR_REUSED,
    ATTR_SEED,
    ATTR_STATUS,
    ATTR_TRAIN_SECONDS,
    PARAM_RUNS,
    PARAM_SEEDS,
    PARAM_TRIALS,
    PREFIX_FIXED,
    PREFIX_NUISANCE,
    PREFIX_SCIENTIFIC,
    TAG_COMMAND,
    TAG_FUSE,
    TAG_FUSE_K,
    TAG_NUISANCE,
    TAG_OPTUNA_STORAGE,
    TAG_OPTUNA_STUDY,
    TAG_SCIENTIFIC,
    TAG_SPEC,
    TAG_STATUS,
    TAG_TRIAL,
    TAG_TRIAL_THREADS,
    TEST_ACC,
)
from cnnbench.track.writer import run_name
from cnnbench.train.fused import fusable, group_key
from cnnbench.train.result import DIVERGED, FINISHED, TrialResult
from cnnbench.util.text import fmt, masked


def study_name(spec: StudySpec, plan: Plan, uri: str) -> str:
    """A grid study's Optuna study: one per spec, planned runs and tracking store, so that
    the same command on several machines joins one study, and a study run with other
    `--set` values or seeds (or into another MLflow store) is its own."""
    identity = json.dumps({"runs": [c.key() for c in plan.runs], "tracking": masked(uri)}, sort_keys=True)
    return f"{spec.name}.{hashlib.sha1(identity.encode()).hexdigest()[:10]}"


class GridStudy(Kind):
    name = "study"
    evaluate_test = True

    # -- opening ------------------------------------------------------------------------------

    def configs_to_check(self, spec: StudySpec, plan: Plan | None) -> list[TrialConfig]:
        assert plan is not None
        return plan.runs

    def execution(self, spec: StudySpec, plan: Plan | None, *, uri: str, url: str) -> tuple[str, str]:
        assert plan is not None
        name = study_name(spec, plan, uri)
        return name, f"{name} in {masked(url)}"

    def create(self, spec: StudySpec, *, plan: Plan | None, store: Any, uri: str, n_trials: int | None,
               sampler_seed: int | None, fuse_k: int | None) -> Opened:
        assert plan is not None
        # every trial is queued: the sampler is never asked, and nothing is pruned
        study = optuna.create_study(storage=store, study_name=study_name(spec, plan, uri), direction="maximize",
                                    sampler=optuna.samplers.RandomSampler(seed=0),
                                    pruner=optuna.pruners.NopPruner(), load_if_exists=True)
        # trials that fuse side by side, seed by seed: on the CPU a group trains a seed's
        # trials together (streams.stream_blocks), and a worker claims the next in the queue
        runs = sorted(plan.runs, key=lambda c: (repr(group_key(c)), c.seed))
        by_key = {c.key(): c for c in runs}
        return Opened(study, len(by_key), len(by_key), by_key, fuse_k or 1)

    def initialise(self, session: Session) -> str:
        try:
            parent = join(session)
        except ParentLost:  # MLflow is the record: what it no longer holds is trained again
            parent = None
            self.start_over(session)
        study = session.study
        trials = study.get_trials(deepcopy=False)
        complete = {t.user_attrs.get(ATTR_KEY) for t in trials if t.state == TrialState.COMPLETE}
        if parent is not None and not results_written_for(session, parent):
            session.skipped = len(complete & set(session.configs))
            reopen(session, parent)  # the execution goes on
            return parent
        if parent is not None and session.role != "lead":
            # a worker started after the execution ended (a Job's pod restarted late, say):
            # nothing is left to it, and the execution stays as it ended (no second parent run)
            session.skipped = len(complete & set(session.configs))
            return parent
        if parent is not None:  # a new execution of a study whose runs are all in the storage
            busy = {t.user_attrs.get(ATTR_KEY) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
            for key in session.configs:
                if key not in complete and key not in busy:  # failed before: tried again
                    enqueue(session, key)
            session.skipped = len(complete & set(session.configs))
        else:
            session.skipped = queue_or_reuse(session)
        parent = start_parent(session)
        mark_ready(session, parent, {})
        return parent

    def start_over(self, session: Session) -> None:
        """Under the claim lock: the Optuna study deleted and created anew, when the MLflow
        store it refers to lost its runs (refused while a trial of it still runs)."""
        running = session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if any(not dead_here(t.user_attrs) for t in running):
            raise ConfigError(f"{session.spec.path}: the MLflow store lost study {session.spec.name}'s parent run, "
                              f"but {len(running)} of its trials still run; stop them first")
        assert session.plan is not None
        optuna.delete_study(study_name=session.study.study_name, storage=session.storage)
        session.study = self.create(session.spec, plan=session.plan, store=session.storage, uri=session.tracker.uri,
                                    n_trials=None, sampler_seed=None, fuse_k=session.fuse_k).study

    # -- claiming -------------------------------------------------------------------------------

    def room(self, session: Session, trials: list[Any], k: int) -> int:
        """How many of the queued trials (taken in queue order) make one fused group with
        the first: the same group key, each fusable (one that is not trains alone)."""
        waiting = [t for t in sorted(trials, key=lambda t: t.number) if t.state == TrialState.WAITING]
        configs = [session.configs.get(t.user_attrs.get(ATTR_KEY, "")) for t in waiting]
        root = session.data_root
        if not configs or configs[0] is None or k <= 1 or not fusable(configs[0], wide_only=session.wide_only,
                                                                       root=root):
            return 1
        first, n = group_key(configs[0]), 1
        for c in configs[1:k]:
            if c is None or group_key(c) != first or not fusable(c, wide_only=session.wide_only, root=root):
                break
            n += 1
        return n

    # -- a trial --------------------------------------------------------------------------------

    def names(self, spec: StudySpec) -> list[str]:
        return list(spec.varied)

    def config_of(self, session: Session, trial: Any) -> TrialConfig:
        return session.configs[trial.user_attrs[ATTR_KEY]]

    def label(self, session: Session, trial: Any, config: TrialConfig) -> str:
        return run_name(config, session.names)

    def run_of(self, session: Session, trial: Any, config: TrialConfig) -> tuple[Path, str, dict[str, str]]:
        """A study's run resumes from the checkpoints of its key."""
        spec = session.spec
        tags = {TAG_SCIENTIFIC: ",".join(spec.scientific), TAG_TRIAL: str(trial.number),
                TAG_OPTUNA_STUDY: session.study.study_name,
                **{f"{PREFIX_SCIENTIFIC}{k}": fmt(getattr(config, k)) for k in spec.scientific},
                **{f"{PREFIX_NUISANCE}{k}": fmt(getattr(config, k)) for k in spec.nuisance},
                TAG_TRIAL_THREADS: str(session.threads or "")}
        return session.ckpt_root / config.key(), run_name(config, session.names), tags

    def outcome(self, session: Session, result: TrialResult) -> Outcome:
        """A diverged run is an outcome too (it is not trained again); its value is 0."""
        acc = result.metric(TEST_ACC)
        value = acc if math.isfinite(acc) else 0.0
        state = TrialState.COMPLETE if result.status in (FINISHED, DIVERGED) else TrialState.FAIL
        attrs = {ATTR_STATUS: result.status, ATTR_TRAIN_SECONDS: round(result.train_seconds, 3),
                 ATTR_REASON: result.reason[:500], ATTR_FUSED_WITH: result.fused_with}
        return Outcome(state, value if state == TrialState.COMPLETE else None, value, attrs)

    def ended(self, session: Session, member: Member, result: TrialResult, outcome: Outcome, took: str) -> None:
        cores, run_id = session.cores, member.run_id
        if cores is not None and session.threads and run_id and cores.current != session.threads:
            # it took the cores of workers that ended before it: "1-2" (started with 1, ended with 2)
            session.tracker.client.set_tag(run_id, TAG_TRIAL_THREADS, f"{session.threads}-{cores.current}")
        label = run_name(member.config, session.names)
        acc = result.metric(TEST_ACC)
        value_text = f"test acc {acc:.2f}%" if math.isfinite(acc) else result.status
        session.say(f"[{session.worker}] {label}: {result.status}, {value_text} {took}", ended=label)

    def done_at_start(self, session: Session) -> int:
        return session.skipped


GRID = GridStudy()


def enqueue(session: Session, key: str) -> None:
    """A planned run queued as a trial, with its key, its varied values and its seed."""
    config = session.configs[key]
    session.study.enqueue_trial({}, user_attrs={ATTR_KEY: key, **{n: fmt(getattr(config, n)) for n in session.names},
                                                ATTR_SEED: config.seed})


def queue_or_reuse(session: Session) -> int:
    """The first execution in this storage: every planned run queued, except those MLflow
    holds finished (an earlier execution trained them), added as complete trials. Returns
    how many were reused."""
    done = session.tracker.finished_trials()
    reused = 0
    for key in session.configs:
        if key not in done:
            enqueue(session, key)
            continue
        run = done[key]
        acc = run.data.metrics.get(TEST_ACC)
        session.study.add_trial(create_trial(
            state=TrialState.COMPLETE, value=acc if acc is not None and math.isfinite(acc) else 0.0,
            user_attrs={ATTR_KEY: key, ATTR_MLFLOW_RUN_ID: run.info.run_id,
                        ATTR_STATUS: run.data.tags.get(TAG_STATUS, ""), ATTR_REUSED: True}))
        reused += 1
    return reused


def start_parent(session: Session) -> str:
    """An execution's MLflow parent run, with the spec as its artifact."""
    spec, plan = session.spec, session.plan
    assert plan is not None
    parent = session.tracker.start_parent(
        f"{spec.name} ({len(plan.trials)} trials)", kind=GRID.name,
        tags={TAG_SCIENTIFIC: ",".join(spec.scientific), TAG_NUISANCE: ",".join(spec.nuisance),
              TAG_SPEC: spec.path, TAG_COMMAND: session.command[:500],
              TAG_FUSE: str(session.fuse_k > 1), TAG_FUSE_K: str(session.fuse_k),
              TAG_OPTUNA_STUDY: session.study.study_name, TAG_OPTUNA_STORAGE: masked(session.url)},
        params={**{f"{PREFIX_FIXED}{k}": v for k, v in spec.fixed.items()},
                **{f"{PREFIX_SCIENTIFIC}{k}": list(v) for k, v in spec.scientific.items()},
                **{f"{PREFIX_NUISANCE}{k}": list(v) for k, v in spec.nuisance.items()},
                PARAM_SEEDS: list(spec.seeds), PARAM_TRIALS: len(plan.trials), PARAM_RUNS: len(plan.runs)},
        note=spec.description)
    session.tracker.log_artifacts(parent, [Path(spec.path)], "spec")
    return parent
