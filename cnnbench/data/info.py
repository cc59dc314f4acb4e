"""What a data set is (`DatasetInfo`: channels, size, classes, split sizes, mean and std),
for the three built-in names and for the names a user gives: `torchvision:NAME` (any of
torchvision's image-classification sets), `imagefolder:PATH` (a folder of class folders),
`npz:PATH` (arrays in a NumPy file).

A user's data set's info comes from its images (`compute_info`), computed once and
cached beside the data (`read_cache`, `write_cache`), keyed by the files' sizes and
modification times (`files_key`): changed files are read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from cnnbench.util import fileio


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: str  # the torchvision.datasets class; "ImageFolder" or "npz" for the user's files
    channels: int
    size: int  # images are size x size
    classes: int
    n_train: int
    n_test: int
    mean: tuple[float, ...]  # per channel, of pixel values in [0, 1] over the training images
    std: tuple[float, ...]
    folder: str  # where its files are (torchvision's: under the data folder)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "MNIST", 1, 28, 10, 60_000, 10_000, (0.1307,), (0.3081,), "MNIST"),
    "fashion_mnist": DatasetInfo("fashion_mnist", "FashionMNIST", 1, 28, 10, 60_000, 10_000,
                                 (0.2860,), (0.3530,), "FashionMNIST"),
    "cifar10": DatasetInfo("cifar10", "CIFAR10", 3, 32, 10, 50_000, 10_000,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py"),
}
KINDS = {"torchvision": "NAME", "imagefolder": "PATH", "npz": "PATH"}  # a user's data set: KIND:WHAT
CACHE_VERSION = 1  # bump when the cached info's meaning changes


def split_name(name: str) -> tuple[str, str]:
    """("builtin", name) for a built-in name, else (kind, what) of `kind:what`."""
    if name in DATASETS:
        return "builtin", name
    kind, _, what = name.partition(":")
    return kind, what


def dataset_problem(name: str) -> str | None:
    """Why `name` cannot name a data set (None: it can; whether its files exist and hold
    images is checked when it is loaded)."""
    if name in DATASETS:
        return None
    kind, sep, what = name.partition(":")
    known = ", ".join([*DATASETS, *(f"{k}:{w}" for k, w in KINDS.items())])
    if not sep:
        return f"unknown value {name!r}; known: {known}"
    if kind not in KINDS:
        return f"unknown kind {kind!r} in {name!r}; known: {known}"
    if not what.strip():
        return f"{name!r}: give a {KINDS[kind]} after '{kind}:'"
    return None


def files_key(files: Iterable[Path]) -> str:
    """A hash of the files' paths, sizes and modification times."""
    h = hashlib.sha1(str(CACHE_VERSION).encode())
    for path in sorted(files):
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def mean_std(x: Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W) as values in [0, 1],
    summed in float64 a chunk at a time (60,000 MNIST images: 0.1307, 0.3081)."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for lo in range(0, x.shape[0], chunk):
        part = x[lo:lo + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(max(v, 1e-6), 6) for v in std.tolist())


def compute_info(name: str, kind: str, folder: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                 classes: int) -> DatasetInfo:
    """The info of arrays already checked: uint8 (N, C, S, S) images, labels in 0..classes-1."""
    x = train[0]
    mean, std = mean_std(x)
    return DatasetInfo(name, kind, x.shape[1], x.shape[2], classes, x.shape[0], test[0].shape[0], mean, std, folder)


def read_cache(path: Path, key: str) -> DatasetInfo | None:
    """The info cached at `path` for files with `key` (None: none, stale or unreadable)."""
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            return None
        info = saved["info"]
        return DatasetInfo(**{**info, "mean": tuple(info["mean"]), "std": tuple(info["std"])})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(path: Path, key: str, info: DatasetInfo) -> None:
    """Cache `info` beside the data; a folder that cannot be written keeps no cache (the
    info is computed again next time)."""
    try:
        fileio.write_text(path, json.dumps({"key": key, "info": asdict(info)}, indent=1) + "\n")
    except OSError:
        pass


def cache_path(data: Path) -> Path:
    """Where the info of the data at `data` (a folder or a file) is cached: a hidden file
    beside a file, inside a folder."""
    data = data.resolve()
    return data / ".cnnbench-info.json" if data.is_dir() else data.parent / f".{data.name}.cnnbench-info.json"


def environ_path(text: str) -> Path:
    """A PATH as given (~ and $VARS expanded)."""
    return Path(os.path.expandvars(os.path.expanduser(text)))
