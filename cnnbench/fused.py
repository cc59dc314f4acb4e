"""K trials of one architecture trained as one: stacked weights, one vmapped step.

`torch.func.stack_module_state` stacks the K models' parameters into `(K, ...)` tensors,
`vmap(functional_call)` runs all K forward passes as one batched computation (the
convolutions become grouped convolutions), one backward pass gives every trial its own
gradient (the losses are summed, and trial k's loss depends only on trial k's weights),
and the optimizer step is a handful of foreach kernels with per-trial learning rate,
momentum and weight decay as `(K, 1, ...)` tensors. The update is torch.optim's SGD
(momentum, dampening 0, L2 weight decay) and Adam, written out, so that a fused trial
follows the same path as the trial trained alone by `SingleEngine`.

Trials fuse when they share everything but lr, momentum, weight decay and seed
(`group_key`). Trials with different seeds get their own weight init and data order:
the batch becomes `(K, B, ...)`. Models with batch norm (running statistics mutated in
place) do not fuse and run alone.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from cnnbench.config import TrialConfig
from cnnbench.data import DATASETS, DatasetInfo
from cnnbench.train import autocast, build_model

# settings a fused group may vary per trial
PER_TRIAL = ("lr", "momentum", "weight_decay", "seed")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def group_key(config: TrialConfig) -> tuple:
    """Trials with equal keys can be trained together."""
    d = config.to_dict()
    return tuple((k, v) for k, v in sorted(d.items()) if k not in PER_TRIAL)


_fusable_cache: dict[tuple, bool] = {}


def fusable(config: TrialConfig) -> bool:
    """No batch norm (vmap cannot update running statistics in place)."""
    key = (config.model, config.activation, config.dataset)
    if key not in _fusable_cache:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = build_model(config, DATASETS[config.dataset])
        _fusable_cache[key] = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return _fusable_cache[key]


def check_fusable(configs: Sequence[TrialConfig]) -> None:
    keys = {group_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError("fused trials must share every setting but " + ", ".join(PER_TRIAL))
    if not fusable(configs[0]):
        raise ValueError(f"model {configs[0].model} has batch norm and cannot be trained fused")


def fuse_groups(configs: Sequence[TrialConfig], *, max_k: int = 16, enabled: bool = True) -> list[list[int]]:
    """Indices of `configs`, grouped into runs of at most `max_k` fusable trials (order kept)."""
    groups: dict[tuple, list[int]] = {}
    out: list[list[int]] = []
    for i, c in enumerate(configs):
        if not enabled or not fusable(c):
            out.append([i])
            continue
        key = group_key(c)
        if key not in groups or len(groups[key]) >= max_k:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(i)
    return out


class FusedEngine:
    """The engine interface of train.SingleEngine, for K stacked models."""

    def __init__(self, configs: Sequence[TrialConfig], device: torch.device, info: DatasetInfo) -> None:
        self.configs = list(configs)
        self.k = len(configs)
        c0 = configs[0]
        self.config, self.device = c0, device
        models = [build_model(c, info) for c in configs]  # each seeded as when it trains alone
        self.base = copy.deepcopy(models[0]).to("meta")
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.params = [params[n].detach().to(device).requires_grad_(True) for n in self.names]
        self.buffers = {n: b.to(device) for n, b in buffers.items()}
        shapes = [(self.k,) + (1,) * (p.dim() - 1) for p in self.params]

        def per_trial(values: list[float]) -> list[Tensor]:
            t = torch.tensor(values, device=device, dtype=torch.float32)
            return [t.view(s) for s in shapes]

        self._shapes = shapes
        self.momentum = per_trial([c.momentum for c in configs])
        self.weight_decay = per_trial([c.weight_decay for c in configs])
        self.use_wd = any(c.weight_decay for c in configs)
        self.adam = c0.optimizer == "adam"
        self.steps = 0
        if self.adam:
            self.exp_avg = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        else:
            self.bufs = [torch.zeros_like(p) for p in self.params]
        self.active = torch.ones(self.k, device=device)
        self.lr_table = torch.zeros(1, self.k, device=device)

        base = self.base

        def loss_fn(p: tuple[Tensor, ...], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            out = functional_call(base, ({**dict(zip(self.names, p)), **b}), (x,))
            return F.cross_entropy(out, y)

        def logits_fn(p: tuple[Tensor, ...], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(base, ({**dict(zip(self.names, p)), **b}), (x,))

        self._loss = {shared: vmap(loss_fn, in_dims=(0, 0, None if shared else 0, None if shared else 0),
                                   randomness="different") for shared in (True, False)}
        self._logits = vmap(logits_fn, in_dims=(0, 0, None), randomness="different")
        if c0.compile != "none":
            self._loss = {s: torch.compile(f, mode=c0.compile) for s, f in self._loss.items()}
            self._logits = torch.compile(self._logits, mode=c0.compile)

    # -- the engine interface ---------------------------------------------------------------
    def begin_epoch(self, lrs: list[list[float]]) -> None:
        self.lr_table = torch.tensor(lrs, device=self.device, dtype=torch.float32) * self.active

    def deactivate(self, k: int) -> None:
        """Stop trial k (diverged or pruned): its rate becomes 0, the others go on."""
        self.active[k] = 0.0
        self.lr_table[:, k] = 0.0

    def train(self, mode: bool) -> None:
        self.base.train(mode)

    def train_step(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        lr = self.lr_table[step if self.lr_table.shape[0] > 1 else 0]
        shared = x.dim() == 4
        with autocast(self.config, self.device):
            losses = self._loss[shared](tuple(self.params), self.buffers, x, y)
        losses.sum().backward()
        grads = [p.grad for p in self.params]
        with torch.no_grad():
            self._update(grads, lr)
        for p in self.params:
            p.grad = None
        return losses.detach().float()

    def _update(self, grads: list[Tensor], lr: Tensor) -> None:
        if self.use_wd:  # L2 weight decay, as torch.optim: g <- g + wd * p
            grads = torch._foreach_add(grads, torch._foreach_mul(self.params, self.weight_decay))
        neg_lr = [(-lr).view(s) for s in self._shapes]
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

    @torch.no_grad()
    def eval_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.config, self.device):
            logits = self._logits(tuple(self.params), self.buffers, x).float()  # K x B x classes
        k, b, n = logits.shape
        loss = F.cross_entropy(logits.reshape(k * b, n), y.repeat(k), reduction="none").view(k, b).sum(1)
        correct = (logits.argmax(-1) == y).sum(1)
        return loss, correct

    def state_tensors(self) -> list[Tensor]:
        """Every tensor a training step changes (weights, buffers, optimizer state)."""
        opt = [*self.exp_avg, *self.exp_avg_sq] if self.adam else list(self.bufs)
        return [*self.params, *self.buffers.values(), *opt]

    # -- per-trial state, in SingleEngine's format ------------------------------------------
    def trial_state(self, k: int) -> dict[str, Any]:
        model = {n: p[k].detach().clone() for n, p in zip(self.names, self.params)}
        model.update({n: b[k].clone() for n, b in self.buffers.items()})
        if self.adam:
            opt = {n: {"step": torch.tensor(float(self.steps)), "exp_avg": m[k].clone(), "exp_avg_sq": v[k].clone()}
                   for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq)}
        else:
            opt = {n: {"momentum_buffer": b[k].clone()} for n, b in zip(self.names, self.bufs)} if self.steps else {}
        return {"model": model, "optimizer": opt}

    @torch.no_grad()
    def load_trial_state(self, k: int, state: dict[str, Any]) -> None:
        for n, p in zip(self.names, self.params):
            p[k].copy_(state["model"][n])
        for n, b in self.buffers.items():
            b[k].copy_(state["model"][n])
        opt = state["optimizer"]
        if not opt:
            return
        if self.adam:
            for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
                m[k].copy_(opt[n]["exp_avg"])
                v[k].copy_(opt[n]["exp_avg_sq"])
            self.steps = int(next(iter(opt.values()))["step"])
        else:
            for n, b in zip(self.names, self.bufs):
                if "momentum_buffer" in opt.get(n, {}):
                    b[k].copy_(opt[n]["momentum_buffer"])
            self.steps = max(self.steps, 1)
