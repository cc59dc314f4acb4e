"""K trials of one architecture trained as one: stacked weights, one vmapped step.

`torch.func.stack_module_state` stacks the K models' parameters into `(K, ...)` tensors,
`vmap(functional_call)` runs all K forward passes as one batched computation (the
convolutions become grouped convolutions), one backward pass gives every trial its own
gradient (the losses are summed, and trial k's loss depends only on trial k's weights),
and the optimizer step is a handful of foreach kernels with per-trial learning rate,
momentum and weight decay as `(K, 1, ...)` tensors (`per_trial.PerTrialOptimizer`,
torch.optim's SGD and Adam written out, shared with the wide engine), so that a fused
trial follows the same path as the trial trained alone by `single.SingleEngine`. Which groups
form, and which engine trains them, is decided here too (`fuse_groups`, `engine_for`).

Trials fuse when they share everything but lr, momentum, weight decay and seed
(`group_key`). Trials with different seeds get their own weight init and data order:
the batch becomes `(K, B, ...)`.

Two fused engines: `FusedEngine` here (vmap) and `wide.WideEngine` (the K models as one
wide model: grouped convolutions, batched linears, one batch norm over K*C channels).
`engine_for` picks the one that can train the model (vmap where it does not widen,
`wide.widen_reason`; wide where it has batch norm, running statistics mutated in place,
which vmap cannot do; alone where neither) and, where both can, the wide one on the CPU
and the one measured faster on other devices (measured.py); a model with batch norm that
does not widen trains alone.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import DatasetInfo, dataset_info
from cnnbench.models import model_identity
from cnnbench.models.layers import BATCH_NORMS
from cnnbench.models.meta import on_meta
from cnnbench.train import probe
from cnnbench.train.device import autocast, build_model, device_name, resolve_device
from cnnbench.train.measured import measured_engine
from cnnbench.train.per_trial import PerTrialOptimizer
from cnnbench.train.streams import stream_blocks
from cnnbench.train.wide import WideEngine, widen_reason
from cnnbench.util import interrupt
from cnnbench.util.host_memory import keep_freed_memory

log = logging.getLogger(__name__)
ENGINES = ("wide", "vmap")

# settings a fused group may vary per trial
PER_TRIAL = ("lr", "momentum", "weight_decay", "seed")


def group_key(config: TrialConfig) -> tuple:
    """Trials with equal keys can be trained together."""
    d = config.to_dict()
    return tuple((k, v) for k, v in sorted(d.items()) if k not in PER_TRIAL)


class Traits(NamedTuple):
    """What a network allows: why it cannot be widened, why vmap cannot fuse it (None: it
    can), and the classes of the user's whose forward was tried and widens (probe.py)."""
    wide: str | None
    vmap: str | None
    trusted: frozenset[str] = frozenset()


_traits_cache: dict[tuple, Traits] = {}


def model_traits(config: TrialConfig, root: Any = None) -> Traits:
    """The engines the trial's network can take (`root`: the data folder, for the data's
    shape). cnnbench's own models are known; a user's network with classes of its own is
    tried (probe.py), once per network version and data set in a process."""
    key = (config.model, model_identity(config.model), config.activation, config.dataset, config.dropout)
    if key not in _traits_cache:
        info = dataset_info(config.dataset, root)
        try:
            with interrupt.kept(), on_meta():  # shapes only: no memory, no init cost
                model = build_model(config, info)
        except Exception:  # a user's network that computes with real values while it is built
            model = build_model(config, info)
        has_bn = any(isinstance(m, BATCH_NORMS) for m in model.modules())
        no_vmap = "it has batch norm, which vmap cannot fuse (running statistics)" if has_bn else None
        unknown = probe.unknown_types(model)
        if not unknown:
            _traits_cache[key] = Traits(widen_reason(model), no_vmap)
        else:  # the user's classes: tried on two copies with different weights
            copies = [build_model(config.replace(seed=seed), info) for seed in (0, 1)]
            wide = widen_reason(model, trusted=unknown) or probe.own_state_problem(model, unknown) or \
                probe.wide_problem(copies, info.channels, info.size, unknown)
            vmapped = no_vmap or probe.vmap_problem(copies, info.channels, info.size)
            _traits_cache[key] = Traits(wide, vmapped, unknown if wide is None else frozenset())
    return _traits_cache[key]


