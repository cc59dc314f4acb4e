"""One batch per data stream: trials that share a seed share their batch, and the first
convolution of a wide group runs once per distinct batch, not once per trial (issue 25).

A wide group of K trials over S distinct seeds (1 < S < K; S = 1 is the shared batch,
which wide.WideConv2d already convolves densely) reads S batches: stream s is the s-th
smallest seed, as the loop numbers them (loop.Fit's `streams`). The engine asks the loop
for them as `(S, B, C, H, W)` (`per_stream`) and puts them side by side on channels,
`(B, S*C, H, W)`, instead of copying each stream's batch once per trial, `(B, K*C, H, W)`.

`stream_conv2d` then convolves each stream's batch once with the filters of every trial
on that stream: ONE grouped convolution with S groups (M = the most trials on one stream
output filters per group), where today's path runs K groups of one trial each. A stream
with fewer than M trials gets zero filters in its empty slots; their outputs are dropped.
The output's channels are then put back in trial order (trial-major, as every later layer
expects) by one gather, skipped where the trials are already stream-major (`identity`).
What it saves: the K-fold copy of the batch and, on the cuDNN grouped path, K - S of the
per-group kernels per pass (K -> S); on the bmm path (grouped_conv.py) the im2col columns
it keeps for grad_weight (LeNet-5's conv1, batch 64: 5 MB per group, K = 64 -> 321 MB).
The arithmetic per output is the same as today's (C*kh*kw products per output), so the
results differ from it by rounding only (tests/test_streams.py bounds it by measured noise).

`CNNBENCH_STREAM_DEDUPE`: `1` on, `0` off (the engine sweep's rows with and without it);
unset, on except on the CPU where the trials are not stream-major with equal streams: there
the output's gather costs more than the convolutions it saves (LeNet-5, 9 trials on 3
seeds, batch 64, one thread, channels-last, median of 35 steps on the shared 2-core CPU:
trials in seed order 0,1,2,0,1,2,..: 220 to 252 ms per step against 156 to 175 without;
seed-major 0,0,0,1,1,1,..: 169 against 183). On the CPU a group on several seeds is
trained seed by seed anyway (`stream_blocks`, fused.fuse_groups): one batch a group.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from cnnbench.errors import ConfigError

ENV = "CNNBENCH_STREAM_DEDUPE"


def dedupe_wanted(streams: Streams, device_type: str) -> bool:
    """`CNNBENCH_STREAM_DEDUPE` (1/on/true/yes, 0/off/false/no), or its default for this
    device and layout (see the module's docstring)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    if value:
        raise ConfigError(f"{ENV}={value!r}: expected 1 or 0")
    return device_type != "cpu" or streams.identity


def stream_order(seeds: Sequence[int]) -> list[int]:
    """Each trial's stream: the rank of its seed among the distinct seeds (loop.Fit's order)."""
    distinct = sorted(set(seeds))
    return [distinct.index(s) for s in seeds]


class Streams:
    """Which stream each of K trials reads, as index tensors on the device (made once, so
    that a step captured as a CUDA graph copies nothing from the host)."""

    def __init__(self, stream_of: Sequence[int], device: torch.device | str) -> None:
        self.stream_of = list(stream_of)
        self.k, self.s = len(self.stream_of), max(self.stream_of) + 1
        members = [[k for k, s in enumerate(self.stream_of) if s == t] for t in range(self.s)]
        self.width = max(len(m) for m in members)  # M: filter slots per stream
        slots = [k for m in members for k in m + [self.k] * (self.width - len(m))]  # self.k: a zero filter
        # the trials' filters in stream-major slots, and each trial's slot in the S*M outputs
        self.identity = slots == list(range(self.k))
        self.slots = torch.tensor(slots, device=device)
        self.position = torch.tensor([s * self.width + members[s].index(k) for k, s in enumerate(self.stream_of)],
                                     device=device)
        self.trial_stream = torch.tensor(self.stream_of, device=device)

    def to_trials(self, x: Tensor, channels: int) -> Tensor:
        """(N, S*C, ...) -> (N, K*C, ...): each trial its stream's channels (one gather),
        for a layer that does not take one batch per stream."""
        out = x.unflatten(1, (self.s, channels)).index_select(1, self.trial_stream).flatten(1, 2)
        return out.contiguous(memory_format=torch.channels_last) if channels_last(x) else out

    def labels(self, y: Tensor) -> Tensor:
        """(S, B) labels -> (K, B): each trial its stream's."""
        return y.index_select(0, self.trial_stream)

    def slotted(self, t: Tensor | None) -> Tensor | None:
        """A wide weight or bias (K*O, ...) -> (S*M*O, ...): the filters in stream-major slots,
        zeros in the empty ones."""
        if t is None or self.identity:
            return t
        per_trial = t.unflatten(0, (self.k, -1))  # K x O x ...
        padded = torch.cat([per_trial, per_trial.new_zeros(1, *per_trial.shape[1:])])  # K+1 x O x ...
        return padded.index_select(0, self.slots).flatten(0, 1)

    def trial_major(self, out: Tensor) -> Tensor:
        """The convolution's output N x S*M*O x H' x W' -> N x K*O x H' x W', trial order:
        one gather over the channels in the output's own memory layout (no other copy)."""
        if self.identity:
            return out
        o = out.shape[1] // (self.s * self.width)
        if channels_last(out):  # memory N x H' x W' x S*M*O: gather the last dimension's groups
            nhwc = out.permute(0, 2, 3, 1).unflatten(3, (self.s * self.width, o))
            return nhwc.index_select(3, self.position).flatten(3, 4).permute(0, 3, 1, 2)
        return out.unflatten(1, (self.s * self.width, o)).index_select(1, self.position).flatten(1, 2)


def channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def stream_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, streams: Streams, geometry: tuple,
                  choose: Callable[..., Callable[..., Tensor]]) -> Tensor:
    """K trials' dense convolutions (weight K*O x C x kh x kw) of S batches (x: N x S*C x H x W),
    each batch convolved once: one convolution with S groups. `geometry`: (stride, padding,
    dilation); `choose(x, w, b, stride, padding, dilation, groups)`: the convolution to run
    (wide.py's choice between F.conv2d and grouped_conv2d)."""
    w, b = streams.slotted(weight), streams.slotted(bias)
    conv = choose(x, w, b, *geometry, streams.s)
    return streams.trial_major(conv(x, w, b, *geometry, streams.s))  # N x K*O x H' x W'


