"""Training a claimed batch of trials and telling each one's outcome.

One path whatever the batch's size: the claimed trials are split into groups that can
train fused (fused.group_key, and the epoch their checkpoints resume from), and each
group goes through `train_group`: one fused engine, or the SingleEngine for a lone trial.
On CUDA, groups that may (side_by_side.plan) train side by side, each on its own stream.
Every member stays its own trial: its own heartbeat, MLflow child run, pruning (only it
stops), checkpoints and outcome. An error fails every member not told yet with the
reason (a stop request and a fault of the machine are the worker loop's: it queues them
again).

A member's outcome is told to Optuna by the background writer (util/background.py), after
its MLflow run ended there, while the next group trains: whatever stops this process
(an error, a stop request, a fault of the machine) first lets the writer finish what it
was handed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any, Callable

from cnnbench.config.trial import TrialConfig
from cnnbench.errors import ConfigError, StorageError
from cnnbench.run import storage as optuna_store
from cnnbench.run.claims import failed, tell
from cnnbench.run.search import PruningRecorder
from cnnbench.run.session import Member, Outcome, Session, trial_id
from cnnbench.track import jobs, stores
from cnnbench.track.schema import EPOCH, TAG_CHECKPOINT, TAG_ENGINE, TAG_EXECUTOR, TAG_NODE, TAG_WORKER
from cnnbench.track.writer import run_name
from cnnbench.train import side_by_side
from cnnbench.train.device import resolve_device
from cnnbench.train.fused import engine_choice, fuse_groups, preferred_engine
from cnnbench.train.checkpoint import resume_epoch
from cnnbench.train.loop import load_data, train_group
from cnnbench.train.result import TrialResult
from cnnbench.util import interrupt
from cnnbench.util.background import writer
from cnnbench.util.faults import storage_fault


def train_claimed(session: Session, batch: list[Any], data_cache: dict[tuple, Any]) -> list[str]:
    """Train a claimed batch group by group; tell Optuna each member's outcome. Returns
    the states' names. Every member's heartbeat beats until the whole batch is done."""
    members: list[Member] = []
    states: list[str] = []
    for trial in batch:
        member = prepare(session, trial)
        if member is None:
            states.append("FAIL")
        else:
            members.append(member)
    try:
        with interrupt.kept(), contextlib.ExitStack() as beats:
            for m in members:
                beats.enter_context(optuna_store.Heartbeat(session.storage, trial_id(m.trial)))
            groups = fused_groups(members, session.fuse_k, wide_only=session.wide_only, root=session.data_root)
            for wave in waves(groups):
                states += train_wave(session, [groups[i] for i in wave], data_cache)
    except KeyboardInterrupt:  # the worker loop fails and queues again every member not told
        raise
    except BaseException as err:
        late = writer().settle()  # the outcomes handed over are told first
        if fault(err):
            raise  # the machine's fault, not the trials': the worker loop queues them again
        if late is not None and fault(late):
            raise late from err  # the writer met the machine's fault first: the same
        for m in members:
            if not m.told:
                tell(session, m.trial, m.run_id, failed(), f"{type(err).__name__}: {err}")
        raise
    return states


def fault(err: BaseException) -> bool:
    """Whether `err` is a fault of the machine (a full disk, a read-only folder ...)."""
    return isinstance(err, StorageError) or storage_fault(err) is not None


def prepare(session: Session, trial: Any) -> Member | None:
    """A claimed trial's settings, checkpoint folder and MLflow recorder; a combination of
    values that no trial can take fails the trial (None)."""
    try:
        config = session.config_of(trial)
    except ConfigError as err:
        tell(session, trial, None, failed(str(err)), str(err))
        session.say(f"[{session.worker}] trial {trial.number} failed: {err}")
        return None
    ckpt, name, tags = session.kind.run_of(session, trial, config)
    if session.share is not None:  # a retried trial resumes here from where another node left it
        session.share.fetch(ckpt)
    tags = {**tags, TAG_CHECKPOINT: ckpt.name, TAG_EXECUTOR: session.executor, TAG_NODE: session.node,
            TAG_WORKER: session.slot or session.worker}
    return Member(trial, config, ckpt, session.tracker.recorder(config, parent=session.parent, name=name, tags=tags))


def engine_line(session: Session, fuse: bool) -> str:
    """Which engine trains the trials, and why, per network: one line, said once per study
    or sweep and kept as its parent run's tag."""
    configs = list(session.configs.values()) or [session.spec.base_config()]
    models = {c.model: c for c in configs}
    if not fuse or session.fuse_k <= 1:
        why = "fusing off" if not fuse else "one trial per worker"
        return "; ".join(f"{m}: one trial at a time ({why})" for m in models)
    return "; ".join(engine_choice(c, wide_only=session.wide_only, root=session.data_root, preferred=session.engine)
                     for c in models.values())


def say_engine(session: Session, fuse: bool) -> None:
    line = engine_line(session, fuse)
    session.tracker.client.set_tag(session.parent, TAG_ENGINE, line[:5000])
    print(f"{session.kind.name} {session.spec.name}: engine {line}", flush=True)


