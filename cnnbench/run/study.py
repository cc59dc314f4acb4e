"""Grid studies: a spec's planned runs (values x seeds) trained by the one engine
(`run.grid` says what a grid study is to it), and `results/<study>/` written by the
process that ends the study.

A trial is identified by its resolved config and seed (`TrialConfig.key`), not by its
position. The study's runs live in an Optuna study (its storage: a SQLite file in the
state folder, or `--storage` for several machines), each queued once; any number of
processes, here (`--workers`) or elsewhere, share them, each run trained once and every
run under one MLflow parent. A study interrupted at any moment and started again with
the same command trains only what is missing: runs that MLflow holds finished are read
back, an interrupted one resumes from its last epoch checkpoint, and the runs of a dead
process are failed and queued again.

Epoch reuse: when `epochs` is a scientific hyperparameter and the schedule does not
depend on the epoch count (every schedule but one-cycle), the trials that differ only
in `epochs` share one run of the longest count, and each shorter count reads its
numbers from that run's per-epoch record (`config.space.plan`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from optuna.trial import TrialState

from cnnbench.config.space import plan
from cnnbench.config.spec import StudySpec
from cnnbench.data.tensors import train_size
from cnnbench.report.tables import TrialRow, truncate, write_results
from cnnbench.run.claims import claim_results, results_written
from cnnbench.run.grid import GRID
from cnnbench.run.opening import leading, open_session, pause_parent
from cnnbench.run.phases import Timed
from cnnbench.run.session import Session, count_states
from cnnbench.run.executors import detached, prepare
from cnnbench.run.executors.local import LocalPlan
from cnnbench.run.networks import networks, notebook_workers
from cnnbench.run.executors.slurm import Submitted
from cnnbench.run.pool import supervise
from cnnbench.run.trials import say_engine
from cnnbench.run.workers import work
from cnnbench.run.layout import Execution, cpu_layout, decide, kept_layout, layout_tags
from cnnbench.track.schema import ATTR_KEY, ATTR_MLFLOW_RUN_ID, ATTR_REASON, TAG_FUSE, TAG_THREADS, TAG_WORKERS
from cnnbench.train.calibration import applied, group_size
from cnnbench.errors import StorageError, Unfinished
from cnnbench.train.result import DIVERGED, FAILED, FINISHED, TrialResult
from cnnbench.util import interrupt
from cnnbench.util.faults import storage_fault
from cnnbench.util.timings import phase


@dataclass
class StudyOutcome:
    spec: StudySpec
    rows: list[TrialRow]
    parent_run_id: str
    files: list[Path]
    trained: int  # runs trained by this execution (by every process that shared it)
    skipped: int  # runs already finished before it
    timings: str = ""  # with timings on: where the wall time went (util/timings.py's table)

    @property
    def failed(self) -> list[TrialRow]:
        return [r for r in self.rows if r.result.status not in (FINISHED, DIVERGED)]


def run_study(spec: StudySpec, *, data_root: Any = None, results_root: str | os.PathLike = "results",
              tracking: str | None = None, state: str | os.PathLike | None = None, storage: str | None = None,
              fuse: bool | None = None, workers: int | None = None, max_fuse: int = 16, command: str = "",
              final: bool = True, share_cores: bool = False, executor: Any = "local",
              checkpoint_uri: str | None = None, timings: bool = False,
              fast: bool = False) -> StudyOutcome | Submitted | None:
    """Run (or join) the study: train its runs here, or in `workers` workers, and write
    the results when this is the process that ends it (None where another one does; a
    Submitted where a Slurm executor without `wait` only submitted the workers).
    `fuse` and `workers` None: chosen per device (see `execution`). `share_cores`: on the
    CPU, a worker that runs out of work gives its core to those still training (faster
    when groups are uneven, but their trials' rounding then depends on when it ended).
    `executor`: where the workers run ("local", "ray", "slurm", or executors.settings'
    Local / Ray / Slurm); `checkpoint_uri`: a folder or fsspec URL every node reaches for
    the resume checkpoints (default with a cluster executor: the runs' MLflow artifacts).
    On the CPU with local workers, the layout this machine's calibration chose (its `fast`
    one with `fast`; see `decide`) where one is cached in the state folder. `timings`: the
    phase table in the outcome and on the parent run (run/phases.py)."""
    timer = Timed(timings)
    p = plan(spec)
    device = p.runs[0].device
    workers = notebook_workers(f"study {spec.name}", networks(spec, p.runs), workers)
    runner = prepare(executor, share_cores=share_cores)
    layout = cpu_layout(device, state, fast=fast, trials=len(p.runs)) if isinstance(runner, LocalPlan) else None
    ex = decide(device, fuse, workers, max_fuse, layout)
    session = open_session(spec, GRID, plan=p, storage=storage, tracking=tracking, state=state,
                           results_root=results_root, data_root=data_root, command=command,
                           fuse_k=ex.max_fuse if ex.fuse else 1, wide_only=ex.wide_only, engine=ex.engine,
                           check_stores=runner.check_stores, checkpoint_uri=checkpoint_uri)
    # from here a stop request leaves the parent run KILLED (open_session covers its own stretch)
    with leading(session):
        ex = decide(device, fuse, workers, max_fuse, kept_layout(session, layout)) if ex.on_cpu else ex
        if isinstance(runner, LocalPlan):
            runner = prepare(executor, threads=ex.threads, share_cores=share_cores)
        if detached(runner) and len(session.configs) > session.skipped:  # Slurm's --no-wait: the tasks finish it
            return runner.submit(session, share_out(session, ex), final=finish if final else None)
        with applied(ex.layout):
            report = train(session, runner, ex)
        if report is not None and report.stopped:
            left_undone(session, report.stopped)
        outcome = finish(session) if final else None
        if outcome is not None:
            outcome.timings = timer.report(session.tracker, session.parent, f"study {spec.name}")
        return outcome


def train(session: Session, runner: Any, ex: Execution) -> Any:
    """The study's pending runs trained here, or by `ex.workers` workers of `runner` (the
    executor); their report (None when nothing was pending)."""
    pending = len(session.configs) - session.skipped
    workers = share_out(session, ex)
    if pending and (workers > 1 or not isinstance(runner, LocalPlan)):
        with phase("workers/start, then wait for them"):
            return supervise(session, runner.for_workers(workers), workers)
    if pending:
        if ex.threads:
            torch.set_num_threads(ex.threads)
        return work(session)
    return None


def share_out(session: Session, ex: Execution) -> int:
    """The workers the pending runs get (at most one a run), the engine and the size of
    each one's group (on the CPU by default one group per worker), and the parent run's
    tags that say so (on the CPU its layout too)."""
    pending = len(session.configs) - session.skipped
    session.wide_only = session.open_args["wide_only"] = ex.wide_only
    session.engine = session.open_args["engine"] = ex.engine
    session.fuse_k = session.open_args["fuse_k"] = ex.max_fuse if ex.fuse else 1  # a kept layout's K
    if ex.share_out:  # one group per worker
        session.fuse_k = session.open_args["fuse_k"] = group_size(pending, ex.workers, ex.max_fuse)
    session.threads = ex.threads
    tags = {TAG_FUSE: str(ex.fuse), TAG_WORKERS: str(ex.workers), TAG_THREADS: str(ex.threads or "")}
    if ex.on_cpu:
        tags.update(layout_tags(ex.layout))
    for key, value in tags.items():
        session.tracker.client.set_tag(session.parent, key, value)
    if pending:
        say_engine(session, ex.fuse)
    return max(1, min(ex.workers, pending))


def left_undone(session: Session, why: str) -> None:
    """Workers stopped before the end: Unfinished (exit status 1) when trials are left that
    no process takes, with the parent run ended; nothing when the rest runs elsewhere."""
    counts = session.counts()
    left = session.room(counts)
    if left <= 0:
        print(f"{session.kind.name} {session.spec.name}: {why}", flush=True)
        return
    message = (f"{session.kind.name} {session.spec.name}: {left} trial(s) left undone ({why}); "
               "run the same command to go on")
    pause_parent(session, "FAILED", message)
    raise Unfinished(message)


def _chosen(session: Session, trials: list[Any]) -> dict[str, Any]:
    """Per planned run, the trial that holds its outcome: the newest complete one, else the
    newest that ended at all."""

    chosen: dict[str, Any] = {}
    for t in sorted(trials, key=lambda t: t.number):
        key = t.user_attrs.get(ATTR_KEY)
        if key not in session.configs or t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if t.state == TrialState.COMPLETE or key not in chosen or chosen[key].state != TrialState.COMPLETE:
            chosen[key] = t
    return chosen


def _result(session: Session, key: str, trial: Any) -> tuple[TrialResult, str]:
    """A run's result, read back from its MLflow run (whoever trained it)."""
    run_id = trial.user_attrs.get(ATTR_MLFLOW_RUN_ID, "") if trial is not None else ""
    if run_id:
        try:
            return session.tracker.load_result(session.tracker.client.get_run(run_id)), run_id
        except Exception:  # a run that ended before it recorded a result (killed for good)
            pass
    reason = (trial.user_attrs.get(ATTR_REASON, "") if trial is not None else "") or "no result was recorded"
    return TrialResult(session.configs[key], status=FAILED, reason=reason), run_id


