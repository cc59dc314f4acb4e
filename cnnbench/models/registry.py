"""The registry of architectures: a name -> builder table that each architecture file fills
with `@register_model` (as torchvision's `models/_api.py`). Importing `cnnbench.models`
imports every architecture file, so the table is full.

A user's network is a model too: registered from the user's code (`user.register_user_model`,
`cnnbench.register_model`), or named by an import path (`my_package.nets:SmallNet`,
source.py). Either is called with the keywords it accepts of `in_channels`,
`num_classes`, `image_size`, and `activation`/`dropout` where a trial sets them, and must
return an `nn.Module`.
"""


from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

from cnnbench.errors import ConfigError
from cnnbench.models.source import SETTINGS, accepted, is_import_path, load_attr, module_file


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    settings: tuple[str, ...]  # which optional settings the builder honours
    source: str  # where the architecture comes from, one line
    user: bool = False  # the user's code (an import path, or registered from outside cnnbench)
    module: str = ""  # the module that registered it (a user's: worker processes import it)


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, settings: tuple[str, ...] = ("activation",), source: str = ""):
    """Decorator: add a builder under `name`. Registering a name twice is an error."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = ModelEntry(name, fn, settings, source)
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(MODELS)


def model_entry(name: str) -> ModelEntry:
    """A registered model, or the class or function an import path names (imported: a
    ConfigError with the module's own error when it does not import)."""
    if is_import_path(name):
        builder = load_attr(name)
        module = sys.modules.get(getattr(builder, "__module__", "") or "")
        where = module_file(module) if module is not None else None
        return ModelEntry(name, builder, tuple(s for s in SETTINGS if s in accepted(builder)),
                          where or name, user=True, module=name.partition(":")[0])
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def get_model(name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
              activation: str | None = None, dropout: float | None = None) -> nn.Module:
    entry = model_entry(name)
    for setting, value in (("activation", activation), ("dropout", dropout)):
        if value is not None and setting not in entry.settings:
            raise ValueError(f"model {name} has no {setting} setting")
    given = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                 activation=activation, dropout=dropout)
    if not entry.user:
        return entry.builder(**given)
    keys = accepted(entry.builder)
    model = entry.builder(**{k: v for k, v in given.items() if k in keys and not (k in SETTINGS and v is None)})
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name}: returned {type(model).__name__} {repr(model)[:40]}, not an nn.Module")
    return model
