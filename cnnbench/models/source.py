"""A network from the user's code, by import path: `my_package.nets:SmallNet` names a class
or function in a module, imported here (its folder on the import path: `--model-path`, a
spec's `model_path:` or the spec's own folder, user.add_model_path).

The identity of such a model is its import path plus a hash of its source file
(`file_hash`): an edited network is another model, so a study trains it again instead of
finding it finished in MLflow. A module whose file changed since it was imported is
imported again (`importlib.reload`), so that the code trained is the code hashed.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from cnnbench.errors import ConfigError

# module.path:attr.path, each part a Python name
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
KEYWORDS = ("in_channels", "num_classes", "image_size", "activation", "dropout")  # what a builder may take
SETTINGS = ("activation", "dropout")  # the optional ones: passed when a trial sets them

_hashes: dict[str, tuple[tuple[int, int], str]] = {}  # file -> ((size, mtime_ns), sha1 of its bytes)
_imported: dict[str, str] = {}  # module -> the hash of its file when it was (re)imported


def is_import_path(name: str) -> bool:
    """`module:attr` (a user's model) rather than a registry name."""
    return ":" in name


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def file_hash(path: str | Path) -> str:
    """sha1 of a file's bytes (16 hex digits), recomputed only when its size or time changed."""
    path = str(path)
    st = Path(path).stat()
    stamp = (st.st_size, st.st_mtime_ns)
    if path not in _hashes or _hashes[path][0] != stamp:
        _hashes[path] = (stamp, hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16])
    return _hashes[path][1]


def module_file(module: ModuleType) -> str | None:
    """The module's source file (None: a notebook's __main__, a built-in, a namespace)."""
    path = getattr(module, "__file__", None)
    return path if path and path.endswith(".py") and Path(path).is_file() else None


def fresh_module(name: str, *, ref: str) -> ModuleType:
    """Import module `name` (again, when its file changed since it was imported here).
    ConfigError with the module's own error, on one line."""
    try:
        module = importlib.import_module(name)
        path = module_file(module)
        if path is not None:
            digest = file_hash(path)
            if _imported.setdefault(name, digest) != digest:
                module = importlib.reload(module)
                _imported[name] = digest
    except Exception as err:  # ImportError, SyntaxError, or anything the module raises while imported
        raise ConfigError(f"model {ref}: cannot import {name} ({one_line(err)})") from None
    return module


def load_attr(ref: str) -> Callable[..., Any]:
    """The class or function an import path names."""
    if not IMPORT_PATH.fullmatch(ref):
        raise ConfigError(f"model {ref!r}: expected a registry name or an import path module.name:ClassOrFunction")
    module_name, _, attr = ref.partition(":")
    obj: Any = fresh_module(module_name, ref=ref)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model {ref}: module {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model {ref}: {attr} is a {type(obj).__name__}, not a class or function")
    return obj


def accepted(builder: Callable[..., Any]) -> tuple[str, ...]:
    """The keywords of KEYWORDS that `builder` takes (all of them where it takes **kwargs)."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C function): give it everything
        return KEYWORDS
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return KEYWORDS
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
    return tuple(k for k in KEYWORDS if k in names)


def code_hash(builder: Callable[..., Any]) -> str:
    """The hash of the file that defines `builder`; where there is none (a notebook's cell),
    of its source text, else of its compiled code."""
    module = sys.modules.get(getattr(builder, "__module__", "") or "")
    path = module_file(module) if module is not None else None
    if path is not None:
        return file_hash(path)
    try:
        text = inspect.getsource(builder).encode()
    except (OSError, TypeError):
        code = getattr(builder, "__code__", None)
        text = repr((code.co_code, code.co_consts) if code is not None else builder).encode()
    return hashlib.sha1(text).hexdigest()[:16]
