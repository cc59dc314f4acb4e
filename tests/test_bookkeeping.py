"""A study's bookkeeping off the training's path: the background writer (util/background.py:
order, errors that surface in the training thread, a writer process that a stop request
does not cut), the phase timers (util/timings.py, `--timings`), SQLite stores in WAL mode
(track/stores.py), several studies in one process, and a start-up that imports only what
a study uses (MNIST read from its idx files)."""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from cnnbench.errors import StorageError
from cnnbench.util import background, timings
from conftest import REPO, cli, tree

TINY = ["--set", "epochs=2", "--set", "train_subset=256", "--set", "test_subset=100", "--set", "log_every=2",
        "--set", "progress=false", "--workers", "1"]


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text + "\n")


@pytest.fixture
def writer():
    w = background.Writer(sync=False)
    yield w
    w.close()


# ----------------------------------------------------------------------------------------
# the background writer


def test_jobs_land_in_the_order_handed_over_and_a_checkpoint_does_not_wait_for_the_database(tmp_path, writer):
    """A remote job (MLflow, Optuna: in the writer process) runs after every job handed
    over before it; a job of the writer's thread (a checkpoint) does not wait for remote
    ones unless it is `ordered` (telling the person watching, after Optuna was told)."""
    log, early = tmp_path / "log", tmp_path / "early"
    t0 = time.perf_counter()
    slow = writer.submit(functools.partial(time.sleep, 2.0), "test", remote=True)  # a slow database, say
    assert time.perf_counter() - t0 < 1.0  # handing over does not wait
    writer.submit(functools.partial(append, early, "written"), "test")
    writer.wait(writer.submit(functools.partial(append, early, "again"), "test"))
    assert not slow.done.is_set() and early.read_text().split() == ["written", "again"]
    for i in range(6):
        if i % 2:  # in the writer process: a shell appends
            writer.submit(functools.partial(os.system, f"echo {i} >> {log}"), "test", remote=True)
        else:
            writer.submit(functools.partial(append, log, str(i)), "test", ordered=True)
    assert writer.busy()
    writer.drain()
    assert not writer.busy() and log.read_text().split() == [str(i) for i in range(6)]
    assert writer.remote.proc.pid != os.getpid()


def test_an_error_of_the_writer_process_surfaces_at_the_next_hand_over_once(tmp_path, writer):
    """A fault of the machine there is a StorageError here (the study stops); the jobs
    handed over after it are dropped, except those that must run (a run's end)."""
    writer.submit(functools.partial(os.rmdir, str(tmp_path / "gone")), "test", remote=True)
    writer.wait_all()
    writer.submit(functools.partial(os.mkdir, str(tmp_path / "dropped")), "test", remote=True, check=False)
    writer.submit(functools.partial(os.mkdir, str(tmp_path / "kept")), "test", remote=True, check=False, always=True)
    writer.wait_all()
    with pytest.raises(StorageError, match="no such file"):
        writer.submit(functools.partial(os.mkdir, str(tmp_path / "next")), "test", remote=True)
    assert not (tmp_path / "dropped").exists() and (tmp_path / "kept").is_dir() and not (tmp_path / "next").exists()
    writer.drain()  # raised once: nothing is left to raise
    writer.submit(functools.partial(int, "x"), "test", remote=True)  # a bug there: named here
    with pytest.raises(RuntimeError, match="ValueError: invalid literal"):
        writer.drain()
    writer.submit(functools.partial(append, tmp_path / "no" / "such" / "file", "x"), "test")  # the thread's own
    assert isinstance(writer.settle(), FileNotFoundError)
    writer.drain()


def test_a_stop_request_does_not_reach_the_writer_process_which_ends_with_its_parent(tmp_path, writer):
    writer.start()
    writer.drain()
    proc = writer.remote.proc
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a terminal's Ctrl-C reaches the whole group
        os.kill(proc.pid, signum)
    writer.submit(functools.partial(os.mkdir, str(tmp_path / "after")), "test", remote=True)
    writer.drain()
    assert (tmp_path / "after").is_dir() and proc.is_alive()
    writer.close()
    assert not proc.is_alive()


