"""Which fused engine a network can take, found by trying it.

cnnbench's own models are made of modules whose forward is known (wide.LAYOUT_SAFE and
the layers wide.py replaces); a user's network holds classes of its own, whose forward
may keep the K trials of a wide layout apart (calls its children, flattens from dim 1,
adds tensors of one shape) or may not (`x.view(-1, 400)`, `torch.cat` on channels, a
sum over channels). So two copies of it with different weights are widened and the wide
model's output compared with the copies' own, on one shared batch and on one batch per
trial (`wide_problem`), and vmap is tried on its forward in training mode
(`vmap_problem`). Done once per network and data set (fused.model_traits caches it),
on the CPU, on a batch of two images.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from cnnbench.models.source import one_line
from cnnbench.train.wide import WHY_NOT, forward_known, full_name, widen


def unknown_types(model: nn.Module) -> frozenset[str]:
    """The full names of the classes in `model` whose forward wide.py does not know (those it
    knows to mix trials, wide.WHY_NOT, are known)."""
    return frozenset(full_name(type(m)) for m in model.modules()
                     if not forward_known(type(m)) and type(m) not in WHY_NOT)


def own_state_problem(model: nn.Module, unknown: frozenset[str]) -> str | None:
    """A module of unknown forward that holds parameters or buffers itself (not in a Conv2d,
    Linear or batch norm) cannot be widened: the wide transform stacks only those."""
    for path, m in model.named_modules():
        if full_name(type(m)) in unknown and (next(m.parameters(recurse=False), None) is not None
                                   or next(m.buffers(recurse=False), None) is not None):
            return (f"{path or 'the model'}: {type(m).__name__} holds parameters or buffers of its own, which "
                    "the wide engine does not stack (only those of Conv2d, Linear and batch norm)")
    return None


def batches(channels: int, size: int, k: int) -> tuple[Tensor, Tensor]:
    """A shared batch (2, C, S, S) and one per trial (K, 2, C, S, S), fixed."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, channels, size, size, generator=g), torch.rand(k, 2, channels, size, size, generator=g)


def close(a: Tensor, b: Tensor) -> bool:
    """Equal up to float rounding (a grouped convolution sums in another order), far from the
    O(1) differences of mixed-up trials."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-3)))


@torch.no_grad()
def wide_problem(models: Sequence[nn.Module], channels: int, size: int, trusted: frozenset[str]) -> str | None:
    """Why K = len(models) copies of one network (their weights differ) cannot train as one
    wide model: its outputs differ from theirs, or it fails. None: it can."""
    k = len(models)
    names = ", ".join(sorted(t.rpartition(".")[2] for t in trusted))
    try:
        wide = widen(models, in_channels=channels, trusted=trusted).eval()
        for m in models:
            m.eval()
        x, xs = batches(channels, size, k)
        alone = torch.stack([m(x) for m in models], 1)  # 2 x K x classes
        own = torch.stack([m(xs[i]) for i, m in enumerate(models)], 1)
        shared = wide(x)
        per_trial = wide(xs.permute(1, 0, 2, 3, 4).reshape(2, k * channels, size, size))
    except Exception as err:
        return f"the forward of {names} fails on the wide layout ({one_line(err, 160)})"
    for out, ref in ((shared, alone), (per_trial, own)):
        if out.numel() != ref.numel() or not close(out.reshape(ref.shape), ref):
            return (f"the forward of {names} does not keep the trials apart (tried: the wide model's output "
                    "differs from the networks' own)")
    return None


def vmap_problem(models: Sequence[nn.Module], channels: int, size: int) -> str | None:
    """Why vmap cannot run K copies of the network as one (None: it can)."""
    k = len(models)
    base = copy.deepcopy(models[0]).to("meta").train()
    params, buffers = stack_module_state(list(models))

    def forward(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, {**p, **b}, (x,))

    try:
        _, xs = batches(channels, size, k)
        out = vmap(forward, in_dims=(0, 0, 0), randomness="different")(params, buffers, xs)
    except Exception as err:
        return f"vmap cannot run its forward ({one_line(err, 160)})"
    if out.dim() != 3 or out.shape[:2] != (k, 2):
        return f"vmap of its forward gives {tuple(out.shape)}, not (K, batch, classes)"
    return None
