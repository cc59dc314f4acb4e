"""K trials of one architecture trained as one wide model (horizontal fusion, HFTA).

`widen(models)` builds, from the K models' own initial weights, one module whose
activations hold the K trials side by side on the channel dimension: `(N, K*C, H, W)`,
trial-major (trial k owns channels k*C .. (k+1)*C), and `(N, K*F)` after a flatten.
- Conv2d -> one grouped convolution (`groups = K x g`); where its input is the batch all
  K trials share (same seed, same data order) a dense one with K times the output channels.
  A grouped one runs as `F.conv2d` or as batched matrix products (grouped_conv.py), a
  choice per device and shape (conv_path.py, `CNNBENCH_CONV_PATH`).
- Linear -> a batched matrix product (`baddbmm` over K).
- BatchNorm -> one batch norm over K*C channels: statistics are per channel, so per trial.
- activations, pooling, dropout, flatten, residual sums: unchanged (per channel or
  per element, and `flatten(1)` of a trial-major layout is trial-major).
- channel concatenation (`models._layers.Concat`, Inception's branches) -> a concatenation
  per trial, so that each trial's channels stay together.
The wide module keeps the parameter names of the original, and every wide tensor is trial
k's tensor at index k of a `(K, ...)` view, so per-trial state goes out and in with no
copy of the whole (`WideEngine.trial_state`, checkpoints in SingleEngine's format).

A model is widened only if every module in it is one the transform knows (`widen_reason`
says which is not, and why); the others fuse through vmap (fused.py) or train alone.
Trials with different seeds in one group get their own batches: the input `(K, B, C, H, W)`
becomes `(B, K*C, H, W)` and the first convolution is grouped too; where several trials
share a seed (S distinct, 1 < S < K) the loop hands one batch per stream, `(S, B, C, H, W)`
(`per_stream`), and the first convolution runs once per stream (streams.py).
`state_tensors` lists every tensor a step changes, so a whole wide step can be captured
as a CUDA graph (graphs.py).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import DatasetInfo
from cnnbench.models import alexnet, inception, lenet, resnet
from cnnbench.models.layers import ACTIVATIONS, BATCH_NORMS, Concat
from cnnbench.models.tv import ResizeInput
from cnnbench.train.conv_path import PATHS, conv_mode, conv_path
from cnnbench.train.device import autocast, build_model, to_channels_last, use_channels_last
from cnnbench.train.per_trial import PerTrialOptimizer
from cnnbench.train.streams import Streams, dedupe_wanted, stream_conv2d, stream_order
from cnnbench.util.host_memory import keep_freed_memory

# model-images forwarded at once by a test pass on the CPU (WideEngine.eval_images)
CPU_EVAL_IMAGES = 768


class WideConv2d(nn.Module):
    """K convolutions as one: weight `(K*O, C/g, kh, kw)`, trial k's filters at rows k*O.."""

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        c = convs[0]
        self.k, self.in_per_trial, self.groups = len(convs), c.in_channels, c.groups
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in convs]))
        self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in convs])) if c.bias is not None else None

        self.streams: Streams | None = None  # set by WideEngine where trials share batches

    def forward(self, x: Tensor) -> Tensor:
        geometry = (self.stride, self.padding, self.dilation)
        if self.k > 1 and x.shape[1] == self.in_per_trial:  # the shared batch: N x C x H x W
            if self.groups == 1:  # one dense convolution with K*O outputs
                return F.conv2d(x, self.weight, self.bias, *geometry)
            x = x.repeat(1, self.k, 1, 1)  # N x K*C x H x W
        elif self.streams is not None and x.shape[1] == self.streams.s * self.in_per_trial:  # N x S*C x H x W
            if self.groups == 1:  # each stream's batch once, with its trials' filters
                return stream_conv2d(x, self.weight, self.bias, self.streams, geometry, convolution)
            x = self.streams.to_trials(x, self.in_per_trial)  # N x K*C x H x W
        groups = self.k * self.groups
        conv = convolution(x, self.weight, self.bias, *geometry, groups)
        # N x K*C x H x W -> N x K*O x H' x W'
        return conv(x, self.weight, self.bias, *geometry, groups)


def convolution(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
                groups: int) -> Callable[..., Tensor]:
    """The function that computes this grouped convolution: F.conv2d or grouped_conv2d (conv_path)."""
    return PATHS[conv_path(x, weight, bias, stride, padding, dilation, groups)]


