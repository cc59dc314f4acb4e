"""The optional parts of cnnbench, pyproject's extras: a command that needs one and finds
it missing says which, in one line, before it does anything.

`pip install cnnbench` is what `cnnbench run`, `study` and `sweep` need (torch, MLflow,
Optuna, pandas, seaborn...); `cnnbench[report]` adds Jupyter for `cnnbench report`,
`cnnbench[ui]` Playwright for `cnnbench ui-screenshot` (and optuna-dashboard),
`cnnbench[postgres]` the PostgreSQL drivers for postgresql:// stores, `cnnbench[ray]` and
`cnnbench[slurm]` the cluster engines of `--executor ray` and `--executor slurm`.
"""

from __future__ import annotations

import importlib.util
from typing import Iterable

from cnnbench.errors import MissingExtra

# the modules each extra brings that cnnbench imports (pyproject.toml lists the packages)
EXTRAS = {
    "report": ("papermill", "nbformat", "nbconvert", "nbclient", "jupyter_client", "ipykernel"),
    "ui": ("playwright",),
    "postgres": ("psycopg", "psycopg2"),
    "ray": ("ray",),
    "slurm": ("submitit",),
}


def missing(modules: Iterable[str]) -> list[str]:
    """The modules of `modules` that cannot be imported here (found, not imported)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a dotted name whose parent is missing
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, modules: Iterable[str] | None = None, *, what: str) -> None:
    """A MissingExtra (a ConfigError: exit status 2, one line) when a module of `extra`
    (by default all of EXTRAS[extra]) is missing: "`what` needs the `extra` extra: pip
    install 'cnnbench[extra]' (no module X)"."""
    gone = missing(EXTRAS[extra] if modules is None else modules)
    if gone:
        raise MissingExtra(f"{what} needs the {extra} extra: pip install 'cnnbench[{extra}]' "
                           f"(no module {', '.join(gone)})")
