"""`cnnbench gpu-check`: every GPU measurement of the project in one command.

A GPU is a scarce thing to hold (a lent H100 comes with minutes, not hours), so the whole
check is one prepared command that writes everything into one folder and prints a
summary; `--dry-run` runs the same code path on the CPU at toy sizes, so that a GPU
session spends its minutes measuring, not debugging. In order, each step in its own
time budget, a failing step reported and the next one run:

  tests     `pytest -m cuda` (tests/test_cuda.py and every other test marked cuda)
  bench     `cnnbench bench --options`: the naive loop, one trial, fused K = 1, 2, 4, ...
            until throughput stops rising, each speed option on and off; then the test
            pass per test batch size and a torch.profiler profile of fused steps
  studies   the lr, batch and activation studies end to end through `cnnbench study`
            (3 seeds, all of MNIST, 10 epochs; MLflow on a SQLite file in the folder),
            each timed; the lr study again in bf16 and in TF32 for `cnnbench compare`;
            then, while the budget lasts, the other document studies and the 224x224
            torchvision study for one epoch.
The folder gets `summary.md`, `check.json`, the test log, `bench/` and `results/<study>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import data_dir
from cnnbench.errors import ConfigError, DeviceError
from cnnbench.tools import resources
from cnnbench.tools.bench.steps import profile_steps, time_evaluation
from cnnbench.tools.bench.throughput import run_bench
from cnnbench.train.device import device_name, resolve_device
from cnnbench.train.loop import load_data
from cnnbench.util import fileio

TINY = ("--seeds", "0", "--set", "epochs=1", "--set", "train_subset=640", "--set", "test_subset=300",
        "--set", "log_every=2")


@dataclass
class Step:
    name: str
    command: str = ""
    seconds: float = 0.0
    status: str = "skipped"  # ok, failed, skipped
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _studies_dir() -> Path:
    """The document studies: the checkout's studies/, else an installed cnnbench's copy."""
    return resources.folder("studies")


DEFAULT_STUDIES = ("lr", "batch", "activation", "lr:amp=bf16", "lr:tf32=true", "epochs-lenet", "models", "epochs",
                   "alexnet", "models-imagenet:epochs=1")
REQUIRED_STUDIES = ("lr", "batch", "activation")  # run whatever the budget says
PARTS = ("tests", "bench", "kbench", "studies")  # kbench: the K sweep alone, no options (quick)


def run_gpu_check(out: Path, *, dry_run: bool = False, data_root: str | os.PathLike | None = None,
                  budget: float = 480.0, parts: tuple[str, ...] = ("tests", "bench", "studies"), studies: tuple[str, ...] | None = None,
                  say: Callable[[str], None] = print) -> list[Step]:
    """Run the check into `out`; returns its steps (also written to out/check.json).

    `studies`: entries `NAME` or `NAME:KEY=VALUE[,KEY=VALUE]` (a variant, written to
    `results-KEY-VALUE/`); by default DEFAULT_STUDIES (on a dry run: lr, activation and
    lr in bf16, at toy sizes)."""

    t_start = time.perf_counter()
    out = Path(out).resolve()  # the test step runs in the repository, the studies in `out`
    device = resolve_device("cpu" if dry_run else "auto")
    if not dry_run and device.type != "cuda":
        raise DeviceError("gpu-check: no CUDA device on this machine (--dry-run tries the check on the CPU)")
    fileio.check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    left = lambda: budget - (time.perf_counter() - t_start)  # noqa: E731
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{(out / 'mlflow.db').resolve()}",
           "CNNBENCH_HOME": str((out / "state").resolve())}
    if data_root:
        env["CNNBENCH_DATA"] = str(Path(data_root).resolve())
    steps: list[Step] = []
    say(f"gpu-check: {device} ({device_name(device)}), torch {torch.__version__}, python "
        f"{platform.python_version()}, budget {budget:.0f} s{' (dry run: CPU, toy sizes)' if dry_run else ''}")
    steps.append(_environment(out, device))
    if "tests" in parts:  # 1. the CUDA tests (they live in the repository, not in an installed cnnbench)
        steps.append(_cuda_tests(out, env, timeout=max(60.0, min(left() * 0.35, 240.0))))
        say(_line(steps[-1]))
    if "bench" in parts:  # 2. the bench, the test pass per batch size, a profile
        steps.append(_bench(out / "bench", device, dry_run=dry_run, data_root=data_root, say=say))
        say(_line(steps[-1]))
    if "kbench" in parts:  # 2b. only naive, single and fused K (the device's defaults), short
        steps.append(_k_bench(out / "bench-k", device, dry_run=dry_run, data_root=data_root, say=say))
        say(_line(steps[-1]))
    if "studies" in parts:  # 3. the studies, end to end through the command
        chosen = studies or (("lr", "activation", "lr:amp=bf16") if dry_run else DEFAULT_STUDIES)
        for entry in chosen:
            steps.append(_study(entry, out, env, dry_run=dry_run, left=left))
            say(_line(steps[-1]))

    summary = _summary(steps, device, budget, time.perf_counter() - t_start)
    fileio.write_text(out / "summary.md", summary)
    fileio.write_text(out / "check.json", json.dumps([s.__dict__ for s in steps], indent=1, default=str))
    say(summary)
    return steps


def _cuda_tests(out: Path, env: dict[str, str], *, timeout: float) -> Step:
    """`pytest -m cuda` on the checkout's tests/test_cuda.py (skipped without a checkout)."""
    repo = resources.checkout()
    if repo is None or not (repo / "tests" / "test_cuda.py").is_file():
        return Step("cuda tests", detail="skipped: no repository checkout here (the tests are in its tests/)")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "-rs",
           f"--junitxml={out / 'cuda_tests.xml'}", str(repo / "tests" / "test_cuda.py")]
    return _subprocess("cuda tests", cmd, out / "cuda_tests.log", env=env, cwd=repo, timeout=timeout)


