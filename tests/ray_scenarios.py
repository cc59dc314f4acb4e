"""The Ray executor's scenarios, run in one go inside a loopback-only network namespace
(tests/test_ray.py starts this file under .ci/ray-netns, and asserts on what it writes).

Why a namespace: these machines may send traffic only to loopback, and Ray picks the
machine's outward address for its nodes (and probes cloud metadata and DNS) unless it
has none; in a namespace whose only interface is `lo`, a two-node Ray cluster lives
entirely on 127.0.0.1. Nothing here points at any other address.

One cluster (ray.cluster_utils.Cluster: a head and a second node, one CPU each), one
`mlflow server` on 127.0.0.1 with its own artifact folder, PostgreSQL through its Unix
socket (the server .ci/postgres started outside the namespace; sockets are files, not
network). Each scenario writes its facts to RESULTS/<scenario>.json:

- study: the lr study (2 seeds, tiny) on 2 Ray workers;
- sweep: a fused grid sweep (4 points, K = 2) on 2 Ray workers;
- node: a node removed mid-epoch; its trial queued again and resumed on the other node
  from the shared checkpoint; the same study without the removal, for its curve;
- ctrl_c: SIGINT to the driver (a `cnnbench study --executor ray` process), then the same
  command again;
- refused: a node at 127.0.0.2 (another machine, as far as Ray knows) and a sqlite:///
  storage: refused before anything is created;
- chaos: the chaos test's studies and sweep on Ray, the worker node removed at a random
  moment (last: the cluster is left with its head alone).

    python tests/ray_scenarios.py RESULTS_DIR [SCENARIO ...]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import sqlalchemy
from mlflow import MlflowClient

TINY = {"epochs": 2, "train_subset": 640, "test_subset": 300, "log_every": 5, "progress": False}


def spec(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\n{body}")
    return path


def fixed(**more) -> str:
    return "fixed: {" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
                                  for k, v in {**TINY, **more}.items()) + "}\n"


class World:
    """The cluster, the MLflow server and a PostgreSQL database per scenario."""

    def __init__(self, out: Path) -> None:
        from ray.cluster_utils import Cluster

        self.out = out
        t0 = time.monotonic()
        self.mlflow = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", "5077", "--workers", "1",
             "--backend-store-uri", f"sqlite:///{out / 'server.db'}", "--artifacts-destination", str(out / "artifacts")],
            stdout=open(out / "mlflow.log", "w"), stderr=subprocess.STDOUT)
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        self.worker_node = self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        self.tracking = "http://127.0.0.1:5077"
        self.wait_for_mlflow()
        self.started_s = time.monotonic() - t0
        base = sqlalchemy.engine.make_url(os.environ["CNNBENCH_TEST_POSTGRES"])
        self.pg = base.set(host=None, query={"host": os.environ["CNNBENCH_PG_SOCKET"], "port": str(base.port)})

    def wait_for_mlflow(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.tracking}/health", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.mlflow.poll() is not None:
                    raise
                time.sleep(0.5)

    def storage(self) -> str:
        """A fresh database on the PostgreSQL server (through its socket)."""
        name = f"cnnbench_ray_{uuid.uuid4().hex[:10]}"
        admin = sqlalchemy.create_engine(self.pg.set(database="postgres"), isolation_level="AUTOCOMMIT",
                                         poolclass=sqlalchemy.pool.NullPool)
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.pg.set(database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        self.mlflow.terminate()


def runs(tracking: str, experiment: str) -> list[dict]:
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [{"id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags), "params": dict(r.data.params),
             "acc": [m.value for m in sorted(client.get_metric_history(r.info.run_id, "test/acc"), key=lambda m: m.step)]
             if r.data.tags.get("cnnbench.kind") == "trial" else []} for r in found]


def trials(storage: str) -> list[dict]:
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        for t in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials():
            out.append({"number": t.number, "state": t.state.name, "attrs": dict(t.user_attrs),
                        "ended": t.datetime_complete.timestamp() if t.datetime_complete else None})
    return out


def run_api(world: World, path: Path, storage: str, **kwargs) -> dict:
    import cnnbench

    t0 = time.monotonic()
    runner = cnnbench.run_sweep if kwargs.pop("sweep", False) else cnnbench.run_study
    outcome = runner(path, executor=cnnbench.Ray(address=world.cluster.address), storage=storage,
                     tracking=world.tracking, results_root=world.out / "results", data_root=os.environ["CNNBENCH_DATA"],
                     **kwargs)
    return {"seconds": time.monotonic() - t0, "outcome": outcome is not None}


def scenario_study(world: World) -> dict:
    path = spec(world.out, "ray-lr", "scientific: {lr: [0.02, 0.05]}\nseeds: [0, 1]\n" + fixed())
    storage = world.storage()
    facts = run_api(world, path, storage, workers=2)
    results = world.out / "results" / "ray-lr"
    return {**facts, "runs": runs(world.tracking, "ray-lr"), "trials": trials(storage),
            "results": sorted(p.name for p in results.iterdir()) if results.exists() else []}


def scenario_sweep(world: World) -> dict:
    body = ("search: {lr: {type: categorical, choices: [0.005, 0.01, 0.02, 0.05]}}\n" + fixed(val_size=300)
            + "sweep: {sampler: grid, pruner: none, n_trials: 4, final_seeds: [0]}\n")
    path = spec(world.out, "ray-sweep", body)
    storage = world.storage()
    facts = run_api(world, path, storage, workers=2, fuse_k=2, sweep=True)
    return {**facts, "runs": runs(world.tracking, "ray-sweep"), "trials": trials(storage)}


def scenario_node(world: World) -> dict:
    """A node removed mid-epoch (its trial at epoch >= 1), and the same study undisturbed."""
    import threading

    body = "scientific: {lr: [0.02, 0.05]}\n" + fixed(epochs=4, train_subset=3000)
    reference = run_api(world, spec(world.out, "ray-ref", body), world.storage(), workers=2)
    path, storage = spec(world.out, "ray-node", body), world.storage()
    removed: dict = {}
    victim = world.worker_node

    def remove_mid_epoch() -> None:
        client, node_id = MlflowClient(world.tracking), victim.node_id[:12]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not removed:
            for run in runs(world.tracking, "ray-node"):
                if run["status"] == "RUNNING" and run["tags"].get("cnnbench.node") == node_id and run["acc"]:
                    world.cluster.remove_node(victim, allow_graceful=False)
                    removed.update(at=time.time(), run=run["id"], epochs=len(run["acc"]))
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=remove_mid_epoch, daemon=True)
    watcher.start()
    facts = run_api(world, path, storage, workers=2)
    watcher.join(timeout=5)
    world.worker_node = world.cluster.add_node(num_cpus=1)  # for the scenarios after this one
    world.cluster.wait_for_nodes()
    return {**facts, "removed": removed, "runs": runs(world.tracking, "ray-node"), "trials": trials(storage),
            "reference": runs(world.tracking, "ray-ref"), "reference_seconds": reference["seconds"]}


def scenario_ctrl_c(world: World) -> dict:
    path = spec(world.out, "ray-stop", "scientific: {lr: [0.02, 0.05]}\n" + fixed(epochs=6, train_subset=3000))
    storage = world.storage()
    args = [sys.executable, "-m", "cnnbench", "study", str(path), "--executor", "ray", "--ray-address",
            world.cluster.address, "--workers", "2", "--storage", storage, "--tracking-uri", world.tracking,
            "--results-dir", str(world.out / "results")]
    proc = subprocess.Popen(args, cwd=world.out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r["status"] == "RUNNING" and r["acc"] for r in runs(world.tracking, "ray-stop")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    stopped = {"status": proc.returncode, "stderr": err[-3000:], "runs": runs(world.tracking, "ray-stop")}
    again = subprocess.run(args, cwd=world.out, capture_output=True, text=True, timeout=900)
    return {"stopped": stopped, "again": {"status": again.returncode, "stderr": again.stderr[-3000:]},
            "runs": runs(world.tracking, "ray-stop"), "trials": trials(storage)}


def scenario_refused(world: World) -> dict:
    other = world.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")  # another machine, to Ray
    world.cluster.wait_for_nodes()
    path = spec(world.out, "ray-refused", "scientific: {lr: [0.1]}\n" + fixed())
    sqlite = f"sqlite:///{world.out / 'refused-optuna.db'}"
    done = subprocess.run([sys.executable, "-m", "cnnbench", "study", str(path), "--executor", "ray",
                           "--ray-address", world.cluster.address, "--storage", sqlite, "--tracking-uri",
                           world.tracking], cwd=world.out, capture_output=True, text=True, timeout=600)
    world.cluster.remove_node(other)
    return {"status": done.returncode, "stderr": done.stderr, "optuna_db": (world.out / "refused-optuna.db").exists(),
            "runs": runs(world.tracking, "ray-refused")}


def scenario_chaos(world: World) -> dict:
    """The chaos test's studies and sweep (cnnbench/tools/chaos.py), their workers on Ray,
    while nodes are removed at random moments (each replaced by a fresh one): then the
    chaos test's own checks. One machine, so SQLite stores are allowed."""
    import random

    from cnnbench.tools import chaos

    folder = world.out / "chaos"
    (folder / "logs").mkdir(parents=True)
    specs = chaos.write_specs(folder)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "CNNBENCH_HOME": str(folder / ".cnnbench"), "PYTHONUNBUFFERED": "1"}
    ray_args = ["--executor", "ray", "--ray-address", world.cluster.address, "--workers", "2"]
    jobs = [subprocess.Popen([sys.executable, "-m", "cnnbench", kind, str(specs[name]), *ray_args], cwd=folder,
                             env=env, stdout=open(folder / "logs" / f"{name}.log", "w"), stderr=subprocess.STDOUT)
            for kind, name in [("study", n) for n in chaos.STUDIES] + [("sweep", chaos.SWEEP)]]
    seed = int(os.environ.get("CNNBENCH_CHAOS_SEED", "0")) or random.SystemRandom().randrange(2**31)
    rng, deadline = random.Random(seed), time.monotonic() + 900
    removed = False
    time.sleep(rng.uniform(5.0, 20.0))  # then the worker node goes, mid-trial; the head trains the rest
    if any(j.poll() is None for j in jobs):
        world.cluster.remove_node(world.worker_node, allow_graceful=False)
        removed = True
    statuses = [j.wait(timeout=max(1, deadline - time.monotonic())) for j in jobs]
    return {"statuses": statuses, "removals": int(removed), "seed": seed, "problems": chaos.check(folder, specs),
            "logs": {p.name: p.read_text()[-1500:] for p in (folder / "logs").glob("*.log")}}


SCENARIOS = {"study": scenario_study, "sweep": scenario_sweep, "node": scenario_node, "ctrl_c": scenario_ctrl_c,
             "refused": scenario_refused, "chaos": scenario_chaos}  # in this order: chaos leaves one node


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    world = World(out)
    (out / "world.json").write_text(json.dumps({"started_s": world.started_s}))
    try:
        for name in argv[1:] or list(SCENARIOS):
            try:
                facts = SCENARIOS[name](world)
            except Exception as err:  # the test says which scenario broke, and how
                import traceback

                facts = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            (out / f"{name}.json").write_text(json.dumps(facts, default=str))
    finally:
        world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
