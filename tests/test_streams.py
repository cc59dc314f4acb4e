"""One batch per data stream (train/streams.py): where trials of a wide group share seeds,
the loop hands one batch per distinct seed and the first convolution convolves each once.

How agreement is measured: the wide engine computes the same logits and gradients from one
batch per stream as from one batch per trial (today's path). Where the arithmetic per
output is the same but the kernels differ (S groups of M*O filters against K groups of O),
fp32 results may differ by rounding: each is compared with the float64 result of the same
engine, and the per-stream path's error must stay within twice the per-trial path's own
(measured in the same test), or within float32's epsilon of the scale."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cnnbench.data.tensors import DATASETS
from cnnbench.train.conv_path import ENV as CONV_PATH_ENV
from cnnbench.train.loop import train_group
from cnnbench.train.result import FINISHED, Recorder
from cnnbench.train.streams import ENV as DEDUPE_ENV
from cnnbench.train.streams import Streams, stream_blocks, stream_order
from cnnbench.train.wide import WideEngine

from conftest import quick

MNIST = DATASETS["mnist"]
# (seeds of the K trials): streams of unequal size out of trial order; stream-major and equal
SEEDS = {"unequal": [0, 1, 0, 2, 1], "stream-major": [3, 3, 7, 7]}


class Convolutions(TorchDispatchMode):
    """Every convolution torch runs meanwhile: (input shape, groups), forward ones."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.calls.append((tuple(args[0].shape), int(args[-1])))
        return func(*args, **(kwargs or {}))


def engine(model: str, seeds: list[int], **settings) -> WideEngine:
    configs = [quick(model=model, seed=s, lr=0.01 * (i + 1), **settings) for i, s in enumerate(seeds)]
    e = WideEngine(configs, torch.device("cpu"), MNIST)
    e.train(True)
    return e


