"""torch.optim's SGD and Adam over `(K, ...)` tensors, one learning rate, momentum and
weight decay per trial: the update that every fused engine (vmap in fused.py, wide in
wide.py) applies, so that a fused trial follows the path of the trial trained alone.

The tensors are the K trials' parameters stacked on a leading dimension (or views of
one wide parameter shaped so); the hyperparameters are `(K, 1, ...)` tensors, and the
whole step is a handful of foreach kernels. SGD: momentum with dampening 0 and L2 weight
decay (`g <- g + wd * p`), as torch.optim; Adam: betas (0.9, 0.999), eps 1e-8.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from cnnbench.config.trial import TrialConfig

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class PerTrialOptimizer:
    """SGD or Adam over `params` (each `(K, ...)`), with per-trial hyperparameters and
    per-trial learning rates per step (`begin_epoch`), and trial k's state in
    torch.optim's single-trial format (`trial_state`, `load_trial_state`)."""

    def __init__(self, params: Sequence[Tensor], configs: Sequence[TrialConfig], device: torch.device) -> None:
        self.params = list(params)
        self.k = len(configs)
        self.device = device
        self.shapes = [(self.k,) + (1,) * (p.dim() - 1) for p in self.params]
        self.momentum = self._per_trial([c.momentum for c in configs])
        self.weight_decay = self._per_trial([c.weight_decay for c in configs])
        self.use_wd = any(c.weight_decay for c in configs)
        self.adam = configs[0].optimizer == "adam"
        self.steps = 0
        if self.adam:
            self.exp_avg = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        else:
            self.bufs = [torch.zeros_like(p) for p in self.params]
        self.active = torch.ones(self.k, device=device)
        self.lr_table = torch.zeros(1, self.k, device=device)

    def _per_trial(self, values: list[float]) -> list[Tensor]:
        t = torch.tensor(values, device=self.device, dtype=torch.float32)
        return [t.view(s) for s in self.shapes]

    def state_tensors(self) -> list[Tensor]:
        """The optimizer state a step changes (momentum buffers, or Adam's two moments)."""
        return [*self.exp_avg, *self.exp_avg_sq] if self.adam else list(self.bufs)

    def begin_epoch(self, lrs: list[list[float]]) -> None:
        """`lrs[step][k]`: one row for the whole epoch, or one row per step."""
        self.lr_table = torch.tensor(lrs, device=self.device, dtype=torch.float32) * self.active

    def deactivate(self, k: int) -> None:
        """Stop trial k (diverged or pruned): its rate becomes 0, the others go on."""
        self.active[k] = 0.0
        self.lr_table[:, k] = 0.0

    def lr(self, step: int) -> Tensor:
        """The K learning rates of `step` (a (K,) tensor on the device)."""
        return self.lr_table[step if self.lr_table.shape[0] > 1 else 0]

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: Tensor) -> None:
        if self.use_wd:  # L2 weight decay, as torch.optim: g <- g + wd * p
            grads = torch._foreach_add(grads, torch._foreach_mul(self.params, self.weight_decay))
        neg = -lr  # once: one small op per step, not one per tensor
        neg_lr = [neg.view(s) for s in self.shapes]
        self.steps += 1
        if not self.adam:  # buf <- momentum * buf + g;  p <- p - lr * buf
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, grads)
            torch._foreach_addcmul_(self.params, neg_lr, self.bufs)
            return
        b1, b2 = ADAM_BETAS
        torch._foreach_lerp_(self.exp_avg, grads, 1 - b1)
        torch._foreach_mul_(self.exp_avg_sq, b2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - b2)
        bc1, bc2_sqrt = 1 - b1 ** self.steps, (1 - b2 ** self.steps) ** 0.5
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, ADAM_EPS)
        step = torch._foreach_div(self.exp_avg, denom)
        torch._foreach_addcmul_(self.params, [t / bc1 for t in neg_lr], step)

    def trial_state(self, k: int, names: Sequence[str]) -> dict[str, Any]:
        """Trial k's optimizer state, keyed by parameter name (SingleEngine's format)."""
        if self.adam:
            return {n: {"step": torch.tensor(float(self.steps)), "exp_avg": m[k].clone(), "exp_avg_sq": v[k].clone()}
                    for n, m, v in zip(names, self.exp_avg, self.exp_avg_sq)}
        return {n: {"momentum_buffer": b[k].clone()} for n, b in zip(names, self.bufs)} if self.steps else {}

    @torch.no_grad()
    def load_trial_state(self, k: int, names: Sequence[str], opt: dict[str, Any]) -> None:
        if not opt:
            return
        if self.adam:
            for n, m, v in zip(names, self.exp_avg, self.exp_avg_sq):
                m[k].copy_(opt[n]["exp_avg"])
                v[k].copy_(opt[n]["exp_avg_sq"])
            self.steps = int(next(iter(opt.values()))["step"])
        else:
            for n, b in zip(names, self.bufs):
                if "momentum_buffer" in opt.get(n, {}):
                    b[k].copy_(opt[n]["momentum_buffer"])
            self.steps = max(self.steps, 1)
