"""How a study uses this machine: worker processes, threads per trial, fused or not, the
engine and the largest group, from the options given and, on the CPU, this machine's
calibration (train/calibration.py, measured by `cnnbench bench --calibrate`).

`execution` holds the defaults measured on a 2-core CPU, which a study keeps where no
calibration is cached; `decide` puts the options, the defaults and a calibrated `Layout`
together; `kept_layout` keeps a resumed study on the layout it started with, and
`layout_tags` records it on the study's parent run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, NamedTuple

from cnnbench.track.schema import TAG_CALIBRATION, TAG_CALIBRATION_KEY, TAG_CPU_LAYOUT
from cnnbench.train import calibration
from cnnbench.train.calibration import Layout
from cnnbench.train.device import resolve_device, usable_cores

NO_CALIBRATION = "none"  # TAG_CALIBRATION of a CPU study that ran with the defaults


class Execution(NamedTuple):
    """How a study runs here: fused or not, worker processes, threads per trial, whether
    only models that widen fuse, the fused engine preferred, the largest group, whether
    the pending trials are shared out as one group per worker (the CPU's default), and the
    calibrated CPU layout behind these (None: the defaults)."""
    fuse: bool
    workers: int
    threads: int | None
    wide_only: bool
    engine: str | None
    max_fuse: int
    share_out: bool
    on_cpu: bool
    layout: Layout | None


def decide(device: str, fuse: bool | None, workers: int | None, max_fuse: int, layout: Layout | None) -> Execution:
    """The study's execution on `device` from the options given (None: chosen here) and
    this machine's calibrated CPU `layout` (None: the defaults, `execution`). A layout
    gives, where the options leave them open, the workers and their threads, the engine
    (single: no fusing; wide or vmap preferred where the model allows) and the largest
    group (`max_k`); channels-last and the conv path it gives through `applied`."""
    on_cpu = resolve_device(device).type == "cpu"
    layout = layout if on_cpu else None
    fuse_given = fuse
    if layout is not None and fuse is None:
        fuse = layout.engine != "single"
    fuse, workers, threads = execution(device, fuse, workers, layout)
    engine = layout.engine if layout is not None and fuse and layout.engine != "single" else None
    share_out = on_cpu and fuse_given is None and fuse  # the CPU: one group per worker
    wide_only = share_out and (layout is None or layout.engine == "wide")  # vmap is slower than alone there
    return Execution(fuse, workers, threads, wide_only, engine,
                     min(max_fuse, layout.max_k) if layout is not None else max_fuse, share_out, on_cpu, layout)


def cpu_layout(device: str, state: str | os.PathLike | None, *, fast: bool = False,
               trials: int = 0) -> Layout | None:
    """This machine's calibrated layout for a study of `trials` trials on `device` (the
    `fast` one with `fast`, where the calibration has one; its workers and threads those
    measured fastest for that many trials, Calibration.for_trials): None off the CPU or
    where none is cached."""
    if resolve_device(device).type != "cpu":
        return None
    cal = calibration.load(state)
    if cal is None:
        return None
    return cal.for_trials((cal.fast or cal.layout) if fast else cal.layout, trials)


def kept_layout(session: Any, layout: Layout | None) -> Layout | None:
    """The layout the study started with, where its parent run recorded one (a study
    resumed after a new calibration keeps its own, so its trials keep their threads and
    kernels); else `layout`, announced."""
    recorded = session.tracker.client.get_run(session.parent).data.tags.get(TAG_CALIBRATION)
    kept = layout
    if recorded is not None:
        try:
            kept = None if recorded == NO_CALIBRATION else calibration.as_layout(json.loads(recorded))
        except (ValueError, KeyError, TypeError):
            kept = layout  # a tag written by hand: the current choice
    if kept != layout:
        print(f"study {session.spec.name}: keeps the CPU layout it started with "
              f"({kept.describe() if kept else 'the defaults'}), not {layout.describe() if layout else 'the defaults'}",
              flush=True)
    elif layout is not None:
        print(f"study {session.spec.name}: CPU layout of this machine's calibration: {layout.describe()}", flush=True)
    return kept


def layout_tags(layout: Layout | None) -> dict[str, str]:
    """The parent run's tags of a CPU study's layout (see track.schema)."""
    if layout is None:
        return {TAG_CPU_LAYOUT: "defaults", TAG_CALIBRATION: NO_CALIBRATION, TAG_CALIBRATION_KEY: ""}
    return {TAG_CPU_LAYOUT: layout.describe(), TAG_CALIBRATION: json.dumps(asdict(layout), sort_keys=True),
            TAG_CALIBRATION_KEY: calibration.machine_key(calibration.machine())}


def execution(device: str, fuse: bool | None, workers: int | None,
              layout: Layout | None = None) -> tuple[bool, int, int | None]:
    """(fuse, worker processes, threads per trial) for a study on `device`.

    Measured with `cnnbench bench` on a 2-core CPU: two single-thread worker processes
    beat one two-thread process by about 1.3x, and a wide group (wide.py) in each worker
    beats one trial per worker (see docs/speed.md), where vmap-fused trials
    are slower than one at a time; on an accelerator fusing is the point. So by default:
    on the CPU one worker per core, one thread each, each training a wide group of the
    trials whose model widens (calibration.group_size), every trial on its threads from start to end,
    so a study's numbers are the same bits however its workers' timing falls (with
    `share_cores`, a worker that runs out of work gives its core to those still training:
    run/cores.py); elsewhere fused groups in one process. A calibrated `layout` (CPU)
    gives the workers and their threads where `workers` is None."""
    on_cpu = resolve_device(device).type == "cpu"
    cores = usable_cores()
    fuse = True if fuse is None else fuse
    if on_cpu and layout is not None and workers in (None, layout.workers):
        return fuse, layout.workers, layout.threads
    workers = (cores if on_cpu else 1) if workers is None else workers
    return fuse, workers, max(1, cores // workers) if on_cpu else None
