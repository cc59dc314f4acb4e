"""The one place where cnnbench opens its databases: MLflow's tracking store and a
sweep's Optuna storage, on SQLite or PostgreSQL.

Any number of cnnbench processes may start at once on a fresh store (two studies in two
terminals, the workers of a sweep, workers on many machines). Each library creates the
tables it finds missing when it opens a store, and two processes doing so together
collide ("table experiments already exists", or one reads a half-made schema as out of
date). So a process's first opening of a store is serialized by a `StoreLock`: a file
lock beside a SQLite file, a PostgreSQL advisory lock on a server, both dropped by the
operating system or the server when their holder dies. And a SQLite file busy with
another process's write is waited for, `BUSY_S` seconds at most, before it is called
unusable.

Every SQLite connection this process opens through SQLAlchemy (MLflow's and Optuna's) is
in write-ahead-log mode with `synchronous=NORMAL` (`sqlite_pragmas`): a commit appends to
the log without waiting for the disk, readers never wait for a writer, and a commit is
durable across the process's kill (what resuming needs; a power cut may lose the last
ones). With timings on (util/timings.py) every commit of any database is counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import optuna
import sqlalchemy
from mlflow import MlflowClient

from cnnbench.util import exiting, timings
from cnnbench.util.extras import require
from cnnbench.util.text import masked

T = TypeVar("T")

BUSY_S = 60.0  # how long an opening waits for a busy SQLite file, in all
SCHEMA = "schema"  # the StoreLock that serializes the creation of a store's tables

_ready: set[str] = set()  # stores whose schema this process has seen complete
_ready_lock = threading.Lock()
_listening: list[bool] = []  # whether this process's SQLAlchemy engines have cnnbench's listeners
_engines: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every engine a connection was opened on


def backend(url: str) -> str:
    """'sqlite', 'postgresql', or '' for anything else (an http server, a folder)."""
    head = url.split(":", 1)[0].split("+", 1)[0].lower()
    return head if head in ("sqlite", "postgresql") else ""


# SQLAlchemy's PostgreSQL drivers that the postgres extra installs, and the module of each
PG_DRIVERS = {"psycopg": "psycopg", "psycopg_async": "psycopg", "psycopg2": "psycopg2"}


def require_driver(url: str) -> None:
    """A postgresql:// URL whose driver is not installed is a one-line MissingExtra naming
    the postgres extra, before a library fails on the import deep inside."""
    if backend(url) != "postgresql":
        return
    import sqlalchemy

    try:
        driver = sqlalchemy.engine.make_url(url).get_driver_name()  # loads no driver
    except Exception:  # a malformed URL: whoever opens it says so
        return
    if driver in PG_DRIVERS:
        require("postgres", [PG_DRIVERS[driver]], what=f"the PostgreSQL store {masked(url)}")


def absolute(url: str) -> str:
    """`url` with a relative SQLite file made absolute (what it names from this folder,
    in any process whatever its own); other URLs as they are."""
    path = sqlite_file(url)
    if path is None or path.is_absolute():
        return url
    return sqlalchemy.engine.make_url(url).set(database=str(path.resolve())).render_as_string(hide_password=False)


def sqlite_pragmas(connection: Any, record: Any = None) -> None:
    """A new SQLite connection in write-ahead-log mode (it stays so in the file) with
    `synchronous=NORMAL` (per connection): see the module. Where another process is
    switching the file's mode at that moment, the next connection does it."""
    if not isinstance(connection, sqlite3.Connection):
        return
    cursor = connection.cursor()
    try:
        if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError:
        pass
    finally:
        cursor.close()


def counted(connection: Any) -> None:
    timings.count("database commits")


def remembered(connection: Any) -> None:
    """Note the engine of a connection this process opened (close_idle closes its pool)."""
    _engines.add(connection.engine)


def close_idle() -> None:
    """Close the idle pooled connections of every engine this process used (a connection in
    use elsewhere is left alone): at a quick exit (util/exiting.py), so that SQLite folds
    its write-ahead log into the file when its last connection closes, as it does when
    Python's teardown frees them."""
    for engine in list(_engines):
        engine.dispose(close=True)


def listen() -> None:
    """cnnbench's listeners on every SQLAlchemy engine of this process (once)."""
    with _ready_lock:
        if _listening:
            return
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", sqlite_pragmas)
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "commit", counted)
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "engine_connect", remembered)
        exiting.before_exit(close_idle)
        _listening.append(True)


