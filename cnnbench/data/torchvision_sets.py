"""torchvision's image-classification sets as arrays: the three built-in names (MNIST,
Fashion-MNIST, CIFAR-10, checked against their known sizes) and `torchvision:NAME` for
any other (`torchvision:SVHN`, `torchvision:KMNIST`, `torchvision:EMNIST:balanced`, the
part after a second ':' being the class's `split`), downloaded where missing and online.
A download that fails removes the folders it created: nothing half-written.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnnbench.data.info import DatasetInfo
from cnnbench.errors import DataError

DATA_ENV = "CNNBENCH_DATA"

Arrays = tuple[Tensor, Tensor]


def read_builtin(info: DatasetInfo, root: Path, *, train: bool) -> Arrays:
    import torchvision  # only where a data set is read from its files (its import takes a second)

    cls = getattr(torchvision.datasets, info.torchvision_class)
    split = "train" if train else "test"
    ds = open_set(cls, root, info.name, info.folder, dict(train=train), split)
    x, y = as_tensors(ds.data, ds.targets, info.name)
    expected = info.n_train if train else info.n_test
    if x.shape != (expected, info.channels, info.size, info.size) or y.shape != (expected,):
        raise DataError(f"{root / info.folder}: the {info.name} {split} set has {x.shape[0]} images of shape "
                        f"{tuple(x.shape[1:])} and {y.shape[0]} labels; expected {expected} of "
                        f"{(info.channels, info.size, info.size)} (truncated or corrupt?)")
    if y.min() < 0 or y.max() >= info.classes:
        raise DataError(f"{root / info.folder}: the {info.name} {split} labels lie outside 0..{info.classes - 1} (corrupt?)")
    return x, y


def torchvision_class(name: str) -> Any:
    """The torchvision.datasets class `NAME` names (`NAME:SPLIT` too)."""
    import torchvision

    cls_name = name.partition(":")[0]
    cls = getattr(torchvision.datasets, cls_name, None)
    if not inspect.isclass(cls) or not issubclass(cls, torchvision.datasets.VisionDataset):
        known = sorted(n for n, c in vars(torchvision.datasets).items()
                       if inspect.isclass(c) and issubclass(c, torchvision.datasets.VisionDataset) and n[0].isupper())
        raise DataError(f"torchvision:{name}: torchvision.datasets has no data set {cls_name!r}; "
                        f"known: {', '.join(known[:30])}{' ...' if len(known) > 30 else ''}")
    return cls


def set_folder(name: str, root: Path) -> Path:
    """Where torchvision keeps the files of set `name` under `root` (its class name for the
    MNIST family, its `base_folder` for CIFAR, STL10, ...; else `root` itself)."""
    cls = torchvision_class(name)
    for folder in (cls.__name__, getattr(cls, "base_folder", None)):
        if folder and (root / folder).is_dir():
            return root / folder
    return root


def read_named(name: str, root: Path) -> tuple[Arrays, Arrays, int]:
    """(train, test, classes) of `torchvision:NAME`."""
    cls = torchvision_class(name)
    variant = name.partition(":")[2]
    arguments = inspect.signature(cls).parameters  # of the class: train=, split=
    out = []
    for train in (True, False):
        split = "train" if train else "test"
        if "train" in arguments:
            kwargs: dict[str, Any] = dict(train=train, **({"split": variant} if variant else {}))
        elif "split" in arguments:
            kwargs = dict(split=split)
        else:
            raise DataError(f"torchvision:{name}: {cls.__name__} has no train and test split (no `train` or "
                            "`split` argument); use imagefolder:PATH or npz:PATH")
        ds = open_set(cls, root, f"torchvision:{name}", cls.__name__, kwargs, split)
        out.append(arrays_of(ds, name))
    names = getattr(ds, "classes", None)
    classes = len(names) if names else int(out[0][1].max()) + 1
    for (x, y), split in zip(out, ("train", "test")):
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise DataError(f"torchvision:{name}: {split} labels lie outside 0..{classes - 1}")
        if x.shape[2] != x.shape[3]:
            raise DataError(f"torchvision:{name}: images of {x.shape[2]}x{x.shape[3]} pixels; cnnbench takes "
                            "square images")
    return out[0], out[1], classes


def arrays_of(ds: Any, name: str) -> Arrays:
    """A torchvision set's images and labels: its `data` and `targets` (or `labels`) where it
    holds them as arrays, else each (PIL image, label) read in turn."""
    data = getattr(ds, "data", None)
    labels = getattr(ds, "targets", None)
    labels = getattr(ds, "labels", None) if labels is None else labels
    if data is not None and labels is not None and len(data) == len(labels) and not isinstance(data, list):
        return as_tensors(data, labels, f"torchvision:{name}")
    images, targets = [], []
    for img, label in ds:
        images.append(np.asarray(img))
        targets.append(int(label))
    return as_tensors(np.stack(images), targets, f"torchvision:{name}")


def open_set(cls: Any, root: Path, name: str, folder: str, kwargs: dict[str, Any], split: str) -> Any:
    """The set read from `root`, downloaded when missing."""
    try:
        return cls(root=str(root), download=False, **kwargs)
    except RuntimeError as err:
        if "not found" not in str(err).lower():
            raise DataError(f"{root / folder}: cannot read the {name} {split} set ({describe(err)})") from None
        return download(cls, root, name, folder, kwargs)
    except Exception as err:  # truncated or corrupt files fail inside torchvision's readers
        raise DataError(f"{root / folder}: cannot read the {name} {split} set "
                        f"({describe(err)}); delete the files to download them again") from None


def download(cls: Any, root: Path, name: str, folder: str, kwargs: dict[str, Any]) -> Any:
    # folders the download creates are removed again if it fails: nothing half-written
    created = [p for p in (root, root / folder) if not p.exists()]
    try:
        return cls(root=str(root), download=True, **kwargs)
    except Exception as err:
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)
        raise DataError(
            f"{name} is not in {root.resolve()} and could not be downloaded ({describe(err, 120)}); "
            f"set {DATA_ENV} or --data-dir to a folder that holds {folder}/") from None


def describe(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {text}" if text and text != type(err).__name__ else type(err).__name__


def as_tensors(data: Any, targets: Any, name: str) -> Arrays:
    """uint8 images (N, C, H, W) from N x H x W, N x H x W x C or N x C x H x W, and int64 labels."""
    x = torch.as_tensor(np.asarray(data))
    if x.dtype != torch.uint8:
        raise DataError(f"{name}: expected uint8 images, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)  # N x H x W x C (CIFAR) -> N x C x H x W; SVHN and STL10 are already so
    elif x.dim() != 4:
        raise DataError(f"{name}: expected images N x H x W or N x H x W x C, got shape {tuple(x.shape)}")
    return x.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.int64)
