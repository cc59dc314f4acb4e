"""Grid studies: expand a spec into trials, skip the finished ones, train the rest (fused
where they can be), and write `results/<study>/`.

A trial is identified by its resolved config and seed (`TrialConfig.key`), not by its
position, so a study interrupted at any moment and started again with the same command
trains only what is missing: finished trials are read back from MLflow, an interrupted
one resumes from its last epoch checkpoint, and runs that a dead process left RUNNING
are marked KILLED. One process at a time runs a given study on a machine (a file lock).

Epoch reuse: when `epochs` is a scientific hyperparameter and the schedule does not
depend on the epoch count (every schedule but one-cycle), the trials that differ only
in `epochs` share one run of the longest count, and each shorter count reads its
numbers from that run's per-epoch record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from cnnbench import fileio, interrupt
from cnnbench.config import ConfigError, StudySpec, TrialConfig
from cnnbench.data import data_dir, load_arrays, train_size
from cnnbench.errors import StudyBusy  # noqa: F401  (re-exported here)
from cnnbench.fused import fuse_groups
from cnnbench.report import TrialRow, truncate, write_results
from cnnbench.tracking import (TAG_SCIENTIFIC, Tracker, check_reachable, quiet_mlflow, run_name,
                               tracking_uri)
from cnnbench.train import (DIVERGED, FINISHED, TrialResult, load_data, resolve_device, resume_epoch, train_group,
                             usable_cores)

STATE_ENV = "CNNBENCH_HOME"


def state_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Run state that is never committed: checkpoints, locks, Optuna storage."""
    return Path(explicit or os.environ.get(STATE_ENV) or ".cnnbench")


