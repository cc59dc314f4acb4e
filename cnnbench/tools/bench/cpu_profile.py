"""`cnnbench bench --profile`: where a wide LeNet-5 training step's time goes on one CPU
thread, K = 3 (the group a worker of the one-seed lr study trained on 2 cores) and K = 8
(the 3-seed study's), and what the C library's allocator costs it (util/host_memory.py).

Two views of the same kind of steps: torch.profiler's wall time per op (what a profile
usually shows), and this process's CPU time per aten op (`OpClock`: a TorchDispatchMode
that times every op it dispatches, backward's included, with time.process_time). On a
machine that other processes load, wall time charges an op for the time the process
waited for a core, and long memory-bound ops (a max-pool's backward, its `fill_`) wait
the most; CPU time does not. Then a group of trials on several seeds (the 3-seed study's
first 8 trials) trained as one group and as the blocks the CPU cuts it into
(`streams.stream_blocks`). Writes profile-cpu-<cpu kind>.md.
"""

from __future__ import annotations

import collections
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from cnnbench.data.tensors import data_dir
from cnnbench.tools.bench.calibrate import Candidate, Slice, slice_config
from cnnbench.tools.bench.common import LR_STUDY, fresh_process
from cnnbench.train import calibration
from cnnbench.train.conv_path import ENV as CONV_PATH_ENV
from cnnbench.train.loop import load_data, train_group
from cnnbench.train.streams import stream_blocks
from cnnbench.util import fileio, host_memory
from cnnbench.util.environ import variables


