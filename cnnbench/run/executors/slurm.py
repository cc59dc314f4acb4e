"""Workers as Slurm array tasks, through submitit (the library Hydra's Slurm launcher uses).

Each worker is one Slurm task running `workers.run_worker` (the loop every executor runs;
submitit pickles the call into a folder every node reaches and runs it with `srun`),
asking for `cpus_per_worker` CPUs and `gpus_per_worker` GPUs (default: 1 where the
partition's nodes have GPUs), `time` minutes, and any extra sbatch parameter. The pool's
first round of workers is one array job; a replacement is a job of its own.

The pool (run/pool.py) reads each task's state from `sacct` (one call for every task, at
most every POLL_S seconds) and its result from submitit's pickle, and judges its end:
- a result: the worker's own exit status (0 done; 128 + a signal when it was stopped, its
  trials queued again by itself);
- no result, ended by Slurm for reasons of its own (CANCELLED by a person or an admin,
  PREEMPTED, NODE_FAIL, BOOT_FAIL, TIMEOUT, DEADLINE): lost (EXIT_LOST), not dead: its
  trials go back to the queue without counting against them, since another task may well
  finish them (a trial resumes from its shared checkpoint, so even one longer than a task's
  time limit progresses);
- no result otherwise (OUT_OF_MEMORY, FAILED: the process died, a COMPLETED task with no
  result): a death counted on its trials, as with a local worker (two and a trial fails
  for good: a third try would die the same way).
Either way its trials are queued again at once and a replacement task is submitted while
work remains. The tasks are submitted with --no-requeue: the pool replaces a preempted
task (Slurm requeueing it as well would run two workers in its place). Slurm's warning
before the time limit (submitit's SIGUSR2, 90 s before) and a preemption's SIGTERM are
stop requests to the worker: it stops at its next safe point and queues its trials again.

Progress comes back through files (executors/event_files.py), not a queue. A stop request
to the supervisor is passed to the tasks as `scancel --signal` (a task still queued is
cancelled), and a task that has not stopped STOP_GRACE_S later is cancelled outright.

Without `wait` (--no-wait) nobody supervises: `submit` sends N tasks that each join the
study as `cnnbench worker` does (the one that ends it writes the results) and returns a
`Submitted` that says how to follow them; Slurm may requeue those (a preempted one joins
again). Every task keeps its own state folder (under the node's temporary folder, named
after the execution and the task, removed when the task ends with nothing left to resume):
checkpoints follow a trial through the shared store (run/checkpoint_share.py).
`cluster="local"` runs the same tasks as processes on this machine through submitit's
local executor (no Slurm needed: the tests, and trying it out).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cnnbench.config.spec import StudySpec
from cnnbench.errors import ConfigError, StorageError
from cnnbench.run.executors.event_files import EventFile, EventFiles
from cnnbench.run.executors.settings import Slurm, refuse_local_stores
from cnnbench.run.networks import worker_imports
from cnnbench.run.session import Kind, Session
from cnnbench.run.storage import process_id
from cnnbench.run.workers import EXIT_LOST, Ended, run_worker
from cnnbench.util.extras import require
from cnnbench.util.paths import state_dir

POLL_S = 2.0  # seconds between two sacct calls (sacct learns of an end 2-3 s after it)
STOP_GRACE_S = 30.0  # a task asked to stop that has not ended this long after is cancelled outright
RESULT_GRACE_S = 10.0  # seconds a COMPLETED task's result may take to show (a shared file system)
COMMAND_S = 60  # seconds a Slurm command may take

# the states of a task that has ended: Slurm's (sacct) and submitit's local executor's
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "REVOKED", "FINISHED", "INTERRUPTED"}
LOST = {"CANCELLED", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "TIMEOUT", "DEADLINE", "REVOKED"}  # Slurm's doing
COMMANDS = ("sbatch", "srun", "sacct", "sinfo", "scancel")


def slurm(*args: str) -> str:
    """A Slurm command's output; ConfigError with its last line when it fails."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_S)
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigError(f"--executor slurm: {args[0]} failed: {err}") from None
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(f"--executor slurm: {' '.join(args[:2])} refused: "
                          f"{lines[-1] if lines else f'exit status {done.returncode}'}")
    return done.stdout


