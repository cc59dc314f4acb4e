"""The studies of `cnnbench gpu-check`: each end to end through `cnnbench study` (its own
process, MLflow on a SQLite file in the check's folder, the check's state folder), timed,
then compared with the same study's committed CPU results (`cnnbench compare`, the
checkout's results/<study>/) where there are any.

`make studies` is the six document studies (seven specs: epochs-lenet and epochs are
`make study-epochs`); DEFAULT_STUDIES runs them first, the three LeNet-5 studies of
document 003, then the architectures that never trained on a GPU (models: LeNet-5,
AlexNet, Inception, ResNet; alexnet), then the epochs studies; then ResNet with batch
norm (resnet-bn: the wide engine's batch norm), the ImageNet-sized models for one epoch,
and the lr study in bf16 and in TF32. The studies a budget cannot hold are skipped and
listed (REQUIRED ones, not their variants, run whatever is left; on a dry run, every one).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cnnbench.report.compare import compare_command
from cnnbench.tools import resources
from cnnbench.tools.gpu_parts import Step, line, one_line, run_subprocess

DOCUMENT_STUDIES = ("lr", "batch", "activation", "models", "alexnet", "epochs-lenet", "epochs")  # make studies
DEFAULT_STUDIES = (*DOCUMENT_STUDIES, "resnet-bn", "models-imagenet:epochs=1", "lr:amp=bf16", "lr:tf32=true")
DRY_STUDIES = ("lr", "activation", "models", "lr:amp=bf16")  # models: LeNet-5, AlexNet, Inception, ResNet
REQUIRED_STUDIES = ("lr", "batch", "activation")  # run whatever the budget says
TINY = ("--seeds", "0", "--set", "epochs=1", "--set", "train_subset=640", "--set", "test_subset=300",
        "--set", "log_every=2")
MIN_SECONDS = 30.0  # a study not required is skipped with less of the budget left


def studies_dir() -> Path:
    """The document studies: the checkout's studies/, else an installed cnnbench's copy."""
    return resources.folder("studies")


def committed_results(name: str) -> Path | None:
    """The checkout's committed CPU results of study `name` (results/<name>/summary.csv)."""
    repo = resources.checkout()
    folder = repo / "results" / name if repo is not None else None
    return folder if folder is not None and (folder / "summary.csv").is_file() else None


def run_study(entry: str, out: Path, env: dict[str, str], *, dry_run: bool, left: Callable[[], float],
              label: str = "gpu") -> Step:
    """One study (`NAME` or `NAME:KEY=VALUE,...`) end to end, with the rest of the budget
    (`left()` seconds), then compared with its committed CPU results."""
    name, _, variant = entry.partition(":")
    pairs = [kv for kv in variant.split(",") if kv]
    folder = "results" + "".join(f"-{kv.replace('=', '-')}" for kv in pairs)
    title = f"study {name}" + (f" ({variant})" if variant else "")
    required = name in REQUIRED_STUDIES and not variant  # a variant (lr in bf16) waits like any other
    if not required and left() < MIN_SECONDS and not dry_run:  # a dry run tries every path
        return Step(title, detail=f"skipped: {max(left(), 0):.0f} s of the budget left")
    extra = [a for kv in pairs for a in ("--set", kv)] + (list(TINY) if dry_run else [])
    results = out / folder
    cmd = [sys.executable, "-m", "cnnbench", "study", str(studies_dir() / f"{name}.yaml"),
           "--results-dir", str(results), "--set", "progress=false", "--timings", *extra]  # where the time went
    step = run_subprocess(title, cmd, out / f"study-{name}{folder.removeprefix('results')}.log", env=env,
                          cwd=out, timeout=max(600.0 if dry_run else 60.0, left()))
    step.extra.update(study=name, variant=variant, results=str(results / name))
    if step.status == "ok":
        step.extra["compare"] = compare_with_cpu(name, results / name, out, suffix=folder.removeprefix("results"),
                                                 label=label)
        step.detail += f"; against the CPU: {step.extra['compare']['summary']}"
    return step


def compare_with_cpu(name: str, gpu: Path, out: Path, *, suffix: str = "", label: str = "gpu") -> dict[str, Any]:
    """`cnnbench compare <committed CPU results> <these>` into out/compare-<study><suffix>-cpu-<label>/:
    the file and how many trial configs each verdict has, per metric."""
    cpu = committed_results(name)
    if cpu is None:
        return {"file": "", "verdicts": {}, "summary": "no committed CPU results"}
    folder = f"{name}{suffix}-cpu-{label}"
    try:
        md, csv = compare_command(str(cpu), str(gpu), labels=f"cpu,{label}", name=folder, out=str(out),
                                  command=f"cnnbench compare {cpu} {gpu} --labels cpu,{label}")
    except Exception as err:  # no trial in common (a variant's other seeds), say: noted
        return {"file": "", "verdicts": {}, "summary": f"not compared ({one_line(err, 160)})"}
    table = pd.read_csv(csv)
    verdicts = {m: table[table["metric"] == m]["verdict"].value_counts().to_dict() for m in table["metric"].unique()}
    final = verdicts.get("final_test_acc", {})
    summary = "final test accuracy: " + (", ".join(f"{n} {v}" for v, n in sorted(final.items())) or "none matched")
    return {"file": str(md), "verdicts": verdicts, "summary": summary}


def run_studies(chosen: tuple[str, ...], out: Path, env: dict[str, str], *, dry_run: bool,
                left: Callable[[], float], label: str, say: Callable[[str], None]) -> list[Step]:
    """Every study of `chosen` in order, each timed and compared (see `run_study`)."""
    steps = []
    for entry in chosen:
        t0 = time.perf_counter()
        steps.append(run_study(entry, out, env, dry_run=dry_run, left=left, label=label))
        steps[-1].seconds = steps[-1].seconds or time.perf_counter() - t0
        say(line(steps[-1]))
    return steps


def documents_timed(steps: list[Step]) -> dict[str, Any]:
    """`make studies` timed: the document studies that ran (no variant), their seconds in all."""
    ran = [s for s in steps if s.extra.get("study") in DOCUMENT_STUDIES and not s.extra.get("variant")
           and s.status == "ok"]
    return {"ran": [s.extra["study"] for s in ran], "of": len(DOCUMENT_STUDIES),
            "seconds": sum(s.seconds for s in ran)}
