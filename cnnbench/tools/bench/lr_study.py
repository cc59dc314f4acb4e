"""`cnnbench bench --lr-study`: the learning-rate study for real, both ways, timed end to
end: cnnbench's study runner (MLflow, checkpoints and results included) against the
naive loop trial after trial; results/bench/lr_study.md."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from cnnbench.config.spec import StudySpec
from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir, dataset_info
from cnnbench.run.study import run_study
from cnnbench.tools.bench.bound import flops_per_image, fp32_bound
from cnnbench.tools.bench.common import LR_STUDY, fresh_process
from cnnbench.tools.bench.naive import naive_trial
from cnnbench.train import calibration
from cnnbench.train.device import device_name, resolve_device
from cnnbench.util import fileio


def time_lr_study(*, data_root=None, device: str = "auto", epochs: int = 10, say=print,
                  out_dir: Path | None = None, state=None) -> dict[str, float]:
    """The learning-rate study for real, both ways: cnnbench's study runner with its
    defaults for this device (MLflow logging, checkpoints and results included, into a
    throwaway store; on the CPU the layout of this machine's calibration in `state`, where
    one is cached), and the naive loop trial after trial with a test pass per epoch."""

    dev = resolve_device(device)
    root = data_dir(data_root)
    cal = calibration.load(state) if dev.type == "cpu" else None
    layout = cal.layout.describe() if cal else "the defaults (no calibration cached)"
    fixed = {"model": "lenet5", "activation": "sigmoid", "batch_size": 64, "momentum": 0.9, "epochs": epochs,
             "test_batch_size": 1024, "device": str(dev), "progress": False, "log_every": 10}
    spec = StudySpec(name="bench-lr", path="(cnnbench bench --lr-study)", title="lr study, timed",
                     source="document 003", description="", scientific={"lr": LR_STUDY}, nuisance={},
                     fixed=fixed, seeds=(0,), reported=())
    say(f"the study runner's CPU layout: {layout}" if dev.type == "cpu" else f"the study runner on {dev}")
    base = TrialConfig.from_dict(fixed)
    naive = naive_seconds([base.replace(lr=lr) for lr in LR_STUDY], root, dev, epochs)
    say(f"naive loop, 5 trials one after another, the same epochs and test passes: {naive:.1f} s")
    timed = {}
    for share in (False, True) if dev.type == "cpu" else (False,):  # --share-cores: only the CPU's threads
        with tempfile.TemporaryDirectory() as tmp:
            if cal is not None:  # the throwaway state folder holds this machine's calibration too
                calibration.save(cal, Path(tmp) / "state")
            t0 = time.perf_counter()
            run_study(spec, data_root=root, results_root=Path(tmp) / "results", tracking=f"sqlite:///{tmp}/mlflow.db",
                      state=Path(tmp) / "state", share_cores=share)
            timed[share] = time.perf_counter() - t0
        say(f"cnnbench study runner{' --share-cores' if share else ''}, 5 trials x {epochs} epochs (test set after "
            f"each epoch, MLflow, checkpoints, results): {timed[share]:.1f} s")
    ours = timed[False]
    bound, source = fp32_bound(dev)
    images = len(LR_STUDY) * epochs * dataset_info(base.dataset).n_train
    at_bound = flops_per_image(base, dev) * images / (bound * 1e12)
    say(f"the study's training FLOPs at the FP32 matrix-multiply bound ({bound * 1e3:,.0f} GFLOP/s, {source}): "
        f"{at_bound:.1f} s; the study runner reaches {at_bound / ours:.1%} of it, "
        f"the naive loop {at_bound / naive:.1%}")
    say(f"cnnbench is {naive / ours:.2f}x faster than the naive loop"
        + (f", {naive / timed[True]:.2f}x with --share-cores" if True in timed else ""))
    if out_dir is not None:
        shared = (f"| the same with `--share-cores` (a worker out of trials gives its core to the other; not "
                  f"bitwise repeatable) | {timed[True]:.1f} | {naive / timed[True]:.2f} |\n" if True in timed else "")
        fileio.write_text(out_dir / "lr_study.md", (
            f"# The learning-rate study, timed both ways\n\n"
            f"5 trials (lr {', '.join(map(str, LR_STUDY))}) x {epochs} epochs of LeNet-5 on all of MNIST, a test "
            f"pass after each epoch, on {dev} ({device_name(dev)}), torch {torch.__version__}; the study runner's "
            f"CPU layout: {layout}; load average {os.getloadavg()[0]:.1f} at the end.\n\n"
            f"| way | wall time (s) | x naive |\n|---|---|---|\n"
            f"| naive loop, trials one after another | {naive:.1f} | 1.00 |\n"
            f"| cnnbench study runner (its defaults here; MLflow, checkpoints, results included) | {ours:.1f} "
            f"| {naive / ours:.2f} |\n" + shared +
            f"\nThe FP32 matrix-multiply bound, {bound * 1e3:,.0f} GFLOP/s ({source}), would train the study's "
            f"training FLOPs (forward and backward, test passes not counted) in {at_bound:.1f} s: the study runner "
            f"reaches {at_bound / ours:.1%} of the bound end to end, the naive loop {at_bound / naive:.1%}.\n"))
    return {"naive_seconds": naive, "cnnbench_seconds": ours, "ratio": naive / ours, "bound_seconds": at_bound,
            **({"shared_seconds": timed[True]} if True in timed else {})}


def naive_seconds(configs: list[TrialConfig], root: Path, device: torch.device, epochs: int) -> float:
    """The naive loop's seconds for `configs` one after another, a test pass per epoch
    (naive_trial), in a fresh process as a user's script runs it: not in this one, whose
    engines may have told the allocator to keep freed memory (util/host_memory.py)."""
    with fresh_process() as fresh:
        return sum(fresh.map(naive_trial_seconds, configs, [root] * len(configs), [device] * len(configs),
                             [epochs] * len(configs)))


def naive_trial_seconds(config: TrialConfig, root: Path, device: torch.device, epochs: int) -> float:
    return naive_trial(config, root, device, epochs=epochs, evaluate=True)[1]
