"""Claims on a shared study: who trains which trial, what happens to the trials of a lost
worker, and which process writes the results.

Everything here that decides runs under the session's claim lock (run/storage.py), so
that no two processes, here or on other machines, decide at once:

- `claim`: recover the trials of lost workers, count, and take the next trials to train:
  one, or a group of up to K that train fused, claimed as one unit (batched
  ask-and-tell). Every trial carries its worker's identity and a heartbeat from the start;
- `recover` / `lost`: a trial whose worker is gone (a dead process here, a stale heartbeat
  elsewhere) is failed, its MLflow run closed, and the same trial queued again (`requeue`),
  unless its outcome was already recorded in MLflow (`recorded`);
- `claim_results`: exactly one process writes the results, the one that ends the study.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import optuna
from optuna.trial import TrialState, create_trial

from cnnbench.run import storage as optuna_store
from cnnbench.run.session import Outcome, Session, count_states, trial_id
from cnnbench.track.schema import (
    ATTR_MLFLOW_RUN_ID,
    ATTR_REASON,
    ATTR_STATUS,
    ATTR_WORKER_BOOT,
    ATTR_WORKER_HOST,
    ATTR_WORKER_DEATHS,
    ATTR_WORKER_PID,
    ATTR_WORKER_SLOT,
    ATTR_WORKER_SUPERVISOR,
    CLAIM_DONE,
    CLAIM_FINGERPRINT,
    CLAIM_SINCE,
    METRIC_OPTUNA_VALUE,
    STUDY_FINAL_CLAIM,
    TAG_REASON,
    TAG_STATE,
    TAG_STATUS,
    worker_name,
)
from cnnbench.train.result import DIVERGED, FINISHED, INTERRUPTED, PRUNED

MAX_RETRY = 3  # a trial whose worker is lost this many times is given up


# ----------------------------------------------------------------------------------------
# taking trials


def claim(session: Session, k: int) -> tuple[list[Any], dict[str, int]]:
    """Under the claim lock: up to `k` trials to train (a fused group is claimed as a unit),
    none when the target is reached or the remaining trials run elsewhere.

    Batched ask-and-tell: each trial is asked and set up (a sweep's suggestions,
    `Kind.claimed`) before the next is asked, so that TPE's constant liar sees the running
    ones and K asks are K different points; queued trials (retries, grid points, a study's
    runs) come first, in order. Every trial carries this worker's identity and a heartbeat
    from the start, so that a worker killed mid-group leaves all of them to be recovered."""
    recover(session)
    trials = session.study.get_trials(deepcopy=False)
    counts = count_states(trials)
    # never more than the target, every grid point taken once, a fused group as a unit
    room = min(session.room(counts), session.kind.room(session, trials, k))
    me = {**optuna_store.identity(), ATTR_MLFLOW_RUN_ID: "",
          **({ATTR_WORKER_SUPERVISOR: session.supervisor, ATTR_WORKER_SLOT: session.slot} if session.supervisor else {})}
    batch = []
    for _ in range(max(0, min(k, room))):
        with optuna_store.quiet():  # "heartbeat is meant for optimize()": we beat ourselves
            trial = session.study.ask()
        for key, value in me.items():
            trial.set_user_attr(key, value)
        session.storage.record_heartbeat(trial_id(trial))  # a lost worker is visible from the start
        session.kind.claimed(session, trial)
        batch.append(trial)
    return batch, counts


# ----------------------------------------------------------------------------------------
# telling outcomes, failing and queueing again


def tell(session: Session, trial: Any, run_id: str | None, outcome: Outcome, reason: str = "") -> None:
    """Tell Optuna a trial's outcome (with its user attributes) and tag its MLflow run."""
    for key, value in outcome.attrs.items():
        trial.set_user_attr(key, value)
    if outcome.state == TrialState.FAIL and reason:
        trial.set_user_attr(ATTR_REASON, reason[:500])
    session.study.tell(trial, outcome.value if outcome.state == TrialState.COMPLETE else None, state=outcome.state)
    if run_id:  # None: a member of a batch that never started
        with contextlib.suppress(Exception):  # the run's own record is complete without these tags
            session.tracker.client.set_tag(run_id, TAG_STATE, outcome.state.name)
            if outcome.value is not None and outcome.state == TrialState.COMPLETE:
                session.tracker.client.log_metric(run_id, METRIC_OPTUNA_VALUE, float(outcome.value))


