"""`cnnbench bench`: what a study costs through cnnbench's loop against the naive loop.

In one run, on one device, `run_bench` times
  naive   the documents' loop (naive.py), trials one after another;
  single  cnnbench's loop (device-resident data, no per-step sync), one trial at a time;
  fused   cnnbench's loop with K trials stacked and vmapped, K = 1, 2, 4, 5, 8, ... until
          the throughput stops rising (5 is the learning-rate study's K; fused.py);
  wide    the same K trials as one wide model, K = 1, 2, 4, 5, 8, ...; on the CPU also
          `wide-workers` (engines.py);
  workers the study runner's CPU default: one single-trial process per core at once;
and, with --options, each speed option (options.py). Throughput is in model-images per
second (K models each seeing an image count K times). Measurements are interleaved over
several repeats after an untimed warm-up, and the median is shown with the ratio to the
naive loop measured in the same run: these machines are noisy. Writes bench.csv,
bench.md and throughput.png, with the learning-rate study's projected training time.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir, dataset_info, load_arrays
from cnnbench.run.layout import execution
from cnnbench.tools.bench.bound import flops_per_image, fp32_bound
from cnnbench.tools.bench.common import (
    LR_STUDY,
    LR_STUDY_IMAGES,
    Measurement,
    bench_config,
    cnnbench_loop,
    lr_configs,
    parallel_groups,
)
from cnnbench.tools.bench.engines import wide_measures, wide_projection
from cnnbench.tools.bench.fused import K_VALUES, fused_measures
from cnnbench.tools.bench.naive import naive_loop
from cnnbench.tools.bench.options import option_measures
from cnnbench.train.device import device_name, resolve_device
from cnnbench.train.loop import load_data
from cnnbench.util import fileio


def run_bench(*, data_root=None, device: str = "auto", model: str = "lenet5", batch_size: int = 64,
              steps: int = 200, repeats: int = 3, max_k: int | None = None, options: bool = False,
              out_dir: Path | None = Path("results/bench"), say: Callable[[str], None] = print) -> dict[str, Any]:
    """The bench (see the module docstring): its summary, printed and (with `out_dir`) written."""
    dev = resolve_device(device)
    root = data_dir(data_root)
    load_arrays("mnist", root)
    if out_dir is not None:
        fileio.check_writable(out_dir)
    max_k = max_k or (1024 if dev.type == "cuda" else 16)
    base = bench_config(model, batch_size, steps, dev)
    say(f"device {dev} ({device_name(dev)}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}; {model}, batch {batch_size}, {steps} steps per measurement, "
        f"{repeats} repeats, median shown")
    data = load_data(base, root, dev)
    ks = [k for k in K_VALUES if k <= max_k]
    measures = baseline_measures(base, data, root, dev, steps, repeats, say)
    measures.update(fused_measures(base, data, ks, repeats, say))
    # the wide engine, by K, and (CPU) worker processes each training a wide group
    measures.update(wide_measures(base, data, root, ks, repeats, say))
    if options:  # each option flipped alone from the device's defaults, one engine reused per option
        measures.update(option_measures(base, root, dev, max_k, steps=steps, repeats=repeats, say=say))
    summary = summarize(measures, base, dev, steps=steps, repeats=repeats)
    say(_report(summary))
    if out_dir is not None:
        _write(summary, out_dir)
    return summary


def baseline_measures(base: TrialConfig, data, root: Path, dev: torch.device, steps: int, repeats: int,
                      say: Callable[[str], None] = print) -> dict[tuple[str, int], Measurement]:
    """The naive loop, cnnbench's loop one trial at a time and (CPU) the study runner's
    worker processes, after an untimed warm-up of every path, interleaved over `repeats`
    so that drifting machine load hits every method alike."""
    plan: list[tuple[str, int, Callable[[], float]]] = [
        ("naive", 1, lambda: naive_loop(base, root, dev, steps)),
        ("single", 1, lambda: cnnbench_loop([base], data)),
    ]
    if dev.type == "cpu":
        _, workers, threads = execution(str(dev), None, None)
        if workers > 1:  # the study runner's default on the CPU
            plan.append(("workers", workers, lambda: parallel_workers(base, root, workers, threads)))

    # untimed warm-up of every path (lazy init, cuDNN autotuning, first allocations)
    naive_loop(base, root, dev, 5)
    cnnbench_loop([base], data)
    cnnbench_loop(lr_configs(base, 2), data, fused=True, engine="vmap")

    measures: dict[tuple[str, int], Measurement] = {}
    for rep in range(repeats):
        for method, k, fn in plan:
            measures.setdefault((method, k), Measurement(method, k)).samples.append(fn())
        say(f"  repeat {rep + 1}/{repeats}: " + ", ".join(
            f"{m.method}{'' if m.k == 1 else f' x{m.k}'} {m.samples[-1]:,.0f}" for m in measures.values())
            + " model-images/s")
    return measures


def summarize(measures: dict[tuple[str, int], Measurement], base: TrialConfig, dev: torch.device, *,
              steps: int, repeats: int) -> dict[str, Any]:
    """The bench's summary: one row per measurement (its median, the ratio to the naive
    loop, the fraction of FP32 peak) and the learning-rate study's projected time per way."""
    naive = measures[("naive", 1)].median
    flops = flops_per_image(base, dev)
    peak, peak_source = fp32_bound(dev)
    rows = []
    for m in measures.values():
        rows.append({"method": m.method, "k": m.k, "model_images_per_s": round(m.median, 1),
                     "ratio_to_naive": round(m.median / naive, 2), "repeats": len(m.samples),
                     "min": round(min(m.samples), 1) if m.samples else math.nan,
                     "max": round(max(m.samples), 1) if m.samples else math.nan,
                     "fraction_of_fp32_peak": m.median * flops / (peak * 1e12),
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
    return {"device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "model": base.model, "batch_size": base.batch_size,
            "steps": steps, "repeats": repeats, "flops_per_training_image": flops,
            "fp32_peak_tflops": peak, "peak_source": peak_source, "rows": rows, "projection_seconds": projection}


def parallel_workers(config: TrialConfig, root: Path, workers: int, threads: int) -> float:
    """Model-images/s of `workers` single-trial processes training at once with `threads`
    threads each: what the study runner does on the CPU (`run.layout.execution`)."""
    return parallel_groups([[config.replace(lr=LR_STUDY[i % 5])] for i in range(workers)], root, threads)


def _report(s: dict[str, Any]) -> str:
    lines = ["", f"{'method':<24}{'K':>4}{'model-images/s':>16}{'x naive':>9}{'fp32 peak':>11}"]
    for r in s["rows"]:
        frac = r["fraction_of_fp32_peak"]
        lines.append(f"{r['method']:<24}{r['k']:>4}{r['model_images_per_s']:>16,.0f}{r['ratio_to_naive']:>9.2f}"
                     f"{(f'{frac:.2%}' if frac == frac else '–'):>11} {r['note']}")
    lines.append(f"fp32 peak: the share of the FP32 matrix-multiply bound, {s['fp32_peak_tflops'] * 1e3:,.0f} GFLOP/s "
                 f"({s['peak_source']})")
    lines.append("")
    lines.append(f"learning-rate study (5 trials x 10 epochs x {dataset_info('mnist').n_train:,} images), "
                 f"projected training time "
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
