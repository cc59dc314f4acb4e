"""What every bench shares: the learning-rate study it projects (`LR_STUDY`), one
measured row (`Measurement`), the trial every bench times (`bench_config`, `lr_configs`),
cnnbench's loop timed over one epoch (`cnnbench_loop`), groups trained in parallel
worker processes, one group each (`parallel_groups`), and a fresh process to time in
(`fresh_process`)."""

from __future__ import annotations

import math
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import dataset_info
from cnnbench.train.device import resolve_device
from cnnbench.train.loop import load_data, train_group

LR_STUDY = (0.001, 0.005, 0.01, 0.05, 0.1)
LR_STUDY_IMAGES = len(LR_STUDY) * 10 * dataset_info("mnist").n_train  # 5 trials x 10 epochs of MNIST's training set


@dataclass
class Measurement:
    """One row of a bench: a method (naive, single, fused, ...) at K trials, its samples."""

    method: str
    k: int
    samples: list[float] = field(default_factory=list)  # model-images/s per repeat
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan


def fresh_process() -> ProcessPoolExecutor:
    """One spawned worker process, as a user's script starts: nothing inherited from this
    one (its engines may have told the allocator to keep freed memory, a setting made once
    a process: util/host_memory.py). Use it as a context manager."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def bench_config(model: str, batch_size: int, steps: int, device: torch.device) -> TrialConfig:
    """The trial a throughput bench times: one epoch of `steps` batches, a small test set."""
    return TrialConfig(model=model, batch_size=batch_size, epochs=1, train_subset=steps * batch_size,
                       test_subset=1000, log_every=50, progress=False, device=str(device), checkpoints="final")


def lr_configs(base: TrialConfig, k: int) -> list[TrialConfig]:
    """K trials of `base`: the learning-rate study's rates in turn, a new seed after each round of them."""
    return [base.replace(lr=LR_STUDY[i % len(LR_STUDY)], seed=i // len(LR_STUDY)) for i in range(k)]


def failure(err: BaseException, limit: int = 120) -> str:
    """An exception as a table's note: its type and the first `limit` characters, on one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def cnnbench_loop(configs: list[TrialConfig], data, fused: bool = False, engine: str | None = None) -> float:
    """cnnbench's training throughput (model-images/s) over one epoch of `data`
    (`engine`: the fused engine, "wide" or "vmap"; None: train_group's choice)."""
    results = train_group(configs, data=data, evaluate_test=False, fused=fused, engine=engine)
    r = results[0]
    if r.status != "finished":
        raise RuntimeError(f"benchmark trial {r.status}: {r.reason}")
    return len(configs) * r.images / r.train_seconds


def _group_throughput(args: tuple[list[TrialConfig], str, int, bool, str | None, Any]) -> float:
    """In a worker process with `threads` threads: one group's throughput, warmed up."""
    configs, root, threads, fused, engine, barrier = args
    torch.set_num_threads(threads)
    data = load_data(configs[0], root, resolve_device(configs[0].device))
    cnnbench_loop(configs, data, fused=fused, engine=engine)
    barrier.wait()  # every worker measures at the same time
    return cnnbench_loop(configs, data, fused=fused, engine=engine)


def parallel_groups(groups: list[list[TrialConfig]], root: Path, threads: int, *, fused: bool = False,
                    engine: str | None = None) -> float:
    """Model-images/s of one process per group, each with `threads` threads, training at
    once (`fused`, `engine`: as `cnnbench_loop` takes them)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(len(groups))
        with ctx.Pool(len(groups)) as pool:
            rates = pool.map(_group_throughput, [(g, str(root), threads, fused, engine, barrier) for g in groups])
    return sum(rates)
