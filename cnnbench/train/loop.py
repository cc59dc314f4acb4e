"""The training loop. Every entry point trains through `train_group` (or `run_trial`).

One loop serves one trial and K fused trials alike: it draws each epoch's batches from
the device-resident data, asks an *engine* (engine.Engine) for one optimisation step of
all K trials at once, records the training loss every `log_every` steps (against samples
seen) and the test (and validation) loss and accuracy after each epoch, stops a trial
that diverges or that its recorder prunes, and hands resumable epoch checkpoints
(checkpoint.py) and its recorders' writes to the process's background writer
(util/background.py), so that training never waits for the disk or a database. The
engines: `single.SingleEngine` (an nn.Module and a torch.optim optimizer),
`fused.FusedEngine` (K models stacked and vmapped), `wide.WideEngine` (K models as one
wide model). The loop reports through the `result.Recorder` interface and knows nothing
of MLflow or Optuna.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cnnbench.config.record import EPOCH, EPOCH_SECONDS, LR, SPLIT_KEYS, TEST_ACC, TRAIN_EPOCH_LOSS, VAL_ACC, VAL_LOSS
from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import DeviceData, data_dir, dataset_info, mix_seed
from cnnbench.errors import StorageError
from cnnbench.train.checkpoint import hand_over, load_checkpoint, restore_result, resume_state
from cnnbench.train.device import (RNG_LOCK, configure_backends, is_out_of_memory, resolve_device, sync,
                                   use_channels_last)
from cnnbench.train.engine import Engine
from cnnbench.train.fused import fused_engine
from cnnbench.train.graphs import StepGraph, graph_reason
from cnnbench.train.result import DIVERGED, FAILED, FINISHED, INTERRUPTED, PRUNED, Recorder, TrialResult
from cnnbench.train.schedule import LRSchedule
from cnnbench.train.single import SingleEngine
from cnnbench.util import interrupt, timings
from cnnbench.util.background import Ticket, writer
from cnnbench.util.faults import storage_fault


def run_trial(config: TrialConfig, *, data_root: str | os.PathLike | None = None,
              recorder: Recorder | None = None, checkpoint_dir: str | os.PathLike | None = None,
              data: DeviceData | None = None, evaluate_test: bool = True) -> TrialResult:
    """Train one trial; the result carries per-epoch metrics and the loss curve."""
    return train_group([config], data_root=data_root, recorders=[recorder or Recorder()],
                       checkpoint_dirs=[Path(checkpoint_dir)] if checkpoint_dir else None,
                       data=data, evaluate_test=evaluate_test)[0]


def load_data(config: TrialConfig, root: str | os.PathLike | None, device: torch.device) -> DeviceData:
    with timings.phase("start/data loaded"):
        return DeviceData.load(dataset=config.dataset, root=data_dir(root), device=device,
                               normalize=config.normalize, train_subset=config.train_subset,
                               test_subset=config.test_subset, val_size=config.val_size,
                               test_fraction=config.test_fraction,
                               channels_last=use_channels_last(config, device, dataset_info(config.dataset, root)))


def evaluate_checkpoint(checkpoint: str | os.PathLike | dict[str, Any], *, device: str = "auto",
                        data_root: str | os.PathLike | None = None,
                        test_batch_size: int = 1024) -> tuple[float, float, int]:
    """Re-test a checkpoint saved on any device (a path or a loaded payload) on `device`:
    (test loss, test accuracy in percent, test images)."""
    payload = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location="cpu")
    config = TrialConfig.from_dict({**payload["config"], "device": device, "test_batch_size": test_batch_size,
                                    "compile": "none"}, where=str(payload.get("key", "checkpoint")))
    dev = resolve_device(config.device)
    data = load_data(config, data_root, dev)
    engine = SingleEngine([config], dev, data.info)
    engine.load_trial_state(0, payload)
    engine.train(False)
    loss, acc = evaluate(engine, data, data.test, config.test_batch_size)
    return loss[0], acc[0], len(data.test)


def train_group(configs: Sequence[TrialConfig], *, data_root: str | os.PathLike | None = None,
                recorders: Sequence[Recorder] | None = None,
                checkpoint_dirs: Sequence[Path | None] | None = None,
                data: DeviceData | None = None, evaluate_test: bool = True,
                progress: Any = None, fused: bool | None = None, engine: str | None = None,
                wait: bool = True) -> list[TrialResult]:
    """Train `configs` together (they must be fusable, see fused.group_key) or one alone.

    `fused`: None trains K > 1 trials with the FusedEngine and one trial with the
    SingleEngine; True uses the FusedEngine even for one trial (the benchmark's K = 1).
    `engine`: which fused engine, "wide" (wide.WideEngine) or "vmap" (fused.FusedEngine);
    None: fused.engine_for's choice (where both can train the group: wide on the CPU, the
    one measured faster elsewhere, train/measured.py). `wait`: return once everything the
    group handed to the background writer is written (its checkpoints, what its recorders
    wrote); False: the caller drains the writer (run.trials: a trial's run ends while the
    next trial trains).

    Every trial's outcome is returned, failures included: an exception inside training
    (out of memory, say) marks the trials failed with the reason and does not propagate.
    KeyboardInterrupt marks them interrupted, tells the recorders and propagates.
    """
    configs = list(configs)
    k_trials = len(configs)
    recorders = list(recorders or [Recorder() for _ in configs])
    ckpt_dirs = list(checkpoint_dirs or [None] * k_trials)
    c0 = configs[0]
    wall0 = time.perf_counter()
    with timings.phase("start/device ready"):
        device = resolve_device(c0.device)
        configure_backends(c0, device)
    data = data or load_data(c0, data_root, device)
    results = [TrialResult(config=c, device=str(device), fused_with=k_trials) for c in configs]
    started = [False] * k_trials
    try:
        with interrupt.kept():  # a stop request that torch turned into another error is still one
            with timings.phase("group/build"):
                if k_trials == 1 and not fused:
                    trainer: Engine = SingleEngine(configs, device, data.info)
                else:
                    trainer = fused_engine(configs, device, data.info, engine)
            _fit(trainer, configs, data, recorders, ckpt_dirs, results, started, evaluate_test, progress)
    except KeyboardInterrupt as err:
        _end(results, recorders, started, INTERRUPTED, interrupt.reason(err), wall0, settle=wait)
        raise
    except Exception as err:  # out of memory, a bad device, a bug: the study goes on
        fault = storage_fault(err)
        if fault is not None:  # the machine's, not the trial's: the study stops (faults.py)
            with contextlib.suppress(Exception):  # the stores may be the ones that cannot be written
                _end(results, recorders, started, INTERRUPTED, fault, wall0, settle=wait)
            raise StorageError(fault) from err
        reason = f"out of memory: {err}" if is_out_of_memory(err) else f"{type(err).__name__}: {err}"
        traceback.print_exc()
        _end(results, recorders, started, FAILED, " ".join(reason.split())[:500], wall0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        _end(results, recorders, started, FINISHED, None, wall0)
    if wait:
        writer().drain()
    return results


def _end(results, recorders, started, status, reason, wall0, *, settle: bool = False) -> None:
    """Give every trial still running `status`, and tell each recorder once (a Ctrl-C
    meanwhile is held until every record is complete; with `settle`, until the background
    writer wrote them, any error of its kept quiet: the caller raises its own)."""
    with interrupt.shielded(), timings.phase("group/end runs"):
        _end_all(results, recorders, started, status, reason, wall0)
        if settle:
            writer().settle()


def _end_all(results, recorders, started, status, reason, wall0) -> None:
    for i, r in enumerate(results):
        if r.status == "running":
            r.status = status
            r.reason = reason or r.reason
        r.wall_seconds = time.perf_counter() - wall0
        if not started[i]:
            recorders[i].start(r.config, {"device": r.device, "fused_with": r.fused_with}, None)
            started[i] = True
        recorders[i].finish(r)


@dataclass
class Fit:
    """What one call of `_fit` shares between its stages: the group, its data and its
    per-trial state (schedules, results, which trials are still active)."""

    engine: Engine
    configs: list[TrialConfig]
    data: DeviceData
    recorders: Sequence[Recorder]
    ckpt_dirs: list[Path | None]
    results: list[TrialResult]
    schedules: list[LRSchedule]
    active: list[bool]
    streams: list[int]  # one batch order per distinct seed; trials that share a seed share it
    stream_index: Tensor  # trial -> its stream
    steps_per_epoch: int
    tickets: list[Ticket | None]  # each trial's last checkpoint handed to the background writer
    bar: Any = None

    @property
    def k(self) -> int:
        return len(self.configs)

    def stop(self, k: int, status: str, reason: str) -> None:
        _stop(self.engine, k, self.active, self.results, status, reason)


def _fit(engine: Engine, configs, data: DeviceData, recorders, ckpt_dirs, results, started, evaluate_test,
         progress) -> None:
    """Train the group's epochs: resume, then per epoch the steps and the epoch's end."""
    c0 = configs[0]
    steps_per_epoch = math.ceil(len(data.train) / c0.batch_size)
    seeds = [c.seed for c in configs]
    streams = sorted(set(seeds))
    fit = Fit(engine, list(configs), data, recorders, list(ckpt_dirs), results,
              [LRSchedule(c, steps_per_epoch) for c in configs], [True] * len(configs), streams,
              torch.tensor([streams.index(s) for s in seeds], device=data.device), steps_per_epoch,
              [None] * len(configs))
    with timings.phase("group/start runs"):
        start_epoch = _resume(fit, started)
    fit.bar = _progress_bar(c0, progress, total=(c0.epochs - start_epoch) * steps_per_epoch, k=fit.k)
    step_graph = _step_graph(fit)
    for epoch in range(start_epoch, c0.epochs):
        with timings.phase("group/training steps"):
            seconds, lr_rows, epoch_loss, step_graph = _train_epoch(fit, epoch, step_graph)
        if not any(fit.active):
            break
        _end_epoch(fit, epoch, seconds, lr_rows, epoch_loss, evaluate_test)
        if fit.bar is not None:
            fit.bar.set_postfix_str(_postfix(results, fit.active))
        if not any(fit.active):
            break
    if fit.bar is not None:
        fit.bar.close()
    writer().check()  # a write that failed fails the group as it would have in this thread


def _resume(fit: Fit, started: list[bool]) -> int:
    """Each trial's epoch checkpoint loaded (the caller groups trials that stopped at the
    same epoch) and its recorder started. Returns the epoch to start from."""
    start_epoch = 0
    for k, (c, d) in enumerate(zip(fit.configs, fit.ckpt_dirs)):
        state = resume_state(d, c)
        resumed = None
        if state:
            fit.engine.load_trial_state(k, state)
            fit.schedules[k].load_state_dict(state["schedule"])
            start_epoch = restore_result(fit.results[k], state, d)
            resumed = fit.results[k]
        with interrupt.shielded():  # the run is created and known, or not created
            fit.recorders[k].start(c, {"device": str(fit.data.device), "fused_with": fit.k,
                                       "steps_per_epoch": fit.steps_per_epoch}, resumed)
            started[k] = True
    return start_epoch


def _batch(fit: Fit, rows: list[Tensor], augmenters: list[Any] | None = None) -> tuple[Tensor, Tensor]:
    """The batch of image indices `rows` (one row per stream): (B, ...) when every trial
    shares one stream, (S, B, ...) for an engine that takes one per stream, else (K, B, ...),
    each trial its own stream's batch."""
    data = fit.data
    xs = [data.to_float(data.train.x[idx], augmenters[i] if augmenters else None) for i, idx in enumerate(rows)]
    ys = [data.train.y[idx] for idx in rows]
    if len(fit.streams) == 1:
        return xs[0], ys[0]
    if fit.engine.per_stream:  # each stream's batch once; the engine maps streams to trials
        return torch.stack(xs), torch.stack(ys)
    return torch.stack(xs)[fit.stream_index], torch.stack(ys)[fit.stream_index]


