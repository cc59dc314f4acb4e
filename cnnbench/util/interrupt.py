"""Stop requests: a study or sweep stops at the next safe point, whatever it is doing,
on Ctrl-C (SIGINT), SIGTERM (what Slurm, Kubernetes, systemd and a cloud's preemption
send before they kill) and SIGHUP (a closed terminal).

Each raises `Stop`, a KeyboardInterrupt that remembers its signal (so every handler of
a Ctrl-C handles the others too, and the command exits with 128 + the signal's number:
130, 143, 129), with three differences from Python's own SIGINT handling:

- `install` sets the handlers whatever the parent left: a shell starts a background job
  (`make test &`, a CI runner) with SIGINT ignored, and Python keeps an ignored SIGINT
  ignored, so without it `kill -INT` would let a study run to its end;
- inside `shielded()` (recording a trial's end in MLflow, telling Optuna, writing the
  results) a stop request is held and raised when the stretch ends, so that a record is
  never cut in half, and a second one (the terminal's, then the one a parent forwards)
  never cuts the clean-up of the first;
- worker processes (run/workers.py) are started inside `blocked()`: the signals blocked,
  so that a stop request while they start reaches none of them half-started; each calls
  `install` (which unblocks them) and the parent forwards a stop request to them.

A stop request raised while the main thread runs a finalizer or a weakref callback (the
garbage collector runs them between any two lines) would be swallowed there ("Exception
ignored in ..."), and the process would run on: `install` sends such a one again
(`_unraisable`), so that it is raised outside the callback. One raised inside torch's
machinery may come out as another error ("trying to pop from empty mode stack", an
AttributeError of a module whose import it cut), which a handler of errors would take for
a trial's failure and go on: inside `kept()` an error raised after a stop request is that
request (`Stop`).

Signals reach only the main thread; elsewhere these are no-ops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the stop requests

_depth = 0  # shielded stretches entered and not left (main thread)
_pending: int | None = None  # a stop request that came while shielded: raised when the shield ends
_requested: int | None = None  # the first stop request since `install` (the process is stopping)


class Stop(KeyboardInterrupt):
    """A stop request, from signal `signum` (SIGINT: Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def signal_of(err: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (SIGINT for Python's own)."""
    return getattr(err, "signum", int(signal.SIGINT))


def exit_status(err: BaseException) -> int:
    """The exit status of a process stopped by `err`: 128 + its signal (130 for Ctrl-C)."""
    return 128 + signal_of(err)


def reason(err: BaseException) -> str:
    """Why a run stopped, for its record: `interrupted (Ctrl-C)`, `stopped by SIGTERM`..."""
    signum = signal_of(err)
    return "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handler(signum: int, frame: Any) -> None:
    global _pending, _requested
    _requested = _requested or signum
    if _depth:
        _pending = _pending or signum
        return
    raise Stop(signum)


def _unraisable(unraisable: Any) -> None:
    """sys.unraisablehook: a `Stop` swallowed in a finalizer or a weakref callback is sent
    again AGAIN_S later, from a timer thread, so that it lands once the callback and this
    hook returned (one that lands in another callback comes back here); anything else goes
    to the hook before ours."""
    global _depth, _pending
    err = unraisable.exc_value
    if isinstance(err, Stop):
        held, main = _pending, _main()
        if main:  # a second request while the timer starts is this one (raised here, it would be lost)
            _depth += 1
        try:
            timer = threading.Timer(AGAIN_S, os.kill, (os.getpid(), err.signum))
            timer.daemon = True
            timer.start()
        finally:
            if main:
                _depth -= 1
                _pending = held
        return
    _hooks[0](unraisable)


_hooks = [sys.unraisablehook]  # the hook before `_unraisable`
AGAIN_S = 0.05  # seconds before a swallowed stop request is sent again (a callback ends in microseconds)


def install() -> dict[int, Any] | None:
    """SIGINT, SIGTERM and SIGHUP raise `Stop` (held inside `shielded`), even when the
    parent ignored or blocked them. Returns the previous handlers (None off the main thread)."""
    global _requested
    if not _main():
        return None
    _requested = None
    if sys.unraisablehook is not _unraisable:
        _hooks[0], sys.unraisablehook = sys.unraisablehook, _unraisable
    previous = {int(s): signal.signal(s, _handler) for s in SIGNALS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNALS))
    return previous


def restore(previous: dict[int, Any] | None) -> None:
    """The handlers `install` replaced."""
    global _requested
    if previous and _main():
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested = None


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """A stretch whose errors, once a stop request came, are that request: an Exception
    raised inside after the handler ran is raised as `Stop` (see the module)."""
    try:
        yield
    except Exception as err:
        if _requested is not None and _main():
            raise Stop(_requested) from err
        raise


def _raise_pending() -> None:
    global _pending
    if _pending and not _depth:
        signum, _pending = _pending, None
        raise Stop(signum)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A stretch that a stop request must not cut; one that came within it is raised at its end."""
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
    """The stop signals blocked in this thread while child processes (which inherit the
    mask) and helper threads are started, and shielded (another thread of ours may still
    take a signal); a stop request that came meanwhile is raised at the end."""
    global _depth
    if not _main():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
    _depth += 1
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNALS))  # a pending signal is taken here
        _depth -= 1
    _raise_pending()