def this_host() -> str:
    return socket.gethostname().split(".")[0]


def partition_nodes(partition: str | None) -> tuple[str, list[tuple[str, str]]]:
    """The partition (None: the cluster's default) and its nodes' (host name, GRES)."""
    names = slurm("sinfo", "-h", "-o", "%P").split()
    known = sorted({n.rstrip("*") for n in names})
    if partition is None:
        default = [n[:-1] for n in names if n.endswith("*")]
        if not default:
            raise ConfigError(f"--slurm-partition: the cluster has no default partition; name one of {', '.join(known)}")
        partition = default[0]
    elif partition not in known:
        raise ConfigError(f"--slurm-partition {partition}: no such partition (the cluster has "
                          f"{', '.join(known) or 'none'})")
    rows = slurm("sinfo", "-h", "-N", "-p", partition, "-o", "%n|%G").splitlines()
    return partition, [(host, gres) for host, _, gres in (row.partition("|") for row in rows) if host]


def sbatch_parameters(args: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """--slurm-arg KEY=VALUE (or KEY, a flag) as sbatch parameters: {"account": "lab", "exclusive": True}."""
    out: dict[str, Any] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        key = key.strip().lstrip("-")
        if not key or any(c.isspace() for c in key) or (eq and not value):
            raise ConfigError(f"--slurm-arg {arg}: expected KEY=VALUE (an sbatch option without its dashes, "
                              "e.g. account=lab) or KEY")
        out[key] = value if eq else True
    return out


class SlurmTasks:
    """The Slurm executor (run/pool.py's Executor); `submit` for tasks nobody watches."""

    def __init__(self, settings: Slurm) -> None:
        require("slurm", what="--executor slurm")
        self.settings, self.extra = settings, sbatch_parameters(settings.sbatch)
        if settings.cluster == "slurm":
            missing = [c for c in COMMANDS if shutil.which(c) is None]
            if missing:
                raise ConfigError(f"--executor slurm: no Slurm here ({', '.join(missing)} not found); run it on a "
                                  "machine of the cluster (a login node), or choose another --executor")
            self.partition, nodes = partition_nodes(settings.partition)
            self.where = f"partition {self.partition}: {len(nodes)} node(s)"
        elif settings.cluster == "local":
            self.partition, nodes = None, [(this_host(), "")]
            self.where = "submitit's local executor, processes on this machine"
        else:
            raise ConfigError(f"Slurm(cluster={settings.cluster!r}): expected 'slurm' or 'local'")
        # every node this machine: stores only it reaches serve them all
        self.here = bool(nodes) and all(host.split(".")[0] == this_host() for host, _ in nodes)
        gpus = settings.gpus_per_worker
        self.gpus = gpus if gpus is not None else int(any("gpu" in gres for _, gres in nodes))
        self.threads = None if self.gpus else int(settings.cpus_per_worker)
        self.waits = settings.wait  # False: `submit` only (executors.detached)
        self.events = EventFiles()
        self.name = f"Slurm ({self.where}; {settings.cpus_per_worker} CPU(s) and {self.gpus} GPU(s) per worker)"
        self.run_dir: Path | None = None
        self.ex: Any = None
        self.first_round, self.batch, self.tasks = 0, [], []
        self.polled = 0.0

    def check_stores(self, url: str, uri: str) -> None:
        """Stores only this machine reaches are refused unless every node of the partition is
        this machine; then `sbatch --test-only` says whether Slurm queues the tasks as asked
        (partition, account, time, GPUs). Both before anything is created."""
        if not self.here:
            refuse_local_stores(f"--executor slurm ({self.where})", storage=url, tracking=uri)
        if self.settings.cluster == "slurm":
            s = self.settings
            options = [f"--partition={self.partition}", f"--time={s.time}", f"--cpus-per-task={s.cpus_per_worker}",
                       "--nodes=1", "--ntasks-per-node=1", *([f"--gpus-per-node={self.gpus}"] if self.gpus else []),
                       *(f"--{k}" if v is True else f"--{k}={v}" for k, v in self.extra.items())]
            slurm("sbatch", "--test-only", *options, "--wrap", "true")

    def for_workers(self, n: int) -> "SlurmTasks":
        """The pool's first `n` starts become one array job."""
        self.first_round = n
        return self

    def executor(self, session: Session, *, requeue: bool) -> Any:
        """submitit's executor of this run's tasks; their folder is made at the first call."""
        import submitit  # the slurm extra

        if self.run_dir is None:
            s = self.settings
            base = Path(s.folder) if s.folder else state_dir(session.open_args.get("state")) / "slurm"
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.run_dir = (base / f"{session.spec.name}-{stamp}-{os.getpid()}").resolve()
            (self.run_dir / "events").mkdir(parents=True, exist_ok=True)
            self.events.folder = self.run_dir / "events"
        s = self.settings
        ex = submitit.AutoExecutor(folder=self.run_dir, cluster=s.cluster)
        ex.update_parameters(name=f"cnnbench-{session.spec.name}", timeout_min=s.time, nodes=1, tasks_per_node=1,
                             cpus_per_task=int(s.cpus_per_worker), **({"gpus_per_node": self.gpus} if self.gpus else {}),
                             slurm_partition=self.partition,
                             slurm_additional_parameters={**({} if requeue else {"no-requeue": True}), **self.extra})
        return ex

    def start(self, session: Session, slot: str, index: int) -> "SlurmTask":
        s = session
        open_args = {**s.open_args, "storage": s.url, "tracking": s.tracker.uri, "checked": True,
                     "role": "supervised", "supervisor": process_id(), "slot": slot, "share_checkpoints": True}
        self.ex = self.ex or self.executor(session, requeue=False)
        assert self.events.folder is not None and self.run_dir is not None
        events = self.events.folder / f"{len(self.tasks):03d}-{slot}.jsonl"
        args = (s.spec, s.kind, open_args, slot, str(events), self.gpus, self.threads, None, self.run_dir.name)
        task = SlurmTask(self)
        self.tasks.append(task)
        if self.first_round > 0:  # the first round: one array job of every slot, once all have asked
            self.batch.append((task, args))
            self.first_round -= 1
            if self.first_round == 0:
                self.flush()
        else:
            task.job = self.send(lambda: [self.ex.submit(slurm_worker, *args)])[0]
        return task

    def flush(self) -> None:
        """The first round's tasks, submitted as one array job."""
        if not self.batch:
            return
        batch, self.batch, self.first_round = self.batch, [], 0
        self.ex.update_parameters(slurm_array_parallelism=len(batch))
        jobs = self.send(lambda: self.array(self.ex, [args for _, args in batch]))
        for (task, _), job in zip(batch, jobs):
            task.job = job

    @staticmethod
    def array(ex: Any, calls: list[tuple]) -> list[Any]:
        with ex.batch():
            jobs = [ex.submit(slurm_worker, *args) for args in calls]
        return jobs

    def send(self, submit: Callable[[], list[Any]]) -> list[Any]:
        """Jobs submitted; a submission Slurm refuses stops the study (StorageError: the
        parent run FAILED with sbatch's words, and the same command goes on)."""
        try:
            return submit()
        except (subprocess.CalledProcessError, OSError, RuntimeError) as err:
            output = getattr(err, "output", b"") or b""
            text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
            raise StorageError(f"--executor slurm: sbatch refused a task: {' '.join((text or str(err)).split())[-300:]}")

    def submit(self, session: Session, n: int, *, final: Callable[[Session], Any] | None) -> "Submitted":
        """`n` tasks that each join the study as `cnnbench worker` does, the one that ends it
        running `final` (the results), submitted as one array job that nobody here watches."""
        s = session
        open_args = {**s.open_args, "storage": s.url, "tracking": s.tracker.uri, "role": "worker",
                     "share_checkpoints": True}
        ex = self.executor(session, requeue=True)
        ex.update_parameters(slurm_array_parallelism=n)
        assert self.run_dir is not None
        jobs = self.send(lambda: self.array(ex, [(s.spec, s.kind, open_args, f"w{i}", None, self.gpus, self.threads,
                                                   final, self.run_dir.name) for i in range(n)]))
        return Submitted(s.kind.name, s.spec.name, [str(j.job_id) for j in jobs], self.run_dir, s.parent,
                         self.settings.cluster)

    def state(self, job: Any) -> tuple[str, str]:
        """A task's state and node: Slurm's from one sacct call for every task, at most every
        POLL_S seconds (submitit's own watcher waits minutes between calls), or the local
        executor's from its process."""
        if self.settings.cluster == "slurm" and time.monotonic() - self.polled > POLL_S:
            job.watcher.update()
            self.polled = time.monotonic()
        info = job.get_info(mode="cache")
        words = (info.get("State") or info.get("jobState") or "UNKNOWN").split()
        node = info.get("NodeList", "")
        return (words[0].upper() if words else "UNKNOWN"), ("" if node.startswith("None") else node)

    def signal(self, job: Any, signum: int) -> None:
        """A stop request to a task: a queued one cancelled, then `scancel --signal` to a
        running one, each in Slurm's own judgement of the task's state (`--state`): sacct's
        may say PENDING seconds after the task started (slurmdbd learns late), and a
        training task cancelled outright instead of asked ends CANCELLED, not with its
        result. Cancelling the queued first leaves no gap: a task that starts between the
        two commands gets the signal. The local executor's process passes only SIGTERM on
        to its task."""
        if self.settings.cluster == "local":
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(job.job_id), signal.SIGTERM)
            return
        name = signal.Signals(signum).name.removeprefix("SIG")
        for how in (["--state=PENDING"], ["--state=RUNNING", f"--signal={name}"]):
            subprocess.run(["scancel", *how, str(job.job_id)], capture_output=True, timeout=COMMAND_S)

    def close(self) -> None:
        """Every task not seen to end is cancelled (Slurm sends it SIGTERM, a stop request)."""
        self.batch = []
        for task in self.tasks:
            if task.job is not None and not task.over:
                with contextlib.suppress(Exception):
                    task.job.cancel(check=False)


