"""Many cnnbench processes starting at the same moment on a fresh store: MLflow's tracking
store and a sweep's Optuna storage, each on SQLite and on a real PostgreSQL server.

The processes are started first and held at a barrier (a file appearing) with torch,
MLflow and Optuna already imported, so that they reach the empty store together: the
moment two processes once collided creating its tables ("table experiments already
exists") and one of them ended with exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import TINY_STUDY

N = 4  # processes started together

# a process that imports everything, waits for the barrier file, then runs the command
HELD = """
import os, sys, time
import mlflow, optuna, torch  # noqa: F401  (the slow imports, before the barrier)
from cnnbench.cli import main
go, ready = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""


def start_together(folder: Path, commands: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    go = folder / "go"
    procs, ready = [], []
    for i, args in enumerate(commands):
        flag = folder / f"ready-{i}"
        ready.append(flag)
        procs.append(subprocess.Popen([sys.executable, "-c", HELD, str(go), str(flag), *args], cwd=folder,
                                      env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 600
    while not all(f.exists() for f in ready):  # the state waited for: every process at the barrier
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a process did not reach the barrier"
        time.sleep(0.05)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def study_spec(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "scientific": {"lr": [0.05]}, "fixed": {"epochs": 1}}))
    return path


def sweep_spec(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "search": {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
        "fixed": {"train_subset": 600, "val_size": 200, "test_subset": 200, "epochs": 1, "log_every": 5,
                  "progress": False},
        "sweep": {"sampler": "random", "pruner": "none", "n_trials": N, "final_seeds": [0]}}))
    return path


STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.server)]


@pytest.fixture
def store(request, workdir):
    """(backend, URL) of a fresh store: a SQLite file in the test's folder, or a fresh
    database on the PostgreSQL server (created and dropped by `postgres`)."""
    if request.param == "sqlite":
        return "sqlite", None
    return "postgresql", request.getfixturevalue("postgres")


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES, indirect=True)
def test_studies_started_together_on_a_fresh_mlflow_store(workdir, store):
    backend, urls = store
    uri = urls[1] if urls else f"sqlite:///{workdir / 'mlflow.db'}"
    names = [f"together{i}" for i in range(N)]
    commands = [["study", str(study_spec(workdir, name)), "--workers", "1", *TINY_STUDY] for name in names]
    outs = start_together(workdir, commands, {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    for name in names:
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id])
        assert sorted((r.data.tags["cnnbench.kind"], r.info.status) for r in runs) == [
            ("study", "FINISHED"), ("trial", "FINISHED")]
        assert (workdir / "results" / name / "summary.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES, indirect=True)
def test_sweep_workers_started_together_on_a_fresh_optuna_storage(workdir, store):
    backend, urls = store
    storage = urls[0] if urls else f"sqlite:///{workdir / 'optuna.db'}"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"  # a fresh MLflow store as well
    spec = sweep_spec(workdir, "fresh")
    commands = [["sweep", str(spec), "--storage", storage, "--no-final"] for _ in range(N)]
    outs = start_together(workdir, commands, {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
    trials = optuna.load_study(study_name="fresh", storage=storage).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == N and set(states) == {TrialState.COMPLETE}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fresh")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cnnbench.kind") == "sweep"]
    search = [r for r in runs if r.data.tags.get("cnnbench.phase") == "search"]
    assert len(parents) == 1 and len(search) == N
    assert {r.info.status for r in search} == {"FINISHED"}


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES, indirect=True)
def test_processes_started_together_share_one_grid_study(workdir, store):
    """One grid study, N processes with the same command and storage (as on N machines):
    every planned run trained exactly once, all under one MLflow parent run, and the
    results written once, by the process that ends the study, naming every run."""
    backend, urls = store
    storage = urls[0] if urls else f"sqlite:///{workdir / 'optuna.db'}"
    uri = urls[1] if urls else f"sqlite:///{workdir / 'mlflow.db'}"
    path = workdir / "shared.yaml"
    path.write_text(yaml.safe_dump({"name": "shared", "scientific": {"lr": [0.02, 0.05, 0.1]}, "seeds": [0, 1],
                                    "fixed": {"epochs": 1}}))
    commands = [["study", str(path), "--storage", storage, "--no-fuse", "--workers", "1", *TINY_STUDY]
                for _ in range(N)]
    outs = start_together(workdir, commands, {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags["cnnbench.kind"] == "study"]
    trials = [r for r in runs if r.data.tags["cnnbench.kind"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 6 and {r.info.status for r in trials} == {"FINISHED"}
    assert len({r.data.tags["cnnbench.trial_key"] for r in trials}) == 6  # each run once
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    # the Optuna study holds each run once, complete, and nothing else
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith("shared.")]
    states = [t.state for t in optuna.load_study(study_name=name, storage=storage).get_trials()]
    assert states == [TrialState.COMPLETE] * 6
    summary = (workdir / "results" / "shared" / "summary.csv").read_text()
    assert all(r.info.run_id in summary for r in trials)
    # one process wrote the results; every other one said so, or found them up to date
    assert sum("| lr |" in out.stdout for out in outs) >= 1
