"""Data sets as tensors on the training device: load, split, batch, augment.

An image set is read once (MNIST and Fashion-MNIST straight from their idx files, which
spares the second that importing torchvision takes; anything else, or files not there
yet, through `torchvision.datasets`, which downloads them when online), checked, and held
as one uint8 tensor `(N, C, H, W)` on the device. Each
epoch's order is a permutation drawn from a generator seeded by (seed, epoch); batches
are gathered on the device, converted to float and normalised there, and augmented as
whole batches. There is no per-image PIL path and no DataLoader.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cnnbench.errors import DataError  # noqa: F401  (re-exported here)
from cnnbench.util import timings

DATA_ENV = "CNNBENCH_DATA"
VAL_SPLIT_SEED = 20240601  # the validation split is fixed: the same images for every trial and seed


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: str
    channels: int
    size: int
    classes: int
    n_train: int
    n_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    folder: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "MNIST", 1, 28, 10, 60_000, 10_000, (0.1307,), (0.3081,), "MNIST"),
    "fashion_mnist": DatasetInfo("fashion_mnist", "FashionMNIST", 1, 28, 10, 60_000, 10_000,
                                 (0.2860,), (0.3530,), "FashionMNIST"),
    "cifar10": DatasetInfo("cifar10", "CIFAR10", 3, 32, 10, 50_000, 10_000,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py"),
}
AUGMENTATIONS = ("hflip", "grayscale", "crop")


def train_size(dataset: str, *, val_size: int = 0, train_subset: int = 0) -> int:
    """Training images per epoch: the training split less the `val_size` images held out,
    cut to `train_subset` when set (what `DeviceData.load` keeps)."""
    n = DATASETS[dataset].n_train - val_size
    return min(n, train_subset) if train_subset else n


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CNNBENCH_DATA, else ./data (where torchvision downloads)."""
    return Path(explicit or os.environ.get(DATA_ENV) or "data")


# ----------------------------------------------------------------------------------------
# loading (host side, cached per process)

_cache: dict[tuple[str, str], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
_cache_lock = threading.Lock()


def load_arrays(dataset: str, root: str | os.PathLike) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x, train_y, test_x, test_y) as CPU tensors: uint8 (N, C, H, W) and int64 (N,)."""
    root = Path(root)
    key = (dataset, str(root.resolve()))
    with _cache_lock:
        if key not in _cache:
            info = DATASETS[dataset]
            with timings.phase("start/data loaded"):
                train = _read(info, root, train=True)
                test = _read(info, root, train=False)
            _cache[key] = (*train, *test)
        return _cache[key]


IDX = {"mnist", "fashion_mnist"}  # data sets whose files are idx files (torchvision's raw/ folder)


def _read(info: DatasetInfo, root: Path, *, train: bool) -> tuple[Tensor, Tensor]:
    split = "train" if train else "test"
    idx = _idx_files(info, root, train)
    try:
        x, y = _read_idx(*idx) if idx else _read_torchvision(info, root, train)
    except DataError:
        raise
    except Exception as err:  # truncated or corrupt files fail inside the readers
        raise DataError(f"{root / info.folder}: cannot read the {info.name} {split} set "
                        f"({_describe(err)}); delete the files to download them again") from None
    return _checked(x, y, info, root, split)


def _idx_files(info: DatasetInfo, root: Path, train: bool) -> tuple[Path, Path] | None:
    """The images' and labels' idx files of a split, where both are there (None: not an
    idx data set, or not downloaded yet)."""
    if info.name not in IDX:
        return None
    raw, prefix = root / info.folder / "raw", "train" if train else "t10k"
    files = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    return files if all(f.is_file() for f in files) else None


def _read_idx(images: Path, labels: Path) -> tuple[Tensor, Tensor]:
    """An idx file pair: big-endian header (magic 0x0803 or 0x0801, then each dimension),
    then the uint8 values."""
    x = _idx_tensor(images, 3)
    return x.unsqueeze(1).contiguous(), _idx_tensor(labels, 1).to(torch.int64)


def _idx_tensor(path: Path, dims: int) -> Tensor:
    data = bytearray(path.read_bytes())
    header = 4 + 4 * dims
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if magic != 0x0800 + dims or len(data) < header:
        raise ValueError(f"{path.name}: not an idx file of uint8 with {dims} dimension(s)")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path.name}: {len(data) - header} bytes of values for shape {tuple(shape)}")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).reshape(shape)


def _read_torchvision(info: DatasetInfo, root: Path, train: bool) -> tuple[Tensor, Tensor]:
    import torchvision  # only where a data set is not read from idx files (its import takes seconds)

    cls = getattr(torchvision.datasets, info.torchvision_class)
    split = "train" if train else "test"
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError as err:
        if "not found" not in str(err).lower():
            raise DataError(f"{root / info.folder}: cannot read the {info.name} {split} set ({_describe(err)})") from None
        ds = _download(cls, info, root, train)
    return _as_tensors(ds.data, ds.targets, info)


def _checked(x: Tensor, y: Tensor, info: DatasetInfo, root: Path, split: str) -> tuple[Tensor, Tensor]:
    train = split == "train"
    expected = info.n_train if train else info.n_test
    if x.shape != (expected, info.channels, info.size, info.size) or y.shape != (expected,):
        raise DataError(f"{root / info.folder}: the {info.name} {split} set has {x.shape[0]} images of shape "
                        f"{tuple(x.shape[1:])} and {y.shape[0]} labels; expected {expected} of "
                        f"{(info.channels, info.size, info.size)} (truncated or corrupt?)")
    if y.min() < 0 or y.max() >= info.classes:
        raise DataError(f"{root / info.folder}: the {info.name} {split} labels lie outside 0..{info.classes - 1} (corrupt?)")
    return x, y


def _download(cls, info: DatasetInfo, root: Path, train: bool):
    # folders the download creates are removed again if it fails: nothing half-written
    created = [p for p in (root, root / info.folder) if not p.exists()]
    try:
        return cls(root=str(root), train=train, download=True)
    except Exception as err:
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)
        raise DataError(
            f"{info.name} is not in {root.resolve()} and could not be downloaded ({_describe(err, 120)}); "
            f"set {DATA_ENV} or --data-dir to a folder that holds {info.folder}/") from None


def _describe(err: BaseException, limit: int = 200) -> str:
    text = _one_line(err)
    text = text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {text}" if text and text != type(err).__name__ else type(err).__name__


def _as_tensors(data, targets, info: DatasetInfo) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(data)
    if x.dtype != torch.uint8:
        raise DataError(f"{info.name}: expected uint8 images, got {x.dtype}")
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    return x.contiguous(), torch.as_tensor(targets, dtype=torch.int64)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


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
             train_subset: int = 0, test_subset: int = 0, val_size: int = 0,
             channels_last: bool = False) -> "DeviceData":
        info = DATASETS[dataset]
        train_x, train_y, test_x, test_y = load_arrays(dataset, root)
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