@dataclass
class SlurmTask:
    """One worker task (run/pool.py's Handle)."""
    tasks: SlurmTasks
    job: Any = None  # None until the first round's array is submitted
    where: str = ""
    asked: int | None = None  # the signal of the stop request passed on to it
    asked_at: float = 0.0
    forced: bool = False
    completed_at: float | None = None  # when Slurm first said COMPLETED and no result showed
    over: bool = False

    def ended(self, timeout: float) -> Ended | None:
        self.tasks.flush()
        end = self.look()
        if end is None:
            time.sleep(timeout)
        self.over = end is not None
        return end

    def look(self) -> Ended | None:
        job = self.job
        if job.paths.result_pickle.exists():
            return self.result()
        if self.asked is not None and not self.forced and time.monotonic() - self.asked_at > STOP_GRACE_S:
            job.cancel(check=False)  # it did not stop at a safe point: Slurm ends it (SIGTERM, then SIGKILL)
            self.forced = True
        state, node = self.tasks.state(job)
        if node:
            self.where = f"job {job.job_id} on {node}"
        if state not in ENDED:
            return None
        if state in ("COMPLETED", "FINISHED"):  # its result may still be on its way
            self.completed_at = self.completed_at or time.monotonic()
            if time.monotonic() - self.completed_at < RESULT_GRACE_S:
                return None
        return verdict(state, self.describe(), self.asked, str(job.paths.stdout))

    def result(self) -> Ended:
        try:
            status, message, self.where = self.job.result()
        except Exception as err:  # the task raised (a bug): the traceback is in its log
            return Ended(1, f"failed: {' '.join(str(err).split())[-300:]}")
        return Ended(status, message)

    def stop(self, signum: int) -> None:
        self.tasks.flush()
        self.asked, self.asked_at = int(signum), time.monotonic()
        self.tasks.signal(self.job, signum)

    def describe(self) -> str:
        if self.where:
            return self.where
        if self.job is None:
            return "a Slurm task (being submitted)"
        return f"{'process' if self.tasks.settings.cluster == 'local' else 'job'} {self.job.job_id}"


