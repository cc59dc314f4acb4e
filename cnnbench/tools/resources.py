"""The files cnnbench ships beside its code: the document studies (`studies/*.yaml`) and
the report notebooks (`notebooks/*.ipynb`).

They have one home, the repository's top-level `studies/` and `notebooks/` (the
Makefile, README and tests use them there); a wheel carries them as package data,
`cnnbench/resources/studies/` and `cnnbench/resources/notebooks/` (pyproject.toml maps
them there). So a file is looked for in the checkout this cnnbench runs from first,
else in the installed package.
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = {"studies": ".yaml", "notebooks": ".ipynb"}


def checkout() -> Path | None:
    """The repository checkout this cnnbench is imported from (the folder holding
    cnnbench/, pyproject.toml, studies/, notebooks/, tests/), None for an installed one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "studies").is_dir() else None


def folders(kind: str) -> list[Path]:
    """Where files of `kind` ("studies" or "notebooks") may be, in order: the checkout's
    folder, the installed package's."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of resource {kind!r}; known: {', '.join(KINDS)}")
    from importlib.resources import files

    root = checkout()
    packaged = Path(os.fspath(files("cnnbench"))) / "resources" / kind
    return ([root / kind] if root is not None else []) + [packaged]


def folder(kind: str) -> Path:
    """The folder of `kind` in use: the first of `folders` that exists (else the first)."""
    candidates = folders(kind)
    return next((f for f in candidates if f.is_dir()), candidates[0])


def path(kind: str, name: str) -> Path:
    """The file `name` of `kind` (`path("studies", "lr")` is lr.yaml; the suffix may be
    given): the first that exists, else where it would be in `folder(kind)`."""
    file_name = name if name.endswith(KINDS[kind]) else name + KINDS[kind]
    for place in folders(kind):
        if (place / file_name).is_file():
            return place / file_name
    return folder(kind) / file_name


def names(kind: str) -> list[str]:
    """The files of `kind` there are, without their suffix (`names("studies")`: lr, batch...)."""
    return sorted(p.stem for p in folder(kind).glob(f"*{KINDS[kind]}"))


def spec_file(text: str) -> Path:
    """A spec named on the command line: the file `text` when it exists; else, when `text`
    is a shipped study's name (`lr`) or its path in the repository (`studies/lr.yaml`),
    the shipped study, so that an installed cnnbench runs the document studies as the
    README writes them; else `text` as it is (its loader says it does not exist)."""
    given = Path(text)
    if given.exists():
        return given
    stem = given.name.removesuffix(KINDS["studies"])
    bare = given.parent == Path(".") and given.suffix in ("", KINDS["studies"])
    in_studies = given.parent == Path("studies") and given.suffix == KINDS["studies"]
    if (bare or in_studies) and path("studies", stem).is_file():
        return path("studies", stem)
    return given
