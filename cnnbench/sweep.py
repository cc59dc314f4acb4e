"""Optuna sweeps: find the best settings over a spec's `search:` space.

A sweep is an Optuna study. `suggest` here is the one place that turns the spec's
search block into `trial.suggest_*` calls; the suggested values over the spec's fixed
settings make a `TrialConfig`, trained by the same loop as every other trial
(`run_trial`) with a recorder that writes the trial's MLflow child run and reports each
epoch's validation score to Optuna, which may prune it. Tuning never reads the test
set: the objective is the best validation score over epochs, on the fixed, seeded split
that `val_size` holds out of the training set.

The rest lives beside this module: sweep_worker.py opens or joins a sweep and trains
its trials (many workers, one study, one MLflow parent run), sweep_storage.py keeps the
workers out of each other's way (claim lock, heartbeat), sweep_final.py re-runs the
best trial over seeds and tests it once, sweep_report.py writes `results/<sweep>/`.
None of them knows the loop's internals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from typing import Any

from cnnbench import interrupt, sweep_storage
from cnnbench.config import ConfigError, SearchDim, StudySpec, TrialConfig
from cnnbench.train import Recorder, TrialResult, usable_cores

OBJECTIVES = {"val_acc": "val/acc", "val_loss": "val/loss"}  # spec name -> per-epoch metric
DIRECTION_OF = {"val_acc": "maximize", "val_loss": "minimize"}
PRUNE_FROM_EPOCH = 2  # median pruning judges a trial from its second epoch on: epoch 1 is too noisy
GRID_LIMIT = 10_000

TAG_PHASE = "cnnbench.phase"  # search | final
TAG_TRIAL = "optuna.trial_number"
TAG_STATE = "optuna.state"
TAG_OPTUNA_STUDY = "optuna.study"
ATTR = "cnnbench."  # prefix of the study's user attributes


# ----------------------------------------------------------------------------------------
# the search space


def check_spec(spec: StudySpec) -> None:
    """What a sweep needs beyond what load_spec checks."""
    if not spec.search or spec.sweep is None:
        raise ConfigError(f"{spec.path}: search: a sweep needs a non-empty search block "
                          "(a spec with only a scientific block is run by `cnnbench study`)")
    s = spec.sweep
    if s.direction != DIRECTION_OF[s.objective]:
        raise ConfigError(f"{spec.path}: sweep.direction: objective {s.objective} is "
                          f"{DIRECTION_OF[s.objective]}d, got direction {s.direction}")
    base = spec.base_config()
    if base.val_size <= 0:
        raise ConfigError(f"{spec.path}: fixed.val_size: a sweep is scored on a validation split held out of the "
                          "training set, never on the test set; set val_size (e.g. 10000 for MNIST)")
    for dim in spec.search:
        if dim.name in spec.fixed:
            raise ConfigError(f"{spec.path}: fixed.{dim.name}: also searched; remove one of the two")
        if dim.name == "seed":
            raise ConfigError(f"{spec.path}: search.seed: the seed is not a hyperparameter; the best trial is "
                              "repeated over sweep.final_seeds")
        # every end of every range, with the fixed settings, must make a valid trial
        for value in (dim.choices if dim.type == "categorical" else _ends(dim)):
            TrialConfig.from_dict({**spec.fixed, dim.name: value}, where=f"{spec.path}: search.{dim.name}")
    if s.sampler == "grid":
        grid_points(spec)


def _ends(dim: SearchDim) -> tuple[Any, ...]:
    assert dim.low is not None and dim.high is not None
    return (int(dim.low), int(dim.high)) if dim.type == "int" else (dim.low, dim.high)


def grid_values(dim: SearchDim, where: str = "") -> list[Any]:
    """The values a grid takes along one dimension: its choices, or its stepped range."""
    if dim.type == "categorical":
        return list(dim.choices)
    assert dim.low is not None and dim.high is not None
    if dim.type == "int":
        step = int(dim.step or 1)
        return list(range(int(dim.low), int(dim.high) + 1, step))
    if dim.step is None:
        raise ConfigError(f"{where}search.{dim.name}: a grid needs a step for a float range (or a list of choices)")
    n = int(math.floor((dim.high - dim.low) / dim.step + 1e-9)) + 1
    return [round(dim.low + i * dim.step, 12) for i in range(n)]


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    values = [grid_values(d, f"{spec.path}: ") for d in spec.search]
    size = math.prod(len(v) for v in values)
    if size > GRID_LIMIT:
        raise ConfigError(f"{spec.path}: search: the grid has {size} points (more than {GRID_LIMIT}); "
                          "use a coarser step or another sampler")
    names = [d.name for d in spec.search]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def suggest(trial: Any, spec: StudySpec) -> dict[str, Any]:
    """The one translation of `spec.search` into Optuna: name -> suggested value."""
    out: dict[str, Any] = {}
    for d in spec.search:
        if d.type == "categorical":
            out[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.type == "int":
            out[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            out[d.name] = trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)
    return out


def trial_config(spec: StudySpec, params: dict[str, Any], seed: int | None = None) -> TrialConfig:
    """The fixed settings, the suggested values and the seed (the spec's first by default)."""
    values = {**spec.fixed, **params, "seed": spec.seeds[0] if seed is None else seed}
    return TrialConfig.from_dict(values, where=f"{spec.path}: trial")


def make_sampler(spec: StudySpec, seed: int | None):
    import optuna

    s = spec.sweep
    assert s is not None
    if s.sampler == "tpe":  # Optuna 5: multivariate with the constant liar by default, good with many workers
        # (constant_liar: K trials asked at once by a fused worker are K different points)
        return optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=seed, constant_liar=True)
    if s.sampler == "qmc":
        # every worker must walk the same scrambled sequence: one seed per sweep
        fixed = seed if seed is not None else int(hashlib.sha256(spec.name.encode()).hexdigest()[:8], 16)
        with sweep_storage._quiet():  # "experimental" since Optuna 3
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=fixed)
    # random; and grid, whose points are all queued when the sweep starts (workers pop them
    # atomically), so that this sampler is never asked
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: StudySpec):
    import optuna

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


