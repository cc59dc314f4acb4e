"""`cnnbench gpu-check`'s summary.md: every step's status and time, then each part's
figures against issue 25's targets (model-images/s and kernels per step of the engine
sweep, the conv2 micro-benchmark, the sweep's speedup, the document studies' wall time and
whether they reproduce the CPU's results)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from cnnbench.tools.bench.conv import shown
from cnnbench.tools.gpu_parts import Step
from cnnbench.tools.gpu_studies import DOCUMENT_STUDIES, documents_timed
from cnnbench.train.device import device_name

# issue 25's targets on an H100
TARGET_IMAGES_PER_S, TARGET_K = 2.5e6, 64
TARGET_DOCUMENT_SECONDS = 300.0


def summary(steps: list[Step], device, budget: float, total: float) -> str:
    lines = [f"# gpu-check on {device} ({device_name(device)})", "",
             f"torch {torch.__version__}, python {platform.python_version()}; {total:.0f} s of a {budget:.0f} s budget",
             "", "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |" for s in steps]
    by_name = {s.name: s for s in steps if s.status == "ok"}
    if "engine sweep" in by_name:
        lines += engines_section(by_name["engine sweep"].extra["rows"])
    if "conv2 micro-benchmark" in by_name:
        lines += conv_section(by_name["conv2 micro-benchmark"].extra["rows"])
    if by_name.get("bench --sweep") and by_name["bench --sweep"].extra.get("file"):
        lines += ["", "## bench --sweep", "", Path(by_name["bench --sweep"].extra["file"]).read_text().strip()]
    if any(s.extra.get("study") for s in steps):
        lines += studies_section(steps)
    if "bench" in by_name:
        lines += bench_section(by_name["bench"].extra)
    return "\n".join(lines) + "\n"


def engines_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Engine sweep (engines.md)", "",
             f"Target: >= {TARGET_IMAGES_PER_S:,.0f} model-images/s at K = {TARGET_K}, kernels per step "
             "independent of K.", "", "| K | streams | variant | model-images/s | kernels per step | note |",
             "|---:|---:|---|---:|---:|---|"]
    lines += [f"| {r['k']} | {r['streams']} | {r['variant']} | {shown(r['model_images_per_s'], 0)} | "
              f"{shown(r['kernels_per_step'])} | {r['note']} |" for r in rows]
    return lines


def conv_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## conv2 micro-benchmark (conv2.md)", "", "| K | variant | eager us | captured us | kernels |",
             "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['k']} | {r['variant']} | {shown(r['eager_us'])} | {shown(r['captured_us'])} | "
              f"{r['kernels']:.1f} |" for r in rows]
    return lines


def studies_section(steps: list[Step]) -> list[str]:
    docs = documents_timed(steps)
    lines = ["", "## Studies, end to end", "",
             f"`make studies` (the six document studies, {docs['of']} specs): {len(docs['ran'])} ran, "
             f"{docs['seconds']:.0f} s in all (target: <= {TARGET_DOCUMENT_SECONDS:.0f} s on an H100)"
             + ("" if len(docs["ran"]) == docs["of"] else "; not run: " + ", ".join(
                 s for s in DOCUMENT_STUDIES if s not in docs["ran"])), "",
             "| study | status | seconds | against the committed CPU results |", "|---|---|---:|---|"]
    for s in steps:
        if not s.extra.get("study") and not s.name.startswith("study "):
            continue
        compared = s.extra.get("compare", {})
        where = f" ({Path(compared['file']).parent.name})" if compared.get("file") else ""
        lines.append(f"| {s.name.removeprefix('study ')} | {s.status} | {s.seconds:.1f} | "
                     f"{compared.get('summary', s.detail).replace('|', '/')}{where} |")
    return lines


def bench_section(extra: dict[str, Any]) -> list[str]:
    lines = ["", "## Bench", "", "| method | K | model-images/s | x naive | fp32 peak | note |",
             "|---|---:|---:|---:|---:|---|"]
    for r in extra["rows"]:
        frac = r["fraction_of_fp32_peak"]
        lines.append(f"| {r['method']} | {r['k']} | {r['model_images_per_s']:,.0f} | {r['ratio_to_naive']:.2f} | "
                     f"{f'{frac:.2%}' if frac == frac else '-'} | {r['note']} |")
    lines += ["", "Test pass (10,000 images) per test batch size:", "",
              "| K | test batch | seconds | model-images/s |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['k']} | {r['test_batch_size']} | {r['seconds']:.4f} | {r['model_images_per_s']:,.0f} |"
              for r in extra["evaluation"]]
    lines += ["", "Profile (see bench/profile.md):", ""]
    lines += [f"- K = {p['k']}: {p['wall_ms_per_step']:.3f} ms per step"
              + (f", GPU busy {p['gpu_busy_fraction']:.0%} ({p['kernels_per_step']:.0f} kernels per step)"
                 if "gpu_busy_fraction" in p else "") for p in extra["profiles"]]
    return lines
