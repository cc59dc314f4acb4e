"""Intervals and verdicts of a real 3-seed study (table, stats.csv, MLflow parent run), and
`cnnbench compare` on two executions of it, checked against scipy.stats computed here."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from scipy import stats as st

from conftest import REPO, cli, run_main, tree

SPEC = ("name: lr2\ntitle: Two learning rates\nscientific:\n  lr: [0.02, 0.1]\nfixed:\n  model: lenet5\n"
        "  activation: relu\n  epochs: 2\n  train_subset: 640\n  test_subset: 300\n  log_every: 2\n"
        "  progress: false\nseeds: [0, 1, 2]\nreported:\n  - {lr: 0.02, final_test_acc: 50.0}\n"
        "  - {lr: 0.1, final_test_acc: 99.99}\n")


def _by_lr(frame: pd.DataFrame, metric: str) -> dict[float, np.ndarray]:
    """Accuracies per lr, in seed order."""
    return {lr: g.sort_values("seed")[metric].to_numpy(float) for lr, g in frame.groupby("lr")}


@pytest.mark.slow
def test_a_three_seed_study_has_intervals_and_verdicts_and_compare_runs_on_two_executions(workdir, capsys):
    (workdir / "lr2.yaml").write_text(SPEC)
    out = cli("study", "lr2.yaml", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = workdir / "results" / "lr2"
    summary = pd.read_csv(folder / "summary.csv")
    table = (folder / "table.md").read_text()
    assert "| Δ final vs best [95% CI] | p (Holm) | verdict | seeds for 80% power |" in table
    assert "paired t test" in table and "doc final vs our 95% PI" in table

    # stats.csv: every figure against scipy, computed here from summary.csv
    stats_csv = pd.read_csv(folder / "stats.csv")
    for metric in ("epoch1_test_acc", "final_test_acc", "best_test_acc"):
        acc = _by_lr(summary, metric)
        rows = stats_csv[stats_csv["metric"] == metric].set_index("lr")
        best = max(acc, key=lambda lr: acc[lr].mean())
        other = next(lr for lr in acc if lr != best)
        for lr, x in acc.items():
            row = rows.loc[lr]
            assert row["n"] == 3 and row["mean"] == pytest.approx(x.mean()) and row["std"] == pytest.approx(x.std(ddof=1))
            if x.std() > 0:
                assert (row["ci_low"], row["ci_high"]) == pytest.approx(
                    st.t.interval(0.95, 2, loc=x.mean(), scale=st.sem(x)))
        assert rows.loc[best, "verdict"] == "best"
        if np.std(acc[other] - acc[best]) > 1e-9:  # two values: Holm over one comparison is the raw p
            res = st.ttest_rel(acc[other], acc[best])
            assert rows.loc[other, "test"] == "paired t"
            assert rows.loc[other, "p_holm"] == pytest.approx(res.pvalue)
            assert (rows.loc[other, "diff_ci_low"], rows.loc[other, "diff_ci_high"]) == pytest.approx(
                tuple(res.confidence_interval()))
            assert rows.loc[other, "verdict"] == ("worse" if res.pvalue < 0.05 else "within noise of best")
    final = stats_csv[stats_csv["metric"] == "final_test_acc"].set_index("lr")
    for lr, figure in ((0.02, 50.0), (0.1, 99.99)):  # the spec's `reported` figures
        x = _by_lr(summary, "final_test_acc")[lr]
        low, high = st.t.interval(0.95, 2, loc=x.mean(), scale=x.std(ddof=1) * math.sqrt(1 + 1 / 3))
        assert (final.loc[lr, "pi_low"], final.loc[lr, "pi_high"]) == pytest.approx((low, high))
        assert final.loc[lr, "doc"] == figure
        assert final.loc[lr, "doc_verdict"] == ("consistent" if low - 0.005 <= figure <= high + 0.005 else "outside")
        assert final.loc[lr, "doc_verdict"] in table  # and the table says the same
    x = _by_lr(summary, "final_test_acc")[0.1]

    # the study's MLflow parent run: stats.csv and per-value metrics and tags
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lr2")
    parents = client.search_runs([exp.experiment_id], "tags.`cnnbench.kind` = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    assert "results/stats.csv" in {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert parent.data.metrics["stats/final_test_acc/lr:0.1/mean"] == pytest.approx(x.mean())
    assert parent.data.metrics["stats/final_test_acc/lr:0.1/ci_high"] == pytest.approx(final.loc[0.1, "ci_high"])
    assert parent.data.tags["stats/final_test_acc/lr:0.02/doc_verdict"] == final.loc[0.02, "doc_verdict"]
    assert {parent.data.tags["stats/final_test_acc/lr:0.02/verdict"], parent.data.tags[
        "stats/final_test_acc/lr:0.1/verdict"]} & {"best"}

    # a second execution in bf16, and compare (in this process: the first ran the real command)
    assert run_main("study", "lr2.yaml", "--set", "amp=bf16", "--results-dir", "results-bf16") == 0
    assert run_main("compare", "results/lr2", "results-bf16/lr2", "--labels", "fp32,bf16") == 0
    cmp_dir = workdir / "results" / "compare-lr2-fp32-bf16"
    assert "Does bf16 reproduce fp32? Study `lr2`" in (cmp_dir / "compare.md").read_text()
    got = pd.read_csv(cmp_dir / "compare.csv")
    other = pd.read_csv(workdir / "results-bf16" / "lr2" / "summary.csv")
    for metric in ("final_test_acc", "best_test_acc"):
        a, b = _by_lr(summary, metric), _by_lr(other, metric)
        rows = got[got["metric"] == metric].set_index("lr")
        ps = {}
        for lr in a:
            d = b[lr] - a[lr]
            assert rows.loc[lr, "pairs"] == 3 and rows.loc[lr, "diff"] == pytest.approx(d.mean(), abs=1e-9)
            if np.std(d) > 1e-9:
                res = st.ttest_rel(b[lr], a[lr])
                ps[lr] = res.pvalue
                assert (rows.loc[lr, "diff_ci_low"], rows.loc[lr, "diff_ci_high"]) == pytest.approx(
                    tuple(res.confidence_interval()))
            else:
                assert rows.loc[lr, "verdict"] == ("identical" if abs(d.mean()) < 1e-9 else "differs")
        order = sorted(ps, key=ps.get)  # Holm over the configs with a test, from its definition
        for rank, lr in enumerate(order):
            adjusted = max(min(1.0, (len(ps) - r) * ps[order[r]]) for r in range(rank + 1))
            assert rows.loc[lr, "p_holm"] == pytest.approx(adjusted)
            assert rows.loc[lr, "verdict"] == ("differs" if adjusted < 0.05 else "within seed noise")

    # the same execution again trains nothing; its study run compares as identical, by run id
    capsys.readouterr()
    assert run_main("study", "lr2.yaml") == 0 and "0 run(s) trained" in capsys.readouterr().out
    runs = client.search_runs([exp.experiment_id], "tags.`cnnbench.kind` = 'study'", order_by=["start_time ASC"])
    fp32 = [r.info.run_id for r in runs if r.data.params.get("fixed.amp") is None]
    assert len(fp32) == 2
    assert run_main("compare", *fp32, "--name", "again", "--out", "cmp") == 0
    same = pd.read_csv(workdir / "cmp" / "compare-again" / "compare.csv")
    assert (same["verdict"] == "identical").all() and len(same) == 2 * 3


def test_compare_committed_results_with_themselves(tmp_path, monkeypatch):
    """Committed results (no training): a copy of results/lr reproduces it exactly."""
    shutil.copytree(REPO / "results" / "lr", tmp_path / "copy" / "lr")
    monkeypatch.chdir(tmp_path)  # in this process: the three-seed test above runs the real command
    assert run_main("compare", str(REPO / "results" / "lr"), str(tmp_path / "copy" / "lr"), "--out",
                    str(tmp_path / "out")) == 0
    folders = [p.name for p in (tmp_path / "out").iterdir()]
    assert folders == ["compare-lr-results-copy"]  # same folder names: the first ancestors that differ
    got = pd.read_csv(tmp_path / "out" / folders[0] / "compare.csv")
    summary = pd.read_csv(REPO / "results" / "lr" / "summary.csv")
    assert len(got) == 3 * summary["lr"].nunique() and (got["verdict"] == "identical").all()
    assert (got["pairs"] == 3).all()


BAD_INPUT = [
    (["compare", "empty", "results/lr"], "empty: no summary.csv here"),
    (["compare", "results/lr", "results/batch"], "is study 'lr', results/batch is study 'batch'"),
    (["compare", "results/lr", "nowhere"], "nowhere: no such results folder"),
    (["compare", "results/lr", "results/lr", "--labels", "fp32"], "--labels: expected two different labels"),
    (["compare", "results/lr", "results/lr", "--name", "../up"], "--name: '../up' is not a folder name"),
    (["compare", "results/lr", "bad"], "bad/summary.csv: not a cnnbench summary.csv"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_compare_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    """In this process (cnnbench.cli.main), but for the first case."""
    for name in ("lr", "batch"):
        shutil.copytree(REPO / "results" / name, tmp_path / "results" / name)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.csv").write_text("lr,acc\n0.1,98\n")
    before = tree(tmp_path)
    if args == BAD_INPUT[0][0]:  # one case through the real command: its exit status and stderr
        out = cli(*args, cwd=tmp_path)
        code, stderr = out.returncode, out.stderr
    else:
        monkeypatch.chdir(tmp_path)
        code, stderr = run_main(*args), capsys.readouterr().err
    assert code == 2, stderr
    err = stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnnbench: error:") and message in err[0], stderr
    assert tree(tmp_path) == before


def test_parent_run_stats_take_any_value_as_a_key(tmp_path):
    """Values with commas and spaces (augment `hflip,grayscale`) become valid MLflow keys."""
    from cnnbench.report import stats
    from cnnbench.track.writer import Tracker

    tracker = Tracker("keys", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracker.start_parent("keys", kind="study", tags={})
    trials = pd.DataFrame({"augment": ["none", "hflip,grayscale"] * 3, "batch_size": [64] * 6,
                           "seed": [0, 0, 1, 1, 2, 2], "final_test_acc": [98.0, 97.0, 98.2, 97.1, 98.1, 96.9]})
    table = stats.study_stats(trials, ["augment", "batch_size"], ["final_test_acc"], paired_seeds=True)
    tracker.log_stats(run, table, ["augment", "batch_size"])
    data = tracker.client.get_run(run).data
    flipped = np.array([97.0, 97.1, 96.9])
    assert data.metrics["stats/final_test_acc/augment:hflip_grayscale batch_size:64/mean"] == pytest.approx(flipped.mean())
    assert data.tags["stats/final_test_acc/augment:none batch_size:64/verdict"] == "best"
    assert data.tags["stats/final_test_acc/augment:hflip_grayscale batch_size:64/verdict"] == (
        "worse" if st.ttest_rel(flipped, [98.0, 98.2, 98.1]).pvalue < 0.05 else "within noise of best")


def test_compare_speed_counts_a_fused_group_once():
    """An execution's speed: every trial's images over its training time, a fused group's
    time counted once (each of its trials reports the group's time): the same 4 trials
    trained at one rate as a group of 4, as two groups of 2 or one at a time compare 1x."""
    from cnnbench.report.compare import training_rate, training_work

    def trials(group: int) -> pd.DataFrame:  # 4 trials of 10,000 images, 1,000 model-images/s
        return pd.DataFrame({"images_per_second": [1000.0 / group] * 4, "train_seconds": [10.0 * group] * 4,
                             "fused_with": [group] * 4})

    assert training_work(trials(1)) == training_work(trials(2)) == training_work(trials(4)) == (40000.0, 40.0)
    assert training_rate(trials(4)) == training_rate(trials(1)) == 1000.0
    assert training_rate(trials(4).drop(columns="fused_with")) == 250.0  # an old summary: each trial alone
    assert math.isnan(training_rate(pd.DataFrame({"seed": [0, 1]})))