@contextlib.contextmanager
def study_lock(root: Path, name: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `name` for this process. The OS drops it if we die."""
    path = root / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = Path(path).read_text().strip() or "another process"
            raise StudyBusy(f"study {name} is already running here ({holder}); wait for it to finish, "
                            "or run again with --wait") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)


@dataclass
class Plan:
    """The trials of a study and the runs that produce them."""

    trials: list[TrialConfig]  # in spec order
    runs: list[TrialConfig]  # distinct configs to train
    run_of: list[int]  # trial i is read from runs[run_of[i]]


def plan(spec: StudySpec) -> Plan:
    trials = spec.trial_configs()
    target: list[TrialConfig] = []
    for c in trials:
        if "epochs" in spec.varied and c.schedule != "onecycle":
            longest = max(t.epochs for t in trials if t.replace(epochs=1).key() == c.replace(epochs=1).key())
            target.append(c.replace(epochs=longest))
        else:
            target.append(c)
    runs: list[TrialConfig] = []
    index: dict[str, int] = {}
    run_of = []
    for c in target:
        if c.key() not in index:
            index[c.key()] = len(runs)
            runs.append(c)
        run_of.append(index[c.key()])
    return Plan(trials, runs, run_of)


@dataclass
class StudyOutcome:
    spec: StudySpec
    rows: list[TrialRow]
    parent_run_id: str
    files: list[Path]
    trained: int  # runs trained by this execution
    skipped: int  # runs already finished before it

    @property
    def failed(self) -> list[TrialRow]:
        return [r for r in self.rows if r.result.status not in (FINISHED, DIVERGED)]


def preflight(spec: StudySpec, configs: list[TrialConfig], *, data_root: Any, results_dir: Path,
              uri: str) -> None:
    """Everything that can be checked before a run is created: device, data, results, tracking."""
    for device in sorted({c.device for c in configs}):
        resolve_device(device)
    for dataset in sorted({c.dataset for c in configs}):
        load_arrays(dataset, data_dir(data_root))
    fileio.check_writable(results_dir)
    check_reachable(uri)


def run_study(spec: StudySpec, *, data_root: Any = None, results_root: str | os.PathLike = "results",
              tracking: str | None = None, state: str | os.PathLike | None = None, fuse: bool | None = None,
              workers: int | None = None, max_fuse: int = 16, wait: bool = False,
              command: str = "") -> StudyOutcome:
    """Run the study. `fuse` and `workers` None: chosen per device (see `execution`)."""
    quiet_mlflow()
    p = plan(spec)
    uri = tracking_uri(tracking)
    out_dir = Path(results_root) / spec.name
    preflight(spec, p.runs, data_root=data_root, results_dir=out_dir, uri=uri)
    root = state_dir(state)
    with study_lock(root, spec.name, wait=wait):
        return _run_locked(spec, p, data_root=data_root, out_dir=out_dir, uri=uri, root=root, fuse=fuse,
                           workers=workers, max_fuse=max_fuse, command=command)


def execution(device: str, fuse: bool | None, workers: int | None) -> tuple[bool, int, int | None]:
    """(fuse, worker processes, threads per trial) for a study on `device`.

    Measured with `cnnbench bench` on a 2-core CPU: two single-thread worker processes
    beat one two-thread process by about 1.3x, and a wide group (wide.py) in each worker
    beats one trial per worker (see the README's Speed section), where vmap-fused trials
    are slower than one at a time; on an accelerator fusing is the point. So by default:
    on the CPU one worker per core, one thread each (the same for every trial, whatever is
    left to run, since the thread count changes float rounding), each training a wide group
    of the trials whose model widens (`cpu_groups`); elsewhere fused groups in one process."""
    on_cpu = resolve_device(device).type == "cpu"
    cores = usable_cores()
    fuse = True if fuse is None else fuse
    workers = (cores if on_cpu else 1) if workers is None else workers
    return fuse, workers, max(1, cores // workers) if on_cpu else None


def cpu_groups(n_trials: int, workers: int, max_fuse: int) -> int:
    """The largest wide group on the CPU: the trials shared out evenly over the workers
    (5 trials on 2 workers: groups of 3 and 2), so that every worker has a group."""
    return max(1, min(max_fuse, math.ceil(n_trials / max(1, workers))))


@dataclass
class GroupTask:
    """One group of trials to train, with what its MLflow runs need (picklable)."""

    configs: list[TrialConfig]
    names: list[str]
    tags: list[dict[str, str]]
    checkpoint_dirs: list[Path]
    experiment: str
    uri: str
    parent: str
    data_root: Any
    label: str


_data: dict[tuple, Any] = {}  # one data set on the device per process


def train_task(task: GroupTask) -> list[tuple[TrialResult, str]]:
    """Train one group and record it in MLflow (in this process or a worker)."""
    c0 = task.configs[0]
    device = resolve_device(c0.device)
    key = (c0.dataset, c0.normalize, c0.train_subset, c0.test_subset, c0.val_size, c0.channels_last, str(device))
    if key not in _data:
        _data.clear()
        _data[key] = load_data(c0, task.data_root, device)
    tracker = Tracker(task.experiment, task.uri)
    recorders = [tracker.recorder(c, parent=task.parent, name=n, tags=t)
                 for c, n, t in zip(task.configs, task.names, task.tags)]
    out = train_group(task.configs, recorders=recorders, data=_data[key], checkpoint_dirs=task.checkpoint_dirs,
                      progress=task.label)
    return [(r, rec.run_id or "") for r, rec in zip(out, recorders)]


def _init_worker(threads: int | None) -> None:
    """In each worker process: die with the parent (so a killed study leaves no trainer
    behind), Ctrl-C only while training a task (see interrupt.py), quiet MLflow, and use
    the study's thread count."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    interrupt.shield_worker()
    quiet_mlflow()
    _init_threads(threads)


def _pool_task(task: GroupTask) -> list[tuple[TrialResult, str]]:
    """`train_task` in a worker: the one stretch of a worker that Ctrl-C cuts."""
    with interrupt.unshielded():
        return train_task(task)


def _run_tasks(tasks: list[GroupTask], workers: int, threads: int | None, bar) -> list[tuple[TrialResult, str]]:
    if workers <= 1 or len(tasks) <= 1:
        _init_threads(threads)
        out = []
        for task in tasks:
            out.extend(train_task(task))
            bar.update(len(task.configs))
        return out
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = None
    out = []
    try:
        # the workers and the pool's threads start with SIGINT blocked: a Ctrl-C while they
        # start is held until each worker can take it (and is raised here at the end)
        with interrupt.blocked():
            pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)),
                                       mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(threads,))
            futures = {pool.submit(_pool_task, dataclasses.replace(
                t, configs=[c.replace(progress=False) for c in t.configs])): t for t in tasks}
        pending = set(futures)
        while pending:
            # a bounded wait: the main thread looks at its signals at least once a second
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                out.extend(future.result())
                bar.update(len(futures[future].configs))
    except KeyboardInterrupt:
        with interrupt.shielded():
            if pool is not None:
                # Ctrl-C to this process alone: pass it on (a worker that has it already, from
                # the terminal, holds the second one while it records the interruption)
                for proc in list(getattr(pool, "_processes", {}).values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGINT)
                pool.shutdown(wait=True, cancel_futures=True)
        raise
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return out


