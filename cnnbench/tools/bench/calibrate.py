"""`cnnbench bench --calibrate`: the CPU layout fastest on this machine, measured in
seconds to a minute and cached for the studies (train/calibration.py).

Every measurement is a short slice of LeNet-5 training as a study trains it (batch 64,
SGD, the learning-rate study's rates, the loop's own engines and steps), in stages, each
stage's candidates interleaved over `repeats` rounds (the median kept), so that the
machine's drifting load hits them alike:
 1. kernels: in this process on one thread, each engine at the group size a worker of
    the one-seed lr study would train (`trials` over the cores): one trial at a time
    (single), wide, vmap; channels-last or not; the wide engine's conv path (grouped or
    bmm). Measured in this process's CPU time per model-image, which other processes on
    the machine do not inflate.
 2. group size: the best fused engine at K = `ks`: the largest group a worker takes
    (`max_k`) is the K of the most model-images per CPU second.
 3. processes: worker processes x threads (w x cores/w), each worker training its share
    of `trials` (and of `more_trials`) at once as the study would, in wall time (the
    slowest worker ends it), in longer rounds and more of them, every round kept: one
    thread per worker stays unless another layout wins most rounds
    (calibration.fastest_processes).
 4. bf16, where the CPU has matrix units (AMX, AVX-512-BF16): the chosen layout and one
    trial at a time, each in bf16 against fp32, and a wide layout's grouped convolutions
    kept in fp32 with the rest in bf16 (conv path "grouped-fp32": oneDNN's bf16 kernel
    for them can be the slower); the fastest in bf16 is the `fast` layout (`cnnbench
    study --fast`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir
from cnnbench.tools.bench.common import lr_configs
from cnnbench.tools.bench.steps import make_engine
from cnnbench.train import calibration
from cnnbench.train.calibration import Calibration, Layout
from cnnbench.train.conv_path import ENV as CONV_PATH_ENV
from cnnbench.train.loop import load_data
from cnnbench.util import fileio
from cnnbench.util.environ import variables

BATCH = 64  # the studies' training batch


@dataclass(frozen=True)
class Sizes:
    """How much the calibration measures (the command's defaults: about a minute on a
    loaded 2-core machine; tests give tiny ones)."""
    steps: int = 24  # timed training steps per measurement
    repeats: int = 3  # interleaved rounds; the median is kept
    process_steps: int = 48  # the process stage's: longer rounds, and more of them, each one kept
    process_repeats: int = 5  # (calibration.fastest_processes compares the layouts round by round)
    warm: int = 4  # untimed steps of each candidate first
    ks: tuple[int, ...] = (2, 4, 8, 16)  # group sizes tried for the best fused engine
    trials: int = 5  # the study the layouts are sized for: the one-seed lr study
    more_trials: int | None = 15  # the process stage measured again for this many (the 3-seed study)
    layouts: tuple[tuple[int, int], ...] | None = None  # (workers, threads) tried; None: from the cores


@dataclass(frozen=True)
class Candidate:
    """One way to train a slice: the engine, K trials, channels-last, conv path, precision."""
    engine: str
    k: int
    channels_last: bool
    conv_path: str = "grouped"
    amp: str = "none"

    @property
    def label(self) -> str:
        conv = f" conv {self.conv_path}" if self.engine == "wide" else ""
        return (f"{self.engine} K={self.k} {'channels-last' if self.channels_last else 'channels-first'}{conv}"
                f"{' bf16' if self.amp == 'bf16' else ''}")


def slice_config(cand: Candidate) -> TrialConfig:
    """The trial a slice trains (its K trials: the lr study's rates, lr_configs)."""
    return TrialConfig(model="lenet5", batch_size=BATCH, epochs=1, train_subset=32 * BATCH, test_subset=256,
                       progress=False, device="cpu", channels_last=cand.channels_last, amp=cand.amp)


class Slice:
    """A candidate's engine on its data, trained step after step on demand."""

    def __init__(self, cand: Candidate, root: Path, data: Any = None) -> None:
        base = slice_config(cand)
        self.cand, self.data = cand, data if data is not None else load_data(base, root, torch.device("cpu"))
        configs = lr_configs(base, cand.k)
        with variables({CONV_PATH_ENV: cand.conv_path}):
            self.engine = make_engine(configs, self.data, None if cand.engine == "single" else cand.engine)
        self.engine.begin_epoch([[c.lr for c in configs]])
        self.engine.train(True)
        self.order, self.step = self.data.epoch_order(0, 0), 0

    def run(self, steps: int, clock: Callable[[], float] = time.process_time) -> float:
        """Seconds (of `clock`) for `steps` training steps."""
        n = len(self.data.train) - BATCH
        with variables({CONV_PATH_ENV: self.cand.conv_path}):
            t0 = clock()
            for _ in range(steps):
                lo = (self.step * BATCH) % max(n, 1)
                self.step += 1
                idx = self.order[lo:lo + BATCH]
                self.engine.train_step(self.data.to_float(self.data.train.x[idx]), self.data.train.y[idx], 0)
            return clock() - t0

    def images(self, steps: int) -> int:
        return self.cand.k * steps * BATCH


def kernel_rates(cands: list[Candidate], root: Path, sizes: Sizes) -> dict[Candidate, float]:
    """Model-images per CPU second of each candidate on one thread, interleaved rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = torch.device("cpu")
        data = {c.channels_last: load_data(slice_config(c), root, cpu) for c in cands}
        slices = [Slice(c, root, data[c.channels_last]) for c in cands]
        for s in slices:
            s.run(sizes.warm)
        samples: dict[Candidate, list[float]] = {c: [] for c in cands}
        for _ in range(sizes.repeats):
            for s in slices:
                samples[s.cand].append(s.images(sizes.steps) / max(s.run(sizes.steps), 1e-9))
        return {c: statistics.median(v) for c, v in samples.items()}
    finally:
        torch.set_num_threads(threads)


# -- worker processes (stage 3) ------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # a calibration worker process's slice and barrier


def _worker_init(cand: Candidate, threads: int, root: str, warm: int, barrier: Any) -> None:
    torch.set_num_threads(threads)
    _WORKER["slice"] = s = Slice(cand, Path(root))
    _WORKER["barrier"] = barrier
    s.run(warm)


def _worker_round(steps: int) -> tuple[int, float]:
    """In a worker: wait for the others, then (images, wall seconds) of `steps` steps."""
    _WORKER["barrier"].wait()
    s = _WORKER["slice"]
    return s.images(steps), s.run(steps, time.perf_counter)


def process_rates(cand: Candidate, layouts: list[tuple[int, int]], root: Path, sizes: Sizes,
                  max_k: int) -> dict[tuple[int, int], list[float]]:
    """Model-images/s (wall) of each (workers, threads), round by round: every worker
    training its first group of `sizes.trials` at once (calibration.first_groups), the
    slowest worker ending a round; `sizes.process_repeats` interleaved rounds of
    `sizes.process_steps` steps, after one untimed round of each layout: the first round
    of two workers training together measured 20,136 to 32,823 model-images/s where the
    rounds after it measured 35,193 to 55,085 (four calibrations on a 2-core EPYC; each
    worker's own warm-up steps, trained before the others had started, did not settle it)."""
    ctx = multiprocessing.get_context("spawn")
    pools, samples = {}, {lay: [] for lay in layouts}
    try:
        for w, t in layouts:
            barrier = ctx.Barrier(w)
            ks = calibration.first_groups(sizes.trials, w, max_k if cand.engine != "single" else 1)
            pools[(w, t)] = [ctx.Pool(1, _worker_init, (replace(cand, k=k), t, str(root), sizes.warm, barrier))
                             for k in ks]
        for n in range(1 + sizes.process_repeats):  # the first round untimed (see the docstring)
            for lay, workers in pools.items():
                pending = [p.apply_async(_worker_round, (sizes.process_steps,)) for p in workers]
                done = [r.get() for r in pending]
                if n:
                    samples[lay].append(sum(i for i, _ in done) / max(max(s for _, s in done), 1e-9))
    finally:
        for workers in pools.values():
            for p in workers:
                p.terminate()
    return samples


def worker_layouts(cores: int) -> list[tuple[int, int]]:
    """(workers, threads) tried on `cores` cores: one worker per core, one worker on all
    of them and, from 4 cores, half as many workers of two threads."""
    return sorted({(cores, 1), (1, cores), *([(cores // 2, 2)] if cores >= 4 else [])}, reverse=True)


# -- the calibration -------------------------------------------------------------------------


def measure(root: Path, sizes: Sizes = Sizes(), say: Callable[[str], None] = print) -> Calibration:
    """The four stages (see the module's docstring): the chosen layouts and every figure."""
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    m = calibration.machine()
    cores = m["cores"]
    k_ref = max(1, math.ceil(sizes.trials / cores))
    figures: list[dict[str, Any]] = []

    def note(stage: str, what: str, rate: float, clock: str) -> None:
        figures.append({"stage": stage, "what": what, "model_images_per_s": round(rate, 1), "clock": clock})
        say(f"  {stage:<10} {what:<52} {rate:>10,.0f} model-images/s ({clock})")

    say(f"calibrating the CPU layout: {m['cpu']}, {cores} core(s), torch {m['torch']}, "
        f"load average {load0:.1f}")
    cands = [Candidate("single", 1, cl) for cl in (True, False)]
    cands += [Candidate("wide", k_ref, cl, conv) for cl in (True, False) for conv in ("grouped", "bmm")]
    cands += [Candidate("vmap", k_ref, cl) for cl in (True, False)] if k_ref > 1 else []
    rates = kernel_rates(cands, root, sizes)
    for c, r in rates.items():
        note("kernels", c.label + ", 1 thread", r, "cpu")
    best = max(rates, key=rates.get)
    max_k = 1
    if best.engine != "single":
        group = [replace(best, k=k) for k in sorted(set(sizes.ks) - {k_ref})]
        k_rates = {k_ref: rates[best], **{c.k: r for c, r in kernel_rates(group, root, sizes).items()}}
        for k, r in sorted(k_rates.items()):
            note("group", f"{replace(best, k=k).label}, 1 thread", r, "cpu")
        max_k = max(sorted(k_rates), key=k_rates.get)
    layouts = list(sizes.layouts or worker_layouts(cores))
    workers, threads = layouts[0]
    processes = []
    if len(layouts) > 1:
        for trials in (sizes.trials, *([sizes.more_trials] if sizes.more_trials else [])):
            p_rounds = process_rates(best, layouts, root, replace(sizes, trials=trials), max_k)
            for (w, t), rounds in p_rounds.items():
                ks = calibration.first_groups(trials, w, max_k)  # max_k is 1 where the best engine is single
                r = statistics.median(rounds)
                note("processes", f"{w} x {t} thread(s), groups {'+'.join(map(str, ks))}", r, "wall")
                processes.append({"workers": w, "threads": t, "trials": trials, "model_images_per_s": round(r, 1),
                                  "rounds": [round(x, 1) for x in rounds]})
        chosen = calibration.fastest_processes(processes, sizes.trials, max_k)
        workers, threads = chosen["workers"], chosen["threads"]
    layout = Layout(workers, threads, best.engine, max_k, best.channels_last, best.conv_path)
    fast, bf16 = bf16_stage(m, best, root, sizes, layout, note)
    load1 = os.getloadavg()[0]
    say(f"chosen: {layout.describe()}" + (f"; with --fast (bf16): {fast.describe()}" if fast else "")
        + f"\n{bf16}\nmeasured in {time.perf_counter() - t0:.0f} s, load average {load0:.1f} -> {load1:.1f}")
    return Calibration(machine=m, layout=layout, fast=fast, figures=figures, bf16=bf16,
                       seconds=round(time.perf_counter() - t0, 1), load=(round(load0, 2), round(load1, 2)),
                       processes=processes)


def bf16_stage(m: dict[str, Any], best: Candidate, root: Path, sizes: Sizes, layout: Layout,
               note: Callable[[str, str, float, str], None]) -> tuple[Layout | None, str]:
    """Stage 4: bf16 against fp32 at the chosen engine (a wide one also with its grouped
    convolutions in fp32) and one trial at a time, where the CPU has matrix units; (the
    fast layout, a sentence on what was measured)."""
    units = calibration.matrix_units(m)
    if not units:
        return None, "bf16: not measured (no bf16 matrix units: AMX, AVX-512-BF16); fp32 only"
    fp32 = [best] + ([Candidate("single", 1, best.channels_last)] if best.engine != "single" else [])
    bf16 = {c.engine: (c, replace(c, amp="bf16")) for c in fp32}  # name: (the fp32 candidate, its bf16 way)
    if best.engine == "wide" and best.conv_path == "grouped":  # its grouped convolutions in fp32, the rest bf16
        bf16["wide with grouped convolutions in fp32"] = (best, replace(best, amp="bf16", conv_path="grouped-fp32"))
    rates = kernel_rates([*fp32, *(c for _, c in bf16.values())], root, sizes)
    for c, r in rates.items():
        note("bf16", c.label + ", 1 thread", r, "cpu")
    ratios = {name: rates[c] / rates[base] for name, (base, c) in bf16.items()}
    chosen = max((c for _, c in bf16.values()), key=rates.get)
    fused = chosen.engine != "single"  # one trial at a time: K = 1, the layout's conv path kept
    fast = replace(layout, engine=chosen.engine, max_k=layout.max_k if fused else 1,
                   conv_path=chosen.conv_path if fused else layout.conv_path)
    text = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
    return fast, f"bf16 ({', '.join(units)}): bf16 / fp32 model-images per CPU second: {text}"


def calibrate(*, data_root: Any = None, state: Any = None, force: bool = False, sizes: Sizes = Sizes(),
              out_dir: Path | None = None, command: str = "",
              say: Callable[[str], None] = print) -> tuple[Calibration, Path | None]:
    """This machine's calibration: the cached one, else (or with `force`) measured, saved
    in the state folder and, with `out_dir`, written as calibration-<cpu kind>.md there;
    and the path of that file (None when nothing was measured)."""
    if not force:
        cal = calibration.load(state)
        if cal is not None:
            say(f"calibration of this machine (cached, {calibration.cache_path(state)}): {cal.layout.describe()}"
                + (f"; with --fast (bf16): {cal.fast.describe()}" if cal.fast else ""))
            return cal, None
    cal = measure(data_dir(data_root), sizes, say)
    say(f"saved {calibration.save(cal, state)}")
    md = None
    if out_dir is not None:
        md = out_dir / f"calibration-{calibration.cpu_kind(cal.machine)}.md"
        fileio.write_text(md, markdown(cal, command))
    return cal, md


def markdown(cal: Calibration, command: str = "") -> str:
    """The calibration as results/bench/calibration-<cpu kind>.md."""
    m = cal.machine
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in m.get("flags", [])]
    rows = "\n".join(f"| {f['stage']} | {f['what']} | {f['model_images_per_s']:,.0f} | {f['clock']} |"
                     for f in cal.figures)
    studies = "; ".join(f"{n} trials {by_trials(cal, n)}" for n in (5, 15, 30))
    per_study = ("- workers per study, from the process stage's rounds rescaled to the study's trials "
                 f"(calibration.fastest_processes): {studies}\n" if cal.processes else "")
    return (f"# CPU calibration: {m['cpu']} ({calibration.cpu_kind(m)})\n\n"
            f"`{command or 'cnnbench bench --calibrate'}`: {m['cores']} usable core(s), torch {m['torch']}, "
            f"flags {', '.join(flags) or 'none of avx2/avx512/amx'}; measured in {cal.seconds:.0f} s at load "
            f"average {cal.load[0]:.1f} -> {cal.load[1]:.1f} (key `{cal.key}`).\n\n"
            f"- chosen (fp32, what `cnnbench study` uses here): **{cal.layout.describe()}**\n{per_study}"
            f"- `--fast` (bf16): {cal.fast.describe() if cal.fast else 'not offered'}\n- {cal.bf16}\n\n"
            "Model-images/s of a short LeNet-5 training slice (batch 64), median of interleaved rounds; `cpu`: per "
            "second of this process's CPU time on one thread (other processes on the machine do not count), "
            "`wall`: per second of wall time, the slowest worker ending a round.\n\n"
            f"| stage | layout | model-images/s | clock |\n|---|---|---:|---|\n{rows}\n{process_rounds(cal)}")


def process_rounds(cal: Calibration) -> str:
    """The process stage's rounds, as markdown: what `calibration.fastest_processes` compares."""
    if not cal.processes:
        return ""
    rows = "\n".join(f"| {p['trials']} | {p['workers']} x {p['threads']} | "
                      f"{', '.join(f'{r:,.0f}' for r in p.get('rounds', []))} |" for p in cal.processes)
    return ("\nThe process stage round by round (model-images/s, wall; one untimed round first). One thread per "
            "worker stays unless another layout is faster by its median and in more than two thirds of the rounds, "
            "each compared with the same round of the one-thread layout (`calibration.fastest_processes`).\n\n"
            f"| trials | workers x threads | rounds |\n|---:|---|---|\n{rows}\n")


def by_trials(cal: Calibration, trials: int) -> str:
    """`W x T thread(s)`: the workers and threads a study of `trials` trials gets."""
    layout = cal.for_trials(cal.layout, trials)
    return f"{layout.workers} x {layout.threads} thread(s)"