def failed(reason: str = "") -> Outcome:
    """The outcome of a trial that could not be trained."""
    return Outcome(TrialState.FAIL, None, math.nan, {ATTR_REASON: reason[:500]} if reason else {})


def requeue(session: Session, trial: Any) -> None:
    """A failed trial queued again with the same parameters (Optuna's retry callback: at
    most MAX_RETRY times; a sweep's retried trial resumes from the checkpoints of the one it
    repeats)."""
    with optuna_store.quiet():
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
            session.study, session.storage.get_trial(trial_id(trial)))


def interrupted(session: Session, trial: Any, reason: str = "interrupted (Ctrl-C)") -> None:
    """A trial stopped before its end (Ctrl-C): failed and queued again, so that the next
    execution resumes it from its checkpoints; its MLflow run, if it has one, KILLED."""
    frozen = session.storage.get_trial(trial_id(trial))
    if frozen.state != TrialState.RUNNING:
        return
    trial.set_user_attr(ATTR_REASON, reason)
    session.study.tell(trial, state=TrialState.FAIL)
    # stopped after its MLflow run had ended whole (finished: result.json and all) but before
    # Optuna was told: its outcome is recorded, so it is not trained again
    if recorded(session, session.storage.get_trial(trial_id(trial))):
        return
    kill_run(session, frozen.user_attrs.get(ATTR_MLFLOW_RUN_ID))
    requeue(session, trial)


def kill_run(session: Session, run_id: str | None, why: str | None = None) -> None:
    """A failed trial's MLflow run: KILLED if it was still RUNNING (with `why`), and
    tagged FAIL. Best effort: the Optuna record is what counts."""
    if not run_id:
        return
    client = session.tracker.client
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, TAG_STATUS, INTERRUPTED)
            if why:
                client.set_tag(run_id, TAG_REASON, why)
            client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, TAG_STATE, "FAIL")


# ----------------------------------------------------------------------------------------
# lost workers


def recover(session: Session) -> None:
    """Under the claim lock: fail and requeue the running trials of lost workers."""
    with optuna_store.quiet():
        optuna.storages.fail_stale_trials(session.study)  # other machines: by heartbeat
    for t in session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # a trial is taken under this lock with its worker's identity: one without it was
        # taken by a worker that died before it could say who it was
        taken = ATTR_WORKER_PID in t.user_attrs
        if taken and not optuna_store.dead_here(t.user_attrs):  # this machine: the process is gone
            continue
        if taken and optuna_store.watched_here(t.user_attrs):  # its supervisor recovers it (worker_died)
            continue
        try:
            changed = session.storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if changed:
            lost(session, session.storage.get_trial(trial_id(t)),
                 f"its process {worker_name(t.user_attrs)} is gone" if taken else "its worker died while taking it")


MAX_WORKER_DEATHS = 2  # a trial under which this many workers died (their supervisor alive) fails for good


def worker_died(session: Session, slot: str, why: str, *, count: bool = True) -> None:
    """Under the claim lock, in the process that started worker `slot` (run/pool.py) and saw
    it end: its running trials failed and queued again at once, not after the heartbeat's
    grace. With `count` (the worker died, it was not stopped), each death is counted on the
    trial, and one under which MAX_WORKER_DEATHS workers died fails for good with `why`
    (killed by signal 9, likely out of memory, say): a third try would die the same way."""
    me = optuna_store.process_id()
    for t in session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get(ATTR_WORKER_SUPERVISOR) != me or attrs.get(ATTR_WORKER_SLOT) != slot:
            continue
        deaths = int(attrs.get(ATTR_WORKER_DEATHS, 0)) + (1 if count else 0)
        given_up = deaths >= MAX_WORKER_DEATHS
        reason = f"its worker died {deaths} times under it, the last {why}" if given_up else f"its worker {why}"
        try:
            session.storage.set_trial_user_attr(trial_id(t), ATTR_WORKER_DEATHS, deaths)
            session.storage.set_trial_user_attr(trial_id(t), ATTR_REASON, reason[:500])
            if not session.storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        frozen = session.storage.get_trial(trial_id(t))
        if not given_up:
            lost(session, frozen, reason)
        elif not recorded(session, frozen):
            kill_run(session, attrs.get(ATTR_MLFLOW_RUN_ID), reason)
            session.say(f"[{session.worker}] trial {t.number} failed for good: {reason}")


