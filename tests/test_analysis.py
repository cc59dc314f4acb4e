"""The loader, the notebooks and `cnnbench report` on tiny studies of real MNIST.

One module-wide lab (a working folder with its own MLflow store) holds the lr study over
two seeds, a batch-size study with the learning rate as nuisance, a models study and a
three-trial `cnnbench sweep`; the tests read it back through `cnnbench.track.reader` and
`cnnbench.report.analysis` and compare with what `cnnbench study` wrote to `results/`, then run
every notebook headless.
"""

from __future__ import annotations

import json
import re

import nbformat
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import REPO, TINY_STUDY, cli, refusal

TINY = "  train_subset: 640\n  test_subset: 300\n  log_every: 2\n  progress: false\n"
SPECS = {
    "lrbatch": "name: lrbatch\ntitle: Batch size, lr tuned per batch size\nscientific:\n  batch_size: [32, 128]\n"
               "nuisance:\n  lr: [0.05, 0.1]\nfixed:\n  model: lenet\n  epochs: 2\n" + TINY + "seeds: [0]\n",
    "models": "name: models\ntitle: Architectures\nscientific:\n  model: [lenet, resnet]\nfixed:\n  epochs: 1\n"
              "  lr: 0.05\n" + TINY + "seeds: [0]\n",
    # two scientific hyperparameters, the first categorical: the isolation plot draws a hue
    "twoway": "name: twoway\ntitle: Augmentation x batch size\nscientific:\n  augment: [none, hflip]\n"
              "  batch_size: [32, 64]\nfixed:\n  model: lenet\n  epochs: 1\n  lr: 0.05\n" + TINY + "seeds: [0]\n",
    "sweep-tiny": "name: sweep-tiny\nsearch:\n  lr: {type: float, low: 0.01, high: 0.2, log: true}\n"
                  "  batch_size: [32, 64]\nfixed:\n  model: lenet\n  epochs: 2\n  val_size: 200\n" + TINY +
                  "sweep: {sampler: random, pruner: none, n_trials: 3, final_seeds: [0]}\n",
}
NOTEBOOKS = REPO / "notebooks"


def figures_in(html: str) -> int:
    """Figures a notebook drew (its PNG outputs; the page's CSS has PNGs of its own)."""
    return len(re.findall(r'<img [^>]*src="data:image/png', html))


def study(*args: str, command: str = "study") -> None:
    """`cnnbench study ...` in this process (the command's own code path, one torch import)."""
    from cnnbench.cli import main

    assert main([command, *args]) == 0


@pytest.fixture(scope="module")
def lab(tmp_path_factory, data_root):
    import torch

    root = tmp_path_factory.mktemp("lab")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny LeNets on a shared CPU: one thread is faster
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("CNNBENCH_DATA", str(data_root))
        mp.setenv("CNNBENCH_HOME", str(root / ".cnnbench"))
        (root / "studies").mkdir()
        for name, text in SPECS.items():
            (root / "studies" / f"{name}.yaml").write_text(text)
        study(str(REPO / "studies" / "lr.yaml"), *TINY_STUDY, "--seeds", "0,1")
        study("studies/lrbatch.yaml")
        study("studies/models.yaml")
        study("studies/twoway.yaml")
        study("studies/sweep-tiny.yaml", command="sweep")  # 3 trials and the best one's final seed
        torch.set_num_threads(threads)
        yield root


def test_stored_notebooks_have_no_outputs_and_take_parameters():
    books = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert books == ["analysis.ipynb", "models.ipynb", "sweep.ipynb"]
    for path in NOTEBOOKS.glob("*.ipynb"):
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        assert book.metadata.kernelspec.name == "python3", path.name
        code = [c for c in book.cells if c.cell_type == "code"]
        dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
        assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them (make notebooks-clean)"
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "tracking_uri = None" in tagged[0].source, path.name