class OpClock(TorchDispatchMode):
    """Within: this thread's CPU seconds and calls per aten op and input shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.process_time()
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:2]
        key = f"{func.__name__.split('.')[0]} {shapes}"
        self.seconds[key] += time.process_time() - t0
        self.calls[key] += 1
        return out


def op_rows(counts: dict[str, float], calls: dict[str, int], steps: int, top: int) -> list[tuple[str, float, float, int]]:
    """(op, ms per step, share, calls per step) of the `top` ops."""
    total = sum(counts.values()) or 1.0
    return [(op, 1e3 * s / steps, s / total, calls[op] // steps) for op, s in counts.most_common(top)]


def step_cost(k: int, steps: int, root: str, keep: str) -> tuple[float, float]:
    """(ms of CPU time, minor page faults) per wide K=`k` step on one thread, in a process
    whose CNNBENCH_KEEP_FREED_MEMORY is `keep` (a fresh one: the setting is once a process)."""
    os.environ[host_memory.KEEP_ENV] = keep
    torch.set_num_threads(1)
    s = Slice(Candidate("wide", k, True), Path(root))
    s.run(10)
    faults0, cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    s.run(steps)
    faults1, cpu1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    return 1e3 * (cpu1 - cpu0) / steps, (faults1 - faults0) / steps


def stream_group_cost(root: Path, *, steps: int = 60, repeats: int = 3) -> dict[str, float]:
    """ms of CPU time per training step (one thread, channels-last, conv grouped, through
    the loop, each trial its seed's batches; the engines' builds included) of the 3-seed lr
    study's first 8 trials: in the queue's order before (lr by lr: seeds 0,1,2,0,1,2,0,1)
    and now (seed by seed: 0,0,0,0,0,1,1,1) as one wide group, and the latter as the CPU
    trains them (`stream_blocks`, one after the other); medians of `repeats` interleaved
    rounds, after one untimed round."""
    base = slice_config(Candidate("wide", 8, True)).replace(train_subset=steps * 64)
    by_lr = [base.replace(lr=LR_STUDY[i // 3], seed=i % 3) for i in range(8)]
    by_seed = [base.replace(lr=LR_STUDY[i % 5], seed=i // 5) for i in range(8)]
    ways = {"seeds 0,1,2,0,1,2,0,1 as one group": [by_lr], "seeds 0,0,0,0,0,1,1,1 as one group": [by_seed],
            "seeds 0,0,0,0,0,1,1,1 in stream blocks": [[by_seed[i] for i in b]
                                                      for b in stream_blocks([c.seed for c in by_seed])]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {w: [] for w in ways}
    try:
        data = load_data(base, root, torch.device("cpu"))
        with variables({CONV_PATH_ENV: "grouped"}):
            for n in range(1 + repeats):
                for way, groups in ways.items():
                    t0 = time.process_time()
                    for g in groups:
                        train_group(g, data=data, evaluate_test=False, engine="wide" if len(g) > 1 else None)
                    if n:
                        times[way].append(1e3 * (time.process_time() - t0) / steps)
    finally:
        torch.set_num_threads(threads)
    return {w: sorted(v)[len(v) // 2] for w, v in times.items()}


def profile_wide_step(*, data_root: Any = None, out_dir: Path | None = None, ks: tuple[int, ...] = (3, 8),
                      steps: int = 60, top: int = 14, command: str = "",
                      say: Callable[[str], None] = print) -> Path | None:
    """Per K of `ks`: the CPU time and page faults per wide K-trial step on one thread
    (channels-last, conv grouped) in fresh processes, with the freed memory kept (what
    training does, util/host_memory.py) and with glibc's defaults; then both views of its
    ops. Printed, and written to `out_dir`."""
    root = data_dir(data_root)
    m = calibration.machine()
    parts = [f"# Where a wide LeNet-5 step goes on one CPU thread: {m['cpu']}\n\n"
             f"`{command or 'cnnbench bench --profile'}`: torch {m['torch']}, batch 64, channels-last, conv path "
             f"grouped, {steps} steps per view, load average {os.getloadavg()[0]:.1f}. Per K, the CPU time and minor "
             f"page faults per step in a fresh process, with the freed memory kept (what training does) and with "
             f"glibc's defaults (`{host_memory.KEEP_ENV}=0`); then where the time goes, with it kept.\n"]
    threads = torch.get_num_threads()
    for k in ks:
        with fresh_process() as fresh:
            kept = fresh.submit(step_cost, k, steps, str(root), "1").result()
        with fresh_process() as fresh:
            left = fresh.submit(step_cost, k, steps, str(root), "0").result()
        torch.set_num_threads(1)
        try:
            s = Slice(Candidate("wide", k, True), root)
            s.run(10)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                s.run(steps, time.perf_counter)
            wall = collections.Counter({e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()})
            wall_calls = {e.key: e.count for e in prof.key_averages()}
            with OpClock() as clock:
                s.run(steps)
        finally:
            torch.set_num_threads(threads)
        parts.append(f"\n## K = {k}\n\n| allocator | ms of CPU time per step | page faults per step |\n|---|---:|---:|\n"
                     f"| freed memory kept | {kept[0]:.2f} | {kept[1]:,.0f} |\n"
                     f"| glibc's defaults | {left[0]:.2f} | {left[1]:,.0f} |\n")
        for title, counts, calls in (("this process's CPU time per aten op (OpClock)", clock.seconds, clock.calls),
                                     ("torch.profiler, self time per op (wall clock)", wall, wall_calls)):
            rows = op_rows(counts, calls, steps, top)
            parts.append(f"\n### {title}\n\n| op [input shapes] | ms per step | share | calls per step |\n"
                         "|---|---:|---:|---:|\n"
                         + "\n".join(f"| `{op}` | {ms:.3f} | {share:.1%} | {n} |" for op, ms, share, n in rows) + "\n")
    seeds = stream_group_cost(root, steps=steps)
    parts.append("\n## K = 8 on two and three seeds\n\nThe 3-seed lr study's first 8 trials, each its seed's "
                 "batches, through the loop on one thread: ms of CPU time per step (the engines' builds included), "
                 "median of 3 rounds. The CPU trains a group seed by seed (`streams.stream_blocks`: 5 and 3).\n\n"
                 "| trained as | ms per step |\n|---|---:|\n" + "".join(f"| {w} | {ms:.2f} |\n" for w, ms in seeds.items()))
    text = "".join(parts)
    say(text)
    if out_dir is None:
        return None
    path = out_dir / f"profile-cpu-{calibration.cpu_kind(m)}.md"
    fileio.write_text(path, text)
    return path
