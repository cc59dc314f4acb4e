"""Groups side by side: fused groups that cannot fuse with one another (another batch
size, activation or model) train at the same time in one process, each on its own CUDA
stream, instead of one after another (issue 25).

One LeNet-5 group leaves most of an H100 idle (a few hundred small kernels per step, one
after another); several groups in flight at once fill more of it. Each group computes
what it computes alone: its own kernels, in its own order, on its own stream. Nothing is
shared between the groups of a wave but the data on the device (read only) and what is
process-wide, which `together_key` makes equal:
- CUDA only: on the CPU the cores are shared out over worker processes (run/), and
  groups there train one after another, as before;
- the backend settings (deterministic, cuDNN autotuning, TF32: flags that each
  `train_group` sets for the whole process) and the data set on the device;
- no draw from torch's global generator while training (no dropout) and no
  torch.compile (not thread-safe): a dropout mask must not depend on when another group
  reseeded the generator. Model initialisation does draw from it: `device.build_model`
  and the loop's per-epoch seed hold `device.RNG_LOCK`, so a model is seeded and built
  whole. Whole steps as CUDA graphs: each group captures on its own stream, one capture
  at a time (graphs.CAPTURE_LOCK).
cuDNN's autotuning (cudnn_benchmark) and conv_path's `auto` choose by timing, which the
other groups' load may sway: a choice may differ, and the numbers then differ by rounding,
as they may between two runs one after another (tests/test_cuda.py turns both off).

`plan` splits groups into waves of at most MAX_TOGETHER that may train together, order
kept; `run_together` trains one wave, a thread per group. A stop request (Ctrl-C,
SIGTERM: raised in the main thread) or a group's failure asks the other groups to stop at
their next logging point (`StopRecorder`: the loop then records them interrupted); it is
raised once every group has ended.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import DATASETS
from cnnbench.models.meta import on_meta
from cnnbench.train.device import build_model
from cnnbench.train.result import Recorder, TrialResult
from cnnbench.util.interrupt import Stop

T = TypeVar("T")
MAX_TOGETHER = 4  # groups in flight at once: LeNet-5's batch study has five
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_random_cache: dict[tuple, bool] = {}


def draws_random(config: TrialConfig) -> bool:
    """Does a training step of `config` draw from torch's global generator (dropout)?"""
    key = (config.model, config.activation, config.dataset, config.dropout)
    if key not in _random_cache:
        with on_meta():  # shapes only
            model = build_model(config, DATASETS[config.dataset])
        _random_cache[key] = any(isinstance(m, DROPOUTS) and m.p > 0 for m in model.modules())
    return _random_cache[key]


def together_key(config: TrialConfig, device_type: str) -> tuple | None:
    """What the groups of one wave share (see the module's docstring); None: this group
    trains alone."""
    if device_type != "cuda" or config.compile != "none" or draws_random(config):
        return None
    data = (config.dataset, config.normalize, config.train_subset, config.test_subset, config.val_size,
            config.channels_last, config.device)
    return (config.deterministic, config.cudnn_benchmark, config.tf32, data)


def plan(firsts: Sequence[TrialConfig], device_type: str, max_together: int = MAX_TOGETHER) -> list[list[int]]:
    """Indices of the groups (each given by its first trial's config), in waves that may
    train together: consecutive groups with one `together_key`, at most `max_together`."""
    waves: list[list[int]] = []
    current: list[int] = []
    current_key: tuple | None = None
    for i, config in enumerate(firsts):
        key = together_key(config, device_type)
        if current and (key is None or key != current_key or len(current) >= max_together):
            waves.append(current)
            current = []
        if key is None:
            waves.append([i])
            continue
        current_key = key
        current.append(i)
    return waves + ([current] if current else [])


class Wave:
    """One wave's stop request, which each group's recorders look at (StopRecorder)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def stop(self, signum: int | None = None) -> None:
        self.signum = self.signum or signum
        self.event.set()


class Stopped(Stop):
    """Raised in a group's thread when its wave stops (another group's stop or failure)."""


class StopRecorder(Recorder):
    """Passes every event to `inner`; at a logging point or an epoch's end of a stopped
    wave it raises `Stopped`, which the loop records as an interruption."""

    def __init__(self, inner: Recorder, wave: Wave) -> None:
        self.inner, self.wave = inner, wave

    def check(self) -> None:
        if self.wave.event.is_set():
            raise Stopped(*(s for s in (self.wave.signum,) if s))

    def start(self, config: TrialConfig, info: dict[str, Any], resumed: TrialResult | None) -> None:
        self.inner.start(config, info, resumed)

    def train_loss(self, samples: int, loss: float) -> None:
        self.inner.train_loss(samples, loss)
        self.check()

    def epoch(self, record: dict[str, float]) -> str | None:
        verdict = self.inner.epoch(record)
        self.check()
        return verdict

    def checkpoint(self, path: Any, epoch: int) -> None:
        self.inner.checkpoint(path, epoch)

    def finish(self, result: TrialResult) -> None:
        self.inner.finish(result)


@contextlib.contextmanager
def own_stream(device: torch.device) -> Iterator[None]:
    """On CUDA, a new stream for this thread's work, after what the device's current stream
    holds (the data, copied there); its work finished on leaving."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()


def run_together(tasks: Sequence[Callable[[Wave], T]], device: torch.device, *,
                 threads: bool | None = None) -> list[T]:
    """Each task's result, in order. `threads` (default: on CUDA): one thread per task, each
    on its own stream; else one task after another."""
    wave = Wave()
    if len(tasks) < 2 or not (device.type == "cuda" if threads is None else threads):
        return [task(wave) for task in tasks]

    def run(task: Callable[[Wave], T]) -> T:
        try:
            with own_stream(device):
                return task(wave)
        except BaseException:
            wave.stop()  # the others stop at their next logging point
            raise

    with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="cnnbench-group") as pool:
        futures = []
        try:  # a stop request while the groups are handed over stops those already started too
            futures.extend(pool.submit(run, task) for task in tasks)
            wait(futures)
        except KeyboardInterrupt as err:  # a stop request reaches the main thread only
            wave.stop(getattr(err, "signum", None))
            wait(futures)
            raise
    failures = [f.exception() for f in futures if f.exception() is not None]
    cause = next((e for e in failures if not isinstance(e, Stopped)), failures[0] if failures else None)
    if cause is not None:
        raise cause
    return [f.result() for f in futures]
