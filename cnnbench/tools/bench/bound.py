"""What a device could do at most: a training image's FLOPs (`flops_per_image`) and the
FP32 matrix-multiply bound they are held against (`fp32_bound`): a GPU's datasheet figure
where it is known, otherwise a large FP32 matmul measured on the device itself (on the CPU
on a thread per usable core, so the bound is the machine's, not one core's)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import dataset_info
from cnnbench.models import get_model
from cnnbench.train.device import set_tf32, sync, usable_cores

# FP32 (non-tensor-core) peak of common accelerators, TFLOP/s, for the fraction reached
FP32_PEAK_TFLOPS = {"H100 SXM": 67.0, "H100 PCIe": 51.0, "H100": 67.0, "H200": 67.0, "A100": 19.5,
                    "L40S": 91.6, "L4": 30.3, "A10G": 31.2, "V100": 15.7, "T4": 8.1, "RTX 4090": 82.6}


def flops_per_image(config: TrialConfig, device: torch.device) -> float:
    """Training FLOPs per image (forward + backward), counted by torch.utils.flop_counter."""

    info = dataset_info(config.dataset)
    model = get_model(config.model, in_channels=info.channels, num_classes=info.classes, image_size=info.size,
                      activation=config.activation).to(device)
    x = torch.randn(config.batch_size, info.channels, info.size, info.size, device=device)
    y = torch.randint(0, info.classes, (config.batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / config.batch_size


def matmul_tflops(device: torch.device, *, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """TFLOP/s of an n x n matmul in `dtype` on `device`: the best of `repeats` timed
    calls after a warm-up (a bound, so the best, not the median); on CUDA with TF32 off."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    calls = 10 if device.type == "cuda" else 1  # a GPU call is too short to time alone
    best = math.inf
    if device.type == "cuda":
        set_tf32(False)
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync(device)
        if i >= 2:  # two untimed calls: first allocations, thread pool start
            best = min(best, (time.perf_counter() - t0) / calls)
    return 2 * n ** 3 / best / 1e12


def fp32_bound(device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, how it was found): the FP32 matrix-multiply bound of `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in sorted(FP32_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
            if key in name:
                return tflops, f"{name} datasheet"
        return matmul_tflops(device, n=8192), f"{name}, measured FP32 matmul"
    if device.type != "cpu":
        return matmul_tflops(device), f"measured FP32 matmul, 2048 x 2048, on {device}"
    threads, cores = torch.get_num_threads(), usable_cores()
    torch.set_num_threads(cores)
    try:
        return matmul_tflops(device), f"measured FP32 matmul, 2048 x 2048, on {cores} thread(s)"
    finally:
        torch.set_num_threads(threads)