def _init_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_locked(spec: StudySpec, p: Plan, *, data_root, out_dir: Path, uri: str, root: Path, fuse: bool | None,
                workers: int | None, max_fuse: int, command: str) -> StudyOutcome:
    from tqdm.auto import tqdm

    tracker = Tracker(spec.name, uri)
    tracker.close_orphans("the process running it died")
    done = tracker.finished_trials()
    results: dict[str, tuple[TrialResult, str]] = {}
    for c in p.runs:
        if c.key() in done:
            run = done[c.key()]
            results[c.key()] = (tracker.load_result(run), run.info.run_id)
    pending = [c for c in p.runs if c.key() not in results]
    skipped = len(p.runs) - len(pending)
    asked_to_fuse = fuse
    fuse, workers, threads = execution(p.runs[0].device, fuse, workers)
    on_cpu = resolve_device(p.runs[0].device).type == "cpu"
    wide_only = on_cpu and asked_to_fuse is None  # by default the CPU fuses only what widens,
    if wide_only:  # in one group per worker
        max_fuse = cpu_groups(len(pending), workers, max_fuse)

    ckpt_root = root / "checkpoints" / spec.name
    status = "KILLED"
    parent = ""
    try:
        # a Ctrl-C while the parent run is created is raised once `parent` holds it
        with interrupt.shielded():
            parent = tracker.start_parent(
                f"{spec.name} ({len(p.trials)} trials)", kind="study",
                tags={TAG_SCIENTIFIC: ",".join(spec.scientific), "cnnbench.nuisance": ",".join(spec.nuisance),
                      "cnnbench.spec": spec.path, "cnnbench.command": command[:500], "cnnbench.fuse": str(fuse),
                      "cnnbench.workers": str(workers), "cnnbench.threads": str(threads or "")},
                params={**{f"fixed.{k}": v for k, v in spec.fixed.items()},
                        **{f"scientific.{k}": list(v) for k, v in spec.scientific.items()},
                        **{f"nuisance.{k}": list(v) for k, v in spec.nuisance.items()},
                        "seeds": list(spec.seeds), "trials": len(p.trials), "runs": len(p.runs)},
                note=spec.description)
        tracker.log_artifacts(parent, [Path(spec.path)], "spec")
        tasks = [GroupTask(configs=group, names=[run_name(c, spec.varied) for c in group],
                           tags=[{**_trial_tags(spec, c), "threads": str(threads or "")} for c in group],
                           checkpoint_dirs=[ckpt_root / c.key() for c in group], experiment=spec.name, uri=uri,
                           parent=parent, data_root=data_root,
                           label=", ".join(run_name(c, spec.varied) for c in group)[:60])
                 for group in _groups(pending, ckpt_root, fuse=fuse, max_fuse=max_fuse, wide_only=wide_only)]
        bar = tqdm(total=len(p.runs), initial=skipped, desc=f"study {spec.name}", unit="trial",
                   disable=not p.runs[0].progress, dynamic_ncols=True)
        for r, run_id in _run_tasks(tasks, workers, threads, bar):
            results[r.config.key()] = (r, run_id)
        bar.close()
        c0 = p.runs[0]
        n_train = train_size(c0.dataset, val_size=c0.val_size, train_subset=c0.train_subset)
        rows = []
        for i, (trial, run_index) in enumerate(zip(p.trials, p.run_of)):
            run_cfg = p.runs[run_index]
            result, run_id = results[run_cfg.key()]
            if trial.epochs < run_cfg.epochs:
                result = truncate(result, trial.epochs, n_train)
            rows.append(TrialRow(i, trial, result, run_id))
        device = sorted({r.result.device for r in rows if r.result.device})
        # every trial is done: the results are written whole and the parent closed, and
        # a Ctrl-C meanwhile is raised after that
        with interrupt.shielded():
            files = write_results(spec, rows, out_dir, n_train=n_train, command=command, device=", ".join(device))
            tracker.log_artifacts(parent, files, "results")
            tracker.log_stats(parent, pd.read_csv(files[2]), list(spec.scientific) + list(spec.nuisance))
            outcome = StudyOutcome(spec, rows, parent, files, trained=len(pending), skipped=skipped)
            status = "FINISHED" if not outcome.failed else "FAILED"
            tracker.end(parent, status)
        return outcome
    except BaseException:
        if parent:
            with interrupt.shielded():
                tracker.end(parent, status)
        raise


def _trial_tags(spec: StudySpec, c: TrialConfig) -> dict[str, str]:
    from cnnbench.tracking import _fmt

    tags = {TAG_SCIENTIFIC: ",".join(spec.scientific)}
    tags.update({f"scientific.{k}": _fmt(getattr(c, k)) for k in spec.scientific})
    tags.update({f"nuisance.{k}": _fmt(getattr(c, k)) for k in spec.nuisance})
    return tags


def _groups(pending: list[TrialConfig], ckpt_root: Path, *, fuse: bool, max_fuse: int,
            wide_only: bool = False) -> list[list[TrialConfig]]:
    """Fusable trials together, split by the epoch their checkpoints resume from."""
    out = []
    for idx in fuse_groups(pending, max_k=max_fuse, enabled=fuse, wide_only=wide_only):
        by_epoch: dict[int, list[TrialConfig]] = {}
        for i in idx:
            by_epoch.setdefault(resume_epoch(ckpt_root / pending[i].key(), pending[i]), []).append(pending[i])
        out.extend(by_epoch.values())
    return out


def check_spec_runnable(spec: StudySpec) -> None:
    if not spec.scientific:
        raise ConfigError(f"{spec.path}: this spec has no scientific block; run it with `cnnbench sweep`")


