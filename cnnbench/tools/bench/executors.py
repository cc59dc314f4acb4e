"""`cnnbench bench --executors`: what running the workers on Ray costs against local
processes, in one run: the 3-seed learning-rate study, tiny (15 trials), on the CPU with
2 workers, once as local processes and once as Ray tasks on a 2-node Ray cluster on this
machine (`ray.cluster_utils.Cluster`); the wall-time ratio and the start-up seconds of
each; results/bench/executors.md.

Ray picks the machine's outward address for its nodes: where only loopback may be used
(this project's sandbox), run it in a loopback-only network namespace, as CI does:
`.ci/ray-netns cnnbench bench --executors`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient

from cnnbench.config.spec import StudySpec
from cnnbench.data.tensors import data_dir
from cnnbench.run.executors.settings import Ray
from cnnbench.run.study import run_study
from cnnbench.tools.bench.common import LR_STUDY
from cnnbench.track.schema import TAG_KIND
from cnnbench.train.device import device_name
from cnnbench.util import fileio
from cnnbench.util.extras import require

SEEDS = (0, 1, 2)
TINY = {"epochs": 2, "train_subset": 2000, "test_subset": 500}


def lr_spec() -> StudySpec:
    fixed = {"model": "lenet5", "activation": "sigmoid", "batch_size": 64, "momentum": 0.9, "test_batch_size": 1024,
             "device": "cpu", "progress": False, "log_every": 10, **TINY}
    return StudySpec(name="bench-executors", path="(cnnbench bench --executors)", title="lr study, tiny",
                     source="document 003", description="", scientific={"lr": LR_STUDY}, nuisance={},
                     fixed=fixed, seeds=SEEDS, reported=())


def first_run_s(tracking: str, t0_ms: float) -> float:
    """Seconds from the study's call to its first trial's run: the start-up."""
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("bench-executors")
    starts = [r.info.start_time for r in client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = 'trial'")]
    return (min(starts) - t0_ms) / 1000.0 if starts else float("nan")


def timed_study(executor: Any, root: Path, say) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tracking = f"sqlite:///{tmp}/mlflow.db"
        t0 = time.perf_counter()
        t0_ms = time.time() * 1000
        run_study(lr_spec(), data_root=root, results_root=Path(tmp) / "results", tracking=tracking,
                  state=Path(tmp) / "state", workers=2, executor=executor)
        wall = time.perf_counter() - t0
        start = first_run_s(tracking, t0_ms)
    say(f"{getattr(executor, 'name', executor)}: {wall:.1f} s, the first trial's run {start:.1f} s after the call")
    return {"wall": wall, "startup": start}


def time_executors(*, data_root: Any = None, out_dir: Path | None = None, say=print) -> dict[str, Any]:
    """Both ways in one run (see the module); the figures, and results/bench/executors.md."""
    require("ray", ["ray"], what="cnnbench bench --executors")
    import ray
    from ray.cluster_utils import Cluster

    root = data_dir(data_root)
    local = timed_study("local", root, say)
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cluster_s = time.perf_counter() - t0
    say(f"a 2-node Ray cluster on this machine started in {cluster_s:.1f} s")
    try:
        on_ray = timed_study(Ray(address=cluster.address), root, say)
    finally:
        ray.shutdown()
        cluster.shutdown()
    figures = {"local": local, "ray": on_ray, "cluster_s": cluster_s, "ratio": on_ray["wall"] / local["wall"]}
    say(f"Ray / local wall time: {figures['ratio']:.2f}x (the cluster's own start not counted)")
    if out_dir is not None:
        figures["file"] = write(out_dir / "executors.md", figures)
    return figures


def write(path: Path, f: dict[str, Any]) -> Path:
    fileio.write_text(path, (
        "# Workers on Ray against local processes\n\n"
        f"The learning-rate study, tiny: {len(LR_STUDY)} learning rates x {len(SEEDS)} seeds = "
        f"{len(LR_STUDY) * len(SEEDS)} trials of LeNet-5, {TINY['epochs']} epochs of {TINY['train_subset']} "
        f"images, on the CPU ({device_name(torch.device('cpu'))}), 2 workers each way, torch {torch.__version__}; "
        "MLflow and Optuna on SQLite in a fresh folder each way. `cnnbench bench --executors` (here under "
        "`.ci/ray-netns`).\n\n"
        "| executor | wall time (s) | first trial's run after (s) | x local |\n|---|---:|---:|---:|\n"
        f"| local processes | {f['local']['wall']:.1f} | {f['local']['startup']:.1f} | 1.00 |\n"
        f"| Ray tasks, 2-node cluster on this machine | {f['ray']['wall']:.1f} | {f['ray']['startup']:.1f} | "
        f"{f['ratio']:.2f} |\n\n"
        f"The Ray cluster itself (a head and a second node, one CPU each) started in {f['cluster_s']:.1f} s, "
        "before the study's call; a user's cluster is already running.\n"))
    return path