def verdict(state: str, where: str, asked: int | None, log: str) -> Ended:
    """How a task that left no result ended, for the pool (see the module)."""
    if asked is not None:
        return Ended(128 + asked)  # stopped as asked: its trials are queued again
    if state in LOST:
        return Ended(EXIT_LOST, f"was ended by Slurm ({state}, {where}), not by its trials")
    if state == "OUT_OF_MEMORY":
        return Ended(-int(signal.SIGKILL))
    return Ended(1, f"ended without a result ({state}, {where}); its log: {log}")


@dataclass
class Submitted:
    """Tasks submitted for a study or sweep that nobody here watches (--no-wait)."""
    kind: str
    name: str
    job_ids: list[str]
    folder: Path
    parent_run_id: str
    cluster: str = "slurm"

    def text(self) -> str:
        """What was submitted and how to follow it, for the person who submitted it."""
        ids = " ".join(self.job_ids)
        head = (f"{self.kind} {self.name}: {len(self.job_ids)} worker task(s) submitted; they train its trials and "
                f"the one that ends it writes the results (MLflow parent run {self.parent_run_id})")
        if self.cluster == "local":
            return "\n".join([head, f"  processes: {ids} (submitit's local executor)",
                              f"  logs:      {self.folder}/*_log.out", f"  stop:      kill {ids}"])
        job = sorted({j.split("_")[0] for j in self.job_ids})
        jobs = ",".join(job)
        return "\n".join([
            f"{head}\n  Slurm job {jobs} (tasks {ids})",
            f"  follow:    squeue -j {jobs}; sacct -j {jobs} -X -o JobID,State,Elapsed,NodeList",
            f"  logs:      {self.folder}/{job[0]}_*_log.out",
            f"  stop:      scancel {jobs} (the same command again goes on from there; finished trials are kept)"])