def fusable(config: TrialConfig, *, wide_only: bool = False, root: Any = None) -> bool:
    """Can trials of this config train fused: widened, or (unless `wide_only`) through vmap."""
    t = model_traits(config, root)
    return t.wide is None or (not wide_only and t.vmap is None)


def engine_for(config: TrialConfig, requested: str | None = None, root: Any = None, k: int | None = None) -> str:
    """The fused engine for `k` trials of `config`: `requested` ("wide" or "vmap") if it can
    train them, else a ValueError saying why. None: the one that can, and where both can,
    `default_engine`'s choice for the trial's device (`root`: the data folder, for a
    user's network's traits)."""
    t = model_traits(config, root)
    if requested not in (None, *ENGINES):
        raise ValueError(f"unknown fused engine {requested!r}; known: {', '.join(ENGINES)}")
    if requested == "wide" and t.wide:
        raise ValueError(f"model {config.model} cannot be widened: {t.wide}")
    if requested == "vmap" and t.vmap:
        raise ValueError(f"model {config.model}: {t.vmap}")
    if requested is None and t.wide:
        if t.vmap:
            raise ValueError(f"model {config.model} cannot be widened ({t.wide}) and {t.vmap}: it trains alone")
        log.info("model %s fuses through vmap, not widened: %s", config.model, t.wide)
    if requested or t.wide or t.vmap:
        return requested or ("wide" if t.wide is None else "vmap")
    device = resolve_device(config.device)
    return default_engine(config, device.type, device_name(device), k or 2)


def default_engine(config: TrialConfig, device_type: str, name: str, k: int,
                   speeds: Path | None = None) -> str:
    """Where both engines can train the trials: on the CPU the wide one (1.3x to 2x vmap's
    model-images/s for LeNet-5 at K = 1, 3, 8 on one thread, results/bench/engines_cpu.csv);
    elsewhere the faster one measured on this device for this model, batch size and K
    (measured.py: `cnnbench bench --engines`, gpu-check's engine sweep), and vmap where
    nothing was measured (the H100's figures were vmap's, with whole steps as CUDA graphs)."""
    if device_type == "cpu":
        return "wide"
    chosen = measured_engine(name, config.model, config.batch_size, k, path=speeds)
    if chosen:
        log.info("fused engine %s for %d trials of %s on %s: measured faster", chosen, k, config.model, name)
    return chosen or "vmap"


def preferred_engine(config: TrialConfig, preferred: str | None, root: Any = None) -> str | None:
    """`preferred` ("wide" or "vmap", a calibration's choice) where it can train trials of
    `config`, else None: `engine_for`'s own choice."""
    if preferred is None:
        return None
    try:
        return engine_for(config, preferred, root)
    except ValueError:  # a model that does not widen, or batch norm under vmap
        return None


def engine_choice(config: TrialConfig, *, wide_only: bool, root: Any = None, preferred: str | None = None) -> str:
    """Which engine trains fused groups of trials of `config`, and why, in words
    (`preferred`: the calibration's engine, where it can train them)."""
    t = model_traits(config, root)
    if not fusable(config, wide_only=wide_only, root=root):
        vmap = t.vmap or "and on the CPU vmap is slower than one trial at a time"
        return f"{config.model}: one trial at a time (not widened: {t.wide}; {vmap})"
    chosen = preferred_engine(config, preferred, root)
    name = chosen or ("wide" if wide_only else engine_for(config, root=root))
    if name == "wide":
        how = "tried: widened, its output matches" if t.trusted else "every layer widens"
        return f"{config.model}: wide (K trials as one wide model; {how})"
    why = ("on this device vmap, measured faster or nothing measured (train/measured.py)" if t.wide is None
           else f"not widened: {t.wide}")
    why = "this machine's calibration measured it fastest" if chosen == "vmap" else why
    return f"{config.model}: vmap (K stacked trials; {why})"


