"""CPU worker processes share the machine's cores out again as they run out of work
(run/cores.py, `--share-cores`): real processes over one shared counter, and a study
whose workers end unevenly, with and without it."""

import multiprocessing
import threading
import time

import pytest
import torch

from cnnbench.run.cores import CoreShare

from barrier_files import holder, release


def _worker(training, cores, finish_first, ready, done, out):
    torch.set_num_threads(1)
    share = CoreShare(training, cores, threads=1)
    out.put(("start", finish_first, share.adjust(), torch.get_num_threads()))
    ready.wait()
    if finish_first:  # its group is done and nothing is left to claim
        share.idle()
        share.idle()  # a second poll with nothing to claim counts once
        done.set()
        return
    done.wait(30)
    out.put(("alone", finish_first, share.adjust(), torch.get_num_threads()))
    share.busy()  # claims again: still the only one training
    out.put(("busy", finish_first, share.adjust(), torch.get_num_threads()))


def test_a_worker_that_runs_out_of_work_gives_its_core_to_the_one_still_training():
    ctx = multiprocessing.get_context("spawn")
    training, out = ctx.Value("i", 2), ctx.Queue()
    ready, done = ctx.Barrier(2), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(training, 2, first, ready, done, out)) for first in (True, False)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=60) for _ in range(4)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(r for r in rows if r[0] == "start") == [("start", False, 1, 1), ("start", True, 1, 1)]
    assert ("alone", False, 2, 2) in rows and ("busy", False, 2, 2) in rows
    assert training.value == 1


def test_a_worker_that_claims_work_again_takes_its_share_back():
    training = multiprocessing.get_context("spawn").Value("i", 2)
    threads = torch.get_num_threads()
    try:
        a, b = CoreShare(training, 4, 2), CoreShare(training, 4, 2)
        a.idle()
        assert training.value == 1 and b.adjust() == 4 and torch.get_num_threads() == 4
        a.busy()
        assert training.value == 2 and b.adjust() == 2 and a.adjust() == 2
        b.idle(), a.idle()
        assert training.value == 0 and a.adjust() == 4  # never more than the cores
    finally:
        torch.set_num_threads(threads)


def test_without_threads_only_the_count_moves_and_an_idle_worker_wakes_when_it_does():
    ctx = multiprocessing.get_context("spawn")
    training = ctx.Value("i", 2)
    threads = torch.get_num_threads()
    gpu = CoreShare(training, None, None)  # a GPU worker: threads left alone
    assert gpu.adjust() == gpu.current and torch.get_num_threads() == threads
    t0 = time.monotonic()
    gpu.wait(0.3)  # nothing moves: the whole timeout
    assert time.monotonic() - t0 >= 0.3
    ready, go = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_leave_after, args=(training, ready, go, 0.5))
    other.start()
    assert ready.wait(300)  # a spawned interpreter: seconds, and far more on a busy machine
    t0 = time.monotonic()
    go.set()
    gpu.wait(30)  # the other worker stops training 0.5 s after `go`: wakes then, not after 30
    woke = time.monotonic() - t0
    other.join(30)
    assert training.value == 1 and 0.4 < woke < 10, woke


def _leave_after(training, ready, go, seconds):
    ready.set()
    go.wait(300)
    time.sleep(seconds)
    CoreShare(training, None, None).idle()


LONG = 20000  # images per epoch of the long trial
SHARED = """
name: {name}
scientific: {{train_subset: [600, 700, {long}]}}
fixed: {{activation: relu, epochs: 2, test_subset: 300, log_every: 5, progress: false}}
"""


def _threads_tags(folder, name):
    from mlflow import MlflowClient

    from cnnbench.track.schema import TAG_KIND, TAG_TRIAL_THREADS

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return {r.data.params["train_subset"]: r.data.tags[TAG_TRIAL_THREADS] for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(TAG_KIND) == "trial"}


def _release(barrier, storage, over):
    """The test's side of the barrier (run/barrier.py): every trial is held after its first
    epoch until both workers hold one (both started and training: however late one starts,
    neither runs through the study alone); then the short trials go at once, and the long
    one once both short ones are complete, so that it trains its second epoch beside a
    worker with nothing left to claim."""
    import optuna

    released, pids, deadline = set(), set(), time.monotonic() + 300  # a stuck study is not held for ever
    while not over.is_set():
        held = [p for p in barrier.glob("reached-*") if p.name not in released]
        pids |= {holder(p)[0] for p in held}
        if held and (len(pids) >= 2 or time.monotonic() > deadline):
            try:
                trials = optuna.load_study(study_name=None, storage=storage).get_trials()
            except Exception:  # the store busy: look again
                time.sleep(0.05)
                continue
            by_number = {t.number: t for t in trials}
            complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
            for p in held:
                trial = by_number.get(holder(p)[1])
                short = trial is not None and trial.user_attrs.get("train_subset") != str(LONG)
                if short or complete >= 2 or time.monotonic() > deadline:
                    release(p)
                    released.add(p.name)
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("share", [False, True], ids=["default", "share-cores"])
def test_a_study_shares_cores_only_when_asked(workdir, monkeypatch, share):
    """3 trials on 2 single-trial workers, two short ones and a long one, held at the
    barrier so that, whatever the order of claims and the workers' start-up, the long one
    trains on while the other worker has nothing left (without it, a worker that started
    late, or a run's end written late by the background writer, let the long trial end
    before the other worker was idle: seen in CI). By default it keeps its thread count (a
    study's numbers repeat bit for bit whatever the timing); with --share-cores it takes
    the idle worker's core."""
    from cnnbench.cli import main
    from cnnbench.run.barrier import ENV as BARRIER_ENV

    (workdir / "cores.yaml").write_text(SHARED.format(name="cores", long=LONG))
    storage, barrier, over = f"sqlite:///{workdir / 'optuna.db'}", workdir / "barrier", threading.Event()
    barrier.mkdir()
    monkeypatch.setenv(BARRIER_ENV, str(barrier))  # the worker processes inherit it
    releaser = threading.Thread(target=_release, args=(barrier, storage, over), daemon=True)
    releaser.start()
    args = ["study", str(workdir / "cores.yaml"), "--no-fuse", "--workers", "2", "--storage", storage]
    try:
        assert main(args + (["--share-cores"] if share else [])) == 0
    finally:
        over.set()
        releaser.join(30)
    assert len(list(barrier.glob("reached-*"))) == 3  # every trial was held once
    tags = _threads_tags(workdir, "cores")
    assert len(tags) == 3
    steady = {t for t in tags.values() if "-" not in t}
    changed = [t.split("-") for t in tags.values() if "-" in t]
    if share:
        assert changed and all(int(b) > int(a) for a, b in changed), tags
    else:
        assert not changed and len(steady) == 1, tags
