"""`cnnbench bench --profile`: where a wide K = 3 LeNet-5 training step's time goes on one
CPU thread (the wide group a worker of the one-seed lr study trains on 2 cores).

Two views of the same kind of steps: torch.profiler's wall time per op (what a profile
usually shows), and this process's CPU time per aten op (`OpClock`: a TorchDispatchMode
that times every op it dispatches, backward's included, with time.process_time). On a
machine that other processes load, wall time charges an op for the time the process
waited for a core, and long memory-bound ops (a max-pool's backward, its `fill_`) wait
the most; CPU time does not. Writes profile-cpu-<cpu kind>.md.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from cnnbench.data.tensors import data_dir
from cnnbench.tools.bench.calibrate import Candidate, Slice
from cnnbench.train import calibration
from cnnbench.util import fileio


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


def profile_wide_step(*, data_root: Any = None, out_dir: Path | None = None, k: int = 3, steps: int = 60,
                      top: int = 14, command: str = "", say: Callable[[str], None] = print) -> Path | None:
    """Both views of `steps` wide K=`k` steps on one thread (channels-last, conv grouped);
    the CPU time per step without any profiler first. Printed, and written to `out_dir`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = Slice(Candidate("wide", k, True), data_dir(data_root))
        s.run(10)
        plain = 1e3 * s.run(steps) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            s.run(steps, time.perf_counter)
        wall = collections.Counter({e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()})
        wall_calls = {e.key: e.count for e in prof.key_averages()}
        with OpClock() as clock:
            s.run(steps)
    finally:
        torch.set_num_threads(threads)
    m = calibration.machine()
    head = (f"# Where a wide K={k} LeNet-5 step goes on one CPU thread: {m['cpu']}\n\n"
            f"`{command or 'cnnbench bench --profile'}`: torch {m['torch']}, batch 64, channels-last, conv path "
            f"grouped, {steps} steps per view, load average {os.getloadavg()[0]:.1f}; {plain:.2f} ms of CPU time "
            f"per step without a profiler.\n")
    parts = [head]
    for title, counts, calls in (("this process's CPU time per aten op (OpClock)", clock.seconds, clock.calls),
                                 ("torch.profiler, self time per op (wall clock)", wall, wall_calls)):
        rows = op_rows(counts, calls, steps, top)
        parts.append(f"\n## {title}\n\n| op [input shapes] | ms per step | share | calls per step |\n|---|---:|---:|---:|\n"
                     + "\n".join(f"| `{op}` | {ms:.3f} | {share:.1%} | {n} |" for op, ms, share, n in rows) + "\n")
    text = "".join(parts)
    say(text)
    if out_dir is None:
        return None
    path = out_dir / f"profile-cpu-{calibration.cpu_kind(m)}.md"
    fileio.write_text(path, text)
    return path
