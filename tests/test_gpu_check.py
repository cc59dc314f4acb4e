"""`cnnbench gpu-check --dry-run`: the GPU check's whole path on the CPU at toy sizes, so
that a session with a GPU spends its minutes measuring, not debugging."""

import json

import pandas as pd
import pytest

from conftest import cli

EVERY_PART = "tests,conv,engines,bench,sweep,studies"


@pytest.mark.slow
def test_the_gpu_check_dry_run_runs_every_step_on_the_cpu(workdir):
    out = cli("gpu-check", "--dry-run", "--out", "gpu", "--budget", "1500", "--parts", EVERY_PART, cwd=workdir,
              timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    gpu = workdir / "gpu"
    steps = {s["name"]: s for s in json.loads((gpu / "check.json").read_text())}
    assert {"environment", "cuda tests", "conv2 micro-benchmark", "engine sweep", "bench", "bench --sweep",
            "study lr", "study activation", "study models", "study lr (amp=bf16)"} <= set(steps)
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert "skipped" in steps["cuda tests"]["detail"]  # no CUDA here: every CUDA test skips
    bench = pd.read_csv(gpu / "bench" / "bench.csv")
    assert {"naive", "single", "fused", "single+defaults", "single+bf16"} <= set(bench["method"])
    assert (gpu / "bench" / "profile.md").stat().st_size > 200
    assert len(pd.read_csv(gpu / "bench" / "evaluation.csv")) == 2
    for folder in ("results/lr", "results/activation", "results/models", "results-amp-bf16/lr"):
        summary = pd.read_csv(gpu / folder / "summary.csv")
        assert len(summary) >= 2 and summary["final_test_acc"].notna().all()
    # the conv2 micro-benchmark: 4 variants at each toy K, eager only on the CPU
    conv = pd.read_csv(gpu / "conv2.csv")
    assert len(conv) == 8 and set(conv["variant"]) == {"grouped", "grouped-nhwc", "grouped-tf32", "bmm"}
    assert (conv["eager_us"] > 0).all() and conv["captured_us"].isna().all() and (conv["kernels"] > 0).all()
    # the engine sweep: 5 variants at K = 1 and 6 (6 trials on 2 seeds: one batch per stream)
    engines = pd.read_csv(gpu / "engines.csv")
    assert len(engines) == 10 and engines["note"].isna().all(), engines
    assert set(engines["variant"]) == {"vmap", "wide", "wide+dedupe", "wide+bmm", "wide+bmm+dedupe"}
    assert (engines["model_images_per_s"] > 0).all() and (engines["kernels_per_step"] > 0).all()
    assert engines[engines["k"] == 6]["streams"].eq(2).all()
    speeds = json.loads((gpu / "state" / "engine-speeds.json").read_text())["entries"]
    assert [e["k"] for e in speeds] == [6] and all(e["vmap"] > 0 and e["wide"] > 0 for e in speeds)
    assert "trials/hour" in next((gpu / "sweep" / "bench").glob("sweep*.md")).read_text()
    # each study against the committed CPU results (cnnbench compare)
    for study in ("lr", "activation", "models"):
        assert (gpu / f"compare-{study}-cpu-dry-run" / "compare.md").is_file(), study
        assert "where the time went" in (gpu / f"study-{study}.log").read_text()  # --timings' table
        assert "final test accuracy" in steps[f"study {study}"]["extra"]["compare"]["summary"]
    text = (gpu / "summary.md").read_text()
    assert "| study lr | ok |" in text and "## Bench" in text and "## Engine sweep" in text
    assert "## conv2 micro-benchmark" in text and "`make studies`" in text and "## bench --sweep" in text


def test_gpu_check_without_cuda_says_so(workdir):
    out = cli("gpu-check", "--out", "gpu", cwd=workdir)
    assert out.returncode == 2 and "no CUDA device" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (workdir / "gpu").exists()


def test_gpu_check_names_a_part_it_does_not_know(workdir):
    out = cli("gpu-check", "--dry-run", "--out", "gpu", "--parts", "tests,profiles", cwd=workdir)
    assert out.returncode == 2 and "--parts: unknown part 'profiles'" in out.stderr
    assert not (workdir / "gpu").exists()


def test_a_variant_of_a_required_study_waits_for_the_budget_like_any_other(tmp_path):
    """On the H200, `lr:amp=bf16` started with the budget spent (lr is required: it runs
    whatever is left) and ran into the command's own time limit, so the check never wrote
    its summary. A variant is skipped like any study the budget cannot hold."""
    from cnnbench.tools.gpu_studies import run_study

    step = run_study("lr:amp=bf16", tmp_path, {}, dry_run=False, left=lambda: 0.0)
    assert step.status == "skipped" and step.detail == "skipped: 0 s of the budget left"
    assert list(tmp_path.iterdir()) == []