def test_sync_bookkeeping_runs_every_job_at_once_where_it_is_handed_over(tmp_path):
    writer = background.Writer(sync=True)
    writer.submit(functools.partial(os.mkdir, str(tmp_path / "now")), "test", remote=True)
    assert (tmp_path / "now").is_dir() and not writer.busy() and writer.remote.proc is None
    with pytest.raises(FileNotFoundError):
        writer.submit(functools.partial(os.rmdir, str(tmp_path / "gone")), "test", remote=True)


@pytest.mark.parametrize("env", ["", "0", "1"])
def test_where_a_worker_trains_chooses_the_writer_unless_the_environment_did(tmp_path, monkeypatch, env):
    """On the CPU the jobs run in the handing thread (the training uses every core: a writer
    beside it only competes for them), on an accelerator in the background; what was handed
    over before the choice is written first. CNNBENCH_SYNC_BOOKKEEPING, where set, wins."""
    monkeypatch.setenv(background.SYNC_ENV, env)
    w = background.Writer()
    try:
        w.submit(functools.partial(time.sleep, 0.3), "test")
        w.submit(functools.partial(os.mkdir, str(tmp_path / "before")), "test")
        w.choose(on_cpu=True)
        assert w.sync == (env != "0")
        if w.sync:  # switched (or sync from the start): nothing left in the background
            assert (tmp_path / "before").is_dir() and not w.busy()
        w.choose(on_cpu=False)
        assert w.sync == (env == "1")
        w.submit(functools.partial(time.sleep, 0.3), "test")
        assert w.busy() == (not w.sync)  # in the background: still sleeping when submit returns
        w.drain()
    finally:
        w.close()
    assert background.Writer(sync=False).sync is False  # the caller's choice stays too
    kept = background.Writer(sync=False)
    kept.choose(on_cpu=True)
    assert kept.sync is False


# ----------------------------------------------------------------------------------------
# phase timers


@pytest.fixture
def timers():
    was = timings.enabled()
    timings.enable()
    timings.reset()
    yield
    timings.enable(was)
    timings.reset()


def test_phases_nest_and_count_each_second_once(timers):
    t0 = time.perf_counter()
    with timings.phase("a/outer"):
        time.sleep(0.05)
        with timings.phase("a/inner"):
            time.sleep(0.1)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    seconds = timings.snapshot()["seconds"]
    assert seconds["a/inner"] >= 0.1 and seconds["a/outer"] >= 0.1
    assert seconds["a/outer"] + seconds["a/inner"] <= wall  # exclusive: the inner one is not counted twice
    before = timings.snapshot()
    with timings.phase("b/later"):
        timings.count("events", 3)
    later = timings.since(before)
    assert set(later["seconds"]) == {"b/later"} and later["counts"] == {"events": 3}
    table = timings.table(timings.snapshot(), "test", wall=wall + 1.0)
    assert "outer" in table and "inner" in table and "(outside every phase)" in table and "events" in table


def test_timers_off_cost_a_shared_null_context():
    was = timings.enabled()
    timings.enable(False)
    try:
        assert timings.phase("x") is timings.phase("y")
        before = timings.snapshot()
        with timings.phase("x"):
            timings.count("events")
        assert timings.snapshot() == before
    finally:
        timings.enable(was)


# ----------------------------------------------------------------------------------------
# stores, several studies in one process, start-up


def test_sqlite_stores_are_in_wal_mode_with_normal_sync(tmp_path):
    from cnnbench.track import stores

    storage = stores.optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    storage.engine.dispose()
    with sqlite3.connect(tmp_path / "optuna.db") as conn:  # the mode stays in the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_checking_a_store_keeps_the_locks_of_this_process_s_connections(tmp_path):
    """The preflight's check of a SQLite file (stores.damaged) in a process that already has
    connections to it (two studies in one process, a notebook, a test reading the record):
    a descriptor of its own, closed, would drop their locks, and another process closing its
    last connection would delete the write-ahead log under them (seen: 'file is not a
    database', an Optuna trial state read as '3'). The log must outlive that other process."""
    from cnnbench.track import stores

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = stores.optuna_storage(url)  # a connection of this process, in WAL mode, kept in the pool
    optuna_study = optuna.create_study(storage=storage, study_name="held")
    optuna_study.ask()
    assert stores.damaged(tmp_path / "optuna.db") is None
    other = "import sqlite3; c = sqlite3.connect({!r}); c.execute('SELECT count(*) FROM trials').fetchone(); c.close()"
    subprocess.run([sys.executable, "-c", other.format(str(tmp_path / "optuna.db"))], check=True, timeout=60)
    assert (tmp_path / "optuna.db-wal").exists(), "the other process found itself the last connection"
    assert len(optuna_study.get_trials()) == 1
    storage.engine.dispose()


