"""Which processes of this machine are alive: the one home of the liveness checks that
recovery (run/claims.py), orphaned MLflow runs (track/writer.py) and the results lock use,
and of a worker process's tie to its parent's life (`die_with_parent`)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
from pathlib import Path


@functools.cache
def boot_id() -> str:
    """Distinguishes machines (and reboots) that share a host name: a pid means nothing
    across a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def host() -> str:
    return socket.gethostname()


def alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists (a killed child that its parent has not
    reaped yet, a zombie, does not: a container's init may leave one for a while)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def die_with_parent() -> None:
    """This process is killed when its parent dies (Linux's PR_SET_PDEATHSIG; elsewhere
    nothing): a worker never outlives the study that started it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