@pytest.mark.slow
def test_load_runs_is_one_row_per_trial_and_epoch_and_agrees_with_results(lab):
    from cnnbench.report import analysis
    from cnnbench.track import reader

    frame = reader.load_runs("lr")
    assert len(frame) == 5 * 2 * 2 and not frame.duplicated(["trial", "epoch"]).any()
    assert frame.attrs["scientific"] == ["lr"] and frame.attrs["nuisance"] == [] and frame.attrs["seeds"] == [0, 1]
    assert frame.attrs["fixed"]["batch_size"] == 64 and frame.attrs["fixed"]["activation"] == "sigmoid"
    for column, kind in {"lr": "float64", "batch_size": "int64", "seed": "int64", "epoch": "int64",
                         "normalize": "bool", "test_acc": "float64", "momentum": "float64"}.items():
        assert str(frame[column].dtype) == kind, column
    assert {"test_loss", "train_epoch_loss", "epoch_lr", "model", "train_seconds", "run_id"} <= set(frame.columns)
    assert list(frame["value"].cat.categories) == ["lr=0.001", "lr=0.005", "lr=0.01", "lr=0.05", "lr=0.1"]
    assert set(frame["trial"]) == {f"lr={lr} seed={s}" for lr in ("0.001", "0.005", "0.01", "0.05", "0.1") for s in (0, 1)}
    assert (frame["trial"] == frame["run_name"]).all()  # the names the MLflow UI lists
    client = MlflowClient(frame.attrs["tracking_uri"])
    one = frame[frame["trial"] == "lr=0.05 seed=1"]
    assert one["test_acc"].tolist() == [m.value for m in client.get_metric_history(one["run_id"].iloc[0], "test/acc")]

    # the same numbers as results/lr/ that `cnnbench study` wrote
    spec = reader.study_spec(frame)
    assert spec.seeds == (0, 1) and spec.fixed["epochs"] == 2 and spec.reported  # the document's figures
    ours = analysis.summary(frame, spec).sort_values("mlflow_run_id", ignore_index=True)
    saved = pd.read_csv(lab / "results" / "lr" / "summary.csv").sort_values("mlflow_run_id", ignore_index=True)
    assert ours["mlflow_run_id"].tolist() == saved["mlflow_run_id"].tolist()
    for column in ("epoch1_test_acc", "final_test_acc", "best_test_acc", "best_epoch", "train_seconds"):
        assert ours[column].astype(float).tolist() == pytest.approx(saved[column].astype(float).tolist()), column
    table = [line for line in analysis.table(frame, spec).splitlines() if line.startswith("|")]
    assert table == [line for line in (lab / "results" / "lr" / "table.md").read_text().splitlines()
                     if line.startswith("|")]

    curve = reader.load_loss_curve(frame)  # the first epoch only: 640 images, a point every 2 steps of 64
    assert curve["run_id"].nunique() == 10
    assert sorted(curve["samples"].unique()) == [128, 256, 384, 512, 640]


@pytest.mark.slow
def test_nuisance_is_optimised_away_and_lr_x_batch_size_has_a_heatmap(lab):
    from cnnbench.report import analysis
    from cnnbench.track import reader
    from cnnbench.report import figures

    frame = reader.load_runs("lrbatch")
    spec = reader.study_spec(frame)
    assert spec.scientific == {"batch_size": (32, 128)} and spec.nuisance == {"lr": (0.05, 0.1)}
    trials = analysis.summary(frame, spec)
    best = analysis.isolated(frame, spec)
    for batch, group in trials.groupby("batch_size"):
        winner = group.loc[group["best_test_acc"].idxmax(), "lr"]
        assert set(best.loc[best["batch_size"] == batch, "lr"]) == {winner}
    assert list(best["value"].cat.categories) == ["batch_size=32", "batch_size=128"]

    assert figures.has_heatmap(spec)
    fig = figures.heatmap(trials, spec)
    cells = sorted(fig.axes[0].collections[0].get_array().compressed().tolist())
    assert cells == pytest.approx(sorted(trials["final_test_acc"].tolist()))
    assert figures.isolation(trials, spec) is not None

    lr = reader.load_runs("lr")
    assert not figures.has_heatmap(reader.study_spec(lr)) and figures.heatmap(analysis.summary(lr), reader.study_spec(lr)) is None


@pytest.mark.slow
def test_epoch_reuse_gives_every_trial_its_epochs(workdir):
    from cnnbench.report import analysis
    from cnnbench.track import reader

    (workdir / "epochs.yaml").write_text("name: epochs-tiny\nscientific:\n  epochs: [1, 2]\nfixed:\n  model: lenet\n"
                                         "  lr: 0.05\n" + TINY + "seeds: [0]\n")
    study("epochs.yaml")
    frame = reader.load_runs("epochs-tiny")
    assert frame["run_id"].nunique() == 1  # the 1-epoch trial reads the 2-epoch run
    assert frame.groupby("trial")["epoch"].apply(list).to_dict() == {"epochs=1 seed=0": [1], "epochs=2 seed=0": [1, 2]}
    saved = pd.read_csv(workdir / "results" / "epochs-tiny" / "summary.csv").set_index("epochs")
    ours = analysis.summary(frame).set_index("epochs")
    assert ours["final_test_acc"].tolist() == pytest.approx(saved["final_test_acc"].tolist())


@pytest.mark.slow
def test_the_loader_reads_the_study_as_last_executed(workdir):
    from cnnbench.track import reader

    (workdir / "sel.yaml").write_text("name: sel\nscientific:\n  lr: [0.05, 0.1]\nfixed:\n  model: lenet\n"
                                      + TINY + "seeds: [0]\n")
    study("sel.yaml", "--set", "epochs=1")
    study("sel.yaml", "--set", "epochs=2")
    frame = reader.load_runs("sel")
    assert frame["run_id"].nunique() == 2 and set(frame["epochs"]) == {2} and frame["epoch"].max() == 2
    everything = reader.trial_runs("sel", run_ids=None)
    client = MlflowClient(frame.attrs["tracking_uri"])
    old = [r.info.run_id for r in client.search_runs([everything.attrs["experiment_id"]], "params.epochs = '1'")]
    assert len(old) == 2 and set(reader.load_runs("sel", run_ids=old)["epochs"]) == {1}


