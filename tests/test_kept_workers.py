"""Worker processes kept from one study to the next (run/executors/kept.py): `cnnbench
study A.yaml B.yaml` and `cnnbench.workers_kept()` start the workers once where each would
start the same way, train the same numbers in them, start afresh where not (another
environment, a worker killed, a slot no longer used), and end every one of them at the end,
after a stop request too. Real worker processes on real MNIST subsets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from cnnbench.track.schema import ATTR_WORKER_PID, ATTR_WORKER_SLOT
from cnnbench.util.processes import alive
from conftest import TINY_STUDY, cli

pytestmark = pytest.mark.slow

SPEC = """
name: {name}
scientific: {{lr: [0.05, 0.1]}}
fixed: {{activation: relu}}
seeds: [0]
"""


def specs(folder: Path, *names: str) -> list[Path]:
    paths = [folder / f"{name}.yaml" for name in names]
    for name, path in zip(names, paths):
        path.write_text(SPEC.format(name=name))
    return paths


def workers_of(storage: str, name: str) -> dict[str, int]:
    """Study `name`'s trials' workers: slot -> pid."""
    (study,) = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.split(".")[0] == name]
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    return {t.user_attrs[ATTR_WORKER_SLOT]: t.user_attrs[ATTR_WORKER_PID] for t in trials}


def finals(folder: Path, name: str) -> dict[str, float]:
    """lr -> final test accuracy of study `name`'s finished trials."""
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("cnnbench.kind") == "trial" and r.info.status == "FINISHED"]
    return {r.data.params["lr"]: r.data.metrics["test/acc"] for r in runs}