def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite:///PATH URL (None for other URLs or an in-memory database)."""
    if backend(url) != "sqlite":
        return None

    database = sqlalchemy.engine.make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def damaged(path: Path) -> str | None:
    """Why an existing SQLite file is not a usable database (None: it is, or it is empty or
    absent, which SQLite starts afresh): the cause in a few words.

    Opened read-write, as the store itself will be: a process killed in a write leaves a
    hot journal (or, in WAL mode, a log to recover) that the next connection rolls back or
    recovers, and a read-only one cannot ("attempt to write a readonly database"), which
    is not damage.

    Read through SQLite only, never with a file descriptor of our own: closing any
    descriptor of a file drops every POSIX lock this process holds on it, and in WAL mode
    each open connection holds a shared lock on the database file for its whole life (that
    is how the last one to close knows it may fold the log back and delete it). A process
    that already has connections to the store (two studies in one process, a notebook, a
    test) would lose them: another process closing its last connection would then delete
    the log under them, and they read garbage ("file is not a database", an enum value
    '3'). SQLite shares one descriptor per file among a process's connections, and defers
    closing it while locks are held, so a connection of its own is safe."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=BUSY_S)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as err:
        if "not a database" in str(err).lower():
            return "not a SQLite database: truncated or overwritten?"
        if isinstance(err, sqlite3.OperationalError) and "readonly" in str(err).lower():
            return None  # a write-protected file or folder: the store's own open says so
        return f"a damaged SQLite database ({err})"
    return None


class StoreLock:
    """Mutual exclusion of the processes using one store, on one machine or on many:
    `StoreLock(url, name)()` is a context manager. A file `<db>.<name>.lock` (`<db>.lock`
    for the schema) beside a SQLite file; a session-level advisory lock on PostgreSQL."""

    def __init__(self, url: str, name: str, *, key: str | None = None) -> None:
        self.url, self.name = url, name
        self.path = sqlite_file(url)
        self._engine = None
        if self.path is None and backend(url) == "postgresql":

            require_driver(url)

            self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                                    connect_args={"connect_timeout": 30})
        digest = hashlib.sha256((key or f"cnnbench:{name}").encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)  # advisory locks take a bigint

    @property
    def file(self) -> Path | None:
        if self.path is None:
            return None
        suffix = ".lock" if self.name == SCHEMA else f".{self.name}.lock"
        return self.path.with_name(self.path.name + suffix)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock
            return
        if self._engine is None:  # a server (http) serializes by itself
            yield
            return

        with self._engine.connect() as conn:  # session-level lock: the server drops it if we die
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def busy(err: BaseException) -> bool:
    """A SQLite file locked by another process's write (or a server's transient refusal)."""
    text = str(err).lower()
    return any(word in text for word in ("database is locked", "database table is locked", "database is busy",
                                         "could not obtain lock", "deadlock detected"))


def retry_busy(make: Callable[[], T], *, seconds: float = BUSY_S) -> T:
    """`make()`, tried again with growing pauses while the store is busy, `seconds` at most."""
    deadline = time.monotonic() + seconds
    pause = 0.1
    while True:
        try:
            return make()
        except Exception as err:
            if not busy(err) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause * (1 + random.random()))
        pause = min(pause * 2, 2.0)


def opening(url: str, make: Callable[[], T]) -> T:
    """`make()` opens a store at `url`, creating its tables if they are missing: the
    first time in this process it runs under the store's schema lock; busy, it waits."""
    listen()
    with _ready_lock:
        ready = url in _ready
    if ready or not backend(url):
        return retry_busy(make)
    schema = StoreLock(url, SCHEMA, key="cnnbench-schema")
    try:
        def locked() -> T:
            with schema():
                return make()

        out = retry_busy(locked)
    finally:
        schema.dispose()
    with _ready_lock:
        _ready.add(url)
    return out


def mlflow_client(uri: str) -> Any:
    """An MlflowClient on `uri`, its store created (tables included) safely."""

    path = sqlite_file(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return opening(uri, lambda: MlflowClient(uri))


def optuna_storage(url: str, **kwargs: Any) -> Any:
    """Optuna's RDBStorage on `url` (its tables created safely); `kwargs` go to RDBStorage."""

    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return opening(url, lambda: optuna.storages.RDBStorage(url, **kwargs))


def quiet_mlflow() -> None:
    """No retries with long back-off against a server that is down, and less chatter: no
    progress bar per artifact fetched (a resumed study fetches each finished trial's small
    result.json; the bars would bury the study's own progress). No usage telemetry: MLflow 3
    otherwise looks up and posts to its telemetry host from every process that records a run
    (seen with strace: a DNS query per process), which a worker on a closed cluster must not."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run ... at" line per run

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def default_url(name: str, state: Path) -> str:
    """A SQLite file per sweep in the state folder (absolute, so every worker agrees)."""
    return f"sqlite:///{(state / 'optuna' / f'{name}.db').resolve()}"
