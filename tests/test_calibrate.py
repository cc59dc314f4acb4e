"""The CPU calibration (`cnnbench bench --calibrate`, train/calibration.py): measured and
cached per machine, invalidated when the CPU, torch or core count changes, damaged files
measured again, and a study on the CPU using the cached layout, recording it, repeating
its numbers bit for bit under one calibration and keeping its layout when resumed.

The measurements here are tiny (a step or two per candidate, one worker layout, so no
worker processes); the command's own sizes run only from the command.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, replace

import pytest
from mlflow import MlflowClient

from conftest import REPO, TINY_STUDY, cli
from cnnbench.config.spec import StudySpec
from cnnbench.errors import ConfigError
from cnnbench.run.layout import decide
from cnnbench.run.study import run_study
from cnnbench.tools.bench.calibrate import Sizes, calibrate, markdown
from cnnbench.track.schema import (
    TAG_CALIBRATION,
    TAG_CALIBRATION_KEY,
    TAG_CPU_LAYOUT,
    TAG_FUSED_WITH,
    TAG_THREADS,
    TAG_WORKERS,
)
from cnnbench.train import calibration
from cnnbench.train.calibration import Calibration, Layout
from cnnbench.train.conv_path import ENV as CONV_PATH_ENV
from cnnbench.train.device import CHANNELS_LAST_ENV

TINY = Sizes(steps=1, repeats=1, warm=1, ks=(2,), trials=2, layouts=((1, 1),))
# a layout unlike the defaults in every field a test can see
ODD = Layout(workers=1, threads=1, engine="wide", max_k=2, channels_last=False, conv_path="bmm")


def saved(state, layout: Layout = ODD) -> Calibration:
    """`layout` cached as this machine's calibration in `state` (what the command would save)."""
    cal = Calibration(machine=calibration.machine(), layout=layout, figures=[], bf16="not measured")
    calibration.save(cal, state)
    return cal


@pytest.mark.slow
def test_measured_once_then_cached(tmp_path, data_root):
    lines: list[str] = []
    cal, md = calibrate(data_root=data_root, state=tmp_path, sizes=TINY, out_dir=tmp_path / "out", say=lines.append)
    path = calibration.cache_path(tmp_path)
    assert path.exists() and md is not None and md.exists()
    assert md.name == f"calibration-{calibration.cpu_kind(cal.machine)}.md"
    assert cal.layout.engine in calibration.ENGINES and cal.layout.workers == 1 and cal.layout.threads == 1
    stages = {f["stage"] for f in cal.figures}
    assert {"kernels"} <= stages and all(f["model_images_per_s"] > 0 for f in cal.figures)
    # every candidate of the first stage was measured: engines, layouts, conv paths
    whats = {f["what"] for f in cal.figures if f["stage"] == "kernels"}
    assert any("single" in w for w in whats) and any("conv bmm" in w for w in whats) \
        and any("channels-first" in w for w in whats)
    assert any(cal.layout.describe() in line for line in lines if line.startswith("chosen:"))
    assert ("bf16" in stages) == bool(calibration.matrix_units(cal.machine)) and cal.bf16
    if "bf16" in stages:  # bf16 against fp32, and a wide layout's grouped convolutions kept in fp32
        whats = {f["what"] for f in cal.figures if f["stage"] == "bf16"}
        assert any(w.endswith("bf16, 1 thread") for w in whats) and cal.fast is not None
        mixed = cal.layout.engine == "wide" and cal.layout.conv_path == "grouped"
        assert any("conv grouped-fp32 bf16" in w for w in whats) == mixed
        assert ("wide with grouped convolutions in fp32" in cal.bf16) == mixed
        assert cal.fast.conv_path in (cal.layout.conv_path, "grouped-fp32")
    before = path.read_text()
    again, md_again = calibrate(data_root=data_root, state=tmp_path, sizes=TINY, out_dir=tmp_path / "out",
                                say=lines.append)
    assert md_again is None and path.read_text() == before  # read back, not measured
    assert again.layout == cal.layout and "cached" in lines[-1]
    assert "| kernels |" in markdown(cal) and cal.layout.describe() in markdown(cal)


