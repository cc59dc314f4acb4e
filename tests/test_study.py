"""`cnnbench study` end to end on real MNIST: MLflow experiment, runs, metrics, results."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import REPO, cli, refusal, run_main, tree

QUICK = ["--set", "epochs=2", "--set", "train_subset=1280", "--set", "test_subset=500", "--set", "log_every=5",
         "--set", "progress=false"]


def _runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_lr_study_end_to_end(workdir, capsys):
    # --fuse: the five learning rates train as one group, as they do by default on a GPU
    out = cli("study", str(REPO / "studies" / "lr.yaml"), *QUICK, "--seeds", "0", "--fuse", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| lr | n | ours epoch 1 | ours final" in out.stdout
    # progress a person can watch: each running trial's epochs, from the worker processes
    for lr in ("0.001", "0.005", "0.01", "0.05", "0.1"):
        assert f"lr={lr} seed=0: epoch 1/2, test/acc" in out.stderr, out.stderr[-3000:]
        assert f"lr={lr} seed=0: finished, test acc" in out.stderr
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client, runs = _runs(uri, "lr")
    parents = [r for r in runs if r.data.tags.get("cnnbench.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("cnnbench.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 5
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.info.run_name for c in children) == sorted(
        f"lr={lr} seed=0" for lr in ("0.001", "0.005", "0.01", "0.05", "0.1"))
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["cnnbench.status"] == "finished"
        assert c.data.params["lr"] == c.data.tags["scientific.lr"] and c.data.params["batch_size"] == "64"
        assert set(c.data.params) >= {"model", "activation", "momentum", "epochs", "seed", "test_batch_size"}
        assert c.data.tags["fused_with"] == "5"
        for tag in ("model", "dataset", "seed", "device", "torch_version", "mlflow.source.git.commit"):
            assert c.data.tags.get(tag), tag
        loss = client.get_metric_history(c.info.run_id, "train/loss")
        assert [m.step for m in loss][:4] == [320, 640, 960, 1280] and loss[-1].step == 2560
        acc = client.get_metric_history(c.info.run_id, "test/acc")
        assert [m.step for m in acc] == [1, 2] and all(0 <= m.value <= 100 for m in acc)
        assert {"test/loss", "images_per_second", "train_seconds"} <= set(c.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"curves.png", "result.json", "config.json", "checkpoints"} <= artifacts
        assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(c.info.run_id, "checkpoints")}

    summary = pd.read_csv(workdir / "results" / "lr" / "summary.csv")
    need = {"study", "trial", "lr", "seed", "epoch1_test_acc", "final_test_acc", "best_test_acc", "best_epoch",
            "train_seconds", "images_per_second", "mlflow_run_id", "diverged"}
    assert need <= set(summary.columns) and len(summary) == 5
    assert set(summary["mlflow_run_id"]) == {c.info.run_id for c in children}
    by_lr = summary.set_index("lr")
    for c in children:
        hist = client.get_metric_history(c.info.run_id, "test/acc")
        row = by_lr.loc[float(c.data.params["lr"])]
        assert row["epoch1_test_acc"] == pytest.approx(hist[0].value) and row["final_test_acc"] == pytest.approx(hist[-1].value)
    table = (workdir / "results" / "lr" / "table.md").read_text()
    assert "93.42" in table and "98.70" in table  # the document's figures beside ours
    assert (workdir / "results" / "lr" / "curves.png").stat().st_size > 10_000
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "results")} >= {
        "results/summary.csv", "results/table.md", "results/curves.png"}

    # the same command again (in this process) trains nothing: every trial is found finished by its config
    capsys.readouterr()
    assert run_main("study", str(REPO / "studies" / "lr.yaml"), *QUICK, "--seeds", "0") == 0
    assert "0 run(s) trained, 5 already finished" in capsys.readouterr().out
    _, runs = _runs(uri, "lr")
    finished = [r for r in runs if r.data.tags.get("cnnbench.kind") == "trial"]
    assert len(finished) == 5
    assert pd.read_csv(workdir / "results" / "lr" / "summary.csv")["final_test_acc"].tolist() == \
        summary["final_test_acc"].tolist()


@pytest.mark.slow
def test_run_trains_one_trial_with_overrides(workdir):
    out = cli("run", "--set", "epochs=1", "--set", "train_subset=640", "--set", "test_subset=200",
              "--set", "activation=relu", "--set", "lr=0.05", "--set", "progress=false", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "status finished" in out.stdout
    client, runs = _runs(f"sqlite:///{workdir / 'mlflow.db'}", "cnnbench-run")
    assert len(runs) == 1 and runs[0].data.params["activation"] == "relu"


BAD_INPUT = [
    (["run", "--set", "lrr=0.1"], "unknown setting 'lrr'"),
    (["run", "--set", "batch_size=big"], "batch_size: expected an integer, got 'big'"),
    (["run", "--set", "epochs=0"], "epochs: must be >= 1"),
    (["run", "--set", "model=lenet7"], "model: unknown value 'lenet7'; known: alexnet"),
    (["study", "studies/lr.yaml", "--set", "lr=0.2"], "lr is varied by study lr"),
    (["study", "studies/missing.yaml"], "studies/missing.yaml: no such spec file"),
    (["study", "studies/lr.yaml", "--seeds", "0,x"], "--seeds: expected integers"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_exits_2_and_writes_nothing(workdir, capsys, args, message):
    """In this process (cnnbench.cli.main), but for the first case."""
    (workdir / "studies").mkdir()
    (workdir / "studies" / "lr.yaml").write_text((REPO / "studies" / "lr.yaml").read_text())
    before = tree(workdir)
    code, stderr = refusal(args, real=args == BAD_INPUT[0][0], cwd=workdir, capsys=capsys)  # one case: the real command
    assert code == 2, stderr
    err = stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnnbench: error:") and message in err[0], stderr
    assert tree(workdir) == before  # no mlflow.db, no results, no checkpoints


@pytest.mark.slow
def test_evaluate_retests_an_epoch_checkpoint(workdir, data_root):
    """Document 000's `python mnist.py --net model/net_008.pth`: re-test a saved epoch."""
    from cnnbench.train.loop import run_trial

    from conftest import quick

    ckpt = workdir / "ckpt"
    result = run_trial(quick(epochs=2, checkpoints="all", activation="relu", lr=0.05), data_root=data_root,
                       checkpoint_dir=ckpt)
    out = cli("evaluate", str(ckpt / "epoch_001.pt"), cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"test accuracy {result.history[0]['test/acc']:.2f}% on 500 images" in out.stdout
    bad = cli("evaluate", str(workdir / "nope.pt"), cwd=workdir)
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr
