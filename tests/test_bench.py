"""`cnnbench bench` runs all three paths and writes its report (figures are not asserted:
speed is a benchmark, not a test)."""

import math

import pandas as pd
import pytest
import torch

from cnnbench.tools.bench.bound import fp32_bound
from cnnbench.train.device import usable_cores

from conftest import cli, run_main


@pytest.mark.slow
def test_bench_times_naive_single_and_fused_and_writes_results(workdir):
    out = cli("bench", "--steps", "20", "--repeats", "1", "--max-k", "2", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch" in out.stdout and "threads" in out.stdout
    assert "learning-rate study" in out.stdout and "projected" in out.stdout
    frame = pd.read_csv(workdir / "results" / "bench" / "bench.csv")
    assert {"naive", "single", "fused"} <= set(frame["method"])
    assert set(frame[frame["method"] == "fused"]["k"]) == {1, 2}
    assert set(frame[frame["method"] == "wide"]["k"]) == {1, 2}
    assert (frame["model_images_per_s"] > 0).all()
    assert (frame["fraction_of_fp32_peak"] > 0).all()  # the CPU's bound is measured, not left blank
    assert "GFLOP/s (measured FP32 matmul" in out.stdout
    assert frame.loc[frame["method"] == "naive", "ratio_to_naive"].iloc[0] == 1.0
    assert (workdir / "results" / "bench" / "throughput.png").stat().st_size > 5_000


def test_the_cpu_s_fp32_bound_is_measured_on_every_core_and_leaves_the_threads_as_they_were():
    cores, threads = usable_cores(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tflops, source = fp32_bound(torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert math.isfinite(tflops) and tflops > 0
    assert source == f"measured FP32 matmul, 2048 x 2048, on {cores} thread(s)"


def test_bench_refuses_bad_options(workdir):
    out = cli("bench", "--steps", "0", cwd=workdir)
    assert out.returncode == 2 and "--steps: must be >= 20" in out.stderr
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_bench_sweep_times_one_sweep_both_ways_and_writes_sweep_md(workdir):
    out = cli("bench", "--sweep", "--sweep-trials", "2", "--sweep-epochs", "1", "--sweep-train-subset", "640",
              "--fuse-k", "2", "--device", "cpu", cwd=workdir, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = (workdir / "results" / "bench" / "sweep.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| one at a time") or line.startswith("| fused, K=2")]
    assert len(rows) == 2 and all(row.split("|")[2].strip() == "2" for row in rows)  # 2 trials each way
    assert "fused with 1 other(s)" in out.stdout and "trials/hour" in text
    assert "cnnbench bench --sweep --sweep-trials 2 --sweep-epochs 1 --sweep-train-subset 640 --fuse-k 2" in text


def test_bench_sweep_refuses_bad_options(workdir, capsys):
    assert run_main("bench", "--sweep", "--fuse-k", "0") == 2  # in this process (the case above: the command)
    assert "--fuse-k: must be >= 1" in capsys.readouterr().err
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_bench_engines_compares_wide_with_vmap(workdir):
    out = cli("bench", "--engines", "--steps", "20", "--repeats", "1", "--max-k", "2", "--device", "cpu", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    frame = pd.read_csv(workdir / "results" / "bench" / "engines_cpu.csv")
    assert frame["k"].tolist() == [1, 2]
    assert (frame["vmap"] > 0).all() and (frame["wide"] > 0).all()
    # the raw figures the table is made from (a ratio of rounded figures is not the rounded ratio)
    assert frame["wide_over_vmap"].tolist() == pytest.approx((frame["wide"] / frame["vmap"]).tolist(), rel=1e-12)
    assert frame["wide_over_single"].tolist() == pytest.approx((frame["wide"] / frame["single"]).tolist(), rel=1e-12)
