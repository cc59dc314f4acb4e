"""The document studies: epoch reuse, seed aggregation, and their specs and make targets."""

import subprocess
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from scipy import stats as st

from cnnbench.config.spec import StudySpec, load_spec
from cnnbench.report.tables import table_markdown
from cnnbench.run.study import plan
from cnnbench.track.schema import TAG_TRIAL_THREADS
from cnnbench.train.loop import run_trial

import rounding
from conftest import REPO, cli, quick

EPOCHS = textwrap.dedent("""
    name: ep
    scientific: {{epochs: [1, 2, 3]}}
    fixed: {{activation: relu, lr: 0.05, train_subset: 1280, test_subset: 500, log_every: 5,
             progress: false, schedule: {schedule}}}
""")


@pytest.mark.parametrize("schedule, runs", [("none", 1), ("step", 1), ("plateau", 1), ("onecycle", 3)])
def test_epoch_counts_share_one_run_unless_the_schedule_depends_on_them(tmp_path, schedule, runs):
    path = tmp_path / "ep.yaml"
    path.write_text(EPOCHS.format(schedule=schedule))
    p = plan(load_spec(path))
    assert len(p.trials) == 3 and len(p.runs) == runs
    assert {p.runs[i].epochs for i in p.run_of} == ({3} if runs == 1 else {1, 2, 3})


@pytest.mark.slow
def test_a_shorter_epoch_count_reads_the_numbers_a_shorter_run_produces(workdir, data_root):
    path = workdir / "ep.yaml"
    path.write_text(EPOCHS.format(schedule="none"))
    out = cli("study", str(path), cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = pd.read_csv(workdir / "results" / "ep" / "summary.csv").set_index("epochs")
    assert summary["mlflow_run_id"].nunique() == 1  # one run of 3 epochs
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    history = [m.value for m in client.get_metric_history(summary["mlflow_run_id"].iloc[0], "test/acc")]
    assert [summary.loc[n, "final_test_acc"] for n in (1, 2, 3)] == pytest.approx(history)
    assert summary.loc[2, "best_epoch"] in (1, 2) and summary.loc[3, "best_test_acc"] == pytest.approx(max(history))
    # and a separate 2-epoch trial ends exactly where the 3-epoch run was after epoch 2: on
    # this machine and at the run's own thread count (a study's CPU worker trains on one
    # thread), the same kernels give the same bits (at another count, ReLU at lr 0.05 makes
    # the rounding difference a different accuracy on some CPUs)
    threads = client.get_run(summary["mlflow_run_id"].iloc[0]).data.tags[TAG_TRIAL_THREADS]
    with rounding.threads(int(threads) if threads else torch.get_num_threads()):
        alone = run_trial(quick(activation="relu", lr=0.05, epochs=2, train_subset=1280, test_subset=500),
                          data_root=data_root)
    assert alone.history[-1]["test/acc"] == pytest.approx(summary.loc[2, "final_test_acc"])


def test_seeds_are_aggregated_as_mean_std_and_n(tmp_path):
    spec = StudySpec(name="agg", path="agg.yaml", title="Aggregation", source="", description="",
                     scientific={"lr": (0.01, 0.1)}, nuisance={}, fixed={}, seeds=(0, 1, 2),
                     reported=({"lr": 0.01, "epoch1_test_acc": 90.0, "final_test_acc": 98.0},))
    acc = {0.01: [(91.0, 97.0), (92.0, 98.0), (96.0, 99.0)], 0.1: [(95.0, 98.5), (95.0, 98.5), (95.0, 98.5)]}
    rows = [{"lr": lr, "seed": s, "status": "finished", "diverged": False, "epochs": 10,
             "epoch1_test_acc": e1, "final_test_acc": fin, "best_test_acc": fin, "best_epoch": 10}
            for lr, values in acc.items() for s, (e1, fin) in enumerate(values)]
    table = table_markdown(spec, pd.DataFrame(rows))
    line = next(l for l in table.splitlines() if l.startswith("| 0.01 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # lr, n, epoch 1, final, best, Δ final vs best, p, verdict, seeds, doc epoch 1, doc final, delta epoch 1,
    # delta final, doc epoch 1 vs PI, doc final vs PI
    assert cells[1] == "3"

    def ci(values):  # mean ± std [95% t interval of the mean], computed here
        x = np.array(values)
        low, high = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
        return f"{x.mean():.2f} ± {x.std(ddof=1):.2f} [{low:.2f}, {high:.2f}]"

    assert cells[2] == ci([91.0, 92.0, 96.0]) and cells[2].startswith("93.00 ± 2.65 [")
    assert cells[3] == ci([97.0, 98.0, 99.0]) and cells[3].startswith("98.00 ± 1.00 [")
    # lr 0.1 is best in final accuracy (98.5); lr 0.01 against it, paired over seeds 0-2
    paired = st.ttest_rel([97.0, 98.0, 99.0], [98.5] * 3)
    low, high = paired.confidence_interval()
    assert cells[5] == f"-0.50 [{low:+.2f}, {high:+.2f}]" and cells[6] == f"{paired.pvalue:.3f}"
    assert cells[7] == ("worse" if paired.pvalue < 0.05 else "within noise of best")
    assert cells[9:13] == ["90.00", "98.00", "+3.00", "+0.00"]
    pi = {k: st.t.interval(0.95, 2, loc=np.mean(v), scale=np.std(v, ddof=1) * np.sqrt(4 / 3))
          for k, v in {"e1": [91.0, 92.0, 96.0], "final": [97.0, 98.0, 99.0]}.items()}
    for cell, (k, doc) in zip(cells[13:], (("e1", 90.0), ("final", 98.0))):
        word = "consistent" if pi[k][0] <= doc <= pi[k][1] else "outside"
        assert cell == f"{word} [{pi[k][0]:.2f}, {pi[k][1]:.2f}]"
    other = next(l for l in table.splitlines() if l.startswith("| 0.1 |"))
    assert "95.00 ± 0.00 [95.00, 95.00]" in other and "| **best** |" in other
    assert other.rstrip().endswith("– | – | – | – | – | – |")


def test_every_document_study_has_a_make_target_listed_by_make_help():
    specs = {p.stem for p in (REPO / "studies").glob("*.yaml") if load_spec(p).scientific}
    makefile = (REPO / "Makefile").read_text()
    helped = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True).stdout
    for name in ("lr", "batch", "activation", "epochs", "models", "alexnet"):
        assert f"study-{name}" in helped
    for spec in specs:
        assert f"studies/{spec}.yaml" in makefile, spec


def test_studies_reproduce_the_documents_settings():
    batch = load_spec(REPO / "studies" / "batch.yaml")
    assert batch.scientific == {"batch_size": (32, 64, 128, 256, 512)} and batch.fixed["lr"] == 0.01
    act = load_spec(REPO / "studies" / "activation.yaml")
    assert act.scientific == {"activation": ("sigmoid", "relu")}
    alex = load_spec(REPO / "studies" / "alexnet.yaml")
    assert alex.scientific == {"augment": ("none", "hflip,grayscale"), "batch_size": (64, 128)}
    assert (alex.fixed["lr"], alex.fixed["momentum"], alex.fixed["epochs"]) == (0.001, 0.9, 20)
    models = load_spec(REPO / "studies" / "models.yaml")
    assert models.scientific == {"model": ("lenet5", "alexnet", "inception", "resnet")}
    for spec in (batch, act, alex, models, load_spec(REPO / "studies" / "lr.yaml")):
        assert len(spec.seeds) >= 2, spec.name  # variance is part of every result
