"""Your own network and your own data set (issue 23): a network from a module next to the
spec or registered from Python, an image folder of PNGs and an npz file written from
slices of real MNIST, in a study, through the Python API with worker processes, in
`cnnbench summary`; every bad input one line, exit 2, nothing written; an edited network
trained again. See docs/your-own.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
import cnnbench
from cnnbench.config.trial import TrialConfig
from cnnbench.errors import ConfigError
from cnnbench.models.registry import MODELS
from cnnbench.track.schema import TAG_ENGINE, TAG_FUSED_WITH, TAG_KIND, TAG_PID, TEST_ACC
from conftest import REPO, cli, tree

N_TRAIN, N_TEST = 500, 200  # images of each slice: enough to learn something in an epoch, quick to write

NETS = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    """Its own class: a forward that the wide engine does not know, tried and widened."""

    def __init__(self, in_channels, num_classes, image_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, WIDTH, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(WIDTH * (image_size // 2) ** 2, num_classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class Shuffle(nn.Module):
    """A layer the wide engine does not know, which mixes channels (ShuffleNet's shuffle)."""

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Shuffled(nn.Module):
    def __init__(self, in_channels, num_classes, image_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.shuffle = Shuffle()
        self.fc = nn.Linear(4 * image_size ** 2, num_classes)

    def forward(self, x):
        return self.fc(self.shuffle(torch.relu(self.conv(x))).flatten(1))


def not_a_module(in_channels, num_classes):
    return 42


class WrongOutput(nn.Module):
    def __init__(self, in_channels, image_size):
        super().__init__()
        self.fc = nn.Linear(in_channels * image_size ** 2, 7)

    def forward(self, x):
        return self.fc(x.flatten(1))


class FailingForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x)
'''


def write_nets(folder: Path, width: int = 8) -> Path:
    path = folder / "nets.py"
    path.write_text(NETS.replace("WIDTH", str(width)))
    return path


@pytest.fixture(scope="session")
def mnist_slices(data_root):
    from cnnbench.data.tensors import load_arrays

    train_x, train_y, test_x, test_y = load_arrays("mnist", data_root)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="session")
def images(tmp_path_factory, mnist_slices) -> Path:
    """An image folder of PNGs (train/, test/, a folder per digit) from the first MNIST images."""
    from PIL import Image

    train_x, train_y, test_x, test_y = mnist_slices
    root = tmp_path_factory.mktemp("data") / "digits"
    for split, x, y, n in (("train", train_x, train_y, N_TRAIN), ("test", test_x, test_y, N_TEST)):
        for i in range(n):
            folder = root / split / str(int(y[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0].numpy()).save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="session")
def npz(tmp_path_factory, mnist_slices) -> Path:
    """An npz of the next slice of MNIST (N x H x W uint8 images)."""
    train_x, train_y, test_x, test_y = mnist_slices
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x_train=train_x[N_TRAIN:2 * N_TRAIN, 0].numpy(), y_train=train_y[N_TRAIN:2 * N_TRAIN].numpy(),
             x_test=test_x[N_TEST:2 * N_TEST, 0].numpy(), y_test=test_y[N_TEST:2 * N_TEST].numpy())
    return path


@pytest.fixture
def user(tmp_path_factory) -> Iterator[Path]:
    """A folder outside the working directory with the user's module (nets.py) and specs;
    this process forgets its `nets` module afterwards (each test's is its own)."""
    folder = tmp_path_factory.mktemp("user")
    write_nets(folder)
    yield folder
    sys.modules.pop("nets", None)


def spec(folder: Path, name: str, fixed: dict, scientific: dict, seeds=(0, 1)) -> Path:
    base = {"epochs": 1, "log_every": 2, "progress": False, **fixed}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "fixed": base, "scientific": scientific, "seeds": list(seeds)}))
    return path


def runs_of(experiment: str):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


# ----------------------------------------------------------------------------------------
# a study, the Python API, summary


@pytest.mark.slow
def test_a_study_of_your_own_networks_on_your_own_images(workdir, user, images):
    """A 2-value (two networks of a module next to the spec) x 2-seed study on an image
    folder: the one that widens trains wide, the one that mixes channels one at a time."""
    path = spec(user, "mine", {"dataset": f"imagefolder:{images}", "lr": 0.05},
                {"model": ["nets:SmallNet", "nets:Shuffled"]})
    out = cli("study", str(path), cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    engine = [line for line in out.stdout.splitlines() if "engine" in line]
    assert len(engine) == 1, out.stdout  # said once
    assert "nets:SmallNet: wide" in engine[0] and "nets:Shuffled: one trial at a time" in engine[0]
    assert "does not keep the trials apart" in engine[0]
    summary = pd.read_csv(workdir / "results" / "mine" / "summary.csv")
    assert len(summary) == 4 and set(summary["status"]) == {"finished"}
    assert (summary["final_test_acc"] > 20).all()  # learnt something in one epoch of 500 images (chance: 10)
    fused = dict(zip(summary["model"], summary["fused_with"]))
    assert fused == {"nets:SmallNet": 2, "nets:Shuffled": 1}
    assert summary.loc[summary["model"] == "nets:SmallNet", "params"].iloc[0] == 8 * 9 + 8 + 8 * 14 * 14 * 10 + 10
    runs = runs_of("mine")
    parent = [r for r in runs if r.data.tags.get(TAG_KIND) == "study"]
    trials = [r for r in runs if r.data.tags.get(TAG_KIND) == "trial"]
    assert len(parent) == 1 and parent[0].data.tags[TAG_ENGINE] == engine[0].split("engine ", 1)[1]
    assert len(trials) == 4 and {r.data.tags[TAG_FUSED_WITH] for r in trials} == {"1", "2"}
    table = cli("summary", "nets:SmallNet", "--model-path", str(user), cwd=workdir)
    assert table.returncode == 0, table.stderr
    assert "SmallNet" in table.stdout and "TOTAL params: 15,770" in table.stdout


REGISTERING = '''
import cnnbench
from torch import nn


@cnnbench.register_model("tiny_user_net")
def tiny(*, in_channels, num_classes, image_size):
    return nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * (image_size // 2) ** 2, num_classes))
'''


@pytest.fixture
def registered(user, monkeypatch):
    """A module of the user's that registers `tiny_user_net`, imported; unregistered after."""
    (user / "user_registry.py").write_text(REGISTERING)
    monkeypatch.syspath_prepend(str(user))
    import importlib

    importlib.import_module("user_registry")
    yield "tiny_user_net"
    MODELS.pop("tiny_user_net", None)
    sys.modules.pop("user_registry", None)


@pytest.mark.slow
def test_a_registered_network_through_the_python_api_with_worker_processes(workdir, user, npz, registered,
                                                                            data_root):
    path = spec(user, "api", {"model": registered, "dataset": f"npz:{npz}"}, {"lr": [0.02, 0.05]})
    outcome = cnnbench.run_study(cnnbench.load_spec(path), workers=2, data_root=data_root)
    assert outcome is not None and outcome.trained == 4 and not outcome.failed
    assert [r.result.fused_with for r in outcome.rows] == [2, 2, 2, 2]  # two wide pairs (in one worker or in two)
    assert all(r.result.metric(TEST_ACC) > 20 for r in outcome.rows)  # chance: 10
    trials = [r for r in runs_of("api") if r.data.tags.get(TAG_KIND) == "trial"]
    pids = {r.data.tags[TAG_PID] for r in trials}
    # trained in the worker processes, which found the registered network by re-importing its
    # module (not in this one); one worker may claim both groups before the other is up
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2
    result = cnnbench.run_trial(model=registered, dataset=f"npz:{npz}", epochs=1, progress=False, track=False)
    assert result.status == "finished" and len(result.history) == 1


@pytest.mark.slow
def test_a_notebook_model_trains_in_process_or_is_refused_for_workers(workdir, user, images):
    """A network registered in __main__ without a file (a notebook, `python -c`)."""
    path = spec(user, "nb", {"model": "nb_net", "dataset": f"imagefolder:{images}", "train_subset": 64,
                             "test_subset": 64}, {"lr": [0.05]}, seeds=(0,))
    code = textwrap.dedent(f"""
        import cnnbench
        from torch import nn
        from cnnbench.errors import ConfigError

        @cnnbench.register_model("nb_net")
        def net(*, in_channels, num_classes, image_size):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))

        spec = cnnbench.load_spec({str(path)!r})
        try:
            cnnbench.run_study(spec, workers=2)
        except ConfigError as err:
            print("refused:", err)
        outcome = cnnbench.run_study(spec)
        print("trained", outcome.trained)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    refused = [line for line in out.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 1 and "registered in a notebook" in refused[0] and "put it in a module" in refused[0]
    assert "its trials train in this process" in out.stdout and "trained 1" in out.stdout


# ----------------------------------------------------------------------------------------
# an edited network is another trial


@pytest.mark.slow
def test_editing_the_network_trains_it_again(workdir, user, npz):
    path = spec(user, "edit", {"model": "nets:SmallNet", "dataset": f"npz:{npz}", "train_subset": 128,
                               "test_subset": 100}, {"lr": [0.05]}, seeds=(0,))
    first = cli("study", str(path), cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "1 run(s) trained, 0 already finished" in first.stdout
    again = cli("study", str(path), cwd=workdir)
    assert "0 run(s) trained, 1 already finished" in again.stdout, again.stdout[-2000:]
    write_nets(user, width=12)  # the network edited: 12 filters instead of 8
    edited = cli("study", str(path), cwd=workdir)
    assert edited.returncode == 0, edited.stderr[-2000:]
    assert "1 run(s) trained, 0 already finished" in edited.stdout


def test_a_user_networks_identity_is_its_import_path_and_source(user, monkeypatch):
    monkeypatch.syspath_prepend(str(user))
    a = TrialConfig(model="nets:SmallNet")
    before = a.key()
    assert a.identity()["model_source"] and before == TrialConfig(model="nets:SmallNet").key()
    assert before != TrialConfig(model="nets:Shuffled").key() != TrialConfig().key()
    write_nets(user, width=12)
    assert a.key() != before  # the key is of the source as it is now
    from cnnbench.models import get_model

    assert get_model("nets:SmallNet").conv.out_channels == 12  # the edited module was imported again


def test_the_registrys_networks_keep_their_keys():
    """cnnbench's own models add nothing to a trial's identity: the committed results' keys
    are still the keys of their studies' trials (so their runs are found in MLflow)."""
    assert "model_source" not in TrialConfig().identity()
    for name in ("lr", "batch", "activation"):
        planned = {c.key() for c in cnnbench.load_spec(REPO / "studies" / f"{name}.yaml").trial_configs()}
        assert planned == set(pd.read_csv(REPO / "results" / name / "summary.csv")["trial_key"]), name


# ----------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


@pytest.fixture(scope="session")
def bad_data(tmp_path_factory, images: Path, npz: Path) -> dict[str, str]:
    """Broken copies of the data sets, by case."""
    import shutil

    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty").mkdir()
    unreadable = folder / "unreadable"
    shutil.copytree(images, unreadable, ignore=shutil.ignore_patterns(".cnnbench*"))
    (unreadable / "train" / "3" / "00000-broken.png").write_bytes(b"not a png")
    z = dict(np.load(npz))
    np.savez(folder / "missing.npz", x_train=z["x_train"], y_train=z["y_train"])
    np.savez(folder / "lengths.npz", **{**z, "y_train": z["y_train"][:10]})
    labels = z["y_test"].copy()
    labels[5] = 10
    np.savez(folder / "range.npz", **{**z, "y_test": labels})
    return {"empty": f"imagefolder:{folder / 'empty'}", "unreadable": f"imagefolder:{unreadable}",
            "missing": f"npz:{folder / 'missing.npz'}", "lengths": f"npz:{folder / 'lengths.npz'}",
            "range": f"npz:{folder / 'range.npz'}"}


BAD = [  # (model, data case or None for the good npz, the message's words)
    ("nosuch_module:Net", None, "cannot import nosuch_module (ModuleNotFoundError"),
    ("nets:Missing", None, "module nets has no 'Missing'"),
    ("nets:not_a_module", None, "returned int 42, not an nn.Module"),
    ("nets:WrongOutput", None, "returns (2, 7) on a batch of 2 1x28x28 images; expected (2, 10)"),
    ("nets:FailingForward", None, "its forward fails on a batch of 2 1x28x28 images"),
    ("nets:SmallNet", "empty", "no class folders"),
    ("nets:SmallNet", "unreadable", "00000-broken.png: unreadable image"),
    ("nets:SmallNet", "missing", "missing array(s) x_test, y_test"),
    ("nets:SmallNet", "lengths", "x_train has 500 images but y_train 10 labels"),
    ("nets:SmallNet", "range", "y_test: label 10 is out of range 0..9"),
]


@pytest.mark.parametrize("model, case, words", BAD, ids=[f"{m}-{c}" for m, c, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(workdir, user, bad_data, npz, model, case, words):
    dataset = bad_data[case] if case else f"npz:{npz}"
    path = spec(user, "bad", {"model": model, "dataset": dataset}, {"lr": [0.05]}, seeds=(0,))
    before = tree(workdir)
    out = cli("study", str(path), cwd=workdir, env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 2, out.stdout[-1000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnbench: error: ") and words in lines[0], out.stderr
    assert tree(workdir) == before  # no MLflow store, no Optuna study, no results


def test_an_import_error_is_the_modules_own_on_one_line(workdir, user):
    (user / "broken.py").write_text("import torch\nraise RuntimeError('the module failed\\nwhile imported')\n")
    with pytest.raises(ConfigError, match=r"cannot import broken \(RuntimeError: the module failed while imported\)"):
        cnnbench.load_spec(spec(user, "broken", {"model": "broken:Net"}, {"lr": [0.05]}))
    assert tree(workdir) == set()
