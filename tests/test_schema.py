"""One home for the record's schema: every MLflow tag, param and metric key and every
Optuna attribute name is a constant of `cnnbench.track.schema` (the per-epoch record's of
`cnnbench.config.record`, which the schema re-exports), and no other module of the
package spells one. See the schema's docstring.

The walk reads each module's AST (docstrings left out) and reports a string literal that
- equals a key that cannot be an ordinary word (one with a `.` or `/`: `test/acc`,
  `cnnbench.kind`, the prefix `scientific.`), anywhere;
- is a key behind a column prefix (`tags.`, `params.`, `metrics.`, Optuna's
  `user_attrs_`): `params.seed`, "tags.`mlflow.parentRunId` = '...'";
- stands where a key goes, whatever it says: the key argument of `set_user_attr`,
  `set_tag`, `log_metric`, `Metric`, `RunTag`, ..., a key read from or written to
  `.user_attrs`, `.tags`, `.params`, `.metrics` (`.get(k)`, `[k]`, `k in`), or a key of
  a dict passed as `tags=`, `params=`, `user_attrs=`, assigned to `tags`/`metrics`/...,
  or looped over to `set_user_attr`/`set_tag`.
Keys that are ordinary words (`status`, `seed`, `model`) are found in those places only:
elsewhere the same word names a frame's column or a JSON field, which is not a key.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cnnbench.config import record
from cnnbench.track import schema

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cnnbench"
HOMES = {"cnnbench.track.schema", "cnnbench.config.record"}  # the modules that may spell keys
# The only literals elsewhere that read as keys and are not, each with the reason:
ALLOWED = {
    # a spec's path in an error message ("lr.yaml: search.lr: a grid needs a step"): the
    # spec's `search:` block, which a sweep run's `search.<name>` params mirror
    ("cnnbench.config.space", "search."),
}

COLUMN_PREFIXES = ("tags.", "params.", "metrics.", schema.OPTUNA_USER_ATTRS_COLUMN)
# call -> position of its key argument
KEY_ARGUMENT = {
    "set_user_attr": 0, "set_system_attr": 0, "set_trial_user_attr": 1, "set_study_user_attr": 1,
    "set_tag": 1, "delete_tag": 1, "log_metric": 1, "log_param": 1, "get_metric_history": 1,
    "Metric": 0, "RunTag": 0, "Param": 0,
}
WRITES = {"set_user_attr", "set_trial_user_attr", "set_study_user_attr", "set_tag", "log_metric", "log_param"}
CONTAINERS = {"user_attrs", "system_attrs", "tags", "params", "metrics"}  # .X[k], .X.get(k), k in .X
CONTAINER_NAMES = CONTAINERS | {"attrs"}  # the same as a local name
DICT_KEYWORDS = {"tags", "params", "user_attrs", "metrics"}


def constants(module) -> dict[str, str]:
    """A schema module's keys: its upper-case str constants, by name."""
    return {k: v for k, v in vars(module).items() if k.isupper() and isinstance(v, str)}


def keys() -> set[str]:
    return set(constants(schema).values()) | set(constants(record).values()) | set(schema.STATS_METRICS) \
        | set(schema.STATS_TAGS)


def distinctive(key: str) -> bool:
    return "." in key or "/" in key


def behind_prefix(text: str, known: set[str]) -> str | None:
    """The key that `text` names behind a column prefix: `params.seed` -> seed."""
    for prefix in COLUMN_PREFIXES:
        if text.startswith(prefix):
            rest = text[len(prefix):].lstrip("`")
            for key in sorted(known, key=len, reverse=True):
                if key[-1] in "./" and rest.startswith(key):
                    return key
                if rest.startswith(key) and re.match(r"[^\w./]|$", rest[len(key):]):
                    return key
    return None


def docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def strings(node: ast.AST | None) -> list[ast.Constant]:
    """The str literals that make up an expression (an f-string's constant parts, the
    operands of `+`), not those inside calls or subscripts."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node]
    if isinstance(node, ast.JoinedStr):
        return [v for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp):
        return strings(node.left) + strings(node.right)
    return []


def dict_keys(node: ast.AST | None) -> list[ast.AST]:
    """The keys of a dict expression, through `**` spreads and conditionals."""
    if isinstance(node, ast.Dict):
        out: list[ast.AST] = []
        for k, v in zip(node.keys, node.values):
            out.extend(dict_keys(v) if k is None else [k])
        return out
    if isinstance(node, ast.DictComp):
        return [node.key]
    if isinstance(node, ast.IfExp):
        return dict_keys(node.body) + dict_keys(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [k for v in node.values for k in dict_keys(v)]
    return []


def call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def container(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in CONTAINERS) or \
        (isinstance(node, ast.Name) and node.id in CONTAINER_NAMES)


def key_places(tree: ast.AST) -> list[ast.AST]:
    """The expressions that stand where a record key goes."""
    out: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = call_name(node)
            if name in KEY_ARGUMENT and len(node.args) > KEY_ARGUMENT[name]:
                out.append(node.args[KEY_ARGUMENT[name]])
            if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and container(node.func.value) \
                    and node.args:
                out.append(node.args[0])
            out.extend(k for kw in node.keywords if kw.arg in DICT_KEYWORDS for k in dict_keys(kw.value))
        elif isinstance(node, ast.Subscript) and container(node.value):
            out.append(node.slice)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
                and any(container(c) for c in node.comparators):
            out.append(node.left)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in CONTAINER_NAMES
                                                  for t in node.targets):
            out.extend(dict_keys(node.value))
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.Call) \
                and isinstance(node.iter.func, ast.Attribute) and node.iter.func.attr == "items" \
                and any(isinstance(n, ast.Call) and call_name(n) in WRITES for b in node.body for n in ast.walk(b)):
            out.extend(dict_keys(node.iter.func.value))
    return out


def literal_keys(source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, literal) for every literal key in one module's source (see the module docstring)."""
    tree = ast.parse(source)
    skip = docstrings(tree)
    found: dict[int, tuple[int, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            if (text in known and distinctive(text)) or behind_prefix(text, known):
                found[id(node)] = (node.lineno, text)
    for place in key_places(tree):
        for node in strings(place):
            if re.search(r"\w", node.value):  # a separator ("/") alone is no key
                found[id(node)] = (node.lineno, node.value)
    return sorted(found.values())


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_no_literal_key_outside_the_schema():
    known = keys()
    assert len(known) > 100
    found = [(name, line, text) for name, path in sorted(modules().items()) if name not in HOMES
             for line, text in literal_keys(path.read_text(), known)]
    bad = [f"{name}:{line}: {text!r}" for name, line, text in found if (name, text) not in ALLOWED]
    assert bad == [], "literal keys (use cnnbench.track.schema's constants):\n" + "\n".join(bad)
    # the allowances are used, so a stale one is noticed
    assert {(name, text) for name, _, text in found} == ALLOWED


def test_one_constant_per_key():
    """Within a family (TAG_, PARAM_, METRIC_ with the per-epoch record's, ATTR_, STUDY_, ...)
    no two constants name one key."""
    per_epoch = constants(record)
    families: dict[str, dict[str, str]] = {}
    for name, value in constants(schema).items():
        family = families.setdefault("METRIC" if name in per_epoch else name.split("_")[0], {})
        assert value not in family, f"{name} and {family.get(value)} are both {value!r}"
        family[value] = name


def test_the_schema_reexports_the_record_keys():
    assert constants(record) == {k: v for k, v in constants(schema).items() if k in constants(record)}
    assert set(schema.RECORD_KEYS) == set(constants(record).values())


def test_mlflow_names_agree_with_mlflow():
    from mlflow.utils import mlflow_tags

    for name in ("MLFLOW_PARENT_RUN_ID", "MLFLOW_RUN_NAME", "MLFLOW_RUN_NOTE", "MLFLOW_GIT_COMMIT",
                 "MLFLOW_SOURCE_NAME"):
        assert getattr(schema, name) == getattr(mlflow_tags, name)


KNOWN = {"test/acc", "cnnbench.kind", "mlflow.parentRunId", "mlflow.runName", "scientific.", "seed", "status",
         "mlflow_run_id", "user_attrs_", "best_epoch"}


@pytest.mark.parametrize("source, expected", [
    # a distinctive key, anywhere
    ('x = "test/acc"\n', [(1, "test/acc")]),
    ('best = result.best("test/acc")\n', [(1, "test/acc")]),
    ('q = f"scientific.{name}"\n', [(1, "scientific.")]),
    # behind a column prefix
    ('col = runs["tags.mlflow.runName"]\n', [(1, "tags.mlflow.runName")]),
    ('col = runs["params.seed"]\n', [(1, "params.seed")]),
    ("q = f\"tags.`mlflow.parentRunId` = '{p}'\"\n", [(1, "tags.`mlflow.parentRunId` = '")]),
    ('col = row.get("user_attrs_best_epoch")\n', [(1, "user_attrs_best_epoch")]),
    # where a key goes, whatever it says
    ('trial.set_user_attr("mlflow_run_id", run_id)\n', [(1, "mlflow_run_id")]),
    ('client.set_tag(run_id, "anything", "x")\n', [(1, "anything")]),
    ('v = run.data.tags.get("seed", -1)\n', [(1, "seed")]),
    ('v = t.user_attrs["status"]\n', [(1, "status")]),
    ('taken = "worker_pid" in t.user_attrs\n', [(1, "worker_pid")]),
    ('m = Metric("loss", 1.0, 0, 0)\n', [(1, "loss")]),
    ('client.create_run(e, tags={TAG_KIND: k, **({"model": m} if m else {})})\n', [(1, "model")]),
    ('tags = {"dataset": c.dataset}\n', [(1, "dataset")]),
    ('for k, v in {"status": s}.items():\n    trial.set_user_attr(k, v)\n', [(1, "status")]),
    ('params = {f"fixed.{k}": v for k, v in fixed.items()}\n', [(1, "fixed.")]),
    # not keys: constants, ordinary words elsewhere, prose, docstrings, separators
    ('trial.set_user_attr(ATTR_MLFLOW_RUN_ID, run_id)\nq = f"{PREFIX_SCIENTIFIC}{name}"\n', []),
    ('row = {"status": s, "seed": 0}\nframe["status"]\n', []),
    ('print("the chart view of test/acc")\n', []),
    ('def f():\n    """test/acc"""\n', []),
    ('m = Metric(f"{PREFIX_STATS}{a}/{b}", 1.0, 0, 0)\n', []),
])
def test_the_literal_key_walk(source, expected):
    assert literal_keys(source, KNOWN) == expected
