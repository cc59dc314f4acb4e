"""Devices and models: which device, which backend flags, the trial's model, its dtype and
layout. The engines (loop, fused, wide) and the tools share these."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
from typing import Sequence

import torch
from torch import nn

from cnnbench.config.trial import TrialConfig
from cnnbench.data.memory import check_fits
from cnnbench.data.tensors import DatasetInfo, dataset_info, train_test
from cnnbench.errors import ConfigError, DeviceError
from cnnbench.models import get_model, model_identity
from cnnbench.models.user import check_model
from cnnbench.util import host_memory

# the CPU's channels-last default for `channels_last: null` (1 or 0; unset: 1)
CHANNELS_LAST_ENV = "CNNBENCH_CHANNELS_LAST"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which a container or
    `taskset` may narrow below the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name}: MPS is not available on this machine")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA (H100, ...), else the host's processor, for reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def configure_backends(config: TrialConfig, device: torch.device) -> None:
    """Deterministic kernels when asked; otherwise let cuDNN pick the fastest ones
    (`cudnn_benchmark`). TF32 for float32 convolutions and matrix products only when
    `tf32` asks for it: PyTorch's own default runs convolutions in TF32 on Ampere and
    later, which is not the fp32 a study reports."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != config.deterministic \
            or torch.is_deterministic_algorithms_warn_only_enabled():
        # only when it changes: the call imports torch's compiler (about 1 s of a process's start)
        torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.deterministic = config.deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and config.cudnn_benchmark and not config.deterministic
    set_tf32(config.tf32)


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for cuBLAS and cuDNN convolutions, through the precision API that
    torch 2.9 introduced (mixing it with the older allow_tf32 flags is an error there)."""
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # torch before 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


# torch's global generator is the process's: a model is seeded and built whole under this
# lock (and the loop reseeds it each epoch under it), also while groups train side by side
# in threads (side_by_side.py)
RNG_LOCK = threading.RLock()


def check_inputs(configs: Sequence[TrialConfig], data_root: str | os.PathLike | None) -> None:
    """What trials need, checked before anything is written: their devices, their data
    (read, split, and small enough for each device), and each of the user's networks
    built for the data and run on a batch (models.user.check_model), and the setting of
    the C library's allocator (util/host_memory.py). One-line errors."""
    host_memory.wanted()
    devices = [resolve_device(d) for d in sorted({c.device for c in configs})]
    for dataset, fraction in sorted({(c.dataset, c.test_fraction) for c in configs}):
        arrays = train_test(dataset, data_root, fraction)
        for device in devices:
            if device.type != "cpu":  # on the CPU they were read into memory already
                check_fits(arrays[0].nbytes + arrays[2].nbytes, device, dataset)
    for c in {(c.model, c.activation, c.dropout, c.dataset): c for c in configs}.values():
        if model_identity(c.model) is not None:
            info = dataset_info(c.dataset, data_root)
            check_model(c.model, in_channels=info.channels, num_classes=info.classes, image_size=info.size,
                        activation=c.activation, dropout=c.dropout)


def build_model(config: TrialConfig, info: DatasetInfo) -> nn.Module:
    """The trial's model with its initial weights: torch's default init after seeding."""
    with RNG_LOCK:
        torch.manual_seed(config.seed)
        return get_model(config.model, in_channels=info.channels, num_classes=info.classes,
                         image_size=info.size, activation=config.activation, dropout=config.dropout)


def use_channels_last(config: TrialConfig, device: torch.device, info: DatasetInfo | None = None) -> bool:
    """The `channels_last` setting, with null resolved per device: on the CPU
    `CNNBENCH_CHANNELS_LAST` (1 or 0: the calibration's choice, train/calibration.py), else
    on, where oneDNN's channels-last convolutions and pools measured 14-28% faster for
    every model here (`cnnbench bench --options`); off elsewhere until measured there. A
    user's network is on for the CPU only where a channels-last batch goes through it (a
    `x.view(n, -1)` in its forward fails on one): `takes_channels_last`."""
    if config.channels_last is not None:
        return config.channels_last
    if device.type != "cpu":
        return False
    value = os.environ.get(CHANNELS_LAST_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ConfigError(f"{CHANNELS_LAST_ENV}={value!r}: expected 1 or 0")
    if value == "0":
        return False
    return model_identity(config.model) is None or takes_channels_last(config, info or dataset_info(config.dataset))


def to_channels_last(model: nn.Module) -> nn.Module:
    """`model` in channels-last memory format, as the engines hold it on the CPU, with the
    gradient that comes back through each `nn.Flatten` of a channels-last input made
    channels-last too. A flatten's backward hands on its gradient in plain (NCHW) order,
    and the pooling and activation backward below it then mix the two layouts, which
    oneDNN and ATen do on a slow path: LeNet-5's second max-pool backward took 0.77 ms
    with an NCHW gradient and 0.17 ms with a channels-last one, plus 0.06 ms for the copy
    (K = 8, batch 64, one thread). The values are the same, and so are the trials'
    numbers, bit for bit (tests/test_engines.py)."""
    model = model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, nn.Flatten):
            m.register_forward_pre_hook(gradient_channels_last)
    return model


def gradient_channels_last(module: nn.Module, args: tuple) -> tuple | None:
    """A forward pre-hook: a 4-d channels-last input that needs a gradient goes on through
    `GradientChannelsLast` (the same tensor; its gradient made channels-last)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.requires_grad \
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return (GradientChannelsLast.apply(x), *args[1:])
    return None


class GradientChannelsLast(torch.autograd.Function):
    """The identity, whose backward returns its gradient in channels-last memory format."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


_channels_last: dict[tuple, bool] = {}


@torch.no_grad()
def takes_channels_last(config: TrialConfig, info: DatasetInfo) -> bool:
    """Does a channels-last batch of 2 images go through the trial's network (eval mode)?"""
    key = (config.model, model_identity(config.model), config.activation, config.dropout, info.channels, info.size)
    if key not in _channels_last:
        model = build_model(config, info).eval().to(memory_format=torch.channels_last)  # as the engines hold it
        x = torch.rand(2, info.channels, info.size, info.size).contiguous(memory_format=torch.channels_last)
        try:
            model(x)
            _channels_last[key] = True
        except Exception:
            _channels_last[key] = False
    return _channels_last[key]


def autocast(config: TrialConfig, device: torch.device):
    if config.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err) or \
        "out of memory" in str(err).lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