@pytest.mark.parametrize("change", [dict(cpu="Intel(R) Xeon(R) Platinum 8480+"), dict(torch="9.9.9"),
                                    dict(cores=64), dict(flags=["avx2"])])
def test_another_machine_is_not_read(tmp_path, change):
    cal = saved(tmp_path)
    here = calibration.machine()
    other = {**here, **change}
    assert calibration.machine_key(other) != calibration.machine_key(here)
    assert calibration.cache_path(tmp_path, other) != calibration.cache_path(tmp_path, here)
    assert calibration.load(tmp_path, other) is None  # another key: nothing cached for it
    assert calibration.load(tmp_path) == cal
    # a file of the other machine put under this machine's name is not trusted either
    calibration.cache_path(tmp_path).write_text(replace(cal, machine=other).to_json())
    assert calibration.load(tmp_path) is None


@pytest.mark.slow
@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"version": 99}), json.dumps([1, 2]),
                                     "layout-of-another-version"])
def test_bad_cache_files_are_measured_again(tmp_path, data_root, content, capsys):
    path = calibration.cache_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert calibration.load(tmp_path) is None
    assert "ignored" in capsys.readouterr().out
    cal, _ = calibrate(data_root=data_root, state=tmp_path, sizes=TINY, say=lambda line: None)
    assert calibration.load(tmp_path) == cal  # measured again and saved whole


def test_bad_layout_in_cache_is_ignored(tmp_path):
    cal = saved(tmp_path)
    raw = json.loads(cal.to_json())
    for field, bad in (("engine", "warp"), ("conv_path", "fft"), ("workers", 0)):
        calibration.cache_path(tmp_path).write_text(json.dumps({**raw, "layout": {**raw["layout"], field: bad}}))
        assert calibration.load(tmp_path) is None


def test_decide_follows_the_layout():
    default = decide("cpu", None, None, 16, None)
    assert default.fuse and default.wide_only and default.engine is None and default.share_out
    assert default.max_fuse == 16 and default.layout is None
    wide = decide("cpu", None, None, 16, ODD)
    assert (wide.workers, wide.threads, wide.engine, wide.max_fuse, wide.wide_only) == (1, 1, "wide", 2, True)
    vmap = decide("cpu", None, None, 16, replace(ODD, engine="vmap", max_k=4))
    assert vmap.engine == "vmap" and not vmap.wide_only and vmap.max_fuse == 4 and vmap.share_out
    single = decide("cpu", None, None, 16, replace(ODD, engine="single", max_k=1))
    assert not single.fuse and not single.share_out and single.engine is None
    given = decide("cpu", None, 3, 16, ODD)  # an option given wins over the calibration
    assert given.workers == 3 and given.threads >= 1
    first = calibration.first_groups
    assert first(5, 2, 16) == [3, 2] and first(5, 1, 3) == [3] and first(2, 2, 1) == [1, 1]
    assert first(15, 2, 8) == [8, 7]


# the process stage as two calibrations measured it on the 2-core AMD EPYC (5 trials from one,
# 15 from the other: results/bench/calibration-*.md and docs/speed.md)
MEASURED = [{"workers": 2, "threads": 1, "trials": 5, "model_images_per_s": 47239.3},
            {"workers": 1, "threads": 2, "trials": 5, "model_images_per_s": 50737.5},
            {"workers": 2, "threads": 1, "trials": 15, "model_images_per_s": 64354.9},
            {"workers": 1, "threads": 2, "trials": 15, "model_images_per_s": 51051.3}]