def stream_blocks(seeds: Sequence[int]) -> list[list[int]]:
    """Positions of the trials of one wide group (their seeds `seeds`) in the groups the CPU
    trains them in (fused.fuse_groups): one group per seed that has two trials or more (in
    order), and the seeds with one trial each together, in seed order (a batch per trial,
    which is a batch per stream). A group whose trials share one batch convolves it
    densely; one whose trials read several streams convolves its first layer as one group
    per trial, or per stream (the dedupe, `dedupe_wanted`) and that costs more than the
    larger group gains: LeNet-5, one thread, batch 64, channels-last, through the loop, on a
    2-core AMD EPYC, ms per trial and step: seeds 0,1,2,0,1,2,0,1 as one group 2.46; one
    seed 2.05 (5 trials), 2.17 (3), 2.30 (2), 3.58 alone; seeds 0,1 as one group 2.46.

    Seeds 0,0,0,0,0,1,1,1 -> [0..4], [5, 6, 7]; 0,1,2,0,1,2,0,1 -> [0, 3, 6], [1, 4, 7],
    [2, 5]; 3,1,2 -> [1, 2, 0]; one seed: one group, in order."""
    by_seed: dict[int, list[int]] = {}
    for i, seed in enumerate(seeds):
        by_seed.setdefault(seed, []).append(i)
    ordered = [by_seed[seed] for seed in sorted(by_seed)]
    ones = [at[0] for at in ordered if len(at) == 1]
    return [at for at in ordered if len(at) > 1] + ([ones] if ones else [])


def count_streams(configs: Sequence[Any]) -> int:
    """The distinct batches a group of trials reads (one per seed)."""
    return len({c.seed for c in configs})
