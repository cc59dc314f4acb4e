"""The tests' side of the barrier (cnnbench/run/barrier.py): a cnnbench command started in
the background with its trials held mid-way, the trials it holds, and their release.

A trial that has recorded an epoch is held at its next logging point: its worker writes
BARRIER/reached-<pid>-<trial number>-<epoch> and waits for BARRIER/release (every held
trial goes on) or BARRIER/release-<pid>-<trial number>-<epoch> (this one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cnnbench.run.barrier import ENV


def start(folder: Path, *args: str, barrier: Path | None = None, **popen) -> subprocess.Popen:
    """`cnnbench *args` in the background, its output piped (unless `popen` says otherwise);
    `barrier`: a folder where its trials are held mid-way, after their first epoch, until
    the test releases them."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if barrier is not None:
        barrier.mkdir(exist_ok=True)
        env[ENV] = str(barrier)
    return subprocess.Popen([sys.executable, "-m", "cnnbench", *args], cwd=folder, text=True, env=env,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen})


def held(barrier: Path) -> list[Path]:
    """The trials held at the barrier: their reached-<pid>-<trial>-<epoch> files."""
    return sorted(barrier.glob("reached-*"))


def holder(reached: Path) -> tuple[int, int]:
    """(the worker's pid, the trial's number) of a held trial's reached-* file."""
    pid, trial, _ = reached.name.removeprefix("reached-").split("-")
    return int(pid), int(trial)


def release(reached: Path) -> None:
    """Let the held trial of a reached-* file go on."""
    reached.with_name(reached.name.replace("reached-", "release-", 1)).touch()