def test_a_study_s_workers_follow_the_layouts_measured_for_its_trial_count(tmp_path):
    """Calibration.for_trials: the worker layouts measured for the trial count nearest the
    study's, each rate rescaled by how evenly its workers share the study's trials; the
    rest of the layout as calibrated. Measured (docs/speed.md): the 15-trial lr study took
    205.0 s with 2 x 1 and 243.2 s with 1 x 2, and the 5 trials' rates alone, rescaled,
    chose 1 x 2 for it."""
    from cnnbench.train.calibration import balance

    assert balance(5, 2, 8) == 5 / 6 and balance(15, 2, 8) == 15 / 16 and balance(15, 1, 8) == 1.0
    assert balance(1, 2, 8) == 0.5 and balance(32, 2, 8) == 1.0 and balance(40, 2, 8) == 40 / 48
    assert balance(6, 4, 1) == 0.75
    layout = replace(ODD, workers=1, threads=2, max_k=8)
    cal = Calibration(machine=calibration.machine(), layout=layout, processes=MEASURED)
    chosen = {n: cal.for_trials(layout, n) for n in (1, 2, 5, 8, 15, 30)}
    assert {n: (c.workers, c.threads) for n, c in chosen.items()} == {
        1: (1, 2), 2: (2, 1), 5: (1, 2), 8: (2, 1), 15: (2, 1), 30: (2, 1)}
    assert all(replace(c, workers=1, threads=2) == layout for c in chosen.values())  # only the workers change
    five_only = Calibration(machine=calibration.machine(), layout=layout, processes=MEASURED[:2])
    assert (five_only.for_trials(layout, 15).workers, five_only.for_trials(layout, 5).workers) == (2, 1)
    # what the cache keeps is what a study reads back; a calibration with no process stage keeps its layout
    calibration.save(cal, tmp_path)
    assert calibration.load(tmp_path).processes == [{**p, "rounds": []} for p in MEASURED]
    assert Calibration(machine=calibration.machine(), layout=layout).for_trials(layout, 15) == layout
    from cnnbench.run.layout import cpu_layout

    assert (cpu_layout("cpu", tmp_path, trials=15).workers, cpu_layout("cpu", tmp_path, trials=5).workers) == (2, 1)


