"""The chaos test: processes killed at random moments, a disk that fills up, and nothing
lost or doubled.

On a fresh store (a new folder: MLflow's SQLite file, the state folder, results/), start
together two different tiny studies (the first of them in two processes, which share its
trials; the second with a pool of two worker processes) and two workers of one tiny
sweep. Then, at random moments after training began:

- `kill`: SIGKILL a random job (its whole process group: a study's worker pool too), and
  start it again with the same command, two or three times;
- `worker`: SIGKILL one worker process of the pool while the study's main process lives
  (as the out-of-memory killer does): the pool queues its trials again and replaces it;
- `full`: the state folder's disk (a small tmpfs, where the machine lets us mount one)
  fills up for a few seconds; the jobs that stop on it (one line, exit status 1) are
  started again once space is freed, as a person would.

At the end every study and the sweep must be complete: exactly one FINISHED run per
trial, the requested number of Optuna trials, no run or trial left RUNNING, no metric
step recorded twice, and `results/` complete. The seed of the random choices is printed
first; `--seed S` replays a failure. Bounded: `--budget` seconds in all, then every
process is killed and the run fails.

    python -m cnnbench.tools.chaos [--seed S] [--budget 240] [--dir DIR] [--data-dir DIR] [--no-full-disk]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from cnnbench.config.spec import load_spec
from cnnbench.track.schema import ATTR_MLFLOW_RUN_ID, TAG_KEY, TAG_KIND, TAG_PHASE, TAG_TRIAL, TEST_ACC

STUDY_FIXED = {"epochs": 3, "train_subset": 1000, "test_subset": 300, "log_every": 5, "progress": False}
STUDIES = {
    "chaos-lr": {"scientific": {"lr": [0.02, 0.05]}},
    "chaos-batch": {"scientific": {"batch_size": [32, 64]}},
}
SWEEP = "chaos-sweep"
SWEEP_TRIALS = 4
SWEEP_SPEC = {
    "search": {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
    "fixed": {"epochs": 2, "train_subset": 800, "val_size": 300, "test_subset": 300, "batch_size": 32,
              "log_every": 5, "progress": False},
    "sweep": {"sampler": "random", "pruner": "none", "n_trials": SWEEP_TRIALS, "final_seeds": [0]},
}


@dataclass
class Job:
    """One cnnbench command, started again after each kill until it ends by itself."""
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    starts: int = 0
    kills: int = 0

    def start(self, folder: Path, env: dict[str, str]) -> None:
        self.starts += 1
        log = open(folder / "logs" / f"{self.name}.{self.starts}.log", "w")
        # its own process group: a kill reaches the workers it started too
        self.proc = subprocess.Popen([sys.executable, "-m", "cnnbench", *self.args], cwd=folder, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.kills += 1


def write_specs(folder: Path) -> dict[str, Path]:
    paths = {}
    for name, body in STUDIES.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({"name": name, **body, "fixed": STUDY_FIXED}))
    paths[SWEEP] = folder / f"{SWEEP}.yaml"
    paths[SWEEP].write_text(yaml.safe_dump({"name": SWEEP, **SWEEP_SPEC}))
    return paths


FULL_S = 4.0  # seconds the state folder's disk stays full
FULL_GRACE_S = 20.0  # a job that stops this long after the disk was freed stopped on it too
TMPFS_SIZE = "256m"  # the state folder's own disk (checkpoints, Optuna stores)


def run(seed: int, folder: Path, *, budget: float = 240.0, data_root: str | None = None, out=print,
        full_disk: bool = True) -> list[str]:
    """Run the chaos in `folder` (fresh); returns the problems found (empty: all is well)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    specs = write_specs(folder)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "CNNBENCH_HOME": str(folder / ".cnnbench")}
    if data_root:
        env["CNNBENCH_DATA"] = str(data_root)
    disk = mount_tmpfs(folder / ".cnnbench", out) if full_disk else None
    try:
        chaos = Chaos(folder, env, rng, jobs(specs), out, seed=seed, budget=budget, disk=disk)
        problems = chaos.drive(plan(rng, full=disk is not None))
        return problems or check(folder, specs)
    finally:
        if disk is not None:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def jobs(specs: dict[str, Path]) -> list[Job]:
    """The commands: each study (the first twice, as on two machines: they share its
    trials; the second with a pool of two workers), and two workers of the sweep."""
    first, second = list(STUDIES)
    return [Job(first, ["study", str(specs[first]), "--workers", "1"]),
            Job(f"{first}-2", ["study", str(specs[first]), "--workers", "1"]),
            Job(second, ["study", str(specs[second]), "--workers", "2", "--no-fuse"]),
            *[Job(f"sweep-w{i}", ["sweep", str(specs[SWEEP])]) for i in range(2)]]


