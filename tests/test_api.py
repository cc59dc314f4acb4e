"""`import cnnbench` from Python, as a notebook uses it: the public API, light to import,
and a study run, read back and summarized through it."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import textwrap

import pytest

import cnnbench
from cnnbench.errors import ConfigError
from conftest import REPO


def test_the_api_is_public_documented_and_light_to_import():
    assert set(cnnbench.__all__) >= {"load_spec", "run_trial", "run_study", "run_sweep", "evaluate", "load_runs",
                                     "summarize", "__version__"}
    for name in cnnbench.API:
        assert callable(getattr(cnnbench, name)) and getattr(cnnbench, name).__doc__, name
    with pytest.raises(AttributeError):
        cnnbench.no_such_function  # noqa: B018
    # a user reads every option from the signature: no **kwargs passed through, except
    # run_trial's training settings (TrialConfig's fields, each checked: see below)
    for name in cnnbench.API:
        function = getattr(cnnbench, name)
        if inspect.isfunction(function):
            rest = [p.name for p in inspect.signature(function).parameters.values()
                    if p.kind is inspect.Parameter.VAR_KEYWORD]
            assert rest == (["settings"] if name == "run_trial" else []), f"{name} takes **{rest}"
    with pytest.raises(ConfigError, match="no_such_setting"):
        cnnbench.run_trial(no_such_setting=1, track=False)
    # importing the package (and the command's parser) pulls in neither torch nor MLflow,
    # and no module of cnnbench switches matplotlib's backend (a notebook keeps its own)
    code = textwrap.dedent("""
        import sys, matplotlib
        matplotlib.use("svg")
        import cnnbench, cnnbench.cli
        cnnbench.cli.build_parser()
        assert "torch" not in sys.modules and "mlflow" not in sys.modules, "heavy imports"
        import cnnbench.api, cnnbench.report.tables, cnnbench.report.figures, cnnbench.track.figure
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_version():
    out = subprocess.run([sys.executable, "-m", "cnnbench", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"cnnbench {cnnbench.__version__}"


@pytest.mark.slow
def test_a_study_from_python_read_back_and_summarized(workdir, data_root):
    spec = cnnbench.load_spec(REPO / "studies" / "lr.yaml", seeds=[0, 1],
                              overrides={"epochs": 1, "train_subset": 640, "test_subset": 300, "progress": False})
    assert spec.seeds == (0, 1) and spec.base_config().epochs == 1
    spec = dataclasses.replace(spec, scientific={"lr": (0.05, 0.1)})  # two of its five values
    outcome = cnnbench.run_study(spec, data_root=data_root, workers=1)
    assert outcome is not None and outcome.trained == 4 and not outcome.failed
    runs = cnnbench.load_runs("lr")
    assert sorted(runs["lr"].unique()) == [0.05, 0.1] and set(runs["seed"]) == {0, 1}
    stats = cnnbench.statistics(runs)
    assert set(stats["lr"]) == {0.05, 0.1} and "verdict" in stats
    layers = cnnbench.summarize("lenet5")
    assert layers.params == 61_706


def test_a_trial_and_its_checkpoint_from_python(workdir, data_root):
    result = cnnbench.run_trial(epochs=1, train_subset=640, test_subset=300, lr=0.05, progress=False,
                                data_root=data_root, track=False)
    assert result.status == "finished" and result.run_id == ""
    again = cnnbench.evaluate(result.final_checkpoint, data_root=data_root)
    assert again["epoch"] == 1 and again["images"] == 300
    assert again["test_acc"] == pytest.approx(result.history[-1]["test/acc"])
    with pytest.raises(ConfigError, match="lrr"):
        cnnbench.run_trial(lrr=0.1, data_root=data_root, track=False)