def rows(trials: int, one_thread: list[float], two_threads: list[float]) -> list[dict]:
    return [{"workers": w, "threads": t, "trials": trials, "model_images_per_s": sorted(r)[len(r) // 2], "rounds": r}
            for w, t, r in ((2, 1, one_thread), (1, 2, two_threads))]


def test_one_thread_per_worker_stays_unless_another_layout_wins_most_rounds():
    """calibration.fastest_processes: the rounds of each layout compared pairwise (round i
    of one with round i of the other, measured moments apart). The first case is the noise
    that picked 1 x 2 for the 3-seed study in a clean clone (its median above 2 x 1's by
    one round's burst; the study then ran 243 s instead of 205 s)."""
    pick = calibration.fastest_processes
    # higher median, but 3 rounds of 5 won: noise, the one-thread layout stays
    noisy = rows(15, [64000, 52000, 51500, 65000, 52100], [54000, 54500, 53000, 52000, 52500])
    assert statistics.median(noisy[1]["rounds"]) > statistics.median(noisy[0]["rounds"])
    assert (pick(noisy, 15, 8)["workers"], pick(noisy, 15, 8)["threads"]) == (2, 1)
    # faster in 4 rounds of 5 and by its median: chosen
    faster = rows(5, [47000, 46000, 48000, 52000, 47500], [50000, 49500, 51000, 50500, 48000])
    assert pick(faster, 5, 8)["threads"] == 2
    # every round won but a lower median can not happen; a lower median loses whatever the rounds
    slower = rows(15, [64000, 63000, 65000, 62000, 64500], [51000, 52000, 50000, 53000, 51500])
    assert pick(slower, 15, 8)["threads"] == 1
    # rescaled to the study's trials: 2 x 1 ties 1 x 2 on 8 trials (8 = 4 + 4) but shares 5 as 3 + 2
    even = rows(8, [50000] * 5, [49000, 48000, 48500, 49500, 48800])
    assert pick(even, 8, 8)["threads"] == 1 and pick(even, 5, 8)["threads"] == 2
    # one round each (no "rounds"): the median decides, as a single sample does
    single = [{k: v for k, v in r.items() if k != "rounds"} for r in faster]
    assert pick(single, 5, 8)["threads"] == 2
    assert pick(noisy[:1], 15, 8) is None and pick(noisy, 0, 8) is None
    # the calibration's markdown shows the rounds the choice compared
    text = markdown(Calibration(machine=calibration.machine(), layout=replace(ODD, max_k=8), processes=noisy))
    assert "| 15 | 2 x 1 | 64,000, 52,000, 51,500, 65,000, 52,100 |" in text
    assert "15 trials 2 x 1 thread(s)" in text


@pytest.mark.slow
def test_the_process_stage_keeps_every_round(data_root):
    """Worker processes for real (spawned, each training its first group): every layout
    measured in `process_repeats` rounds, each round a positive rate."""
    from cnnbench.tools.bench.calibrate import Candidate, process_rates

    sizes = Sizes(warm=1, process_steps=2, process_repeats=3, trials=3)
    out = process_rates(Candidate("wide", 2, True), [(2, 1), (1, 2)], data_root, sizes, max_k=2)
    assert set(out) == {(2, 1), (1, 2)}
    assert all(len(r) == 3 and all(x > 0 for x in r) for r in out.values())


def tiny_spec(name: str = "calib") -> StudySpec:
    fixed = {"model": "lenet5", "epochs": 1, "train_subset": 320, "test_subset": 200, "log_every": 2,
             "progress": False, "device": "cpu"}
    return StudySpec(name=name, path="(test)", title="", source="", description="",
                     scientific={"lr": (0.01, 0.05)}, nuisance={}, fixed=fixed, seeds=(0,), reported=())


def run_tiny(root, data_root, name: str = "calib", workers: int | None = None, final: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    return run_study(tiny_spec(name), data_root=data_root, results_root=root / "results",
                     tracking=f"sqlite:///{root / 'mlflow.db'}", state=root / "state", workers=workers, final=final)


def trial_numbers(root, name: str = "calib"):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cnnbench.kind") == "study")
    trials = sorted((r for r in runs if r.data.tags.get("cnnbench.kind") == "trial"), key=lambda r: r.info.run_name)
    curves = [[m.value for m in client.get_metric_history(r.info.run_id, "train/loss")] for r in trials]
    return parent, trials, curves


@pytest.mark.slow
def test_study_uses_and_records_the_calibration(tmp_path, data_root, capsys):
    for root, layout in ((tmp_path / "a", ODD), (tmp_path / "b", ODD), (tmp_path / "c", None)):
        if layout is not None:
            saved(root / "state", layout)
        run_tiny(root, data_root, workers=None if layout else 1)  # one process, no worker to start
    assert CONV_PATH_ENV not in os.environ and CHANNELS_LAST_ENV not in os.environ  # put back after the study
    assert "CPU layout of this machine's calibration" in capsys.readouterr().out
    parent, trials, curves = trial_numbers(tmp_path / "a")
    tags = parent.data.tags
    assert json.loads(tags[TAG_CALIBRATION]) == asdict(ODD)
    assert tags[TAG_CPU_LAYOUT] == ODD.describe() and tags[TAG_CALIBRATION_KEY] == calibration.machine_key(
        calibration.machine())
    assert (tags[TAG_WORKERS], tags[TAG_THREADS]) == ("1", "1")
    assert [t.data.tags[TAG_FUSED_WITH] for t in trials] == ["2", "2"]  # one wide group of max_k = 2
    # the same calibration: the same numbers, bit for bit
    _, _, curves_b = trial_numbers(tmp_path / "b")
    assert curves == curves_b and all(len(c) > 2 for c in curves)
    default, _, _ = trial_numbers(tmp_path / "c")  # no calibration: the defaults, recorded as such
    assert default.data.tags[TAG_CALIBRATION] == "none" and default.data.tags[TAG_CPU_LAYOUT] == "defaults"


@pytest.mark.slow
def test_a_resumed_study_keeps_its_layout(tmp_path, data_root, capsys):
    root = tmp_path / "a"
    saved(root / "state", ODD)
    run_tiny(root, data_root, final=False)  # trained, not ended: the next execution goes on with it
    saved(root / "state", replace(ODD, channels_last=True, conv_path="grouped"))  # calibrated again since
    outcome = run_tiny(root, data_root)
    assert "keeps the CPU layout it started with" in capsys.readouterr().out
    parent, _, _ = trial_numbers(root)
    assert outcome.parent_run_id == parent.info.run_id  # one parent run: the same execution
    assert json.loads(parent.data.tags[TAG_CALIBRATION]) == asdict(ODD)


@pytest.mark.slow
@pytest.mark.parametrize("fast_layout", [replace(ODD, engine="single", max_k=1),
                                         replace(ODD, conv_path="grouped-fp32")], ids=["single", "grouped-fp32"])
def test_fast_profile(tmp_path, data_root, fast_layout):
    from cnnbench import api

    spec = tiny_spec()
    if not calibration.matrix_units(calibration.machine()):
        with pytest.raises(ConfigError, match="--fast: this CPU has no bf16 matrix units"):
            api.fast_spec(spec, data_root=data_root, state=tmp_path)
        return
    cal = Calibration(machine=calibration.machine(), layout=ODD, fast=fast_layout)
    calibration.save(cal, tmp_path)
    fast = api.fast_spec(spec, data_root=data_root, state=tmp_path)
    assert fast.name == spec.name and fast.base_config().amp == "bf16" and spec.base_config().amp == "none"
    outcome = api.run_study(spec, data_root=data_root, results_root=tmp_path / "results", state=tmp_path,
                            tracking=f"sqlite:///{tmp_path / 'mlflow.db'}", fast=True)
    assert outcome.files[0] == tmp_path / "results" / "fast" / spec.name / "summary.csv"  # not results/<study>
    assert all(row.result.config.amp == "bf16" for row in outcome.rows)
    parent, trials, _ = trial_numbers(tmp_path)
    assert parent.data.tags[TAG_CPU_LAYOUT] == cal.fast.describe()  # the calibration's fast layout
    fused = "1" if fast_layout.engine == "single" else "2"  # its engine: one trial at a time, or wide
    assert [t.data.tags[TAG_FUSED_WITH] for t in trials] == [fused, fused]


def test_command_reads_the_cache(workdir):
    saved(workdir / ".cnnbench")
    out = cli("bench", "--calibrate", "--device", "cpu", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cached" in out.stdout and ODD.describe() in out.stdout
    assert not (workdir / "results").exists()  # nothing measured, nothing written
    out = cli("study", str(REPO / "studies" / "lr.yaml"), *TINY_STUDY, "--seeds", "0", "--set", "device=cuda",
              "--fast", cwd=workdir)
    assert out.returncode == 2 and "error:" in out.stderr


def test_environment_variables_set_for_a_while(monkeypatch):
    """util.environ.variables, what the calibrated layout, the calibration's slices, the
    engine sweep and the notebooks' kernel set for their workers: set within, each put
    back as it was afterwards (an error inside too), a user's own setting kept where asked."""
    from cnnbench.util.environ import variables

    monkeypatch.setenv("CNNBENCH_TEST_SET", "user")
    monkeypatch.delenv("CNNBENCH_TEST_UNSET", raising=False)
    with variables({"CNNBENCH_TEST_SET": "ours", "CNNBENCH_TEST_UNSET": "ours"}):
        assert os.environ["CNNBENCH_TEST_SET"] == "ours" and os.environ["CNNBENCH_TEST_UNSET"] == "ours"
    assert os.environ["CNNBENCH_TEST_SET"] == "user" and "CNNBENCH_TEST_UNSET" not in os.environ
    with variables({"CNNBENCH_TEST_SET": "ours", "CNNBENCH_TEST_UNSET": "ours"}, keep_set=True):
        assert os.environ["CNNBENCH_TEST_SET"] == "user" and os.environ["CNNBENCH_TEST_UNSET"] == "ours"
    with pytest.raises(RuntimeError), variables({"CNNBENCH_TEST_SET": "ours"}):
        raise RuntimeError("inside")
    assert os.environ["CNNBENCH_TEST_SET"] == "user" and "CNNBENCH_TEST_UNSET" not in os.environ
