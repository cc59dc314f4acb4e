"""The user's image files as arrays: `imagefolder:PATH` and `npz:PATH`.

An image folder holds one folder per class of PNG or JPEG images, as torchvision's
`ImageFolder` reads it (classes in sorted order, label i for the i-th): `PATH/train/` and
`PATH/test/`, or the class folders in PATH itself (a set without a test split, which the
`test_fraction` setting splits). Images are decoded once: grayscale where every image is,
else RGB; all of one square size. Their order is shuffled once, fixed and seeded (the
files come sorted by class), so that `train_subset` and `test_subset` take every class.
The decoded arrays are cached beside the images (`.cnnbench-images.npz`), keyed by the
files' sizes and times.

An npz file holds `x_train`, `y_train`, `x_test`, `y_test`: uint8 images N x H x W or
N x H x W x C and integer labels 0..K-1 (K: an optional `classes` array's length, else
the largest training label + 1).

Bad input is a DataError naming the first bad file or array, before anything is written.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cnnbench.data.info import files_key
from cnnbench.data.memory import check_fits
from cnnbench.errors import DataError
from cnnbench.util import fileio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")  # PIL modes of one channel
ORDER_SEED = 20240602  # the fixed order of an image folder's images
ARRAYS = ("x_train", "y_train", "x_test", "y_test")

Arrays = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------------------
# image folders


def class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_splits(root: Path) -> tuple[Path, Path | None]:
    """(the training folder, the test folder or None) of an image folder."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (imagefolder:PATH names a folder of class folders)")
    train = root / "train"
    if train.is_dir():
        return train, (root / "test") if (root / "test").is_dir() else None
    if (root / "test").is_dir():
        raise DataError(f"{root}: has test/ but no train/ folder")
    return root, None


