"""The engine sweep of issue 25 (gpu-check's `engines` part).

K trials of LeNet-5 (the learning-rate study's five rates, a new seed after each five, so
K = 15 is the lr study's 3 seeds and K = 128 reads 26 streams) trained through the loop
by each fused variant:
  vmap             fused.py: K stacked models, vmapped;
  wide             wide.py with cuDNN's grouped convolutions, one batch per trial;
  wide+dedupe      wide with one batch per data stream, conv1 once per stream (streams.py);
  wide+bmm         wide with grouped_conv.py's batched matrix products;
  wide+bmm+dedupe  both.
Per K and variant: model-images/s (the loop's training time over one epoch of `steps`
batches after an untimed warm-up, whole steps as CUDA graphs where the loop can) and the
kernels one training step launches (torch.profiler over eager steps; on the CPU aten ops).
vmap's figure and the best wide one go into the measured speeds `fused.engine_for`
follows on this device (train/measured.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir
from cnnbench.tools.bench.common import Measurement, bench_config, cnnbench_loop, failure, lr_configs
from cnnbench.tools.bench.conv import shown
from cnnbench.tools.bench.steps import make_engine
from cnnbench.train.conv_path import ENV as CONV_PATH_ENV
from cnnbench.train.conv_path import kernels_per_call
from cnnbench.train.device import device_name
from cnnbench.train.loop import load_data
from cnnbench.train.measured import entry, record_speeds
from cnnbench.train.streams import ENV as DEDUPE_ENV
from cnnbench.util import fileio
from cnnbench.util.environ import variables

# variant -> (fused engine, environment it trains under)
VARIANTS = {"vmap": ("vmap", {}),
            "wide": ("wide", {CONV_PATH_ENV: "grouped", DEDUPE_ENV: "0"}),
            "wide+dedupe": ("wide", {CONV_PATH_ENV: "grouped", DEDUPE_ENV: "1"}),
            "wide+bmm": ("wide", {CONV_PATH_ENV: "bmm", DEDUPE_ENV: "0"}),
            "wide+bmm+dedupe": ("wide", {CONV_PATH_ENV: "bmm", DEDUPE_ENV: "1"})}
KS = (1, 15, 16, 64, 128)


def loop_batch(engine: Any, configs: list[TrialConfig], data) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of the epoch in the layout the loop hands `engine`: shared (one
    seed), one per stream (`per_stream`) or one per trial."""
    seeds = sorted({c.seed for c in configs})
    batch = configs[0].batch_size
    rows = [data.epoch_order(s, 0)[:batch] for s in seeds]
    xs, ys = [data.to_float(data.train.x[r]) for r in rows], [data.train.y[r] for r in rows]
    if len(rows) == 1:
        return xs[0], ys[0]
    x, y = torch.stack(xs), torch.stack(ys)
    if engine.per_stream:
        return x, y
    index = torch.tensor([seeds.index(c.seed) for c in configs], device=data.device)
    return x[index], y[index]


def step_kernels(configs: list[TrialConfig], data, engine: str) -> float:
    """Kernels (CPU: aten ops) one eager training step of the fused `engine` launches."""
    e = make_engine(configs, data, engine)
    e.begin_epoch([[c.lr for c in configs]])
    e.train(True)
    x, y = loop_batch(e, configs, data)
    return kernels_per_call(lambda: e.train_step(x, y, 0), data.device)


def measure(variant: str, configs: list[TrialConfig], data, repeats: int) -> dict[str, Any]:
    """One variant at one K: model-images/s (median of `repeats`) and kernels per step."""
    engine, env = VARIANTS[variant]
    m, kernels = Measurement(variant, len(configs)), float("nan")
    with variables(env):  # the conv path and the stream dedupe are read from the environment
        try:
            cnnbench_loop(configs, data, fused=True, engine=engine)  # warm-up: autotuning, the conv path, capture
            for _ in range(repeats):
                m.samples.append(cnnbench_loop(configs, data, fused=True, engine=engine))
            kernels = step_kernels(configs, data, engine)
        except Exception as err:  # out of memory at large K, say: reported, not fatal
            m.note = failure(err)
    return {"variant": variant, "engine": engine, "k": len(configs), "streams": len({c.seed for c in configs}),
            "model_images_per_s": round(m.median, 1), "kernels_per_step": kernels, "note": m.note}


def engine_sweep(device: torch.device, *, data_root=None, ks: Sequence[int] = KS, steps: int = 100, repeats: int = 2,
                 budget: float | None = None, out_dir: Path | None = None, speeds: Path | None = None,
                 say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every variant at every K (rows of `measure`), K by K while `budget` seconds last
    (the rest: rows noted skipped); with `out_dir`, engines.csv and engines.md; vmap against
    the best wide variant into the measured speeds (`speeds`: that file)."""
    base = bench_config("lenet5", 64, steps, device)
    data = load_data(base, data_dir(data_root), device)
    say(f"engine sweep on {device} ({device_name(device)}), torch {torch.__version__}: LeNet-5, batch 64, "
        f"{steps} steps per measurement, median of {repeats}")
    t0, rows = time.perf_counter(), []
    for k in ks:
        configs = lr_configs(base, k)
        for variant in VARIANTS:
            if budget is not None and time.perf_counter() - t0 > budget:
                rows.append({"variant": variant, "engine": VARIANTS[variant][0], "k": k, "streams": 0,
                             "model_images_per_s": float("nan"), "kernels_per_step": float("nan"),
                             "note": f"skipped: past the {budget:.0f} s budget"})
                continue
            rows.append(measure(variant, configs, data, repeats))
            r = rows[-1]
            say(f"  K={k:<4} {variant:<16} {r['model_images_per_s']:>12,.0f} model-images/s  "
                f"{r['kernels_per_step']:>7.1f} kernels per step {r['note']}")
    record_speeds(speed_entries(rows, device), speeds)
    if out_dir is not None:
        fileio.write_text(out_dir / "engines.csv", pd.DataFrame(rows).to_csv(index=False))
        fileio.write_text(out_dir / "engines.md", sweep_markdown(rows, device))
    return rows


def speed_entries(rows: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Per K >= 2: vmap's model-images/s against the best wide variant's (measured.entry)."""
    out = []
    threads = torch.get_num_threads() if device.type == "cpu" else None
    for k in sorted({r["k"] for r in rows if r["k"] > 1}):
        at_k = [r for r in rows if r["k"] == k and r["model_images_per_s"] == r["model_images_per_s"]]
        vmap = [r["model_images_per_s"] for r in at_k if r["engine"] == "vmap"]
        wide = [r["model_images_per_s"] for r in at_k if r["engine"] == "wide"]
        if vmap and wide:
            out.append(entry(device_name(device), "lenet5", 64, k, {"vmap": vmap[0], "wide": max(wide)},
                             threads=threads))
    return out


def sweep_markdown(rows: list[dict[str, Any]], device: torch.device) -> str:
    kind = "kernels" if device.type == "cuda" else "aten ops"
    lines = [f"# The engine sweep on {device} ({device_name(device)})", "",
             "LeNet-5, batch 64, K trials (lr study's rates, a new seed every five) through the loop.", "",
             f"| K | streams | variant | model-images/s | {kind} per step | note |", "|---:|---:|---|---:|---:|---|"]
    lines += [f"| {r['k']} | {r['streams']} | {r['variant']} | {shown(r['model_images_per_s'], 0)} | "
              f"{shown(r['kernels_per_step'])} | {r['note']} |" for r in rows]
    return "\n".join(lines) + "\n"