def _k_bench(out: Path, device, *, dry_run: bool, data_root, say) -> Step:
    """The bench's K sweep alone (naive, single, fused K; the device's defaults, no options)."""
    step = Step("bench, K sweep", command="cnnbench bench --steps 50 --repeats 2")
    t0 = time.perf_counter()
    try:
        sizes = dict(steps=20, repeats=1, max_k=2) if dry_run else dict(steps=50, repeats=2, max_k=None)
        summary = run_bench(data_root=data_root, device=str(device), out_dir=out, say=say, **sizes)
        best = max((r for r in summary["rows"] if r["method"] == "fused"), key=lambda r: r["model_images_per_s"])
        step.status, step.extra = "ok", {"rows": summary["rows"]}
        step.detail = f"best fused K={best['k']}: {best['model_images_per_s']:,.0f} model-images/s"
    except Exception as err:
        step.status, step.detail = "failed", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    step.seconds = time.perf_counter() - t0
    return step


def _study(entry: str, out: Path, env: dict[str, str], *, dry_run: bool, left: Callable[[], float]) -> Step:
    """One study (`NAME` or `NAME:KEY=VALUE,...`) end to end through `cnnbench study`, with
    the rest of the budget (`left()` seconds); skipped when under 30 s are left, unless required."""
    name, _, variant = entry.partition(":")
    extra = [a for kv in filter(None, variant.split(",")) for a in ("--set", kv)]
    folder = "results" + "".join(f"-{kv.replace('=', '-')}" for kv in filter(None, variant.split(",")))
    label = f"study {name}" + (f" ({variant})" if variant else "")
    if name not in REQUIRED_STUDIES and left() < 30:
        return Step(label, detail=f"skipped: {max(left(), 0):.0f} s of the budget left")
    if dry_run:
        extra += list(TINY)
    results = out / folder
    cmd = [sys.executable, "-m", "cnnbench", "study", str(_studies_dir() / f"{name}.yaml"),
           "--results-dir", str(results), "--set", "progress=false", *extra]
    step = _subprocess(label, cmd, out / f"study-{name}{folder.removeprefix('results')}.log", env=env,
                       cwd=out, timeout=max(60.0, left()))
    step.extra["results"] = str(results / name)
    return step


def _environment(out: Path, device) -> Step:

    lines = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"cuda {torch.version.cuda}", f"device {device} ({device_name(device)})"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
            lines.append(smi)
        except (OSError, subprocess.SubprocessError):
            pass
    fileio.write_text(out / "environment.txt", "\n".join(lines) + "\n")
    return Step("environment", status="ok", detail="; ".join(lines[:4]))


def _subprocess(label: str, cmd: list[str], log: Path, *, env: dict[str, str], cwd: Path, timeout: float) -> Step:
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


