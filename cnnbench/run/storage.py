"""Where a sweep's Optuna study lives, and how its workers stay out of each other's way.

A sweep's trials live in an Optuna RDB storage: by default a SQLite file in the state
folder (`.cnnbench/optuna/<sweep>.db`), or any PostgreSQL URL shared by workers on
many machines. Three things keep many workers honest:

- a *claim lock* around every decision that must not race (recover lost trials, count,
  take the next trial, elect the worker that writes the results): a file lock beside a
  SQLite file, a PostgreSQL advisory lock on a server. The operating system or the
  server drops it when its holder dies, so a killed worker never blocks the others;
- a *heartbeat*: each running trial's worker stamps it every `HEARTBEAT_S` seconds
  (Optuna's RDB heartbeat table); a trial whose stamps stop for `GRACE_S` seconds
  belongs to a lost worker on some machine, is failed and queued again;
- a worker's *identity* (host, boot id, pid) on each trial, so that a trial whose
  process died on this machine is recovered at once, without waiting for the grace
  period: this is what lets a sweep killed with SIGKILL resume immediately.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy
from sqlalchemy.exc import ArgumentError

from cnnbench.errors import ConfigError
from cnnbench.track import stores
from cnnbench.track.schema import ATTR_WORKER_BOOT, ATTR_WORKER_HOST, ATTR_WORKER_PID, ATTR_WORKER_SUPERVISOR
from cnnbench.util import fileio, interrupt, processes
from cnnbench.util.text import masked

HEARTBEAT_S = 10  # seconds between a running trial's heartbeats
GRACE_S = 60  # a trial without a heartbeat for this long belongs to a lost worker
SQLITE_BUSY_S = 60  # how long a SQLite writer waits for another process's write lock


def _parse(url: str):

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage {masked(url)!r}: not a database URL; expected sqlite:///PATH or "
                          "postgresql://USER:PASSWORD@HOST:PORT/DB") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"--storage {masked(url)}: unsupported database {parsed.get_backend_name()!r}; "
                          "use sqlite:///PATH (one machine) or postgresql://... (many)")
    return parsed


def sqlite_path(url: str) -> Path | None:
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError(f"--storage {url}: a sweep needs a file (sqlite:///PATH), not an in-memory database")
    return Path(parsed.database)


def check(url: str) -> None:
    """Fail before anything is created when the storage cannot be used. Writes nothing."""
    path = sqlite_path(url)
    if path is not None:
        try:
            fileio.check_writable(path.parent)
        except PermissionError as err:
            raise ConfigError(f"--storage {url}: {err}") from None
        if path.exists() and not path.is_file():
            raise ConfigError(f"--storage {url}: {path} is not a file")
        why = stores.damaged(path)
        if why:
            raise ConfigError(f"--storage {url}: {path} is {why}; move it away or give another --storage (a grid "
                              "study reads its finished trials back from MLflow, so nothing is trained twice; a "
                              "sweep starts its search again)")
        return

    stores.require_driver(url)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as err:
        reason = " ".join(str(getattr(err, "orig", err)).split())[:200]
        raise ConfigError(f"--storage {masked(url)}: cannot connect ({reason})") from None
    finally:
        engine.dispose()


def open_storage(url: str, on_lost: Callable[[Any, Any], None]):
    """Optuna's RDB storage with the heartbeat on; `on_lost(study, frozen_trial)` is called
    for each trial failed because its worker stopped beating."""
    if sqlite_path(url) is not None:
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 30}}
    with quiet():
        return stores.optuna_storage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                     grace_period=GRACE_S, heartbeat_stale_trial_callback=on_lost)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Optuna marks the heartbeat API experimental; that warning is noise here."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------
# the claim lock


class ClaimLock(stores.StoreLock):
    """Mutual exclusion of the workers of one sweep, on one machine or on many: a file
    `<db>.<sweep>.lock` beside a SQLite file, an advisory lock on PostgreSQL."""

    def __init__(self, url: str, study_name: str) -> None:
        super().__init__(url, study_name, key=f"cnnbench-sweep:{study_name}")


# ----------------------------------------------------------------------------------------
# heartbeat and worker identity


class Heartbeat:
    """Stamp one trial every HEARTBEAT_S seconds from a thread while it trains."""

    def __init__(self, storage: Any, trial_id: int) -> None:

        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a hiccup of the database: the next beat tries again
                pass

    def __enter__(self) -> "Heartbeat":
        with interrupt.shielded():  # a Ctrl-C inside a database write would break the connection
            self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def identity() -> dict[str, Any]:
    return {ATTR_WORKER_HOST: processes.host(), ATTR_WORKER_BOOT: processes.boot_id(), ATTR_WORKER_PID: os.getpid()}


def here(attrs: dict[str, Any]) -> bool:
    """True when `attrs` (a trial's or a claim's worker identity) name this machine, since its last boot."""
    me = identity()
    return attrs.get(ATTR_WORKER_HOST) == me[ATTR_WORKER_HOST] and attrs.get(ATTR_WORKER_BOOT) == me[ATTR_WORKER_BOOT]


def dead_here(attrs: dict[str, Any]) -> bool:
    """True when `attrs` name a process of this machine that no longer exists."""
    pid = attrs.get(ATTR_WORKER_PID)
    if not here(attrs) or not isinstance(pid, int) or pid == os.getpid():
        return False
    return not processes.alive(pid)


def process_id() -> str:
    """This process, named across machines and reboots: "HOST BOOT PID"."""
    me = identity()
    return f"{me[ATTR_WORKER_HOST]} {me[ATTR_WORKER_BOOT]} {me[ATTR_WORKER_PID]}"


def watched_here(attrs: dict[str, Any]) -> bool:
    """True when a live process of this machine other than this one supervises the trial's
    worker (run/pool.py): that process recovers the trials of a worker that dies, at once
    and knowing why, so no other worker steps in. (A supervisor on another machine, a Ray
    driver say, is asked by its own executor; a dead one leaves the trial to recovery.)"""
    parts = str(attrs.get(ATTR_WORKER_SUPERVISOR, "")).split(" ")
    me = identity()
    if len(parts) != 3 or not parts[2].isdigit() or parts[:2] != [me[ATTR_WORKER_HOST], me[ATTR_WORKER_BOOT]]:
        return False
    pid = int(parts[2])
    return pid != os.getpid() and processes.alive(pid)