def finish(session: Session) -> StudyOutcome | None:
    """When every run has ended: `results/<study>/` from the runs' MLflow records, the
    statistics on the parent run, which is closed. Exactly one process does it; the others
    return None (and a finished study's results, up to date, are not written again)."""
    spec = session.spec
    with session.lock():
        trials = session.study.get_trials(deepcopy=False)
        counts = count_states(trials)
        chosen = _chosen(session, trials)
        if counts["RUNNING"] or counts["WAITING"]:
            print(f"study {spec.name}: {len(chosen)}/{session.target} runs ended, {counts['RUNNING']} running "
                  "elsewhere; the process that ends the study writes the results", flush=True)
            return None
        # the execution (its parent run) and the trial holding each run's outcome
        fingerprint = f"{session.parent}|" + ",".join(
            f"{k}:{chosen[k].number}" if k in chosen else f"{k}:-" for k in sorted(session.configs))
        why = claim_results(session, fingerprint)
    out_dir = session.out_dir
    files = [out_dir / "summary.csv", out_dir / "table.md", out_dir / "stats.csv"]
    if why and not (why.startswith("the results are up to date") and all(f.exists() for f in files)):
        print(f"study {spec.name}: all runs ended; {why}", flush=True)
        return None
    with phase("results/runs read back"):
        rows = collect_rows(session, chosen)
    outcome = StudyOutcome(spec, rows, session.parent, files, trained=len(session.configs) - session.skipped,
                           skipped=session.skipped)
    if not why:  # else up to date: the files are those of these very runs
        write(session, outcome, fingerprint)
    return outcome