def batches(seeds: list[int], n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch per stream (S x n x 1 x 28 x 28) and its labels, then the same per trial."""
    gen = torch.Generator().manual_seed(0)
    s = len(set(seeds))
    x, y = torch.randn(s, n, 1, 28, 28, generator=gen), torch.randint(0, 10, (s, n), generator=gen)
    index = torch.tensor(stream_order(seeds))
    return x, y, x[index], y[index]


def logits_and_grads(e: WideEngine, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    for p in e.params:
        p.grad = None
    logits = e.logits(x)
    e.losses(logits, y).sum().backward()
    return [logits.detach(), *[p.grad.clone() for p in e.params]]


def test_streams_index_each_trial_to_its_stream():
    streams = Streams(stream_order([5, 2, 5, 9, 2]), "cpu")  # streams: 2 -> 0, 5 -> 1, 9 -> 2
    assert streams.stream_of == [1, 0, 1, 2, 0] and (streams.s, streams.width) == (3, 2)
    assert streams.slots.tolist() == [1, 4, 0, 2, 3, 5] and not streams.identity  # 5: the zero filter
    assert streams.position.tolist() == [2, 0, 3, 4, 1]
    w = torch.arange(5.0).repeat_interleave(2).view(10, 1)  # trial k's two filters hold k
    slotted = streams.slotted(w).view(6, 2)[:, 0].tolist()
    assert slotted == [1, 4, 0, 2, 3, 0]
    out = streams.slotted(w).view(1, 12, 1, 1)  # as a convolution's output, slot-major
    assert streams.trial_major(out).view(5, 2)[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert Streams([0, 0, 1, 1], "cpu").identity


@pytest.mark.parametrize("conv_path", ["grouped", "bmm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("seeds", list(SEEDS), ids=list(SEEDS))
@pytest.mark.parametrize("model", ["lenet5", "resnet_bn"])
def test_one_batch_per_stream_gives_the_logits_and_gradients_of_one_per_trial(model, seeds, channels_last,
                                                                              conv_path, monkeypatch):
    monkeypatch.setenv(CONV_PATH_ENV, conv_path)
    monkeypatch.setenv(DEDUPE_ENV, "1")
    seeds = SEEDS[seeds]
    e = engine(model, seeds, channels_last=channels_last)
    assert e.per_stream and e.streams.s == len(set(seeds)) < e.k
    x, y, xk, yk = batches(seeds)
    stream, trial = logits_and_grads(e, x, y), logits_and_grads(e, xk, yk)
    e.model.double()  # the truth, to measure each fp32 path's rounding against
    truth = logits_and_grads(e, x.double(), y)
    for name, s, t, ref in zip(["logits", *e.names], stream, trial, truth):
        scale = ref.abs().max().item()
        noise = max((t.double() - ref).abs().max().item(), torch.finfo(torch.float32).eps * scale)
        error = (s.double() - ref).abs().max().item()
        assert error <= 2 * noise, (name, error, noise)


@pytest.mark.parametrize("dedupe", ["1", "0"])
def test_the_first_convolution_runs_once_per_stream(dedupe, monkeypatch):
    """LeNet-5, 5 trials on 3 seeds: conv1 convolves 3 batches in 3 groups (one per stream)
    with the stream dedupe, 5 in 5 groups without; conv2 is K groups either way."""
    monkeypatch.setenv(DEDUPE_ENV, dedupe)
    monkeypatch.setenv(CONV_PATH_ENV, "grouped")
    seeds = SEEDS["unequal"]
    e = engine("lenet5", seeds)
    x, y, xk, yk = batches(seeds)
    with Convolutions() as convs:
        e.train_step(x if e.per_stream else xk, y if e.per_stream else yk, 0)
    conv1, conv2 = convs.calls
    streams = 3 if dedupe == "1" else 5
    assert e.per_stream == (dedupe == "1")
    assert conv1 == ((6, streams * 1, 28, 28), streams)  # input channels: one image per stream (or trial)
    assert conv2 == ((6, 5 * 6, 14, 14), 5)


class Losses(Recorder):
    def __init__(self):
        self.loss = []

    def train_loss(self, samples, loss):
        self.loss.append(loss)


def test_a_trial_of_a_group_that_shares_batches_follows_itself_alone(data_root, monkeypatch):
    """Trained through the loop (one batch per stream, 200 steps, fp32): the fused-vs-alone
    rule of tests/test_train.py (1e-4 relative), for a trial whose stream two trials share."""
    monkeypatch.setenv(DEDUPE_ENV, "1")  # the CPU's default takes it only for seed-major trials
    target = quick(train_subset=200 * 64, test_subset=500, epochs=1, log_every=1, lr=0.02)
    group = [target, target.replace(lr=0.05, seed=1), target.replace(lr=0.01), target.replace(lr=0.03, seed=2)]
    alone, fused = Losses(), Losses()
    train_group([target], data_root=data_root, recorders=[alone])
    results = train_group(group, data_root=data_root, recorders=[fused, *[Losses() for _ in group[1:]]],
                          engine="wide")
    assert all(r.status == FINISHED for r in results) and results[0].fused_with == 4
    assert len(alone.loss) == len(fused.loss) == 200
    worst = max(abs(a - f) / abs(a) for a, f in zip(alone.loss, fused.loss))
    assert worst < 1e-4, worst


def test_the_default_takes_one_batch_per_stream_where_it_measured_faster(monkeypatch):
    """Unset: on the CPU only for trials in seed-major order with equal streams (no gather);
    a value it does not know stops the group before it trains."""
    from cnnbench.errors import ConfigError
    from cnnbench.train.streams import dedupe_wanted

    monkeypatch.delenv(DEDUPE_ENV, raising=False)
    major, mixed = Streams([0, 0, 1, 1], "cpu"), Streams(stream_order([0, 1, 0, 1]), "cpu")
    assert dedupe_wanted(major, "cpu") and not dedupe_wanted(mixed, "cpu")
    assert dedupe_wanted(mixed, "cuda")
    assert engine("lenet5", [4, 4, 5, 5]).per_stream and not engine("lenet5", [4, 5, 4, 5]).per_stream
    monkeypatch.setenv(DEDUPE_ENV, "0")
    assert not dedupe_wanted(major, "cuda")
    monkeypatch.setenv(DEDUPE_ENV, "sometimes")
    with pytest.raises(ConfigError, match=DEDUPE_ENV):
        engine("lenet5", [4, 4, 5, 5])


@pytest.mark.parametrize("seeds", [[0, 1, 2, 0, 1, 2, 0, 1], [0, 0, 0, 0, 0, 1, 1, 1], [2, 0, 1], [5, 5, 5],
                                   [1, 0, 1, 2, 1, 1, 0], [4]])
def test_the_cpu_trains_a_group_of_several_seeds_seed_by_seed(seeds):
    """Every trial in one group; a seed's trials together and in order, in a group of their
    own, but for the seeds with one trial each: those share one group, in seed order (a
    batch per trial is then a batch per stream)."""
    blocks = stream_blocks(seeds)
    assert sorted(i for b in blocks for i in b) == list(range(len(seeds)))
    for block in blocks:
        mine = [seeds[i] for i in block]
        if len(set(mine)) > 1:
            assert all(seeds.count(s) == 1 for s in mine) and mine == sorted(mine)
        assert block == sorted(block) or len(set(mine)) > 1
    assert len(blocks) == len({s for s in seeds if seeds.count(s) > 1}) + any(seeds.count(s) == 1 for s in seeds)
    assert stream_blocks([0, 1, 2, 0, 1, 2, 0, 1]) == [[0, 3, 6], [1, 4, 7], [2, 5]]
