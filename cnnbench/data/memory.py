"""Does a data set fit? The free memory of a device (on the CPU: the RAM available), and
the one-line refusal of a data set larger than that, given before it is read or copied."""

from __future__ import annotations

import os

import torch

from cnnbench.errors import DataError


def free_bytes(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's free memory, the CPU's available RAM (Linux's
    MemAvailable: free plus what the kernel can reclaim); None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def size_text(n: float) -> str:
    """Bytes as people read them: 47.0 MB, 1.2 GB (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_fits(nbytes: int, device: torch.device, what: str, *, free: int | None = None) -> None:
    """DataError on one line when `nbytes` of images (`what`: the data set) exceed the free
    memory of `device` (`free`: that figure when already known)."""
    free = free_bytes(device) if free is None else free
    if free is not None and nbytes > free:
        where = "available RAM" if device.type == "cpu" else f"free memory of {device}"
        raise DataError(f"{what}: its images take {size_text(nbytes)}, more than the {size_text(free)} of {where}; "
                        "use a smaller data set or a device with more memory")
