"""One background writer per process: the bookkeeping that training hands over (an epoch's
MLflow metrics, a trial's checkpoints, the end of its MLflow run with its figure and
artifacts, its Optuna outcome) is done in the order it was handed over, while the
training goes on.

Two lanes, a thread each. What is mostly the device's or the disk's (copying a checkpoint
off the device, serialising it, writing files) one thread runs itself; what is mostly
Python (MLflow, SQLAlchemy, Optuna, matplotlib: `remote` jobs, module-level functions of
plain values) the other sends to a writer process, waiting for each answer. In one
process a thread running that Python would hold the interpreter's lock in turns with the
training thread, which releases it at every tensor operation: measured here, a LeNet
step took 5x as long beside a busy Python thread (docs/speed.md). The writer process is
spawned once per process (at `start`, or the first remote job), ignores stop signals,
and ends when its parent goes.

What keeps the record whole, as it was when all of this ran in the training thread:

- first in first out: a trial's writes land in the order it made them, and a remote job
  finds every job handed over before it done (a run ends after its metrics and
  checkpoints are written; Optuna is told after the run ended); a checkpoint does not wait
  for the remote jobs before it (the writer process's start, a busy database);
- an error in a job is kept and raised in the thread that hands over next, at its next
  `submit` or `check`, or at `drain` (the training thread: a full disk still stops the
  study, util/faults.py; a bug still fails the trials). A remote job's error comes back
  as StorageError (a fault of the machine) or RuntimeError naming it. Jobs handed over
  after the failed one, before its error is raised, are dropped (the training would have
  stopped before making them), except those marked `always` (the end of a run: no run is
  left RUNNING because another write failed);
- `drain` waits until everything handed over is done: a study's results, a process's
  exit and the recording of a stop request (Ctrl-C) come after it;
- a stop request never cuts a job in half: signals reach the main thread only, and the
  writer process ignores them (its parent drains, then it ends).

Where a process trains decides whether it uses the writer at all (`choose`, called by the
worker loop): on an accelerator it does (the CPU waits while the device trains); on the CPU
every job runs at once in the thread that hands it over, the way before this writer
existed, because the training already uses every core and a writer beside it only competes
for them. Measured on 2 cores: with almost no training (`cnnbench bench --overhead`,
results/bench/overhead.md) the training thread waited for the writer 22 % of the time; the
1-seed lr study (10 epochs, all of MNIST) took 144 s in the background and 147 s in the
thread (medians of 3, within the machine's noise); and under load the writer fell seconds
behind its trials (a worker out of work gave its cores away late; CI's kill tests found no
trial mid-way in MLflow, its epochs written only after it ended). `CNNBENCH_SYNC_BOOKKEEPING`
decides instead where it is set: 1 in the thread everywhere, 0 the writer everywhere.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
from typing import Any, Callable, NamedTuple

from cnnbench.errors import StorageError
from cnnbench.util import timings
from cnnbench.util.faults import storage_fault

SYNC_ENV = "CNNBENCH_SYNC_BOOKKEEPING"
# the stop requests (util/interrupt.py), and Slurm's warning before a task's time limit,
# which Slurm may send to every process of the task and its worker turns into a stop request
# (run/executors/slurm.py): left to the parent, which drains the writer before it stops
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


class Ticket:
    """One job handed over: `done` is set once it ran (or was dropped); `value` is what it returned."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None


DONE = Ticket()
DONE.done.set()


class Job(NamedTuple):
    seq: int  # its place in the order handed over
    run: Callable[[], Any]
    what: str
    always: bool
    after: tuple[Ticket, ...]  # the jobs of the other lane it waits for
    ticket: Ticket


