"""Which path a wide group's grouped convolutions take, and the micro-benchmark behind it.

Two paths compute `F.conv2d(x, w, b, groups=G)`:
- "grouped": `F.conv2d` itself (cuDNN, oneDNN), what the wide engine always ran. On an
  H100, cuDNN runs a narrow-group convolution as one small kernel per group per pass.
- "bmm": `grouped_conv.grouped_conv2d`, im2col and batched matrix products, a number of
  kernels that does not grow with G.
A third, "grouped-fp32", is F.conv2d computed in fp32 even under bf16 autocast (the
same bits as "grouped" without autocast): on a 2-core AMD EPYC with AVX-512-BF16, oneDNN's
bf16 kernel for LeNet-5's conv2 at 6 channels per trial took longer than its fp32 one
(5.5 against 4.6 ms of a wide K = 8 step's 15 on one thread: `cnnbench bench --profile`'s
OpClock), while the linear layers and the first convolution gain from bf16; the
calibration's bf16 stage measures it (`cnnbench study --fast`'s layout).
`conv_path` decides per call, from `CNNBENCH_CONV_PATH`:
- `grouped`, `bmm` or `grouped-fp32`: that path for every grouped convolution it can compute;
- `auto`: the faster of "grouped" and "bmm" for this (device type, shape signature), measured once per
  process by `choose_conv_path` (forward + backward of both, a few times) and cached;
- unset: `auto`, except on the CPU, where `grouped`: LeNet-5's conv2 at K = 3, 8, 16
  (batch 64, one thread, NCHW and channels-last, three runs of `bench_conv` on two shared
  cores) took 1.05x to 12x as long on the bmm path, in every run; so a CPU run stays bit
  for bit what it was, with no measurement.
A dense convolution (groups = 1) always takes F.conv2d. While deterministic algorithms are
on, `auto` takes `grouped`: a measured choice could differ from one run to the next, and
so would the numbers (`bmm` set by name is deterministic too). While a CUDA graph is being
captured or torch.compile traces, nothing is timed: the cached choice, or `grouped`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from cnnbench.errors import ConfigError
from cnnbench.train.device import sync
from cnnbench.train.grouped_conv import bmm_reason, grouped_conv2d, is_channels_last, pair

ENV = "CNNBENCH_CONV_PATH"


def grouped_conv2d_fp32(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                        dilation: Any = 1, groups: int = 1) -> Tensor:
    """F.conv2d in fp32 whatever autocast says (the output too); without autocast, and
    on fp32 operands, F.conv2d itself."""
    with torch.autocast(x.device.type, enabled=False):
        return F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding,
                        dilation, groups)


PATHS = {"grouped": F.conv2d, "bmm": grouped_conv2d, "grouped-fp32": grouped_conv2d_fp32}
TIMED = ("grouped", "bmm")  # the paths `auto` and bench_conv time: two algorithms ("grouped-fp32" is a precision)
MODES = ("grouped", "bmm", "grouped-fp32", "auto")
CHOICES: dict[tuple, str] = {}  # the measured winner per shape signature, for this process
REPEATS = 5  # timed forward + backward calls per path in a measurement, after WARMUP
WARMUP = 2  # untimed calls first: cuDNN's autotuning, lazy allocations
# LeNet-5's conv2 (6 -> 16 channels, 5x5, on 14x14 maps): the convolution of issue 25
LENET_CONV2 = dict(in_channels=6, out_channels=16, kernel=5, size=14, stride=1, padding=0)


def conv_mode(device_type: str) -> str:
    """The setting for this device: `CNNBENCH_CONV_PATH`, or its default."""
    value = os.environ.get(ENV, "").strip().lower()
    if value and value not in MODES:
        raise ConfigError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value or ("grouped" if device_type == "cpu" else "auto")


def signature(device: torch.device, x_shape: Sequence[int], w_shape: Sequence[int], bias: bool, stride: Any,
              padding: Any, dilation: Any, groups: int, dtype: torch.dtype, channels_last: bool) -> tuple:
    """What the speed of a convolution depends on: device type, shapes, geometry, dtypes
    (autocast's included), layout."""
    kind = device.type
    amp = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return (kind, tuple(x_shape), tuple(w_shape), bias, pair(stride), pair(padding), pair(dilation), groups,
            dtype, amp, channels_last)


def conv_path(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
              groups: int) -> str:
    """"grouped", "bmm" or "grouped-fp32" for this convolution (see the module's docstring)."""
    if groups == 1:
        return "grouped"
    mode = conv_mode(x.device.type)
    if mode == "grouped-fp32":
        return mode
    if bmm_reason(x, weight, padding, groups):
        return "grouped"
    if mode != "auto":
        return mode
    if torch.are_deterministic_algorithms_enabled():
        return "grouped"
    geometry = dict(bias=bias is not None, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    dtype=x.dtype, channels_last=is_channels_last(x))
    key = signature(x.device, x.shape, weight.shape, **geometry)
    if key in CHOICES or torch.compiler.is_compiling() or \
            (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return CHOICES.get(key, "grouped")
    return choose_conv_path(x.device, x.shape, weight.shape, **geometry)


def choose_conv_path(device: torch.device, x_shape: Sequence[int], w_shape: Sequence[int], *, bias: bool = True,
                     stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                     dtype: torch.dtype = torch.float32, channels_last: bool = False) -> str:
    """The faster path for this convolution ("grouped" or "bmm"), timed here (forward +
    backward, REPEATS calls each, under the caller's autocast) once per process."""
    key = signature(device, x_shape, w_shape, bias, stride, padding, dilation, groups, dtype, channels_last)
    if key in CHOICES:
        return CHOICES[key]
    times = time_paths(x_shape, w_shape, device=device, bias=bias, stride=stride, padding=padding,
                       dilation=dilation, groups=groups, dtype=dtype, channels_last=channels_last)
    CHOICES[key] = min(times, key=times.get)
    return CHOICES[key]


def operands(x_shape: Sequence[int], w_shape: Sequence[int], *, device: torch.device, bias: bool,
             dtype: torch.dtype, channels_last: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Random input, weight and bias that need gradients, drawn from a generator of their own:
    the process's random streams (a trial's dropout, its batches) are not touched."""
    gen = torch.Generator(device=device).manual_seed(0)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    x = draw(*x_shape)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    w = draw(*w_shape) * 0.1
    b = draw(w_shape[0]) if bias else None
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_() if b is not None else None


def time_paths(x_shape: Sequence[int], w_shape: Sequence[int], *, device: torch.device, bias: bool = True,
               stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
               dtype: torch.dtype = torch.float32, channels_last: bool = False, repeats: int = REPEATS
               ) -> dict[str, float]:
    """Microseconds per forward + backward call of each path, the best of `repeats` calls."""
    x, w, b = operands(x_shape, w_shape, device=device, bias=bias, dtype=dtype, channels_last=channels_last)
    with torch.enable_grad():  # also when the first call comes from a no_grad test pass
        return {name: best_time(fb_step(PATHS[name], x, w, b, stride, padding, dilation, groups), device, repeats)
                for name in TIMED}


def best_time(step: Any, device: torch.device, repeats: int = REPEATS, warmup: int = WARMUP) -> float:
    """Microseconds per call of `step`: the best of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def fb_step(conv: Any, x: Tensor, w: Tensor, b: Tensor | None, stride: Any, padding: Any, dilation: Any,
            groups: int):
    """One forward + backward of `conv` (gradients of x, w and b, as a layer inside a net)."""
    inputs = [t for t in (x, w, b) if t is not None]

    def step() -> None:
        out = conv(x, w, b, stride, padding, dilation, groups)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return step


def kernels_per_call(step: Any, device: torch.device, calls: int = 3) -> float:
    """What one call launches, counted by torch.profiler: on CUDA the device's kernels (and
    memory copies or sets), on the CPU the aten ops (nested ones included)."""
    step()  # warm: cuDNN's choice of algorithm launches kernels of its own
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        sync(device)
    if device.type == "cuda":
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        events = [e for e in prof.events() if e.name.startswith("aten::")]
    return len(events) / calls


def bench_conv(device: torch.device | str, ks: Sequence[int] = (16, 64, 128), *, batch: int = 64,
               conv: dict | None = None, channels_last: bool = False, repeats: int = REPEATS) -> list[dict]:
    """Both paths of a wide group's grouped convolution (LeNet-5's conv2 by default, keys of
    LENET_CONV2 to change it) at each K: one row per K and path with `us` (microseconds per
    forward + backward call, best of `repeats`) and `kernels` (per call, kernels_per_call)."""
    device = torch.device(device)
    c = {**LENET_CONV2, **(conv or {})}
    rows = []
    for k in ks:
        x_shape = (batch, k * c["in_channels"], c["size"], c["size"])
        w_shape = (k * c["out_channels"], c["in_channels"], c["kernel"], c["kernel"])
        geometry = dict(stride=c["stride"], padding=c["padding"], dilation=1, groups=k)
        times = time_paths(x_shape, w_shape, device=device, channels_last=channels_last, repeats=repeats,
                           **geometry)
        x, w, b = operands(x_shape, w_shape, device=device, bias=True, dtype=torch.float32,
                           channels_last=channels_last)
        for name in TIMED:
            step = fb_step(PATHS[name], x, w, b, geometry["stride"], geometry["padding"], 1, k)
            rows.append({"k": k, "path": name, "us": times[name], "kernels": kernels_per_call(step, device)})
    return rows
