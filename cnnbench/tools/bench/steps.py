"""Timings of one engine's training steps and test passes, below the loop: steps as the
loop makes them (`step_throughput`, the --options bench's and gpu-check's figure), the
test pass per test batch size (`time_evaluation`) and where a step's time goes
(`profile_steps`, torch.profiler)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from cnnbench.config.trial import TrialConfig
from cnnbench.tools.bench.common import lr_configs
from cnnbench.train.device import configure_backends, sync
from cnnbench.train.engine import Engine
from cnnbench.train.fused import FusedEngine, fused_engine
from cnnbench.train.loop import evaluate
from cnnbench.train.single import SingleEngine


def make_engine(configs: list[TrialConfig], data, engine: str | None = None) -> Engine:
    """The engine for `configs`: one trial, the SingleEngine; K trials, the vmap engine,
    or `engine` ("wide" or "vmap", train.fused.fused_engine)."""
    configure_backends(configs[0], data.device)
    if len(configs) == 1 and engine is None:
        return SingleEngine(configs, data.device, data.info)
    if engine is not None:
        return fused_engine(configs, data.device, data.info, engine)
    return FusedEngine(configs, data.device, data.info)


def step_throughput(configs: list[TrialConfig], data, *, steps: int, repeats: int, warm: int = 30,
                    step_graph: bool = False) -> list[float]:
    """Model-images/s of one engine's training steps, as the loop makes them (a batch
    gathered and normalised on the device, one step, no host sync inside the timed
    steps): `warm` untimed steps first (compilation, CUDA-graph capture, cuDNN
    autotuning), then `repeats` timings of `steps` steps on the same engine.

    `step_graph` (CUDA, SGD): the whole step (gather, normalise, forward, backward,
    update) captured once as one CUDA graph and replayed with a new batch index: the
    floor of what launch overhead leaves, a bench figure only (the study loop does not
    do this: capture's warm-up steps would change the trial)."""
    engine = make_engine(configs, data)
    engine.begin_epoch([[c.lr for c in configs]])
    engine.train(True)
    batch = configs[0].batch_size
    order = data.epoch_order(configs[0].seed, 0)
    n = len(data.train) - batch
    idx = order[:batch].clone()

    def one() -> None:
        engine.train_step(data.to_float(data.train.x[idx]), data.train.y[idx], 0)

    replay = one
    if step_graph:
        if data.device.type != "cuda" or configs[0].optimizer != "sgd":
            raise ValueError("step_graph needs CUDA and SGD")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
            for _ in range(3):
                one()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one()
        replay = graph.replay

    def run(count: int, offset: int) -> None:
        for step in range(count):
            lo = ((offset + step) * batch) % max(n, 1)
            idx.copy_(order[lo:lo + batch])
            replay()

    run(warm, 0)
    sync(data.device)
    out = []
    for rep in range(repeats):
        t0 = time.perf_counter()
        run(steps, warm + rep * steps)
        sync(data.device)
        out.append(len(configs) * steps * batch / (time.perf_counter() - t0))
    return out


def time_evaluation(base: TrialConfig, data, *, k: int, sizes: tuple[int, ...],
                    repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds for one pass over the test set by K fused models, per test batch size
    (the setting changes no result, only speed)."""
    configs = lr_configs(base, k)
    engine = make_engine(configs, data)
    engine.train(False)
    rows = []
    for size in sizes:
        evaluate(engine, data, data.test, size)  # warm-up (cuDNN autotuning per shape)
        times = []
        for _ in range(repeats):
            sync(data.device)
            t0 = time.perf_counter()
            evaluate(engine, data, data.test, size)
            sync(data.device)
            times.append(time.perf_counter() - t0)
        rows.append({"k": k, "test_batch_size": size, "seconds": statistics.median(times),
                     "model_images_per_s": k * len(data.test) / statistics.median(times)})
    return rows


def profile_steps(configs: list[TrialConfig], data, *, steps: int = 50) -> dict[str, Any]:
    """Where a training step's time goes: torch.profiler over `steps` warm steps; on CUDA
    the GPU's busy time (the sum of kernel times) against the wall time, the rest being
    launch gaps and host work."""

    step_throughput(configs, data, steps=5, repeats=1, warm=10)  # compile, autotune outside the profile
    engine = make_engine(configs, data)
    engine.begin_epoch([[c.lr for c in configs]])
    engine.train(True)
    batch = configs[0].batch_size
    order = data.epoch_order(configs[0].seed, 0)
    for step in range(10):
        idx = order[step * batch:(step + 1) * batch]
        engine.train_step(data.to_float(data.train.x[idx]), data.train.y[idx], 0)
    sync(data.device)
    cuda = data.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            engine.train_step(data.to_float(data.train.x[idx]), data.train.y[idx], 0)
        sync(data.device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out = {"k": len(configs), "steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
           "table": events.table(sort_by=sort, row_limit=25)}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels) if kernels and hasattr(kernels[0], "device_time") \
            else sum(e.cuda_time for e in kernels)
        out.update({"kernels_per_step": len(kernels) / steps, "gpu_busy_ms_per_step": busy_us / 1e3 / steps,
                    "gpu_busy_fraction": busy_us / 1e6 / wall})
    return out