class Writer:
    """The process's background writer (see the module): two lanes, one thread each, the
    thread's own jobs and the writer process's. A remote job waits for every job of the
    thread handed over before it (a run's end finds its checkpoints written); a job of the
    thread waits for the remote ones before it only when `ordered` (telling the person
    watching that a trial ended, after Optuna was told), so that a checkpoint never waits
    for the writer process's start or a database."""

    def __init__(self, sync: bool | None = None) -> None:
        self.sync = os.environ.get(SYNC_ENV, "") not in ("", "0") if sync is None else sync
        self.forced = sync is not None  # the caller's choice: `choose` leaves it as it is
        self.lanes: dict[bool, collections.deque] = {False: collections.deque(), True: collections.deque()}
        self.last = {False: DONE, True: DONE}  # each lane's last ticket
        self.cond = threading.Condition()
        self.seq = self.pending = 0  # jobs handed over; those not done
        self.error: BaseException | None = None  # the first error not raised yet ...
        self.failed_at = 0  # ... and its job's place: the jobs after it are dropped
        self.threads: list[threading.Thread] = []
        self.remote = Remote()
        self.pid = os.getpid()

    def submit(self, job: Callable[[], Any], what: str, *, remote: bool = False, check: bool = True,
               always: bool = False, ordered: bool = False) -> Ticket:
        """Hand `job` over (`what`: its phase in the timings, `writer/<what>`). `remote`: a
        picklable module-level function of plain values, run in the writer process. `check`:
        an earlier job's error is raised here first; `always`: the job runs even after
        another failed (see the module); `ordered`: a job of the thread that waits for the
        remote jobs handed over before it."""
        if check:
            self.check()
        ticket = Ticket()
        if self.sync:
            try:
                with timings.phase(timings.IN_THREAD + what):  # on the training's path: its own section
                    ticket.value = job()
            finally:
                ticket.done.set()
            return ticket
        with self.cond:
            self.seq += 1
            after = (self.last[False],) if remote else (self.last[True],) if ordered else ()
            self.lanes[remote].append(Job(self.seq, job, what, always, after, ticket))
            self.last[remote] = ticket
            self.pending += 1
            self.started()
            self.cond.notify_all()
        return ticket

    def choose(self, on_cpu: bool) -> None:
        """This process trains on the CPU (`on_cpu`) or on an accelerator: the jobs run in the
        handing thread, or in the background (see the module), unless the environment or the
        caller decided it. What was handed over before is written first."""
        env = os.environ.get(SYNC_ENV, "")
        sync = env != "0" if env else on_cpu
        if not self.forced and self.sync != sync:
            self.drain()
            self.sync = sync

    def start(self, warm: Callable[[], Any] | None = None) -> None:
        """Start the threads and the writer process now, so that their start-up (and `warm`,
        a remote job that imports what later jobs use) runs beside the caller's."""
        if not self.sync and (self.remote.proc is None or warm is not None):
            self.submit(warm or nothing, "start", remote=True, check=False, always=True)

    def started(self) -> None:
        if not self.threads:  # under self.cond
            for remote in (False, True):
                self.threads.append(threading.Thread(target=self.run, args=(remote,), daemon=True,
                                                     name=f"cnnbench-writer-{'remote' if remote else 'local'}"))
                self.threads[-1].start()
            # an interpreter that exits normally writes what it was handed, then lets the writer
            # process go: before multiprocessing joins its children at exit (it would wait for ever
            # for one that ignores SIGTERM), in a worker process too (where atexit does not run)
            multiprocessing.util.Finalize(None, self.close, exitpriority=10)

    def close(self) -> None:
        """Everything written, then the writer process let go (it ends)."""
        self.settle()
        self.remote.close()

    def run(self, remote: bool) -> None:
        """One lane: its jobs in order, each after the other lane's jobs it waits for."""
        signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))  # the writer process starts with them blocked
        lane = self.lanes[remote]
        while True:
            with self.cond:
                while not lane:
                    self.cond.wait()
                job = lane.popleft()
            for ticket in job.after:
                ticket.done.wait()
            with self.cond:
                skip = self.error is not None and job.seq > self.failed_at and not job.always
            if not skip:
                try:
                    with timings.phase(timings.WRITER + job.what):
                        job.ticket.value = self.remote.call(job.run) if remote else job.run()
                except BaseException as err:  # kept for the training thread
                    with self.cond:
                        if self.error is None:
                            self.error, self.failed_at = err, job.seq
            job.ticket.done.set()
            with self.cond:
                self.pending -= 1
                self.cond.notify_all()

    def check(self) -> None:
        """Raise the error of a job that failed since the last check (once)."""
        if self.error is None:
            return
        with self.cond:
            err, self.error = self.error, None
        if err is not None:
            raise err

    def wait(self, ticket: Ticket | None) -> None:
        """Until the job of `ticket` ran (its error, if any, is raised by `check`)."""
        if ticket is not None and not ticket.done.is_set():
            with timings.phase("waits/for the background writer"):
                ticket.done.wait()

    def busy(self) -> bool:
        """Whether jobs are handed over and not done."""
        return self.pending > 0

    def drain(self) -> None:
        """Until every job handed over ran; then the first error among them is raised."""
        self.wait_all()
        self.check()

    def settle(self) -> BaseException | None:
        """Until every job handed over ran; the first error among them is returned (and
        forgotten), not raised: for a path that already handles another error or a stop."""
        self.wait_all()
        with self.cond:
            err, self.error = self.error, None
        return err

    def wait_all(self) -> None:
        if not self.pending:
            return
        with timings.phase("waits/for the background writer"):
            with self.cond:
                while self.pending:
                    self.cond.wait()


