"""Measured speeds of the two fused engines per device, the ground `fused.engine_for` stands on.

`cnnbench bench --engines` and gpu-check's engine sweep time vmap (fused.py) against the
wide engine (wide.py) through the training loop, per K, and `record_speeds` keeps what
they found in the state folder: `<state folder>/engine-speeds.json` (`CNNBENCH_HOME`,
else ./.cnnbench), one entry per (device name, torch major.minor, model, batch size, K,
threads on a CPU) with model-images/s per engine. `measured_engine` answers "which is
faster here" from the entry of the nearest K (on a log scale) measured for that device,
torch, model and batch size; None where nothing was measured. A study started after the
check (gpu-check runs its studies with the check's state folder) trains on the engine that
measured faster on that GPU.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from cnnbench.util import fileio
from cnnbench.util.paths import state_dir

FILE = "engine-speeds.json"
ENGINES = ("vmap", "wide")
KEY = ("device", "torch", "model", "batch_size", "k", "threads")


def speeds_file(folder: str | os.PathLike | None = None) -> Path:
    """Where the measurements live: `folder` (a state folder), else the state folder."""
    return state_dir(folder) / FILE


def torch_version() -> str:
    """major.minor: a patch release does not change which engine is faster."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def entry(device: str, model: str, batch_size: int, k: int, speeds: dict[str, float],
          threads: int | None = None) -> dict[str, Any]:
    """One measurement: model-images/s per engine name (vmap, wide) for this device and K
    (`threads`: torch's CPU threads, None on a GPU)."""
    return {"device": device, "torch": torch_version(), "model": model, "batch_size": int(batch_size), "k": int(k),
            "threads": threads, **{e: float(v) for e, v in speeds.items() if e in ENGINES}}


def load_speeds(path: Path) -> list[dict[str, Any]]:
    """The entries of `path`; none where it is missing or unreadable (a measurement is a
    hint: a damaged file must not stop a study)."""
    try:
        entries = json.loads(path.read_text()).get("entries", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in entries if isinstance(e, dict) and all(k in e for k in KEY)]


def record_speeds(entries: Iterable[dict[str, Any]], path: Path | None = None) -> Path:
    """Add `entries` (see `entry`) to the file, replacing earlier ones with the same key."""
    path = path or speeds_file()
    new = list(entries)
    keys = {tuple(e[k] for k in KEY) for e in new}
    kept = [e for e in load_speeds(path) if tuple(e[k] for k in KEY) not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_text(path, json.dumps({"entries": kept + new}, indent=1) + "\n")
    return path


def measured_engine(device: str, model: str, batch_size: int, k: int, *, threads: int | None = None,
                    path: Path | None = None) -> str | None:
    """The faster engine for K trials of `model` at `batch_size` on `device` (and torch
    major.minor, `threads`), from the measured K nearest to `k`; None where none was measured."""
    rows = [e for e in load_speeds(path or speeds_file())
            if (e["device"], e["torch"], e["model"], e["batch_size"], e["threads"]) ==
            (device, torch_version(), model, batch_size, threads) and all(finite(e.get(n)) for n in ENGINES)]
    if not rows or k < 2:
        return None
    nearest = min(rows, key=lambda e: (abs(math.log(e["k"]) - math.log(k)), -e["k"]))
    return max(ENGINES, key=lambda n: nearest[n])


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0
