"""Where run state lives: checkpoints, locks and Optuna storage, never committed
(`CNNBENCH_HOME`, else ./.cnnbench)."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "CNNBENCH_HOME"


def state_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Run state that is never committed: checkpoints, locks, Optuna storage."""
    return Path(explicit or os.environ.get(STATE_ENV) or ".cnnbench")