class WideLinear(nn.Module):
    """K linear layers as one batched product: weight `(K, out, in)`, bias `(K, out)`."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        lin = linears[0]
        self.k, self.in_features = len(linears), lin.in_features
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears])) if lin.bias is not None else None
        self.streams: Streams | None = None  # set by WideEngine where trials share batches

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if self.k > 1 and x.shape[1] == self.in_features:  # shared input: N x in
            xk = x.unsqueeze(0).expand(self.k, -1, -1)
        elif self.streams is not None and x.shape[1] == self.streams.s * self.in_features:  # N x S*in
            xk = x.view(n, self.streams.s, self.in_features).transpose(0, 1)  # S x N x in
            xk = xk.index_select(0, self.streams.trial_stream)  # K x N x in
        else:  # N x K*in -> K x N x in
            xk = x.view(n, self.k, self.in_features).transpose(0, 1)
        w = self.weight.transpose(1, 2)  # K x in x out
        out = torch.bmm(xk, w) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), xk, w)
        return out.transpose(0, 1).reshape(n, -1)  # N x K*out


def wide_batch_norm(norms: Sequence[nn.Module]) -> nn.Module:
    """K batch norms over C channels as one over K*C: same statistics, channel by channel."""
    b = norms[0]
    wide = type(b)(len(norms) * b.num_features, eps=b.eps, momentum=b.momentum, affine=b.affine,
                   track_running_stats=b.track_running_stats)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(wide, name) is not None:
                getattr(wide, name).copy_(torch.cat([getattr(m, name) for m in norms]))
        if b.num_batches_tracked is not None:
            wide.num_batches_tracked.copy_(b.num_batches_tracked)
    return wide


class WideConcat(nn.Module):
    """`Concat` per trial: K*c1, K*c2, ... channels -> K*(c1 + c2 + ...), trial-major."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, xs: list[Tensor]) -> Tensor:
        parts = [x.unflatten(1, (self.k, -1)) for x in xs]  # each N x K x c_i x H x W
        out = torch.cat(parts, dim=2).flatten(1, 2)  # N x K*sum(c_i) x H x W
        if xs[0].is_contiguous(memory_format=torch.channels_last) and not xs[0].is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class WideResizeInput(nn.Module):
    """`ResizeInput` for a wide net: resizes, and repeats each trial's channels on its own."""

    def __init__(self, resize: ResizeInput, k: int, in_channels: int) -> None:
        super().__init__()
        self.net, self.size, self.channels = resize.net, resize.size, resize.channels
        self.k, self.in_channels = k, in_channels
        self.streams: Streams | None = None  # set by WideEngine where trials share batches

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        # the shared batch, one per stream (resized once each), or K trials' own
        s = self.streams.s if self.streams is not None else 0
        k = 1 if x.shape[1] == self.in_channels else s if x.shape[1] == s * self.in_channels else self.k
        c = x.shape[1] // k
        if c != self.channels:
            x = x.unflatten(1, (k, c))  # N x k x c x S x S
            x = x.expand(-1, -1, self.channels, -1, -1) if c == 1 else \
                x.mean(2, keepdim=True).expand(-1, -1, self.channels, -1, -1)
            x = x.flatten(1, 2)  # N x k*channels x S x S
        return self.net(x)


def _wide_inception_forward(block: nn.Module, k: int):
    """torchvision's GoogLeNet Inception block joins its branches with `torch.cat` in its own
    forward; this forward joins its four branches (`branch1`..`branch4`) per trial instead."""
    concat = WideConcat(k)

    def forward(x: Tensor) -> Tensor:
        return concat([block.branch1(x), block.branch2(x), block.branch3(x), block.branch4(x)])

    return forward


# per-element or per-channel modules: the same module serves the wide layout
ELEMENTWISE = (nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
               nn.ReLU, nn.ReLU6, nn.Hardtanh, *ACTIVATIONS.values())
# containers whose forward only calls their children, adds tensors of one shape and flattens
# from dim 1: known to keep the trials apart (read each class's forward before adding one)
LAYOUT_SAFE = (nn.Sequential, lenet.LeNet, alexnet.AlexNet, inception.InceptionNet, inception.InceptionBlock,
               resnet.ResNet, resnet.ResidualBlock)
# torchvision's, by their full names: matching them needs no import of torchvision, which
# takes 1.4 s (a model of it was built, so imported, before any of them reaches here)
TV_LAYOUT_SAFE = {"torchvision.models.resnet.ResNet", "torchvision.models.resnet.BasicBlock",
                  "torchvision.models.resnet.Bottleneck", "torchvision.models.vgg.VGG",
                  "torchvision.models.alexnet.AlexNet", "torchvision.models.googlenet.GoogLeNet",
                  "torchvision.models.googlenet.BasicConv2d"}
TV_GOOGLENET, TV_INCEPTION = "torchvision.models.googlenet.GoogLeNet", "torchvision.models.googlenet.Inception"
SPECIAL = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, Concat, ResizeInput)


def full_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"
WHY_NOT = {nn.LocalResponseNorm: "LocalResponseNorm normalises across neighbouring channels, which would "
                                 "mix the channels of adjacent trials"}


