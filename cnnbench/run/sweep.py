"""Optuna sweeps: find the best settings over a spec's `search:` space.

A sweep is an Optuna study, run by the one engine (`run.engine`) that runs grid studies
too: the space and its `trial.suggest_*` calls are `config.space`'s, the sampler, pruner
and pruning recorder `run.search`'s. Tuning never reads the test set: the objective is
the best validation score over epochs, on the fixed, seeded split that `val_size` holds
out of the training set. At the end (`run.final`) the best trial is trained again over
`sweep.final_seeds` and tested once, and `results/<sweep>/` is written.
"""

from __future__ import annotations

from typing import Any

from cnnbench.config.spec import StudySpec
from cnnbench.run.engine import launch_workers, open_sweep, pause_parent, work
from cnnbench.run.final import finalize
from cnnbench.train.device import resolve_device, usable_cores
from cnnbench.util import interrupt


def run_sweep(spec: StudySpec, *, workers: int = 1, final: bool = True, share_cores: bool = False,
              **kwargs: Any) -> tuple[Any, Any, Any]:
    """Open (or join) the sweep, train trials here (or in `workers` processes), and
    finish it when this is the process that ends it. Returns (session, report, outcome);
    the outcome is None where another process writes the results. `share_cores`: as
    for a study (study.run_study)."""
    sweep = open_sweep(spec, **kwargs)
    try:
        if workers > 1:
            # on the CPU the workers share the cores: N workers with every core each spend their
            # time waiting for each other's threads (measured: 6x slower for LeNet with 2 on 2)
            on_cpu = resolve_device(spec.base_config().device).type == "cpu"
            report = launch_workers(sweep, workers, threads=max(1, usable_cores() // workers) if on_cpu else None,
                                    share_cores=share_cores)
        else:
            report = work(sweep)
        if report.stopped:
            return sweep, report, None
        return sweep, report, finalize(sweep) if final else None
    except KeyboardInterrupt:
        with interrupt.shielded():
            pause_parent(sweep)
        raise
