"""Atomic writes: a file is written beside its target and renamed over it, so a crash
never leaves a partial CSV, table, figure or checkpoint behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for everyone to read
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Call `writer(tmp_path)` and move the result onto `path` (for savefig, torch.save...)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def check_writable(folder: str | os.PathLike) -> None:
    """Raise PermissionError (naming the folder) unless files can be created in `folder`.

    Probes by creating and removing a file in the folder or, when it does not exist
    yet, in its nearest existing ancestor; permission bits alone would not do (root
    ignores them, a read-only mount or /proc does not). Creates nothing that stays."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PermissionError(f"{folder}: not writable ({probe} is not a folder)")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".cnnbench-probe.")
    except OSError as err:
        raise PermissionError(f"{folder}: not writable ({err.strerror})") from None
    os.close(fd)
    os.unlink(tmp)


def too_long(path: str | os.PathLike) -> str | None:
    """The first component of `path` longer than its file system allows (NAME_MAX, in
    bytes, of the nearest folder that exists), or None when every one fits."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        limit = os.pathconf(probe if probe.is_dir() else probe.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            return part
    return None
