"""Values as people read them: in run names, tags and tables (`fmt`), URLs with their
password hidden (`masked`), and the nearest known name to a mistyped one (`suggestion`)."""

from __future__ import annotations

import difflib
import urllib.parse
from typing import Any, Iterable


def fmt(value: Any) -> str:
    """`None` as null, floats in their shortest form (0.01, 1e-05), anything else as str."""
    return "null" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def masked(uri: str) -> str:
    """`uri` with any password replaced by ***, for messages, tags and results."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def suggestion(key: str, known: Iterable[str]) -> str:
    """` (did you mean 'lr'?)` for the known name closest to a mistyped `key`; "" when none is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
