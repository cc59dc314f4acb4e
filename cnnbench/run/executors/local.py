"""Workers as processes on this machine: the default executor, nothing to install.

Each worker is a fresh interpreter (multiprocessing's spawn: no forked CUDA or MLflow
state) running `workers.run_worker`, one GPU each where there are GPUs (round robin),
`threads` CPU threads each. It dies with this process (PR_SET_PDEATHSIG), and its
progress comes through one queue that the pool's board reads.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queues
from dataclasses import dataclass
from typing import Any

import torch

from cnnbench.config.spec import StudySpec
from cnnbench.run.executors.kept import keeper
from cnnbench.run.networks import worker_imports
from cnnbench.run.session import Kind, Session
from cnnbench.run.storage import process_id
from cnnbench.run.workers import Ended, process_start, run_worker
from cnnbench.util import exiting, interrupt, timings


class LocalPlan:
    """The local executor before its workers are counted: every store is reachable here."""
    name = "this machine"

    def __init__(self, *, threads: int | None = None, share_cores: bool = False) -> None:
        self.threads, self.share_cores = threads, share_cores

    def check_stores(self, url: str, uri: str) -> None:
        pass

    def for_workers(self, n: int) -> "LocalProcesses":
        return LocalProcesses(n, threads=self.threads, share_cores=self.share_cores)


class LocalProcesses:
    """The local executor (run/pool.py's Executor)."""
    name = "this machine"

    def __init__(self, n: int, *, threads: int | None = None, share_cores: bool = False) -> None:
        """`share_cores`: a CPU worker that runs out of work gives its threads to those still
        training (cores.CoreShare); off, every trial keeps `threads` from start to end.
        Inside `kept.keeping()` the workers are the keeper's, kept from one study to the next."""
        self.keeper = keeper()
        if self.keeper is not None:
            self.keeper.workers(n)
            self.ctx, self.events, training = self.keeper.ctx, self.keeper.events, self.keeper.training
        else:
            self.ctx = multiprocessing.get_context("spawn")
            self.events = self.ctx.Queue()
            training = self.ctx.Value("i", n)  # workers training: CPU threads go to those still at it
        self.total = n * threads if threads and share_cores else None
        self.share = (training, self.total)
        self.threads, self.gpus = threads, torch.cuda.device_count()

    def start(self, session: Session, slot: str, index: int) -> Any:
        s = session
        open_args = {**s.open_args, "storage": s.url, "checked": True, "role": "supervised",
                     "supervisor": process_id(), "slot": slot}
        gpu = index % self.gpus if self.gpus else None
        imports = worker_imports(s.spec, s.configs.values())
        if self.keeper is not None:
            job = {"spec": s.spec, "kind": s.kind, "open_args": open_args, "label": slot, "threads": self.threads,
                   "share": self.total, "imports": imports}
            return self.keeper.start(job, index, gpu)
        faults = self.ctx.Queue()  # its own: the message of a worker that failed is its own
        proc = self.ctx.Process(target=worker_main, name=f"cnnbench-{slot}",
                                args=(s.spec, s.kind, open_args, slot, self.threads, gpu, self.events, self.share,
                                      faults, imports))
        proc.start()
        return Process(proc, faults)

    def close(self) -> None:
        pass


@dataclass
class Process:
    """A worker process (run/pool.py's Handle)."""
    proc: Any
    faults: Any

    def ended(self, timeout: float) -> Ended | None:
        self.proc.join(timeout=timeout)
        code = self.proc.exitcode
        if code is None:
            return None
        message = ""
        if code not in (0, *(128 + int(s) for s in interrupt.SIGNALS)) and code > 0:
            with contextlib.suppress(queues.Empty):  # its one-line message, sent before it exited
                message = self.faults.get(timeout=2.0)
        return Ended(code, message)

    def stop(self, signum: int) -> None:
        if self.proc.is_alive() and self.proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def describe(self) -> str:
        return f"pid {self.proc.pid}"


def worker_main(spec: StudySpec, kind: Kind, open_args: dict[str, Any], label: str, threads: int | None,
                gpu: int | None, events: Any, share: tuple[Any, int | None] | None = None, faults: Any = None,
                imports: tuple[str, ...] = ()) -> None:
    """A worker process: `workers.run_worker`, its message (bad input, a fault of the
    machine) to `faults`, then exit with its status."""
    process_start(gpu)
    ended = run_worker(spec, kind, open_args, label=label, events=events, threads=threads, share=share,
                       imports=imports)
    if ended.message and faults is not None:
        faults.put(ended.message)
        faults.close()
        faults.join_thread()
    if not ended.status and timings.enabled():
        events.put(("timings", label, timings.snapshot()))
    events.close()
    events.join_thread()
    # Done, every outcome recorded (run_worker's work() drained the background writer): exit
    # without the interpreter's teardown of torch, MLflow and SQLAlchemy, which took 2-3 s of
    # a study's wall time here, once the progress lines (and the timings, when on) are sent.
    exiting.exit(ended.status)
