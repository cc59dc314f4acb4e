"""The Slurm executor (`--executor slurm`, run/executors/slurm.py): on a real one-node
Slurm where there is one, through submitit's local executor everywhere.

The real Slurm is .ci/slurm's (CI sources it, as root: munge, MariaDB and slurmdbd for
sacct, slurmctld, slurmd), found through SLURM_CONF and CNNBENCH_TEST_SLURM; without it
those tests skip (it needs root to start). They need no network namespace (the Ray tests
do): every address in that Slurm's configuration is 127.0.0.1 (controller, node, slurmdbd,
MariaDB, which listens there only) and every name it uses is in /etc/hosts (the host name,
localhost); traced with strace inside a loopback-only namespace, where any other connection
would show as a failed connect(), its daemons, sbatch, sacct, scancel and the jobs of these
tests connected to 127.0.0.1 and Unix sockets only, and looked up no name by DNS.
PostgreSQL (.ci/postgres) and the mlflow servers here listen on 127.0.0.1 too.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from cluster_checks import Command, check_whole, study_trials, trial_in_training
from conftest import REPO, TINY_STUDY, cli, tree
from cnnbench.run.executors.event_files import EventFile, EventFiles
from cnnbench.run.executors.slurm import ENDED, LOST, Submitted, sbatch_parameters, verdict
from cnnbench.run.workers import EXIT_LOST
from cnnbench.errors import ConfigError
from cnnbench.track.schema import (ATTR_KEY, ATTR_MLFLOW_RUN_ID, ATTR_WORKER_DEATHS, ATTR_WORKER_PID,
                                   ATTR_WORKER_SLOT, TAG_KIND, TAG_RESUMED_FROM_EPOCH)

SLURM = bool(os.environ.get("CNNBENCH_TEST_SLURM") and os.environ.get("SLURM_CONF") and shutil.which("sbatch"))
needs_slurm = pytest.mark.skipif(not SLURM, reason="no Slurm here: source .ci/slurm as root to start one (CI does)")
LR = str(REPO / "studies" / "lr.yaml")


def sacct(job: str) -> dict[str, str]:
    """Task id -> Slurm state (the first word: CANCELLED by 0 -> CANCELLED)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job], capture_output=True,
                         text=True, check=True).stdout
    return {i: s.split()[0] for i, _, s in (line.partition("|") for line in out.splitlines()) if i}


def resumed(tracking: str, trials: list) -> list[int]:
    """The epochs each complete trial's run restored from a checkpoint (0: started afresh)."""
    client = MlflowClient(tracking)
    return [int(client.get_run(t.user_attrs[ATTR_MLFLOW_RUN_ID]).data.tags.get(TAG_RESUMED_FROM_EPOCH, 0))
            for t in trials if t.state == TrialState.COMPLETE]


# -- the decisions, as functions ---------------------------------------------------------


def test_how_a_task_without_a_result_ended_is_judged():
    for state in LOST:  # Slurm's doing: lost, not counted against the trials
        assert verdict(state, "job 3_0 on vm", None, "log").status == EXIT_LOST
    assert verdict("OUT_OF_MEMORY", "job 3_0", None, "log").status == -signal.SIGKILL
    failed = verdict("FAILED", "job 3_0 on vm", None, "/x/3_0_0_log.out")
    assert failed.status == 1 and "/x/3_0_0_log.out" in failed.message
    assert verdict("CANCELLED", "job 3_0", int(signal.SIGINT), "log").status == 130  # stopped as asked


def test_slurm_args_become_sbatch_parameters():
    assert sbatch_parameters(["account=lab", "--qos=high", "exclusive"]) == {"account": "lab", "qos": "high",
                                                                              "exclusive": True}
    for bad in ("=lab", "account=", "mem per cpu=1G"):
        with pytest.raises(ConfigError, match="--slurm-arg"):
            sbatch_parameters([bad])


def test_events_come_back_through_files_whole_lines_only(tmp_path):
    reader = EventFiles()
    reader.put(("line", "", "said here", None))
    assert reader.get(timeout=0.1) == ("line", "", "said here", None)
    reader.folder = tmp_path
    EventFile(tmp_path / "000-w0.jsonl").put(("epoch", "w0", "lr=0.1", 1, 2, "test/acc", float("nan")))
    with open(tmp_path / "001-w1.jsonl", "a") as f:
        f.write('["line", "w1", "half a li')  # being written: not read yet
    event = reader.get(timeout=1)
    assert event[:5] == ("epoch", "w0", "lr=0.1", 1, 2) and event[6] != event[6]  # NaN survives
    with pytest.raises(queue.Empty):
        reader.get(timeout=0.6)
    with open(tmp_path / "001-w1.jsonl", "a") as f:
        f.write('ne", null]\n')
    assert reader.get(timeout=1) == ("line", "w1", "half a line", None)


