"""`cnnbench bench`: what a study costs, one module per bench.

  throughput.py  `run_bench`: the naive loop, cnnbench's loop one trial at a time, fused
                 K (fused.py), the wide engine (engines.py), CPU worker processes, and
                 with --options each speed option (options.py); bench.csv, bench.md,
                 throughput.png
  engines.py     --engines: the wide engine against vmap's, by K
  lr_study.py    --lr-study: the learning-rate study for real, both ways, and its share
                 of the FP32 bound
  overhead.py    --overhead: a study's bookkeeping (start-up, MLflow, Optuna, checkpoints,
                 results) with almost no training, fitted per process, trial and epoch
  sweep.py       --sweep: one Optuna sweep, one trial at a time and K fused
  executors.py   --executors: the tiny 3-seed lr study on local processes and on Ray
  calibrate.py   --calibrate: the CPU layout fastest on this machine, cached for studies
  cpu_profile.py --profile: where a wide K=3 step's time goes on one CPU thread, by op
  naive.py       the documents' loop, every ratio's baseline
  bound.py       a training image's FLOPs and the FP32 matmul bound they are held against
  steps.py       one engine's steps, test passes and profile (also gpu-check's)
  common.py      what they share: the rows, the timed loop, worker processes
`bench` below is the command: it checks every option, then runs the bench the flags ask
for (its module imported then: a worker process of one bench imports only that one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnbench.errors import ConfigError
from cnnbench.models import list_models
from cnnbench.train.device import resolve_device


def bench(*, data_root: Any = None, device: str = "auto", model: str = "lenet5", batch_size: int = 64,
          steps: int = 200, repeats: int = 3, max_k: int | None = None, options: bool = False,
          lr_study: bool = False, epochs: int = 10, sweep: bool = False, fuse_k: int | None = None,
          sweep_trials: int = 32, sweep_epochs: int = 3, sweep_train_subset: int | None = None,
          engines: bool = False, executors: bool = False, overhead: bool = False, baseline: str | None = None,
          calibrate: bool = False, recalibrate: bool = False, profile: bool = False, state: Any = None,
          command: str = "", results_dir: str | Path = "results") -> list[str]:
    """`cnnbench bench`: what it measures depends on the flags (see its --help); returns
    the files written. Every option is checked before anything runs. Each bench's module
    is imported when it runs: a worker process a bench starts imports only its own."""

    def given(value: int | None, default: int) -> int:  # 0 is given, and refused below
        return default if value is None else value

    for name, value, low in (("--batch-size", batch_size, 1), ("--steps", steps, 20), ("--repeats", repeats, 1),
                             ("--epochs", epochs, 1), ("--max-k", max_k or 1, 1), ("--fuse-k", given(fuse_k, 1), 1),
                             ("--sweep-trials", sweep_trials, 1), ("--sweep-epochs", sweep_epochs, 1),
                             ("--sweep-train-subset", given(sweep_train_subset, 64), 64)):
        if value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")
    out = Path(results_dir) / "bench"
    if overhead:  # a study's bookkeeping with almost no training
        return overhead_bench(data_root=data_root, repeats=repeats, baseline=baseline, out=out)
    if calibrate or recalibrate or profile:
        return cpu_bench(data_root=data_root, device=device, calibrate=calibrate or recalibrate,
                         force=recalibrate, profile=profile, state=state, command=command, out=out)
    if executors:  # local processes against a 2-node Ray cluster
        from cnnbench.tools.bench.executors import time_executors  # Ray: the ray extra, seconds to import

        return [str(time_executors(data_root=data_root, out_dir=out)["file"])]
    if sweep:
        from cnnbench.tools.bench.sweep import time_sweep

        resolve_device(device)
        summary = time_sweep(data_root=data_root, device=device, n_trials=sweep_trials, epochs=sweep_epochs,
                             fuse_k=fuse_k, train_subset=sweep_train_subset, out_dir=out)
        return [str(summary["file"])]
    if model not in list_models():
        raise ConfigError(f"--model: unknown value {model!r}; known: {', '.join(list_models())}")
    resolve_device(device)
    if engines:  # the wide engine against vmap
        from cnnbench.tools.bench.engines import wide_vs_vmap, write_engine_rows

        ks = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= (max_k or 64))
        rows = wide_vs_vmap(device, ks, steps, repeats, model=model, batch_size=batch_size, data_root=data_root)
        return [str(write_engine_rows(rows, out))]
    from cnnbench.tools.bench.throughput import run_bench

    run_bench(data_root=data_root, device=device, model=model, batch_size=batch_size, steps=steps, repeats=repeats,
              max_k=max_k, options=options, out_dir=out)
    files = [str(out / f) for f in ("bench.csv", "bench.md", "throughput.png")]
    if lr_study:
        from cnnbench.tools.bench.lr_study import time_lr_study

        time_lr_study(data_root=data_root, device=device, epochs=epochs, out_dir=out, state=state)
        files.append(str(out / "lr_study.md"))
    return files


def overhead_bench(*, data_root: Any, repeats: int, baseline: str | None, out: Path) -> list[str]:
    """--overhead (and --baseline, another checkout timed alike): overhead.md."""
    if baseline and not (Path(baseline) / "cnnbench" / "__main__.py").is_file():
        raise ConfigError(f"--baseline: {baseline} is not a cnnbench checkout (no cnnbench/__main__.py)")
    from cnnbench.tools.bench.overhead import time_overhead

    time_overhead(data_root=data_root, repeats=repeats, baseline=baseline, out_dir=out)
    return [str(out / "overhead.md")]


def cpu_bench(*, data_root: Any, device: str, calibrate: bool, force: bool, profile: bool, state: Any,
              command: str, out: Path) -> list[str]:
    """--calibrate (cached unless `force`) and --profile: the CPU's own benches. Where
    studies run on an accelerator, the calibration is not needed and not measured."""
    from cnnbench.tools.bench.calibrate import calibrate as calibrate_cpu
    from cnnbench.tools.bench.cpu_profile import profile_wide_step

    dev = resolve_device(device)
    files: list[str] = []
    if dev.type != "cpu":
        print(f"calibration: studies here run on {dev.type}; the CPU layout is not measured (--device cpu to "
              "measure it anyway)")
        return files
    if calibrate:
        written = calibrate_cpu(data_root=data_root, state=state, force=force, out_dir=out, command=command)[1]
        files += [str(written)] if written else []
    if profile:
        files.append(str(profile_wide_step(data_root=data_root, out_dir=out, command=command)))
    return files
