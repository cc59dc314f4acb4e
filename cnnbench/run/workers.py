"""The worker loop, and worker processes on this machine.

`work` is what every worker runs, in this process or another: claim trials (run/claims.py),
train them (run/trials.py), until the study holds its target of finished trials or
nothing is left that is not running elsewhere. `launch_workers` starts N worker processes
here (one GPU each where there are GPUs), each joining the same study through its
storage and running `work`, and shows their progress one line per running trial.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import queue as queues
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cnnbench.config.spec import StudySpec
from cnnbench.errors import ConfigError, DataError, DeviceError, StorageError, TrackingError
from cnnbench.models.source import fresh_module
from cnnbench.models.user import add_model_path, notebook_only, registering_modules
from cnnbench.run.claims import claim, interrupted, worker_died
from cnnbench.run.cores import CoreShare
from cnnbench.run.opening import open_session
from cnnbench.run.progress import Board
from cnnbench.run.session import Kind, Session
from cnnbench.run.trials import train_claimed
from cnnbench.util import interrupt
from cnnbench.util.faults import storage_fault

POLL_S = 5.0  # an idle worker looks for work (or lost trials) this often


@dataclass
class WorkerReport:
    trained: int = 0
    states: dict[str, int] = field(default_factory=dict)
    failed_in_a_row: int = 0
    stopped: str = ""  # why this worker gave up before the study's end (empty when it did not)

    def add(self, states: list[str]) -> None:
        for state in states:
            self.trained += 1
            self.states[state] = self.states.get(state, 0) + 1
            self.failed_in_a_row = self.failed_in_a_row + 1 if state == "FAIL" else 0


def work(session: Session) -> WorkerReport:
    """Train trials until the study holds `session.target` finished ones, or every trial
    left runs elsewhere and ends there. A stop request (Ctrl-C, SIGTERM, SIGHUP) fails the
    claimed trials not told yet and queues them again (their checkpoints resume them), then
    propagates; so does a fault of the machine, as StorageError: the study stops."""
    report = WorkerReport()
    data_cache: dict[tuple, Any] = {}
    limit = session.kind.max_failures_in_a_row
    while True:
        batch: list[Any] = []
        try:
            with interrupt.shielded():  # trials are taken whole (identity, heartbeat) or not at all
                with session.lock():
                    batch, counts = claim(session, session.fuse_k)
            if not batch:
                if session.cores is not None:
                    session.cores.idle()
                if session.is_finished(counts):
                    return report
                wait(session)  # the rest runs elsewhere, in case a worker is lost (or until one here ends)
                continue
            if session.cores is not None:
                session.cores.busy()
            report.add(train_claimed(session, batch, data_cache))
        except KeyboardInterrupt as err:
            with interrupt.shielded():
                for trial in batch:
                    interrupted(session, trial, interrupt.reason(err))
            raise
        except Exception as err:
            fault = str(err) if isinstance(err, StorageError) else storage_fault(err)
            if fault is None:
                raise
            with interrupt.shielded():  # queued again, to resume once the cause is fixed
                for trial in batch:
                    with contextlib.suppress(Exception):  # the store may be what cannot be written
                        interrupted(session, trial, f"stopped: {fault}")
            raise StorageError(fault) from err
        if limit and report.failed_in_a_row >= limit:
            report.stopped = f"{report.failed_in_a_row} trials failed in a row"
            return report


def wait(session: Session) -> None:
    """Sleep POLL_S seconds, less when a worker of this machine starts or stops training."""
    if session.cores is not None:
        session.cores.wait(POLL_S)
    else:
        time.sleep(POLL_S)


# ----------------------------------------------------------------------------------------
# worker processes


EXIT_INPUT = 2  # a worker refused its input (the parent checked it; another store, say)
EXIT_GAVE_UP = 3  # a worker's trials kept failing
EXIT_STORAGE = 4  # a worker met a fault of the machine (errors.StorageError): the study stops
MAX_RESTARTS = 3  # a worker that dies is replaced at most this many times (per slot) while work remains


@dataclass
class Slot:
    """One worker process of the pool, and the ones that replace it."""
    label: str
    gpu: int | None
    proc: Any = None
    restarts: int = 0
    ended: bool = False


def notebook_workers(label: str, models: list[str], workers: int | None) -> int | None:
    """The worker processes to use when the study trains a network registered in a notebook,
    which a spawned worker cannot import: one line and this process (workers not given), or
    a ConfigError (more than one asked for)."""
    names = sorted({m for m in models if notebook_only(m)})
    if not names:
        return workers
    if workers is not None and workers > 1:
        raise ConfigError(f"{label}: model {names[0]!r} is registered in a notebook (__main__), which worker "
                          "processes cannot import; put it in a module and import it from there, or use 1 worker")
    if workers is None:
        print(f"{label}: model {names[0]!r} is registered in a notebook: its trials train in this process "
              "(worker processes could not import it; put it in a module for them)", flush=True)
    return 1


def study_models(session: Session) -> list[str]:
    """The networks a session trains (a sweep: its fixed one and those it searches)."""
    spec = session.spec
    return sorted({c.model for c in session.configs.values()} | {spec.base_config().model}
                  | {m for d in spec.search if d.name == "model" for m in d.choices})


def launch_workers(session: Session, n: int, *, threads: int | None = None, share_cores: bool = False) -> WorkerReport:
    """`n` worker processes on this machine (one GPU each, round robin, where there are
    GPUs; `threads` CPU threads each) that join this session's study and train its
    trials, their progress shown here one line per running trial. Returns when all end.

    This process owns them: a worker that dies (a signal, the out-of-memory killer, an
    error) is seen within a second, its trials are queued again at once (claims.worker_died)
    and a replacement starts while work remains (MAX_RESTARTS per worker); a trial under
    which two workers died fails for good with the reason. A worker that meets a fault of
    the machine (a full disk, say) stops the study: the others are stopped at their next
    safe point and StorageError is raised here. `share_cores`: a CPU worker that runs out
    of work gives its threads to those still training (cores.CoreShare); off, every trial
    keeps `threads` from start to end, so its numbers are the same bits whenever the
    others end."""
    return Pool(session, n, threads, share_cores).run()


class Pool:
    """The worker processes of one session on this machine (see launch_workers)."""

    def __init__(self, session: Session, n: int, threads: int | None, share_cores: bool) -> None:
        gpus = torch.cuda.device_count()
        self.session, self.threads, self.gpus = session, threads, gpus
        self.ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or MLflow state
        self.events, self.faults = self.ctx.Queue(), self.ctx.Queue()
        training = self.ctx.Value("i", n)  # workers training: CPU threads go to those still at it
        self.share = (training, n * threads if threads and share_cores else None)
        self.slots = [Slot(f"w{i}", i % gpus if gpus else None) for i in range(n)]
        self.report = WorkerReport()
        self.fault = ""  # a worker's fault of the machine: the study stops
        self.imports = registering_modules(study_models(session))  # the user's modules that register its models

    def run(self) -> WorkerReport:
        session, kind = self.session, self.session.kind
        board = Board(f"{kind.name} {session.spec.name}", session.target,
                      min(kind.done_at_start(session), session.target))
        with board.listening(self.events):  # read for the workers' whole life, a stop request included
            try:
                with interrupt.blocked():  # a stop request while they start is raised once all are started
                    for slot in self.slots:
                        self.start(slot)
                self.say(f"{kind.name} {session.spec.name}: {len(self.slots)} workers started (pids "
                         f"{', '.join(str(s.proc.pid) for s in self.slots)})"
                         + (f" on {self.gpus} GPU(s)" if self.gpus else ""))
                while not all(slot.ended for slot in self.slots):
                    for slot in self.slots:
                        self.watch(slot)
            except KeyboardInterrupt as err:
                stop_workers([s.proc for s in self.slots], interrupt.signal_of(err))
                raise
        if self.fault:
            raise StorageError(self.fault)
        return self.report

    def start(self, slot: Slot) -> None:
        s = self.session
        slot.proc = self.ctx.Process(
            target=worker_main, name=f"cnnbench-{slot.label}",
            args=(s.spec, s.kind, {**s.open_args, "storage": s.url, "checked": True, "supervisor": os.getpid()},
                  slot.label, self.threads, slot.gpu, self.events, self.share, self.faults, self.imports))
        slot.proc.start()

    def say(self, line: str) -> None:
        self.events.put(("line", "", line, None))

    def watch(self, slot: Slot) -> None:
        """One look at a worker (at most 0.2 s: this thread looks at its signals meanwhile)."""
        if slot.ended:
            return
        slot.proc.join(timeout=0.2)
        code = slot.proc.exitcode
        if code is None:
            return
        if code == 0:
            slot.ended = True
            return
        self.ended_badly(slot, code)

    def ended_badly(self, slot: Slot, code: int) -> None:
        """A worker that exited with `code` != 0: its trials back to the queue, and a
        replacement while work remains, unless the study must stop."""
        session, why = self.session, exit_reason(code)
        if code == EXIT_STORAGE:  # its one-line message, sent before it exited
            with contextlib.suppress(queues.Empty):
                self.fault = self.fault or self.faults.get(timeout=5.0)
            self.fault = self.fault or f"worker {slot.label} {why}"
        stopped = code in {128 + int(sig) for sig in interrupt.SIGNALS}  # it requeued its own trials
        with interrupt.shielded():
            with contextlib.suppress(Exception):  # a store that cannot be written: the next execution recovers
                with session.lock():
                    worker_died(session, slot.proc.pid, f"{slot.label} (pid {slot.proc.pid}) {why}",
                                count=not stopped and code != EXIT_STORAGE)
        if code == EXIT_STORAGE or self.fault:
            slot.ended = True
            stop_workers([s.proc for s in self.slots if not s.ended], signal.SIGTERM, wait=False)
            return
        if code in (EXIT_INPUT, EXIT_GAVE_UP) or slot.restarts >= MAX_RESTARTS or not session.room(session.counts()):
            slot.ended = True
            if code not in (EXIT_INPUT, EXIT_GAVE_UP) and session.room(session.counts()):
                self.report.stopped = f"worker {slot.label} {why} {slot.restarts + 1} time(s)"
            elif code in (EXIT_INPUT, EXIT_GAVE_UP):
                self.report.stopped = f"worker {slot.label} {why}"
            return
        slot.restarts += 1
        self.say(f"[{slot.label}] {why}; its trials are queued again, a new worker takes its place")
        with interrupt.blocked():
            self.start(slot)


def exit_reason(code: int) -> str:
    """How a worker process ended, in words."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"was killed by signal {-code} ({name})" + (", likely out of memory" if -code == signal.SIGKILL else "")
    return {EXIT_INPUT: "refused its input", EXIT_GAVE_UP: "stopped: its trials kept failing",
            EXIT_STORAGE: "met a fault of the machine"}.get(code, f"exited with status {code}")