def test_submitted_says_how_to_follow_the_job(tmp_path):
    text = Submitted("study", "lr", ["12_0", "12_1"], tmp_path, "abc").text()
    assert "Slurm job 12 (tasks 12_0 12_1)" in text and "squeue -j 12" in text and "sacct -j 12" in text
    assert f"{tmp_path}/12_*_log.out" in text and "scancel 12" in text and "abc" in text


# -- bad input: one line, exit 2, nothing created ------------------------------------------


def test_bad_slurm_input_is_refused_before_anything_is_created(tmp_path):
    """Refused in one line before anything is created: a malformed --slurm-arg, --no-wait
    without --executor slurm, and no Slurm commands on PATH (a machine without Slurm)."""
    no_slurm = {"PATH": str(Path(sys.executable).parent)}  # the venv's commands only: no sbatch
    cases = [(["--executor", "slurm", "--slurm-arg", "=x"], "--slurm-arg =x", None),
             (["--no-wait"], "--no-wait: only with --executor slurm", None),
             (["--executor", "slurm"], "--executor slurm: no Slurm here (sbatch, srun", no_slurm)]
    for args, message, env in cases:
        r = cli("study", LR, *TINY_STUDY, *args, "--storage", "postgresql://u:p@127.0.0.1:1/x",
                "--results-dir", "results", "--state-dir", "state", cwd=tmp_path, env=env)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert tree(tmp_path) == set()


@needs_slurm
def test_local_stores_are_refused_for_a_partition_of_other_machines(tmp_path):
    """.ci/slurm's partition `elsewhere` has one node that is not this machine (never
    started); `debug`'s one node is this machine, where a SQLite storage is fine."""
    for args, message in [(["--slurm-partition", "elsewhere", "--storage", f"sqlite:///{tmp_path}/o.db"],
                           "--storage sqlite:///"),
                          (["--slurm-partition", "nowhere"], "--slurm-partition nowhere: no such partition")]:
        r = cli("study", LR, *TINY_STUDY, "--executor", "slurm", *args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                "--results-dir", "results", "--state-dir", "state", cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert tree(tmp_path) == set()


# -- real work ---------------------------------------------------------------------------------


@needs_slurm
@pytest.mark.slow
@pytest.mark.server
def test_an_array_study_goes_on_after_a_task_is_cancelled_mid_trial(postgres, tmp_path, data_root):
    """The lr study (one seed: 5 trials, wide groups of 3 and 2) on 2 array tasks against
    PostgreSQL (the Optuna study) and an mlflow server with its own artifact folder: one task cancelled (scancel) once a trial of its group
    has finished an epoch; a replacement task (its own state folder) resumes the group from
    the shared checkpoints (the runs' MLflow artifacts), and the study ends whole."""
    from cnnbench.tools.ui import mlflow_server

    storage = postgres[0]
    # a group trains an epoch in under a second, and a watcher sees a trial's first epoch at
    # once, then its metrics at most once a second (track/writer.py): 15 epochs leave seconds
    # of training after the one seen, for the cancel to land mid-trial. With 5 a clean-clone
    # CI saw "1 of 5" while the group was at its last epoch: the cancel came as it ended
    epochs = 15
    sets = ["--set", f"epochs={epochs}", "--set", "train_subset=2000", "--set", "test_subset=300",
            "--set", "log_every=10", "--set", "progress=false"]
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", log=tmp_path / "server.log",
                       timeout=300) as url:
        MlflowClient(url).search_experiments()  # its first answer, slow on a busy machine, before the 5 s check's
        t0 = time.monotonic()
        driver = Command(["study", LR, "--seeds", "0", *sets, "--executor", "slurm", "--workers", "2",
                          "--slurm-time", "30", "--storage", storage, "--tracking-uri", url,
                          "--results-dir", str(tmp_path / "results"), "--state-dir", str(tmp_path / "state")],
                         cwd=tmp_path, env={"CNNBENCH_DATA": str(data_root)})
        array = driver.wait_for(r"workers started on Slurm .*\(job (\d+)_0, job \1_1\)").group(1)
        victim = trial_in_training(storage, url, epochs, alive=lambda: driver.proc.poll() is None)
        slot = victim.user_attrs[ATTR_WORKER_SLOT]
        subprocess.run(["scancel", f"{array}_{slot[1:]}"], check=True)
        status = driver.finish()
        seconds = time.monotonic() - t0
        assert status == 0, driver.text[-4000:]
        # the pool sees the task end (sacct, every 2 s) and starts a new one while work is
        # left; the other task, idle by then, may have taken the trials first: no new one
        ended = [line for line in driver.lines if line.startswith(f"[{slot}] ") and "queued again" in line]
        assert len(ended) == 1 and ("a new worker takes its place" in ended[0]
                                    or "no new worker is needed" in ended[0]), driver.text[-4000:]
        keys = check_whole(storage, url, "lr", 5)
        trials = study_trials(storage)
        again = keys[victim.user_attrs[ATTR_KEY]]
        assert [t.state for t in again].count(TrialState.FAIL) == 1  # queued again, not failed for good
        assert all(t.user_attrs.get(ATTR_WORKER_DEATHS, 0) == 0 for t in trials)  # lost, not dead
        assert min(resumed(url, again)) >= 1  # resumed at epoch >= 1 from the shared checkpoint
        once = [t for tries in keys.values() if len(tries) == 1 for t in tries]  # never queued again
        assert once and resumed(url, once) == [0] * len(once)  # none found an earlier execution's checkpoint
        client = MlflowClient(url)  # the checkpoint it resumed from is in the artifacts of a run of its key
        assert any("resume/last.pt" in [a.path for a in client.list_artifacts(t.user_attrs[ATTR_MLFLOW_RUN_ID],
                                                                               "resume")] for t in again)
    states = sacct(array)
    assert states[f"{array}_{slot[1:]}"] == "CANCELLED", states
    assert len(list((tmp_path / "results" / "lr" / "summary.csv").read_text().splitlines())) == 6
    print(f"slurm array study with a cancelled task: {seconds:.0f} s; jobs {states}; {ended[0].strip()}")


