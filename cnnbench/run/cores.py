"""The CPU cores of one machine's worker processes, shared out again as workers run out of
work: a study's groups are rarely even (5 learning rates on 2 single-thread workers are
wide groups of 3 and 2), and without this the core of the worker that ends first would
sit idle while the other trains on with one thread.

Each worker holds a `CoreShare` over one shared counter of the workers still training.
A worker with nothing to claim steps out (`idle`), and back in when it claims a trial
again (`busy`, say a lost trial to retrain); at each of its trials' logging points
(`adjust`) a CPU worker takes `cores // training` threads, never fewer than it started
with. Only the thread count changes; the maths of a step does not (its rounding may, as
between any two thread counts). An idle worker waits for work (`wait`) until the counter
moves, so that it sees at once that the last trial ended, not at its next poll."""

from __future__ import annotations

import time
from typing import Any

import torch


class CoreShare:
    def __init__(self, training: Any, cores: int | None, threads: int | None) -> None:
        """`training`: a multiprocessing Value("i") shared by the workers, the number of them
        training (all, at the start); `cores`: the threads of all workers together;
        `threads`: this worker's own at the start (None, say on a GPU: threads are left
        alone)."""
        self.training, self.cores, self.threads = training, cores, threads
        self.current = threads
        self.active = True

    def idle(self) -> None:
        """This worker has nothing to train for now: its cores go to the others."""
        if self.active:
            self.active = False
            with self.training.get_lock():
                self.training.value -= 1

    def busy(self) -> None:
        """This worker claimed work again."""
        if not self.active:
            self.active = True
            with self.training.get_lock():
                self.training.value += 1
        self.adjust()

    def adjust(self) -> int:
        """Take this worker's share of the cores now; returns its threads."""
        if not self.threads or not self.cores:
            return self.current
        share = max(self.threads, self.cores // max(1, self.training.value))
        if share != self.current:
            torch.set_num_threads(share)
            self.current = share
        return share

    def wait(self, timeout: float, tick: float = 0.1) -> None:
        """Sleep up to `timeout` seconds, less when a worker starts or stops training."""
        seen, end = self.training.value, time.monotonic() + timeout
        while time.monotonic() < end and self.training.value == seen:
            time.sleep(tick)
