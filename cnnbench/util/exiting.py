"""A cnnbench command's end without Python's teardown.

Once a command has done its work and every `atexit` handler has run (MLflow's, logging's,
multiprocessing's joins of its children, tempfile's clean-ups), what is left of a normal
exit is the interpreter freeing every module and object one by one: 1 to 2 s of a study's
wall time on a small CPU for a process that imported torch, MLflow, SQLAlchemy, pandas
and seaborn (`cnnbench bench --overhead`), with nothing to write. `exit(status)` skips it:
it is `sys.exit(status)`, and this module's handler, registered when `cnnbench` is
imported and so before any other of the command's (atexit runs them last-registered
first), is the last to run: it runs the closers (`before_exit`: the SQLite stores' pooled
connections are closed, so that SQLite folds its write-ahead log into the file as a normal
exit does), flushes stdout and stderr and ends the process with `os._exit(status)`.

Only a command's own processes take this way (`cli.entry`, and a local worker once its
work is done): a program or notebook that imports cnnbench exits as it always does. A
thread that is not a daemon is joined before atexit runs, as in any exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Callable, NoReturn

_status: list[int] = []  # set by exit(): the handler ends the process with it
_closers: list[Callable[[], None]] = []


def before_exit(close: Callable[[], None]) -> None:
    """Run `close` at a quick exit, before the process ends (its errors are ignored)."""
    if close not in _closers:
        _closers.append(close)


def exit(status: int) -> NoReturn:  # noqa: A001 (sys.exit's name: what it stands for)
    """`sys.exit(status)`, ending with `os._exit(status)` once the atexit handlers ran."""
    _status.append(int(status))
    sys.exit(status)


def finish() -> None:
    """The atexit handler: nothing unless `exit` was called."""
    if not _status:
        return
    for close in _closers:
        with contextlib.suppress(Exception):
            close()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_status[-1])


atexit.register(finish)
