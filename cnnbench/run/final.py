"""The end of a sweep: the best trial trained again over `sweep.final_seeds`, each run
tested once with its best-validation checkpoint, the results written and the MLflow
parent run closed. Exactly one worker does it (a claim in the study's user attributes,
taken under the claim lock); runs that an interrupted ending finished are read back
from MLflow, and an ending already done for the same trials is not done again.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric
from optuna.trial import TrialState

from cnnbench.config.space import trial_config
from cnnbench.config.trial import TrialConfig
from cnnbench.report import sweep as sweep_report
from cnnbench.run.claims import claim_results, results_written
from cnnbench.run.session import Session, count_states
from cnnbench.run.trials import trial_data
from cnnbench.run.search import objective_value
from cnnbench.track.schema import (
    METRIC_BEST_ACC,
    METRIC_BEST_EPOCH,
    METRIC_BEST_TRIAL_NUMBER,
    METRIC_BEST_VALUE,
    METRIC_FINAL_N,
    METRIC_FINAL_TEST_ACC_MEAN,
    METRIC_FINAL_TEST_ACC_STD,
    METRIC_TRIALS_COMPLETE,
    METRIC_TRIALS_FAILED,
    METRIC_TRIALS_PRUNED,
    TAG_KEY,
    TAG_OPTUNA_STUDY,
    TAG_PHASE,
    TAG_SEARCHED,
    TAG_SEED,
    TAG_STATUS,
    TAG_TESTED,
    TAG_TRIAL,
    TEST_ACC,
    TEST_LOSS,
)
from cnnbench.track.writer import run_name
from cnnbench.train.checkpoint import load_checkpoint
from cnnbench.train.fused import fuse_groups
from cnnbench.train.loop import evaluate, train_group
from cnnbench.train.result import FINISHED, TrialResult
from cnnbench.train.single import SingleEngine
from cnnbench.util import timings

# ----------------------------------------------------------------------------------------
# the end: the best trial over seeds, tested once, and the results


@dataclass
class FinalRun:
    seed: int
    run_id: str
    status: str
    best_val: float  # the objective's metric at the best-validation epoch
    best_epoch: int
    test_acc: float  # of the best-validation checkpoint, measured once
    test_loss: float


@dataclass
class SweepOutcome:
    session: Session
    best: Any  # optuna FrozenTrial
    finals: list[FinalRun]
    files: list[Path]
    timings: str = ""  # with timings on: where the wall time went (util/timings.py's table)


def _fingerprint(session: Session) -> str:
    """What the results depend on: the trials, the final seeds."""
    assert session.spec.sweep is not None
    return f"{len(session.study.get_trials(deepcopy=False))} trials, seeds {list(session.spec.sweep.final_seeds)}"


def finalize(session: Session) -> SweepOutcome | None:
    """When every trial is done: re-run the best over the final seeds and write results.
    Exactly one worker does it; the others return None."""

    with session.lock():
        counts = count_states(session.study.get_trials(deepcopy=False))
        if not session.is_finished(counts) or counts["RUNNING"]:
            print(f"sweep {session.spec.name}: {counts['done']}/{session.target} trials done, {counts['RUNNING']} running "
                  "elsewhere; the worker that ends the sweep writes the results", flush=True)
            return None
        why = claim_results(session, _fingerprint(session))
    if why:
        print(f"sweep {session.spec.name}: all trials done; {why}", flush=True)
        return None
    complete = session.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = session.study.best_trial if complete else None
    finals = _final_runs(session, best) if best is not None else []
    with timings.phase("results/tables, figures"):
        files = sweep_report.write(session, best, finals)
    with timings.phase("results/to MLflow"):
        session.tracker.log_artifacts(session.parent, files, "results")
        with session.lock():  # a worker joining now finds the sweep going on or ended, never reopens it
            _close_parent(session, best, finals, counts)
            results_written(session, _fingerprint(session))
    return SweepOutcome(session, best, finals, files)


def _close_parent(session: Session, best: Any, finals: list[FinalRun], counts: dict[str, int]) -> None:

    ts = int(time.time() * 1000)
    metrics = {METRIC_TRIALS_COMPLETE: counts["COMPLETE"], METRIC_TRIALS_PRUNED: counts["PRUNED"],
               METRIC_TRIALS_FAILED: counts["FAIL"]}
    if best is not None:
        metrics[METRIC_BEST_VALUE] = best.value
        metrics[METRIC_BEST_TRIAL_NUMBER] = best.number
    accs = [f.test_acc for f in finals if math.isfinite(f.test_acc)]
    if accs:
        metrics[METRIC_FINAL_TEST_ACC_MEAN] = statistics.fmean(accs)
        metrics[METRIC_FINAL_N] = len(accs)
        if len(accs) > 1:
            metrics[METRIC_FINAL_TEST_ACC_STD] = statistics.stdev(accs)
    session.tracker.client.log_batch(session.parent, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()],
                                   synchronous=True)
    ok = best is not None and all(f.status == FINISHED for f in finals)
    session.tracker.end(session.parent, "FINISHED" if ok else "FAILED")


def _final_runs(session: Session, best: Any) -> list[FinalRun]:
    """The best trial's config over the final seeds, trained with the same validation
    split and tested once, with the best-validation checkpoint. Runs already finished
    (an earlier, interrupted finalisation) are read back from MLflow."""

    spec, s = session.spec, session.spec.sweep
    assert s is not None
    names = [d.name for d in spec.search]
    configs = [trial_config(spec, best.params, seed) for seed in s.final_seeds]
    session.tracker.close_orphans("the process running it died", keep=(session.parent,))
    done: dict[str, FinalRun] = {}
    for run in session.tracker.trial_runs(parent=session.parent, extra=f"tags.`{TAG_PHASE}` = 'final'"):
        m, key = run.data.metrics, run.data.tags.get(TAG_KEY)
        if run.info.status in ("FINISHED", "FAILED") and TEST_ACC in m and key and key not in done:
            done[key] = FinalRun(int(run.data.tags.get(TAG_SEED, -1)), run.info.run_id,
                                 run.data.tags.get(TAG_STATUS, ""),
                                 m.get(METRIC_BEST_ACC, math.nan), int(m.get(METRIC_BEST_EPOCH, 0)), m[TEST_ACC],
                                 m.get(TEST_LOSS, math.nan))
    pending = [c for c in configs if c.key() not in done]
    ckpt_root = session.ckpt_root / "final"
    data_cache: dict[tuple, Any] = {}
    for idx in fuse_groups(pending, root=session.data_root):
        group = [pending[i] for i in idx]
        recorders = [session.tracker.recorder(c, parent=session.parent, name=f"final: {run_name(c, names)}",
                                            tags={TAG_PHASE: "final", TAG_TRIAL: str(best.number),
                                                  TAG_OPTUNA_STUDY: spec.name, TAG_SEARCHED: ",".join(names)})
                     for c in group]
        data = trial_data(session, group[0], data_cache)
        results = train_group(group, recorders=recorders, data=data, evaluate_test=False,
                              checkpoint_dirs=[ckpt_root / c.key() for c in group],
                              progress=f"final: best trial {best.number}, seeds {','.join(str(c.seed) for c in group)}")
        for c, r, rec in zip(group, results, recorders):
            done[c.key()] = _test_once(session, c, r, rec.run_id or "", data)
            shutil.rmtree(ckpt_root / c.key(), ignore_errors=True)
    return [done[c.key()] for c in configs]


def _test_once(session: Session, config: TrialConfig, result: TrialResult, run_id: str, data: Any) -> FinalRun:
    """The test set, read once: the best-validation checkpoint's loss and accuracy."""

    assert session.spec.sweep is not None
    best_val, best_epoch = objective_value(result, session.spec.sweep.objective), result.best_epoch
    path = result.best_checkpoint or result.final_checkpoint
    test_loss = test_acc = math.nan
    if path is not None and Path(path).exists():
        payload = load_checkpoint(path, map_location=data.device)
        engine = SingleEngine([config], data.device, data.info)
        engine.load_trial_state(0, payload)
        engine.train(False)
        with torch.no_grad():
            (test_loss,), (test_acc,) = evaluate(engine, data, data.test, config.test_batch_size)
        best_epoch = int(payload["epoch"])
        if run_id:
            client = session.tracker.client
            client.log_metric(run_id, TEST_ACC, test_acc, step=best_epoch)
            client.log_metric(run_id, TEST_LOSS, test_loss, step=best_epoch)
            client.set_tag(run_id, TAG_TESTED, f"once, with the best-validation checkpoint (epoch {best_epoch})")
    return FinalRun(config.seed, run_id, result.status, best_val, int(best_epoch or 0), test_acc, test_loss)