def plan(rng: random.Random, *, full: bool) -> list[tuple[float, str]]:
    """The events, (seconds after the first checkpoint, action), in time order: two or
    three kills, a worker's death, and a full disk where there is a tmpfs for it."""
    events = [(rng.uniform(0.0, 12.0), "kill") for _ in range(rng.choice([2, 3]))]
    events.append((rng.uniform(0.0, 12.0), "worker"))
    if full:
        events.append((rng.uniform(2.0, 10.0), "full"))
    return sorted(events)


def mount_tmpfs(path: Path, out) -> Path | None:
    """A small disk of its own at `path`, to fill; None (and why) where mounts are not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        out(f"chaos: full disk skipped: cannot mount a tmpfs here ({done.stderr.strip()[:120] or 'not root'})")
        return None
    return path


def fill(folder: Path) -> Path:
    """Every free byte of `folder`'s disk taken by one file."""
    path = folder / "chaos-filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 4096, 1):  # unbuffered: every byte that fits is written
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return path


def workers_of(pid: int) -> list[int]:
    """The worker processes (multiprocessing's spawned children) of process `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                cmdline = (stat.parent / "cmdline").read_bytes()
                if b"spawn_main" in cmdline:
                    found.append(int(stat.parent.name))
    return sorted(found)


@dataclass
class Chaos:
    """The jobs driven through the planned events until each ends by itself."""
    folder: Path
    env: dict[str, str]
    rng: random.Random
    jobs: list[Job]
    out: Any
    seed: int
    budget: float
    disk: Path | None = None
    filler: Path | None = None
    freed_at: float | None = None  # when the full disk was freed
    full_since: float | None = None
    worker_kills: set[str] = field(default_factory=set)  # one worker death per job: no trial dies twice

    def drive(self, events: list[tuple[float, str]]) -> list[str]:
        self.out(f"chaos: seed {self.seed}, " + ", ".join(f"{action} at {t:.1f} s" for t, action in events)
                 + f" after the first checkpoint, in {self.folder}")
        t0, began = time.monotonic(), None
        for job in self.jobs:
            job.start(self.folder, self.env)
        try:
            now = 0.0
            while self.busy(now):
                now = time.monotonic() - t0
                if now > self.budget:
                    return [f"not done after {self.budget:.0f} s (seed {self.seed})"]
                if began is None and next((self.folder / ".cnnbench" / "checkpoints").glob("*/*/last.pt"), None):
                    began = now
                    self.out(f"chaos: {now:5.1f} s  first checkpoint")
                while events and began is not None and now - began >= events[0][0]:
                    getattr(self, events.pop(0)[1])(now)
                self.tend(now)
                time.sleep(0.1)
        finally:
            for job in self.jobs:
                if job.running():
                    job.kill()
        problems = _exit_problems(self.jobs, self.folder, self.seed)
        self.out(f"chaos: all processes ended by themselves after {time.monotonic() - t0:.0f} s; "
                 f"{sum(j.kills for j in self.jobs)} kill(s), {len(self.worker_kills)} worker kill(s)"
                 + (f"; {len(events)} event(s) planned too late: every process had ended" if events else ""))
        return problems

    def busy(self, now: float) -> bool:
        """A job runs, or the disk is full or was freed a moment ago (a job that stopped on
        it is started again)."""
        return (any(job.running() for job in self.jobs) or self.filler is not None
                or (self.freed_at is not None and now - self.freed_at <= FULL_GRACE_S))

    def kill(self, now: float) -> None:
        alive = [job for job in self.jobs if job.running()]
        if alive:
            victim = self.rng.choice(alive)
            victim.kill()
            self.out(f"chaos: {now:5.1f} s  SIGKILL {victim.name} (pid {victim.proc.pid}); started again")
            victim.start(self.folder, self.env)

    def worker(self, now: float) -> None:
        pools = [(job, workers_of(job.proc.pid)) for job in self.jobs
                 if job.running() and job.name not in self.worker_kills]
        pools = [(job, pids) for job, pids in pools if pids]
        if not pools:
            self.out(f"chaos: {now:5.1f} s  no worker process to kill (no pool running)")
            return
        job, pids = self.rng.choice(pools)
        pid = self.rng.choice(pids)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.worker_kills.add(job.name)
        self.out(f"chaos: {now:5.1f} s  SIGKILL worker {pid} of {job.name}; its main process lives")

    def full(self, now: float) -> None:
        assert self.disk is not None
        self.filler, self.full_since = fill(self.disk), now
        self.out(f"chaos: {now:5.1f} s  the state folder's disk is full")

    def tend(self, now: float) -> None:
        """Free the full disk when its time is up; start again the jobs that stopped on it."""
        if self.filler is not None and now - self.full_since >= FULL_S:
            self.filler.unlink()
            self.filler, self.freed_at = None, now
            self.out(f"chaos: {now:5.1f} s  space freed")
        if self.full_since is None or (self.freed_at is not None and now - self.freed_at > FULL_GRACE_S):
            return
        for job in self.jobs:
            if self.filler is None and job.proc is not None and job.proc.poll() not in (None, 0):
                self.out(f"chaos: {now:5.1f} s  {job.name} stopped with status {job.proc.returncode} "
                         "on the full disk; started again")
                job.start(self.folder, self.env)


def _exit_problems(jobs: list[Job], folder: Path, seed: int) -> list[str]:
    """A job that ended with a non-zero status, with the end of its last log."""
    problems = []
    for job in jobs:
        assert job.proc is not None
        if job.proc.returncode != 0:
            log = folder / "logs" / f"{job.name}.{job.starts}.log"
            tail = log.read_text()[-1500:] if log.exists() else ""
            problems.append(f"{job.name}: exit status {job.proc.returncode} (seed {seed}); its log ends:\n{tail}")
    return problems


def check(folder: Path, specs: dict[str, Path]) -> list[str]:
    """Every study and the sweep complete, nothing RUNNING, no step twice, results/ whole."""

    problems = []
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    for name in [*STUDIES, SWEEP]:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            problems.append(f"{name}: no MLflow experiment")
            continue
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
        if running:
            problems.append(f"{name}: runs left RUNNING: {running}")
        for r in runs:
            if r.info.status != "FINISHED" or r.data.tags.get(TAG_KIND) != "trial":
                continue
            for key in r.data.metrics:
                steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
                if len(steps) != len(set(steps)):
                    problems.append(f"{name}: run {r.info.run_id} has metric {key} at steps {steps}")
        if name in STUDIES:
            problems += _check_study(folder, client, name, load_spec(specs[name]), runs)
    problems += _check_sweep(folder, client, optuna, TrialState)
    return problems


def _check_study(folder: Path, client: Any, name: str, spec: Any, runs: list) -> list[str]:

    problems = []
    expected = {c.key() for c in spec.trial_configs()}
    trials = [r for r in runs if r.data.tags.get(TAG_KIND) == "trial"]
    finished = Counter(r.data.tags.get(TAG_KEY) for r in trials if r.info.status == "FINISHED")
    if set(finished) != expected or any(n != 1 for n in finished.values()):
        problems.append(f"{name}: FINISHED runs per trial {dict(finished)}, expected one for each of {len(expected)}")
    for r in trials:
        if r.info.status == "FINISHED":
            epochs = [m.step for m in client.get_metric_history(r.info.run_id, TEST_ACC)]
            if epochs != list(range(1, STUDY_FIXED["epochs"] + 1)):
                problems.append(f"{name}: run {r.info.run_id} has test/acc at epochs {epochs}")
    out = folder / "results" / name
    for f in ("summary.csv", "table.md", "curves.png"):
        if not (out / f).exists():
            problems.append(f"{name}: results/{name}/{f} missing")
    if (out / "summary.csv").exists():
        ids = set(pd.read_csv(out / "summary.csv")["mlflow_run_id"])
        if ids != {r.info.run_id for r in trials if r.info.status == "FINISHED"}:
            problems.append(f"{name}: summary.csv names runs {ids}, not the FINISHED ones")
    return problems


def _check_sweep(folder: Path, client: Any, optuna: Any, TrialState: Any) -> list[str]:
    problems = []
    storage = f"sqlite:///{(folder / '.cnnbench' / 'optuna' / f'{SWEEP}.db').resolve()}"
    trials = optuna.load_study(study_name=SWEEP, storage=storage).get_trials()
    states = Counter(t.state for t in trials)
    done = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    if done != SWEEP_TRIALS:
        problems.append(f"{SWEEP}: {done} finished trials, expected {SWEEP_TRIALS} ({dict(states)})")
    if states[TrialState.RUNNING] or states[TrialState.WAITING]:
        problems.append(f"{SWEEP}: trials left RUNNING or WAITING ({dict(states)})")
    exp = client.get_experiment_by_name(SWEEP)
    search = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
              if r.data.tags.get(TAG_PHASE) == "search" and r.info.status == "FINISHED"]
    per_trial = Counter(r.data.tags.get(TAG_TRIAL) for r in search)
    if len(search) != done or any(n != 1 for n in per_trial.values()):
        problems.append(f"{SWEEP}: FINISHED search runs per trial {dict(per_trial)}, expected one for each of {done}")
    for t in trials:
        if t.state == TrialState.COMPLETE:
            run = client.get_run(t.user_attrs.get(ATTR_MLFLOW_RUN_ID, ""))
            if run.info.status != "FINISHED":
                problems.append(f"{SWEEP}: trial {t.number} is COMPLETE but its run is {run.info.status}")
    out = folder / "results" / SWEEP
    for f in ("trials.csv", "best.yaml", "final.md"):
        if not (out / f).exists():
            problems.append(f"{SWEEP}: results/{SWEEP}/{f} missing")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnnbench.tools.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="seed of the random choices (default: a new one, printed)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds the whole run may take (default: 240)")
    p.add_argument("--dir", default=None, help="the folder to run in (default: a new temporary folder, removed "
                                               "when all is well)")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $CNNBENCH_DATA)")
    p.add_argument("--no-full-disk", action="store_true", help="leave out the full disk (it mounts a tmpfs: root)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cnnbench-chaos-"))
    if args.dir and folder.exists() and any(folder.iterdir()):
        print(f"chaos: {folder} is not empty; give a new folder", file=sys.stderr)
        return 2
    problems = run(seed, folder, budget=args.budget, data_root=args.data_dir or os.environ.get("CNNBENCH_DATA"),
                   full_disk=not args.no_full_disk)
    if problems:
        print(f"chaos: FAILED with seed {seed} (replay: python -m cnnbench.tools.chaos --seed {seed}); in {folder}:",
              file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 1
    print(f"chaos: passed with seed {seed}")
    if not args.dir:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
