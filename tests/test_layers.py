"""The package's shape: layers (import-linter's contract in pyproject.toml), no import
cycle, no private name crossing a module boundary, modules and functions short enough to
read in one sitting. See docs/layout.md."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cnnbench"

# The only private names of other modules or libraries that cnnbench reaches, each in
# one named place, with the reason:
ALLOWED = {
    # Optuna keeps a trial's storage id as `_trial_id` and has no public accessor; its
    # storage API needs that id (heartbeats, state changes). One helper reads it.
    ("cnnbench.run.session", "trial_id", "_trial_id"),
    # torch's multi-tensor kernels (what torch.optim's foreach path runs) have no public
    # name; the per-trial optimizer's step is the one user.
    ("cnnbench.train.per_trial", "PerTrialOptimizer.step", "_foreach_*"),
}
# Names with a leading underscore that their library documents as public
PUBLIC = {("os", "_exit")}  # "exit the process without calling cleanup handlers"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (it is in the dev extra)"
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd)})


def test_layer_contract_is_kept():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_layer_contract_catches_an_upward_import(tmp_path):
    """The contract can fail: a copy of the package where a low layer imports the CLI."""
    shutil.copytree(PACKAGE, tmp_path / "cnnbench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    low = tmp_path / "cnnbench" / "util" / "fileio.py"
    low.write_text(low.read_text() + "\n\ndef upward():\n    from cnnbench import cli  # noqa\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "cnnbench.util is not allowed to import cnnbench.cli" in out.stdout


def module_graph() -> dict[str, set[str]]:
    """Every import between cnnbench's modules, those inside functions included."""
    import grimp

    graph = grimp.build_graph("cnnbench", cache_dir=None)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = module_graph()
    assert len(graph) > 40
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def private_uses(name: str, source: str) -> list[tuple[str, str, str]]:
    """(module, enclosing function, private name) for every `from x import _y` and every
    `x._y` where `x` is not self or cls, in one module's source."""
    found: list[tuple[str, str, str]] = []

    def private(attr: str) -> bool:
        return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))

    def walk(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{where}.{child.name}" if where else child.name
            if isinstance(child, ast.ImportFrom):
                found.extend((name, where, a.name) for a in child.names if private(a.name))
            elif isinstance(child, ast.Attribute) and private(child.attr):
                owner = child.value.id if isinstance(child.value, ast.Name) else None
                if owner not in ("self", "cls") and (owner, child.attr) not in PUBLIC:
                    found.append((name, where, child.attr))
            walk(child, inner)

    walk(ast.parse(source), "")
    return found


def allowed(use: tuple[str, str, str]) -> bool:
    module, where, attr = use
    for m, w, a in ALLOWED:
        if m == module and w == where and (attr == a or (a.endswith("*") and attr.startswith(a[:-1]))):
            return True
    return False


def test_no_private_name_crosses_a_module_boundary():
    uses = [u for name, path in modules().items() for u in private_uses(name, path.read_text())]
    bad = [u for u in uses if not allowed(u)]
    assert bad == [], "\n".join(f"{m} ({w or 'module level'}): {a}" for m, w, a in bad)
    # the allowances are used, so a stale one is noticed
    assert {(m, w) for m, w, _ in uses if allowed((m, w, _))} == {(m, w) for m, w, _ in ALLOWED}


@pytest.mark.parametrize("source, expected", [
    ("from cnnbench.data.tensors import _mix\n", [("m", "", "_mix")]),
    ("import optuna\ndef f(t):\n    return t._trial_id\n", [("m", "f", "_trial_id")]),
    ("class A:\n    def f(self):\n        return self._x, cls._y, self.__dict__\n", []),
    ("x = a.b.__class__\n", []),
    ("import os\nos._exit(0)\nsys._getframe()\n", [("m", "", "_getframe")]),
])
def test_the_private_name_walk(source, expected):
    assert private_uses("m", source) == expected


# One job per module: a module of a few hundred lines at most, a function that fits on a
# screen. Lines as the file has them (docstrings and comments count).
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# Modules that are data tables rather than code, allowed past MAX_MODULE_LINES, each with
# its reason. None today: the documents' figures of `cnnbench summary --documents` were
# split off into tools/summary_claims.py (154 lines), away from the code that checks them.
DATA_TABLES: dict[str, str] = {}
def too_long(name: str, source: str) -> list[tuple[str, int]]:
    """(name, lines) of one module's source: the module itself when over MAX_MODULE_LINES,
    and every function (methods and nested ones too, as `module.Class.method`) over
    MAX_FUNCTION_LINES."""
    found = []
    lines = source.count("\n")
    if lines > MAX_MODULE_LINES:
        found.append((name, lines))

    def walk(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{where}.{child.name}"
                length = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and length > MAX_FUNCTION_LINES:
                    found.append((inner, length))
            walk(child, inner)

    walk(ast.parse(source), name)
    return found


def test_modules_and_functions_are_short():
    found = [f for name, path in modules().items() for f in too_long(name, path.read_text())]
    bad = [(n, lines) for n, lines in found if n not in DATA_TABLES]
    assert bad == [], "\n".join(f"{n}: {lines} lines (modules <= {MAX_MODULE_LINES}, functions <= "
                                 f"{MAX_FUNCTION_LINES})" for n, lines in bad)
    # the exceptions are still needed, so a stale one is noticed
    assert {n for n, _ in found} >= set(DATA_TABLES)


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly `lines` lines."""
    return f"{indent}def {name}():\n" + f"{indent}    x = 1\n" * (lines - 1)


@pytest.mark.parametrize("source, expected", [
    (_function("f", 60), []),
    (_function("f", 61), [("m.f", 61)]),
    ("class A:\n" + _function("g", 61, "    "), [("m.A.g", 61)]),
    ("def outer():\n" + _function("inner", 61, "    "), [("m.outer", 62), ("m.outer.inner", 61)]),
    ("x = 1\n" * 500, []),
    ("x = 1\n" * 501, [("m", 501)]),
])
def test_the_length_walk(source, expected):
    assert too_long("m", source) == expected


def test_a_long_function_planted_in_the_package_is_found():
    """The check can fail: a real module with a 61-line function added."""
    name, path = "cnnbench.util.text", PACKAGE / "util" / "text.py"
    assert too_long(name, path.read_text()) == []
    assert too_long(name, path.read_text() + "\n\n" + _function("planted", 61)) == [(f"{name}.planted", 61)]