def with_overrides(spec: StudySpec, overrides: dict[str, Any]) -> StudySpec:
    """`--set` changes fixed settings; a searched one cannot be fixed this way."""
    searched = {d.name for d in spec.search}
    for key in overrides:
        if key in searched:
            raise ConfigError(f"--set {key}: {key} is searched by sweep {spec.name}; edit {spec.path} to change its range")
        if key == "seed":
            raise ConfigError("--set seed: a sweep's trials use the spec's first seed; the best one is repeated "
                              "over sweep.final_seeds")
    if not overrides:
        return spec
    fixed = {**spec.fixed, **overrides}
    TrialConfig.from_dict(fixed, where="--set")
    return dataclasses.replace(spec, fixed=fixed)


def spec_hash(spec: StudySpec) -> str:
    """What the stored trials depend on: the space, the fixed settings (not the runtime
    ones: device, progress...), the objective. Sampler, pruner, n_trials and final seeds
    may change between runs of a sweep."""
    s = spec.sweep
    assert s is not None
    identity = {"search": [dataclasses.asdict(d) for d in spec.search], "fixed": spec.base_config().identity(),
                "seed": spec.seeds[0], "objective": s.objective, "direction": s.direction}
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# recording one trial: MLflow (the wrapped recorder) and Optuna (reports, pruning)


class PruningRecorder(Recorder):
    """Passes every event to the trial's MLflow recorder and reports each epoch's
    validation score to Optuna; asks the loop to stop when Optuna prunes the trial."""

    def __init__(self, inner: Any, trial: Any, metric: str) -> None:
        self.inner, self.trial, self.metric = inner, trial, metric

    def start(self, config: TrialConfig, info: dict[str, Any], resumed: TrialResult | None) -> None:
        self.inner.start(config, info, resumed)
        self.trial.set_user_attr("mlflow_run_id", self.inner.run_id or "")
        if resumed is not None:  # a retried trial: the epochs its checkpoint restored count too
            for record in resumed.history:
                if self.metric in record:
                    self.trial.report(record[self.metric], int(record["epoch"]))

    def train_loss(self, samples: int, loss: float) -> None:
        self.inner.train_loss(samples, loss)

    def epoch(self, record: dict[str, float]) -> str | None:
        self.inner.epoch(record)
        self.trial.report(record[self.metric], int(record["epoch"]))
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


def _describe(d: SearchDim) -> str:
    if d.type == "categorical":
        return "{" + ", ".join(map(str, d.choices)) + "}"
    text = f"{d.type} [{d.low:g}, {d.high:g}]"
    return text + (" log" if d.log else "") + (f" step {d.step:g}" if d.step else "")


# ----------------------------------------------------------------------------------------
# entry points


def run_sweep(spec: StudySpec, *, workers: int = 1, final: bool = True, worker_argv: list[str] | None = None,
              **kwargs: Any) -> tuple[Any, Any, Any]:
    """Open (or join) the sweep, train trials here (or in `workers` processes), and
    finish it when this is the worker that ends it."""
    from cnnbench.sweep_final import finalize
    from cnnbench.sweep_worker import open_sweep, pause_parent, work

    sweep = open_sweep(spec, **kwargs)
    try:
        report = launch_workers(sweep, workers, worker_argv or []) if workers > 1 else work(sweep)
        if report.stopped:
            return sweep, report, None
        return sweep, report, finalize(sweep) if final else None
    except KeyboardInterrupt:
        with interrupt.shielded():
            pause_parent(sweep)
        raise


def launch_workers(sweep: Any, n: int, argv: list[str]) -> Any:
    """`n` worker processes on this machine, one per GPU where there are GPUs; they share
    the storage and the parent run that this process opened. Returns when all end."""
    import torch

    from cnnbench.sweep_worker import WorkerReport

    gpus = torch.cuda.device_count()
    # on the CPU the workers share the cores: N workers with every core each spend their
    # time waiting for each other's threads (measured: 6x slower for LeNet with 2 on 2)
    threads = str(max(1, usable_cores() // n))
    procs: list[subprocess.Popen] = []
    report = WorkerReport()
    try:
        with interrupt.blocked():  # a Ctrl-C while they start is raised once all are started
            for i in range(n):
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
                else:
                    env.setdefault("OMP_NUM_THREADS", threads)
                cmd = [sys.executable, "-m", "cnnbench", "sweep", *argv, "--storage", sweep.url,
                       "--worker-label", f"w{i}", "--no-final", "--set", "progress=false"]
                procs.append(subprocess.Popen(cmd, env=env))
        print(f"sweep {sweep.spec.name}: {n} workers started (pids {', '.join(str(p.pid) for p in procs)})"
              + (f" on {gpus} GPU(s)" if gpus else ""), flush=True)
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # Ctrl-C to this process alone: pass it on (a worker that has it already, from the
        # terminal, holds the second one); each stops at its next safe point
        with interrupt.shielded():
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGINT)
            for p in procs:
                p.wait()
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        report.stopped = f"{len(bad)} worker(s) ended with status {', '.join(map(str, bad))}"
    return report