@pytest.mark.slow
def test_report_writes_html_for_every_study_and_sweep(lab):
    stored = {p.name: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")}
    (lab / "results" / "ghost").mkdir()
    (lab / "results" / "ghost" / "summary.csv").write_text("study,trial\n")  # results without runs here
    (lab / "results" / "ghost-sweep").mkdir()
    (lab / "results" / "ghost-sweep" / "trials.csv").write_text("number,value\n")  # a sweep run elsewhere
    out = cli("report", cwd=lab)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "skipped ghost: no MLflow experiment 'ghost'" in out.stdout
    assert "skipped ghost-sweep: no Optuna storage for sweep 'ghost-sweep'" in out.stdout
    results = lab / "results"
    pages = {p: (results / p).read_text() for p in ("lr/report.html", "lrbatch/report.html", "models/report.html",
                                                     "twoway/report.html", "sweep-tiny/report.html", "models.html",
                                                     "index.html")}
    assert not (results / "ghost" / "report.html").exists() and not (results / "ghost-sweep" / "report.html").exists()
    images = {p: figures_in(text) for p, text in pages.items()}

    lr = pages["lr/report.html"]
    assert "Learning rate: LeNet-5 (sigmoid) on MNIST" in lr and "93.42" in lr and "98.70" in lr  # beside the document
    assert "lr=0.01 seed=1" in lr and "does not vary both" in lr and "These are the same runs as" in lr
    assert images["lr/report.html"] == 2  # curves, isolation; no heatmap
    # the verdicts (seeds 0 and 1): one best value, the others judged, the document's figures against our PI
    assert "Is the difference real?" in lr and "Accuracy judged: <code>final_test_acc</code>" in lr
    assert len(re.findall(r">best</td>", lr)) == 1
    # four values judged against the best, in table.md's verdict column and again in the verdict table
    assert len(re.findall(r">(?:within noise of best|worse|untested)</td>", lr)) == 2 * 4
    assert len(re.findall(r">(?:consistent|outside)</td>", lr)) == 2 * 5  # epoch 1 and final, five rates
    assert images["lrbatch/report.html"] == 3  # curves, isolation, heatmap
    assert images["twoway/report.html"] == 2  # curves, isolation with batch size as hue
    assert "load_runs(" not in lr  # the code is left out of the report
    sweep = pages["sweep-tiny/report.html"]
    assert "Optuna study <code>sweep-tiny</code>" in sweep and "3 complete" in sweep
    assert "maximize <code>val_acc</code>" in sweep
    assert images["sweep-tiny/report.html"] == 4  # history, importance, slices, the best trials' curves
    models = pages["models.html"]
    assert "61,706" in models and "416,520" in models and "No runs" not in models  # lenet: params, MACs
    assert "resnet" in models and "vgg16" in models  # every registered model's size, the studied ones' accuracy
    assert images["models.html"] == 1  # size and compute against accuracy and time
    for link in ("lr/report.html", "lrbatch/report.html", "sweep-tiny/report.html", "models.html"):
        assert f'href="{link}"' in pages["index.html"]
    assert {p.name: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")} == stored  # still without outputs


@pytest.mark.slow
def test_notebooks_say_so_when_the_study_or_sweep_is_absent(workdir):
    from cnnbench.tools.notebooks import NOTEBOOK_DIR, execute, to_html

    for book, name, message in (("analysis.ipynb", "study", "cnnbench study studies/absent.yaml"),
                                ("sweep.ipynb", "sweep", "no Optuna storage for sweep 'absent'")):
        executed = execute(NOTEBOOK_DIR / book, {name: "absent"}, cwd=workdir)
        outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"], book
        html = to_html(executed, "absent")
        assert f"Nothing to analyse for {name} <code>absent</code>" in html and message in html, book
        assert figures_in(html) == 0, book


@pytest.mark.parametrize("args, message", [
    (["report", "--results-dir", "nowhere"], "nowhere: no such folder"),
    (["report", "nosuch"], "results/nosuch: no such study or sweep folder"),
])
def test_report_bad_input_exits_2(workdir, capsys, args, message):
    """In this process (cnnbench.cli.main), but for the first case."""
    (workdir / "results").mkdir()
    code, stderr = refusal(args, real=args[1:] == ["--results-dir", "nowhere"], cwd=workdir, capsys=capsys)
    assert code == 2, stderr
    err = stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], stderr
    assert json.dumps(sorted(p.name for p in (workdir / "results").iterdir())) == "[]"


@pytest.mark.slow
def test_a_study_queues_its_trials_seed_by_seed(lab):
    """A grid study's queue holds its trials seed by seed (lr by lr within a seed), so that
    the group a CPU worker claims holds as few seeds as it can, and the CPU trains a group
    seed by seed (fused.fuse_groups): no trial here was fused with another seed's."""
    from cnnbench.track import reader

    runs = reader.trial_runs("lr")
    seeds = runs["params.seed"].astype(int)
    numbers = runs["tags.optuna.trial_number"].astype(int)
    assert len(runs) == 10 and numbers[seeds == 0].max() < numbers[seeds == 1].min()
    assert (runs["tags.fused_with"].astype(int) <= 5).all()
