"""Data sets as tensors on the training device: load, split, batch, augment.

An image set is read once (torchvision's sets through `torchvision.datasets`, downloaded
when missing and online: torchvision_sets.py; the user's image folders and npz files:
files.py), checked, and held as one uint8 tensor `(N, C, H, W)` on the device. Each
epoch's order is a permutation drawn from a generator seeded by (seed, epoch); batches
are gathered on the device, converted to float and normalised there, and augmented as
whole batches. There is no per-image PIL path and no DataLoader. What a data set is
(channels, size, classes, mean, std) is `dataset_info`'s (info.py).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cnnbench.data.files import listing, read_imagefolder, read_npz
from cnnbench.data.info import (  # noqa: F401  (DATASETS, DatasetInfo, dataset_problem: re-exported here)
    DATASETS,
    DatasetInfo,
    cache_path,
    compute_info,
    dataset_problem,
    environ_path,
    files_key,
    read_cache,
    split_name,
    write_cache,
)
from cnnbench.data.memory import check_fits
from cnnbench.data.torchvision_sets import DATA_ENV, read_builtin, read_named, set_folder
from cnnbench.errors import DataError  # noqa: F401  (re-exported here)

VAL_SPLIT_SEED = 20240601  # the validation split is fixed: the same images for every trial and seed
TEST_SPLIT_SEED = 20240603  # so is the test split that `test_fraction` holds out
AUGMENTATIONS = ("hflip", "grayscale", "crop")

Arrays4 = tuple[Tensor, Tensor, Tensor, Tensor]


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CNNBENCH_DATA, else ./data (where torchvision downloads)."""
    return Path(explicit or os.environ.get(DATA_ENV) or "data")


# ----------------------------------------------------------------------------------------
# loading (host side, cached per process)

_cache: dict[tuple[str, str], Arrays4] = {}
_infos: dict[tuple[str, str], DatasetInfo] = {}
_cache_lock = threading.RLock()


def _where(dataset: str, root: str | os.PathLike | None) -> tuple[str, str]:
    """A data set's key in this process's caches: its name, and the data folder where that
    is where its files are (torchvision's sets)."""
    kind, what = split_name(dataset)
    if kind in ("imagefolder", "npz"):
        return dataset, str(environ_path(what).resolve())
    return dataset, str(data_dir(root).resolve())


def load_arrays(dataset: str, root: str | os.PathLike | None) -> Arrays4:
    """(train_x, train_y, test_x, test_y) as CPU tensors: uint8 (N, C, H, W) and int64 (N,);
    the test arrays are empty for a data set without a test split (see `train_test`)."""
    key = _where(dataset, root)
    with _cache_lock:
        if key not in _cache:
            _cache[key], _infos[key] = _read(dataset, data_dir(root))
        return _cache[key]


def _read(dataset: str, root: Path) -> tuple[Arrays4, DatasetInfo]:
    kind, what = split_name(dataset)
    if kind == "builtin":
        info = DATASETS[dataset]
        train = read_builtin(info, root, train=True)
        return (*train, *read_builtin(info, root, train=False)), info
    if kind == "imagefolder":
        path = environ_path(what)
        train, test, classes = read_imagefolder(path)
        kind_name, folder = "ImageFolder", str(path.resolve())
    elif kind == "npz":
        path = environ_path(what)
        train, test, classes = read_npz(path)
        kind_name, folder = "npz", str(path.resolve())
    else:
        train, test, classes = read_named(what, root)
        kind_name, folder = what.partition(":")[0], str(set_folder(what, root))
    cache, files = _source(dataset, root)
    key = files_key(files)
    info = read_cache(cache, key)
    if info is None or (info.n_train, info.n_test, info.classes) != (len(train[0]), len(test[0]), classes):
        info = compute_info(dataset, kind_name, folder, train, test, classes)
        write_cache(cache, key, info)
    return (*train, *test), info


