"""Ctrl-C: a study or sweep stops at the next safe point, whatever it is doing.

SIGINT raises KeyboardInterrupt, as in any Python program, with three differences:

- `install` sets that handler whatever the parent left: a shell starts a background job
  (`make test &`, a CI runner) with SIGINT ignored, and Python keeps an ignored SIGINT
  ignored, so without it `kill -INT` would let a study run to its end;
- inside `shielded()` (recording a trial's end in MLflow, telling Optuna, writing the
  results) a SIGINT is held and raised when the stretch ends, so that a record is never
  cut in half, and a second Ctrl-C (the terminal's, then the one a parent forwards)
  never cuts the clean-up of the first;
- worker processes (a study's or a sweep's, run/workers.py) are started inside
  `blocked()`: SIGINT blocked, so that a Ctrl-C while they start reaches none of them
  half-started; each calls `install` (which unblocks it) and the parent forwards a
  Ctrl-C to them.

Signals reach only the main thread; elsewhere these are no-ops.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

_depth = 0  # shielded stretches entered and not left (main thread)
_pending = False  # a SIGINT came while shielded: raise it when the shield ends


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


def install() -> Any:
    """SIGINT raises KeyboardInterrupt (held inside `shielded`), even when the parent
    ignored or blocked it. Returns the previous handler (None off the main thread)."""
    if not _main():
        return None
    previous = signal.signal(signal.SIGINT, _handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return previous


def _raise_pending() -> None:
    global _pending
    if _pending and not _depth:
        _pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A stretch that a Ctrl-C must not cut; one that came within it is raised at its end."""
    global _depth
    if not _main():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    _raise_pending()


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while child processes (which inherit the mask) and
    helper threads are started, and shielded (another thread of ours may still take the
    signal); a Ctrl-C that came meanwhile is raised at the end."""
    global _depth
    if not _main():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    _depth += 1
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending SIGINT is held here
        _depth -= 1
    _raise_pending()