def listing(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(class names, training files with labels, test files with labels)."""
    train_dir, test_dir = folder_splits(root)
    classes = class_folders(train_dir)
    if not classes:
        raise DataError(f"{train_dir}: no class folders (one folder of PNG or JPEG images per class)")
    names = [c.name for c in classes]
    index = {n: i for i, n in enumerate(names)}
    split_files = []
    for folder in (train_dir, test_dir):
        files: list[tuple[Path, int]] = []
        for cls in class_folders(folder) if folder is not None else []:
            if cls.name not in index:
                raise DataError(f"{cls}: class {cls.name!r} has no folder among the training classes ({train_dir})")
            found = image_files(cls)
            if not found:
                raise DataError(f"{cls}: no PNG or JPEG images")
            files += [(f, index[cls.name]) for f in found]
        split_files.append(files)
    return names, split_files[0], split_files[1]


def image_layout(files: list[tuple[Path, int]], root: Path) -> tuple[str, int]:
    """(PIL mode to decode to, size) from the images' headers: DataError naming the first
    file that is not an image or not of the first one's square size."""
    from PIL import Image, UnidentifiedImageError  # only where images are read (torchvision needs it)

    gray, size, first = True, None, None
    for path, _ in files:
        try:
            with Image.open(path) as img:
                mode, shape = img.mode, img.size
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable image ({' '.join(str(err).split())[:160]})") from None
        if size is None:
            size, first = shape, path
            if shape[0] != shape[1]:
                raise DataError(f"{path}: {shape[0]}x{shape[1]} pixels; cnnbench takes square images "
                                "(crop or pad them)")
        elif shape != size:
            raise DataError(f"{path}: {shape[0]}x{shape[1]} pixels, but {first} is {size[0]}x{size[1]}; "
                            f"the images of {root} must share one size")
        gray = gray and mode in GRAY_MODES
    assert size is not None
    return ("L" if gray else "RGB"), size[0]


def decode(files: list[tuple[Path, int]], mode: str, size: int) -> Arrays:
    from PIL import Image

    channels = 1 if mode == "L" else 3
    x = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                x[i] = np.asarray(img.convert(mode)).reshape(size, size, channels)
        except (OSError, ValueError) as err:  # a truncated or corrupt file fails when decoded
            raise DataError(f"{path}: unreadable image ({' '.join(str(err).split())[:160]})") from None
    y = np.array([label for _, label in files], dtype=np.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def shuffled(x: Tensor, y: Tensor) -> Arrays:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(ORDER_SEED))
    return x[order], y[order]


def read_imagefolder(root: Path) -> tuple[Arrays, Arrays, int]:
    """(train, test, classes) of an image folder; the test arrays are empty without a test split."""
    names, train_files, test_files = listing(root)
    cache = root / ".cnnbench-images.npz"
    key = files_key([f for f, _ in train_files + test_files])
    cached = read_arrays_cache(cache, key)
    if cached is not None:
        return cached
    mode, size = image_layout(train_files + test_files, root)
    channels = 1 if mode == "L" else 3
    check_fits(len(train_files + test_files) * channels * size * size, torch.device("cpu"), f"imagefolder:{root}")
    train = shuffled(*decode(train_files, mode, size))
    test = shuffled(*decode(test_files, mode, size)) if test_files else \
        (torch.empty(0, channels, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    write_arrays_cache(cache, key, train, test, len(names))
    return train, test, len(names)


def read_arrays_cache(path: Path, key: str) -> tuple[Arrays, Arrays, int] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return ((torch.from_numpy(z["x_train"]), torch.from_numpy(z["y_train"])),
                    (torch.from_numpy(z["x_test"]), torch.from_numpy(z["y_test"])), int(z["classes"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def write_arrays_cache(path: Path, key: str, train: Arrays, test: Arrays, classes: int) -> None:
    """The decoded images beside them (a folder that cannot be written keeps no cache)."""
    arrays = dict(key=np.array(key), classes=np.array(classes), x_train=train[0].numpy(), y_train=train[1].numpy(),
                  x_test=test[0].numpy(), y_test=test[1].numpy())
    try:
        fileio.write_with(path, lambda tmp: np.savez(tmp, **arrays))
    except OSError:
        pass


# ----------------------------------------------------------------------------------------
# npz files


def npz_bytes(path: Path, names: list[str]) -> int:
    """The bytes of the arrays `names` in an npz file, from their headers (nothing decoded)."""
    total = 0
    with zipfile.ZipFile(path) as z:
        for name in names:
            with z.open(f"{name}.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return total


def read_npz(path: Path) -> tuple[Arrays, Arrays, int]:
    """(train, test, classes) of an npz file, checked."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (npz:PATH names a NumPy .npz file)")
    try:
        z = np.load(path, allow_pickle=False)
        files = set(z.files)
    except Exception as err:
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
    with z:
        missing = [a for a in ARRAYS if a not in files]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)}; an npz data set holds "
                            f"{', '.join(ARRAYS)}")
        try:
            check_fits(npz_bytes(path, ["x_train", "x_test"]), torch.device("cpu"), f"npz:{path}")
        except (KeyError, ValueError, zipfile.BadZipFile):
            pass  # headers it cannot read: the arrays' own reading below says what is wrong
        train = npz_split(path, z, "train")
        test = npz_split(path, z, "test")
        names = z["classes"] if "classes" in files else None
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataError(f"{path}: x_train's images are {tuple(train[0].shape[1:])} (C, H, W) but x_test's "
                        f"{tuple(test[0].shape[1:])}")
    classes = len(names) if names is not None else int(train[1].max()) + 1
    for split, (_, y) in (("train", train), ("test", test)):
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise DataError(f"{path}: y_{split}: label {bad} is out of range 0..{classes - 1} "
                            + ("(the classes array)" if names is not None else "(the training labels' range)"))
    return train, test, classes


def npz_split(path: Path, z, split: str) -> Arrays:
    x, y = z[f"x_{split}"], z[f"y_{split}"]
    if x.dtype != np.uint8:
        raise DataError(f"{path}: x_{split}: expected uint8 images, got {x.dtype}")
    if x.ndim not in (3, 4) or (x.ndim == 4 and not 1 <= x.shape[3] <= 4):
        raise DataError(f"{path}: x_{split}: expected images N x H x W or N x H x W x C, got shape {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y_{split}: expected a 1-D array of integer labels, got {y.dtype} of shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: x_{split} has {len(x)} images but y_{split} {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{path}: x_{split}: no images")
    if x.shape[1] != x.shape[2]:
        raise DataError(f"{path}: x_{split}: images of {x.shape[1]}x{x.shape[2]} pixels; cnnbench takes square images")
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    return t.contiguous(), torch.from_numpy(y.astype(np.int64))
