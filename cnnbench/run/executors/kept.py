"""Worker processes kept from one study to the next (`cnnbench study A.yaml B.yaml ...`).

A local worker is a fresh interpreter: importing torch, MLflow and SQLAlchemy and opening
the stores took 4.3 s of each study's wall time on 2 cores, and on a GPU its CUDA context
and cuDNN's autotune cache go with it. Inside `keeping()` the local executor's workers
outlive their study: a worker that ended well waits for the next study, and the next
study's worker of the same slot is handed to it where it would have started the same
way (the same threads and GPU, and the same environment variables, which carry the
calibrated layout, the tracking store and the timers). Anything else ends the process as
before, and the slot gets a fresh one: a stop request, a fault, bad input or a worker
killed (each ends its process), another layout (the process is let go), a slot that the
next study does not use (let go too).

Each kept worker runs `workers.run_worker` once per study, exactly as a fresh one does;
between studies it waits with the stop signals blocked (a stop request then reaches it at
its next study's start, where `run_worker` takes it). Its progress comes through the
keeper's one queue; a thread here passes every event on to the board of the study that
runs (in the order each worker sent them) and, last, the worker's end to its handle, so
that a study's board has shown all of a worker's lines once the study sees it ended.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queues
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from cnnbench.run.workers import Ended, process_start, run_worker
from cnnbench.util import exiting, interrupt, processes, timings

STOP = interrupt.SIGNALS
# set by a library in its own process, whichever process imports it (torch's compiler, which
# a study's preflight may import here): a worker sets the same for itself
ITS_OWN = frozenset({"TORCHINDUCTOR_CACHE_DIR"})
RETIRE_S = 10.0  # seconds a kept worker let go may take to end before it is killed
MESSAGE_S = 2.0  # seconds to wait for the end a worker sent, once its process is seen gone


@dataclass
class Kept:
    """One kept worker process, its job queue and the ends it sent."""
    proc: Any
    jobs: Any
    key: tuple
    ends: queues.Queue = field(default_factory=queues.Queue)
    studies: int = 0  # studies handed to it
    busy: bool = False

    def idle(self, key: tuple) -> bool:
        # a killed process shows as a zombie (processes.alive) before its threads have all
        # ended and multiprocessing sees it gone: neither is handed a study
        return self.proc.is_alive() and processes.alive(self.proc.pid) and not self.busy and self.key == key

    def retire(self) -> None:
        with contextlib.suppress(Exception):
            self.jobs.put(None)


class Keeper:
    """The kept workers of one `keeping()` block, by slot index."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.sent = self.ctx.Queue()  # what the workers send: events, then ("ended", pid, ...)
        self.events: queues.Queue = queues.Queue()  # what the running study's board reads
        self.training = self.ctx.Value("i", 0)  # workers training (cores.CoreShare)
        self.by_slot: dict[int, Kept] = {}
        self.by_pid: dict[int, Kept] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.router = threading.Thread(target=self.route, name="cnnbench-kept-workers", daemon=True)
        self.router.start()

    def route(self) -> None:
        while not self.stopping.is_set():
            try:
                event = self.sent.get(timeout=0.2)
            except queues.Empty:
                continue
            except Exception:  # the queue is gone: the block ends
                return
            if event[0] != "ended":
                self.events.put(event)
                continue
            _, pid, status, message = event
            with self.lock:
                kept = self.by_pid.get(pid)
            if kept is not None:
                kept.ends.put(Ended(status, message))

    def workers(self, n: int) -> None:
        """A study of `n` workers starts: those of higher slots are let go."""
        self.training.value = n
        with self.lock:
            for index in [i for i in self.by_slot if i >= n]:
                self.by_slot.pop(index).retire()

    def start(self, job: dict[str, Any], index: int, gpu: int | None) -> "KeptHandle":
        """`job` (run_worker's arguments) in slot `index`: its kept worker where that one
        would start the same way, else a fresh one."""
        key = (job["threads"], gpu, tuple(sorted((k, v) for k, v in os.environ.items() if k not in ITS_OWN)))
        with self.lock:
            kept = self.by_slot.get(index)
            reused = kept is not None and kept.idle(key)
            if kept is not None and not reused:
                kept.retire()
            if not reused:
                jobs = self.ctx.Queue()
                proc = self.ctx.Process(target=kept_main, name=f"cnnbench-{job['label']}",
                                        args=(jobs, self.sent, self.training, gpu))
                proc.start()
                kept = self.by_slot[index] = Kept(proc, jobs, key)
                self.by_pid[proc.pid] = kept
            kept.busy, kept.studies = True, kept.studies + 1
            kept.jobs.put(job)
        return KeptHandle(kept, reused)

    def close(self) -> None:
        """Every kept worker let go, and ended."""
        with self.lock:
            everyone = list(self.by_pid.values())
            for kept in everyone:
                kept.retire()
        for kept in everyone:
            kept.proc.join(timeout=RETIRE_S)
            if kept.proc.is_alive():
                kept.proc.kill()
                kept.proc.join(timeout=RETIRE_S)
        self.stopping.set()
        self.router.join(timeout=5)
        self.sent.close()
        self.sent.join_thread()


@dataclass
class KeptHandle:
    """A kept worker running one study (run/pool.py's Handle)."""
    kept: Kept
    reused: bool

    def ended(self, timeout: float) -> Ended | None:
        try:
            ended = self.kept.ends.get(timeout=timeout)
        except queues.Empty:
            code = self.kept.proc.exitcode
            if code is None:
                return None
            try:  # the end it sent before it exited, passed on late
                ended = self.kept.ends.get(timeout=MESSAGE_S)
            except queues.Empty:
                ended = Ended(code)
        self.kept.busy = False
        return ended

    def stop(self, signum: int) -> None:
        if self.kept.proc.is_alive() and self.kept.proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.kept.proc.pid, signum)

    def describe(self) -> str:
        return f"pid {self.kept.proc.pid}" + (f", kept for study {self.kept.studies}" if self.reused else "")


_keepers: list[Keeper] = []  # the keepers of the `keeping()` blocks entered, innermost last


@contextlib.contextmanager
def keeping() -> Iterator[None]:
    """Within: the local executor's workers are kept from one study to the next (see the
    module); at the end every one of them ends."""
    keeper = Keeper()
    _keepers.append(keeper)
    try:
        yield
    finally:
        _keepers.remove(keeper)
        keeper.close()


def keeper() -> Keeper | None:
    """The keeper of the innermost `keeping()` block; None outside one."""
    return _keepers[-1] if _keepers else None


def kept_main(jobs: Any, sent: Any, training: Any, gpu: int | None) -> None:
    """A kept worker process: `run_worker` for every job it is handed until it is let go
    (None), or until one ends other than well; its status is the last one's."""
    process_start(gpu)
    status = 0
    while True:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP))  # between studies: held until the next one's start
        job = jobs.get()
        if job is None:
            break
        label, share = job.pop("label"), job.pop("share")
        ended = run_worker(job.pop("spec"), job.pop("kind"), job.pop("open_args"), label=label, events=sent,
                           share=(training, share), **job)
        if not ended.status and timings.enabled():
            sent.put(("timings", label, timings.snapshot()))
        timings.reset()
        sent.put(("ended", os.getpid(), ended.status, ended.message))
        status = ended.status
        if status:
            break
    sent.close()
    sent.join_thread()
    exiting.exit(status)  # see local.worker_main: no teardown of torch, MLflow and SQLAlchemy
