"""What the cluster tests (test_slurm.py, test_k8s.py) share: a `cnnbench` command run in
the background with its output read as it comes, a look for a trial in mid-training, and
the checks that a study ended whole (every planned trial finished exactly once, one parent
run, nothing left running)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from cnnbench.config.record import TEST_ACC
from cnnbench.track.schema import ATTR_KEY, ATTR_MLFLOW_RUN_ID, TAG_KIND


class Command:
    """A `cnnbench` command in the background; its output (stdout and stderr) as it comes."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cnnbench", *args], cwd=cwd, text=True,
                                     env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.ended_at: float | None = None  # time.time() when its output closed: it had ended
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
        self.ended_at = time.time()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
        """The first line that matches `pattern`, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before {pattern!r}:\n{self.text[-4000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in {timeout} s:\n{self.text[-4000:]}")

    def finish(self, timeout: float = 1200) -> int:
        try:
            status = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.reader.join(timeout=10)
        return status


def study_trials(storage: str) -> list:
    """The trials of the one Optuna study in `storage`."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage).get_trials()


def trial_in_training(storage: str, tracking: str, epochs: int, *, alive, timeout: float = 900):
    """A RUNNING trial whose run has recorded at least one epoch of `epochs` and not all of
    them, waiting for one while `alive()` holds. What MLflow holds lags the training: a
    trial's first epoch is written at once, the next ones at most once a second
    (track/writer.py), so a trial seen at "1 of n" may be epochs further on; a test that
    must act mid-trial gives its trials seconds of training after the first epoch."""
    client = MlflowClient(tracking)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), "the study ended before a trial was caught in training"
        try:
            for trial in study_trials(storage):
                run_id = trial.user_attrs.get(ATTR_MLFLOW_RUN_ID)
                if trial.state == TrialState.RUNNING and run_id and \
                        1 <= len(client.get_metric_history(run_id, TEST_ACC)) < epochs:
                    return trial
        except Exception:  # the study not created yet, a store busy: look again
            pass
        time.sleep(0.3)
    raise AssertionError(f"no trial in training within {timeout} s")


def check_whole(storage: str, tracking: str, experiment: str, n_keys: int) -> dict[str, list]:
    """Every planned trial COMPLETE exactly once, nothing RUNNING or WAITING, one parent run
    (FINISHED) and every complete trial's run FINISHED under it. The trials by key."""
    trials = study_trials(storage)
    keys: dict[str, list] = {}
    for t in trials:
        keys.setdefault(t.user_attrs.get(ATTR_KEY), []).append(t)
    assert len(keys) == n_keys, sorted(keys)
    for key, tries in keys.items():
        assert [t.state for t in tries].count(TrialState.COMPLETE) == 1, (key, [t.state.name for t in tries])
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == "study"]
    assert [p.info.status for p in parents] == ["FINISHED"], [(p.info.run_id, p.info.status) for p in parents]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for tries in keys.values():
        done = next(t for t in tries if t.state == TrialState.COMPLETE)
        assert client.get_run(done.user_attrs[ATTR_MLFLOW_RUN_ID]).info.status == "FINISHED"
    return keys
