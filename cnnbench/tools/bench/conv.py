"""The conv2 micro-benchmark of issue 25 (gpu-check's `conv` part).

LeNet-5's conv2 in a wide group of K trials (per trial 6 -> 16 channels, 5x5, on 14x14
maps; batch 64), forward and backward (the input's, weight's and bias's gradients, as a
layer inside a net), in four variants:
  grouped       cuDNN's grouped convolution (`F.conv2d(groups=K)`), NCHW, fp32;
  grouped-nhwc  the same, channels-last;
  grouped-tf32  the same, NCHW, with TF32 tensor-core math;
  bmm           grouped_conv.py's im2col and batched matrix products, NCHW, fp32.
Per K and variant: microseconds per call, eager and replayed as a captured CUDA graph
(CUDA only), and what one call launches (conv_path.kernels_per_call: on CUDA kernels and
memory copies or sets, on the CPU aten ops). TF32 is a CUDA setting: on the CPU its row
measures plain fp32.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from cnnbench.train.conv_path import (LENET_CONV2, PATHS, REPEATS, WARMUP, best_time, fb_step, kernels_per_call,
                                      operands)
from cnnbench.train.device import device_name, set_tf32
from cnnbench.util import fileio

# variant -> (path, channels-last, TF32)
VARIANTS = {"grouped": ("grouped", False, False), "grouped-nhwc": ("grouped", True, False),
            "grouped-tf32": ("grouped", False, True), "bmm": ("bmm", False, False)}
KS = (16, 64, 128)


def captured_time(step: Callable[[], Any], device: torch.device, repeats: int = REPEATS) -> float:
    """Microseconds per replay of `step` captured as one CUDA graph (warmed up on a side
    stream first, as torch.cuda.graph asks)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return best_time(graph.replay, device, repeats)


def conv_row(device: torch.device, k: int, variant: str, *, batch: int = 64,
             repeats: int = REPEATS) -> dict[str, Any]:
    """One variant of LeNet-5's conv2 at K trials (see the module's docstring)."""
    path, nhwc, tf32 = VARIANTS[variant]
    c = LENET_CONV2
    x_shape = (batch, k * c["in_channels"], c["size"], c["size"])
    w_shape = (k * c["out_channels"], c["in_channels"], c["kernel"], c["kernel"])
    set_tf32(tf32)
    try:
        x, w, b = operands(x_shape, w_shape, device=device, bias=True, dtype=torch.float32, channels_last=nhwc)
        with torch.enable_grad():
            step = fb_step(PATHS[path], x, w, b, c["stride"], c["padding"], 1, k)
            eager = best_time(step, device, repeats)
            kernels = kernels_per_call(step, device)
            captured = captured_time(step, device, repeats) if device.type == "cuda" else math.nan
    finally:
        set_tf32(False)  # cnnbench's default: plain fp32 (train.device.configure_backends)
    return {"k": k, "variant": variant, "path": path, "layout": "nhwc" if nhwc else "nchw", "tf32": tf32,
            "eager_us": round(eager, 1), "captured_us": round(captured, 1), "kernels": kernels}


def conv_bench(device: torch.device, ks: Sequence[int] = KS, *, batch: int = 64, repeats: int = REPEATS,
               out_dir: Path | None = None, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every variant at every K (rows of `conv_row`); with `out_dir`, conv2.csv and conv2.md there."""
    say(f"conv2 micro-benchmark on {device} ({device_name(device)}), torch {torch.__version__}: LeNet-5's conv2 "
        f"in K trials, batch {batch}, forward + backward, best of {repeats}")
    rows = []
    for k in ks:
        for variant in VARIANTS:
            rows.append(conv_row(device, k, variant, batch=batch, repeats=repeats))
            r = rows[-1]
            say(f"  K={k:<4} {variant:<13} eager {r['eager_us']:>9.1f} us  captured {r['captured_us']:>9.1f} us  "
                f"{r['kernels']:>6.1f} kernels per call")
    if out_dir is not None:
        fileio.write_text(out_dir / "conv2.csv", pd.DataFrame(rows).to_csv(index=False))
        fileio.write_text(out_dir / "conv2.md", conv_markdown(rows, device))
    return rows


def conv_markdown(rows: list[dict[str, Any]], device: torch.device) -> str:
    kind = "kernels" if device.type == "cuda" else "aten ops"
    lines = [f"# conv2 micro-benchmark on {device} ({device_name(device)})", "",
             "LeNet-5's conv2 in K trials (6 -> 16 channels each, 5x5, 14x14 maps, batch 64), forward + backward.",
             "", f"| K | variant | eager us | captured us | {kind} per call |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['k']} | {r['variant']} | {r['eager_us']:.1f} | {shown(r['captured_us'])} | {r['kernels']:.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def shown(value: float, digits: int = 1) -> str:
    """A figure for a table: '-' where it was not measured (NaN)."""
    return "-" if value != value else f"{value:,.{digits}f}"
