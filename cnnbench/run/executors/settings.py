"""How a study's workers are run (the settings a user gives), and the refusal of stores
that only this machine can reach when they run on other machines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cnnbench.errors import ConfigError
from cnnbench.util.text import masked


@dataclass(frozen=True)
class Local:
    """Worker processes on this machine (nothing to install)."""
    name = "local"


@dataclass(frozen=True)
class Ray:
    """Ray tasks on a Ray cluster: `address` "auto" (the cluster this machine belongs to,
    else a local Ray started for the run) or HOST:PORT / ray://HOST:PORT; each worker asks
    for `gpus_per_worker` GPUs (None: 1 where the cluster has GPUs, else 0) and
    `cpus_per_worker` CPUs (None: 1)."""
    address: str = "auto"
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    name = "ray"


@dataclass(frozen=True)
class Slurm:
    """Slurm array tasks through submitit: `partition`, `time` (minutes) and the GPUs and
    CPUs of each task; `sbatch` extra sbatch parameters (KEY=VALUE); `wait`: watch the
    tasks and write the results here (False: print the job and how to follow it);
    `folder`: submitit's logs, pickles and the tasks' progress (default: the state folder's
    slurm/; on a real cluster a folder every node reaches); `cluster`: "slurm", or "local"
    (submitit's local executor: the tasks as processes on this machine, no Slurm needed)."""
    partition: str | None = None
    time: int = 60
    gpus_per_worker: int | None = None
    cpus_per_worker: int = 1
    sbatch: tuple[str, ...] = field(default_factory=tuple)
    wait: bool = True
    folder: str | None = None
    cluster: str = "slurm"
    name = "slurm"


EXECUTORS = {"local": Local, "ray": Ray, "slurm": Slurm}


def executor_settings(choice: Any) -> Any:
    """A name ("local", "ray", "slurm") or settings, as settings; ConfigError otherwise."""
    if isinstance(choice, (Local, Ray, Slurm)):
        return choice
    if isinstance(choice, str) and choice in EXECUTORS:
        return EXECUTORS[choice]()
    raise ConfigError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {choice!r}")


def refuse_local_stores(where: str, *, storage: str, tracking: str) -> None:
    """With workers on other machines (`where` says which executor), a store only this
    machine can reach is a one-line ConfigError naming the option."""
    if storage.startswith("sqlite:"):
        raise ConfigError(f"--storage {storage}: a SQLite file only this machine can reach, but {where} runs "
                          "workers on other machines; give a postgresql:// storage every node can reach")
    shown = masked(tracking)
    if tracking.startswith(("sqlite:", "file:")) or "://" not in tracking:
        raise ConfigError(f"--tracking-uri {shown}: a store only this machine can reach, but {where} runs workers "
                          "on other machines; run an MLflow server with an artifact store every node can reach "
                          "(docs/many-machines.md) and give --tracking-uri http://...")
    if not tracking.startswith(("http://", "https://")):
        raise ConfigError(f"--tracking-uri {shown}: MLflow keeps artifacts (results, resume checkpoints) in a local "
                          f"folder for this store, but {where} runs workers on other machines; run an MLflow server "
                          "with an artifact store (docs/many-machines.md) and give --tracking-uri http://...")
