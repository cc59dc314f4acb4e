"""The chaos test: processes killed at random moments, and nothing lost or doubled.

On a fresh store (a new folder: MLflow's SQLite file, the state folder, results/), start
together two different tiny studies (the first of them in two processes, which share its
trials) and two workers of one tiny sweep; SIGKILL a random
one of them (its whole process group: a study's worker pool too) at a random moment, two
or three times, and start it again with the same command. At the end every study and
the sweep must be complete: exactly one FINISHED run per trial, the requested number of
Optuna trials, no run or trial left RUNNING, no metric step recorded twice, and
`results/` complete. The seed of the random choices is printed first; `--seed S`
replays a failure. Bounded: `--budget` seconds in all, then every process is killed and
the run fails.

    python -m cnnbench.tools.chaos [--seed S] [--budget 240] [--dir DIR] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
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


def run(seed: int, folder: Path, *, budget: float = 240.0, data_root: str | None = None,
        out=print) -> list[str]:
    """Run the chaos in `folder` (fresh); returns the problems found (empty: all is well)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    specs = write_specs(folder)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "CNNBENCH_HOME": str(folder / ".cnnbench")}
    if data_root:
        env["CNNBENCH_DATA"] = str(data_root)
    jobs = [Job(name, ["study", str(specs[name]), "--workers", "1"]) for name in STUDIES]
    # the same study twice, as on two machines: they share its trials (one engine with sweeps)
    shared = next(iter(STUDIES))
    jobs.append(Job(f"{shared}-2", ["study", str(specs[shared]), "--workers", "1"]))
    jobs += [Job(f"sweep-w{i}", ["sweep", str(specs[SWEEP])]) for i in range(2)]
    kills = rng.choice([2, 3])
    # when to kill: seconds after training began (the first epoch checkpoint of any job,
    # a state, so that a loaded machine's slow start does not use the kills up)
    moments = sorted(rng.uniform(0.0, 12.0) for _ in range(kills))
    out(f"chaos: seed {seed}, {kills} kills at {', '.join(f'{m:.1f}' for m in moments)} s after the first "
        f"checkpoint, in {folder}")
    t0 = time.monotonic()
    for job in jobs:
        job.start(folder, env)
    late = _kill_while_running(jobs, folder, env, rng, moments, t0=t0, budget=budget, seed=seed, out=out)
    if late:
        return late
    problems = _exit_problems(jobs, folder, seed)
    done = sum(j.kills for j in jobs)
    out(f"chaos: all processes ended by themselves after {time.monotonic() - t0:.0f} s; {done} kill(s)"
        + (f" ({kills - done} planned too late: every process had ended)" if done < kills else ""))
    if not problems:
        problems = check(folder, specs)
    return problems


def _kill_while_running(jobs: list[Job], folder: Path, env: dict[str, str], rng: random.Random,
                        moments: list[float], *, t0: float, budget: float, seed: int, out) -> list[str]:
    """Until every job has ended by itself: at each of `moments` (seconds after the first
    checkpoint) SIGKILL a random running job and start it again. Past `budget` seconds
    every job is killed and that is the problem returned; else none."""
    began: float | None = None
    try:
        while any(job.running() for job in jobs):
            now = time.monotonic() - t0
            if now > budget:
                return [f"not done after {budget:.0f} s (seed {seed})"]
            if began is None and next((folder / ".cnnbench" / "checkpoints").glob("*/*/last.pt"), None):
                began = now
                out(f"chaos: {now:5.1f} s  first checkpoint")
            if moments and began is not None and now - began >= moments[0]:
                moments.pop(0)
                alive = [job for job in jobs if job.running()]
                if alive:
                    victim = rng.choice(alive)
                    victim.kill()
                    out(f"chaos: {now:5.1f} s  SIGKILL {victim.name} (pid {victim.proc.pid}); started again")
                    victim.start(folder, env)
            time.sleep(0.1)
    finally:
        for job in jobs:
            if job.running():
                job.kill()
    return []


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
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cnnbench-chaos-"))
    if args.dir and folder.exists() and any(folder.iterdir()):
        print(f"chaos: {folder} is not empty; give a new folder", file=sys.stderr)
        return 2
    problems = run(seed, folder, budget=args.budget, data_root=args.data_dir or os.environ.get("CNNBENCH_DATA"))
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
