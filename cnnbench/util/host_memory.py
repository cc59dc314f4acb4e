"""The C library's allocator told to keep the memory a training step frees, so that the
next step reuses it instead of asking the kernel for fresh pages.

PyTorch's CPU tensors come from `malloc`. glibc serves a request above its mmap threshold
(128 KiB at first, raised as such blocks are freed, at most 32 MiB) with a fresh `mmap`,
and it gives the top of its heap back to the kernel once more than its trim threshold
(twice the mmap threshold) lies free there. A wide step frees and allocates again tens of
MiB of activations and gradients every step (LeNet-5, K = 8, batch 64: the first
convolution's output and its gradient are 9.6 MiB each), so every step the kernel faulted
in and zeroed the same pages once more: about 5,800 minor page faults per step, 22.8 ms a
step on one thread of the 2-core AMD EPYC against 14.8 ms with the thresholds below and
no fault at all; K = 16: 44.7 -> 30.7 ms; K = 3 had no faults either way (docs/speed.md).

`keep_freed_memory()` sets the mmap threshold to its largest value and the trim threshold
to 256 MiB (`mallopt`; a fixed mmap threshold also stops glibc adjusting it), once per
process, where the C library is glibc; elsewhere (macOS, musl) it does nothing. A
process then keeps what it freed for its next allocations instead of returning it: its
resident size stays at its peak. `CNNBENCH_KEEP_FREED_MEMORY=0` leaves the allocator as
it is (to measure the difference, or where a process must give memory back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from cnnbench.errors import ConfigError

KEEP_ENV = "CNNBENCH_KEEP_FREED_MEMORY"  # 0: leave the C library's allocator alone

# mallopt's parameters (glibc's malloc.h) and the values set
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 256 << 20

_lock = threading.Lock()
_done: list[bool] = []  # [applied] once decided in this process


def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (it has `gnu_get_libc_version`), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def wanted() -> bool:
    """False where `CNNBENCH_KEEP_FREED_MEMORY` says 0."""
    value = os.environ.get(KEEP_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ConfigError(f"{KEEP_ENV}={value!r}: expected 1 or 0")
    return value != "0"


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (see the module's docstring) once in this process; True
    where they are set, False where the C library is not glibc or the setting says no."""
    with _lock:
        if not _done:
            libc = glibc() if wanted() else None
            _done.append(libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
                         and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
        return _done[0]


def kept() -> bool:
    """Whether this process keeps its freed memory: keep_freed_memory() has run here and set
    the thresholds (it does not run it)."""
    with _lock:
        return bool(_done and _done[0])
