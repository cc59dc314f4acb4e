"""cnnbench: controlled hyperparameter studies of convolutional networks.

`import cnnbench` gives the Python API (`cnnbench.api`): load_spec, run_trial, run_study,
run_sweep, run_worker, evaluate, load_runs, statistics, summarize, register_model (your
own network), workers_kept (worker processes kept from one study to the next), and the
executors' settings Local, Ray, Slurm. They are imported on first use, so that `import
cnnbench` (and the command's start) stays light. The package's layers are drawn in
docs/layout.md.
"""

from __future__ import annotations

from typing import Any

from cnnbench.util import exiting  # noqa: F401 (first: its atexit handler must run after every other)

__version__ = "0.2.0"

API = ("evaluate", "load_runs", "load_spec", "register_model", "run_study", "run_sweep", "run_trial", "run_worker",
       "statistics", "summarize", "workers_kept", "Local", "Ray", "Slurm")
__all__ = [*API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in API:
        from cnnbench import api  # torch, MLflow, Optuna: imported when first used, not by `import cnnbench`

        return getattr(api, name)
    raise AttributeError(f"module 'cnnbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
