"""`cnnbench bench --sweep`: one Optuna sweep, one trial at a time and K fused, each
through the real sweep worker into a throwaway Optuna storage and MLflow store;
results/bench/sweep.md."""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cnnbench.config.spec import SearchDim, StudySpec, SweepSettings
from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir, dataset_info, load_arrays
from cnnbench.run.sweep import default_fuse_k, open_sweep
from cnnbench.run.workers import work
from cnnbench.track.schema import ATTR_FUSED_WITH, ATTR_TRAIN_SECONDS
from cnnbench.train.device import device_name, resolve_device
from cnnbench.train.loop import load_data, train_group
from cnnbench.util import fileio


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
    n_train = base.train_subset or (dataset_info("mnist").n_train - val_size)
    say(f"sweep bench on {dev} ({device_name(dev)}), torch {torch.__version__}, {torch.get_num_threads()} threads: "
        f"{n_trials} trials of LeNet-5 x {epochs} epochs x {n_train:,} training images ({val_size:,} validation), "
        f"TPE (sampler seed {sampler_seed}), no pruning; one at a time, then K={k} fused")
    _warm_up(base, n_train, root, dev)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan  # a shared machine's figures vary
    ways = {label: _one_way(spec, label, kk, root, n_trials=n_trials, sampler_seed=sampler_seed, say=say)
            for label, kk in (("one at a time", 1), (f"fused, K={k}", k))}
    one, fused = ways["one at a time"], ways[f"fused, K={k}"]
    summary = {"device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
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


def _warm_up(base: TrialConfig, n_train: int, root: Path, dev: torch.device) -> None:
    """Untimed warm-up of both engines (lazy init, cuDNN autotuning, first allocations)."""
    warm = base.replace(epochs=1, train_subset=min(n_train, 20 * base.batch_size), val_size=0, lr=0.01)
    warm_data = load_data(warm, root, dev)
    train_group([warm], data=warm_data, evaluate_test=False)
    train_group([warm, warm.replace(lr=0.02)], data=warm_data, evaluate_test=False)


def _one_way(spec: StudySpec, label: str, kk: int, root: Path, *, n_trials: int, sampler_seed: int,
             say: Callable[[str], None]) -> dict[str, Any]:
    """The sweep through the real worker, `kk` trials at a time, timed: its row of sweep.md."""
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
        way = {"k": kk, "wall_seconds": wall, "open_seconds": t1 - t0, "trials": len(done),
               "trials_per_hour": 3600 * len(done) / wall, "best_val_acc": sweep.study.best_value if done else math.nan,
               "train_seconds": train_s, "states": dict(report.states)}
        say(f"  {label}: {len(done)} trials in {wall:.1f} s, {way['trials_per_hour']:,.0f} trials/hour, "
            f"best val acc {way['best_val_acc']:.2f} %")
    return way


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
              + (f" --sweep-train-subset {s['n_train']}" if s['n_train'] != dataset_info('mnist').n_train - s['val_size'] else "")
              + f" --fuse-k {s['fuse_k']} --device {s['device']}`"]
    return "\n".join(lines)
