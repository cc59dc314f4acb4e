"""A grouped convolution as one batched matrix product: as many kernels for K groups as for one.

`F.conv2d(x, w, groups=G)` with narrow groups (LeNet-5's conv2 in a wide group of K
trials: G = K groups of 6 -> 16 channels, 5x5, on 14x14 maps) runs on an H100 as one small
cuDNN kernel per group per pass, so a training step's kernels grow as 5K (73% of the GPU's
time at K = 128, issue 25). `grouped_conv2d` computes the same convolution with a number of
kernels that does not depend on G:
- forward: the input's windows gathered into columns `(G, C/G*kh*kw, N*H'*W')` (a pad and
  one copy of strided views: im2col), then ONE `baddbmm` over the G groups with the
  weights `(G, O/G, C/G*kh*kw)`, bias included, and one copy into the output's layout;
- backward: one copy of the output's gradient into `(G, O/G, N*H'*W')`; grad_weight is one
  `bmm` with the saved columns, grad_input one `bmm` with the weights then one copy and
  `F.fold` (col2im, summing overlapping windows) over a batch of one image of N*C planes
  (older torch's CUDA col2im launched a kernel per batch element; one image is one kernel
  on any version), grad_bias one sum.

NCHW and channels-last inputs; stride, padding and dilation as `F.conv2d` takes them (an int
or a pair; every convolution of the registry's models is one of these). `bmm_reason` says
why a call cannot take this path (string padding such as "same", unbatched input, a dtype
fold does not support), and the caller then uses `F.conv2d`. Under autocast the inputs are
cast to the autocast dtype, as `F.conv2d`'s are.

CUDA graphs: every step is a fixed sequence of kernels whose shapes follow from the
tensors' shapes alone: no host synchronisation, no `.item()`, no data-dependent shape, no
host-side randomness, so the op can be captured in a `torch.cuda.CUDAGraph` (tests:
test_grouped_conv.py, marked cuda). Memory: the forward keeps its columns for grad_weight
(when the weight needs one), about kh*kw times the input (LeNet conv2, batch 64, K = 128:
490 MB in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# fold and unfold (im2col) are implemented for these
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def bmm_reason(x: Tensor, weight: Tensor, padding: Any = 0, groups: int = 1) -> str | None:
    """None when `grouped_conv2d` computes this convolution; otherwise why not."""
    if isinstance(padding, str):
        return f"padding={padding!r} (only numbers)"
    if x.dim() != 4 or weight.dim() != 4:
        return f"a {x.dim()}-d input and {weight.dim()}-d weight (only batched 2-d convolutions)"
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        return f"dtype {x.dtype} (fold supports {', '.join(str(d) for d in DTYPES)})"
    if x.shape[1] % groups or weight.shape[0] % groups or x.shape[1] // groups != weight.shape[1]:
        return f"{x.shape[1]} input and {weight.shape[0]} output channels do not split into {groups} groups " \
               f"of the weight's {weight.shape[1]} input channels"
    return None


def is_channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def columns(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], groups: int) -> tuple[Tensor, tuple[int, int]]:
    """im2col of `x` (N x C x H x W, any strides): G x C/G*kh*kw x N*H'*W', one copy; and (H', W')."""
    n, c, _, _ = x.shape
    (kh, kw), (dh, dw) = kernel, dilation
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    # windows as views: N x C x H' x W' x span_h x span_w, then every dilation-th tap
    win = x.unfold(2, dh * (kh - 1) + 1, stride[0]).unfold(3, dw * (kw - 1) + 1, stride[1])[..., ::dh, ::dw]
    ho, wo = win.shape[2], win.shape[3]
    win = win.unflatten(1, (groups, c // groups))  # N x G x C/G x H' x W' x kh x kw
    # contiguous even where a view would do (a 1x1 kernel on channels-last input): the
    # matrix products then see one layout, whatever the input's (on the CPU, a strided view
    # took another sgemm kernel whose grad_weight rounding was 4x F.conv2d's)
    cols = win.permute(1, 2, 5, 6, 0, 3, 4).reshape(groups, c // groups * kh * kw, n * ho * wo)
    return cols.contiguous(), (ho, wo)


class GroupedConv2d(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, stride, padding, dilation, groups)` as im2col + one batched
    matrix product; backward as batched products + col2im. Arguments as `grouped_conv2d`'s,
    the geometry as pairs of ints."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
        n, (o, cg, kh, kw) = x.shape[0], weight.shape
        cols, (ho, wo) = columns(x, (kh, kw), stride, padding, dilation, groups)  # G x C/G*kh*kw x N*L
        w = weight.reshape(groups, o // groups, cg * kh * kw)  # G x O/G x C/G*kh*kw
        if bias is None:
            out = torch.bmm(w, cols)  # G x O/G x N*L
        else:
            out = torch.baddbmm(bias.view(groups, o // groups, 1), w, cols)
        out = out.view(groups, o // groups, n, ho, wo).permute(2, 0, 1, 3, 4).reshape(n, o, ho, wo)
        layout = torch.channels_last if is_channels_last(x) or is_channels_last(weight) else torch.contiguous_format
        ctx.save_for_backward(cols if ctx.needs_input_grad[1] else None, w)  # cols: for grad_weight only
        ctx.geometry = (x.shape, (kh, kw), stride, padding, dilation, groups, is_channels_last(x))
        ctx.has_bias = bias is not None
        return out.contiguous(memory_format=layout)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # a backward called inside autocast (CPU: on the caller's thread) must not recast
        # the products: the dtypes are the forward's, as in F.conv2d's backward
        with torch.autocast(grad.device.type, enabled=False):
            return GroupedConv2d.gradients(ctx, grad)

    @staticmethod
    def gradients(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        cols, w = ctx.saved_tensors
        shape, kernel, stride, padding, dilation, groups, x_channels_last = ctx.geometry
        n, o = grad.shape[0], grad.shape[1]
        # N x O x H' x W' -> G x O/G x N*L
        g = grad.unflatten(1, (groups, o // groups)).permute(1, 2, 0, 3, 4).reshape(groups, o // groups, -1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # fold sums kh*kw columns per input pixel: for fp16/bf16 (autocast) in fp32 and
            # rounded once, as F.conv2d's dgrad accumulates
            acc = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
            dcols = torch.bmm(w.transpose(1, 2).to(acc), g.to(acc))  # G x C/G*kh*kw x N*L
            grad_x = col2im(dcols, shape, kernel, stride, padding, dilation, groups).to(g.dtype)
            if x_channels_last:
                grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g, cols.transpose(1, 2)).view(o, shape[1] // groups, *kernel)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def col2im(dcols: Tensor, shape: torch.Size, kernel: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
    """The input's gradient from the columns' (G x C/G*kh*kw x N*L): overlapping windows summed."""
    n, c, h, w = shape
    cols = dcols.view(groups, c // groups, kernel[0] * kernel[1], n, -1)  # G x C/G x kh*kw x N x L
    # one image of N*C planes: one col2im kernel, also where fold loops over a batch
    cols = cols.permute(3, 0, 1, 2, 4).reshape(1, n * c * kernel[0] * kernel[1], -1)
    out = F.fold(cols, (h, w), kernel, dilation=dilation, padding=padding, stride=stride)
    return out.view(n, c, h, w)


def grouped_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                   dilation: Any = 1, groups: int = 1) -> Tensor:
    """`F.conv2d(x, weight, bias, stride, padding, dilation, groups)` with a number of kernels
    that does not grow with `groups`. Raises ValueError with `bmm_reason` for a call it does
    not compute (the caller then uses F.conv2d)."""
    reason = bmm_reason(x, weight, padding, groups)
    if reason:
        raise ValueError(f"grouped_conv2d cannot compute this convolution: {reason}")
    device = x.device.type
    if torch.is_autocast_enabled(device):  # as F.conv2d: every input in the autocast dtype
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False):
            return GroupedConv2d.apply(x, weight, bias, pair(stride), pair(padding), pair(dilation), groups)
    return GroupedConv2d.apply(x, weight, bias, pair(stride), pair(padding), pair(dilation), groups)