@needs_slurm
@pytest.mark.slow
def test_no_wait_submits_the_tasks_and_the_last_one_writes_the_results(tmp_path, data_root):
    """--no-wait: the command prints the job and returns at once, with nothing written and
    the parent run left going; the tasks train, and the one that ends the study writes the
    results and closes the parent (one machine: SQLite stores are fine here)."""
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    spec = tmp_path / "nowait.yaml"
    spec.write_text("name: nowait\nscientific: {lr: [0.02, 0.05]}\nseeds: [0]\n")
    t0 = time.monotonic()
    r = cli("study", str(spec), *TINY_STUDY, "--executor", "slurm", "--workers", "2", "--no-wait",
            "--storage", storage, "--tracking-uri", tracking, "--results-dir", "results", "--state-dir", "state",
            cwd=tmp_path, env={"CNNBENCH_DATA": str(data_root)})
    assert r.returncode == 0, r.stderr
    job = re.search(r"Slurm job (\d+) \(tasks \1_0 \1_1\)", r.stdout).group(1)
    assert f"squeue -j {job}" in r.stdout and f"scancel {job}" in r.stdout
    assert not (tmp_path / "results" / "nowait").exists()
    (parent,) = [r for r in MlflowClient(tracking).search_runs(
        [MlflowClient(tracking).get_experiment_by_name("nowait").experiment_id]) if r.data.tags.get(TAG_KIND) == "study"]
    assert parent.info.status == "RUNNING"  # left going: the task that ends the study closes it
    deadline = time.monotonic() + 900
    # until both tasks have ended: sacct knows a job only once slurmdbd has heard of it, which
    # can be after the command returned (it returns as soon as sbatch has answered)
    states = sacct(job)
    while time.monotonic() < deadline and (len(states) < 2 or set(states.values()) - ENDED):
        time.sleep(2)
        states = sacct(job)
    assert set(states.values()) == {"COMPLETED"}, states
    check_whole(storage, tracking, "nowait", 2)
    assert {p.name for p in (tmp_path / "results" / "nowait").iterdir()} >= {"stats.csv", "summary.csv", "table.md"}
    print(f"--no-wait study: {time.monotonic() - t0:.0f} s")


