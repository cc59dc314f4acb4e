"""A study or sweep spec (`StudySpec`, a YAML file in studies/) and the text a user gives:
`load_spec` reads and validates a spec, `--set key=value` and `--seeds` are parsed here.

Specs are frozen data, validated when loaded: a wrong key, type or value is a
`ConfigError` whose one-line message names the file and the field, raised before
anything is trained or logged. One trial's settings are `trial.TrialConfig`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from cnnbench.config.trial import FIELD_TYPES, RUNTIME_FIELDS, TrialConfig, coerce, is_number
from cnnbench.errors import ConfigError
from cnnbench.util.text import suggestion


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
    "model_path": "folder(s) put on the import path for a model given as module:Class (relative to the spec)",
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
    model_path: tuple[str, ...] = ()  # folders the user's networks are imported from (absolute)

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
    raw, where = _read_mapping(path)
    name = _name(raw, where, path)
    model_path = _model_path(raw, where, path)
    scientific, nuisance = _grid(raw, where, "scientific"), _grid(raw, where, "nuisance")
    overlap = set(scientific) & set(nuisance)
    if overlap:
        raise ConfigError(f"{where}: {sorted(overlap)[0]}: listed as both scientific and nuisance")
    fixed = _fixed(raw, where, scientific, nuisance)
    seeds = _seeds(raw, where)
    reported = _reported(raw, where, scientific)
    search = _load_search(raw.get("search"), where)
    sweep = _load_sweep(raw.get("sweep"), where) if ("sweep" in raw or search) else None
    if "sweep" in raw and not search:
        raise ConfigError(f"{where}: search: a sweep needs a non-empty search space")
    if not search and not scientific:
        raise ConfigError(f"{where}: scientific: a study needs at least one scientific hyperparameter (or a search block for a sweep)")

    spec = StudySpec(
        name=name, path=where, title=_text(raw, where, "title", name), source=_text(raw, where, "source"),
        description=_text(raw, where, "description"), scientific=scientific, nuisance=nuisance,
        fixed=dict(fixed), seeds=tuple(seeds), reported=tuple(reported),
        search=search, sweep=sweep, model_path=model_path,
    )
    spec.base_config()
    if scientific:
        spec.trial_configs()
    return spec


def _read_mapping(path: Path) -> tuple[dict[Any, Any], str]:
    """The spec file's top-level mapping (every key one of SPEC_KEYS) and its name for messages."""
    if not path.exists():
        raise ConfigError(f"{path}: no such spec file")
    raw = load_yaml(path)
    where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(SPEC_KEYS)}")
    for key in raw:
        if key not in SPEC_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{suggestion(str(key), SPEC_KEYS)}")
    return raw, where


def _model_path(raw: dict[Any, Any], where: str, path: Path) -> tuple[str, ...]:
    """`model_path:` (a folder or a list, relative to the spec), put on the import path with
    the spec's own folder after it: a network given as module:Class is imported from there."""
    value = raw.get("model_path") or []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: model_path: expected a folder or a list of folders, got {value!r}")
    from cnnbench.models.user import add_model_path  # imported late: the registry imports torch (cli.py's --help)

    folders = [(path.parent / v).resolve() for v in value]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"{where}: model_path: {folder} is not a folder")
    add_model_path(folders)
    add_model_path([path.parent], first=False)
    return tuple(str(f) for f in folders)


def _text(raw: dict[Any, Any], where: str, key: str, default: str = "") -> str:
    value = raw.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, (str, int)):
        raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
    return str(value)


def _name(raw: dict[Any, Any], where: str, path: Path) -> str:
    """The study's name (the file's stem unless given): the MLflow experiment and results folder."""
    name = _text(raw, where, "name", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"{where}: name: {name!r} must be letters, digits, '.', '_' or '-'")
    return name


def _grid(raw: dict[Any, Any], where: str, key: str) -> dict[str, tuple[Any, ...]]:
    """The `scientific` or `nuisance` block: setting -> its distinct values, each checked."""
    block = raw.get(key) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping of setting -> list of values")
    out = {}
    for setting, values in block.items():
        if setting not in FIELD_TYPES:
            raise ConfigError(f"{where}: {key}.{setting}: unknown setting{suggestion(str(setting), FIELD_TYPES)}")
        if setting == "seed":
            raise ConfigError(f"{where}: {key}.seed: seeds are listed under 'seeds'")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {key}.{setting}: expected a non-empty list of values")
        out[setting] = tuple(coerce(setting, v, where=f"{where}: {key}") for v in values)
        if len(set(map(repr, out[setting]))) != len(out[setting]):
            raise ConfigError(f"{where}: {key}.{setting}: values repeat")
    return out


def _fixed(raw: dict[Any, Any], where: str, scientific: dict[str, Any], nuisance: dict[str, Any]) -> dict[str, Any]:
    """The `fixed` block: settings held constant, none of them varied, no seed."""
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{where}: fixed: expected a mapping of setting -> value")
    for key in fixed:
        if key in scientific or key in nuisance:
            raise ConfigError(f"{where}: fixed.{key}: also varied by the study")
    if "seed" in fixed:
        raise ConfigError(f"{where}: fixed.seed: seeds are listed under 'seeds'")
    return fixed


def _seeds(raw: dict[Any, Any], where: str) -> list[int]:
    """The `seeds` list (one integer is a list of one): distinct integers >= 0; [0] by default."""
    seeds = raw.get("seeds", [0])
    if is_number(seeds, integer=True):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(is_number(s, integer=True) and s >= 0 for s in seeds):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds: values repeat")
    return seeds


def _reported(raw: dict[Any, Any], where: str, scientific: dict[str, Any]) -> list[dict[str, Any]]:
    """The document's figures: rows of scientific values and percentages (epochN/final/best_test_acc)."""
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
    return reported


def _load_search(block: Any, where: str) -> tuple[SearchDim, ...]:
    if block is None:
        return ()
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"{where}: search: expected a non-empty mapping of setting -> distribution")
    dims = []
    for name, d in block.items():
        at = f"{where}: search.{name}"
        if name not in FIELD_TYPES or name in RUNTIME_FIELDS:
            raise ConfigError(f"{at}: unknown setting{suggestion(str(name), FIELD_TYPES)}")
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
        base_type = FIELD_TYPES[name].replace(" | None", "")
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


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2`: distinct integers >= 0."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"--seeds: expected integers separated by commas, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct integers >= 0, got {text!r}")
    return seeds
