"""A test hook: a trial held mid-way, after its first epoch, until the test lets it go.

Tests of a SIGKILL or a Ctrl-C in the middle of a trial need the trial to be mid-way when
the signal comes. Rather than train long enough for a poll to catch that moment, they set
CNNBENCH_TEST_BARRIER=DIR for the process they start: a trial that has recorded an epoch
(its checkpoint written, its metrics in MLflow, its score told to Optuna) is held at its
next logging point, mid-way through the next epoch, once per trial: the worker writes
DIR/reached-<pid>-<trial number>-<epoch> and waits until DIR/release or
DIR/release-<pid>-<trial number>-<epoch> exists (or `GIVE_UP_S` have passed, so that a
test that died never leaves it waiting for ever). The wait is outside every shielded
stretch (util/interrupt.py): a Ctrl-C stops it as it stops a training step.

The background writer (util/background.py) is waited for before the file is written, so
that the recorded epoch is on disk when the test sees the trial held.

Unset, as everywhere outside the tests: nothing happens. Called from
search.PruningRecorder, which every study and sweep trial records through.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cnnbench.util import background

ENV = "CNNBENCH_TEST_BARRIER"
GIVE_UP_S = 600.0  # a held trial goes on after this long without a release
POLL_S = 0.01


def hold(trial: int, epoch: int) -> None:
    """Hold here until released, when CNNBENCH_TEST_BARRIER names a folder."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    background.writer().wait_all()  # what the epoch handed over (checkpoint, metrics) on disk first
    name = f"{os.getpid()}-{trial}-{epoch}"
    (Path(folder) / f"reached-{name}").touch()
    releases = (Path(folder) / "release", Path(folder) / f"release-{name}")
    deadline = time.monotonic() + GIVE_UP_S
    while not any(p.exists() for p in releases) and time.monotonic() < deadline:
        time.sleep(POLL_S)
