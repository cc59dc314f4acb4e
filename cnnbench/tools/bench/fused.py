"""The fused-K bench: K trials stacked and vmapped (train.fused.FusedEngine) through
cnnbench's loop, K upward until the throughput stops rising."""

from __future__ import annotations

from typing import Callable

from cnnbench.config.trial import TrialConfig
from cnnbench.tools.bench.common import Measurement, cnnbench_loop, lr_configs

# the K a bench tries, in order (5: the learning-rate study's trials)
K_VALUES = (1, 2, 4, 5, 8, 16, 32, 64, 128, 256, 512, 1024)


def fused_measures(base: TrialConfig, data, ks: list[int], repeats: int,
                   say: Callable[[str], None] = print) -> dict[tuple[str, int], Measurement]:
    """`run_bench`'s fused rows: for each K in `ks` (`lr_configs` of `base`), a warm-up and
    `repeats` timings; stops after K >= 5 once a K gains less than 5% over the best before."""
    out: dict[tuple[str, int], Measurement] = {}
    previous = 0.0
    for k in ks:
        m = Measurement("fused", k)
        configs = lr_configs(base, k)
        cnnbench_loop(configs, data, fused=True, engine="vmap")  # warm-up for this K
        for _ in range(repeats):
            m.samples.append(cnnbench_loop(configs, data, fused=True, engine="vmap"))
        out[("fused", k)] = m
        say(f"  fused K={k:<3} {m.median:>12,.0f} model-images/s")
        if k >= 5 and m.median < previous * 1.05:
            break
        previous = max(previous, m.median)
    return out
