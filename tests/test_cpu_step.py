"""A training step on the CPU: the memory it frees kept for the next step (util/host_memory.py)
and the channels-last gradient through a flatten (train/device.py to_channels_last), each
without a change to the numbers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from cnnbench.models import get_model
from cnnbench.train.device import to_channels_last
from cnnbench.util import host_memory

from conftest import REPO, run_main, tree

# a wide step of 8 LeNet-5 trials (batch 64, one thread): its page faults once warm
FAULTS = """
import resource, torch
from cnnbench.config.trial import TrialConfig
from cnnbench.data.info import DATASETS
from cnnbench.train.wide import WideEngine
from cnnbench.util.host_memory import keep_freed_memory
torch.set_num_threads(1)
configs = [TrialConfig.from_dict({"lr": 0.01 * (i + 1), "progress": False, "channels_last": True}) for i in range(8)]
engine = WideEngine(configs, torch.device("cpu"), DATASETS["mnist"])
engine.begin_epoch([[c.lr for c in configs]])
engine.train(True)
g = torch.Generator().manual_seed(0)
x = torch.rand(64, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (64,), generator=g)
for _ in range(3):
    engine.train_step(x, y, 0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    engine.train_step(x, y, 0)
print(keep_freed_memory(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def step_faults(keep: str) -> tuple[bool, float]:
    env = {**os.environ, host_memory.KEEP_ENV: keep}
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, faults = out.stdout.split()[-2:]
    return kept == "True", float(faults)


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc's allocator only")
def test_a_wide_step_reuses_the_memory_the_step_before_freed():
    """Once the training engine has told glibc to keep freed memory, a warm wide step
    allocates its tens of MiB of activations and gradients without one fresh page from
    the kernel. The control, the same steps with the allocator left as it is, is printed
    rather than asserted (it is glibc's own heuristics): thousands of faults per step on
    the machines measured (4,900 to 8,700; docs/speed.md)."""
    kept, faults = step_faults("1")
    left, control = step_faults("0")
    print(f"page faults per warm step: {faults:.0f} kept, {control:.0f} with glibc's defaults")
    assert kept and not left
    # a step's temporaries are about 25,000 pages; a few faults may come from the interpreter
    assert faults <= 20, f"{faults} page faults per step with the freed memory kept (control {control})"


def test_the_allocator_setting_is_read_once_and_checked():
    """keep_freed_memory() answers the same all through a process; a bad value of its
    environment variable is refused by name (in the preflight: see the next test)."""
    first = host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory() == first == (host_memory.glibc() is not None and host_memory.wanted())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(host_memory.KEEP_ENV, "yes")
        with pytest.raises(Exception, match=host_memory.KEEP_ENV):
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