def collect_rows(session: Session, chosen: dict[str, Any]) -> list[TrialRow]:
    """One row per planned trial, its result read back from MLflow (a shorter epoch count
    of a reused run: its record truncated)."""
    p = session.plan
    assert p is not None
    results = {key: _result(session, key, chosen.get(key)) for key in session.configs}
    c0 = p.runs[0]
    n_train = train_size(c0.dataset, val_size=c0.val_size, train_subset=c0.train_subset,
                         test_fraction=c0.test_fraction, root=session.data_root)
    rows = []
    for i, (trial, run_index) in enumerate(zip(p.trials, p.run_of)):
        run_cfg = p.runs[run_index]
        result, run_id = results[run_cfg.key()]
        if trial.epochs < run_cfg.epochs and result.history:
            result = truncate(result, trial.epochs, n_train)
        rows.append(TrialRow(i, trial, result, run_id))
    return rows


def write(session: Session, outcome: StudyOutcome, fingerprint: str) -> None:
    """The results written whole, on the parent run too, and the parent closed; a stop
    request meanwhile is raised after that. A folder that cannot be written stops the
    study (StorageError) with the parent run FAILED and the results claim left to retake."""
    spec, p = session.spec, session.plan
    assert p is not None
    c0 = p.runs[0]
    n_train = train_size(c0.dataset, val_size=c0.val_size, train_subset=c0.train_subset,
                         test_fraction=c0.test_fraction, root=session.data_root)
    device = sorted({r.result.device for r in outcome.rows if r.result.device})
    with interrupt.shielded():
        try:
            with phase("results/statistics, tables, figures"):
                outcome.files = write_results(spec, outcome.rows, session.out_dir, n_train=n_train,
                                              command=session.command, device=", ".join(device))
            tracker = session.tracker
            with phase("results/to MLflow"):
                tracker.log_artifacts(session.parent, outcome.files, "results")
                tracker.log_stats(session.parent, pd.read_csv(outcome.files[2]),
                                  list(spec.scientific) + list(spec.nuisance))
        except Exception as err:
            fault = storage_fault(err)
            if fault is None:
                raise
            raise StorageError(f"results of {spec.name} not written: {fault}") from err
        with session.lock():  # a worker joining now finds the execution going on or ended, never reopens it
            tracker.end(session.parent, "FINISHED" if not outcome.failed else "FAILED")
            results_written(session, fingerprint)
