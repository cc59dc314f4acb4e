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
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cnnbench.config.spec import ConfigError, StudySpec
from cnnbench.errors import DataError, DeviceError, TrackingError
from cnnbench.run.claims import claim, interrupted
from cnnbench.run.cores import CoreShare
from cnnbench.run.opening import open_session
from cnnbench.run.progress import Board
from cnnbench.run.session import Kind, Session
from cnnbench.run.trials import train_claimed
from cnnbench.util import interrupt

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
    left runs elsewhere and ends there. A Ctrl-C fails the claimed trials not told yet
    and queues them again (their checkpoints resume them), then propagates."""
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
        except KeyboardInterrupt:
            with interrupt.shielded():
                for trial in batch:
                    interrupted(session, trial)
            raise
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


def launch_workers(session: Session, n: int, *, threads: int | None = None, share_cores: bool = False) -> WorkerReport:
    """`n` worker processes on this machine (one GPU each, round robin, where there are
    GPUs; `threads` CPU threads each) that join this session's study and train its
    trials, their progress shown here one line per running trial. Returns when all end.
    `share_cores`: a CPU worker that runs out of work gives its threads to those still
    training (cores.CoreShare); off, every trial keeps `threads` from start to end, so its
    numbers are the same bits whenever the others end."""
    gpus = torch.cuda.device_count()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or MLflow state
    events = ctx.Queue()
    training = ctx.Value("i", n)  # workers training: CPU threads go to those still at it
    procs: list[Any] = []
    report = WorkerReport()
    kind = session.kind
    board = Board(f"{kind.name} {session.spec.name}", session.target, min(kind.done_at_start(session), session.target))
    with board.listening(events):  # read for the workers' whole life, Ctrl-C included
        try:
            with interrupt.blocked():  # a Ctrl-C while they start is raised once all are started
                for i in range(n):
                    proc = ctx.Process(target=worker_main, name=f"cnnbench-w{i}",
                                       args=(session.spec, kind, {**session.open_args, "storage": session.url,
                                                                   "checked": True},
                                             f"w{i}", threads, i % gpus if gpus else None, events,
                                             (training, n * threads if threads and share_cores else None)))
                    proc.start()
                    procs.append(proc)
            board.handle(("line", "", f"{kind.name} {session.spec.name}: {n} workers started (pids "
                          f"{', '.join(str(p.pid) for p in procs)})" + (f" on {gpus} GPU(s)" if gpus else ""), None))
            for proc in procs:
                while proc.is_alive():
                    proc.join(timeout=1.0)  # bounded: this thread looks at its signals every second
        except KeyboardInterrupt:
            stop_workers(procs)
            raise
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        report.stopped = f"{len(bad)} worker(s) ended with status {', '.join(map(str, bad))}"
    return report


def stop_workers(procs: list[Any]) -> None:
    """Ctrl-C to this process alone: pass it on (a worker that has it already, from the
    terminal, holds the second one); each stops at its next safe point."""
    with interrupt.shielded():
        for proc in procs:
            if proc.is_alive() and proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
        for proc in procs:
            proc.join()


def worker_main(spec: StudySpec, kind: Kind, open_args: dict[str, Any], label: str, threads: int | None,
                gpu: int | None, events: Any, share: tuple[Any, int | None] | None = None) -> None:
    """A worker process: join the study, train until nothing is left, exit (0; 3 when its
    trials kept failing; 2 on bad input; 130 on Ctrl-C). `share`: the counter of workers
    training, to wake when one ends, and the threads of all together, to share the CPU's
    cores out as workers end (None: off the CPU, or without --share-cores; cores.CoreShare)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except (OSError, AttributeError):
        pass
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    spec, plan = without_progress_bars(spec, open_args.get("plan"))
    try:
        interrupt.install()  # a Ctrl-C that came while the parent started us is raised here
        if threads:
            torch.set_num_threads(threads)
        session = open_session(spec, kind, **{**open_args, "plan": plan}, worker=label)
        session.events, session.threads = events, threads
        if share is not None:
            session.cores = CoreShare(share[0], share[1], threads)
        report = work(session)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ConfigError, DataError, DeviceError, TrackingError) as err:
        events.put(("line", label, f"[{label}] error: {err}", None))
        sys.exit(2)
    if report.stopped:
        events.put(("line", label, f"[{label}] stopped: {report.stopped}", None))
        sys.exit(3)
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
