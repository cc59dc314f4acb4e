"""The CPU layout measured fastest on this machine: its home, its cache and how it applies.

`cnnbench bench --calibrate` (tools/bench/calibrate.py) times the ways a study can use this
CPU (worker processes x threads, the engine and its group size K, channels-last or not,
the grouped convolutions' path) and saves the fastest as a `Calibration`, a JSON file in
the state folder's `calibration/`, named by the machine's key: the CPU model, its flags,
torch's version and the usable cores (`machine`, `machine_key`). A new CPU, torch or core
count is another key, so a stale choice is never read; a file that cannot be read, or
whose machine is not this one, is ignored (`load` returns None, the bench measures again).

A study on the CPU reads the cached choice once, in the process that leads it
(run/study.py), and applies it to its workers: their count, threads, engine and K as
arguments, channels-last and the conv path through the environment that the worker
processes inherit (`applied`). No cache: the defaults of before, unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from cnnbench.train.conv_path import ENV as CONV_PATH_ENV, PATHS as CONV_PATHS
from cnnbench.train.device import CHANNELS_LAST_ENV, usable_cores
from cnnbench.util import fileio
from cnnbench.util.environ import variables
from cnnbench.util.paths import state_dir

# of the file's format and what it measured: a file of another version is measured again
# (2: measured with the allocator keeping freed memory, util/host_memory.py, which moved one
# worker of two threads from 0.74x two single-thread workers to 1.07x on a 2-core EPYC;
# 3: the process stage's rounds kept, longer and more of them, fastest_processes;
# 4: the bf16 stage also measures the grouped convolutions in fp32, conv path "grouped-fp32")
VERSION = 4
ENGINES = ("wide", "vmap", "single")
# flags of x86 matrix units that run bf16 products natively (Intel AMX; AVX-512's bf16
# dot products on Intel Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later)
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


@dataclass(frozen=True)
class Layout:
    """How a study uses the CPU: `workers` processes of `threads` threads, each training
    groups of at most `max_k` trials with `engine` ("single": one trial at a time),
    channels-last or not, grouped convolutions through `conv_path` ("grouped", "bmm", or, in
    a bf16 layout, "grouped-fp32": train/conv_path.py)."""
    workers: int
    threads: int
    engine: str
    max_k: int
    channels_last: bool
    conv_path: str

    def describe(self) -> str:
        group = "one trial at a time" if self.engine == "single" else f"{self.engine} groups of up to {self.max_k}"
        return (f"{self.workers} worker(s) x {self.threads} thread(s), {group}, "
                f"{'channels-last' if self.channels_last else 'channels-first'}, conv path {self.conv_path}")


@dataclass
class Calibration:
    """A measured choice: the machine it was measured on, the `layout` chosen (fp32), the
    `fast` layout (bf16, where the CPU has matrix units; None elsewhere), every figure
    measured (rows of `{"stage", "layout", "model_images_per_s", ...}`) and a note on bf16."""
    machine: dict[str, Any]
    layout: Layout
    fast: Layout | None = None
    figures: list[dict[str, Any]] = field(default_factory=list)
    bf16: str = ""
    seconds: float = 0.0  # how long the measurement took
    load: tuple[float, float] = (0.0, 0.0)  # the machine's load average before and after
    version: int = VERSION
    # the worker layouts measured, each training its share of `trials` at once:
    # {"workers", "threads", "trials", "model_images_per_s" (the median), "rounds" (each
    # interleaved round's rate)}: fastest_processes sizes a study by them
    processes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return machine_key(self.machine)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        """ValueError (or KeyError, TypeError) when `text` is not a calibration of this version."""
        raw = json.loads(text)
        if raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version')!r}, not {VERSION}")
        layout, fast = as_layout(raw["layout"]), raw.get("fast")
        return cls(machine=dict(raw["machine"]), layout=layout, fast=as_layout(fast) if fast else None,
                   figures=list(raw.get("figures", [])), bf16=str(raw.get("bf16", "")),
                   seconds=float(raw.get("seconds", 0.0)), load=tuple(raw.get("load", (0.0, 0.0))),
                   processes=[{"workers": int(p["workers"]), "threads": int(p["threads"]), "trials": int(p["trials"]),
                               "model_images_per_s": float(p["model_images_per_s"]),
                               "rounds": [float(r) for r in p.get("rounds", [])]}
                              for p in raw.get("processes", [])])

    def for_trials(self, layout: Layout, trials: int) -> Layout:
        """`layout` (this calibration's, or its fast one) with the worker processes and
        threads `fastest_processes` picks for a study of `trials` trials from the process
        stage; `layout` itself where fewer than two layouts were measured."""
        best = fastest_processes(self.processes, trials, layout.max_k)
        return layout if best is None else replace(layout, workers=best["workers"], threads=best["threads"])


def fastest_processes(rows: list[dict[str, Any]], trials: int, max_k: int) -> dict[str, Any] | None:
    """The worker layout (a row of `Calibration.processes`) a study of `trials` trials in
    groups of at most `max_k` gets: of the rows measured for the trial count nearest
    `trials` (the process stage measures 5 and 15), each round's rate rescaled from how
    evenly its workers shared those trials to how evenly they share these (`balance`).

    One thread per worker (the most workers: the layout of an uncalibrated study, whose
    numbers it keeps) unless another layout is faster by its median AND in more than two
    thirds of the interleaved rounds, each round compared with the same round of the one-
    thread layout (measured moments apart, so under the same load). Why: on a 2-core EPYC
    two calibrations measured the 15-trial shape as 64,355 (2 x 1) against 51,051 (1 x 2)
    and 52,335 against 54,461, medians of 3 rounds, while the 3-seed lr study (15 trials)
    took 205.0 s with 2 x 1 and 243.2 s with 1 x 2: a median alone let the machine's noise
    pick the slower layout. None where fewer than two layouts were measured for that count."""
    if trials < 1:
        return None
    nearest = min({p["trials"] for p in rows}, key=lambda n: (abs(math.log(n / trials)), n), default=0)
    measured = [p for p in rows if p["trials"] == nearest]
    if len(measured) < 2:
        return None

    def predicted(p: dict[str, Any]) -> list[float]:
        scale = balance(trials, p["workers"], max_k) / balance(p["trials"], p["workers"], max_k)
        return [r * scale for r in (p.get("rounds") or [p["model_images_per_s"]])]

    rates = {i: predicted(p) for i, p in enumerate(measured)}
    default = max(range(len(measured)), key=lambda i: (measured[i]["threads"] == 1, measured[i]["workers"]))
    best = max(rates, key=lambda i: statistics.median(rates[i]))
    if best != default:
        pairs = list(zip(rates[best], rates[default]))
        wins = sum(b > d for b, d in pairs)
        if statistics.median(rates[best]) <= statistics.median(rates[default]) or wins * 3 <= len(pairs) * 2:
            best = default
    return measured[best]


def group_size(trials: int, workers: int, max_k: int) -> int:
    """The largest group a worker trains when `workers` workers share `trials` trials in
    groups of at most `max_k`: the trials shared out evenly, so that every worker has a
    group (5 trials on 2 workers: groups of 3 and 2)."""
    return max(1, min(max_k, math.ceil(trials / max(1, workers))))


def first_groups(trials: int, workers: int, max_k: int) -> list[int]:
    """The groups `workers` workers train at once when `trials` trials are shared out
    (`group_size`; 5 on 2 workers: [3, 2])."""
    k = group_size(trials, workers, max_k)
    sizes, left = [], trials
    for _ in range(workers):
        sizes.append(max(1, min(k, left)))
        left -= sizes[-1]
    return sizes


def balance(trials: int, workers: int, max_k: int) -> float:
    """How evenly `workers` workers share `trials` trials in groups of `group_size`, each
    worker claiming the next group: the trials over the workers times the most trials one
    worker trains; 1 even."""
    k = group_size(trials, workers, max_k)
    groups = math.ceil(trials / k)
    most = min(trials, math.ceil(groups / workers) * k)
    return trials / (workers * most)


def as_layout(raw: dict[str, Any]) -> Layout:
    """A Layout from its JSON, checked (ValueError where a field is off)."""
    layout = Layout(workers=int(raw["workers"]), threads=int(raw["threads"]), engine=str(raw["engine"]),
                    max_k=int(raw["max_k"]), channels_last=bool(raw["channels_last"]), conv_path=str(raw["conv_path"]))
    if layout.engine not in ENGINES or layout.conv_path not in CONV_PATHS or \
            min(layout.workers, layout.threads, layout.max_k) < 1:
        raise ValueError(f"not a layout: {raw}")
    return layout


def cpu_info(path: str | os.PathLike = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """(the CPU's model name, its flags) from /proc/cpuinfo's first processor; elsewhere
    (macOS, say) the platform's processor and no flags."""
    model, flags = "", []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name" and not model:
                model = value.strip()
            elif name in ("flags", "Features") and not flags:  # x86, Arm
                flags = sorted(value.split())
            if model and flags:
                break
    return model or platform.processor() or platform.machine(), flags


def machine(cores: int | None = None) -> dict[str, Any]:
    """What a calibration holds for: the CPU model, its flags, torch's version, the cores."""
    model, flags = cpu_info()
    return {"cpu": model, "flags": flags, "torch": torch.__version__,
            "cores": usable_cores() if cores is None else cores, "arch": platform.machine()}


def machine_key(m: dict[str, Any]) -> str:
    """The cache key of machine `m`: a hash of its CPU model, flags, torch and cores."""
    blob = json.dumps({k: m.get(k) for k in ("cpu", "flags", "torch", "cores", "arch")}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def matrix_units(m: dict[str, Any]) -> list[str]:
    """The bf16 matrix units machine `m` has: its AMX / AVX-512-BF16 flags, or "apple" on
    Apple silicon (whose AMX-like units torch reaches through Accelerate)."""
    if m.get("arch") == "arm64" and platform.system() == "Darwin":
        return ["apple"]
    return [f for f in BF16_FLAGS if f in m.get("flags", [])]


def cpu_kind(m: dict[str, Any]) -> str:
    """A file-name-safe name of machine `m`'s kind: its CPU model and widest vector or
    matrix unit (`amd-epyc-avx512bf16`, `intel-xeon-platinum-8480-amx`)."""
    flags = set(m.get("flags", []))
    unit = next((name for flag, name in (("amx_tile", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"),
                                         ("avx2", "avx2")) if flag in flags), m.get("arch", "") or "cpu")
    model = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", " ", str(m.get("cpu", "")).lower())
    slug = "-".join(re.findall(r"[a-z0-9]+", model))[:48].strip("-")
    return f"{slug or 'cpu'}-{unit}"


def cache_path(state: str | os.PathLike | None = None, m: dict[str, Any] | None = None) -> Path:
    """The calibration file of machine `m` (this one by default) in the state folder."""
    return state_dir(state) / "calibration" / f"{machine_key(m or machine())}.json"


def load(state: str | os.PathLike | None = None, m: dict[str, Any] | None = None) -> Calibration | None:
    """This machine's cached calibration; None when there is none, or the file is damaged,
    of another version or of another machine (it is then measured again, not trusted)."""
    m = m or machine()
    path = cache_path(state, m)
    try:
        cal = Calibration.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"calibration {path}: ignored ({type(err).__name__}: {err}); it is measured again", flush=True)
        return None
    if cal.key != machine_key(m):
        print(f"calibration {path}: ignored (measured on another machine: {cal.machine.get('cpu')}, "
              f"torch {cal.machine.get('torch')}, {cal.machine.get('cores')} cores)", flush=True)
        return None
    return cal


def save(cal: Calibration, state: str | os.PathLike | None = None) -> Path:
    """Write `cal` (whole or not at all) where `load` finds it; its path."""
    path = cache_path(state, cal.machine)
    fileio.write_text(path, cal.to_json() + "\n")
    return path


@contextlib.contextmanager
def applied(layout: Layout | None) -> Iterator[None]:
    """Within: this process and the worker processes it starts use `layout`'s channels-last
    and conv path (environment variables, which a user's own settings of them override);
    nothing changes for None."""
    if layout is None:
        yield
        return
    wanted = {CHANNELS_LAST_ENV: "1" if layout.channels_last else "0", CONV_PATH_ENV: layout.conv_path}
    with variables(wanted, keep_set=True):
        yield
