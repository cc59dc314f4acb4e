"""Settings of one trial (`TrialConfig`) and of a study or sweep (`StudySpec`).

Both are frozen data, validated when they are made: a wrong key, type or value is a
`ConfigError` whose one-line message names the file and the field, raised before
anything is trained or logged. Names of models, data sets and activations are checked
against the registries' lists; nothing else here touches torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cnnbench.errors import ConfigError  # noqa: F401  (re-exported here)


@functools.cache
def _names() -> dict[str, tuple[str, ...]]:
    """The registries' name lists (imported late: the registries import torch)."""
    from cnnbench.data.tensors import AUGMENTATIONS, DATASETS
    from cnnbench.models import ACTIVATIONS, list_models, model_entry

    return {"model": tuple(list_models()), "activation": tuple(ACTIVATIONS),
            "dataset": tuple(DATASETS), "augment": tuple(AUGMENTATIONS),
            **{f"settings:{m}": model_entry(m).settings for m in list_models()}}


# Settings that change how a run is executed or recorded but not what it computes:
# they are left out of a trial's identity, so a study resumes on another device.
RUNTIME_FIELDS = ("device", "log_every", "checkpoints", "progress", "cudnn_benchmark", "cuda_graphs")
# Settings added after trials were first recorded: at these values they are left out of a
# trial's identity, so the keys of trials recorded before them (and their resume) stay.
LATER_FIELDS = {"tf32": False}