def _bench(out: Path, device, *, dry_run: bool, data_root, say) -> Step:

    step = Step("bench", command="cnnbench bench --options" + (" --steps 20 --repeats 1 --max-k 2" if dry_run else ""))
    t0 = time.perf_counter()
    try:
        sizes = dict(steps=20, repeats=1, max_k=2) if dry_run else dict(steps=100, repeats=3, max_k=None)
        summary = run_bench(data_root=data_root, device=str(device), options=True, out_dir=out, say=say, **sizes)
        base = TrialConfig(device=str(device), progress=False, epochs=1,
                           train_subset=2000 if dry_run else 0, test_subset=500 if dry_run else 0)
        data = load_data(base, data_dir(data_root), device)
        k_eval = 2 if dry_run else 16
        evaluation, profiles = [], []
        try:
            evaluation = time_evaluation(base, data, k=k_eval,
                                         sizes=(256, 1024) if dry_run else (512, 1024, 2048, 5000, 10000))
            profiles = [profile_steps([base.replace(lr=0.01 * (i + 1)) for i in range(k)], data,
                                      steps=10 if dry_run else 50) for k in ((1, 2) if dry_run else (1, 16, 128))]
        except Exception as err:  # the bench's own figures stand; say what failed
            step.detail = f"evaluation/profile failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}; "

        fileio.write_text(out / "evaluation.csv", pd.DataFrame(evaluation).to_csv(index=False))
        fileio.write_text(out / "profile.md", "\n\n".join(
            f"## K = {p['k']}: {p['wall_ms_per_step']:.3f} ms per step wall"
            + (f", GPU busy {p['gpu_busy_ms_per_step']:.3f} ms ({p['gpu_busy_fraction']:.0%}), "
               f"{p['kernels_per_step']:.0f} kernels per step" if "gpu_busy_fraction" in p else "")
            + f"\n\n```\n{p['table']}\n```" for p in profiles) + "\n")
        best = max((r for r in summary["rows"] if r["method"] == "fused"), key=lambda r: r["model_images_per_s"])
        step.extra = {"best_fused": best, "evaluation": evaluation,
                      "profiles": [{k: v for k, v in p.items() if k != "table"} for p in profiles],
                      "projection_seconds": summary["projection_seconds"], "rows": summary["rows"]}
        step.status = "ok"
        step.detail += f"best fused K={best['k']}: {best['model_images_per_s']:,.0f} model-images/s"
    except Exception as err:  # reported; the studies still run

        traceback.print_exc()
        step.status, step.detail = "failed", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    step.seconds = time.perf_counter() - t0
    return step


def _line(step: Step) -> str:
    return f"[{step.status:>7}] {step.name:<34} {step.seconds:7.1f} s  {step.detail}"


def _summary(steps: list[Step], device, budget: float, total: float) -> str:

    lines = [f"# gpu-check on {device} ({device_name(device)})", "",
             f"torch {torch.__version__}, python {platform.python_version()}; {total:.0f} s of a {budget:.0f} s budget", "",
             "| step | status | seconds | detail |", "|---|---|---:|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |")
    bench = next((s for s in steps if s.name == "bench" and s.status == "ok"), None)
    if bench:
        lines += ["", "## Bench", "", "| method | K | model-images/s | x naive | fp32 peak | note |", "|---|---:|---:|---:|---:|---|"]
        for r in bench.extra["rows"]:
            frac = r["fraction_of_fp32_peak"]
            lines.append(f"| {r['method']} | {r['k']} | {r['model_images_per_s']:,.0f} | {r['ratio_to_naive']:.2f} | "
                         f"{f'{frac:.2%}' if frac == frac else '-'} | {r['note']} |")
        lines += ["", "Test pass (10,000 images) per test batch size:", "",
                  "| K | test batch | seconds | model-images/s |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['k']} | {r['test_batch_size']} | {r['seconds']:.4f} | {r['model_images_per_s']:,.0f} |"
                  for r in bench.extra["evaluation"]]
        lines += ["", "Profile (see bench/profile.md):", ""]
        for p in bench.extra["profiles"]:
            lines.append(f"- K = {p['k']}: {p['wall_ms_per_step']:.3f} ms per step"
                         + (f", GPU busy {p['gpu_busy_fraction']:.0%} ({p['kernels_per_step']:.0f} kernels per step)"
                            if "gpu_busy_fraction" in p else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """For `python -m cnnbench.tools.gpu_check` (the CLI's `gpu-check` calls run_gpu_check)."""

    p = argparse.ArgumentParser(prog="cnnbench gpu-check")
    p.add_argument("--out", default="results/gpu")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=float, default=480.0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--parts", default="tests,bench,studies")
    p.add_argument("--studies", default=None)
    a = p.parse_args(argv)
    steps = run_gpu_check(Path(a.out), dry_run=a.dry_run, data_root=a.data_dir, budget=a.budget,
                          parts=tuple(a.parts.split(",")), studies=tuple(a.studies.split(",")) if a.studies else None)
    return 0 if all(s.status != "failed" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())


def gpu_check(out: str | Path, *, dry_run: bool = False, data_root: str | os.PathLike | None = None,
              budget: float = 480.0, parts: str = "tests,bench,studies", studies: str | None = None) -> list[Step]:
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
        spec_file = _studies_dir() / f"{name}.yaml"
        if not spec_file.is_file():
            raise ConfigError(f"--studies: no study {name!r} (no {spec_file})")
    return run_gpu_check(Path(out), dry_run=dry_run, data_root=data_root, budget=budget, parts=chosen,
                         studies=entries)
