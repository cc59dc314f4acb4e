"""`cnnbench bench`: what a study costs through cnnbench's loop against the naive loop.

In one run, on one device, it times
  naive   the loop a user writes from the documents: torchvision MNIST with ToTensor and
          Normalize, a shuffled DataLoader, `.to(device)` per batch, `loss.item()` every
          step, trials one after another;
  single  cnnbench's loop (device-resident data, no per-step sync), one trial at a time;
  fused   cnnbench's loop with K trials stacked and vmapped, K = 1, 2, 4, 5, 8, ... until
          the throughput stops rising (5 is the learning-rate study's K);
  wide    the same K trials as one wide model (wide.py), K = 1, 2, 4, 5, 8, ...; on the CPU
          also `wide-workers`: one single-thread process per core, each training a wide
          group (the study runner's CPU default where the model widens);
  workers the study runner's CPU default: one single-trial process per core at once;
and, with --options, each GPU option (bf16 autocast, channels_last, torch.compile, CUDA
graphs through compile's reduce-overhead mode) on the fused loop. Throughput is in
model-images per second (K models each seeing an image count K times). Measurements are
interleaved over several repeats after an untimed warm-up, and the median is shown with
the ratio to the naive loop measured in the same run: these machines are noisy.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from cnnbench.config.spec import SearchDim, StudySpec, SweepSettings
from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import DATASETS, data_dir, load_arrays
from cnnbench.errors import ConfigError
from cnnbench.models import get_model, list_models
from cnnbench.run.engine import default_fuse_k, open_sweep, work
from cnnbench.run.study import execution, run_study
from cnnbench.track.schema import ATTR_FUSED_WITH, ATTR_TRAIN_SECONDS
from cnnbench.train.device import configure_backends, resolve_device, set_tf32, sync
from cnnbench.train.fused import FusedEngine, fusable
from cnnbench.train.loop import evaluate, load_data, train_group
from cnnbench.train.single import SingleEngine
from cnnbench.util import fileio

LR_STUDY = (0.001, 0.005, 0.01, 0.05, 0.1)
LR_STUDY_IMAGES = len(LR_STUDY) * 10 * 60_000  # 5 trials x 10 epochs of 60,000 training images

# FP32 (non-tensor-core) peak of common accelerators, TFLOP/s, for the fraction reached
FP32_PEAK_TFLOPS = {"H100 SXM": 67.0, "H100 PCIe": 51.0, "H100": 67.0, "H200": 67.0, "A100": 19.5,
                    "L40S": 91.6, "L4": 30.3, "A10G": 31.2, "V100": 15.7, "T4": 8.1, "RTX 4090": 82.6}


@dataclass
class Measurement:
    method: str
    k: int
    samples: list[float] = field(default_factory=list)  # model-images/s per repeat
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan


def naive_trial(config: TrialConfig, root: Path, device: torch.device, *, epochs: int = 1,
                max_steps: int | None = None, evaluate: bool = False, warm: int = 10) -> tuple[float, float]:
    """The documents' loop. Returns (training images/s after `warm` untimed steps, total seconds)."""

    start = time.perf_counter()
    info = DATASETS[config.dataset]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    cls = getattr(torchvision.datasets, info.torchvision_class)
    train, test = cls(root=str(root), train=True, transform=tf), cls(root=str(root), train=False, transform=tf)
    if max_steps is not None:
        train = Subset(train, range(min(len(train), (max_steps + warm) * config.batch_size)))
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True)
    torch.manual_seed(config.seed)
    model = get_model(config.model, in_channels=info.channels, num_classes=info.classes, image_size=info.size,
                      activation=config.activation).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    running, seen, t0 = 0.0, 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for i, (x, y) in enumerate(loader):
            if epoch == 0 and i == warm:
                sync(device)
                t0, seen = time.perf_counter(), 0
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            running += loss.item()  # as the documents print the running loss
            seen += x.shape[0]
        if evaluate:
            model.eval()
            correct = 0
            with torch.no_grad():
                for x, y in DataLoader(test, batch_size=config.test_batch_size):
                    x, y = x.to(device), y.to(device)
                    correct += (model(x).argmax(1) == y).sum().item()
    sync(device)
    end = time.perf_counter()
    return seen / (end - t0), end - start


def naive_loop(config: TrialConfig, root: Path, device: torch.device, steps: int) -> float:
    return naive_trial(config, root, device, max_steps=steps)[0]


def cnnbench_loop(configs: list[TrialConfig], data, fused: bool = False, engine: str | None = None) -> float:
    """cnnbench's training throughput (model-images/s) over one epoch of `data`
    (`engine`: the fused engine, "wide" or "vmap"; None: train_group's choice)."""
    results = train_group(configs, data=data, evaluate_test=False, fused=fused, engine=engine)
    r = results[0]
    if r.status != "finished":
        raise RuntimeError(f"benchmark trial {r.status}: {r.reason}")
    return len(configs) * r.images / r.train_seconds


