"""Values as people read them: in run names, tags and tables (`fmt`), and URLs with their
password hidden (`masked`)."""

from __future__ import annotations

import urllib.parse
from typing import Any


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