def stop_workers(procs: list[Any], signum: int = signal.SIGINT, *, wait: bool = True) -> None:
    """A stop request to this process: pass it on (a worker that has it already, from the
    terminal, holds the second one); each stops at its next safe point."""
    with interrupt.shielded():
        for proc in procs:
            if proc is not None and proc.is_alive() and proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)
        if wait:
            for proc in procs:
                if proc is not None:
                    proc.join()


def worker_main(spec: StudySpec, kind: Kind, open_args: dict[str, Any], label: str, threads: int | None,
                gpu: int | None, events: Any, share: tuple[Any, int | None] | None = None, faults: Any = None,
                imports: tuple[str, ...] = ()) -> None:
    """A worker process: join the study, train until nothing is left, exit: 0; EXIT_GAVE_UP
    when its trials kept failing; EXIT_INPUT on bad input; EXIT_STORAGE on a fault of the
    machine (the message to `faults`); 128 + the signal on a stop request. `share`: the
    counter of workers training, to wake when one ends, and the threads of all together,
    to share the CPU's cores out as workers end (None: off the CPU, or without
    --share-cores; cores.CoreShare). `imports`: the user's modules that register the study's
    networks (this is a fresh interpreter: spawned)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except (OSError, AttributeError):
        pass
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    try:
        interrupt.install()  # a stop request that came while the parent started us is raised here
        add_model_path(spec.model_path)
        for module in imports:  # before any config is made: they register its networks
            fresh_module(module, ref=module)
        spec, plan = without_progress_bars(spec, open_args.get("plan"))
        if threads:
            torch.set_num_threads(threads)
        session = open_session(spec, kind, **{**open_args, "plan": plan}, worker=label)
        session.events, session.threads = events, threads
        if share is not None:
            session.cores = CoreShare(share[0], share[1], threads)
        report = work(session)
    except KeyboardInterrupt as err:
        sys.exit(interrupt.exit_status(err))
    except StorageError as err:
        events.put(("line", label, f"[{label}] error: {err}", None))
        if faults is not None:
            faults.put(str(err))
            faults.close()
            faults.join_thread()
        sys.exit(EXIT_STORAGE)
    except (ConfigError, DataError, DeviceError, TrackingError) as err:
        events.put(("line", label, f"[{label}] error: {err}", None))
        sys.exit(EXIT_INPUT)
    if report.stopped:
        events.put(("line", label, f"[{label}] stopped: {report.stopped}", None))
        sys.exit(EXIT_GAVE_UP)
    # Done, every outcome recorded (MLflow and Optuna write synchronously): exit without the
    # interpreter's teardown of torch, MLflow and SQLAlchemy, which took 2-3 s of a study's
    # wall time here, once the progress lines are sent.
    events.close()
    events.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def without_progress_bars(spec: StudySpec, plan: Any) -> tuple[StudySpec, Any]:
    """A worker process's spec and plan: the parent shows progress, so no bar per trial here."""
    spec = dataclasses.replace(spec, fixed={**spec.fixed, "progress": False})
    if plan is not None:
        plan = dataclasses.replace(plan, runs=[c.replace(progress=False) for c in plan.runs],
                                   trials=[c.replace(progress=False) for c in plan.trials])
    return spec, plan
