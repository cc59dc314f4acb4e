"""Optuna's side of a sweep: its sampler and pruner from the spec, the recorder that
reports each epoch's validation score (and may prune), and a trial's objective value."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable

import optuna

from cnnbench.config.space import OBJECTIVES
from cnnbench.config.spec import StudySpec
from cnnbench.config.trial import TrialConfig
from cnnbench.run import barrier
from cnnbench.run import storage as sweep_storage
from cnnbench.track.schema import ATTR_MLFLOW_RUN_ID, EPOCH
from cnnbench.train.result import Recorder, TrialResult

PRUNE_FROM_EPOCH = 2  # median pruning judges a trial from its second epoch on: epoch 1 is too noisy


def make_sampler(spec: StudySpec, seed: int | None):

    s = spec.sweep
    assert s is not None
    if s.sampler == "tpe":  # Optuna 5: multivariate with the constant liar by default, good with many workers
        # (constant_liar: K trials asked at once by a fused worker are K different points)
        return optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=seed, constant_liar=True)
    if s.sampler == "qmc":
        # every worker must walk the same scrambled sequence: one seed per sweep
        fixed = seed if seed is not None else int(hashlib.sha256(spec.name.encode()).hexdigest()[:8], 16)
        with sweep_storage.quiet():  # "experimental" since Optuna 3
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=fixed)
    # random; and grid, whose points are all queued when the sweep starts (workers pop them
    # atomically), so that this sampler is never asked
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: StudySpec):

    s = spec.sweep
    assert s is not None
    epochs = spec.base_config().epochs
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=PRUNE_FROM_EPOCH)
    if s.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


class PruningRecorder(Recorder):
    """Passes every event to the trial's MLflow recorder and tells Optuna the run's id (at
    once, in the training thread, as the run is created). In a
    sweep (`metric` set) it reports each epoch's validation score to Optuna and asks the
    loop to stop when Optuna prunes the trial; `on_epoch` sees every epoch's record, and
    `on_log` is called at every logging point (every `log_every` steps), `on_checkpoint`
    with each epoch's resume checkpoint once it is on disk (in the background writer's
    thread, after the file's own write)."""

    def __init__(self, inner: Any, trial: Any, metric: str | None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None,
                 on_log: Callable[[], Any] | None = None,
                 on_checkpoint: Callable[[Path, int], None] | None = None) -> None:
        self.inner, self.trial, self.metric, self.on_epoch, self.on_log = inner, trial, metric, on_epoch, on_log
        self.on_checkpoint = on_checkpoint
        self.recorded = 0  # the last epoch recorded here (this process)
        self.held = False  # by the tests' barrier (barrier.py), once per trial

    def start(self, config: TrialConfig, info: dict[str, Any], resumed: TrialResult | None) -> None:
        self.inner.start(config, info, resumed)
        # in this thread, one commit, not through the background writer: from the moment the
        # run exists its trial names it, so that a worker killed at any moment after (before its
        # writer process has even started, on a busy machine) leaves a run that the recovery of
        # its lost trials ends (claims.recover), instead of one left RUNNING with no trial's id
        self.trial.set_user_attr(ATTR_MLFLOW_RUN_ID, self.inner.run_id or "")
        if resumed is not None and self.metric:  # a retried trial: the epochs its checkpoint restored count too
            for record in resumed.history:
                if self.metric in record:
                    self.trial.report(record[self.metric], int(record[EPOCH]))

    def checkpoint(self, path: Path, epoch: int) -> None:
        self.inner.checkpoint(path, epoch)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, epoch)

    def train_loss(self, samples: int, loss: float) -> None:
        self.inner.train_loss(samples, loss)
        if self.on_log is not None:
            self.on_log()
        if self.recorded and not self.held:  # mid-way through the epoch after the first recorded
            self.held = True
            barrier.hold(self.trial.number, self.recorded)

    def epoch(self, record: dict[str, float]) -> str | None:
        self.inner.epoch(record)
        self.recorded = int(record[EPOCH])
        if self.on_epoch is not None:
            self.on_epoch(record)
        if not self.metric:
            return None
        self.trial.report(record[self.metric], int(record[EPOCH]))
        return "prune" if self.trial.should_prune() else None

    def finish(self, result: TrialResult) -> None:
        self.inner.finish(result)


def objective_value(result: TrialResult, objective: str) -> float:
    """The best validation score over the trial's epochs (NaN when none is finite)."""
    metric = OBJECTIVES[objective]
    values = [r[metric] for r in result.history if metric in r and math.isfinite(r[metric])]
    if not values:
        return math.nan
    return max(values) if objective == "val_acc" else min(values)
