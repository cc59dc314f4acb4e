"""`cnnbench bench` runs all three paths and writes its report (figures are not asserted:
speed is a benchmark, not a test)."""

import pandas as pd

from conftest import cli


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
    assert frame.loc[frame["method"] == "naive", "ratio_to_naive"].iloc[0] == 1.0
    assert (workdir / "results" / "bench" / "throughput.png").stat().st_size > 5_000


def test_bench_refuses_bad_options(workdir):
    out = cli("bench", "--steps", "0", cwd=workdir)
    assert out.returncode == 2 and "--steps: must be >= 20" in out.stderr
    assert not (workdir / "results").exists()


def test_bench_engines_compares_wide_with_vmap(workdir):
    out = cli("bench", "--engines", "--steps", "20", "--repeats", "1", "--max-k", "2", "--device", "cpu", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    frame = pd.read_csv(workdir / "results" / "bench" / "engines_cpu.csv")
    assert frame["k"].tolist() == [1, 2]
    assert (frame["vmap"] > 0).all() and (frame["wide"] > 0).all()
    assert frame["wide_over_vmap"].round(2).tolist() == (frame["wide"] / frame["vmap"]).round(2).tolist()