def check_fusable(configs: Sequence[TrialConfig]) -> None:
    keys = {group_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError("fused trials must share every setting but " + ", ".join(PER_TRIAL))
    if not fusable(configs[0]):
        t = model_traits(configs[0])
        raise ValueError(f"model {configs[0].model} has batch norm and cannot be widened ({t.wide}): it trains alone"
                         if t.vmap and "batch norm" in t.vmap else
                         f"model {configs[0].model} cannot be widened ({t.wide}) and {t.vmap}: it trains alone")


def fused_engine(configs: Sequence[TrialConfig], device: torch.device, info: DatasetInfo,
                 engine: str | None = None):
    """The engine that trains `configs` (fusable, see `group_key`) as one: wide or vmap."""
    check_fusable(configs)
    name = engine_for(configs[0], engine, k=len(configs))
    if name == "wide":
        return WideEngine(configs, device, info, trusted=model_traits(configs[0]).trusted)
    return FusedEngine(configs, device, info)


def fuse_groups(configs: Sequence[TrialConfig], *, max_k: int = 16, enabled: bool = True,
                wide_only: bool = False, root: Any = None) -> list[list[int]]:
    """Indices of `configs`, grouped into runs of at most `max_k` fusable trials (order kept).
    `wide_only`: fuse only models that widen (the CPU, where vmap is slower than alone).
    On the CPU a run whose trials read more than one stream (seeds) is then trained seed
    by seed (`streams.stream_blocks`: a group per seed, the seeds with one trial together)."""
    groups: dict[tuple, list[int]] = {}
    out: list[list[int]] = []
    for i, c in enumerate(configs):
        if not enabled or not fusable(c, wide_only=wide_only, root=root):
            if enabled:
                log.info("model %s trains one trial at a time: %s", c.model, model_traits(c, root).wide)
            out.append([i])
            continue
        key = group_key(c)
        if key not in groups or len(groups[key]) >= max_k:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(i)
    return [[idx[j] for j in block] for idx in out
            for block in (stream_blocks([configs[i].seed for i in idx]) if len(idx) > 1 and on_cpu(configs[idx[0]])
                          else [range(len(idx))])]


def on_cpu(config: TrialConfig) -> bool:
    """Does `config` train on the CPU (its device "cpu", or "auto" on a machine without a GPU)?"""
    return config.device == "cpu" or (config.device == "auto" and resolve_device("auto").type == "cpu")


class FusedEngine:
    """The engine (engine.Engine) for K stacked models, vmapped."""

    eval_images: int | None = None  # test images per forward pass, at most (loop.evaluate)
    per_stream = False  # vmap maps over K batches, one per trial

    def __init__(self, configs: Sequence[TrialConfig], device: torch.device, info: DatasetInfo) -> None:
        self.configs = list(configs)
        self.k = len(configs)
        c0 = configs[0]
        self.config, self.device = c0, device
        if device.type == "cpu":
            keep_freed_memory()  # a step's freed tensors kept for the next (util/host_memory.py)
        models = [build_model(c, info) for c in configs]  # each seeded as when it trains alone
        self.base = copy.deepcopy(models[0]).to("meta")
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.params = [params[n].detach().to(device).requires_grad_(True) for n in self.names]
        self.buffers = {n: b.to(device) for n, b in buffers.items()}
        self.opt = PerTrialOptimizer(self.params, configs, device)

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
        self.opt.begin_epoch(lrs)

    def deactivate(self, k: int) -> None:
        """Stop trial k (diverged or pruned): its rate becomes 0, the others go on."""
        self.opt.deactivate(k)

    def train(self, mode: bool) -> None:
        self.base.train(mode)

    def train_step(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        lr = self.opt.lr(step)
        shared = x.dim() == 4
        with autocast(self.config, self.device):
            losses = self._loss[shared](tuple(self.params), self.buffers, x, y)
        losses.sum().backward()
        grads = [p.grad for p in self.params]
        self.opt.step(grads, lr)
        for p in self.params:
            p.grad = None
        return losses.detach().float()

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
        return [*self.params, *self.buffers.values(), *self.opt.state_tensors()]

    # -- per-trial state, in SingleEngine's format ------------------------------------------
    def trial_state(self, k: int) -> dict[str, Any]:
        model = {n: p[k].detach().clone() for n, p in zip(self.names, self.params)}
        model.update({n: b[k].clone() for n, b in self.buffers.items()})
        opt = self.opt.trial_state(k, self.names)
        return {"model": model, "optimizer": opt}

    @torch.no_grad()
    def load_trial_state(self, k: int, state: dict[str, Any]) -> None:
        for n, p in zip(self.names, self.params):
            p[k].copy_(state["model"][n])
        for n, b in self.buffers.items():
            b[k].copy_(state["model"][n])
        self.opt.load_trial_state(k, self.names, state["optimizer"])
