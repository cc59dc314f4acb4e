"""Groups side by side (train/side_by_side.py): which groups may train together (CUDA only;
the CPU stays one group after another), and the waves' runner: results in order, a failure
or a stop request stops the other groups and is raised once all have ended, and groups
trained in threads compute the numbers they compute one after another."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from cnnbench.train.loop import train_group
from cnnbench.train.result import FINISHED, INTERRUPTED, Recorder
from cnnbench.train.side_by_side import MAX_TOGETHER, StopRecorder, Stopped, plan, run_together, together_key

from conftest import quick

CPU = torch.device("cpu")


def test_the_cpu_trains_groups_one_after_another():
    batch = [quick(batch_size=b) for b in (32, 64, 128, 256, 512)]
    assert plan(batch, "cpu") == [[0], [1], [2], [3], [4]]
    assert together_key(batch[0], "cpu") is None


def test_which_groups_train_side_by_side_on_cuda():
    # the batch study: five groups of one model and data, MAX_TOGETHER at a time
    batch = [quick(batch_size=b) for b in (32, 64, 128, 256, 512)]
    assert MAX_TOGETHER == 4 and plan(batch, "cuda") == [[0, 1, 2, 3], [4]]
    assert plan(batch, "cuda", max_together=2) == [[0, 1], [2, 3], [4]]
    # the activation study: two groups, together
    assert plan([quick(activation="sigmoid"), quick(activation="relu")], "cuda") == [[0, 1]]
    # dropout draws from the global generator: alone; so does torch.compile (not thread-safe)
    alexnet = quick(model="alexnet")
    assert plan([quick(), alexnet, quick(batch_size=32)], "cuda") == [[0], [1], [2]]
    assert plan([quick(), alexnet.replace(dropout=0.0)], "cuda") == [[0, 1]]
    assert plan([quick(), quick(batch_size=32, compile="default")], "cuda") == [[0], [1]]
    # process-wide settings and the data on the device must be the same within a wave
    assert plan([quick(), quick(batch_size=32, tf32=True)], "cuda") == [[0], [1]]
    assert plan([quick(), quick(batch_size=32, deterministic=True)], "cuda") == [[0], [1]]
    assert plan([quick(), quick(batch_size=32, train_subset=640)], "cuda") == [[0], [1]]
    # consecutive groups only: the order of the groups (and of the trials' outcomes) is kept
    assert plan([quick(), quick(tf32=True), quick(batch_size=32)], "cuda") == [[0], [1], [2]]


class Losses(Recorder):
    def __init__(self):
        self.loss = []

    def train_loss(self, samples, loss):
        self.loss.append(loss)


def test_groups_trained_in_threads_compute_what_they_compute_one_after_another(data_root):
    """Three groups (two batch sizes, two activations; one fused, with two seeds) trained in
    three threads at once, each initialised and trained as when it trains alone: the same
    losses and accuracies, bit for bit (the kernels are the same, only when they run differs)."""
    base = quick(activation="relu", lr=0.05, train_subset=640, test_subset=200, log_every=2)
    groups = [[base, base.replace(lr=0.02, seed=1)], [base.replace(batch_size=32)],
              [base.replace(activation="sigmoid", seed=3)]]

    def train(wave=None, groups=groups):
        return [train_group(g, data_root=data_root, recorders=[StopRecorder(Losses(), wave) if wave else Losses()
                                                               for _ in g]) for g in groups]

    def numbers(results):
        return [[(r.status, [h["test/acc"] for h in r.history], r.curve) for r in rs] for rs in results]

    alone = numbers(train())
    tasks = [lambda wave, g=g: train(wave, [g])[0] for g in groups]
    together = numbers(run_together(tasks, CPU, threads=True))
    assert together == alone
    assert all(status == FINISHED for rs in together for status, _, _ in rs)


def wait_for_stop(wave, seconds=60.0):
    """A task that trains until its wave stops (StopRecorder raises Stopped at a log point)."""
    rec = StopRecorder(Recorder(), wave)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rec.train_loss(0, 1.0)
        time.sleep(0.01)
    raise AssertionError("the wave never stopped")


def test_a_failing_group_stops_the_others_and_its_error_is_raised():
    ended = []

    def failing(wave):
        time.sleep(0.05)
        raise ValueError("disk full")

    def training(wave):
        try:
            wait_for_stop(wave)
        except Stopped:
            ended.append("stopped")
            raise

    with pytest.raises(ValueError, match="disk full"):
        run_together([training, failing, training], CPU, threads=True)
    assert ended == ["stopped", "stopped"]
    assert run_together([lambda wave: 1, lambda wave: 2], CPU, threads=True) == [1, 2]
    assert run_together([lambda wave: threading.current_thread().name], CPU) == ["MainThread"]


def test_a_stop_request_stops_every_group_of_the_wave(data_root):
    """Ctrl-C reaches the main thread only: it stops the wave, each group's trials end
    interrupted at their next logging point (the loop records them so), and the stop is
    raised in the main thread once every group has ended."""
    base = quick(activation="relu", train_subset=64 * 400, epochs=1, log_every=5)
    results, statuses = {}, {}

    class Status(Recorder):
        def __init__(self, key):
            self.key = key

        def finish(self, result):
            statuses[self.key] = result.status

    def group(config, key):
        def task(wave):
            try:
                return train_group([config], data_root=data_root, recorders=[StopRecorder(Status(key), wave)])
            except KeyboardInterrupt as err:
                results[key] = err
                raise
        return task

    def interrupt(wave):
        time.sleep(1.0)  # the groups are training by now
        # Ctrl-C as the main thread takes it: a signal sent to the process may be delivered to
        # any of its threads that does not block it, and then the main thread, asleep in its
        # wait, is not woken until every group has ended
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        wait_for_stop(wave)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            run_together([group(base, "a"), group(base.replace(batch_size=32), "b"), interrupt], CPU, threads=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not isinstance(raised.value, Stopped)  # the main thread's own stop request
    assert set(results) == {"a", "b"} and all(isinstance(e, Stopped) for e in results.values())
    assert statuses == {"a": INTERRUPTED, "b": INTERRUPTED}
