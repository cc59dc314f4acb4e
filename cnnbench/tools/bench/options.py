"""`cnnbench bench --options`: each speed option (bf16 autocast, channels_last,
torch.compile, TF32, CUDA graphs through compile's reduce-overhead mode or as one
captured step) flipped alone from the device's defaults, timed on one engine's steps
(`steps.step_throughput`) for one trial and, on an accelerator, a fused group."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from cnnbench.config.trial import TrialConfig
from cnnbench.tools.bench.common import Measurement, failure, lr_configs
from cnnbench.tools.bench.steps import step_throughput
from cnnbench.train.device import set_tf32
from cnnbench.train.loop import load_data


def option_measures(base: TrialConfig, root: Path, dev: torch.device, max_k: int, *, steps: int, repeats: int,
                    say: Callable[[str], None] = print) -> dict[tuple[str, int], Measurement]:
    """`run_bench`'s option rows: per K (`_option_ks`), the defaults and each option
    (`_option_variants`), with its ratio to the defaults in the note. An option this
    device lacks is a note, not an error."""
    measures: dict[tuple[str, int], Measurement] = {}
    for k in _option_ks(dev, max_k):
        base_m = Measurement("fused+defaults" if k > 1 else "single+defaults", k)
        variants = [("defaults", {})] + _option_variants(dev, k)
        for label, change in variants:
            configs = [c.replace(**change) for c in lr_configs(base, k)]
            m = base_m if label == "defaults" else Measurement(f"{'fused' if k > 1 else 'single'}+{label}", k)
            try:
                variant_data = load_data(configs[0], root, dev)
                m.samples = step_throughput(configs, variant_data, steps=steps, repeats=repeats,
                                            step_graph=label == "step_graph")
            except Exception as err:  # an option this device lacks is reported, not fatal
                m.note = failure(err)
            if m.samples and base_m.samples and m is not base_m:
                m.note = (m.note + " " if m.note else "") + f"{m.median / base_m.median:.2f}x the defaults"
            measures[(m.method, k)] = m
            say(f"  {m.method:<26} K={k:<4} {m.median:>12,.0f} model-images/s {m.note}")
    set_tf32(False)
    return measures


def _option_ks(dev: torch.device, max_k: int) -> list[int]:
    """The paths the options are timed on: one trial, and on an accelerator a fused group
    the size of the 3-seed learning-rate study (15 trials, max_fuse 16)."""
    return [1, min(16, max_k)] if dev.type == "cuda" and max_k > 1 else [1]


def _option_variants(dev: torch.device, k: int = 1) -> list[tuple[str, dict[str, Any]]]:
    """Each speed option flipped from the device's default (channels_last: on for the
    CPU, off elsewhere; everything else off, cuDNN autotuning on). On CUDA the single
    trial skips the slow-to-compile variants that the fused group times."""
    on_cpu = dev.type == "cpu"
    variants = [("nchw", {"channels_last": False}) if on_cpu else ("channels_last", {"channels_last": True}),
                ("bf16", {"amp": "bf16"}), ("compile", {"compile": "default"})]
    if dev.type == "cuda":
        variants += [("tf32", {"tf32": True}), ("no_cudnn_benchmark", {"cudnn_benchmark": False}),
                     ("cudagraphs", {"compile": "reduce-overhead"}),
                     ("bf16+cudagraphs", {"amp": "bf16", "compile": "reduce-overhead"}),
                     ("step_graph", {})]  # the whole step as one CUDA graph (see step_throughput)
        if k == 1:
            variants = [v for v in variants if v[0] not in ("compile", "bf16+cudagraphs")]
    return variants
