"""What a trial comes to and how the loop tells it: the statuses a trial ends with, the
`TrialResult` the loop fills (per-epoch records, the loss curve, timings, checkpoints)
and the `Recorder` interface through which the loop reports, knowing nothing of MLflow
or Optuna (track.writer and the run layer implement it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnbench.config.record import EPOCH, TEST_ACC
from cnnbench.config.trial import TrialConfig

FINISHED, DIVERGED, PRUNED, FAILED, INTERRUPTED = "finished", "diverged", "pruned", "failed", "interrupted"


@dataclass
class TrialResult:
    config: TrialConfig
    status: str = "running"
    reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one record per epoch
    curve: list[tuple[int, float]] = field(default_factory=list)  # (samples seen, mean train loss)
    train_seconds: float = 0.0  # time in training steps (evaluation excluded)
    wall_seconds: float = 0.0
    images: int = 0  # training images this trial processed
    device: str = ""
    fused_with: int = 1  # trials trained together with this one (itself included)
    best_epoch: int | None = None
    best_checkpoint: Path | None = None
    final_checkpoint: Path | None = None
    run_id: str = ""  # the tracking run that recorded it, when one did (set by the caller)

    @property
    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else 0.0

    def metric(self, name: str, epoch: int | None = None) -> float:
        """`name` (e.g. "test/acc") at 1-based `epoch`; the last epoch when None; NaN if absent."""
        if not self.history:
            return math.nan
        rec = self.history[-1] if epoch is None else next((r for r in self.history if r[EPOCH] == epoch), {})
        return float(rec.get(name, math.nan))

    def best(self, name: str = TEST_ACC) -> tuple[float, int | None]:
        values = [(r[name], r[EPOCH]) for r in self.history if name in r and math.isfinite(r[name])]
        if not values:
            return math.nan, None
        return max(values, key=lambda v: (v[0], -v[1]))


class Recorder:
    """What the loop tells the outside world. Every method is a no-op here."""

    def start(self, config: TrialConfig, info: dict[str, Any], resumed: TrialResult | None) -> None:
        """Called once before training; `resumed` holds the epochs a checkpoint restored."""

    def train_loss(self, samples: int, loss: float) -> None:
        """Mean training loss of the last `log_every` steps, at `samples` images seen."""

    def epoch(self, record: dict[str, float]) -> str | None:
        """After each epoch. Return "prune" to stop this trial as pruned."""
        return None

    def checkpoint(self, path: Path, epoch: int) -> None:
        """The trial's resume checkpoint `path` (last.pt) holds `epoch` epochs, whole on disk
        (called by the background writer right after it wrote the file, in its thread)."""

    def finish(self, result: TrialResult) -> None:
        """Once, with the final status (finished, diverged, pruned, failed or interrupted)."""
