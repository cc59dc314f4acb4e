"""A training step on the CPU: the memory it frees kept for the next step (util/host_memory.py)
and the channels-last gradient through a flatten (train/device.py to_channels_last), each
without a change to the numbers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from torch import nn

from cnnbench.errors import ConfigError
from cnnbench.models import get_model
from cnnbench.train.device import to_channels_last
from cnnbench.util import host_memory

from conftest import REPO, run_main, tree

# the C allocator alone: 20 blocks of 1 MiB allocated, written and freed (last first, so
# that they go back to the top of the heap), 12 times; the minor page faults of each round
CYCLES = """
import ctypes, json, resource
from cnnbench.util.host_memory import glibc, keep_freed_memory
kept = keep_freed_memory()
libc = glibc()
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 1 << 20, []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(20)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in reversed(blocks):
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""

# a wide step of 8 LeNet-5 trials (batch 64, one thread): the page faults of its first step
# (every page its tensors need, fresh) and of each of 30 steps after 5 more
STEPS = """
import json, resource, torch
from cnnbench.config.trial import TrialConfig
from cnnbench.data.info import DATASETS
from cnnbench.train.wide import WideEngine
from cnnbench.util.host_memory import kept
torch.set_num_threads(1)
configs = [TrialConfig.from_dict({"lr": 0.01 * (i + 1), "progress": False, "channels_last": True}) for i in range(8)]
engine = WideEngine(configs, torch.device("cpu"), DATASETS["mnist"])
engine.begin_epoch([[c.lr for c in configs]])
engine.train(True)
g = torch.Generator().manual_seed(0)
x = torch.rand(64, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (64,), generator=g)
faults = []
for _ in range(36):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    engine.train_step(x, y, 0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept(), "first": faults[0], "warm": faults[6:]}))
"""


def fresh(script: str, keep: str) -> dict:
    """`script`'s JSON line, run in a fresh interpreter with CNNBENCH_KEEP_FREED_MEMORY=`keep`."""
    env = {**os.environ, host_memory.KEEP_ENV: keep}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc's allocator only")
def test_memory_freed_is_reused_once_kept():
    """keep_freed_memory(): 20 MiB freed to the top of the heap is reused by the next round
    without one fresh page. The control, glibc's defaults, is printed rather than asserted
    (its heuristics, not ours): here it gave the 20 MiB back and faulted it in again every
    round (5,088 faults a round)."""
    kept, left = fresh(CYCLES, "1"), fresh(CYCLES, "0")
    print(f"page faults a round: {kept['faults']} kept; {left['faults']} with glibc's defaults")
    assert kept["kept"] and not left["kept"]
    first = kept["faults"][0]
    assert first >= 4000  # 20 MiB of fresh 4 KiB pages (or fewer larger ones): the measure of the rest
    assert max(kept["faults"][2:]) <= first / 100, kept


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc's allocator only")
def test_a_wide_step_keeps_its_freed_memory():
    """A CPU engine keeps its process's freed memory (the engine calls keep_freed_memory):
    the typical warm wide step faults in under 1 % of the pages its first step did, all 30
    together under 10 % per step (the heap still grows now and then, some hundred pages at
    once); CNNBENCH_KEEP_FREED_MEMORY=0 leaves the allocator alone."""
    kept, left = fresh(STEPS, "1"), fresh(STEPS, "0")
    typical, mean = statistics.median(kept["warm"]), statistics.fmean(kept["warm"])
    print(f"page faults: first step {kept['first']}, warm steps median {typical:.0f} mean {mean:.0f} "
          f"(with glibc's defaults: first {left['first']}, warm median {statistics.median(left['warm']):.0f} "
          f"mean {statistics.fmean(left['warm']):.0f})")
    assert kept["kept"] and not left["kept"]
    assert kept["first"] > 1000  # the step's own footprint, the measure of the rest
    assert typical <= kept["first"] / 100 and mean <= kept["first"] / 10, kept


