"""Networks built on torch's meta device: shapes and counts, no memory, no initialisation.

`on_meta()` is `torch.device("meta")` with a stop request held for the stretch
(util.interrupt.shielded). Torch's device context pushes itself on the thread's mode
stack before its `__enter__` returns: a stop request raised between the two leaves the
mode on the stack with no `__exit__` to pop it, so every tensor the thread makes after
that is a meta tensor. Seen: a worker stopped by SIGTERM while it looked at its trials'
networks went on, and its next trials failed with "Cannot copy out of meta tensor".
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from cnnbench.util import interrupt


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules and tensors made inside are on the meta device; a stop request that comes
    meanwhile is raised once the device context has been left."""
    with interrupt.shielded(), torch.device("meta"):
        yield
