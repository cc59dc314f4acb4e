"""Your own data and the engines your network takes, without training a study: image
folders and npz files written from real MNIST read back exactly, their info computed and
cached beside them, `torchvision:NAME`, `test_fraction`, the device-memory refusal; the
probes that decide wide, vmap or one at a time, and channels-last. See docs/your-own.md."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnbench.config.trial import TrialConfig
from cnnbench.data import files
from cnnbench.data.info import mean_std
from cnnbench.data.memory import check_fits, free_bytes
from cnnbench.data.tensors import dataset_info, load_arrays, train_size, train_test
from cnnbench.errors import ConfigError, DataError

N = 300  # images of the slices written here


@pytest.fixture(scope="module")
def mnist(data_root):
    return load_arrays("mnist", data_root)


def write_pngs(root: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    from PIL import Image

    for i in range(len(y)):
        folder = root / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].permute(1, 2, 0).squeeze(2).numpy()).save(folder / f"{i:05d}.png")


def folder_order(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The images in an image folder's order: sorted by class folder and file, then the
    fixed shuffle (files.ORDER_SEED)."""
    order = sorted(range(len(y)), key=lambda i: (str(int(y[i])), i))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(files.ORDER_SEED))
    return x[order][perm]


@pytest.fixture
def digits(tmp_path, mnist) -> Path:
    train_x, train_y, test_x, test_y = mnist
    write_pngs(tmp_path / "digits" / "train", train_x[:N], train_y[:N])
    write_pngs(tmp_path / "digits" / "test", test_x[:N // 3], test_y[:N // 3])
    return tmp_path / "digits"


def test_an_image_folder_reads_back_exactly_with_its_info_cached_beside_it(digits, mnist):
    train_x, train_y, test_x, test_y = mnist
    (x, y), (tx, ty), classes = files.read_imagefolder(digits)
    assert classes == 10 and x.dtype == torch.uint8 and x.shape == (N, 1, 28, 28) and tx.shape == (N // 3, 1, 28, 28)
    assert torch.equal(x, folder_order(train_y[:N], train_x[:N])) and torch.equal(y, folder_order(train_y[:N], train_y[:N]))
    assert torch.equal(tx, folder_order(test_y[:N // 3], test_x[:N // 3]))
    assert len(set(y[:50].tolist())) > 5  # shuffled: the first images are of many classes
    name = f"imagefolder:{digits}"
    info = dataset_info(name)
    assert (info.channels, info.size, info.classes, info.n_train, info.n_test) == (1, 28, 10, N, N // 3)
    expected_mean, expected_std = mean_std(train_x[:N])
    assert info.mean == pytest.approx(expected_mean, abs=1e-5) and info.std == pytest.approx(expected_std, abs=1e-5)
    assert (digits / ".cnnbench-info.json").is_file() and (digits / ".cnnbench-images.npz").is_file()


def test_changed_files_are_read_again(digits, mnist):
    first = files.read_imagefolder(digits)
    assert files.read_imagefolder(digits)[0][0].sum() == first[0][0].sum()  # from the cache
    victim = sorted((digits / "train" / "7").glob("*.png"))[0]
    from PIL import Image

    Image.fromarray(np.full((28, 28), 255, dtype=np.uint8)).save(victim)  # one image made white
    again = files.read_imagefolder(digits)
    assert int(again[0][0].sum()) > int(first[0][0].sum())


def test_an_npz_reads_back_exactly(tmp_path, mnist):
    train_x, train_y, test_x, test_y = mnist
    path = tmp_path / "d.npz"
    np.savez(path, x_train=train_x[:N, 0].numpy(), y_train=train_y[:N].numpy(), x_test=test_x[:N, 0].numpy(),
             y_test=test_y[:N].numpy())
    x, y, tx, ty = load_arrays(f"npz:{path}", None)
    assert torch.equal(x, train_x[:N]) and torch.equal(y, train_y[:N]) and torch.equal(tx, test_x[:N])
    info = dataset_info(f"npz:{path}")
    assert (info.channels, info.size, info.classes, info.n_train) == (1, 28, 10, N)
    assert (tmp_path / ".d.npz.cnnbench-info.json").is_file()
    # N x H x W x C images: three channels
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x_train=np.repeat(train_x[:N, 0].numpy()[..., None], 3, 3), y_train=train_y[:N].numpy(),
             x_test=np.repeat(test_x[:N, 0].numpy()[..., None], 3, 3), y_test=test_y[:N].numpy())
    assert dataset_info(f"npz:{rgb}").channels == 3


def test_torchvision_by_name_is_the_same_mnist(tmp_path, data_root, mnist):
    """`torchvision:MNIST` through the general path: the built-in set's arrays, and the
    published mean and std computed from them (cached in the data folder)."""
    (tmp_path / "MNIST").symlink_to(data_root / "MNIST")
    arrays = load_arrays("torchvision:MNIST", tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(arrays, mnist))
    info = dataset_info("torchvision:MNIST", tmp_path)
    assert (info.channels, info.size, info.classes, info.n_train, info.n_test) == (1, 28, 10, 60_000, 10_000)
    assert info.mean == pytest.approx((0.1307,), abs=1e-4) and info.std == pytest.approx((0.3081,), abs=1e-4)
    assert (tmp_path / ".cnnbench-info-MNIST.json").is_file()
    with pytest.raises(DataError, match="torchvision.datasets has no data set 'NoSuchSet'"):
        load_arrays("torchvision:NoSuchSet", tmp_path)


def test_a_folder_without_a_test_split_takes_test_fraction(tmp_path, digits):
    whole = tmp_path / "whole"
    shutil.copytree(digits / "train", whole)
    name = f"imagefolder:{whole}"
    with pytest.raises(DataError, match="no test split .* set test_fraction"):
        train_test(name, None)
    x, y, tx, ty = train_test(name, None, 0.2)
    assert (len(x), len(tx)) == (N - 60, 60)
    assert train_size(name, test_fraction=0.2, val_size=40) == N - 60 - 40
    with pytest.raises(DataError, match="has a test split of its own"):
        train_test(f"imagefolder:{digits}", None, 0.2)
    with pytest.raises(ConfigError, match=r"test_fraction: must be in \[0, 1\)"):
        TrialConfig(test_fraction=1.0)


def test_color_images_and_images_of_another_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "pets" / cls / f"{i}.png")
    (x, y), (tx, _), classes = files.read_imagefolder(tmp_path / "pets")
    assert x.shape == (6, 3, 16, 16) and classes == 2 and len(tx) == 0 and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "pets" / "dog" / "9.png")
    with pytest.raises(DataError, match=r"9.png: 20x20 pixels, but .* is 16x16"):
        files.read_imagefolder(tmp_path / "pets")


def test_a_data_set_larger_than_the_device_is_refused_in_one_line():
    cpu = torch.device("cpu")
    assert free_bytes(cpu) > 0
    with pytest.raises(DataError, match=r"^big: its images take 2\.0 kB, more than the 1\.0 kB of available RAM"):
        check_fits(2000, cpu, "big", free=1000)
    check_fits(1000, cpu, "fits", free=1000)
    with pytest.raises(DataError, match="of available RAM; use a smaller data set"):
        check_fits(1 << 62, cpu, "huge")  # 4.6 EB: more than any machine's RAM


# ----------------------------------------------------------------------------------------
# which engine a network takes


NETS = '''
import torch
from torch import nn


class Flat(nn.Module):
    def __init__(self, in_channels, num_classes, image_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * image_size ** 2, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Viewed(Flat):
    """The tutorials' `x.view(-1, n)`: fine alone, mixes the trials of a wide layout, and
    fails on a channels-last batch."""

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(-1, self.fc.in_features))


class Scaled(Flat):
    """A parameter outside Conv2d, Linear and batch norm."""

    def __init__(self, in_channels, num_classes, image_size):
        super().__init__(in_channels, num_classes, image_size)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return super().forward(x) * self.scale


class Normed(Flat):
    def __init__(self, in_channels, num_classes, image_size):
        super().__init__(in_channels, num_classes, image_size)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).view(x.shape[0], 4, -1).sum(1).repeat(1, 4))
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "probe_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "probe_nets"
    sys.modules.pop("probe_nets", None)


def test_which_engine_a_users_network_takes(nets):
    from cnnbench.train.fused import engine_for, fusable, model_traits

    flat, viewed, scaled, normed = (TrialConfig(model=f"{nets}:{n}") for n in ("Flat", "Viewed", "Scaled", "Normed"))
    t = model_traits(flat)
    assert t.wide is None and t.vmap is None and t.trusted == {f"{nets}.Flat"}
    assert engine_for(flat) == "wide" and fusable(flat, wide_only=True)
    t = model_traits(viewed)
    assert t.vmap is None and "Viewed" in t.wide  # widened, its view mixes (or breaks) the trials
    assert engine_for(viewed) == "vmap" and not fusable(viewed, wide_only=True) and fusable(viewed)
    assert "holds parameters or buffers of its own" in model_traits(scaled).wide
    t = model_traits(normed)  # sums over channels: not widened; batch norm: not vmapped
    assert "does not keep the trials apart" in t.wide and "batch norm" in t.vmap and not fusable(normed)


def test_a_widened_users_network_trains_as_its_copies_alone(nets):
    """Two trials of `Flat` (a class the wide engine does not know, trusted after the probe)
    as one wide model: each one's loss is that of its copy trained alone, within the
    rounding measured between the two paths on cnnbench's own LeNet-5."""
    from cnnbench.data.tensors import DATASETS
    from cnnbench.train.fused import fused_engine
    from cnnbench.train.single import SingleEngine

    info, cpu = DATASETS["mnist"], torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 16, 1, 28, 28, generator=g), torch.randint(0, 10, (2, 16), generator=g)

    def gaps(model: str) -> float:
        configs = [TrialConfig(model=model, seed=s, lr=0.05, channels_last=False) for s in (0, 1)]
        wide = fused_engine(configs, cpu, info, "wide")
        alone = [SingleEngine([c], cpu, info) for c in configs]
        for e in (wide, *alone):
            e.begin_epoch([[0.05, 0.05]] if e is wide else [[0.05]])
            e.train(True)
        out = []
        for _ in range(3):
            w = wide.train_step(x, y, 0)
            a = torch.cat([e.train_step(x[k], y[k], 0) for k, e in enumerate(alone)])
            out.append(float((w - a).abs().max()))
        return max(out)

    noise = gaps("lenet5")
    assert gaps(f"{nets}:Flat") <= max(noise, 1e-6) * 10


def test_channels_last_only_where_the_network_takes_it(nets):
    from cnnbench.data.tensors import DATASETS
    from cnnbench.train.device import use_channels_last

    cpu, info = torch.device("cpu"), DATASETS["mnist"]
    assert use_channels_last(TrialConfig(), cpu) and use_channels_last(TrialConfig(model=f"{nets}:Flat"), cpu, info)
    assert not use_channels_last(TrialConfig(model=f"{nets}:Viewed"), cpu, info)  # view() of a channels-last map
    assert use_channels_last(TrialConfig(model=f"{nets}:Viewed", channels_last=True), cpu, info)  # as set
