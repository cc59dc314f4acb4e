"""`cnnbench bench --overhead`: what a study's bookkeeping costs, with almost no training.

The learning-rate study (LeNet-5, 5 rates, 10 epochs) with a training and a test set of
64 images each, so that an epoch is one step and one small test pass: its wall time is
start-up, MLflow, Optuna, checkpoints and results. Each run is the real command
(`cnnbench study`, one worker process, one trial at a time) in a fresh folder whose
MLflow store exists already (as in a project that has run a study before). Three shapes
give three unknowns, fitted exactly:

    wall(trials, epochs) = fixed + trials * per_trial + trials * epochs * per_trial_epoch

from 15 trials x 10 epochs, 15 x 1 and 5 x 10 (the minimum over `repeats` runs each).
Each way is timed so: `background` (this code with CNNBENCH_SYNC_BOOKKEEPING=0: the
background writer, an accelerator's default), `sync` (this code with
CNNBENCH_SYNC_BOOKKEEPING=1: every write in the training thread, the CPU's default) and,
with `--baseline DIR`, another checkout (the code before this work, say). The database commits of one 15 x 10 run of each way are counted by a
SQLAlchemy listener that a sitecustomize module puts in every process of the run. The
phase table of the 15 x 10 run comes from `--timings` (on in every run of a way that has
it, so that its shapes are timed alike). results/bench/overhead.md.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnbench.tools.resources import spec_file
from cnnbench.util import fileio

SHAPES = {"15x10": ("0,1,2", 10), "15x1": ("0,1,2", 1), "5x10": ("0", 10)}  # trials x epochs: seeds, epochs
TINY = ["--set", "train_subset=64", "--set", "test_subset=64", "--set", "progress=false", "--workers", "1",
        "--no-fuse"]
COUNTER = """import os
_path = os.environ.get("CNNBENCH_COUNT_COMMITS")
if _path:  # every database commit of this process: one byte appended (cnnbench bench --overhead)
    import sqlalchemy.engine, sqlalchemy.event
    _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "commit", lambda conn: os.write(_fd, b"."))
"""


@dataclass
class Way:
    """One way of running the study: its name, the checkout it runs and its environment."""
    name: str
    code: Path
    env: dict[str, str]
    timings: bool  # whether its CLI has --timings
    walls: dict[str, list[float]] = field(default_factory=dict)
    commits: dict[str, int] = field(default_factory=dict)
    table: str = ""

    def fit(self) -> dict[str, float]:
        """fixed, per_trial and per_trial_epoch seconds from the three shapes' best walls."""
        a, b, c = (min(self.walls[s]) for s in ("15x10", "15x1", "5x10"))
        per_trial_epoch = (a - b) / (15 * 9)
        per_trial = (a - c) / 10 - 10 * per_trial_epoch
        return {"fixed": c - 5 * per_trial - 50 * per_trial_epoch, "per_trial": per_trial,
                "per_trial_epoch": per_trial_epoch, "15x10": a}


def time_overhead(*, data_root: Any = None, repeats: int = 2, baseline: str | None = None, say=print,
                  out_dir: Path | None = None) -> list[Way]:
    """Every way, every shape, `repeats` times (interleaved, so that a busy machine weighs on
    each way alike), one counted run each; then the note."""
    here = Path(__file__).resolve().parents[3]
    ways = [Way("background", here, {"CNNBENCH_SYNC_BOOKKEEPING": "0"}, True),
            Way("sync", here, {"CNNBENCH_SYNC_BOOKKEEPING": "1"}, True)]
    if baseline:
        ways.insert(0, Way("baseline", Path(baseline).resolve(), {}, False))
    with tempfile.TemporaryDirectory(prefix="cnnbench-overhead-") as tmp:
        root = Path(tmp)
        template = mlflow_store(root / "template.db")
        (root / "sitecustomize.py").write_text(COUNTER)
        for repeat in range(repeats):
            for shape in SHAPES:
                for way in ways:
                    wall, text = run_study(way, shape, root, template, data_root)
                    way.walls.setdefault(shape, []).append(wall)
                    way.table = text if shape == "15x10" and text else way.table
                    say(f"overhead: {way.name} {shape} run {repeat + 1}: {wall:.1f} s")
        for way in ways:
            for shape in ("15x10", "5x10"):
                way.commits[shape] = count_commits(way, shape, root, template, data_root)
            say(f"overhead: {way.name}: {way.commits['15x10']} database commits (15x10)")
    if out_dir is not None:
        fileio.write_text(out_dir / "overhead.md", note(ways, repeats, baseline))
    return ways