SPEC = """
name: {name}
scientific: {{lr: [0.05, 0.1]}}
fixed: {{activation: relu}}
seeds: [0]
"""


def test_a_bad_spec_among_several_is_refused_before_any_study_runs(workdir, capsys):
    from cnnbench.cli import main

    good, bad = workdir / "good.yaml", workdir / "bad.yaml"
    good.write_text(SPEC.format(name="good"))
    bad.write_text(SPEC.format(name="bad") + "colour: blue\n")
    before = tree(workdir)
    assert main(["study", str(good), str(bad), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0] and "colour" in err[0], err
    assert tree(workdir) == before


@pytest.mark.slow
def test_two_studies_in_one_process_each_with_its_parent_run_results_and_phase_table(workdir):
    one, two = workdir / "one.yaml", workdir / "two.yaml"
    one.write_text(SPEC.format(name="one"))
    two.write_text(SPEC.format(name="two"))
    out = cli("study", str(one), str(two), *TINY, "--timings", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    tables = out.stdout.split("where the time went: ")[1:]
    assert [t.split("\n", 1)[0] for t in tables] == ["study one", "study two"]
    assert "interpreter and imports" in tables[0] and "interpreter and imports" not in tables[1]  # one start-up
    for table in tables:
        # on the CPU the writes run in the training thread (util/background.py): a section of the table
        assert "training steps" in table and "\n  bookkeeping\n" in table and "database commits" in table
        assert "background writer" not in table
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for name, spec in (("one", one), ("two", two)):
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.data.tags.get("cnnbench.kind") == "study"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(runs) == 3
        metrics = parents[0].data.metrics
        assert metrics["timings/wall"] > metrics["timings/group/training steps"] > 0
        assert all(r.info.status == "FINISHED" for r in runs)
        table = (workdir / "results" / name / "table.md").read_text()
        assert f"study {spec}" in table and str(two if name == "one" else one) not in table  # its own command
    with sqlite3.connect(workdir / "mlflow.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_study_imports_neither_torchvision_nor_the_tools_and_reads_mnist_without_them(data_root):
    code = textwrap.dedent(f"""
        import sys
        import cnnbench.api
        from cnnbench.data.tensors import load_arrays
        x, y, tx, ty = load_arrays("mnist", {str(data_root)!r})
        heavy = [m for m in ("torchvision", "nbconvert", "papermill", "playwright", "cnnbench.tools.bench",
                             "cnnbench.report.compare") if m in sys.modules]
        import torchvision  # the same images and labels as torchvision's reader
        train = torchvision.datasets.MNIST({str(data_root)!r}, train=True)
        test = torchvision.datasets.MNIST({str(data_root)!r}, train=False)
        same = (x[:, 0].equal(train.data) and y.equal(train.targets) and tx[:, 0].equal(test.data)
                and ty.equal(test.targets))
        print(heavy, same, tuple(x.shape), x.dtype, y.dtype)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "[] True (60000, 1, 28, 28) torch.uint8 torch.int64"


# ----------------------------------------------------------------------------------------
# the end of a command (util/exiting.py) and the writes per epoch


END = """
import atexit, os, sys
import cnnbench  # its handler registered first: it runs after every other
from cnnbench.util import exiting
from cnnbench.track import stores
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

class Torn:  # freed by the interpreter's teardown, and only there
    def __del__(self, write=os.write, fd=fd):
        write(fd, b"teardown ")

kept = Torn()
atexit.register(lambda: os.write(fd, b"handler "))
exiting.before_exit(lambda: os.write(fd, b"closer "))
client = stores.mlflow_client("sqlite:///" + sys.argv[3])
client.create_experiment("kept")
sys.stdout.write("unflushed")  # no newline: still in the buffer
{end}
"""


@pytest.mark.parametrize("end", ["exiting.exit(3)", "sys.exit(3)", "os._exit(3)"])
def test_a_command_ends_without_the_teardown_after_every_exit_handler_and_its_store_whole(tmp_path, end):
    """`exiting.exit` skips the interpreter's teardown (seconds with torch and MLflow loaded)
    yet runs every atexit handler, the closers, flushes the output and keeps the status; the
    store's write-ahead log is folded into its file, so that the file alone holds every
    commit, as after a normal exit (and not after a bare os._exit)."""
    log, db = tmp_path / "log", tmp_path / "mlflow.db"
    out = subprocess.run([sys.executable, "-c", END.format(end=end), "-", str(log), str(db)], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 3, out.stderr[-2000:]
    events = log.read_text().split() if log.exists() else []
    expected = {"exiting.exit(3)": ["handler", "closer"], "sys.exit(3)": ["handler", "teardown"], "os._exit(3)": []}
    assert events == expected[end]
    assert (tmp_path / "mlflow.db-wal").exists() == (end == "os._exit(3)")
    if end != "os._exit(3)":
        assert out.stdout == "unflushed"
        alone = tmp_path / "alone"
        alone.mkdir()
        (alone / "mlflow.db").write_bytes(db.read_bytes())  # the file without its log
        assert MlflowClient(f"sqlite:///{alone / 'mlflow.db'}").get_experiment_by_name("kept") is not None


def test_a_library_user_s_exit_is_python_s_own(tmp_path):
    """Importing cnnbench arms nothing: a program that imports it exits as it always does."""
    code = textwrap.dedent("""
        import os, sys, cnnbench.api
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
        class Torn:
            def __del__(self, write=os.write, fd=fd):
                write(fd, b"teardown")
        kept = Torn()
        sys.exit(5)
    """)
    log = tmp_path / "log"
    out = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 5 and log.read_text() == "teardown", out.stderr[-2000:]


@pytest.mark.parametrize("every", [0.0, 3600.0])
def test_a_trial_s_epochs_reach_mlflow_at_most_once_a_second_and_all_by_its_end(workdir, data_root, monkeypatch,
                                                                                 every):
    """The first epoch's metrics are written at once (a watcher sees that the trial trains),
    the next ones at most every METRICS_EVERY_S, and the run's end writes what is left: the
    finished run holds every epoch either way."""
    from cnnbench import api
    from cnnbench.track import jobs, writer
    from conftest import quick

    writes: list[int] = []
    real = jobs.log_run

    def log_run(uri, run_id, params, metrics):
        writes.append(len({m.step for m in metrics if m.key == "test/acc"}))
        return real(uri, run_id, params, metrics)

    ours = background.writer()  # this process's, in whatever way earlier tests left it
    ours.drain()
    monkeypatch.setattr(ours, "sync", True)  # its writes in this thread, where the spy sees them
    monkeypatch.setattr(jobs, "log_run", log_run)
    monkeypatch.setattr(writer, "METRICS_EVERY_S", every)
    result = api.run_trial(quick(epochs=4), data_root=data_root, experiment="epochs")
    assert writes == ([1, 1, 1, 1] if every == 0.0 else [1])  # the rest went with the run's end
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("epochs").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "test/acc")] == [1, 2, 3, 4]
    assert len(result.history) == 4


def test_deterministic_kernels_follow_each_trial_s_setting(monkeypatch):
    """configure_backends calls torch's switch only when it changes (the call imports torch's
    compiler, about a second of a start): each trial still gets the setting it asks for."""
    import torch

    from cnnbench.config.trial import TrialConfig
    from cnnbench.train.device import configure_backends

    calls: list[bool] = []
    real = torch.use_deterministic_algorithms
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kw: (calls.append(mode), real(mode, **kw)))
    try:
        for wanted in (False, True, True, False, False):
            configure_backends(TrialConfig(deterministic=wanted), torch.device("cpu"))
            assert torch.are_deterministic_algorithms_enabled() == wanted
        assert calls == [True, False]
    finally:
        real(False)


def test_a_trial_s_figure_does_not_depend_on_the_figures_drawn_before_it(tmp_path):
    """A process draws every trial's curves.png on one figure (track/figure.py): a trial
    drawn after others (with longer curves, more epochs, a validation split, nothing at
    all) is pixel for pixel the one drawn on a figure built for it alone."""
    import numpy as np
    from PIL import Image

    from cnnbench.config.trial import TrialConfig
    from cnnbench.track.figure import TrialFigure
    from cnnbench.train.result import TrialResult

    def trial(lr: float, points: int, epochs: int, val: bool = False) -> TrialResult:
        r = TrialResult(config=TrialConfig(lr=lr))
        r.curve = [(640 * i, 2.3 * 0.97 ** i) for i in range(points)]
        r.history = [{"epoch": e + 1, "test/acc": 90 + e, **({"val/acc": 91 + e} if val else {})}
                     for e in range(epochs)]
        return r

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    trials = {"short": trial(0.01, 12, 2), "long": trial(0.1, 900, 30, val=True), "empty": trial(0.05, 0, 0),
              "loss only": trial(0.02, 5, 0)}
    alone = {name: TrialFigure().draw(r, tmp_path / f"alone-{i}.png") for i, (name, r) in enumerate(trials.items())}
    shared = TrialFigure()
    for rounds in range(2):
        for i, (name, r) in enumerate(reversed(list(trials.items()))):  # after each other kind
            drawn = shared.draw(r, tmp_path / f"shared-{rounds}-{i}.png")
            assert np.array_equal(pixels(drawn), pixels(alone[name])), name
    assert len({pixels(p).tobytes() for p in alone.values()}) == len(trials)  # four different images


def test_a_result_is_read_where_it_lies_and_downloaded_where_it_does_not(tmp_path, monkeypatch):
    """A study reads its runs' results back (run/study.py): from the artifact folder itself
    when the run's artifacts are a folder here, through MLflow's download otherwise (an
    artifact store elsewhere; a folder this machine does not have). Both give the result
    the run recorded."""
    from mlflow.entities import Run, RunInfo

    from cnnbench.config.trial import TrialConfig
    from cnnbench.track import jobs
    from cnnbench.track.writer import Tracker
    from cnnbench.train.result import TrialResult

    tracker = Tracker("readback", f"sqlite:///{tmp_path}/mlflow.db")
    result = TrialResult(TrialConfig(lr=0.03), status="finished", history=[{"epoch": 1, "test/acc": 91.5}],
                         curve=[(64, 2.1)], train_seconds=1.5, images=64)
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    (tmp_path / "result.json").write_text(json.dumps(jobs.result_to_json(result)))
    tracker.client.log_artifact(run_id, str(tmp_path / "result.json"))
    run = tracker.client.get_run(run_id)
    downloads = []
    real = type(tracker.client).download_artifacts
    monkeypatch.setattr(type(tracker.client), "download_artifacts",
                        lambda self, *a, **k: downloads.append(a) or real(self, *a, **k))
    assert tracker.load_result(run) == result and downloads == []  # read in its folder
    i = run.info
    moved = RunInfo(i.run_id, i.experiment_id, i.user_id, i.status, i.start_time, i.end_time, i.lifecycle_stage,
                    artifact_uri=str(tmp_path / "not-here"), run_name=i.run_name)
    elsewhere = Run(moved, run.data)
    assert tracker.load_result(elsewhere) == result and len(downloads) == 1  # not here: MLflow fetched it


def test_a_lone_trial_on_the_cpu_writes_in_its_own_thread(tmp_path, monkeypatch, data_root):
    """`cnnbench.run_trial` chooses where its bookkeeping is written as a study's worker
    does (util/background.py): on the CPU in the training thread, with no writer process."""
    import cnnbench

    monkeypatch.delenv(background.SYNC_ENV, raising=False)
    monkeypatch.setattr(background, "_writer", background.Writer())  # this process's, as a fresh one
    assert not background.writer().sync  # the default before a choice: the background
    result = cnnbench.run_trial(lr=0.05, epochs=1, train_subset=64, test_subset=64, progress=False,
                                data_root=data_root, tracking=f"sqlite:///{tmp_path}/mlflow.db", state=tmp_path)
    assert result.status == "finished"
    assert background.writer().sync and background.writer().remote.proc is None
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics

