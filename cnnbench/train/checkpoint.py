"""Checkpoints of a trial: what one holds (`checkpoint_payload`: the config, the engine's
state of the trial in SingleEngine's format, its schedule and its result so far), saved
atomically and read back with `torch.load(weights_only=True)` (so every leaf is a tensor or
a plain value, `plain`), and how a trial resumes from its last one (`resume_state`,
`restore_result`). Format "cnnbench-checkpoint-1".

The training loop does not wait for a checkpoint to be written (`hand_over`): the trial's
state is copied on its device (the engines' `trial_state` clones it there), and the
process's background writer (util/background.py) copies it off the device and writes it,
in order per trial; the loop waits for a trial's previous checkpoint before it hands
over the next, so that at most one copy per trial waits in memory.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from cnnbench.config.trial import TrialConfig
from cnnbench.train.engine import Engine
from cnnbench.train.graphs import CAPTURE_LOCK
from cnnbench.train.result import TrialResult
from cnnbench.train.schedule import LRSchedule
from cnnbench.util import fileio
from cnnbench.util.background import Ticket, writer


def checkpoint_payload(engine: Engine, k: int, config: TrialConfig, result: TrialResult, epoch: int,
                       schedule: LRSchedule) -> dict[str, Any]:
    """Trial k's checkpoint after `epoch` epochs: its config and key, the engine's state of it
    (SingleEngine's format), its schedule and what its result holds so far."""
    return plain({
        "format": "cnnbench-checkpoint-1", "config": config.to_dict(), "key": config.key(),
        "epoch": epoch, "torch": str(torch.__version__), **engine.trial_state(k),
        "schedule": schedule.state_dict(), "history": result.history, "curve": result.curve,
        "train_seconds": result.train_seconds, "images": result.images, "best_epoch": result.best_epoch,
    })


def plain(value: Any, where: str = "checkpoint") -> Any:
    """`value` with tensors kept and every other leaf a plain Python value (str, int, float,
    bool, None; dicts, lists and tuples of them), so that `torch.load(weights_only=True)`
    reads it back: a path, a device or a version becomes its text, a numpy scalar its
    number. Anything else is a TypeError naming where it sits (a checkpoint never holds code)."""
    if isinstance(value, Tensor) or value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {plain(k, where): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # numpy scalars and arrays
        return plain(value.tolist(), where)
    if isinstance(value, str):  # str subclasses: torch's TorchVersion, enums of str
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (os.PathLike, torch.device)):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} is not a tensor or a plain "
                    "Python value; store it as text or numbers")


def save_checkpoint(payload: dict[str, Any], path: Path) -> Path:
    """Written whole or not at all (see `write_bytes`)."""
    write_bytes(serialize(payload), [path])
    return path


def serialize(payload: dict[str, Any]) -> memoryview:
    """The payload as torch.save writes it, in memory."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getbuffer()


def write_bytes(data: memoryview, paths: list[Path]) -> None:
    """`data` written whole or not at all to each of `paths`. Serialised in memory first:
    torch's file writer turns a full disk into a RuntimeError without the path or the
    cause (inline_container.cc), where Python's own write raises the OSError that names both."""
    for path in paths:
        fileio.write_with(path, lambda tmp: tmp.write_bytes(data))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint read with `weights_only=True`: tensors and plain values, never code.
    Checkpoints written before cnnbench stored torch's version as text load too (a
    TorchVersion is a str); one holding anything else that is not allowed is a one-line
    ValueError naming it, not a silent fall back to unsafe unpickling."""
    from torch.torch_version import TorchVersion

    try:
        with torch.serialization.safe_globals([TorchVersion]):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = found.group(1) if found else " ".join(str(err).split())[:200]
        raise ValueError(f"{path}: holds {what}, which torch.load(weights_only=True) refuses; cnnbench "
                         "checkpoints hold tensors and plain values only (is it a cnnbench checkpoint?)") from None
    if not isinstance(payload, dict) or payload.get("format") != "cnnbench-checkpoint-1":
        raise ValueError(f"{path}: not a cnnbench checkpoint")
    return payload


def resume_state(ckpt_dir: Path | None, config: TrialConfig) -> dict[str, Any] | None:
    """The trial's last checkpoint (`ckpt_dir`/last.pt) when it is this trial's and readable, else None."""
    if ckpt_dir is None or not (ckpt_dir / "last.pt").exists():
        return None
    try:
        payload = load_checkpoint(ckpt_dir / "last.pt")
    except Exception:  # a checkpoint we cannot read is no checkpoint: start over
        return None
    return payload if payload.get("key") == config.key() else None


def resume_epoch(ckpt_dir: Path | None, config: TrialConfig) -> int:
    """Epochs already done according to the trial's last checkpoint (0 when none)."""
    state = resume_state(ckpt_dir, config)
    return int(state["epoch"]) if state else 0


def restore_result(result: TrialResult, state: dict[str, Any], ckpt_dir: Path) -> int:
    """`result` as the checkpoint `state` (read from `ckpt_dir`) left it; returns its epoch."""
    result.history, result.curve = list(state["history"]), [tuple(p) for p in state["curve"]]
    result.train_seconds, result.images = state["train_seconds"], state["images"]
    result.best_epoch = state["best_epoch"]
    result.final_checkpoint = ckpt_dir / "last.pt"
    result.best_checkpoint = ckpt_dir / "best.pt" if (ckpt_dir / "best.pt").exists() else None
    return int(state["epoch"])


class Snapshot(NamedTuple):
    """A checkpoint's payload as the training thread leaves it: its tensors copies on the
    training device, `ready` (CUDA) the event after which those copies are made."""
    payload: dict[str, Any]
    ready: Any


def snapshot(engine: Engine, k: int, config: TrialConfig, result: TrialResult, epoch: int,
             schedule: LRSchedule) -> Snapshot:
    """Trial k's checkpoint payload, taken in the training thread: its state copied on the
    device (queued there; no wait for the host), its record copied as plain values."""
    payload = checkpoint_payload(engine, k, config, result, epoch, schedule)
    device = next((t.device for t in tensors(payload) if t.is_cuda), None)
    ready = None
    if device is not None:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
    return Snapshot(payload, ready)


def tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def on_host(snap: Snapshot) -> dict[str, Any]:
    """The payload with every tensor on the CPU (the background writer's thread). On CUDA
    the copies wait for the snapshot's own event only, on a stream of their own, so that
    they never wait behind the training queued after it; and never while a training step
    is being captured as a CUDA graph (graphs.CAPTURE_LOCK): a copy off the device beside
    a capture broke both on an H200 ("operation not permitted when stream is capturing"
    here, the capture invalidated there), the next epoch's capture beginning as the last
    epoch's checkpoints were copied."""
    if snap.ready is None:
        return snap.payload
    device = next(t.device for t in tensors(snap.payload) if t.is_cuda)
    with CAPTURE_LOCK, torch.cuda.stream(copy_stream(device)):
        snap.ready.synchronize()
        return to_cpu(snap.payload)


@functools.cache
def copy_stream(device: torch.device) -> Any:
    """The stream on which the writer copies checkpoints off `device` (one per device)."""
    return torch.cuda.Stream(device=device)


def to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to("cpu")
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return value


def hand_over(engine: Engine, k: int, config: TrialConfig, result: TrialResult, epoch: int, schedule: LRSchedule,
              ckpt_dir: Path | None, is_best: bool) -> Ticket | None:
    """Trial k's checkpoints after `epoch`, handed to the background writer: last.pt
    always, best.pt when `is_best` (checkpoints best or all), epoch_NNN.pt with checkpoints
    all; none without a folder. The result names the files at once; they are written in
    the order handed over (the ticket says when)."""
    if ckpt_dir is None:
        return None
    snap = snapshot(engine, k, config, result, epoch, schedule)
    paths = [ckpt_dir / "last.pt"]
    result.final_checkpoint = paths[0]
    if is_best and config.checkpoints in ("best", "all"):
        paths.append(ckpt_dir / "best.pt")
        result.best_checkpoint = paths[-1]
    if config.checkpoints == "all":
        paths.append(ckpt_dir / f"epoch_{epoch:03d}.pt")
    return writer().submit(lambda: write_bytes(serialize(on_host(snap)), paths), "checkpoints")