def _source(dataset: str, root: Path) -> tuple[Path, list[Path]]:
    """(the file that caches a user's data set's info, the files whose sizes and times key it)."""
    kind, what = split_name(dataset)
    if kind == "imagefolder":
        path = environ_path(what)
        _, train, test = listing(path)
        return cache_path(path), [f for f, _ in train + test]
    if kind == "npz":
        path = environ_path(what)
        return cache_path(path), [path] if path.is_file() else []
    folder = set_folder(what, root)
    files = [p for p in (folder.rglob("*") if folder != root else folder.glob("*"))
             if p.is_file() and not p.name.startswith(".")] if folder.is_dir() else []
    return root / f".cnnbench-info-{what.replace(':', '-')}.json", files


def dataset_info(dataset: str, root: str | os.PathLike | None = None) -> DatasetInfo:
    """What `dataset` is: channels, size, classes, split sizes, mean, std. A user's data set:
    from this process's load of it, else its cached info (files unchanged), else read now."""
    if dataset in DATASETS:
        return DATASETS[dataset]
    key = _where(dataset, root)
    with _cache_lock:
        loaded = [info for (name, _), info in _infos.items() if name == dataset]
        if key not in _infos and loaded:  # read from another data folder by this process
            return loaded[0]
        if key not in _infos:
            cache, files = _source(dataset, data_dir(root))
            info = read_cache(cache, files_key(files))
            if info is not None:
                _infos[key] = info
            else:
                load_arrays(dataset, root)
        return _infos[key]


def train_test(dataset: str, root: str | os.PathLike | None, test_fraction: float = 0.0) -> Arrays4:
    """`load_arrays`, with a set that has no test split split by `test_fraction` (a fixed,
    seeded choice of images). DataError when a test split is missing or given twice."""
    train_x, train_y, test_x, test_y = load_arrays(dataset, root)
    if len(test_x) and test_fraction:
        raise DataError(f"test_fraction: {dataset} has a test split of its own; leave test_fraction at 0")
    if len(test_x):
        return train_x, train_y, test_x, test_y
    if not test_fraction:
        raise DataError(f"{dataset}: no test split (no test/ folder); set test_fraction (0.1, say) to hold out "
                        "part of its images as the test set")
    n_test = held_out(len(train_x), test_fraction)
    if n_test >= len(train_x):
        raise DataError(f"test_fraction: {test_fraction} of {len(train_x)} images leaves none to train on")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
    return train_x[train_idx], train_y[train_idx], train_x[test_idx], train_y[test_idx]


def held_out(n: int, fraction: float) -> int:
    """Images `test_fraction` holds out of `n` (at least one)."""
    return max(1, round(n * fraction)) if fraction else 0


def train_size(dataset: str, *, val_size: int = 0, train_subset: int = 0, test_fraction: float = 0.0,
               root: str | os.PathLike | None = None) -> int:
    """Training images per epoch: the training split less the `test_fraction` and `val_size`
    images held out, cut to `train_subset` when set (what `DeviceData.load` keeps)."""
    info = dataset_info(dataset, root)
    n = info.n_train - (held_out(info.n_train, test_fraction) if not info.n_test else 0) - val_size
    return min(n, train_subset) if train_subset else n


# ----------------------------------------------------------------------------------------
# device-resident data


@dataclass
class Split:
    x: Tensor  # uint8 (N, C, H, W) on the device
    y: Tensor  # int64 (N,) on the device

    def __len__(self) -> int:
        return self.x.shape[0]


