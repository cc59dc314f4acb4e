"""One registry of architectures, in the manner of torchvision's `models/_api.py`.

Every model takes `(N, C, H, W)` float images and returns logits `(N, num_classes)`,
the same type in train and eval mode. Builders take keyword-only arguments:
`in_channels`, `num_classes`, `image_size`, `activation` and `dropout` (None keeps the
model's own choice). A builder declares which of `activation`/`dropout` it honours, so
a spec asking a model for a setting it lacks is refused when the spec is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from cnnbench.models._layers import ACTIVATIONS


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    settings: tuple[str, ...]  # which optional settings the builder honours
    source: str  # where the architecture comes from, one line


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, settings: tuple[str, ...] = ("activation",), source: str = ""):
    """Decorator: add a builder under `name`. Registering a name twice is an error."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelEntry(name, fn, settings, source)
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_entry(name: str) -> ModelEntry:
    try:
        return _MODELS[name]
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


# importing the modules registers their builders
from cnnbench.models import alexnet, inception, lenet, resnet, tv  # noqa: E402,F401

__all__ = ["ACTIVATIONS", "get_model", "list_models", "model_entry", "register_model"]