def _step_graph(fit: Fit) -> StepGraph | None:
    """A whole training step as a CUDA graph, where `graph_reason` finds nothing against it."""
    c0 = fit.configs[0]
    why_not = graph_reason(fit.configs, fit.engine, fit.data.device, fit.schedules[0].per_step())
    if why_not or len(fit.data.train) < c0.batch_size:
        return None
    return StepGraph(fit.engine, lambda index: _batch(fit, [index[i] for i in range(len(fit.streams))]),
                     len(fit.streams), c0.batch_size, fit.data.device)


def _train_epoch(fit: Fit, epoch: int, step_graph: StepGraph | None):
    """One epoch's steps: the training loss recorded every `log_every` steps (against
    samples seen), a trial whose loss is no longer finite stopped as diverged. Returns
    (seconds, the learning rates used, each trial's mean loss, the step graph)."""
    data, c0, engine = fit.data, fit.configs[0], fit.engine
    n_train, batch = len(data.train), c0.batch_size
    orders = [data.epoch_order(s, epoch) for s in fit.streams]
    augmenters = [data.augmenter(c0.augmentations(), s, epoch) for s in fit.streams]
    with RNG_LOCK:  # not while another group's model is seeded and built (side_by_side.py)
        torch.manual_seed(mix_seed(fit.configs[0].seed, epoch, 2))  # dropout
    lr_rows = [[fit.schedules[k].lr(epoch, step) if fit.active[k] else 0.0 for k in range(fit.k)]
               for step in range(fit.steps_per_epoch if fit.schedules[0].per_step() else 1)]
    engine.begin_epoch(lr_rows)
    engine.train(True)
    if step_graph is not None:
        order_rows = torch.stack(orders)  # streams x n_train
        try:
            with timings.phase("group/warm-up and capture"):
                step_graph.capture(order_rows[:, :batch])
        except Exception as err:  # the eager step computes the same: go on without graphs
            print(f"cnnbench: cuda_graphs: capture failed, training eagerly ({type(err).__name__}: "
                  f"{' '.join(str(err).split())[:300]})", file=sys.stderr)
            step_graph = None
    window = torch.zeros(fit.k, device=data.device)
    in_window, epoch_sum, epoch_steps = 0, [0.0] * fit.k, 0
    sync(data.device)
    t0 = time.perf_counter()
    for step in range(fit.steps_per_epoch):
        lo, hi = step * batch, min((step + 1) * batch, n_train)
        if step_graph is not None and hi - lo == batch:
            loss = step_graph.replay(order_rows[:, lo:hi])
        else:
            x, y = _batch(fit, [order[lo:hi] for order in orders], augmenters)
            loss = engine.train_step(x, y, step)
        window += loss
        in_window += 1
        if in_window == c0.log_every or step == fit.steps_per_epoch - 1:
            means = (window / in_window).tolist()  # the only host sync inside an epoch
            samples = epoch * n_train + hi
            for k in range(fit.k):
                if not fit.active[k]:
                    continue
                epoch_sum[k] += means[k] * in_window
                if not math.isfinite(means[k]):
                    fit.stop(k, DIVERGED, f"training loss became {means[k]} at {samples} samples (epoch {epoch + 1})")
                    continue
                fit.results[k].curve.append((samples, means[k]))
                fit.recorders[k].train_loss(samples, means[k])
            epoch_steps += in_window
            window.zero_()
            in_window = 0
            if not any(fit.active):
                break
        if fit.bar is not None:
            fit.bar.update(1)
    sync(data.device)
    return time.perf_counter() - t0, lr_rows, [s / max(epoch_steps, 1) for s in epoch_sum], step_graph


