"""The worker loop, and a worker's whole life: what every executor runs.

`work` claims trials (run/claims.py) and trains them (run/trials.py) until the study
holds its target of finished trials or nothing is left that is not running elsewhere.
`run_worker` is a worker's whole life, the same in a local process (executors/local.py),
a Ray task, a Slurm array task or `cnnbench worker` on any machine: join the study
through its storage, work, and end with an exit status that its supervisor (run/pool.py)
reads: 0 done; EXIT_INPUT bad input; EXIT_GAVE_UP its trials kept failing; EXIT_STORAGE
a fault of the machine (the study stops); 128 + the signal on a stop request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cnnbench.config.spec import StudySpec
from cnnbench.errors import ConfigError, DataError, DeviceError, StorageError, TrackingError
from cnnbench.run.claims import claim, interrupted
from cnnbench.run.cores import CoreShare
from cnnbench.run.networks import import_networks
from cnnbench.run.opening import open_session
from cnnbench.run.session import Kind, Session
from cnnbench.run.trials import train_claimed
from cnnbench.track import jobs
from cnnbench.train.device import resolve_device
from cnnbench.util import interrupt, processes, timings
from cnnbench.util.background import writer
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
    propagates; so does a fault of the machine, as StorageError: the study stops. Returns
    once the background writer wrote everything this worker handed it."""
    report = WorkerReport()
    data_cache: dict[tuple, Any] = {}
    limit = session.kind.max_failures_in_a_row
    writer().choose(resolve_device(session.spec.base_config().device).type == "cpu")  # util/background.py
    writer().start(jobs.warm)  # the background writer's process starts beside the first claim and data
    while True:
        batch: list[Any] = []
        try:
            with interrupt.shielded(), timings.phase("claims/claim trials"):  # taken whole or not at all
                with session.lock():
                    batch, counts = claim(session, session.fuse_k)
            if not batch:
                if writer().busy():  # outcomes still being told: count again once they are
                    writer().drain()
                    continue
                if session.cores is not None:
                    session.cores.idle()
                if session.is_finished(counts):
                    return report
                wait(session)  # the rest runs elsewhere, in case a worker is lost (or until one here ends)
                continue
            if session.cores is not None:
                session.cores.busy()
            report.add(train_claimed(session, batch, data_cache))
            if limit and report.failed_in_a_row >= limit:
                writer().drain()
                report.stopped = f"{report.failed_in_a_row} trials failed in a row"
                return report
        except KeyboardInterrupt as err:
            with interrupt.shielded():
                writer().settle()  # what was handed over is written before the stop is recorded
                for trial in batch:
                    interrupted(session, trial, interrupt.reason(err))
            raise
        except Exception as err:
            fault = str(err) if isinstance(err, StorageError) else storage_fault(err)
            if fault is None:
                raise
            with interrupt.shielded():  # queued again, to resume once the cause is fixed
                writer().settle()
                for trial in batch:
                    with contextlib.suppress(Exception):  # the store may be what cannot be written
                        interrupted(session, trial, f"stopped: {fault}")
            raise StorageError(fault) from err


def wait(session: Session) -> None:
    """Sleep POLL_S seconds, less when a worker of this machine starts or stops training."""
    if session.cores is not None:
        session.cores.wait(POLL_S)
    else:
        time.sleep(POLL_S)


# ----------------------------------------------------------------------------------------
# a worker's whole life


EXIT_INPUT = 2  # a worker refused its input (the parent checked it; another store, say)
EXIT_GAVE_UP = 3  # a worker's trials kept failing
EXIT_STORAGE = 4  # a worker met a fault of the machine (errors.StorageError): the study stops
EXIT_LOST = 75  # an executor lost the worker with its machine (a Ray node died, say): not the trial's doing


@dataclass
class Ended:
    """How a worker ended: its exit status (negative: killed by that signal) and, for a
    fault of the machine or bad input, its one-line message."""
    status: int
    message: str = ""


def process_start(gpu: int | None) -> None:
    """The start of a worker process of this machine (executors/local.py, kept.py): it dies
    with its parent, sees only its GPU (`gpu`, None: as it is), and its interpreter's start
    is timed."""
    processes.die_with_parent()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    timings.add("workers/interpreter and imports", timings.process_seconds() or 0.0)


def run_worker(spec: StudySpec, kind: Kind, open_args: dict[str, Any], *, label: str, events: Any = None,
               threads: int | None = None, share: tuple[Any, int | None] | None = None,
               on_session: Any = None, imports: tuple[str, ...] = ()) -> Ended:
    """Join the study, train until nothing is left, and say how it ended (never raises but
    on a bug). `events`: a queue the supervisor's progress board reads (None: lines printed);
    `share`: the counter of workers training and the threads of all (cores.CoreShare);
    `on_session`: called with the session once it is open (the final step of `cnnbench
    worker --final`, say, runs in it); `imports`: the user's modules that register the
    study's networks (networks.worker_imports), imported first."""
    def say(line: str) -> None:
        if events is not None:
            events.put(("line", label, line, None))
        else:
            print(line, flush=True)

    previous = None
    try:
        previous = interrupt.install()  # a stop request that came while the supervisor started us is raised here
        import_networks(spec, imports)  # before any config is made: they register the study's networks
        spec, plan = without_progress_bars(spec, open_args.get("plan")) if events is not None else (
            spec, open_args.get("plan"))
        if threads:
            torch.set_num_threads(threads)
        session = open_session(spec, kind, **{**open_args, "plan": plan}, worker=label)
        session.events, session.threads = events, threads
        if share is not None:
            session.cores = CoreShare(share[0], share[1], threads)
        report = work(session)
        if on_session is not None and not report.stopped:
            on_session(session)
    except KeyboardInterrupt as err:
        return Ended(interrupt.exit_status(err))
    except StorageError as err:
        say(f"[{label}] error: {err}")
        return Ended(EXIT_STORAGE, str(err))
    except (ConfigError, DataError, DeviceError, TrackingError) as err:
        say(f"[{label}] error: {err}")
        return Ended(EXIT_INPUT, str(err))
    finally:
        interrupt.restore(previous)  # a Ray worker process runs other tasks after this one
    if report.stopped:
        say(f"[{label}] stopped: {report.stopped}")
        return Ended(EXIT_GAVE_UP, report.stopped)
    return Ended(0)  # every outcome recorded: work() drained the background writer


def without_progress_bars(spec: StudySpec, plan: Any) -> tuple[StudySpec, Any]:
    """A supervised worker's spec and plan: its supervisor shows progress, so no bar per trial here."""
    spec = dataclasses.replace(spec, fixed={**spec.fixed, "progress": False})
    if plan is not None:
        plan = dataclasses.replace(plan, runs=[c.replace(progress=False) for c in plan.runs],
                                   trials=[c.replace(progress=False) for c in plan.trials])
    return spec, plan
