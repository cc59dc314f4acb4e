"""Faults of the machine, told apart from faults of a trial.

A trial that runs out of device memory or diverges has an outcome, and the study goes
on. A full disk, a read-only or vanished folder, a permission taken away, or a store
that is not a database is not the trial's doing: every later trial would fail the same
way, so the study stops cleanly instead (errors.StorageError) and the same command
resumes it once the cause is fixed. `storage_fault` says which an exception is, as one
line naming the path (or store) and the cause, looking through the exceptions that
SQLAlchemy, MLflow and torch wrap around the operating system's.
"""

from __future__ import annotations

import errno
import os

from cnnbench.errors import StorageError

# errno values that say the machine, not the trial, is at fault
ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
          errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted", errno.EIO: "input/output error",
          errno.ENOENT: "no such file or folder (removed while the study ran?)"}
# what SQLite (under SQLAlchemy, under MLflow and Optuna) and torch's writer say instead
MESSAGES = ("database or disk is full", "attempt to write a readonly database", "unable to open database file",
            "disk i/o error", "file is not a database", "database disk image is malformed",
            "no space left on device", "read-only file system", "file write failed")


def causes(err: BaseException) -> list[BaseException]:
    """`err` and every exception behind it (`__cause__`, `__context__`, SQLAlchemy's `orig`)."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return seen


def storage_fault(err: BaseException) -> str | None:
    """A one-line description when `err` is a fault of the machine (see the module's
    docstring), else None. Out-of-memory errors are a trial's fault, not the machine's."""
    for e in causes(err):
        if isinstance(e, StorageError):  # told already (by the background writer's process, say)
            return str(e)
    for e in causes(err):
        if isinstance(e, OSError) and e.errno in ERRNOS and not isinstance(e, (ConnectionError, TimeoutError)):
            where = e.filename if e.filename is not None else ""
            return f"{os.fspath(where)}: {ERRNOS[e.errno]}" if where else ERRNOS[e.errno]
    for e in causes(err):
        text = " ".join(str(e).split()).lower()
        for message in MESSAGES:
            if message in text:
                return f"{message} ({type(e).__name__})"
    return None