def mlflow_store(path: Path) -> Path:
    """An MLflow store with its tables, in SQLite's default journal mode (what a store made
    before this work is; the code under test switches it itself)."""
    subprocess.run([sys.executable, "-c", f"from mlflow import MlflowClient; MlflowClient('sqlite:///{path}')"
                    ".search_experiments()"], check=True, capture_output=True, timeout=600)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    return path


def command(way: Way, shape: str, root: Path) -> list[str]:
    seeds, epochs = SHAPES[shape]
    return [sys.executable, "-m", "cnnbench", "study", str(spec_file("lr")), *TINY, "--seeds", seeds,
            "--set", f"epochs={epochs}", "--results-dir", str(root / "results"),
            *(["--timings"] if way.timings else [])]


def fresh(root: Path, template: Path, data_root: Any, extra: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A new folder with a copy of the MLflow store, and the environment of a run in it."""
    folder = Path(tempfile.mkdtemp(dir=root))
    shutil.copy(template, folder / "mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "CNNBENCH_HOME": str(folder / "state"), "PYTHONUNBUFFERED": "1", **extra}
    if data_root is not None:
        env["CNNBENCH_DATA"] = str(data_root)
    env.pop("CNNBENCH_TIMINGS", None)
    return folder, env


def run_study(way: Way, shape: str, root: Path, template: Path, data_root: Any) -> tuple[float, str]:
    """One run: its wall time from start to exit, and its phase table (when it printed one)."""
    folder, env = fresh(root, template, data_root, {**way.env, "PYTHONPATH": str(way.code)})
    t0 = time.perf_counter()
    done = subprocess.run(command(way, shape, folder), cwd=folder, env=env, capture_output=True, text=True,
                          timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"overhead: {way.name} {shape} failed: {done.stderr[-1500:]}")
    shutil.rmtree(folder, ignore_errors=True)
    table = done.stdout[done.stdout.find("where the time went"):] if "where the time went" in done.stdout else ""
    return wall, table.rstrip()


def count_commits(way: Way, shape: str, root: Path, template: Path, data_root: Any) -> int:
    """The database commits of one run, in every process it started."""
    counter = root / f"commits-{way.name}-{shape}"
    folder, env = fresh(root, template, data_root, {**way.env, "CNNBENCH_COUNT_COMMITS": str(counter),
                                                    "PYTHONPATH": f"{root}{os.pathsep}{way.code}"})
    done = subprocess.run(command(way, shape, folder), cwd=folder, env=env, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"overhead: {way.name} (counted) failed: {done.stderr[-1500:]}")
    shutil.rmtree(folder, ignore_errors=True)
    return counter.stat().st_size if counter.exists() else 0


def note(ways: list[Way], repeats: int, baseline: str | None) -> str:
    """results/bench/overhead.md: the command, the fitted costs per way, the commits, the tables."""
    cmd = "cnnbench bench --overhead" + (f" --repeats {repeats}" if repeats != 2 else "") \
        + (f" --baseline {baseline}" if baseline else "")
    lines = ["# What a study's bookkeeping costs", "", f"`{cmd}` on {machine()}.", "",
             "The learning-rate study (LeNet-5, 5 rates) with 64 training and 64 test images, run as "
             "`cnnbench study studies/lr.yaml --workers 1 --no-fuse` in a fresh folder with an existing MLflow store; "
             "wall time from start to exit, the best of "
             f"{repeats} run(s) per shape, fitted exactly over 15 trials x 10 epochs, 15 x 1 and 5 x 10 "
             "(tools/bench/overhead.py).", "",
             "| way | fixed (s) | per trial (ms) | per trial-epoch (ms) | 15 x 10 (s) | commits per trial (10 epochs) |",
             "|---|---|---|---|---|---|"]
    for way in ways:
        f = way.fit()
        per_trial_commits = (way.commits["15x10"] - way.commits["5x10"]) / 10
        lines.append(f"| {way.name} | {f['fixed']:.2f} | {f['per_trial'] * 1000:.0f} | "
                     f"{f['per_trial_epoch'] * 1000:.1f} | {f['15x10']:.1f} | {per_trial_commits:.0f} |")
    lines += ["", "Every run's wall time (s):", "", "| way | " + " | ".join(SHAPES) + " |",
              "|---|" + "---|" * len(SHAPES)]
    for way in ways:
        lines.append(f"| {way.name} | " + " | ".join(", ".join(f"{w:.1f}" for w in way.walls[s]) for s in SHAPES)
                     + " |")
    for way in ways:
        if way.table:
            lines += ["", f"Phase table of a 15 x 10 run, {way.name} (`--timings`):", "", "```", way.table, "```"]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """The CPU, its cores and how busy it was (other work on a shared machine shows here)."""
    name = ""
    with open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "a CPU")
    load = os.getloadavg()[0]
    return f"{name}, {os.cpu_count()} cores (load average {load:.1f} at the end)"
