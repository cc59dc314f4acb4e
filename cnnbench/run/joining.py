"""`cnnbench worker SPEC`: a worker that joins a study or sweep by itself.

It opens (or creates: the order of starts does not matter) the study that SPEC, its
settings and `storage` name, claims and trains trials until nothing is left, and exits:
the same `workers.run_worker` that every executor runs, started by hand or by a cluster
engine (a Kubernetes Indexed Job's pods, a batch script), any number of times, on any
machine, and safe to SIGKILL at any moment (its trials are recovered by heartbeat). Its
resume checkpoints follow each trial to any node (checkpoint_share.py). With `final`,
the worker that ends the study writes its results (exactly one does). A pod of a
Kubernetes Indexed Job names itself after its index (JOB_COMPLETION_INDEX: w0, w1, ...).
"""

from __future__ import annotations

import os
from typing import Any

from cnnbench.config.space import plan
from cnnbench.config.spec import StudySpec
from cnnbench.run.final import finalize
from cnnbench.run.grid import GRID
from cnnbench.run.study import finish
from cnnbench.run.sweep import SWEEP, default_fuse_k
from cnnbench.run.workers import Ended, run_worker
from cnnbench.train.device import resolve_device, usable_cores

FUSE_K_CPU = 4  # a worker on a CPU claims up to this many study trials at once (a wide group)


def join_as_worker(spec: StudySpec, *, storage: str | None = None, tracking: str | None = None, state: Any = None,
                   results_root: Any = "results", data_root: Any = None, command: str = "",
                   max_fuse: int | None = None, threads: int | None = None, checkpoint_uri: str | None = None,
                   final: bool = False, label: str = "") -> Ended:
    """Join the study (a spec with a `scientific:` block) or sweep (only `search:`) and work
    until nothing is left; how it ended. `max_fuse`: trials claimed and trained at once
    (default: 16 on CUDA and MPS, FUSE_K_CPU on the CPU); `threads`: CPU threads (default:
    all usable cores)."""
    device = resolve_device(spec.base_config().device)
    on_cpu = device.type == "cpu"
    if spec.scientific:
        kind, p = GRID, plan(spec)
        fuse_k = max_fuse or (FUSE_K_CPU if on_cpu else default_fuse_k(spec.base_config().device))
    else:
        kind, p = SWEEP, None
        fuse_k = max_fuse or default_fuse_k(spec.base_config().device)
    open_args = dict(plan=p, storage=storage, tracking=tracking, state=state, results_root=results_root,
                     data_root=data_root, command=command, fuse_k=fuse_k, wide_only=on_cpu and kind is GRID,
                     role="worker", share_checkpoints=True, checkpoint_uri=checkpoint_uri, executor="worker")
    ending = (finish if kind is GRID else finalize) if final else None
    index = os.environ.get("JOB_COMPLETION_INDEX", "")  # set by Kubernetes for an Indexed Job's pods
    return run_worker(spec, kind, open_args, label=label or (f"w{index}" if index.isdigit() else "worker"),
                      threads=threads or (usable_cores() if on_cpu else None), on_session=ending)
