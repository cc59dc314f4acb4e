"""Where a study's workers run: processes on this machine (the default), Ray tasks on a
Ray cluster, Slurm array tasks through submitit. Each starts the same worker
(`workers.run_worker`) under the same supervisor (`run/pool.py`); `prepare` turns a
choice (a name, or settings.Local / Ray / Slurm) into the executor; `detached` tells an
executor that only submits its workers (Slurm with --no-wait)."""

from __future__ import annotations

from typing import Any

from cnnbench.run.executors.local import LocalPlan
from cnnbench.run.executors.settings import executor_settings


def prepare(choice: Any, *, threads: int | None = None, share_cores: bool = False) -> Any:
    """The executor of `choice`, ready for `check_stores(url, uri)` (before anything is
    created: Ray is connected) and `for_workers(n)`."""
    settings = executor_settings(choice)
    if settings.name == "ray":
        from cnnbench.run.executors.ray_cluster import RayTasks  # Ray takes seconds to import

        return RayTasks(settings)
    if settings.name == "slurm":
        from cnnbench.run.executors.slurm import SlurmTasks  # submitit: the slurm extra

        return SlurmTasks(settings)
    return LocalPlan(threads=threads, share_cores=share_cores)


def detached(runner: Any) -> bool:
    """Whether `runner` only submits its workers and returns (Slurm with --no-wait): the
    runner then neither watches them nor writes the results nor ends the parent run; the
    worker that ends the study does."""
    return not getattr(runner, "waits", True)