def _worker_throughput(args: tuple[TrialConfig, str, int, Any]) -> float:
    """In a worker process with `threads` threads: one trial's throughput, warmed up."""
    config, root, threads, barrier = args
    torch.set_num_threads(threads)
    data = load_data(config, root, resolve_device(config.device))
    cnnbench_loop([config], data)
    barrier.wait()  # every worker measures at the same time
    return cnnbench_loop([config], data)


def parallel_workers(config: TrialConfig, root: Path, workers: int, threads: int) -> float:
    """Model-images/s of `workers` single-trial processes training at once with `threads`
    threads each: what the study runner does on the CPU (`study.execution`)."""

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(workers)
        with ctx.Pool(workers) as pool:
            rates = pool.map(_worker_throughput, [(config.replace(lr=LR_STUDY[i % 5]), str(root),
                                                   threads, barrier) for i in range(workers)])
    return sum(rates)


def flops_per_image(config: TrialConfig, device: torch.device) -> float:
    """Training FLOPs per image (forward + backward), counted by torch.utils.flop_counter."""

    info = DATASETS[config.dataset]
    model = get_model(config.model, in_channels=info.channels, num_classes=info.classes, image_size=info.size,
                      activation=config.activation).to(device)
    x = torch.randn(config.batch_size, info.channels, info.size, info.size, device=device)
    y = torch.randint(0, info.classes, (config.batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / config.batch_size


def fp32_peak(device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, how it was found) for the fraction-of-peak figure."""
    if device.type != "cuda":
        return math.nan, "n/a on this device"
    name = torch.cuda.get_device_name(device)
    for key, tflops in sorted(FP32_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops, f"{name} datasheet"
    set_tf32(False)
    a = torch.randn(8192, 8192, device=device)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12, f"{name}, measured FP32 matmul"


def run_bench(*, data_root=None, device: str = "auto", model: str = "lenet5", batch_size: int = 64,
              steps: int = 200, repeats: int = 3, max_k: int | None = None, options: bool = False,
              out_dir: Path | None = Path("results/bench"), say: Callable[[str], None] = print) -> dict[str, Any]:
    dev = resolve_device(device)
    root = data_dir(data_root)
    load_arrays("mnist", root)
    if out_dir is not None:
        fileio.check_writable(out_dir)
    max_k = max_k or (1024 if dev.type == "cuda" else 16)
    base = TrialConfig(model=model, batch_size=batch_size, epochs=1, train_subset=steps * batch_size,
                       test_subset=1000, log_every=50, progress=False, device=str(dev), checkpoints="final")
    say(f"device {dev} ({_device_name(dev)}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}; {model}, batch {batch_size}, {steps} steps per measurement, "
        f"{repeats} repeats, median shown")
    data = load_data(base, root, dev)

    def lrs(k: int) -> list[TrialConfig]:
        return [base.replace(lr=LR_STUDY[i % len(LR_STUDY)], seed=i // len(LR_STUDY)) for i in range(k)]

    measures: dict[tuple[str, int], Measurement] = {}
    plan: list[tuple[str, int, Callable[[], float]]] = [
        ("naive", 1, lambda: naive_loop(base, root, dev, steps)),
        ("single", 1, lambda: cnnbench_loop([base], data)),
    ]
    if dev.type == "cpu":

        _, workers, threads = execution(str(dev), None, None)
        if workers > 1:  # the study runner's default on the CPU
            plan.append(("workers", workers, lambda: parallel_workers(base, root, workers, threads)))
    ks = [k for k in (1, 2, 4, 5, 8, 16, 32, 64, 128, 256, 512, 1024) if k <= max_k]

    # untimed warm-up of every path (lazy init, cuDNN autotuning, first allocations)
    naive_loop(base, root, dev, 5)
    cnnbench_loop([base], data)
    cnnbench_loop(lrs(2), data, fused=True, engine="vmap")

    for rep in range(repeats):  # interleaved so that drifting machine load hits every method alike
        for method, k, fn in plan:
            measures.setdefault((method, k), Measurement(method, k)).samples.append(fn())
        say(f"  repeat {rep + 1}/{repeats}: " + ", ".join(
            f"{m.method}{'' if m.k == 1 else f' x{m.k}'} {m.samples[-1]:,.0f}" for m in measures.values())
            + " model-images/s")

    # fused: K upward until the throughput stops rising (< 5% over the previous K)
    previous = 0.0
    for k in ks:
        m = Measurement("fused", k)
        configs = lrs(k)
        cnnbench_loop(configs, data, fused=True, engine="vmap")  # warm-up for this K
        for _ in range(repeats):
            m.samples.append(cnnbench_loop(configs, data, fused=True, engine="vmap"))
        measures[("fused", k)] = m
        say(f"  fused K={k:<3} {m.median:>12,.0f} model-images/s")
        if k >= 5 and m.median < previous * 1.05:
            break
        previous = max(previous, m.median)

    # the wide engine, by K, and (CPU) worker processes each training a wide group
    measures.update(wide_measures(base, data, root, ks, repeats, say))

    if options:  # each option flipped alone from the device's defaults, one engine reused per option
        for k in _option_ks(dev, max_k):
            base_m = Measurement("fused+defaults" if k > 1 else "single+defaults", k)
            variants = [("defaults", {})] + _option_variants(dev, k)
            for label, change in variants:
                configs = [c.replace(**change) for c in lrs(k)]
                m = base_m if label == "defaults" else Measurement(f"{'fused' if k > 1 else 'single'}+{label}", k)
                try:
                    variant_data = load_data(configs[0], root, dev)
                    m.samples = step_throughput(configs, variant_data, steps=steps, repeats=repeats,
                                                step_graph=label == "step_graph")
                except Exception as err:  # an option this device lacks is reported, not fatal
                    m.note = f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
                if m.samples and base_m.samples and m is not base_m:
                    m.note = (m.note + " " if m.note else "") + f"{m.median / base_m.median:.2f}x the defaults"
                measures[(m.method, k)] = m
                say(f"  {m.method:<26} K={k:<4} {m.median:>12,.0f} model-images/s {m.note}")
        set_tf32(False)

    naive = measures[("naive", 1)].median
    flops = flops_per_image(base, dev)
    peak, peak_source = fp32_peak(dev)
    rows = []
    for m in measures.values():
        rows.append({"method": m.method, "k": m.k, "model_images_per_s": round(m.median, 1),
                     "ratio_to_naive": round(m.median / naive, 2), "repeats": len(m.samples),
                     "min": round(min(m.samples), 1) if m.samples else math.nan,
                     "max": round(max(m.samples), 1) if m.samples else math.nan,
                     "fraction_of_fp32_peak": m.median * flops / (peak * 1e12) if peak == peak else math.nan,
                     "note": m.note})
    fused = {k: m.median for (method, k), m in measures.items() if method == "fused"}
    k_lr = 5 if 5 in fused else max(fused)
    projection = {
        "naive, sequential": LR_STUDY_IMAGES / naive,
        "cnnbench, one trial at a time": LR_STUDY_IMAGES / measures[("single", 1)].median,
        f"cnnbench fused (K={k_lr})": LR_STUDY_IMAGES / fused[k_lr],
    }
    for (method, k), m in measures.items():
        if method == "workers":
            projection[f"cnnbench, {k} worker processes"] = LR_STUDY_IMAGES / m.median
    projection.update(wide_projection(measures))
    summary = {"device": str(dev), "device_name": _device_name(dev), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "model": model, "batch_size": batch_size, "steps": steps,
               "repeats": repeats, "flops_per_training_image": flops, "fp32_peak_tflops": peak,
               "peak_source": peak_source, "rows": rows, "projection_seconds": projection}
    say(_report(summary))
    if out_dir is not None:
        _write(summary, out_dir)
    return summary


def _option_ks(dev: torch.device, max_k: int) -> list[int]:
    """The paths the options are timed on: one trial, and on an accelerator a fused group
    the size of the 3-seed learning-rate study (15 trials, max_fuse 16)."""
    return [1, min(16, max_k)] if dev.type == "cuda" and max_k > 1 else [1]


def _option_variants(dev: torch.device, k: int = 1) -> list[tuple[str, dict[str, Any]]]:
    """Each speed option flipped from the device's default (channels_last: on for the
    CPU, off elsewhere; everything else off, cuDNN autotuning on). On CUDA the single
    trial skips the slow-to-compile variants that the fused group times."""
    on_cpu = dev.type == "cpu"
    variants = [("nchw", {"channels_last": False}) if on_cpu else ("channels_last", {"channels_last": True}),
                ("bf16", {"amp": "bf16"}), ("compile", {"compile": "default"})]
    if dev.type == "cuda":
        variants += [("tf32", {"tf32": True}), ("no_cudnn_benchmark", {"cudnn_benchmark": False}),
                     ("cudagraphs", {"compile": "reduce-overhead"}),
                     ("bf16+cudagraphs", {"amp": "bf16", "compile": "reduce-overhead"}),
                     ("step_graph", {})]  # the whole step as one CUDA graph (see step_throughput)
        if k == 1:
            variants = [v for v in variants if v[0] not in ("compile", "bf16+cudagraphs")]
    return variants


def make_engine(configs: list[TrialConfig], data) -> Any:
    """The engine train_group would use for `configs` (one trial: SingleEngine)."""
    configure_backends(configs[0], data.device)
    if len(configs) == 1:
        return SingleEngine(configs, data.device, data.info)

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


def time_evaluation(base: TrialConfig, data, *, k: int, sizes: tuple[int, ...], repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds for one pass over the test set by K fused models, per test batch size
    (the setting changes no result, only speed)."""
    configs = [base.replace(lr=LR_STUDY[i % len(LR_STUDY)], seed=i // len(LR_STUDY)) for i in range(k)]
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


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


def _report(s: dict[str, Any]) -> str:
    lines = ["", f"{'method':<24}{'K':>4}{'model-images/s':>16}{'x naive':>9}{'fp32 peak':>11}"]
    for r in s["rows"]:
        frac = r["fraction_of_fp32_peak"]
        lines.append(f"{r['method']:<24}{r['k']:>4}{r['model_images_per_s']:>16,.0f}{r['ratio_to_naive']:>9.2f}"
                     f"{(f'{frac:.2%}' if frac == frac else '–'):>11} {r['note']}")
    lines.append("")
    lines.append(f"learning-rate study (5 trials x 10 epochs x 60,000 images), projected training time "
                 f"({s['flops_per_training_image'] / 1e6:.2f} MFLOP per training image):")
    naive = s["projection_seconds"]["naive, sequential"]
    for name, sec in s["projection_seconds"].items():
        lines.append(f"  {name:<32} {sec:>9.1f} s  ({naive / sec:.2f}x)")
    return "\n".join(lines)


def _write(s: dict[str, Any], out_dir: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no backend chosen or switched

    frame = pd.DataFrame(s["rows"])
    fileio.write_text(out_dir / "bench.csv", frame.to_csv(index=False))
    fileio.write_text(out_dir / "bench.md", "```\n" + _report(s).strip() + "\n```\n\n"
                      f"device: {s['device']} ({s['device_name']}), torch {s['torch']}, {s['threads']} threads\n")
    fused = frame[frame["method"] == "fused"]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    ax.plot(fused["k"], fused["model_images_per_s"], marker="o", label="cnnbench fused (vmap)")
    wide = frame[frame["method"] == "wide"]
    if not wide.empty:
        ax.plot(wide["k"], wide["model_images_per_s"], marker="s", label="cnnbench fused (wide)")
    for method, style in (("single", "--"), ("naive", ":")):
        row = frame[frame["method"] == method]
        if not row.empty:
            ax.axhline(row["model_images_per_s"].iloc[0], linestyle=style, color="grey", label=f"{method} (K=1)")
    ax.set(xscale="log", xlabel="trials trained together (K)", ylabel="model-images / s",
           title=f"{s['model']}, batch {s['batch_size']} on {s['device']}")
    ax.set_xticks(fused["k"].tolist(), [str(k) for k in fused["k"]])
    ax.legend()
    fig.tight_layout()
    fileio.write_with(out_dir / "throughput.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def time_lr_study(*, data_root=None, device: str = "auto", epochs: int = 10, say=print,
                  out_dir: Path | None = None) -> dict[str, float]:
    """The learning-rate study for real, both ways: cnnbench's study runner with its
    defaults for this device (MLflow logging, checkpoints and results included, into a
    throwaway store), and the naive loop trial after trial with a test pass per epoch."""

    dev = resolve_device(device)
    root = data_dir(data_root)
    fixed = {"model": "lenet5", "activation": "sigmoid", "batch_size": 64, "momentum": 0.9, "epochs": epochs,
             "test_batch_size": 1024, "device": str(dev), "progress": False, "log_every": 10}
    spec = StudySpec(name="bench-lr", path="(cnnbench bench --lr-study)", title="lr study, timed",
                     source="document 003", description="", scientific={"lr": LR_STUDY}, nuisance={},
                     fixed=fixed, seeds=(0,), reported=())
    timed = {}
    for share in (False, True) if dev.type == "cpu" else (False,):  # --share-cores: only the CPU's threads
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run_study(spec, data_root=root, results_root=Path(tmp) / "results", tracking=f"sqlite:///{tmp}/mlflow.db",
                      state=Path(tmp) / "state", share_cores=share)
            timed[share] = time.perf_counter() - t0
        say(f"cnnbench study runner{' --share-cores' if share else ''}, 5 trials x {epochs} epochs (test set after "
            f"each epoch, MLflow, checkpoints, results): {timed[share]:.1f} s")
    ours = timed[False]
    base = TrialConfig.from_dict(fixed)
    naive = sum(naive_trial(base.replace(lr=lr), root, dev, epochs=epochs, evaluate=True)[1] for lr in LR_STUDY)
    say(f"naive loop, 5 trials one after another, the same epochs and test passes: {naive:.1f} s; "
        f"cnnbench is {naive / ours:.2f}x faster" + (f", {naive / timed[True]:.2f}x with --share-cores"
                                                     if True in timed else ""))
    if out_dir is not None:
        shared = (f"| the same with `--share-cores` (a worker out of trials gives its core to the other; not "
                  f"bitwise repeatable) | {timed[True]:.1f} | {naive / timed[True]:.2f} |\n" if True in timed else "")
        fileio.write_text(out_dir / "lr_study.md", (
            f"# The learning-rate study, timed both ways\n\n"
            f"5 trials (lr {', '.join(map(str, LR_STUDY))}) x {epochs} epochs of LeNet-5 on all of MNIST, a test "
            f"pass after each epoch, on {dev} ({_device_name(dev)}), torch {torch.__version__}.\n\n"
            f"| way | wall time (s) | x naive |\n|---|---|---|\n"
            f"| naive loop, trials one after another | {naive:.1f} | 1.00 |\n"
            f"| cnnbench study runner (its defaults here; MLflow, checkpoints, results included) | {ours:.1f} "
            f"| {naive / ours:.2f} |\n" + shared))
    return {"naive_seconds": naive, "cnnbench_seconds": ours, "ratio": naive / ours,
            **({"shared_seconds": timed[True]} if True in timed else {})}


# ----------------------------------------------------------------------------------------
# `cnnbench bench --sweep`: one Optuna sweep, one trial at a time and K fused


SWEEP_SEARCH = {  # the searched settings that fuse (fused.PER_TRIAL): every trial joins a group
    "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
    "momentum": {"type": "float", "low": 0.0, "high": 0.95},
    "weight_decay": {"type": "float", "low": 1.0e-6, "high": 1.0e-3, "log": True},
}


def sweep_bench_spec(*, device: str, n_trials: int = 32, epochs: int = 3, train_subset: int | None = None,
                     val_size: int = 10_000, batch_size: int = 64):
    """The benchmark's sweep: LeNet-5 (ReLU: it learns within an epoch or two, so that a
    shrunk bench still finds a real best) on MNIST, TPE over lr, momentum and weight
    decay, fixed epochs, no pruning (every trial trains as long)."""

    fixed = {"model": "lenet5", "activation": "relu", "dataset": "mnist", "optimizer": "sgd",
             "batch_size": batch_size, "epochs": epochs, "val_size": val_size, "test_subset": 1000,
             "test_batch_size": 1024, "log_every": 50, "progress": False, "device": device}
    if train_subset:
        fixed["train_subset"] = train_subset
    search = tuple(SearchDim(name=n, type=d["type"], low=d["low"], high=d["high"], log=d.get("log", False))
                   for n, d in SWEEP_SEARCH.items())
    return StudySpec(name="bench-sweep", path="(cnnbench bench --sweep)", title="a LeNet-5 sweep, timed",
                     source="issue 14", description="", scientific={}, nuisance={}, fixed=fixed, seeds=(0,),
                     reported=(), search=search,
                     sweep=SweepSettings(sampler="tpe", pruner="none", n_trials=n_trials, final_seeds=(0,),
                                         startup_trials=8))


def time_sweep(*, data_root=None, device: str = "auto", n_trials: int = 32, epochs: int = 3,
               fuse_k: int | None = None, train_subset: int | None = None, val_size: int = 10_000,
               sampler_seed: int = 0, out_dir: Path | None = Path("results/bench"),
               say: Callable[[str], None] = print) -> dict[str, Any]:
    """The same sweep (`sweep_bench_spec`, sampler seed fixed) through the real sweep
    worker twice, each into a throwaway Optuna storage and MLflow store (every trial's
    child run, metrics, checkpoints and artifacts included, the final re-runs not): one
    trial at a time, then `fuse_k` at a time (default: the device's, at least 8, so
    that the CPU shows the fused figure too). Writes OUT_DIR/sweep.md (sweep-<device>.md
    off the CPU's and CUDA's default names: sweep-cuda.md, sweep-mps.md)."""

    dev = resolve_device(device)
    root = data_dir(data_root)
    load_arrays("mnist", root)
    if out_dir is not None:
        fileio.check_writable(out_dir)
    k = fuse_k or max(default_fuse_k(str(dev)), 8)
    spec = sweep_bench_spec(device=str(dev), n_trials=n_trials, epochs=epochs, train_subset=train_subset,
                            val_size=val_size)
    base = spec.base_config()
    n_train = base.train_subset or (60_000 - val_size)
    say(f"sweep bench on {dev} ({_device_name(dev)}), torch {torch.__version__}, {torch.get_num_threads()} threads: "
        f"{n_trials} trials of LeNet-5 x {epochs} epochs x {n_train:,} training images ({val_size:,} validation), "
        f"TPE (sampler seed {sampler_seed}), no pruning; one at a time, then K={k} fused")
    # untimed warm-up of both engines (lazy init, cuDNN autotuning, first allocations)
    warm = base.replace(epochs=1, train_subset=min(n_train, 20 * base.batch_size), val_size=0, lr=0.01)
    warm_data = load_data(warm, root, dev)
    train_group([warm], data=warm_data, evaluate_test=False)
    train_group([warm, warm.replace(lr=0.02)], data=warm_data, evaluate_test=False)
    del warm_data

    ways: dict[str, dict[str, Any]] = {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan  # a shared machine's figures vary
    for label, kk in (("one at a time", 1), (f"fused, K={k}", k)):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            sweep = open_sweep(spec, storage=f"sqlite:///{tmp}/optuna.db", tracking=f"sqlite:///{tmp}/mlflow.db",
                               state=Path(tmp) / "state", results_root=Path(tmp) / "results", n_trials=n_trials,
                               sampler_seed=sampler_seed, data_root=root, fuse_k=kk, worker="bench")
            t1 = time.perf_counter()  # a fresh store's tables created: once per sweep, not per trial
            report = work(sweep)
            wall = time.perf_counter() - t1
            trials = sweep.study.get_trials(deepcopy=False)
            done = [t for t in trials if t.state.name == "COMPLETE"]
            # a fused group's training time once, not once per member
            train_s = sum(t.user_attrs.get(ATTR_TRAIN_SECONDS, 0.0) / t.user_attrs.get(ATTR_FUSED_WITH, 1)
                          for t in done)
            ways[label] = {"k": kk, "wall_seconds": wall, "open_seconds": t1 - t0, "trials": len(done), "trials_per_hour": 3600 * len(done) / wall,
                           "best_val_acc": sweep.study.best_value if done else math.nan,
                           "train_seconds": train_s, "states": dict(report.states)}
            say(f"  {label}: {len(done)} trials in {wall:.1f} s, {ways[label]['trials_per_hour']:,.0f} trials/hour, "
                f"best val acc {ways[label]['best_val_acc']:.2f} %")
    one, fused = ways["one at a time"], ways[f"fused, K={k}"]
    summary = {"device": str(dev), "device_name": _device_name(dev), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "n_trials": n_trials, "epochs": epochs, "n_train": n_train,
               "val_size": val_size, "fuse_k": k, "sampler_seed": sampler_seed, "ways": ways, "load": load,
               "speedup": fused["trials_per_hour"] / one["trials_per_hour"]}
    text = _sweep_report(summary)
    say(text)
    if out_dir is not None:
        name = "sweep.md" if dev.type == "cpu" else f"sweep-{dev.type}.md"
        fileio.write_text(out_dir / name, text + "\n")
        summary["file"] = str(out_dir / name)
    return summary


def _sweep_report(s: dict[str, Any]) -> str:
    lines = [f"# A sweep, one trial at a time and fused ({s['device']}: {s['device_name']})", "",
             f"{s['n_trials']} trials of LeNet-5 (ReLU, batch 64, SGD) x {s['epochs']} epochs x {s['n_train']:,} "
             f"MNIST training images, scored on {s['val_size']:,} held out; TPE over lr, momentum and weight decay "
             f"(sampler seed {s['sampler_seed']}, 8 random start-up trials), no pruning; through the real sweep "
             f"worker (Optuna SQLite storage, an MLflow child run per trial with its metrics, checkpoints and "
             f"artifacts). torch {s['torch']}, {s['threads']} threads, load average {s['load']:.1f} at the start.", "",
             "| way | trials | wall time (s) | trials/hour | training (s) | the rest, per trial (s) | best val acc (%) |",
             "|---|---|---|---|---|---|---|"]
    for label, w in s["ways"].items():
        rest = (w["wall_seconds"] - w["train_seconds"]) / max(w["trials"], 1)
        lines.append(f"| {label} | {w['trials']} | {w['wall_seconds']:.1f} | {w['trials_per_hour']:,.0f} | "
                     f"{w['train_seconds']:.1f} | {rest:.2f} | {w['best_val_acc']:.2f} |")
    one, fused = s["ways"].values()
    steps = one["train_seconds"] / fused["train_seconds"] if fused["train_seconds"] > 0 else math.nan
    lines += ["", f"Fused: **{s['speedup']:.2f}x** the trials/hour of one trial at a time ({steps:.2f}x in training "
              "steps alone). The wall time is the worker's, from the first trial claimed to the last told (opening "
              "the sweep, once, took " + " and ".join(f"{w['open_seconds']:.1f} s" for w in s["ways"].values())
              + "). Training (s) is the time in training steps (a fused group's counted once); the rest is "
              "evaluation, Optuna and MLflow (a run, metrics, a figure and checkpoints per trial), paid per trial "
              "either way, which bounds the speedup. The best "
              "validation accuracies differ "
              "only because the sampler sees the trials in another order: K trials are asked before any of "
              "them is told (TPE's constant liar), so the fused sweep's later trials are chosen knowing less.",
              "", f"`cnnbench bench --sweep --sweep-trials {s['n_trials']} --sweep-epochs {s['epochs']}"
              + (f" --sweep-train-subset {s['n_train']}" if s['n_train'] != 60_000 - s['val_size'] else "")
              + f" --fuse-k {s['fuse_k']} --device {s['device']}`"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# the wide engine (wide.py): its rows in `run_bench`, `wide_vs_vmap` for any device


def _engine_measure(method: str, k: int, configs: list[TrialConfig], data, engine: str,
                    repeats: int) -> Measurement:
    m = Measurement(method, k)
    try:
        cnnbench_loop(configs, data, fused=True, engine=engine)  # warm-up for this K
        for _ in range(repeats):
            m.samples.append(cnnbench_loop(configs, data, fused=True, engine=engine))
    except Exception as err:  # out of memory at large K, say: reported, not fatal
        m.note = f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
    return m


def _wide_worker_throughput(args: tuple[list[TrialConfig], str, int, Any]) -> float:
    """In a worker process with `threads` threads: one wide group's throughput, warmed up."""
    configs, root, threads, barrier = args
    torch.set_num_threads(threads)
    data = load_data(configs[0], root, resolve_device(configs[0].device))
    cnnbench_loop(configs, data, fused=True, engine="wide")
    barrier.wait()  # every worker measures at the same time
    return cnnbench_loop(configs, data, fused=True, engine="wide")


def parallel_wide_workers(config: TrialConfig, root: Path, workers: int, threads: int, k: int) -> float:
    """Model-images/s of `workers` processes with `threads` threads each, each training a
    wide group of `k` trials (the learning-rate study's rates) at once."""

    ctx = multiprocessing.get_context("spawn")
    groups = [[config.replace(lr=LR_STUDY[(w * k + i) % len(LR_STUDY)]) for i in range(k)] for w in range(workers)]
    with ctx.Manager() as manager:
        barrier = manager.Barrier(workers)
        with ctx.Pool(workers) as pool:
            rates = pool.map(_wide_worker_throughput, [(g, str(root), threads, barrier) for g in groups])
    return sum(rates)


def wide_measures(base: TrialConfig, data, root: Path, ks: list[int], repeats: int,
                  say: Callable[[str], None] = print) -> dict[tuple[str, int], Measurement]:
    """`run_bench`'s wide rows: K trials (lr varied, seeds as in `run_bench`) as one wide
    model for each K in `ks`, and on the CPU `wide-workers`: one process per core, one
    thread each, each training a wide group of ceil(5 / workers) trials (the learning-rate
    study split over the workers, as the study runner does)."""

    out: dict[tuple[str, int], Measurement] = {}
    if not fusable(base, wide_only=True):
        say(f"  wide: {base.model} is not widened")
        return out
    for k in ks:
        configs = [base.replace(lr=LR_STUDY[i % len(LR_STUDY)], seed=i // len(LR_STUDY)) for i in range(k)]
        m = out[("wide", k)] = _engine_measure("wide", k, configs, data, "wide", repeats)
        say(f"  wide  K={k:<3} {m.median:>12,.0f} model-images/s {m.note}")
    if data.device.type == "cpu":

        _, workers, threads = execution("cpu", None, None)
        if workers > 1:
            k = math.ceil(len(LR_STUDY) / workers)
            m = Measurement("wide-workers", workers, note=f"{workers} processes x {threads} thread, K={k} each")
            for _ in range(repeats):
                m.samples.append(parallel_wide_workers(base, root, workers, threads or 1, k))
            out[("wide-workers", workers)] = m
            say(f"  wide-workers x{workers} (K={k} each) {m.median:>12,.0f} model-images/s")
    return out


def wide_projection(measures: dict[tuple[str, int], Measurement]) -> dict[str, float]:
    """The learning-rate study's projected training time through the wide engine."""
    out = {}
    wide = {k: m.median for (method, k), m in measures.items() if method == "wide" and m.samples}
    if wide:
        k = 5 if 5 in wide else max(wide)
        out[f"cnnbench wide (K={k})"] = LR_STUDY_IMAGES / wide[k]
    for (method, k), m in measures.items():
        if method == "wide-workers" and m.samples:
            out[f"cnnbench, {k} workers x wide group"] = LR_STUDY_IMAGES / m.median
    return out


def wide_vs_vmap(device: str = "auto", ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), steps: int = 200,
                 repeats: int = 3, *, model: str = "lenet5", batch_size: int = 64, data_root=None,
                 threads: int | None = None, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Model-images/s of the wide engine against vmap's for K trials of `model` (lr varied,
    one seed: a shared batch) at each K in `ks`, on `device`, through cnnbench's loop
    (`steps` steps per measurement, median of `repeats`, the engines and one trial alone
    interleaved per K). One row per K: {k, single, vmap, wide, wide_over_vmap,
    wide_over_single, notes}. `threads`: torch's CPU threads for the run (the study
    runner's workers use 1). `cnnbench bench --engines`."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    root = data_dir(data_root)
    base = TrialConfig(model=model, batch_size=batch_size, epochs=1, train_subset=steps * batch_size,
                       test_subset=1000, log_every=50, progress=False, device=str(dev), checkpoints="final")
    data = load_data(base, root, dev)
    say(f"wide vs vmap on {dev} ({_device_name(dev)}), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; {model}, batch {batch_size}, {steps} steps, median of {repeats}")
    cnnbench_loop([base, base.replace(lr=0.02)], data, fused=True, engine="vmap")  # untimed warm-up
    cnnbench_loop([base, base.replace(lr=0.02)], data, fused=True, engine="wide")
    rows = []
    for k in ks:
        configs = [base.replace(lr=LR_STUDY[i % len(LR_STUDY)] * (1 + i // len(LR_STUDY))) for i in range(k)]
        measured = {e: Measurement(e, k) for e in ("single", "vmap", "wide")}
        runs = {"single": lambda: cnnbench_loop([base], data),
                "vmap": lambda: cnnbench_loop(configs, data, fused=True, engine="vmap"),
                "wide": lambda: cnnbench_loop(configs, data, fused=True, engine="wide")}
        notes = []
        for e, m in measured.items():
            try:
                runs[e]()  # warm-up for this K
            except Exception as err:  # out of memory at large K, say
                m.note = f"{e}: {type(err).__name__}: {' '.join(str(err).split())[:100]}"
                notes.append(m.note)
        for _ in range(repeats):  # interleaved: drifting load hits every path alike
            for e, m in measured.items():
                if not m.note:
                    m.samples.append(runs[e]())
        single, vmap, wide = (measured[e].median for e in ("single", "vmap", "wide"))
        row = {"device": str(dev), "device_name": _device_name(dev), "threads": torch.get_num_threads(),
               "model": model, "k": k, "single": round(single, 1), "vmap": round(vmap, 1), "wide": round(wide, 1),
               "wide_over_vmap": round(wide / vmap, 3), "wide_over_single": round(wide / single, 3),
               "notes": "; ".join(notes)}
        rows.append(row)
        say(f"  K={k:<3} single {single:>10,.0f}  vmap {vmap:>10,.0f}  wide {wide:>10,.0f} model-images/s  "
            f"wide/vmap {wide / vmap:.2f}  wide/single {wide / single:.2f} {row['notes']}")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def write_engine_rows(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """`rows` of `wide_vs_vmap` as out_dir/engines_<device type>.csv."""

    path = out_dir / f"engines_{rows[0]['device'].split(':')[0]}.csv"
    fileio.write_text(path, pd.DataFrame(rows).to_csv(index=False))
    return path


def bench(*, data_root: Any = None, device: str = "auto", model: str = "lenet5", batch_size: int = 64,
          steps: int = 200, repeats: int = 3, max_k: int | None = None, options: bool = False,
          lr_study: bool = False, epochs: int = 10, sweep: bool = False, fuse_k: int | None = None,
          sweep_trials: int = 32, sweep_epochs: int = 3, sweep_train_subset: int | None = None,
          engines: bool = False, results_dir: str | Path = "results") -> list[str]:
    """`cnnbench bench`: what it measures depends on the flags (see its --help); returns
    the files written. Every option is checked before anything runs."""

    def given(value: int | None, default: int) -> int:  # 0 is given, and refused below
        return default if value is None else value

    for name, value, low in (("--batch-size", batch_size, 1), ("--steps", steps, 20), ("--repeats", repeats, 1),
                             ("--epochs", epochs, 1), ("--max-k", max_k or 1, 1), ("--fuse-k", given(fuse_k, 1), 1),
                             ("--sweep-trials", sweep_trials, 1), ("--sweep-epochs", sweep_epochs, 1),
                             ("--sweep-train-subset", given(sweep_train_subset, 64), 64)):
        if value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")
    out = Path(results_dir) / "bench"
    if sweep:
        resolve_device(device)
        summary = time_sweep(data_root=data_root, device=device, n_trials=sweep_trials, epochs=sweep_epochs,
                             fuse_k=fuse_k, train_subset=sweep_train_subset, out_dir=out)
        return [str(summary["file"])]
    if model not in list_models():
        raise ConfigError(f"--model: unknown value {model!r}; known: {', '.join(list_models())}")
    resolve_device(device)
    if engines:  # the wide engine against vmap
        ks = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= (max_k or 64))
        rows = wide_vs_vmap(device, ks, steps, repeats, model=model, batch_size=batch_size, data_root=data_root)
        return [str(write_engine_rows(rows, out))]
    run_bench(data_root=data_root, device=device, model=model, batch_size=batch_size, steps=steps, repeats=repeats,
              max_k=max_k, options=options, out_dir=out)
    files = [str(out / f) for f in ("bench.csv", "bench.md", "throughput.png")]
    if lr_study:
        time_lr_study(data_root=data_root, device=device, epochs=epochs, out_dir=out)
        files.append(str(out / "lr_study.md"))
    return files
