"""The settings of one trial: `TrialConfig`, frozen and validated when made.

A wrong type or value is a `ConfigError` whose one-line message names the field, raised
before anything is trained or logged; names of models, data sets and activations are
checked against the registries' lists (imported late: the registries import torch).
`coerce` checks one setting's type strictly (a spec's values go through it, spec.py);
`RUNTIME_FIELDS` are the settings left out of a trial's identity (`TrialConfig.key`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from cnnbench.errors import ConfigError
from cnnbench.util.text import suggestion


@functools.cache
def _names() -> dict[str, tuple[str, ...]]:
    """The fixed name lists (imported late: the registries import torch)."""
    from cnnbench.data.tensors import AUGMENTATIONS
    from cnnbench.models import ACTIVATIONS

    return {"activation": tuple(ACTIVATIONS), "augment": tuple(AUGMENTATIONS)}


def _model_settings(model: str) -> tuple[str, ...]:
    """The optional settings `model` honours: a registry name (the user's registered ones
    too: the registry is read live), or an import path, imported here (ConfigError with
    the module's own error when it does not import)."""
    from cnnbench.models import is_import_path, list_models, model_entry

    if not is_import_path(model) and model not in list_models():
        _choice("model", model, list_models())
    return model_entry(model).settings


def _model_identity(model: str) -> str | None:
    from cnnbench.models import model_identity

    return model_identity(model)


def _dataset_problem(dataset: str) -> str | None:
    from cnnbench.data.tensors import dataset_problem

    return dataset_problem(dataset)


# Settings that change how a run is executed or recorded but not what it computes:
# they are left out of a trial's identity, so a study resumes on another device.
RUNTIME_FIELDS = ("device", "log_every", "checkpoints", "progress", "cudnn_benchmark", "cuda_graphs")
# Settings added after trials were first recorded: at these values they are left out of a
# trial's identity, so the keys of trials recorded before them (and their resume) stay.
LATER_FIELDS = {"tf32": False, "test_fraction": 0.0}


@dataclass(frozen=True)
class TrialConfig:
    """Every setting of one training run. Defaults follow document 003's LeNet-5 run."""

    # what is trained
    model: str = field(default="lenet5", metadata={"doc": "architecture: a registry name (`cnnbench models`) or your own, module.path:ClassOrFunction (docs/your-own.md)"})
    activation: str | None = field(default=None, metadata={"doc": "hidden activation; null keeps the model's own (lenet5: sigmoid, tanh on F6)"})
    dropout: float | None = field(default=None, metadata={"doc": "dropout probability of the classifier; null keeps the model's own"})
    # data
    dataset: str = field(default="mnist", metadata={"doc": "mnist, fashion_mnist, cifar10, torchvision:NAME, imagefolder:PATH or npz:PATH"})
    normalize: bool = field(default=True, metadata={"doc": "subtract the data set's mean and divide by its std, as documents 002/003 do"})
    augment: str = field(default="none", metadata={"doc": "comma list of batch augmentations on the device: hflip, grayscale, crop; none"})
    train_subset: int = field(default=0, metadata={"doc": "train on the first N training images (0 = all); for quick runs"})
    test_subset: int = field(default=0, metadata={"doc": "test on the first N test images (0 = all)"})
    val_size: int = field(default=0, metadata={"doc": "hold out N training images as a fixed, seeded validation split (0 = none)"})
    test_fraction: float = field(default=0.0, metadata={"doc": "a data set without a test split (an image folder of class folders): hold out this fraction, fixed and seeded, as its test set"})
    # optimisation
    epochs: int = field(default=10, metadata={"doc": "passes over the training set"})
    batch_size: int = field(default=64, metadata={"doc": "training batch size (images per step)"})
    test_batch_size: int = field(default=1024, metadata={"doc": "batch size of evaluation passes (does not change results)"})
    optimizer: str = field(default="sgd", metadata={"doc": "sgd or adam"})
    lr: float = field(default=0.01, metadata={"doc": "learning rate (peak rate of the one-cycle schedule)"})
    momentum: float = field(default=0.9, metadata={"doc": "SGD momentum (document 003: 0.9); ignored by adam"})
    weight_decay: float = field(default=0.0, metadata={"doc": "L2 weight decay (document 004's AlexNet: 5e-4)"})
    schedule: str = field(default="none", metadata={"doc": "learning-rate schedule: none, step, plateau (reduce on plateau) or onecycle"})
    step_size: int = field(default=5, metadata={"doc": "step schedule: epochs between decays"})
    gamma: float = field(default=0.1, metadata={"doc": "step and plateau schedules: factor applied at each decay"})
    patience: int = field(default=2, metadata={"doc": "plateau schedule: epochs without improvement before a decay"})
    seed: int = field(default=0, metadata={"doc": "seeds weight init, data order, dropout and augmentation"})
    # execution (no effect on the maths beyond float rounding)
    device: str = field(default="auto", metadata={"doc": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"})
    amp: str = field(default="none", metadata={"doc": "autocast precision: none or bf16"})
    channels_last: bool | None = field(default=None, metadata={"doc": "channels-last memory format; null: on for the CPU, where `cnnbench bench` measured it faster for every model, off elsewhere"})
    compile: str = field(default="none", metadata={"doc": "torch.compile mode: none, default, reduce-overhead (CUDA graphs) or max-autotune"})
    tf32: bool = field(default=False, metadata={"doc": "CUDA: TF32 tensor-core math for float32 convolutions and matrix products (PyTorch's own default turns it on for convolutions; off here: plain fp32)"})
    cuda_graphs: bool | None = field(default=None, metadata={"doc": "CUDA: replay each whole training step as one captured CUDA graph (the same kernels, one launch); null: on for CUDA where the step allows it (SGD, a per-epoch rate, no augmentation, no compile)"})
    cudnn_benchmark: bool = field(default=True, metadata={"doc": "CUDA: let cuDNN time its convolution algorithms and keep the fastest (off with deterministic)"})
    deterministic: bool = field(default=False, metadata={"doc": "deterministic kernels (torch.use_deterministic_algorithms)"})
    # recording
    log_every: int = field(default=50, metadata={"doc": "steps between points of the train/loss curve"})
    checkpoints: str = field(default="best", metadata={"doc": "final, best (final + best epoch) or all (one per epoch)"})
    progress: bool = field(default=True, metadata={"doc": "show progress bars"})

    def __post_init__(self) -> None:
        _validate_trial(self)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "") -> "TrialConfig":
        """Strict: unknown keys and wrong types are errors naming `where` and the key."""
        prefix = f"{where}: " if where else ""
        known = {f.name: f for f in fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{prefix}unknown setting {key!r}{suggestion(key, known)}")
            clean[key] = coerce(key, value, where=where)
        try:
            return cls(**clean)
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}") from None

    def replace(self, **changes: Any) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- identity -----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What the trial computes: its settings less the runtime ones, and for the user's
        own network the hash of its source file (an edited network is another trial)."""
        out = {k: v for k, v in self.to_dict().items()
               if k not in RUNTIME_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
        source = _model_identity(self.model)
        return out if source is None else {**out, "model_source": source}

    def key(self) -> str:
        """Stable hash of what the trial computes (resolved settings and seed)."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def augmentations(self) -> tuple[str, ...]:
        return () if self.augment == "none" else tuple(a.strip() for a in self.augment.split(","))


def setting_docs() -> list[tuple[str, Any, str]]:
    """(name, default, doc) of every trial setting, for --help."""
    return [(f.name, f.default, f.metadata["doc"]) for f in fields(TrialConfig)]


def settings_help() -> str:
    """Every training setting with its default and meaning: the commands' --help epilog."""
    lines = ["training settings (--set key=value; yaml-style values: 0.01, 64, true, null, relu):"]
    for name, default, doc in setting_docs():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"  {name:<16} {shown:<8} {doc}")
    return "\n".join(lines)


# each setting's type as the dataclass spells it: "int", "float | None", "str", ...
FIELD_TYPES = {f.name: f.type for f in fields(TrialConfig)}


def coerce(key: str, value: Any, *, where: str = "") -> Any:
    """Check one setting's type strictly (ints are accepted where a float is expected)."""
    prefix = f"{where}: " if where else ""
    kind = FIELD_TYPES[key]
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{prefix}{key}: a value is required, got null")
    base = kind.replace(" | None", "")
    ok = {
        "int": is_number(value, integer=True),
        "float": is_number(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[base]
    if not ok:
        expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[base]
        raise ConfigError(f"{prefix}{key}: expected {expected}, got {value!r}")
    return float(value) if base == "float" else value


def is_number(value: Any, *, integer: bool = False) -> bool:
    """An int (or, unless `integer`, a float), and not a bool: YAML's `true` is the int 1
    to Python (bool subclasses int), and is no number to a spec."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    _check(value in choices, f"{name}: unknown value {value!r}; known: {', '.join(choices)}")


def _validate_trial(c: TrialConfig) -> None:
    for f in fields(c):  # types first, also when constructed directly in code
        coerce(f.name, getattr(c, f.name))
    names = _names()
    settings = _model_settings(c.model)
    for setting in ("activation", "dropout"):
        if getattr(c, setting) is not None and setting not in settings:
            raise ConfigError(f"{setting}: model {c.model} has no {setting} setting (leave it null)")
    if c.activation is not None:
        _choice("activation", c.activation, names["activation"])
    problem = _dataset_problem(c.dataset)
    _check(problem is None, f"dataset: {problem}")
    _choice("optimizer", c.optimizer, ("sgd", "adam"))
    _choice("schedule", c.schedule, ("none", "step", "plateau", "onecycle"))
    _choice("amp", c.amp, ("none", "bf16"))
    _choice("compile", c.compile, ("none", "default", "reduce-overhead", "max-autotune"))
    _choice("checkpoints", c.checkpoints, ("final", "best", "all"))
    _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", c.device) is not None,
           f"device: unknown value {c.device!r}; known: auto, cpu, cuda, cuda:N, mps")
    for aug in c.augmentations():
        _choice("augment", aug, names["augment"])
    finite = all(math.isfinite(getattr(c, k)) for k in ("lr", "momentum", "weight_decay", "gamma"))
    _check(finite, "lr, momentum, weight_decay, gamma: must be finite numbers")
    _check(c.lr > 0, f"lr: must be > 0, got {c.lr}")
    _check(0 <= c.momentum < 1, f"momentum: must be in [0, 1), got {c.momentum}")
    _check(c.weight_decay >= 0, f"weight_decay: must be >= 0, got {c.weight_decay}")
    _check(c.epochs >= 1, f"epochs: must be >= 1, got {c.epochs}")
    _check(c.batch_size >= 1, f"batch_size: must be >= 1, got {c.batch_size}")
    _check(c.test_batch_size >= 1, f"test_batch_size: must be >= 1, got {c.test_batch_size}")
    _check(c.train_subset >= 0, f"train_subset: must be >= 0, got {c.train_subset}")
    _check(c.test_subset >= 0, f"test_subset: must be >= 0, got {c.test_subset}")
    _check(c.val_size >= 0, f"val_size: must be >= 0, got {c.val_size}")
    _check(0 <= c.test_fraction < 1, f"test_fraction: must be in [0, 1), got {c.test_fraction}")
    _check(c.step_size >= 1, f"step_size: must be >= 1, got {c.step_size}")
    _check(0 < c.gamma <= 1, f"gamma: must be in (0, 1], got {c.gamma}")
    _check(c.patience >= 0, f"patience: must be >= 0, got {c.patience}")
    _check(c.seed >= 0, f"seed: must be >= 0, got {c.seed}")
    _check(c.log_every >= 1, f"log_every: must be >= 1, got {c.log_every}")
    if c.dropout is not None:
        _check(0 <= c.dropout < 1, f"dropout: must be in [0, 1), got {c.dropout}")
