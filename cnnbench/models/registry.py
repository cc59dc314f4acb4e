"""The registry of architectures: a name -> builder table that each architecture file fills
with `@register_model` (as torchvision's `models/_api.py`). Importing `cnnbench.models`
imports every architecture file, so the table is full."""


from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    settings: tuple[str, ...]  # which optional settings the builder honours
    source: str  # where the architecture comes from, one line


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
    return entry.builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                         activation=activation, dropout=dropout)

