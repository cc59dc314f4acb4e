"""The networks a study trains, and what its worker processes need to build them: a
network of the user's (models/user.py) is found in a spawned worker by importing the
module that registered it; one registered in a notebook (`__main__`) cannot be, so its
study trains in this process (one line says so) or, asked for workers, is refused."""

from __future__ import annotations

from typing import Any, Iterable

from cnnbench.config.spec import StudySpec
from cnnbench.errors import ConfigError
from cnnbench.models.source import fresh_module
from cnnbench.models.user import add_model_path, notebook_only, registering_modules


def networks(spec: StudySpec, configs: Iterable[Any] = ()) -> list[str]:
    """The networks a study (its planned runs' `configs`) or sweep trains: its fixed one,
    and those it varies or searches over."""
    return sorted({c.model for c in configs} | {spec.base_config().model}
                  | {m for d in spec.search if d.name == "model" for m in d.choices})


def notebook_workers(label: str, models: list[str], workers: int | None) -> int | None:
    """The worker processes to use when the study trains a network registered in a notebook,
    which a spawned worker cannot import: one line and this process (workers not given), or
    a ConfigError (more than one asked for)."""
    names = sorted({m for m in models if notebook_only(m)})
    if not names:
        return workers
    if workers is not None and workers > 1:
        raise ConfigError(f"{label}: model {names[0]!r} is registered in a notebook (__main__), which worker "
                          "processes cannot import; put it in a module and import it from there, or use 1 worker")
    if workers is None:
        print(f"{label}: model {names[0]!r} is registered in a notebook: its trials train in this process "
              "(worker processes could not import it; put it in a module for them)", flush=True)
    return 1


def worker_imports(spec: StudySpec, configs: Iterable[Any] = ()) -> tuple[str, ...]:
    """The user's modules a worker process imports to have the study's networks."""
    return registering_modules(networks(spec, configs))


def import_networks(spec: StudySpec, imports: Iterable[str]) -> None:
    """In a worker process, before any config is made: the spec's model path, and the
    modules that register its networks."""
    add_model_path(spec.model_path)
    for module in imports:
        fresh_module(module, ref=module)