def forward_known(t: type) -> bool:
    """A module class whose forward is known to keep the trials of a wide layout apart."""
    return t in ELEMENTWISE or t in LAYOUT_SAFE or t in SPECIAL or full_name(t) in TV_LAYOUT_SAFE | {TV_INCEPTION}


def widen_reason(model: nn.Module, *, trusted: frozenset[str] = frozenset()) -> str | None:
    """None when `model` can be widened; otherwise why not (the first module in the way).
    `trusted`: the full names of classes of unknown forward that were tried and keep the
    trials apart (probe.py; names, so that a module imported again keeps them)."""
    for path, m in model.named_modules():
        t, where = type(m), path or "the model"
        if t in WHY_NOT:
            return f"{where}: {WHY_NOT[t]}"
        if t is nn.Conv2d and m.padding_mode != "zeros":
            return f"{where}: Conv2d with padding_mode={m.padding_mode!r} is not widened"
        if t is nn.Flatten and (m.start_dim != 1 or m.end_dim != -1):
            return f"{where}: Flatten over dims {m.start_dim}..{m.end_dim} would mix trials"
        if isinstance(m, BATCH_NORMS) and t not in SPECIAL:
            return f"{where}: {t.__name__} is not widened"
        if full_name(t) == TV_GOOGLENET and (m.transform_input or m.aux1 is not None):
            return f"{where}: GoogLeNet with transform_input or auxiliary heads is not widened"
        if not forward_known(t) and full_name(t) not in trusted:
            return f"{where}: {t.__name__}'s forward is not known to keep trials apart (not in wide.LAYOUT_SAFE)"
    return None


def widen(models: Sequence[nn.Module], *, in_channels: int, trusted: frozenset[str] = frozenset()) -> nn.Module:
    """One wide module from K models of one architecture (their own weights, copied).

    `in_channels`: the data's channels, which tell the shared batch from per-trial ones.
    Raises ValueError with `widen_reason` when the architecture cannot be widened."""
    reason = widen_reason(models[0], trusted=trusted)
    if reason:
        raise ValueError(f"cannot widen {type(models[0]).__name__}: {reason}")
    return _widen(copy.deepcopy(models[0]), list(models), len(models), in_channels)


def _widen(module: nn.Module, sources: list[nn.Module], k: int, in_channels: int) -> nn.Module:
    t = type(module)
    if t is nn.Conv2d:
        return WideConv2d(sources)
    if t is nn.Linear:
        return WideLinear(sources)
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        return wide_batch_norm(sources)
    if t is Concat:
        return WideConcat(k)
    for name, child in list(module.named_children()):
        setattr(module, name, _widen(child, [getattr(s, name) for s in sources], k, in_channels))
    if t is ResizeInput:
        return WideResizeInput(module, k, in_channels)
    if full_name(t) == TV_INCEPTION:
        module.forward = _wide_inception_forward(module, k)
    return module


def trial_view(wide: Tensor, shape: torch.Size, k: int) -> Tensor:
    """The wide tensor as `(K, *shape)`: trial k's tensor at index k (a view, not a copy)."""
    if wide.dim() == 0:  # a counter all trials share (num_batches_tracked)
        return wide.detach().expand(k)
    return wide.detach().view(k, *shape)


