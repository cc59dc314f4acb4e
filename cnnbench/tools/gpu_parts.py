"""The measuring parts of `cnnbench gpu-check` (gpu_check.py runs them in order): each
returns a `Step` (what ran, its status, seconds, a one-line detail, figures in `extra`)
and never raises; a failing part is reported and the next one runs.

  tests    `pytest -m cuda` on the checkout's tests/test_cuda.py, test_grouped_conv.py, test_wide.py
  conv     the conv2 micro-benchmark (bench/conv.py): K = 16, 64, 128
  engines  the engine sweep (bench/engine_sweep.py): K = 1, 15, 16, 64, 128; its vmap and
           best wide figures go into the check's state folder, which its studies use
  bench    `cnnbench bench --options`, the test pass per test batch size and a profile
  kbench   the bench's K sweep alone (naive, single, fused K)
  sweep    `cnnbench bench --sweep`: one Optuna sweep, one trial at a time and fused
Sizes: a GPU's (`FULL`) or the dry run's toy ones on the CPU (`DRY`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir
from cnnbench.tools import resources
from cnnbench.tools.bench.conv import conv_bench
from cnnbench.tools.bench.engine_sweep import engine_sweep
from cnnbench.tools.bench.steps import profile_steps, time_evaluation
from cnnbench.tools.bench.throughput import run_bench
from cnnbench.train.loop import load_data
from cnnbench.train.measured import speeds_file
from cnnbench.util import fileio

# each part's sizes: a GPU's, and the dry run's on the CPU
FULL = {"conv": dict(ks=(16, 64, 128), repeats=5), "engines": dict(ks=(1, 15, 16, 64, 128), steps=100, repeats=2),
        "sweep": ["--sweep-trials", "32", "--sweep-epochs", "2"]}
DRY = {"conv": dict(ks=(2, 4), repeats=2), "engines": dict(ks=(1, 6), steps=10, repeats=1),
       "sweep": ["--sweep-trials", "4", "--sweep-epochs", "1", "--sweep-train-subset", "640", "--fuse-k", "2"]}
# seconds at most for a part that can be cut short (the engine sweep skips the K's past it;
# the sweep is stopped), of what the budget has left
CAPS = {"engines": 120.0, "sweep": 120.0}


@dataclass
class Step:
    name: str
    command: str = ""
    seconds: float = 0.0
    status: str = "skipped"  # ok, failed, skipped
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def line(step: Step) -> str:
    return f"[{step.status:>7}] {step.name:<34} {step.seconds:7.1f} s  {step.detail}"


def one_line(err: BaseException, limit: int = 300) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def timed(step: Step, work: Callable[[Step], None]) -> Step:
    """Run `work(step)` (which fills the step's detail and extra), timed; an exception
    fails the step with its one-line reason (the traceback printed)."""
    t0 = time.perf_counter()
    try:
        work(step)
        step.status = "ok"
    except Exception as err:  # reported; the next part runs
        traceback.print_exc()
        step.status, step.detail = "failed", one_line(err)
    step.seconds = time.perf_counter() - t0
    return step


def run_subprocess(label: str, cmd: list[str], log: Path, *, env: dict[str, str], cwd: Path,
                   timeout: float) -> Step:
    """`cmd` with its output in `log`, stopped after `timeout` seconds; the log's last line
    in the detail."""
    step = Step(label, command=shlex.join(cmd))
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout)
        step.status = "ok" if proc.returncode == 0 else "failed"
        step.detail = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        step.status, step.detail = "failed", f"stopped after its {timeout:.0f} s budget"
    step.seconds = time.perf_counter() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    step.detail += f": {tail[0][:200]}" if tail else ""
    return step


# the files whose tests marked cuda the check runs, the most telling first (a run stopped
# at its limit has their verdicts in the log)
CUDA_TEST_FILES = ("test_cuda.py", "test_grouped_conv.py", "test_wide.py")


def cuda_tests(out: Path, env: dict[str, str], *, timeout: float) -> Step:
    """`pytest -m cuda` on the checkout's CUDA_TEST_FILES (skipped without a checkout)."""
    repo = resources.checkout()
    if repo is None or not (repo / "tests" / "test_cuda.py").is_file():
        return Step("cuda tests", detail="skipped: no repository checkout here (the tests are in its tests/)")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "-rs",
           f"--junitxml={out / 'cuda_tests.xml'}", *(str(repo / "tests" / f) for f in CUDA_TEST_FILES)]
    return run_subprocess("cuda tests", cmd, out / "cuda_tests.log", env=env, cwd=repo, timeout=timeout)


def conv_part(out: Path, device, *, dry_run: bool, say) -> Step:
    """The conv2 micro-benchmark into out/conv2.csv and conv2.md."""
    sizes = (DRY if dry_run else FULL)["conv"]

    def work(step: Step) -> None:
        rows = conv_bench(device, sizes["ks"], repeats=sizes["repeats"], out_dir=out, say=say)
        step.extra["rows"] = rows
        best = {k: min((r for r in rows if r["k"] == k), key=lambda r: r["eager_us"]) for k in sizes["ks"]}
        step.detail = "fastest eager: " + ", ".join(f"K={k} {r['variant']} {r['eager_us']:,.0f} us"
                                                    for k, r in best.items())

    return timed(Step("conv2 micro-benchmark", command=f"bench.conv.conv_bench(ks={sizes['ks']})"), work)