def gone(pids, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


def test_studies_in_one_command_keep_their_workers_and_train_the_same_numbers(workdir):
    one, two = specs(workdir, "one", "two")  # the same trials under two names
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    out = cli("study", str(one), str(two), *TINY_STUDY, "--workers", "2", "--storage", storage, "--timings",
              cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = workers_of(storage, "one"), workers_of(storage, "two")
    assert sorted(first) == ["w0", "w1"] and second == first  # the same two processes trained both
    assert re.search(r"study two: 2 workers started on this machine \(pid \d+, kept for study 2, pid \d+, "
                     r"kept for study 2\)", out.stderr), out.stderr[-3000:]
    tables = out.stdout.split("where the time went: ")[1:]
    assert "interpreter and imports" in tables[0].split("\n  workers\n")[1]  # the workers' start, once
    assert "interpreter and imports" not in tables[1]
    assert finals(workdir, "two") == finals(workdir, "one")  # bit for bit, in a kept worker as in a fresh one
    assert gone(first.values())  # every worker ended with the command


def started(err: str) -> dict[str, int]:
    """The workers a study's board says it started: slot -> pid (none for a study with nothing to train)."""
    lines = [line for line in err.splitlines() if "workers started on this machine" in line]
    return {f"w{i}": int(pid) for line in lines[-1:] for i, pid in enumerate(re.findall(r"pid (\d+)", line))}


def test_a_worker_starts_afresh_where_it_would_not_start_the_same_way(workdir, monkeypatch, capsys):
    import cnnbench

    one, two, three = specs(workdir, "one", "two", "three")  # the same trials under three names
    wide = workdir / "wide.yaml"
    wide.write_text(SPEC.format(name="wide").replace("[0.05, 0.1]", "[0.02, 0.05, 0.1]"))
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    settings = {"epochs": 1, "train_subset": 640, "test_subset": 300, "progress": False}

    def study(path: Path, workers: int) -> dict[str, int]:
        spec = cnnbench.load_spec(path, overrides=settings)
        capsys.readouterr()
        outcome = cnnbench.run_study(spec, workers=workers, storage=storage)
        assert outcome is not None and not outcome.failed
        pids = started(capsys.readouterr().err)
        assert not pids or set(workers_of(storage, spec.name).items()) <= set(pids.items())  # the trials' record
        return pids

    with cnnbench.workers_kept():
        first = study(wide, 3)
        assert sorted(first) == ["w0", "w1", "w2"]
        second = study(one, 2)  # w2 is let go: two workers now
        assert second == {"w0": first["w0"], "w1": first["w1"]} and gone([first["w2"]])
        os.kill(second["w0"], signal.SIGKILL)  # killed between studies
        assert gone([second["w0"]])  # (one that dies while handed a study is a worker killed in it)
        third = study(two, 2)
        assert third["w0"] != second["w0"] and third["w1"] == second["w1"]  # a fresh one in its slot
        monkeypatch.setenv("CNNBENCH_TEST_UNUSED", "1")  # another environment for the next study
        fourth = study(three, 2)
        assert not set(fourth.values()) & set(third.values())  # fresh workers in both slots
        assert study(one, 2) == {}  # a finished study: nothing to train, no worker asked
    assert finals(workdir, "one") == finals(workdir, "two") == finals(workdir, "three")
    assert gone({*first.values(), *third.values(), *fourth.values()})


def trains(lines: list[str], name: str) -> bool:
    """Whether study `name` started its workers and one of them finished an epoch since."""
    start = [i for i, line in enumerate(lines) if line.startswith(f"study {name}: ") and "workers started" in line]
    return bool(start) and any(re.match(r"\[w\d\] .*: epoch \d+/", line) for line in lines[start[0]:])


STOPS = {"sigterm to the study": (signal.SIGTERM, 143, False), "ctrl-c to the group": (signal.SIGINT, 130, True)}


@pytest.mark.parametrize("how", sorted(STOPS))
def test_a_stop_request_in_a_later_study_ends_every_kept_worker_and_the_command_resumes(workdir, how):
    signum, status, group = STOPS[how]
    one, two = specs(workdir, "one", "two")
    longer = ["--set", "epochs=8", "--set", "train_subset=4000", "--set", "test_subset=300", "--set", "log_every=5",
              "--set", "progress=false"]
    command = [sys.executable, "-m", "cnnbench", "study", str(one), str(two), *longer, "--workers", "2"]
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=group)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not trains(lines, "two"):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        if group:
            os.killpg(proc.pid, signum)  # a terminal's Ctrl-C: the study and every worker
        else:
            proc.send_signal(signum)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == status, err[-3000:]
    assert "run the same command to resume" in err
    pids = {int(p) for line in lines if "workers started" in line for p in re.findall(r"pid (\d+)", line)}
    assert len(pids) == 2 and gone(pids)  # the same two in both studies, and none left behind
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = [r for r in client.search_runs([client.get_experiment_by_name("two").experiment_id])
              if r.data.tags.get("cnnbench.kind") == "study"]
    assert [r.info.status for r in parent] == ["KILLED"]
    again = cli("study", str(one), str(two), *longer, "--workers", "2", cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 run(s) trained, 2 already finished" in again.stdout  # study one, done before the stop
    assert len(finals(workdir, "two")) == 2


def test_a_sweep_after_a_study_is_handed_the_study_s_workers(workdir, capsys):
    import cnnbench

    (one,) = specs(workdir, "one")
    sweep = workdir / "search.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "search", "search": {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
        "fixed": {"train_subset": 600, "val_size": 200, "test_subset": 200, "epochs": 1, "progress": False},
        "sweep": {"sampler": "random", "pruner": "none", "n_trials": 2, "final_seeds": [0]}}))
    with cnnbench.workers_kept():
        spec = cnnbench.load_spec(one, overrides={"epochs": 1, "train_subset": 600, "test_subset": 200,
                                                  "progress": False})
        assert not cnnbench.run_study(spec, workers=2).failed
        study = started(capsys.readouterr().err)
        _, report, outcome = cnnbench.run_sweep(sweep, workers=2)
        searched = started(capsys.readouterr().err)
    assert sorted(study) == ["w0", "w1"] and searched == study, (study, searched)
    assert report.stopped == "" and outcome is not None and outcome.best.params and len(outcome.finals) == 1
    assert gone(study.values())