def _end_epoch(fit: Fit, epoch: int, seconds: float, lr_rows: list[list[float]], epoch_loss: list[float],
               evaluate_test: bool) -> None:
    """Evaluation, each trial's record, schedule, checkpoints and recorder (which may prune
    it); a trial with a non-finite number in its record stops as diverged."""
    data, c0 = fit.data, fit.configs[0]
    select = VAL_ACC if data.val is not None else TEST_ACC
    fit.engine.train(False)
    metrics: dict[str, list[float]] = {}
    for split_name, split in (("val", data.val), ("test", data.test if evaluate_test else None)):
        if split is not None:
            with timings.phase("group/evaluation"):
                loss_k, acc_k = evaluate(fit.engine, data, split, c0.test_batch_size)
            loss_key, acc_key = SPLIT_KEYS[split_name]
            metrics[loss_key], metrics[acc_key] = loss_k, acc_k
    for k in range(fit.k):
        if not fit.active[k]:
            continue
        r = fit.results[k]
        r.train_seconds += seconds
        r.images += len(data.train)
        record = {EPOCH: epoch + 1, TRAIN_EPOCH_LOSS: epoch_loss[k], LR: lr_rows[0][k], EPOCH_SECONDS: seconds,
                  **{name: values[k] for name, values in metrics.items()}}
        r.history.append(record)
        bad = [n for n, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            fit.stop(k, DIVERGED, f"{bad[0]} became {record[bad[0]]} at epoch {epoch + 1}")
            continue
        fit.schedules[k].end_epoch(record.get(VAL_LOSS, record[TRAIN_EPOCH_LOSS]))
        is_best = select in record and record[select] == r.best(select)[0] and r.best(select)[1] == epoch + 1
        if is_best:
            r.best_epoch = epoch + 1
        _hand_over_checkpoints(fit, k, epoch + 1, is_best)
        with interrupt.shielded(), timings.phase("group/recorders handed over"):
            verdict = fit.recorders[k].epoch(record)  # a Ctrl-C inside a database write would break the connection
        if verdict == "prune":
            fit.stop(k, PRUNED, f"pruned after epoch {epoch + 1}")


def _hand_over_checkpoints(fit: Fit, k: int, epoch: int, is_best: bool) -> None:
    """Trial k's checkpoints after `epoch` handed to the background writer, then its
    recorder's `checkpoint` (a cluster's shared copy of last.pt) as the writer's next job:
    it runs once the file is whole on disk, and not at all if writing it failed."""
    with timings.phase("group/checkpoints handed over"):
        writer().wait(fit.tickets[k])  # at most one snapshot per trial waits in memory
        fit.tickets[k] = hand_over(fit.engine, k, fit.configs[k], fit.results[k], epoch, fit.schedules[k],
                                   fit.ckpt_dirs[k], is_best)
        if fit.ckpt_dirs[k] is not None:
            writer().submit(functools.partial(fit.recorders[k].checkpoint, fit.ckpt_dirs[k] / "last.pt", epoch),
                            "checkpoints shared")


def _postfix(results: list[TrialResult], active: list[bool]) -> str:
    accs = [r.history[-1].get(TEST_ACC, r.history[-1].get(VAL_ACC)) for r, a in zip(results, active)
            if a and r.history]
    accs = [a for a in accs if a is not None]
    return f"acc {min(accs):.2f}..{max(accs):.2f}%" if len(accs) > 1 else (f"acc {accs[0]:.2f}%" if accs else "")


def _progress_bar(config: TrialConfig, progress: Any, total: int, k: int):
    if not config.progress or total <= 0:
        return None
    label = progress if isinstance(progress, str) else (f"{k} fused trials" if k > 1 else "trial")
    return tqdm(total=total, desc=label, unit="step", leave=False, dynamic_ncols=True)


def _stop(engine: Engine, k: int, active: list[bool], results: list[TrialResult], status: str, reason: str) -> None:
    active[k] = False
    engine.deactivate(k)
    results[k].status, results[k].reason = status, reason


@torch.no_grad()
def evaluate(engine: Engine, data: DeviceData, split, batch_size: int) -> tuple[list[float], list[float]]:
    """Mean loss and accuracy (percent) of every trial of `engine` on `split`, in batches of
    `batch_size` images, or of the engine's `eval_images` where that is smaller."""
    step = min(batch_size, engine.eval_images or batch_size)
    loss_sum = torch.zeros(engine.k, device=data.device)
    correct = torch.zeros(engine.k, device=data.device, dtype=torch.long)
    for lo in range(0, len(split), step):
        x = data.to_float(split.x[lo:lo + step])
        loss, right = engine.eval_batch(x, split.y[lo:lo + step])
        loss_sum += loss
        correct += right
    n = len(split)
    return (loss_sum / n).tolist(), (correct.double() * 100.0 / n).tolist()
