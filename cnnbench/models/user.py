"""The user's networks as cnnbench models: registered from the user's code
(`register_user_model`, which `cnnbench.register_model` is), or named by an import path
(source.py); their identity for resuming (`model_identity`), the folders their modules
are imported from (`add_model_path`), and the check that a study makes before it starts
(`check_model`: an `nn.Module` whose output on a batch is `(batch, num_classes)`).

Worker processes are spawned (a fresh interpreter): they import the modules that
registered the study's models (`registering_modules`). A model registered in a notebook
(in `__main__` without a file) cannot be imported there (`notebook_only`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from cnnbench.errors import ConfigError
from cnnbench.models.registry import MODELS, ModelEntry, get_model, model_entry
from cnnbench.models.source import SETTINGS, accepted, code_hash, is_import_path, module_file, one_line

MAIN_MODULES = ("__main__", "__mp_main__")  # a script re-run by a spawned worker is __mp_main__ there


def register_user_model(name: str, *, source: str = "") -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: `@register_model("small")` on a class or function of the user's that returns
    an nn.Module; it takes those of `in_channels`, `num_classes`, `image_size`, `activation`,
    `dropout` that it accepts. Registering it again from the same place (a notebook cell
    run twice, a module imported again) replaces it; any other name taken is an error."""
    if not name or is_import_path(name) or name != name.strip():
        raise ValueError(f"model name {name!r}: a name without ':' (an import path names a model itself)")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        where = f"{fn.__module__}:{getattr(fn, '__qualname__', name)}"
        old = MODELS.get(name)
        if old is not None and not (old.user and old.source in (where, source)):
            raise ValueError(f"model {name!r} is already registered ({old.source or old.module})")
        MODELS[name] = ModelEntry(name, fn, tuple(s for s in SETTINGS if s in accepted(fn)), source or where,
                                  user=True, module=fn.__module__)
        return fn

    return wrap


def model_identity(name: str) -> str | None:
    """What identifies a user's model beyond its name: the hash of the file that defines it
    (see source.code_hash). None for cnnbench's own models (their keys stay as they were)."""
    if not is_import_path(name) and not (name in MODELS and MODELS[name].user):
        return None
    return code_hash(model_entry(name).builder)


def notebook_only(name: str) -> bool:
    """A model registered in a notebook (or `python -c`): a spawned worker cannot import it."""
    entry = MODELS.get(name)
    if entry is None or not entry.user or entry.module not in MAIN_MODULES:
        return False
    main = sys.modules.get("__main__")
    return main is None or module_file(main) is None


def registering_modules(names: Iterable[str]) -> tuple[str, ...]:
    """The modules a worker process imports to have the user's registered `names` (a script
    run as __main__ is re-run by the worker itself)."""
    out = []
    for name in names:
        entry = MODELS.get(name)
        if entry is not None and entry.user and entry.module not in MAIN_MODULES and entry.module not in out:
            out.append(entry.module)
    return tuple(out)


def add_model_path(folders: Iterable[str | Path], *, first: bool = True) -> None:
    """Put folders on the import path (`first`: before the others, as an explicit
    --model-path asks; else after them, as a spec's own folder is added)."""
    for folder in folders:
        path = str(Path(folder).resolve())
        if path in sys.path:
            continue
        if first:
            sys.path.insert(0, path)
        else:
            sys.path.append(path)


@torch.no_grad()
def check_model(name: str, *, in_channels: int, num_classes: int, image_size: int,
                activation: str | None = None, dropout: float | None = None) -> None:
    """A user's model built for the data and run on a batch of 2 images (on the CPU, in
    eval mode): ConfigError on one line when it cannot be built, does not return an
    nn.Module, fails, or does not return (batch, num_classes) logits."""
    shape = f"{in_channels}x{image_size}x{image_size}"
    try:
        model = get_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                          activation=activation, dropout=dropout)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"model {name}: cannot be built for {shape} images and {num_classes} classes "
                          f"({one_line(err)})") from None
    model.eval()
    x = torch.rand(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        out = model(x)
    except Exception as err:
        raise ConfigError(f"model {name}: its forward fails on a batch of 2 {shape} images ({one_line(err)})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {name}: returns {got} on a batch of 2 {shape} images; expected (2, {num_classes}) "
                          "logits, (batch, num_classes)")