def fused_groups(members: list[Member], max_k: int, *, wide_only: bool = False, root: Any = None) -> list[list[Member]]:
    """Members that can train as one FusedEngine together (fused.group_key), split by
    what breaks fusing (batch size, model, activation, epochs...) and by the epoch their
    checkpoints resume from (a group starts at one epoch); order kept, nothing dropped."""
    out = []
    for idx in fuse_groups([m.config for m in members], max_k=max_k, wide_only=wide_only, root=root):
        by_epoch: dict[int, list[Member]] = {}
        for i in idx:
            by_epoch.setdefault(resume_epoch(members[i].ckpt, members[i].config), []).append(members[i])
        out.extend(by_epoch.values())
    return out


def waves(groups: list[list[Member]]) -> list[list[int]]:
    """The groups' indices in waves that train side by side (on CUDA; side_by_side.plan)."""
    if not groups:
        return []
    device = resolve_device(groups[0][0].config.device)
    return side_by_side.plan([g[0].config for g in groups], device.type)


def train_wave(session: Session, groups: list[list[Member]], data_cache: dict[tuple, Any]) -> list[str]:
    """Groups that train side by side, each on its own CUDA stream (side_by_side.py), or one
    group alone. Returns the states' names, group by group."""
    if len(groups) == 1:
        return train_members(session, groups[0], data_cache)
    trial_data(session, groups[0][0].config, data_cache)  # loaded once, before the threads share it
    device = resolve_device(groups[0][0].config.device)
    tasks = [functools.partial(train_members, session, g, data_cache) for g in groups]
    session.say(f"[{session.worker}] {len(groups)} groups side by side on {device}")
    return [state for states in side_by_side.run_together(tasks, device) for state in states]


def train_members(session: Session, group: list[Member], data_cache: dict[tuple, Any],
                  wave: side_by_side.Wave | None = None) -> list[str]:
    """One group through train_group (a lone member: the SingleEngine), one PruningRecorder
    per member reporting to its own trial and MLflow run. A pruned or diverging member
    stops alone; the group ends when none is left; a group of a `wave` (side by side) also
    when the wave stops. Each outcome is handed to the background writer (`record`).
    Returns the states' names."""
    configs = [m.config for m in group]
    t0 = time.perf_counter()
    label = ", ".join(run_name(c, session.names) for c in configs)[:60]
    engine = preferred_engine(configs[0], session.engine, session.data_root) if len(configs) > 1 else None
    recorders = [recorder(session, m) for m in group]
    if wave is not None:
        recorders = [side_by_side.StopRecorder(r, wave) for r in recorders]
    results = train_group(configs, recorders=recorders,
                          checkpoint_dirs=[m.ckpt for m in group], evaluate_test=session.kind.evaluate_test,
                          data=trial_data(session, configs[0], data_cache), progress=label, engine=engine,
                          wait=False)
    states = []
    for m, result in zip(group, results):
        outcome = session.kind.outcome(session, result)
        fused = f" (fused with {result.fused_with - 1} other(s))" if result.fused_with > 1 else ""
        took = f"after {len(result.history)} epoch(s), {time.perf_counter() - t0:.1f} s{fused}"
        with interrupt.shielded():  # under CNNBENCH_SYNC_BOOKKEEPING the outcome is told here, whole
            record(session, m, result, outcome, took)
        states.append(outcome.state.name)
    return states


def record(session: Session, member: Member, result: TrialResult, outcome: Outcome, took: str) -> None:
    """A member's outcome handed to the background writer: told to Optuna (with its MLflow
    run's tags) after its run ended, then to the person watching."""
    tell_job = functools.partial(jobs.tell, stores.absolute(session.url), session.study.study_name,
                                 stores.absolute(session.tracker.uri), trial_id(member.trial), member.trial.number,
                                 member.run_id, outcome.state, outcome.value, outcome.attrs, result.reason)
    writer().submit(tell_job, "optuna outcomes", remote=True)
    writer().submit(functools.partial(ended, session, member, result, outcome, took), "optuna outcomes", ordered=True)


def ended(session: Session, member: Member, result: TrialResult, outcome: Outcome, took: str) -> None:
    member.told = True
    session.kind.ended(session, member, result, outcome, took)


def recorder(session: Session, member: Member) -> PruningRecorder:
    """The member's MLflow recorder, wrapped: the run id to Optuna, a sweep's score each
    epoch (which may prune it), and each epoch to the progress board."""
    share = session.share
    return PruningRecorder(member.inner, member.trial, session.metric,
                           on_epoch=epoch_events(session, member),
                           on_log=session.cores.adjust if session.cores is not None else None,
                           on_checkpoint=(lambda path, epoch: share.put(member.run_id, path.parent)) if share else None)


def epoch_events(session: Session, member: Member) -> Callable[[dict[str, float]], None] | None:
    """Each epoch of a trial as an event for the parent's progress board (worker processes)."""
    if session.events is None:
        return None
    label = session.kind.label(session, member.trial, member.config)
    metric = session.kind.board_metric(session.spec)
    events, worker, epochs = session.events, session.worker, member.config.epochs

    def send(record: dict[str, float]) -> None:
        events.put(("epoch", worker, label, int(record[EPOCH]), epochs, metric, float(record.get(metric, math.nan))))

    return send


def trial_data(session: Session, config: TrialConfig, cache: dict[tuple, Any]) -> Any:
    """The data set of `config` on its device, loaded once per worker (one at a time)."""
    c = config
    key = (c.dataset, c.normalize, c.train_subset, c.test_subset, c.val_size, c.channels_last, c.device)
    if key not in cache:
        cache.clear()  # one data set on the device at a time
        cache[key] = load_data(c, session.data_root, resolve_device(c.device))
    return cache[key]
