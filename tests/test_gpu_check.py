"""`cnnbench gpu-check --dry-run`: the GPU check's whole path on the CPU at toy sizes, so
that a session with a GPU spends its minutes measuring, not debugging."""

import json

import pandas as pd
import pytest

from conftest import cli


@pytest.mark.slow
def test_the_gpu_check_dry_run_runs_every_step_on_the_cpu(workdir):
    out = cli("gpu-check", "--dry-run", "--out", "gpu", "--budget", "1200", cwd=workdir, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads((workdir / "gpu" / "check.json").read_text())}
    assert {"environment", "cuda tests", "bench", "study lr", "study activation", "study lr (amp=bf16)"} <= set(steps)
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert "skipped" in steps["cuda tests"]["detail"]  # no CUDA here: every CUDA test skips
    bench = pd.read_csv(workdir / "gpu" / "bench" / "bench.csv")
    assert {"naive", "single", "fused", "single+defaults", "single+bf16"} <= set(bench["method"])
    assert (workdir / "gpu" / "bench" / "profile.md").stat().st_size > 200
    assert len(pd.read_csv(workdir / "gpu" / "bench" / "evaluation.csv")) == 2
    for folder in ("results/lr", "results/activation", "results-amp-bf16/lr"):
        summary = pd.read_csv(workdir / "gpu" / folder / "summary.csv")
        assert len(summary) >= 2 and summary["final_test_acc"].notna().all()
    text = (workdir / "gpu" / "summary.md").read_text()
    assert "| study lr | ok |" in text and "## Bench" in text


def test_gpu_check_without_cuda_says_so(workdir):
    out = cli("gpu-check", "--out", "gpu", cwd=workdir)
    assert out.returncode == 2 and "no CUDA device" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (workdir / "gpu").exists()