class WideEngine:
    """The engine (engine.Engine) for K trials widened into one model."""

    def __init__(self, configs: Sequence[TrialConfig], device: torch.device, info: DatasetInfo,
                 trusted: frozenset[str] = frozenset()) -> None:
        self.configs = list(configs)
        self.k = len(self.configs)
        c0 = self.configs[0]
        self.config, self.device, self.in_channels = c0, device, info.channels
        if device.type == "cpu":
            keep_freed_memory()  # a step's freed tensors kept for the next (util/host_memory.py)
        conv_mode(device.type)  # a bad CNNBENCH_CONV_PATH stops the group here, before it trains
        models = [build_model(c, info) for c in self.configs]  # each seeded as when it trains alone
        shapes = {n: t.shape for n, t in models[0].state_dict().items()}
        self.model = widen(models, in_channels=info.channels, trusted=trusted).to(device)  # trusted: probe.py
        self.channels_last = use_channels_last(c0, device, info)
        if self.channels_last:
            self.model = to_channels_last(self.model)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]
        self.buffers = dict(self.model.named_buffers())
        if set(self.names) | set(self.buffers) != set(shapes):
            raise RuntimeError("the wide model's state names differ from the model's")
        self.shapes = {n: shapes[n] for n in shapes}
        self.views = [trial_view(p, shapes[n], self.k) for n, p in zip(self.names, self.params)]
        self.opt = PerTrialOptimizer(self.views, self.configs, device)
        self.streams = self._share_streams(device)
        self.per_stream = self.streams is not None
        self.forward = self.model if c0.compile == "none" else torch.compile(self.model, mode=c0.compile)
        # test images per forward pass, at most (loop.evaluate): on the CPU, K trials'
        # activations of a 1024-image test batch do not stay in cache (LeNet-5, K = 3, one
        # thread: a test pass took 0.96 s in batches of 1024, 0.60 s in pieces of 256;
        # K = 2: 0.65 s and 0.42 s)
        self.eval_images = max(1, CPU_EVAL_IMAGES // self.k) if device.type == "cpu" else None

    def _share_streams(self, device: torch.device) -> Streams | None:
        """Where S of the K trials' seeds are distinct, 1 < S < K: one batch per stream
        (streams.py), handed to the layers that take the input (the first convolution)."""
        order = stream_order([c.seed for c in self.configs])
        if not 1 < max(order) + 1 < self.k:
            return None
        streams = Streams(order, device)
        if not dedupe_wanted(streams, device.type):
            return None
        for m in self.model.modules():
            if isinstance(m, (WideConv2d, WideLinear, WideResizeInput)):
                m.streams = streams
        return streams

    # -- the engine interface ---------------------------------------------------------------
    def begin_epoch(self, lrs: list[list[float]]) -> None:
        self.opt.begin_epoch(lrs)

    def deactivate(self, k: int) -> None:
        """Stop trial k (diverged or pruned): its rate becomes 0, the others go on."""
        self.opt.deactivate(k)

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def wide_input(self, x: Tensor) -> Tensor:
        """The shared batch `(B, C, H, W)` as it is; per-trial batches `(K, B, C, H, W)` (or,
        where `per_stream`, one per stream, `(S, B, C, H, W)`) side by side on channels,
        `(B, K*C, H, W)` (`(B, S*C, H, W)`)."""
        if x.dim() == 4:
            return x
        k, b, c, h, w = x.shape
        x = x.permute(1, 0, 2, 3, 4).reshape(b, k * c, h, w)  # B x K*C x H x W
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def logits(self, x: Tensor) -> Tensor:
        """B x K x classes."""
        out = self.forward(self.wide_input(x))  # B x K*classes
        return out.view(out.shape[0], self.k, -1)

    def losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """B x K cross-entropies of `logits` (B x K x classes) against the shared labels
        `y` (B) or per-trial ones (K x B)."""
        b, k, n = logits.shape
        if self.streams is not None and y.dim() == 2 and y.shape[0] == self.streams.s:  # S x B
            y = self.streams.labels(y)  # K x B
        target = y.unsqueeze(1).expand(b, k) if y.dim() == 1 else y.t()  # B x K
        return F.cross_entropy(logits.reshape(b * k, n), target.reshape(b * k), reduction="none").view(b, k)

    def train_step(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        lr = self.opt.lr(step)
        with autocast(self.config, self.device):
            logits = self.logits(x)
        losses = self.losses(logits.float(), y).mean(0)  # K
        # trial k's loss depends on trial k's weights only. The gradients as autograd makes
        # them, without .grad: accumulating into .grad copies each one whose strides differ
        # from its parameter's (a linear layer's, made transposed; LeNet-5, K = 3: 0.3 ms of
        # a 15 ms step on one CPU thread), and the update reads them in any layout
        grads = torch.autograd.grad(losses.sum(), self.params)
        self.opt.step([g.reshape(v.shape) for g, v in zip(grads, self.views)], lr)
        return losses.detach()

    @torch.no_grad()
    def eval_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.config, self.device):
            logits = self.logits(x).float()  # B x K x classes
        loss = self.losses(logits, y).sum(0)
        correct = (logits.argmax(-1) == y.unsqueeze(1)).sum(0)
        return loss, correct

    def state_tensors(self) -> list[Tensor]:
        """Every tensor a training step changes (weights, buffers, optimizer state): what a
        CUDA graph's warm-up restores (graphs.StepGraph)."""
        return [*self.params, *self.buffers.values(), *self.opt.state_tensors()]

    # -- per-trial state, in SingleEngine's format ------------------------------------------
    def trial_state(self, k: int) -> dict[str, Any]:
        model = {n: v[k].clone() for n, v in zip(self.names, self.views)}
        model.update({n: trial_view(b, self.shapes[n], self.k)[k].clone() for n, b in self.buffers.items()})
        return {"model": model, "optimizer": self.opt.trial_state(k, self.names)}

    @torch.no_grad()
    def load_trial_state(self, k: int, state: dict[str, Any]) -> None:
        for n, v in zip(self.names, self.views):
            v[k].copy_(state["model"][n])
        for n, b in self.buffers.items():
            if b.dim() == 0:  # shared by the group, which resumes from one epoch
                b.copy_(state["model"][n])
            else:
                trial_view(b, self.shapes[n], self.k)[k].copy_(state["model"][n])
        self.opt.load_trial_state(k, self.names, state["optimizer"])
