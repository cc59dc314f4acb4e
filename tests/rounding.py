"""Numeric equivalence, bounded by the rounding noise measured in the same test.

A fused or wide engine, a widened model, a final re-run: each computes the same maths as
the reference it is compared with, in another order (other kernels, other splits of the
sums), so the two differ by rounding, and by how much the computation amplifies it. That
amount depends on the CPU: AVX2, AVX-512 and AMX kernels round differently, and a
training run that is chaotic on one machine (ReLU, max-pools, a large step) turns a
1e-7 difference into 9 % on another. A tolerance tuned on one CPU therefore fails on
the next one. Instead, a test measures the reference's own rounding noise beside the
comparison: the same computation again with other, equally valid rounding

- channels-first instead of channels-last memory (other convolution kernels), and
- two CPU threads instead of one (the sums split in other places),

and allows `MULTIPLE` times the larger of the two, never less than `FLOOR` (a few units
in the last place of float32, where both probes can agree to the bit). The tests pick
settings where the noise stays near that floor (smooth activations, small steps), so
that a real error (a member trained with another member's learning rate, or with its
own 1 % off) lies orders of magnitude above the bound: test_train.py plants both and
checks that this check catches them.

Run with ATEN_CPU_CAPABILITY=avx2 or =default in the environment, torch picks other
kernels, as another CPU would; the tests that use this module pass under each.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

# allowed drift, in units of the measured noise. Measured on an AMD EPYC (Zen 5) under
# ATEN_CPU_CAPABILITY=avx512/avx2/default: a fused (vmap or wide) member drifted 0.5 to
# 2 times the larger probe at the tests' settings, 7.5 times at one chaotic-ish setting
# that no test uses (sigmoid LeNet-5 at lr 0.1 escaping its plateau)
MULTIPLE = 10.0
# relative: 4 units in the last place of a float32 (2**-23 each, relative to the value)
FLOOR = 4 * torch.finfo(torch.float32).eps


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to `n` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def curve_gap(reference: Sequence[float], other: Sequence[float]) -> float:
    """The largest relative difference, point by point, of two curves of the same length."""
    assert len(reference) == len(other) > 0, (len(reference), len(other))
    return max(abs(a - b) / abs(a) for a, b in zip(reference, other))


def tensor_gap(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The largest difference of two tensors, relative to the reference's largest value."""
    return float((reference - other).abs().max() / reference.abs().max())


def curve_noise(train: Callable[..., Sequence[float]], reference: Sequence[float]) -> float:
    """The rounding noise of the curve `train()` gives at one thread (`reference`):
    `train(channels_last=False)` at one thread and `train()` at two, the larger gap."""
    with threads(1):
        channels_first = train(channels_last=False)
    with threads(2):
        two_threads = train()
    return max(curve_gap(reference, channels_first), curve_gap(reference, two_threads))


def assert_within_noise(gap: float, noise: float, what: str) -> float:
    """`gap` at most MULTIPLE times the noise (FLOOR at least); returns the bound."""
    bound = MULTIPLE * max(noise, FLOOR)
    assert gap <= bound, (f"{what}: differs by {gap:.3g}, more than {MULTIPLE:g} x the rounding noise "
                          f"{noise:.3g} (floor {FLOOR:.3g}) measured beside it")
    return bound
