"""`cnnbench gpu-check`: every GPU measurement of the project in one command.

A GPU is a scarce thing to hold (a lent H100 comes with minutes, not hours), so the whole
check is one prepared command that writes everything into one folder and prints a
summary; `--dry-run` runs the same code path on the CPU at toy sizes, so that a GPU
session spends its minutes measuring, not debugging. The parts, in this order (`--parts`
picks some; default: tests, conv, engines, studies, sweep), each reported and the next
one run when it fails, all within the budget (gpu_parts.py, gpu_studies.py; past it by a
minute at most: a study or the sweep running then is stopped at its own limit):

  tests     `pytest -m cuda` (tests/test_cuda.py, the wide engine's and the bmm op's CUDA
            tests), at most 40% of the budget (240 s)
  conv      the conv2 micro-benchmark: cuDNN grouped, NHWC, TF32 and the bmm op, eager and
            captured, K = 16, 64, 128: microseconds and kernels per call
  engines   the engine sweep: vmap, wide, wide with stream dedupe, with the bmm conv2, with
            both; K = 1, 15, 16, 64, 128: model-images/s and kernels per step; the measured
            speeds go into the check's state folder, so the studies below train on the
            faster engine
  bench     `cnnbench bench --options`, the test pass per test batch size, a profile
  kbench    the bench's K sweep alone (naive, single, fused K)
  studies   `make studies` timed (the six document studies: LeNet-5's lr, batch and
            activation, then models (LeNet-5, AlexNet, Inception, ResNet), alexnet and
            the epochs studies), then resnet-bn, models-imagenet for one epoch, the lr
            study in bf16 and TF32, each through `cnnbench study` and
            compared with its committed CPU results by `cnnbench compare`; with the
            budget less the sweep's share (gpu_parts.CAPS)
  sweep     `cnnbench bench --sweep` on the device: fused against one trial at a time
The folder gets `summary.md` (gpu_report.py), `check.json`, the logs, conv2.*, engines.*,
bench/, results*/<study>/ and compare-<study>-cpu-gpu/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from cnnbench.errors import ConfigError, DeviceError
from cnnbench.tools.gpu_parts import CAPS, Step, bench, conv_part, cuda_tests, engines_part, k_bench, line, sweep_part
from cnnbench.tools.gpu_report import summary
from cnnbench.tools.gpu_studies import DEFAULT_STUDIES, DRY_STUDIES, run_studies, studies_dir
from cnnbench.train.device import device_name, resolve_device
from cnnbench.util import fileio

PARTS = ("tests", "conv", "engines", "bench", "kbench", "studies", "sweep")  # in the order they run
DEFAULT_PARTS = ("tests", "conv", "engines", "studies", "sweep")
DEFAULT_BUDGET = 480.0  # seconds: a lent GPU's command runs at most 10 minutes, its start included


def run_gpu_check(out: Path, *, dry_run: bool = False, data_root: str | os.PathLike | None = None,
                  budget: float = DEFAULT_BUDGET, parts: tuple[str, ...] = DEFAULT_PARTS,
                  studies: tuple[str, ...] | None = None, say: Callable[[str], None] = print) -> list[Step]:
    """Run the check into `out`; returns its steps (also written to out/check.json).

    `studies`: entries `NAME` or `NAME:KEY=VALUE[,KEY=VALUE]` (a variant, written to
    `results-KEY-VALUE/`); by default gpu_studies.DEFAULT_STUDIES (on a dry run DRY_STUDIES,
    at toy sizes)."""
    t_start = time.perf_counter()
    out = Path(out).resolve()  # the test step runs in the repository, the studies in `out`
    device = resolve_device("cpu" if dry_run else "auto")
    if not dry_run and device.type != "cuda":
        raise DeviceError("gpu-check: no CUDA device on this machine (--dry-run tries the check on the CPU)")
    fileio.check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    left = lambda: budget - (time.perf_counter() - t_start)  # noqa: E731
    state = (out / "state").resolve()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{(out / 'mlflow.db').resolve()}",
           "CNNBENCH_HOME": str(state)}
    if data_root:
        env["CNNBENCH_DATA"] = str(Path(data_root).resolve())
    say(f"gpu-check: {device} ({device_name(device)}), torch {torch.__version__}, python "
        f"{platform.python_version()}, budget {budget:.0f} s, parts {','.join(parts)}"
        f"{' (dry run: CPU, toy sizes)' if dry_run else ''}")
    steps = [environment(out, device)]
    sizes = dict(dry_run=dry_run, data_root=data_root, say=say)
    run = {"tests": lambda: cuda_tests(out, env, timeout=max(60.0, min(left() * 0.4, 240.0))),
           "conv": lambda: conv_part(out, device, dry_run=dry_run, say=say),
           "engines": lambda: engines_part(out, device, state, left=left, **sizes),
           "bench": lambda: bench(out / "bench", device, **sizes),
           "kbench": lambda: k_bench(out / "bench-k", device, **sizes),
           "sweep": lambda: sweep_part(out / "sweep", device, env, dry_run=dry_run, left=left)}
    for part in (p for p in PARTS if p in parts):
        if part == "studies":  # what the budget leaves, less the sweep's share when it runs after them
            reserve = CAPS["sweep"] if "sweep" in parts and not dry_run else 0.0
            steps += run_studies(studies or (DRY_STUDIES if dry_run else DEFAULT_STUDIES), out, env,
                                 dry_run=dry_run, left=lambda: left() - reserve,
                                 label="dry-run" if dry_run else "gpu", say=say)
            continue
        if part == "sweep":
            (out / "sweep").mkdir(exist_ok=True)
        steps.append(run[part]())
        say(line(steps[-1]))
    text = summary(steps, device, budget, time.perf_counter() - t_start)
    fileio.write_text(out / "summary.md", text)
    fileio.write_text(out / "check.json", json.dumps([s.__dict__ for s in steps], indent=1, default=str))
    say(text)
    return steps


def environment(out: Path, device) -> Step:
    """The versions and the device, into out/environment.txt (nvidia-smi's view on CUDA)."""
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"cuda {torch.version.cuda}", f"device {device} ({device_name(device)})"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    fileio.write_text(out / "environment.txt", "\n".join(lines) + "\n")
    return Step("environment", status="ok", detail="; ".join(lines[:4]))


def gpu_check(out: str | Path, *, dry_run: bool = False, data_root: str | os.PathLike | None = None,
              budget: float = DEFAULT_BUDGET, parts: str = ",".join(DEFAULT_PARTS),
              studies: str | None = None) -> list[Step]:
    """`cnnbench gpu-check`: the options as the command takes them (comma-separated
    `parts` and `studies`), checked, then `run_gpu_check`."""

    if budget <= 0:
        raise ConfigError(f"--budget: must be > 0, got {budget:g}")
    chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        raise ConfigError(f"--parts: unknown part {unknown[0] if unknown else '(none)'!r}; known: {', '.join(PARTS)}")
    entries = tuple(s.strip() for s in studies.split(",") if s.strip()) if studies else None
    for entry in entries or ():
        name = entry.partition(":")[0]
        spec_file = studies_dir() / f"{name}.yaml"
        if not spec_file.is_file():
            raise ConfigError(f"--studies: no study {name!r} (no {spec_file})")
    return run_gpu_check(Path(out), dry_run=dry_run, data_root=data_root, budget=budget, parts=chosen,
                         studies=entries)


def main(argv: list[str] | None = None) -> int:
    """For `python -m cnnbench.tools.gpu_check`, as `cnnbench gpu-check` (the options checked by gpu_check)."""

    p = argparse.ArgumentParser(prog="cnnbench gpu-check")
    p.add_argument("--out", default="results/gpu")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS))
    p.add_argument("--studies", default=None)
    a = p.parse_args(argv)
    steps = gpu_check(a.out, dry_run=a.dry_run, data_root=a.data_dir, budget=a.budget, parts=a.parts,
                      studies=a.studies)
    return 0 if all(s.status != "failed" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
