"""A supervisor and its workers, whatever starts them (run/executors/): the pool owns them.

The process that leads a study starts N workers through an executor (local processes,
Ray tasks, Slurm array tasks), each running `workers.run_worker` under a name (`slot`:
w0, w1, ...) and this process's identity as its supervisor, so that every trial it
claims says who watches it. Then it watches them: a worker that dies (a signal, the
out-of-memory killer, a lost node, an error) is seen within a second, its running
trials are queued again at once (claims.worker_died), and a replacement starts in its
slot while work remains (MAX_RESTARTS per slot); a trial under which two workers died
fails for good with the reason. A worker stopped by a stop request has queued its own
trials again and is replaced the same way. A worker that meets a fault of the machine (a
full disk) stops the study: the others are asked to stop at their next safe point and
StorageError is raised here. A stop request to this process is passed on to every worker.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from typing import Any, Protocol

from cnnbench.errors import StorageError
from cnnbench.run.claims import worker_died
from cnnbench.run.progress import Board
from cnnbench.run.session import Session
from cnnbench.run.workers import EXIT_GAVE_UP, EXIT_INPUT, EXIT_LOST, EXIT_STORAGE, Ended, WorkerReport
from cnnbench.util import interrupt

MAX_RESTARTS = 3  # a worker that dies is replaced at most this many times (per slot) while work remains
WATCH_S = 0.2  # seconds one look at a worker may wait (the supervisor looks at its signals between)


class Handle(Protocol):
    """One worker an executor started."""

    def ended(self, timeout: float) -> Ended | None:
        """How it ended, waiting up to `timeout` seconds; None while it runs."""

    def stop(self, signum: int) -> None:
        """Ask it to stop at its next safe point (a stop request, as from `signum`)."""

    def describe(self) -> str:
        """Where it runs, for the lines shown (pid 1234; node 10.0.0.3)."""


class Executor(Protocol):
    """Starts workers somewhere (executors/local.py, ray_cluster.py, slurm.py)."""
    name: str
    events: Any  # the queue the workers' progress events come through (get(timeout) raising queue.Empty)

    def start(self, session: Session, slot: str, index: int) -> Handle:
        """A worker in `slot` (the index-th), running workers.run_worker under this process's supervision."""

    def close(self) -> None:
        """Everything the executor started is gone."""


@dataclass
class Slot:
    """One worker of the pool, and the ones that replace it."""
    label: str
    index: int
    handle: Any = None
    restarts: int = 0
    done: bool = False


def supervise(session: Session, executor: Executor, n: int) -> WorkerReport:
    """`n` workers started by `executor`, watched until all have ended (see the module)."""
    return Pool(session, executor, n).run()


class Pool:
    def __init__(self, session: Session, executor: Executor, n: int) -> None:
        self.session, self.executor = session, executor
        self.slots = [Slot(f"w{i}", i) for i in range(n)]
        self.report = WorkerReport()
        self.fault = ""  # a worker's fault of the machine: the study stops

    def run(self) -> WorkerReport:
        session, kind = self.session, self.session.kind
        board = Board(f"{kind.name} {session.spec.name}", session.target,
                      min(kind.done_at_start(session), session.target))
        with board.listening(self.executor.events):  # read for the workers' whole life, a stop request too
            try:
                with interrupt.blocked():  # a stop request while they start is raised once all are started
                    for slot in self.slots:
                        slot.handle = self.executor.start(session, slot.label, slot.index)
                self.say(f"{kind.name} {session.spec.name}: {len(self.slots)} workers started on "
                         f"{self.executor.name} ({', '.join(s.handle.describe() for s in self.slots)})")
                while not all(slot.done for slot in self.slots):
                    for slot in self.slots:
                        self.watch(slot)
            except KeyboardInterrupt as err:
                self.stop_all(interrupt.signal_of(err), wait=True)
                raise
            finally:
                self.executor.close()
        if self.fault:
            raise StorageError(self.fault)
        return self.report

    def say(self, line: str) -> None:
        self.executor.events.put(("line", "", line, None))

    def watch(self, slot: Slot) -> None:
        if slot.done:
            return
        ended = slot.handle.ended(WATCH_S)
        if ended is None:
            return
        if ended.status == 0:
            slot.done = True
            return
        self.ended_badly(slot, ended)

    def ended_badly(self, slot: Slot, ended: Ended) -> None:
        """A worker that did not end well: its trials back to the queue, and a replacement
        while work remains, unless the study must stop."""
        session, code, why = self.session, ended.status, exit_reason(ended)
        stopped = code in {128 + int(sig) for sig in interrupt.SIGNALS}  # it queued its own trials again
        with interrupt.shielded():
            with contextlib.suppress(Exception):  # a store that cannot be written: the next execution recovers
                with session.lock():
                    worker_died(session, slot.label, f"{slot.label} ({slot.handle.describe()}) {why}",
                                count=not stopped and code not in (EXIT_STORAGE, EXIT_LOST))
        if code == EXIT_STORAGE:
            self.fault = self.fault or ended.message or f"worker {slot.label} {why}"
        if self.fault:
            slot.done = True
            self.stop_all(signal.SIGTERM, wait=False)
            return
        room = session.room(session.counts())
        if code in (EXIT_INPUT, EXIT_GAVE_UP) or slot.restarts >= MAX_RESTARTS or room <= 0:
            slot.done = True
            if code in (EXIT_INPUT, EXIT_GAVE_UP):
                self.report.stopped = f"worker {slot.label} {why}"
            elif room > 0:
                self.report.stopped = f"worker {slot.label} {why} ({slot.restarts + 1} time(s))"
            else:  # the other workers already hold (or have finished) everything left
                self.say(f"[{slot.label}] {why}; its trials are queued again, no new worker is needed "
                         f"(the others hold what is left)")
            return
        slot.restarts += 1
        self.say(f"[{slot.label}] {why}; its trials are queued again, a new worker takes its place")
        with interrupt.blocked():
            slot.handle = self.executor.start(session, slot.label, slot.index)

    def stop_all(self, signum: int, *, wait: bool) -> None:
        """A stop request passed on to every worker still running (each stops at its next
        safe point); with `wait`, until each has ended."""
        with interrupt.shielded():
            running = [s for s in self.slots if s.handle is not None and not s.done]
            for slot in running:
                with contextlib.suppress(Exception):
                    slot.handle.stop(signum)
            while wait and running:
                running = [s for s in running if s.handle.ended(WATCH_S) is None]


def exit_reason(ended: Ended) -> str:
    """How a worker ended, in words."""
    code = ended.status
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"was killed by signal {-code} ({name})" + (", likely out of memory" if -code == signal.SIGKILL else "")
    if code > 128 and code - 128 in {int(s) for s in interrupt.SIGNALS}:
        return f"stopped on {signal.Signals(code - 128).name}"
    if ended.message and code in (EXIT_LOST, 1):
        return ended.message
    return {EXIT_INPUT: "refused its input", EXIT_GAVE_UP: "stopped: its trials kept failing",
            EXIT_STORAGE: "met a fault of the machine"}.get(code, f"exited with status {code}")