def engines_part(out: Path, device, state: Path, *, dry_run: bool, data_root, left: Callable[[], float],
                 say) -> Step:
    """The engine sweep into out/engines.csv and engines.md; its speeds into `state`'s
    measured speeds (the studies after it choose their engine from them)."""
    sizes = (DRY if dry_run else FULL)["engines"]

    def work(step: Step) -> None:
        rows = engine_sweep(device, data_root=data_root, budget=min(CAPS["engines"], max(left(), 0.0)) if not dry_run
                            else None, out_dir=out, speeds=speeds_file(state), say=say, **sizes)
        step.extra["rows"] = rows
        done = [r for r in rows if r["model_images_per_s"] == r["model_images_per_s"]]
        best = max(done, key=lambda r: r["model_images_per_s"]) if done else None
        step.detail = (f"best: {best['variant']} K={best['k']} {best['model_images_per_s']:,.0f} model-images/s, "
                       f"{best['kernels_per_step']:.0f} kernels per step" if best else "nothing measured")

    return timed(Step("engine sweep", command=f"bench.engine_sweep.engine_sweep(ks={sizes['ks']})"), work)


def sweep_part(out: Path, device, env: dict[str, str], *, dry_run: bool, left: Callable[[], float]) -> Step:
    """`cnnbench bench --sweep` on the device, into out/bench/sweep*.md (a process of its own,
    stopped at its cap)."""
    sizes = (DRY if dry_run else FULL)["sweep"]
    cmd = [sys.executable, "-m", "cnnbench", "bench", "--sweep", "--device", str(device), *sizes,
           "--results-dir", str(out)]
    timeout = max(60.0, min(CAPS["sweep"], left())) if not dry_run else max(120.0, left())
    step = run_subprocess("bench --sweep", cmd, out / "sweep.log", env=env, cwd=out, timeout=timeout)
    files = sorted((out / "bench").glob("sweep*.md"))
    step.extra["file"] = str(files[0]) if files else ""
    return step


def k_bench(out: Path, device, *, dry_run: bool, data_root, say) -> Step:
    """The bench's K sweep alone (naive, single, fused K; the device's defaults, no options)."""
    sizes = dict(steps=20, repeats=1, max_k=2) if dry_run else dict(steps=50, repeats=2, max_k=None)

    def work(step: Step) -> None:
        summary = run_bench(data_root=data_root, device=str(device), out_dir=out, say=say, **sizes)
        best = max((r for r in summary["rows"] if r["method"] == "fused"), key=lambda r: r["model_images_per_s"])
        step.extra = {"rows": summary["rows"]}
        step.detail = f"best fused K={best['k']}: {best['model_images_per_s']:,.0f} model-images/s"

    return timed(Step("bench, K sweep", command="cnnbench bench --steps 50 --repeats 2"), work)


def bench(out: Path, device, *, dry_run: bool, data_root, say) -> Step:
    """`bench --options`, then the test pass per test batch size and a profile of fused steps."""
    sizes = dict(steps=20, repeats=1, max_k=2) if dry_run else dict(steps=100, repeats=3, max_k=None)

    def work(step: Step) -> None:
        summary = run_bench(data_root=data_root, device=str(device), options=True, out_dir=out, say=say, **sizes)
        evaluation, profiles = evaluation_and_profiles(out, device, dry_run=dry_run, data_root=data_root, step=step)
        best = max((r for r in summary["rows"] if r["method"] == "fused"), key=lambda r: r["model_images_per_s"])
        step.extra = {"best_fused": best, "evaluation": evaluation,
                      "profiles": [{k: v for k, v in p.items() if k != "table"} for p in profiles],
                      "projection_seconds": summary["projection_seconds"], "rows": summary["rows"]}
        step.detail += f"best fused K={best['k']}: {best['model_images_per_s']:,.0f} model-images/s"

    return timed(Step("bench", command="cnnbench bench --options" + (" --steps 20 --repeats 1 --max-k 2"
                                                                     if dry_run else "")), work)


def evaluation_and_profiles(out: Path, device, *, dry_run: bool, data_root, step: Step) -> tuple[list, list]:
    """The test pass per test batch size (evaluation.csv) and torch.profiler profiles of
    fused steps (profile.md); a failure here is noted and the bench's figures stand."""
    base = TrialConfig(device=str(device), progress=False, epochs=1,
                       train_subset=2000 if dry_run else 0, test_subset=500 if dry_run else 0)
    evaluation, profiles = [], []
    try:
        data = load_data(base, data_dir(data_root), device)
        evaluation = time_evaluation(base, data, k=2 if dry_run else 16,
                                     sizes=(256, 1024) if dry_run else (512, 1024, 2048, 5000, 10000))
        profiles = [profile_steps([base.replace(lr=0.01 * (i + 1)) for i in range(k)], data,
                                  steps=10 if dry_run else 50) for k in ((1, 2) if dry_run else (1, 16, 128))]
    except Exception as err:
        step.detail = f"evaluation/profile failed: {one_line(err, 200)}; "
    fileio.write_text(out / "evaluation.csv", pd.DataFrame(evaluation).to_csv(index=False))
    fileio.write_text(out / "profile.md", "\n\n".join(
        f"## K = {p['k']}: {p['wall_ms_per_step']:.3f} ms per step wall"
        + (f", GPU busy {p['gpu_busy_ms_per_step']:.3f} ms ({p['gpu_busy_fraction']:.0%}), "
           f"{p['kernels_per_step']:.0f} kernels per step" if "gpu_busy_fraction" in p else "")
        + f"\n\n```\n{p['table']}\n```" for p in profiles) + "\n")
    return evaluation, profiles
