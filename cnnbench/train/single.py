"""One trial trained alone: `SingleEngine`, an nn.Module and a torch.optim optimizer.

The reference path: the fused engines (fused.py, wide.py) follow the same maths for K
trials at once, and every engine hands a trial's state out and in in this engine's
format (`trial_state`), which is what a checkpoint holds. See engine.Engine.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import DatasetInfo
from cnnbench.train.device import autocast, build_model, to_channels_last, use_channels_last
from cnnbench.util.host_memory import keep_freed_memory


class SingleEngine:
    """One nn.Module, one torch.optim optimizer (foreach kernels), optionally compiled."""

    k = 1
    eval_images: int | None = None  # test images per forward pass, at most (loop.evaluate)
    per_stream = False  # one trial, one batch

    def __init__(self, configs: Sequence[TrialConfig], device: torch.device, info: DatasetInfo) -> None:
        (self.config,) = configs
        c = self.config
        self.device = device
        if device.type == "cpu":
            keep_freed_memory()  # a step's freed tensors kept for the next (util/host_memory.py)
        self.model = build_model(c, info).to(device)
        if use_channels_last(c, device, info):
            self.model = to_channels_last(self.model)
        self.names = [n for n, _ in self.model.named_parameters()]
        params = [p for _, p in self.model.named_parameters()]
        # one fused kernel per step on CUDA; foreach (a few kernels for all tensors) elsewhere
        kernels = {"fused": True} if device.type == "cuda" else {"foreach": True}
        if c.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, **kernels)
            if c.momentum:  # zeros now rather than a copy of the first gradient: the same numbers
                for p in params:  # (0 * momentum + g == g), and a step that a CUDA graph can replay
                    self.opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            self.opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay, **kernels)
        self.forward = self.model if c.compile == "none" else torch.compile(self.model, mode=c.compile)
        self.lrs: list[list[float]] = [[c.lr]]

    def begin_epoch(self, lrs: list[list[float]]) -> None:
        """`lrs[step][k]`: one row for the whole epoch, or one row per step."""
        self.lrs = lrs
        for g in self.opt.param_groups:
            g["lr"] = lrs[0][0]

    def deactivate(self, k: int) -> None:
        self.lrs = [[0.0]]
        for g in self.opt.param_groups:
            g["lr"] = 0.0

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def train_step(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        if len(self.lrs) > 1:
            for g in self.opt.param_groups:
                g["lr"] = self.lrs[step][0]
        with autocast(self.config, self.device):
            loss = F.cross_entropy(self.forward(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach().float().view(1)

    @torch.no_grad()
    def eval_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.config, self.device):
            logits = self.forward(x).float()
        loss = F.cross_entropy(logits, y, reduction="sum").view(1)
        correct = (logits.argmax(1) == y).sum().view(1)
        return loss, correct

    def state_tensors(self) -> list[Tensor]:
        """Every tensor a training step changes (weights, buffers, optimizer state)."""
        opt = [v for st in self.opt.state.values() for v in st.values() if isinstance(v, Tensor)]
        return [*self.model.parameters(), *self.model.buffers(), *opt]

    def trial_state(self, k: int) -> dict[str, Any]:
        by_param = dict(zip(self.names, self.model.parameters()))
        state = {n: {key: v.detach().clone() if isinstance(v, Tensor) else v
                     for key, v in self.opt.state.get(p, {}).items()} for n, p in by_param.items()}
        return {"model": {k_: v.detach().clone() for k_, v in self.model.state_dict().items()},
                "optimizer": {n: s for n, s in state.items() if s}}

    def load_trial_state(self, k: int, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        by_param = dict(zip(self.names, self.model.parameters()))
        for name, s in state["optimizer"].items():
            p = by_param[name]
            self.opt.state[p] = {key: v.to(p.device) if isinstance(v, Tensor) else v for key, v in s.items()}
