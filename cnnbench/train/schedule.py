"""Learning-rate schedules as plain Python, one object per trial.

The single and the fused engine both ask the same object for the rate of each step, so
a trial follows the same schedule whichever way it is trained. The formulas are those of
torch.optim.lr_scheduler: StepLR, ReduceLROnPlateau (mode min, relative threshold 1e-4,
no cooldown) and OneCycleLR (cosine, 30% warm-up, div_factor 25, final_div_factor 1e4;
momentum is held fixed rather than cycled).
"""

from __future__ import annotations

import math
from typing import Any

from cnnbench.config.trial import TrialConfig


class LRSchedule:
    def __init__(self, config: TrialConfig, steps_per_epoch: int) -> None:
        self.kind = config.schedule
        self.base = config.lr
        self.step_size, self.gamma, self.patience = config.step_size, config.gamma, config.patience
        self.total_steps = config.epochs * steps_per_epoch
        self.steps_per_epoch = steps_per_epoch
        self.plateau_lr = config.lr
        self.best = math.inf
        self.bad_epochs = 0

    def per_step(self) -> bool:
        return self.kind == "onecycle"

    def lr(self, epoch: int, step: int = 0) -> float:
        """Rate for `step` (0-based, within the epoch) of `epoch` (0-based)."""
        if self.kind == "step":
            return self.base * self.gamma ** (epoch // self.step_size)
        if self.kind == "plateau":
            return self.plateau_lr
        if self.kind == "onecycle":
            return self._one_cycle(epoch * self.steps_per_epoch + step)
        return self.base

    def end_epoch(self, monitored: float) -> None:
        """Feed the monitored loss (validation loss, else training loss) after an epoch."""
        if self.kind != "plateau" or not math.isfinite(monitored):
            return
        if monitored < self.best * (1 - 1e-4):
            self.best, self.bad_epochs = monitored, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.plateau_lr *= self.gamma
                self.bad_epochs = 0

    def _one_cycle(self, t: int) -> float:
        peak, start = self.base, self.base / 25.0
        end = start / 1e4
        up = float(0.3 * self.total_steps) - 1
        down = float(self.total_steps) - 1
        if t <= up:
            pct, lo, hi = (t / up if up > 0 else 1.0), start, peak
        else:
            pct, lo, hi = (t - up) / (down - up) if down > up else 1.0, peak, end
        return hi + (lo - hi) / 2.0 * (math.cos(math.pi * pct) + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_lr": self.plateau_lr, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_lr, self.best, self.bad_epochs = state["plateau_lr"], state["best"], state["bad_epochs"]
