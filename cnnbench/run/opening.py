"""Opening a study or sweep: check everything, then create or join its Optuna study and
its MLflow parent run.

The first process creates them; later ones, here or on other machines, join: the
study's user attributes hold the parent run's id (`mark_ready`, `join`). Bad input fails
in the preflight, before anything is created; a Ctrl-C while the parent run is being
created leaves it created and recorded, or not created.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cnnbench.config.spec import ConfigError, StudySpec, TrialConfig
from cnnbench.data.tensors import data_dir, load_arrays
from cnnbench.run import storage as optuna_store
from cnnbench.run.claims import lost
from cnnbench.run.session import Kind, Session
from cnnbench.track import stores
from cnnbench.track.schema import (
    MLFLOW_PARENT_RUN_ID,
    STUDY_EXPERIMENT,
    STUDY_KIND,
    STUDY_PARENT_RUN_ID,
    STUDY_READY,
    STUDY_SPEC,
    STUDY_TRACKING_URI,
    TAG_KIND,
    worker_name,
)
from cnnbench.track.writer import Tracker, check_reachable, quiet_mlflow, tracking_uri
from cnnbench.train.device import resolve_device
from cnnbench.util import fileio, interrupt
from cnnbench.util.paths import state_dir
from cnnbench.util.text import masked


def preflight(configs: list[TrialConfig], *, url: str, uri: str, data_root: Any, out_dir: Path) -> None:
    """Everything that can be checked before anything is created: storage, device, data,
    results folder, tracking store. Bad input fails here and writes nothing."""
    optuna_store.check(url)
    for device in sorted({c.device for c in configs}):
        resolve_device(device)
    for dataset in sorted({c.dataset for c in configs}):
        load_arrays(dataset, data_dir(data_root))
    fileio.check_writable(out_dir)
    check_reachable(uri)  # workers started together on a fresh store: see stores.py


def open_session(spec: StudySpec, kind: Kind, *, plan: Any = None, storage: str | None = None,
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
    configs = kind.configs_to_check(spec, plan)
    if not checked:
        preflight(configs, url=url, uri=uri, data_root=data_root, out_dir=out_dir)

    holder: dict[str, Session] = {}
    store = optuna_store.open_storage(url, lambda study, trial: lost(holder["session"], trial))
    opened = kind.create(spec, plan=plan, store=store, uri=uri, n_trials=n_trials, sampler_seed=sampler_seed,
                         fuse_k=fuse_k)
    session = Session(spec=spec, kind=kind, url=url, storage=store, study=opened.study,
                      lock=optuna_store.ClaimLock(url, opened.study.study_name), tracker=Tracker(spec.name, uri),
                      parent="", target=opened.target, out_dir=out_dir, ckpt_root=root / "checkpoints" / spec.name,
                      data_root=data_root, command=command, worker=worker or worker_name(optuna_store.identity()),
                      grid_size=opened.grid_size, fuse_k=opened.fuse_k, wide_only=wide_only, configs=opened.configs,
                      plan=plan, open_args=open_args)
    holder["session"] = session
    start_or_join(session)
    return session


def start_or_join(session: Session) -> None:
    """The parent run created (or joined) under the claim lock, and the runs that dead
    processes left RUNNING closed."""
    kind = session.kind
    try:
        with interrupt.shielded():  # the parent run is created and recorded, or not created
            with session.lock():
                session.parent = kind.initialise(session)
        # runs of this study whose process died here before Optuna knew their run id
        session.tracker.close_orphans("the process running it died",
                                      extra=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{session.parent}'")
        # parent runs of a start that died before the study recorded them (the current
        # parent stays RUNNING while the study goes on, whoever created it)
        session.tracker.close_orphans(f"a start of the {kind.name} that died before it was recorded",
                                      extra=f"tags.`{TAG_KIND}` = '{kind.name}'", keep=(session.parent,))
    except KeyboardInterrupt:
        if session.parent:
            with interrupt.shielded():
                pause_parent(session)
        raise


def pause_parent(session: Session) -> None:
    """Ctrl-C: the parent run shows KILLED unless other workers go on with the study."""
    with contextlib.suppress(Exception):
        if not session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if session.tracker.client.get_run(session.parent).info.status == "RUNNING":
                session.tracker.end(session.parent, "KILLED")


def join(session: Session) -> str | None:
    """A later process: the parent run that the first one recorded (None: it is the first)."""
    attrs = session.study.user_attrs
    if not attrs.get(STUDY_READY):
        return None
    parent = attrs[STUDY_PARENT_RUN_ID]
    try:
        session.tracker.client.get_run(parent)
    except Exception:
        raise ConfigError(f"MLflow tracking URI {session.tracker.uri} does not hold this {session.kind.name}'s "
                          f"parent run {parent}; every worker must use the tracking store it was started with "
                          f"({attrs.get(STUDY_TRACKING_URI)})") from None
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
