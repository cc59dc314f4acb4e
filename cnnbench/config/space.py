"""The search space: a spec's `search:` block as a grid (`grid_points`) or as Optuna's
`trial.suggest_*` calls (`suggest`), the one place where either is written, and the trial
settings a point of it makes (`trial_config`)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from cnnbench.config.record import VAL_ACC, VAL_LOSS
from cnnbench.config.spec import SearchDim, StudySpec
from cnnbench.config.trial import TrialConfig
from cnnbench.errors import ConfigError

OBJECTIVES = {"val_acc": VAL_ACC, "val_loss": VAL_LOSS}  # spec name -> per-epoch metric
DIRECTION_OF = {"val_acc": "maximize", "val_loss": "minimize"}
GRID_LIMIT = 10_000



def check_spec(spec: StudySpec) -> None:
    """What a sweep needs beyond what load_spec checks."""
    if not spec.search or spec.sweep is None:
        raise ConfigError(f"{spec.path}: search: a sweep needs a non-empty search block "
                          "(a spec with only a scientific block is run by `cnnbench study`)")
    s = spec.sweep
    if s.direction != DIRECTION_OF[s.objective]:
        raise ConfigError(f"{spec.path}: sweep.direction: objective {s.objective} is "
                          f"{DIRECTION_OF[s.objective]}d, got direction {s.direction}")
    base = spec.base_config()
    if base.val_size <= 0:
        raise ConfigError(f"{spec.path}: fixed.val_size: a sweep is scored on a validation split held out of the "
                          "training set, never on the test set; set val_size (e.g. 10000 for MNIST)")
    for dim in spec.search:
        if dim.name in spec.fixed:
            raise ConfigError(f"{spec.path}: fixed.{dim.name}: also searched; remove one of the two")
        if dim.name == "seed":
            raise ConfigError(f"{spec.path}: search.seed: the seed is not a hyperparameter; the best trial is "
                              "repeated over sweep.final_seeds")
        # every end of every range, with the fixed settings, must make a valid trial
        for value in (dim.choices if dim.type == "categorical" else _ends(dim)):
            TrialConfig.from_dict({**spec.fixed, dim.name: value}, where=f"{spec.path}: search.{dim.name}")
    if s.sampler == "grid":
        grid_points(spec)


def _ends(dim: SearchDim) -> tuple[Any, ...]:
    assert dim.low is not None and dim.high is not None
    return (int(dim.low), int(dim.high)) if dim.type == "int" else (dim.low, dim.high)


def grid_values(dim: SearchDim, where: str = "") -> list[Any]:
    """The values a grid takes along one dimension: its choices, or its stepped range."""
    if dim.type == "categorical":
        return list(dim.choices)
    assert dim.low is not None and dim.high is not None
    if dim.type == "int":
        step = int(dim.step or 1)
        return list(range(int(dim.low), int(dim.high) + 1, step))
    if dim.step is None:
        raise ConfigError(f"{where}search.{dim.name}: a grid needs a step for a float range (or a list of choices)")
    n = int(math.floor((dim.high - dim.low) / dim.step + 1e-9)) + 1
    return [round(dim.low + i * dim.step, 12) for i in range(n)]


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    values = [grid_values(d, f"{spec.path}: ") for d in spec.search]
    size = math.prod(len(v) for v in values)
    if size > GRID_LIMIT:
        raise ConfigError(f"{spec.path}: search: the grid has {size} points (more than {GRID_LIMIT}); "
                          "use a coarser step or another sampler")
    names = [d.name for d in spec.search]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def suggest(trial: Any, spec: StudySpec) -> dict[str, Any]:
    """The one translation of `spec.search` into Optuna: name -> suggested value."""
    out: dict[str, Any] = {}
    for d in spec.search:
        if d.type == "categorical":
            out[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.type == "int":
            out[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            out[d.name] = trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)
    return out


def trial_config(spec: StudySpec, params: dict[str, Any], seed: int | None = None) -> TrialConfig:
    """The fixed settings, the suggested values and the seed (the spec's first by default)."""
    values = {**spec.fixed, **params, "seed": spec.seeds[0] if seed is None else seed}
    return TrialConfig.from_dict(values, where=f"{spec.path}: trial")


def with_overrides(spec: StudySpec, overrides: dict[str, Any]) -> StudySpec:
    """`--set` changes fixed settings; a searched one cannot be fixed this way."""
    searched = {d.name for d in spec.search}
    for key in overrides:
        if key in searched:
            raise ConfigError(f"--set {key}: {key} is searched by sweep {spec.name}; edit {spec.path} to change its range")
        if key == "seed":
            raise ConfigError("--set seed: a sweep's trials use the spec's first seed; the best one is repeated "
                              "over sweep.final_seeds")
    if not overrides:
        return spec
    fixed = {**spec.fixed, **overrides}
    TrialConfig.from_dict(fixed, where="--set")
    return dataclasses.replace(spec, fixed=fixed)


def spec_hash(spec: StudySpec) -> str:
    """What the stored trials depend on: the space, the fixed settings (not the runtime
    ones: device, progress...), the objective. Sampler, pruner, n_trials and final seeds
    may change between runs of a sweep."""
    s = spec.sweep
    assert s is not None
    identity = {"search": [dataclasses.asdict(d) for d in spec.search], "fixed": spec.base_config().identity(),
                "seed": spec.seeds[0], "objective": s.objective, "direction": s.direction}
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe(d: SearchDim) -> str:
    """One search dimension as a reader writes it: `{a, b}` or `float [0.001, 0.1] log`."""
    if d.type == "categorical":
        return "{" + ", ".join(map(str, d.choices)) + "}"
    text = f"{d.type} [{d.low:g}, {d.high:g}]"
    return text + (" log" if d.log else "") + (f" step {d.step:g}" if d.step else "")


@dataclass
class Plan:
    """The trials of a grid study and the runs that produce them (epoch reuse: trials that
    differ only in `epochs` read one run of the longest count, unless the schedule
    depends on the count)."""

    trials: list[TrialConfig]  # in spec order
    runs: list[TrialConfig]  # distinct configs to train
    run_of: list[int]  # trial i is read from runs[run_of[i]]


def plan(spec: StudySpec) -> Plan:
    trials = spec.trial_configs()
    target: list[TrialConfig] = []
    for c in trials:
        if "epochs" in spec.varied and c.schedule != "onecycle":
            longest = max(t.epochs for t in trials if t.replace(epochs=1).key() == c.replace(epochs=1).key())
            target.append(c.replace(epochs=longest))
        else:
            target.append(c)
    runs: list[TrialConfig] = []
    index: dict[str, int] = {}
    run_of = []
    for c in target:
        if c.key() not in index:
            index[c.key()] = len(runs)
            runs.append(c)
        run_of.append(index[c.key()])
    return Plan(trials, runs, run_of)