def lost(session: Session, trial: Any, why: str = "") -> None:
    """A trial whose worker is gone (no heartbeat, or a dead process here), already failed:
    close its MLflow run and queue the same parameters again, unless its outcome is
    recorded (`recorded`)."""
    why = why or f"worker {worker_name(trial.user_attrs)} stopped beating for {optuna_store.GRACE_S} s"
    if recorded(session, trial):
        return
    kill_run(session, trial.user_attrs.get(ATTR_MLFLOW_RUN_ID), why)
    requeue(session, trial)
    session.say(f"[{session.worker}] trial {trial.number} lost ({why}); queued again")


def recorded(session: Session, trial: Any) -> bool:
    """A lost trial whose worker died after its MLflow run had ended (finished, diverged or
    pruned: result.json and all) but before Optuna was told: its outcome is in MLflow, so
    Optuna gets it (a trial with its params and outcome) instead of a retry that would
    train it twice. Returns whether it did."""
    run_id = trial.user_attrs.get(ATTR_MLFLOW_RUN_ID)
    if not run_id:
        return False
    try:
        run = session.tracker.client.get_run(run_id)
        status = run.data.tags.get(TAG_STATUS)
        if run.info.status not in ("FINISHED", "FAILED") or status not in (FINISHED, DIVERGED, PRUNED):
            return False
        result = session.tracker.load_result(run)
    except Exception:  # no such run, or no result.json: not recorded whole
        return False
    outcome = session.kind.outcome(session, result)
    if outcome.state == TrialState.FAIL:
        return False
    workers = (ATTR_WORKER_HOST, ATTR_WORKER_BOOT, ATTR_WORKER_PID)
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in workers}
    session.study.add_trial(create_trial(state=outcome.state, value=outcome.value, params=trial.params,
                                         distributions=trial.distributions,
                                         user_attrs={**attrs, ATTR_STATUS: status},
                                         intermediate_values=trial.intermediate_values))
    with contextlib.suppress(Exception):  # the run's own record is complete without it
        session.tracker.client.set_tag(run_id, TAG_STATE, outcome.state.name)
    session.say(f"[{session.worker}] trial {trial.number}: its worker died after recording it; "
                f"{outcome.state.name.lower()}")
    return True


# ----------------------------------------------------------------------------------------
# the end: exactly one process writes the results


def claim_results(session: Session, fingerprint: str) -> str | None:
    """Under the claim lock: become the one process that writes the results. Returns why
    not when another (live) one does, or did for the same trials (`fingerprint`)."""
    claim_ = session.study.user_attrs.get(STUDY_FINAL_CLAIM)
    me = optuna_store.identity()
    if claim_ and claim_.get(CLAIM_DONE) and claim_.get(CLAIM_FINGERPRINT) == fingerprint:
        return f"the results are up to date (written by {worker_name(claim_)}; also in MLflow run {session.parent})"
    if claim_ and not claim_.get(CLAIM_DONE):
        mine = {k: claim_.get(k) for k in me} == me
        if not mine and not optuna_store.dead_here(claim_):
            return f"worker {worker_name(claim_)} is writing the results"
    session.study.set_user_attr(STUDY_FINAL_CLAIM, {**me, CLAIM_DONE: False, CLAIM_SINCE: time.time()})
    return None


def results_written(session: Session, fingerprint: str) -> None:
    """The results of these trials are written: a later end with the same ones is not redone."""
    session.study.set_user_attr(STUDY_FINAL_CLAIM, {**optuna_store.identity(), CLAIM_DONE: True,
                                                    CLAIM_SINCE: time.time(), CLAIM_FINGERPRINT: fingerprint})


def results_written_for(session: Session, parent: str) -> bool:
    """Whether the execution of `parent` ended: its results are written."""
    claim_ = session.study.user_attrs.get(STUDY_FINAL_CLAIM) or {}
    return bool(claim_.get(CLAIM_DONE)) and str(claim_.get(CLAIM_FINGERPRINT, "")).startswith(f"{parent}|")