@needs_slurm
@pytest.mark.slow
def test_ctrl_c_stops_every_task_at_its_next_safe_point(tmp_path, data_root):
    """Ctrl-C to `cnnbench study --executor slurm` once a trial is in training: the stop
    request goes to every task (`scancel --signal=INT`), each queues its trials again and
    ends with its result; the command exits 130, its parent run KILLED, nothing RUNNING."""
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    spec = tmp_path / "stop.yaml"
    spec.write_text("name: stop\nscientific: {lr: [0.02, 0.05]}\nseeds: [0]\n"
                    "fixed: {epochs: 20, train_subset: 2000, test_subset: 300, log_every: 10, progress: false}\n")
    # 20 epochs of under a second each: the stop request must land mid-trial even when the
    # first epoch's record is seen late (the bookkeeping branch writes it in the background)
    driver = Command(["study", str(spec), "--executor", "slurm", "--workers", "2", "--storage", storage,
                      "--tracking-uri", tracking, "--results-dir", "results", "--state-dir", "state"],
                     cwd=tmp_path, env={"CNNBENCH_DATA": str(data_root)})
    array = driver.wait_for(r"workers started on Slurm .*\(job (\d+)_0, job \1_1\)").group(1)
    victim = trial_in_training(storage, tracking, 20, alive=lambda: driver.proc.poll() is None)
    t0 = time.monotonic()
    driver.proc.send_signal(signal.SIGINT)
    status = driver.finish(timeout=600)
    stopped_s = time.monotonic() - t0
    assert status == 130, driver.text[-3000:]
    trials = study_trials(storage)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.state for t in trials].count(TrialState.COMPLETE) < 2  # stopped, not finished
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get(TAG_KIND) == "study"] == ["KILLED"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    task = f"{array}_{victim.user_attrs[ATTR_WORKER_SLOT][1:]}"  # the one caught training
    deadline = time.monotonic() + 60  # sacct learns of an end a few seconds late
    while time.monotonic() < deadline and sacct(array).get(task) != "COMPLETED":
        time.sleep(2)
    assert sacct(array)[task] == "COMPLETED", sacct(array)  # it ended by itself, with its result
    print(f"Ctrl-C to a Slurm study: stopped in {stopped_s:.0f} s")


@pytest.mark.slow
def test_the_local_executor_path_replaces_a_killed_task(workdir, data_root):
    """submitit's local executor (no Slurm needed): the same tasks as processes here. The
    worker process of a task is SIGKILLed once a trial of its group has finished an epoch:
    a death counted on its trials, a replacement task resumes them from the checkpoints in
    their MLflow runs (its own state folder holds none), and the study ends whole."""
    import cnnbench

    storage, tracking = f"sqlite:///{workdir}/optuna.db", f"sqlite:///{workdir}/mlflow.db"
    spec = workdir / "local.yaml"
    epochs = 20  # seconds of training after the first epoch seen (cluster_checks.trial_in_training)
    spec.write_text("name: local-slurm\nscientific: {lr: [0.02, 0.05]}\nseeds: [0, 1]\n"
                    f"fixed: {{epochs: {epochs}, train_subset: 1000, test_subset: 300, log_every: 10, "
                    "progress: false}\n")
    killed: dict = {}

    def kill_one() -> None:
        try:  # the stores are touched once the tasks start (the run's folder made), not while created
            while not (workdir / "state" / "slurm").exists() and not killed.get("over"):
                time.sleep(0.2)
            victim = trial_in_training(storage, tracking, epochs, alive=lambda: not killed.get("over"))
            os.kill(victim.user_attrs[ATTR_WORKER_PID], signal.SIGKILL)
            killed["trial"] = victim
        except BaseException as err:
            killed["error"] = repr(err)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    try:
        outcome = cnnbench.run_study(spec, executor=cnnbench.Slurm(cluster="local", time=30), workers=2,
                                     storage=storage, tracking=tracking, results_root=workdir / "results",
                                     state=workdir / "state", data_root=data_root)
    finally:
        killed["over"] = True
        killer.join(timeout=10)
    assert outcome is not None and not outcome.failed
    assert "trial" in killed, killed
    victim = killed["trial"]
    keys = check_whole(storage, tracking, "local-slurm", 4)
    again = keys[victim.user_attrs[ATTR_KEY]]
    died = [t for t in again if t.state == TrialState.FAIL]
    assert [t.user_attrs.get(ATTR_WORKER_DEATHS) for t in died] == [1]  # a death, counted
    assert min(resumed(tracking, again)) >= 1
    assert (workdir / "results" / "local-slurm" / "summary.csv").exists()
    execution = next((workdir / "state" / "slurm").iterdir()).name  # the tasks' own state folders:
    kept = Path(tempfile.gettempdir()) / "cnnbench-slurm" / execution  # the killed one's is kept, the
    assert len(list(kept.iterdir())) == 1, list(kept.iterdir())  # ones that ended well are removed
    shutil.rmtree(kept)