class DeviceData:
    """Train / validation / test splits on one device, with the normalisation constants."""

    def __init__(self, info: DatasetInfo, train: Split, val: Split | None, test: Split,
                 device: torch.device, normalize: bool, channels_last: bool) -> None:
        self.info, self.train, self.val, self.test = info, train, val, test
        self.device, self.channels_last = device, channels_last
        mean = torch.tensor(info.mean if normalize else (0.0,) * info.channels, device=device)
        std = torch.tensor(info.std if normalize else (1.0,) * info.channels, device=device)
        # x_float = x_uint8 * scale + shift == (x_uint8 / 255 - mean) / std
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    @classmethod
    def load(cls, *, dataset: str, root: str | os.PathLike, device: torch.device, normalize: bool = True,
             train_subset: int = 0, test_subset: int = 0, val_size: int = 0, test_fraction: float = 0.0,
             channels_last: bool = False) -> "DeviceData":
        info = dataset_info(dataset, root)
        train_x, train_y, test_x, test_y = train_test(dataset, root, test_fraction)
        if val_size >= len(train_x):
            raise DataError(f"val_size: {val_size} leaves no training images out of {len(train_x)}")
        val = None
        if val_size:
            order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
            val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
            val = (train_x[val_idx], train_y[val_idx])
            train_x, train_y = train_x[train_idx], train_y[train_idx]
        if train_subset:
            train_x, train_y = train_x[:train_subset], train_y[:train_subset]
        if test_subset:
            test_x, test_y = test_x[:test_subset], test_y[:test_subset]
        if device.type != "cpu":  # on the CPU the arrays are in memory already
            check_fits(sum(t.nbytes for t in (train_x, test_x, *(val or ()))), device, dataset)

        def put(x: Tensor, y: Tensor) -> Split:
            if device.type == "cuda":  # pinned host memory, then one asynchronous copy each
                x, y = x.pin_memory(), y.pin_memory()
            return Split(x.to(device, non_blocking=True), y.to(device, non_blocking=True))

        return cls(info, put(train_x, train_y), put(*val) if val else None, put(test_x, test_y),
                   device, normalize, channels_last)

    def to_float(self, x: Tensor, augment: "Augmenter | None" = None) -> Tensor:
        """uint8 batch -> (augmented) normalised float32 batch, in the chosen memory format.

        Augmentation sees pixel values in [0, 1], as torchvision's transforms do before
        Normalize, so that a crop pads with black."""
        if augment is None:
            out = torch.addcmul(self.shift, x.float(), self.scale)
        else:
            out = augment(x.float() / 255.0)
            out = torch.addcmul(self.shift, out, self.scale * 255.0)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def epoch_order(self, seed: int, epoch: int) -> Tensor:
        """The training permutation of `epoch` for `seed`: drawn on the CPU so that it is the
        same on every device, moved once per epoch."""
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        return torch.randperm(len(self.train), generator=g).to(self.device, non_blocking=True)

    def augmenter(self, names: tuple[str, ...], seed: int, epoch: int) -> "Augmenter | None":
        return Augmenter(names, self.device, mix_seed(seed, epoch, 1)) if names else None


def mix_seed(*parts: int) -> int:
    """Combine seed, epoch, ... into one 63-bit seed (splitmix64 steps)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class Augmenter:
    """Random augmentation of whole float batches on the device, from its own generator.

    hflip: mirror each image with probability 0.5 (transforms.RandomHorizontalFlip);
    grayscale: with probability 0.1 replace an RGB image by its luma in every channel
    (transforms.RandomGrayscale; one-channel images are unchanged, as torchvision leaves
    them); crop: pad by 4 pixels with zeros and cut a random window of the original size
    (transforms.RandomCrop(size, padding=4)).
    """

    def __init__(self, names: tuple[str, ...], device: torch.device, seed: int) -> None:
        self.names = names
        self.g = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, x: Tensor) -> Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return x

    def _coin(self, x: Tensor, p: float) -> Tensor:
        return (torch.rand(x.shape[0], device=x.device, generator=self.g) < p).view(-1, 1, 1, 1)

    def hflip(self, x: Tensor) -> Tensor:
        return torch.where(self._coin(x, 0.5), x.flip(3), x)

    def grayscale(self, x: Tensor) -> Tensor:
        coin = self._coin(x, 0.1)  # drawn for every input so the stream does not depend on C
        if x.shape[1] != 3:
            return x
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        gray = (x * w).sum(1, keepdim=True).expand_as(x)
        return torch.where(coin, gray, x)

    def crop(self, x: Tensor, pad: int = 4) -> Tensor:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=self.g)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=self.g)
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chan = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        return padded[batch, chan, rows, cols]
