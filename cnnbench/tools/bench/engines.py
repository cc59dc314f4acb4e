"""`cnnbench bench --engines` and the wide rows of `run_bench`: the wide engine
(train.wide, K models as one wide model) against vmap's (train.fused) and one trial alone,
by K; on the CPU also worker processes each training a wide group (the study runner's
CPU default where the model widens)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir
from cnnbench.run.layout import execution
from cnnbench.tools.bench.common import (
    LR_STUDY,
    LR_STUDY_IMAGES,
    Measurement,
    bench_config,
    cnnbench_loop,
    failure,
    lr_configs,
    parallel_groups,
)
from cnnbench.train.device import device_name, resolve_device
from cnnbench.train.fused import fusable
from cnnbench.train.loop import load_data
from cnnbench.train.measured import entry, record_speeds
from cnnbench.util import fileio


def _engine_measure(method: str, k: int, configs: list[TrialConfig], data, engine: str,
                    repeats: int) -> Measurement:
    m = Measurement(method, k)
    try:
        cnnbench_loop(configs, data, fused=True, engine=engine)  # warm-up for this K
        for _ in range(repeats):
            m.samples.append(cnnbench_loop(configs, data, fused=True, engine=engine))
    except Exception as err:  # out of memory at large K, say: reported, not fatal
        m.note = failure(err)
    return m


def parallel_wide_workers(config: TrialConfig, root: Path, workers: int, threads: int, k: int) -> float:
    """Model-images/s of `workers` processes with `threads` threads each, each training a
    wide group of `k` trials (the learning-rate study's rates) at once."""
    groups = [[config.replace(lr=LR_STUDY[(w * k + i) % len(LR_STUDY)]) for i in range(k)] for w in range(workers)]
    return parallel_groups(groups, root, threads, fused=True, engine="wide")


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
        configs = lr_configs(base, k)
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
    runner's workers use 1). `cnnbench bench --engines`, which keeps them for
    `fused.engine_for` (write_engine_rows)."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    root = data_dir(data_root)
    base = bench_config(model, batch_size, steps, dev)
    data = load_data(base, root, dev)
    say(f"wide vs vmap on {dev} ({device_name(dev)}), torch {torch.__version__}, {torch.get_num_threads()} "
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
                m.note = f"{e}: {failure(err, 100)}"
                notes.append(m.note)
        for _ in range(repeats):  # interleaved: drifting load hits every path alike
            for e, m in measured.items():
                if not m.note:
                    m.samples.append(runs[e]())
        single, vmap, wide = (measured[e].median for e in ("single", "vmap", "wide"))
        row = {"device": str(dev), "device_name": device_name(dev), "threads": torch.get_num_threads(),
               "model": model, "batch_size": batch_size, "k": k, "single": single, "vmap": vmap, "wide": wide,
               "wide_over_vmap": wide / vmap, "wide_over_single": wide / single,  # unrounded: the ratios agree
               "notes": "; ".join(notes)}
        rows.append(row)
        say(f"  K={k:<3} single {single:>10,.0f}  vmap {vmap:>10,.0f}  wide {wide:>10,.0f} model-images/s  "
            f"wide/vmap {wide / vmap:.2f}  wide/single {wide / single:.2f} {row['notes']}")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def write_engine_rows(rows: list[dict[str, Any]], out_dir: Path, speeds: Path | None = None) -> Path:
    """`rows` of `wide_vs_vmap` as out_dir/engines_<device type>.csv, and into the measured
    speeds that `fused.engine_for` follows (train/measured.py; `speeds`: that file, default
    the state folder's)."""

    path = out_dir / f"engines_{rows[0]['device'].split(':')[0]}.csv"
    fileio.write_text(path, pd.DataFrame(rows).to_csv(index=False))
    record_speeds([entry(r["device_name"], r["model"], r["batch_size"], r["k"], {"vmap": r["vmap"], "wide": r["wide"]},
                         threads=r["threads"] if r["device"] == "cpu" else None) for r in rows], speeds)
    return path