class Remote:
    """The writer process, seen from the writer thread: a job out, its answer back."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.conn: Any = None

    def call(self, job: Callable[[], Any]) -> Any:
        if self.proc is None or not self.proc.is_alive():
            self.spawn()
        try:
            self.conn.send((os.getcwd(), job))  # relative paths mean what they mean here
            ok, value, counts = self.conn.recv()
        except (EOFError, OSError) as err:  # it died (killed, out of memory): the next job starts another
            self.proc = None
            raise RuntimeError(f"the background writer's process ended ({type(err).__name__})") from None
        for name, n in counts.items():
            timings.count(name, n)
        if ok:
            return value
        kind, text, fault = value
        raise StorageError(fault) if fault else RuntimeError(f"{kind}: {text}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()  # the writer process reads the end of its input and ends
        if self.proc is not None:
            self.proc.join(timeout=10)
        self.proc = self.conn = None

    def spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked locks, threads or CUDA
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(theirs, os.getpid()), name="cnnbench-writer", daemon=True)
        self.proc.start()
        theirs.close()


def serve(conn: Any, parent: int) -> None:
    """The writer process: run each job received, answer (ok, value or the error, the
    counters' events meanwhile); end when the parent's end of the pipe closes."""
    for signum in STOP_SIGNALS:  # its parent decides when a stop comes: after it drained
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))
    while True:
        try:
            cwd, job = conn.recv()
        except (EOFError, OSError):
            return
        before = timings.snapshot()["counts"]
        try:
            if os.getcwd() != cwd:
                os.chdir(cwd)
            answer: tuple = (True, job())
        except BaseException as err:
            answer = (False, (type(err).__name__, " ".join(str(err).split())[:1000], storage_fault(err)))
        counts = {k: v - before.get(k, 0) for k, v in timings.snapshot()["counts"].items() if v != before.get(k, 0)}
        try:
            conn.send((*answer, counts))
        except (EOFError, OSError):
            return
        if os.getppid() != parent:  # orphaned: nobody reads the answers any more
            return


def nothing() -> None:
    """A job that only starts the writer process."""


_writer: Writer | None = None
_writer_lock = threading.Lock()


def writer() -> Writer:
    """This process's writer (a new one in a forked child)."""
    global _writer
    with _writer_lock:
        if _writer is None or _writer.pid != os.getpid():
            _writer = Writer()
        return _writer
