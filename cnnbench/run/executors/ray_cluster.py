"""Workers as Ray tasks on a Ray cluster (Ray Core, not Ray Tune: a Tune trial is one
config, so K fused trials would be one Tune trial).

Each worker is one Ray task running `workers.run_worker` (the loop every executor runs)
with the resources asked for (`gpus_per_worker`: Ray places it and sets
CUDA_VISIBLE_DEVICES; `cpus_per_worker`). The task never retries by itself
(max_retries=0): the pool (run/pool.py) sees a task that ends badly at once and decides:
a worker process killed (WorkerCrashedError) is a death counted on its trials, a node
lost (NodeDiedError, RayActorError, ObjectLostError) is not the trials' doing; either way
its trials are queued again within a second and a replacement task starts while work
remains. Progress comes back through a Ray queue. A stop request cancels the tasks
(KeyboardInterrupt inside them: they queue their trials again), forcefully after
STOP_GRACE_S. Every node keeps its own state folder (checkpoints follow a trial through
the shared store, run/checkpoint_share.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnbench.config.spec import StudySpec
from cnnbench.errors import ConfigError
from cnnbench.run.executors.settings import Ray, refuse_local_stores
from cnnbench.run.networks import worker_imports
from cnnbench.run.session import Kind, Session
from cnnbench.run.storage import process_id
from cnnbench.run.workers import EXIT_LOST, Ended, run_worker
from cnnbench.util.extras import require

STOP_GRACE_S = 30.0  # a task that has not stopped this long after its cancel is cancelled by force


def connect(address: str) -> Any:
    """Ray, connected to the cluster at `address` ("auto": the one this machine belongs to,
    else a local Ray started for the run); a cluster already joined in this process is kept."""
    require("ray", ["ray"], what="--executor ray")
    import ray  # the ray extra; imported when asked for (it takes seconds)

    if ray.is_initialized():
        return ray
    kwargs = {"log_to_driver": True, "include_dashboard": False} if address == "auto" else {"log_to_driver": True}
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as err:
        if address != "auto":
            raise ConfigError(f"--ray-address {address}: cannot connect ({' '.join(str(err).split())[:200]})") from None
        ray.init(**kwargs)  # no cluster to join: a local one for this run
    return ray


def nodes(ray: Any) -> list[str]:
    """The addresses of the cluster's live nodes, one per node."""
    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))


def here(ray: Any) -> str:
    """This driver's node address."""
    return ray.util.get_node_ip_address()


class RayTasks:
    """The Ray executor (run/pool.py's Executor)."""

    def __init__(self, settings: Ray) -> None:
        self.ray = connect(settings.address)
        from ray.util.queue import Queue

        gpus = settings.gpus_per_worker
        if gpus is None:  # one where the cluster has GPUs
            gpus = 1 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.gpus, cpus = gpus, settings.cpus_per_worker if settings.cpus_per_worker is not None else 1
        self.task = self.ray.remote(max_retries=0, num_cpus=cpus, num_gpus=gpus)(ray_worker)
        # on the driver's own node: a queue on a node that is lost would take the progress lines with it
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here_id = self.ray.get_runtime_context().get_node_id()
        self.events = Events(Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
            node_id=here_id, soft=False)}))
        self.name = f"Ray ({len(nodes(self.ray))} node(s), {cpus} CPU(s) and {gpus} GPU(s) per worker)"

    def check_stores(self, url: str, uri: str) -> None:
        """Stores only this machine can reach are refused unless every node is this machine."""
        me = here(self.ray)
        if any(node != me for node in nodes(self.ray)):
            refuse_local_stores(f"--executor ray ({self.name})", storage=url, tracking=uri)

    def for_workers(self, n: int) -> "RayTasks":
        return self

    def start(self, session: Session, slot: str, index: int) -> "RayTask":
        s = session
        open_args = {**s.open_args, "storage": s.url, "checked": True, "role": "supervised",
                     "supervisor": process_id(), "slot": slot, "share_checkpoints": True}
        imports = worker_imports(s.spec, s.configs.values())
        return RayTask(self.ray, self.task.remote(s.spec, s.kind, open_args, slot, self.events, self.gpus, imports))

    def close(self) -> None:
        pass  # the cluster is the user's; a local one ends with this process


class Events:
    """The progress events' Ray queue; a put that fails (the driver gone) loses a line, never a trial."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def put(self, item: Any) -> None:
        try:
            self.queue.put(item, timeout=10)
        except Exception:  # a progress line is not worth a trial
            pass

    def get(self, timeout: float | None = None) -> Any:
        return self.queue.get(timeout=timeout)


@dataclass
class RayTask:
    """One worker task (run/pool.py's Handle)."""
    ray: Any
    ref: Any
    stopped_at: float | None = None
    where: str = "a Ray task"

    def ended(self, timeout: float) -> Ended | None:
        ray = self.ray
        if self.stopped_at is not None and time.monotonic() - self.stopped_at > STOP_GRACE_S:
            ray.cancel(self.ref, force=True)  # it did not stop at a safe point (blocked in C code)
            self.stopped_at = None
        ready, _ = ray.wait([self.ref], timeout=timeout)
        if not ready:
            return None
        exceptions = ray.exceptions
        try:
            status, message, self.where = ray.get(self.ref)
        except exceptions.TaskCancelledError:
            return Ended(130)
        except exceptions.WorkerCrashedError:
            return Ended(-9, "its Ray worker process died (WorkerCrashedError)")
        except (exceptions.NodeDiedError, exceptions.RayActorError, exceptions.ObjectLostError) as err:
            return Ended(EXIT_LOST, f"was lost with its Ray node ({type(err).__name__})")
        except exceptions.RayTaskError as err:
            return Ended(1, f"failed: {' '.join(str(err).split())[-300:]}")
        return Ended(status, message)

    def stop(self, signum: int) -> None:
        self.ray.cancel(self.ref, force=False)  # KeyboardInterrupt in the task, at its next bytecode
        self.stopped_at = time.monotonic()

    def describe(self) -> str:
        return self.where


def node_state() -> Path:
    """This node's own state folder: $CNNBENCH_HOME where the node sets it, else one under
    the temporary folder named after the Ray node (nothing shared through a disk by accident)."""
    if os.environ.get("CNNBENCH_HOME"):
        return Path(os.environ["CNNBENCH_HOME"])
    import ray

    return Path(tempfile.gettempdir()) / "cnnbench-ray" / ray.get_runtime_context().get_node_id()[:12]


def ray_worker(spec: StudySpec, kind: Kind, open_args: dict[str, Any], label: str, events: Any,
               gpus: float, imports: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """A Ray task: `workers.run_worker` on this node; (exit status, message, where it ran)."""
    import ray

    if not gpus:  # Ray leaves CUDA_VISIBLE_DEVICES unset for a task without GPUs: it would see them all
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    where = f"node {ray.util.get_node_ip_address()} pid {os.getpid()}"
    node = ray.get_runtime_context().get_node_id()[:12]
    ended = run_worker(spec, kind, {**open_args, "state": str(node_state()), "executor": "ray", "node": node},
                       label=label, events=events, imports=imports)
    return ended.status, ended.message, where