@dataclass(frozen=True)
class TrialConfig:
    """Every setting of one training run. Defaults follow document 003's LeNet-5 run."""

    # what is trained
    model: str = field(default="lenet5", metadata={"doc": "architecture, a registry name (`cnnbench models`)"})
    activation: str | None = field(default=None, metadata={"doc": "hidden activation; null keeps the model's own (lenet5: sigmoid, tanh on F6)"})
    dropout: float | None = field(default=None, metadata={"doc": "dropout probability of the classifier; null keeps the model's own"})
    # data
    dataset: str = field(default="mnist", metadata={"doc": "mnist, fashion_mnist or cifar10 (torchvision)"})
    normalize: bool = field(default=True, metadata={"doc": "subtract the data set's mean and divide by its std, as documents 002/003 do"})
    augment: str = field(default="none", metadata={"doc": "comma list of batch augmentations on the device: hflip, grayscale, crop; none"})
    train_subset: int = field(default=0, metadata={"doc": "train on the first N training images (0 = all); for quick runs"})
    test_subset: int = field(default=0, metadata={"doc": "test on the first N test images (0 = all)"})
    val_size: int = field(default=0, metadata={"doc": "hold out N training images as a fixed, seeded validation split (0 = none)"})
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
                raise ConfigError(f"{prefix}unknown setting {key!r}{_suggest(key, known)}")
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
        return {k: v for k, v in self.to_dict().items()
                if k not in RUNTIME_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    def key(self) -> str:
        """Stable hash of what the trial computes (resolved settings and seed)."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def augmentations(self) -> tuple[str, ...]:
        return () if self.augment == "none" else tuple(a.strip() for a in self.augment.split(","))


def setting_docs() -> list[tuple[str, Any, str]]:
    """(name, default, doc) of every trial setting, for --help."""
    return [(f.name, f.default, f.metadata["doc"]) for f in fields(TrialConfig)]


_FIELD_TYPES = {f.name: f.type for f in fields(TrialConfig)}


def coerce(key: str, value: Any, *, where: str = "") -> Any:
    """Check one setting's type strictly (ints are accepted where a float is expected)."""
    prefix = f"{where}: " if where else ""
    kind = _FIELD_TYPES[key]
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
    _choice("model", c.model, names["model"])
    for setting in ("activation", "dropout"):
        if getattr(c, setting) is not None and setting not in names[f"settings:{c.model}"]:
            raise ConfigError(f"{setting}: model {c.model} has no {setting} setting (leave it null)")
    if c.activation is not None:
        _choice("activation", c.activation, names["activation"])
    _choice("dataset", c.dataset, names["dataset"])
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
    _check(c.step_size >= 1, f"step_size: must be >= 1, got {c.step_size}")
    _check(0 < c.gamma <= 1, f"gamma: must be in (0, 1], got {c.gamma}")
    _check(c.patience >= 0, f"patience: must be >= 0, got {c.patience}")
    _check(c.seed >= 0, f"seed: must be >= 0, got {c.seed}")
    _check(c.log_every >= 1, f"log_every: must be >= 1, got {c.log_every}")
    if c.dropout is not None:
        _check(0 <= c.dropout < 1, f"dropout: must be in [0, 1), got {c.dropout}")


def _suggest(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------
# parsing of --set key=value and of YAML files


def parse_value(text: str) -> Any:
    """Turn the text of `--set key=value` into a typed value (int, float, bool, null, str)."""
    low = text.strip().lower()
    if low in ("null", "none", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = parse_value(value)
    return out


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-3` is a number, as users expect, not the string YAML 1.1 reads."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> Any:
    """A YAML file's content. A file that cannot be read (a folder, no permission), is not
    UTF-8 text or is empty is a ConfigError naming it, like malformed YAML."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a spec file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}); "
                          "save the spec as UTF-8") from None
    if not text.strip():
        raise ConfigError(f"{path}: empty file; a spec needs at least a scientific or a search block")
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None


# --------------------------------------------------------------------------------------
# study and sweep specs

SPEC_KEYS = {
    "name": "short name: the MLflow experiment and the results/<name>/ folder",
    "title": "one line shown in tables and plots",
    "source": "the document(s) the study reproduces",
    "description": "free text",
    "scientific": "hyperparameters whose effect is measured: name -> list of values",
    "nuisance": "hyperparameters optimised away per scientific value: name -> list of values",
    "fixed": "settings held constant (any trial setting)",
    "seeds": "list of seeds every configuration is repeated over",
    "reported": "the document's figures: list of {<scientific values>, epochN_test_acc/final_test_acc/...: percent}",
    "search": "sweep only: name -> {type: float|int|categorical, low, high, log, step, choices}",
    "sweep": "sweep only: sampler, pruner, n_trials, direction, final_seeds",
}

SEARCH_TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random", "qmc", "grid")
PRUNERS = ("none", "median", "successive_halving", "hyperband")


@dataclass(frozen=True)
class SearchDim:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SweepSettings:
    sampler: str = "tpe"
    pruner: str = "median"
    n_trials: int = 20
    direction: str = "maximize"
    objective: str = "val_acc"  # best validation accuracy over epochs; never the test set
    final_seeds: tuple[int, ...] = (0, 1, 2)
    startup_trials: int = 5


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: str
    title: str
    source: str
    description: str
    scientific: dict[str, tuple[Any, ...]]
    nuisance: dict[str, tuple[Any, ...]]
    fixed: dict[str, Any]
    seeds: tuple[int, ...]
    reported: tuple[dict[str, Any], ...]
    search: tuple[SearchDim, ...] = ()
    sweep: SweepSettings | None = None

    @property
    def varied(self) -> tuple[str, ...]:
        return tuple(self.scientific) + tuple(self.nuisance)

    def base_config(self) -> TrialConfig:
        return TrialConfig.from_dict(self.fixed, where=f"{self.path}: fixed")

    def trial_configs(self) -> list[TrialConfig]:
        """The grid: every scientific x nuisance combination, repeated over the seeds."""
        base = self.base_config().to_dict()
        names = list(self.varied)
        combos = itertools.product(*(self.scientific[n] for n in self.scientific),
                                   *(self.nuisance[n] for n in self.nuisance))
        out = []
        for combo in combos:
            for seed in self.seeds:
                values = {**base, **dict(zip(names, combo)), "seed": seed}
                out.append(TrialConfig.from_dict(values, where=f"{self.path}: scientific/nuisance"))
        return out

    def with_overrides(self, overrides: dict[str, Any], seeds: tuple[int, ...] | None = None) -> "StudySpec":
        """`--set` changes fixed settings; a varied hyperparameter cannot be fixed this way."""
        for key in overrides:
            if key in self.varied:
                raise ConfigError(f"--set {key}: {key} is varied by study {self.name}; edit {self.path} to change its values")
            if key == "seed":
                raise ConfigError("--set seed: a study's seeds come from its spec; use --seeds 0,1,2")
        fixed = {**self.fixed, **overrides}
        TrialConfig.from_dict(fixed, where="--set")
        spec = dataclasses.replace(self, fixed=fixed, seeds=tuple(seeds) if seeds else self.seeds)
        spec.trial_configs()  # every combination must still be valid
        return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study or sweep spec. Raises ConfigError naming file and field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such spec file")
    raw = load_yaml(path)
    where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(SPEC_KEYS)}")
    for key in raw:
        if key not in SPEC_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), SPEC_KEYS)}")

    def text(key: str, default: str = "") -> str:
        value = raw.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, (str, int)):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return str(value)

    name = text("name", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"{where}: name: {name!r} must be letters, digits, '.', '_' or '-'")

    def grid(key: str) -> dict[str, tuple[Any, ...]]:
        block = raw.get(key) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping of setting -> list of values")
        out = {}
        for setting, values in block.items():
            if setting not in _FIELD_TYPES:
                raise ConfigError(f"{where}: {key}.{setting}: unknown setting{_suggest(str(setting), _FIELD_TYPES)}")
            if setting == "seed":
                raise ConfigError(f"{where}: {key}.seed: seeds are listed under 'seeds'")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: {key}.{setting}: expected a non-empty list of values")
            out[setting] = tuple(coerce(setting, v, where=f"{where}: {key}") for v in values)
            if len(set(map(repr, out[setting]))) != len(out[setting]):
                raise ConfigError(f"{where}: {key}.{setting}: values repeat")
        return out

    scientific, nuisance = grid("scientific"), grid("nuisance")
    overlap = set(scientific) & set(nuisance)
    if overlap:
        raise ConfigError(f"{where}: {sorted(overlap)[0]}: listed as both scientific and nuisance")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{where}: fixed: expected a mapping of setting -> value")
    for key in fixed:
        if key in scientific or key in nuisance:
            raise ConfigError(f"{where}: fixed.{key}: also varied by the study")
    if "seed" in fixed:
        raise ConfigError(f"{where}: fixed.seed: seeds are listed under 'seeds'")

    seeds = raw.get("seeds", [0])
    if is_number(seeds, integer=True):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(is_number(s, integer=True) and s >= 0 for s in seeds):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds: values repeat")

    reported = raw.get("reported") or []
    if not isinstance(reported, list) or not all(isinstance(r, dict) for r in reported):
        raise ConfigError(f"{where}: reported: expected a list of mappings")
    for i, row in enumerate(reported):
        for key, value in row.items():
            if key in scientific:
                continue
            if not re.fullmatch(r"(epoch\d+|final|best)_test_acc", str(key)):
                raise ConfigError(f"{where}: reported[{i}].{key}: expected a scientific hyperparameter or "
                                  "epochN_test_acc / final_test_acc / best_test_acc")
            if not is_number(value) or not 0 <= value <= 100:
                raise ConfigError(f"{where}: reported[{i}].{key}: expected a percentage in [0, 100], got {value!r}")

    search = _load_search(raw.get("search"), where)
    sweep = _load_sweep(raw.get("sweep"), where) if ("sweep" in raw or search) else None
    if "sweep" in raw and not search:
        raise ConfigError(f"{where}: search: a sweep needs a non-empty search space")
    if not search and not scientific:
        raise ConfigError(f"{where}: scientific: a study needs at least one scientific hyperparameter (or a search block for a sweep)")

    spec = StudySpec(
        name=name, path=where, title=text("title", name), source=text("source"),
        description=text("description"), scientific=scientific, nuisance=nuisance,
        fixed=dict(fixed), seeds=tuple(seeds), reported=tuple(reported),
        search=search, sweep=sweep,
    )
    spec.base_config()
    if scientific:
        spec.trial_configs()
    return spec


def _load_search(block: Any, where: str) -> tuple[SearchDim, ...]:
    if block is None:
        return ()
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"{where}: search: expected a non-empty mapping of setting -> distribution")
    dims = []
    for name, d in block.items():
        at = f"{where}: search.{name}"
        if name not in _FIELD_TYPES or name in RUNTIME_FIELDS:
            raise ConfigError(f"{at}: unknown setting{_suggest(str(name), _FIELD_TYPES)}")
        if isinstance(d, list):
            d = {"type": "categorical", "choices": d}
        if not isinstance(d, dict):
            raise ConfigError(f"{at}: expected a list of choices or a mapping with type, low, high")
        for key in d:
            if key not in ("type", "low", "high", "log", "step", "choices"):
                raise ConfigError(f"{at}.{key}: unknown key; known: type, low, high, log, step, choices")
        kind = d.get("type")
        if kind not in SEARCH_TYPES:
            raise ConfigError(f"{at}.type: unknown value {kind!r}; known: {', '.join(SEARCH_TYPES)}")
        if kind == "categorical":
            choices = d.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{at}.choices: expected a non-empty list")
            dims.append(SearchDim(name, kind, choices=tuple(coerce(name, c, where=at) for c in choices)))
            for c in choices:
                TrialConfig.from_dict({name: c}, where=at)
            continue
        low, high = d.get("low"), d.get("high")
        for key, value in (("low", low), ("high", high)):
            if not is_number(value):
                raise ConfigError(f"{at}.{key}: expected a number, got {value!r}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{at}: low and high of an int range must be integers")
        if not low < high:
            raise ConfigError(f"{at}: low must be < high, got {low} and {high}")
        log = d.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{at}.log: expected true or false")
        if log and low <= 0:
            raise ConfigError(f"{at}.low: a log range needs low > 0")
        step = d.get("step")
        if step is not None and (not is_number(step, integer=kind == "int") or step <= 0 or log):
            raise ConfigError(f"{at}.step: expected {'an integer' if kind == 'int' else 'a number'} > 0 "
                              f"(and no log scale), got {step!r}")
        base_type = _FIELD_TYPES[name].replace(" | None", "")
        if base_type not in ("int", "float") or (base_type == "int" and kind == "float"):
            raise ConfigError(f"{at}.type: {name} takes {base_type} values, not a {kind} range")
        for value in (low, high):
            TrialConfig.from_dict({name: int(value) if kind == "int" else float(value)}, where=at)
        dims.append(SearchDim(name, kind, float(low), float(high), log, step))
    return tuple(dims)


def _load_sweep(block: Any, where: str) -> SweepSettings:
    block = block or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: sweep: expected a mapping")
    known = {f.name for f in fields(SweepSettings)}
    for key in block:
        if key not in known:
            raise ConfigError(f"{where}: sweep.{key}: unknown key; known: {', '.join(sorted(known))}")
    s = SweepSettings(**{k: tuple(v) if k == "final_seeds" and isinstance(v, list) else v for k, v in block.items()})
    at = f"{where}: sweep"
    if s.sampler not in SAMPLERS:
        raise ConfigError(f"{at}.sampler: unknown value {s.sampler!r}; known: {', '.join(SAMPLERS)}")
    if s.pruner not in PRUNERS:
        raise ConfigError(f"{at}.pruner: unknown value {s.pruner!r}; known: {', '.join(PRUNERS)}")
    if s.direction not in ("maximize", "minimize"):
        raise ConfigError(f"{at}.direction: expected maximize or minimize, got {s.direction!r}")
    if s.objective not in ("val_acc", "val_loss"):
        raise ConfigError(f"{at}.objective: expected val_acc or val_loss (tuning never reads the test set)")
    if not is_number(s.n_trials, integer=True) or s.n_trials < 1:
        raise ConfigError(f"{at}.n_trials: expected an integer >= 1, got {s.n_trials!r}")
    if not is_number(s.startup_trials, integer=True) or s.startup_trials < 0:
        raise ConfigError(f"{at}.startup_trials: expected an integer >= 0, got {s.startup_trials!r}")
    if (not isinstance(s.final_seeds, tuple) or not s.final_seeds
            or not all(is_number(x, integer=True) and x >= 0 for x in s.final_seeds)):
        shown = list(s.final_seeds) if isinstance(s.final_seeds, tuple) else s.final_seeds
        raise ConfigError(f"{at}.final_seeds: expected a non-empty list of integers >= 0, got {shown!r}")
    return s


def settings_help() -> str:
    """Every training setting with its default and meaning: the commands' --help epilog."""
    lines = ["training settings (--set key=value; yaml-style values: 0.01, 64, true, null, relu):"]
    for name, default, doc in setting_docs():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"  {name:<16} {shown:<8} {doc}")
    return "\n".join(lines)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2`: distinct integers >= 0."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"--seeds: expected integers separated by commas, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct integers >= 0, got {text!r}")
    return seeds