def task_state(execution: str) -> Path:
    """This task's own state folder, under the node's temporary folder ($TMPDIR), named
    after the execution (its submitit folder's name: the study, the time, the submitting
    process) and the task: nothing is shared through a disk by accident, not even with an
    earlier execution's task of the same job id (Slurm numbers jobs from 1 again when its
    state is reset; the local executor's ids are process ids), nor through a
    $CNNBENCH_HOME that sbatch carried over from the submitting shell."""
    import submitit

    return Path(tempfile.gettempdir()) / "cnnbench-slurm" / execution / str(submitit.JobEnvironment().job_id)


def slurm_worker(spec: StudySpec, kind: Kind, open_args: dict[str, Any], label: str, events: str | None,
                 gpus: int, threads: int | None, final: Callable[[Session], Any] | None,
                 execution: str) -> tuple[int, str, str]:
    """A task (submitit runs it on a node): `workers.run_worker` in the task's own state
    folder (task_state), its events to the file `events` (None: printed to its log), `final`
    run by the worker that ends the study; (exit status, message, where it ran). Slurm's
    warning before the time limit (submitit's signal, SIGUSR2) is a stop request here, as
    SIGTERM is. A task that ends well leaves its state folder behind it removed: its
    trials are over, and what they were is in the stores; one that stops or fails keeps it
    for the same task requeued (the shared store holds its checkpoints for any other)."""
    warning = signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
    signal.signal(warning, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    if not gpus:  # a task without GPUs: Slurm may leave CUDA_VISIBLE_DEVICES unset (every GPU seen)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    where = f"node {this_host()} pid {os.getpid()}"
    state = task_state(execution)
    ended = run_worker(spec, kind, {**open_args, "state": str(state), "executor": "slurm", "node": this_host()},
                       label=label, events=EventFile(events) if events else None, threads=threads, on_session=final,
                       imports=worker_imports(spec))
    if ended.status == 0:
        shutil.rmtree(state, ignore_errors=True)
        with contextlib.suppress(OSError):
            state.parent.rmdir()  # the execution's folder, once its last task here is gone
    return ended.status, ended.message, where
