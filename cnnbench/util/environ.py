"""Environment variables set for a while: the settings worker processes and kernels inherit."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def variables(values: dict[str, str], *, keep_set: bool = False) -> Iterator[None]:
    """Within: `values` in os.environ (with `keep_set`, a variable already set keeps its
    value: a user's own setting wins); afterwards each variable as it was before."""
    before = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if not (keep_set and before[k] is not None):
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
