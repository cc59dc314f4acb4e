"""Opening a study or sweep: check everything, then create or join its Optuna study and
its MLflow parent run.

The first process creates them; later ones, here or on other machines, join: the
study's user attributes hold the parent run's id (`mark_ready`, `join`). Bad input fails
in the preflight, before anything is created; a Ctrl-C while the parent run is being
created leaves it created and recorded, or not created.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

from cnnbench.config.spec import StudySpec
from cnnbench.config.trial import TrialConfig
from cnnbench.errors import ConfigError, StorageError
from cnnbench.run import storage as optuna_store
from cnnbench.run.checkpoint_share import CheckpointShare
from cnnbench.run.claims import lost
from cnnbench.run.owner import ResultsOwner
from cnnbench.run.session import Kind, Session
from cnnbench.track import stores
from cnnbench.track.schema import (
    STUDY_EXPERIMENT,
    STUDY_KIND,
    STUDY_PARENT_RUN_ID,
    STUDY_READY,
    STUDY_SPEC,
    STUDY_TRACKING_URI,
    worker_name,
)
from cnnbench.track.writer import Tracker, check_reachable, tracking_uri
from cnnbench.train.device import check_inputs, resolve_device
from cnnbench.util import fileio, interrupt, processes, timings
from cnnbench.util.paths import state_dir
from cnnbench.util.text import masked


def preflight(spec: StudySpec, configs: list[TrialConfig], *, url: str, uri: str, data_root: Any, out_dir: Path,
              paths: list[Path]) -> None:
    """Everything that can be checked before anything is created: storage, device, data,
    results folder, tracking store, and that the file system can hold the names of
    `paths` (the files the study will write). Bad input fails here and writes nothing."""
    for path in paths:
        part = fileio.too_long(path)
        if part is not None:
            raise ConfigError(f"{spec.path}: name: {spec.name!r} is too long for the file system here ({path.parent}"
                              f" cannot hold the {len(os.fsencode(part))}-byte name {part[:40]!r}...)")
    optuna_store.check(url)
    with timings.phase("start/device ready"):
        for device in sorted({c.device for c in configs}):
            resolve_device(device)
    check_inputs(configs, data_root)  # devices (ready above), data, the user's networks on a batch
    fileio.check_writable(out_dir)
    with timings.phase("session/tracking store"):
        check_reachable(uri)  # workers started together on a fresh store: see stores.py


def open_session(spec: StudySpec, kind: Kind, *, plan: Any = None, storage: str | None = None,
                 tracking: str | None = None, state: Any = None, results_root: Any = "results",
                 n_trials: int | None = None, sampler_seed: int | None = None, data_root: Any = None,
                 command: str = "", worker: str = "", fuse_k: int | None = None,
                 wide_only: bool = False, engine: str | None = None, checked: bool = False, role: str = "lead",
                 supervisor: str | None = None, slot: str | None = None, share_checkpoints: bool = False,
                 checkpoint_uri: str | None = None, check_stores: Callable[[str, str], None] | None = None,
                 executor: str = "local", node: str = "") -> Session:
    """Check everything, then create or join the study's (or sweep's) Optuna study and
    MLflow parent run. `checked`: a worker process whose parent checked the same input
    (`preflight`) a moment ago. `role`: "lead", the process that leads an execution (it
    holds the results folder's lock and keeps the parent run going); "worker", a worker
    started by itself (`cnnbench worker`: it keeps the parent run going); "supervised", a
    worker that `supervisor` started and watches (run/pool.py) under the name `slot`.
    `share_checkpoints`: every epoch's resume checkpoint also goes where any node reads it,
    `checkpoint_uri` or else the trial's MLflow run (checkpoint_share.py). `check_stores(url,
    uri)`: the executor's refusal of stores its workers cannot reach, before anything is created.
    `executor`, `node`: what started it and where, for its runs' tags. `engine`: see Session."""
    stores.quiet_mlflow()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    open_args = dict(plan=plan, storage=storage, tracking=tracking, state=state, results_root=results_root,
                     n_trials=n_trials, sampler_seed=sampler_seed, data_root=data_root, command=command, fuse_k=fuse_k,
                     wide_only=wide_only, engine=engine, share_checkpoints=share_checkpoints, checkpoint_uri=checkpoint_uri)
    root = state_dir(state)
    url = storage or stores.default_url(spec.name, root)
    uri = tracking_uri(tracking)
    open_args.update(storage=url, tracking=uri)  # a worker on another node joins these, not its own defaults
    out_dir = Path(results_root) / spec.name
    if check_stores is not None:
        check_stores(url, uri)
    owner = checked_and_owned(spec, kind, plan, url=url, uri=uri, root=root, out_dir=out_dir, data_root=data_root,
                              lead=role == "lead", checked=checked)
    holder: dict[str, Session] = {}
    with timings.phase("session/optuna storage and study"):
        store = optuna_store.open_storage(url, lambda study, trial: lost(holder["session"], trial))
        opened = kind.create(spec, plan=plan, store=store, uri=uri, n_trials=n_trials, sampler_seed=sampler_seed,
                             fuse_k=fuse_k)
    with timings.phase("session/tracking store"):
        tracker = Tracker(spec.name, uri)
    session = Session(spec=spec, kind=kind, url=url, storage=store, study=opened.study,
                      lock=optuna_store.ClaimLock(url, opened.study.study_name), tracker=tracker,
                      parent="", target=opened.target, out_dir=out_dir, ckpt_root=root / "checkpoints" / spec.name,
                      data_root=data_root, command=command, worker=worker or worker_name(optuna_store.identity()),
                      grid_size=opened.grid_size, fuse_k=opened.fuse_k, wide_only=wide_only, engine=engine,
                      configs=opened.configs, plan=plan, open_args=open_args, supervisor=supervisor, slot=slot,
                      owner=owner, role=role, executor=executor, node=node or processes.host())
    if share_checkpoints or checkpoint_uri:
        session.share = CheckpointShare(session.tracker, checkpoint_uri)
    holder["session"] = session
    try:
        with timings.phase("session/queue, parent run, orphans"):
            start_or_join(session, lead=role != "supervised")
    except BaseException:
        session.close()
        raise
    return session


def checked_and_owned(spec: StudySpec, kind: Kind, plan: Any, *, url: str, uri: str, root: Path, out_dir: Path,
                      data_root: Any, lead: bool, checked: bool) -> ResultsOwner | None:
    """The preflight (unless `checked`), then the results folder's lock for the process that
    leads an execution: held (returned), joined (None: the same execution holds it), or
    refused (ConfigError: another execution's)."""
    configs = [] if checked else kind.configs_to_check(spec, plan)  # a spec that is not of this kind: refused first
    name, execution = kind.execution(spec, plan, uri=uri, url=url)
    owner = ResultsOwner(out_dir, execution, f"{kind.name} {spec.name}") if lead else None
    if not checked:
        lock_file = optuna_store.ClaimLock(url, name).file
        with timings.phase("session/preflight"):
            preflight(spec, configs, url=url, uri=uri, data_root=data_root, out_dir=out_dir,
                      paths=[out_dir / "summary.csv", root / "checkpoints" / spec.name / "x"]
                      + ([owner.path] if owner else []) + ([lock_file] if lock_file else []))
    if owner is not None and not owner.take():
        return None  # the same execution holds it: this process joins it
    return owner


def start_or_join(session: Session, *, lead: bool = True) -> None:
    """The parent run created (or joined) under the claim lock, and the runs that dead
    processes left RUNNING closed."""
    kind = session.kind
    try:
        with interrupt.shielded():  # the parent run is created and recorded, or not created
            with session.lock():
                session.parent = kind.initialise(session)
        if lead:  # this process keeps the execution going (a supervised worker leaves that to its supervisor)
            session.tracker.keep_alive(session.parent)
        # runs of this experiment whose process died (any execution, state folder or spec);
        # the current parent stays RUNNING while the study goes on, whoever created it
        session.tracker.close_orphans("the process running it died", keep=(session.parent,))
    except KeyboardInterrupt:
        if session.parent:
            with interrupt.shielded():
                pause_parent(session)
        raise


def pause_parent(session: Session, status: str = "KILLED", reason: str = "") -> None:
    """This process stops before the study's end (a stop request, a fault of the machine,
    workers that kept dying): the parent run ends with `status` and `reason`, unless
    trials still run elsewhere (those processes go on with it). Best effort: a store that
    cannot be written leaves it to the next execution (liveness.orphaned)."""
    with contextlib.suppress(Exception):
        if not session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if session.tracker.client.get_run(session.parent).info.status == "RUNNING":
                session.tracker.end(session.parent, status, reason)


@contextlib.contextmanager
def leading(session: Session) -> Iterator[Session]:
    """Within: this process leads the opened `session` (a study's or a sweep's). A stop
    request leaves the parent run KILLED and a fault of the machine (StorageError) FAILED
    with its reason (pause_parent), each raised on; the session is closed however it ends."""
    try:
        yield session
    except KeyboardInterrupt as err:
        with interrupt.shielded():
            pause_parent(session, reason=f"stopped by {err}")
        raise
    except StorageError as err:
        with interrupt.shielded():
            pause_parent(session, "FAILED", str(err))
        raise
    finally:
        session.close()


class ParentLost(ConfigError):
    """The tracking store the study was started with no longer holds its parent run: the
    MLflow store was deleted or replaced while the state folder (the Optuna study) stayed."""


def join(session: Session) -> str | None:
    """A later process: the parent run that the first one recorded (None: it is the first).
    ConfigError when this process uses another tracking store; ParentLost when the same
    store no longer holds the parent."""
    attrs = session.study.user_attrs
    if not attrs.get(STUDY_READY):
        return None
    parent = attrs[STUDY_PARENT_RUN_ID]
    try:
        session.tracker.client.get_run(parent)
    except Exception:
        started_with = attrs.get(STUDY_TRACKING_URI)
        if started_with == masked(session.tracker.uri):
            where = optuna_store.sqlite_path(session.url)
            raise ParentLost(f"MLflow tracking URI {masked(session.tracker.uri)} no longer holds this "
                             f"{session.kind.name}'s parent run {parent} (was the store deleted?), so the "
                             f"{session.kind.name}'s Optuna record in {masked(session.url)} refers to runs that are "
                             f"gone; remove {where or 'that Optuna study'} (or give another --storage) to start "
                             "again") from None
        raise ConfigError(f"MLflow tracking URI {session.tracker.uri} does not hold this {session.kind.name}'s "
                          f"parent run {parent}; every worker must use the tracking store it was started with "
                          f"({started_with})") from None
    return parent


def reopen(session: Session, parent: str) -> None:
    """The study goes on: its parent run shows RUNNING again."""
    if session.tracker.client.get_run(parent).info.status != "RUNNING":
        session.tracker.client.update_run(parent, status="RUNNING")


def mark_ready(session: Session, parent: str, extra: dict[str, Any]) -> None:
    """The study is set up: later processes join `parent`."""
    for key, value in {STUDY_PARENT_RUN_ID: parent, STUDY_EXPERIMENT: session.spec.name,
                       STUDY_TRACKING_URI: masked(session.tracker.uri), STUDY_SPEC: session.spec.path,
                       STUDY_KIND: session.kind.name, **extra, STUDY_READY: True}.items():
        session.study.set_user_attr(key, value)