def test_the_allocator_setting_is_read_once_and_checked():
    """keep_freed_memory() answers the same all through a process; a bad value of its
    environment variable is refused by name (in the preflight: see the next test)."""
    first = host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory() == first == (host_memory.glibc() is not None and host_memory.wanted())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(host_memory.KEEP_ENV, "yes")
        with pytest.raises(ConfigError, match=host_memory.KEEP_ENV):
            host_memory.wanted()


def test_a_bad_allocator_setting_stops_a_study_before_it_writes(workdir, capsys, monkeypatch):
    (workdir / "studies").mkdir()
    (workdir / "studies" / "lr.yaml").write_text((REPO / "studies" / "lr.yaml").read_text())
    before = tree(workdir)
    monkeypatch.setenv(host_memory.KEEP_ENV, "yes")
    assert run_main("study", "studies/lr.yaml", "--seeds", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and host_memory.KEEP_ENV in err[0], err
    assert tree(workdir) == before  # no mlflow.db, no results, no checkpoints


def flatten_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The layouts' witness: the gradient at the flatten's input on each step; SGD steps."""
    seen: list[torch.Tensor] = []
    flatten = next(m for m in model.modules() if isinstance(m, nn.Flatten))
    # the flatten's input as the layer below made it (before to_channels_last's own hook)
    flatten.register_forward_pre_hook(lambda m, args: args[0].register_hook(seen.append) and None, prepend=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return seen


@pytest.mark.parametrize("name", ["lenet5", "lenet", "alexnet"])
def test_a_flatten_hands_back_a_channels_last_gradient_with_the_same_numbers(name):
    """to_channels_last: the gradient that reaches the layers below a flatten is
    channels-last (with `.to(memory_format=...)` alone it is not: the control), and three
    SGD steps give the same weights bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), generator=g)
    models = []
    for convert in (to_channels_last, lambda m: m.to(memory_format=torch.channels_last)):
        torch.manual_seed(0)
        models.append(convert(get_model(name, in_channels=1, num_classes=10, image_size=28).train()))
    torch.manual_seed(1)  # dropout's masks, the same for both
    ours = flatten_gradients(models[0], x, y, 3)
    torch.manual_seed(1)
    plain = flatten_gradients(models[1], x, y, 3)
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in ours)
    assert all(t.is_contiguous() for t in plain)  # the control: what a flatten hands back alone
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), n


def test_a_wide_group_s_numbers_are_those_of_the_plain_channels_last_model(monkeypatch):
    """The wide engine (K = 3, channels-last, grouped convolutions) with to_channels_last
    against the same engine holding its model with `.to(memory_format=...)` alone: every
    trial's weights and momentum bit for bit equal after 4 steps on 3 seeds' batches."""
    from cnnbench.data.info import DATASETS
    from cnnbench.train import wide

    from conftest import quick

    configs = [quick(lr=0.01, channels_last=True), quick(lr=0.05, seed=1, channels_last=True),
               quick(lr=0.1, seed=2, channels_last=True)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(3, 32, 1, 28, 28, generator=g), torch.randint(0, 10, (3, 32), generator=g))
               for _ in range(4)]
    states, layouts = [], []
    for convert in (to_channels_last, lambda m: m.to(memory_format=torch.channels_last)):
        monkeypatch.setattr(wide, "to_channels_last", convert)
        engine = wide.WideEngine(configs, torch.device("cpu"), DATASETS["mnist"])
        flatten = next(m for m in engine.model.modules() if isinstance(m, nn.Flatten))
        seen: list[torch.Tensor] = []
        flatten.register_forward_pre_hook(lambda m, args: args[0].register_hook(seen.append) and None, prepend=True)
        engine.begin_epoch([[c.lr for c in configs]])
        engine.train(True)
        for x, y in batches:
            engine.train_step(x, y, 0)
        states.append([engine.trial_state(k) for k in range(3)])
        layouts.append({"channels-last" if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                        else "plain" for t in seen})
    assert layouts == [{"channels-last"}, {"plain"}]  # the gradient at the flatten, ours and the control's
    for ours, plain in zip(*states):
        for name, t in ours["model"].items():
            assert torch.equal(t, plain["model"][name]), name
        assert same(ours["optimizer"], plain["optimizer"])


def same(a, b) -> bool:
    """Nested dicts, lists and tensors equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
