"""Networks built on torch's meta device: shapes and counts, no memory, no initialisation.

`on_meta()` is `torch.device("meta")` with a stop request held for the stretch
(util.interrupt.shielded). A KeyboardInterrupt raised inside torch's mode machinery
while a network is built on meta comes out as another error ("trying to pop from empty
mode stack"), or cuts a lazy import in half (sympy's) so that later builds fail, and
leaves the mode stack unsound. Seen: a worker stopped by SIGTERM while it looked at its
trials' networks took the error for its network's, went on, and failed its next trials
with "Cannot copy out of meta tensor" (tests/test_reliability.py, the hail of stop
requests, reproduces the errors without the shield).
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
