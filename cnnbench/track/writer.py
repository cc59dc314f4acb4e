"""MLflow as the record: one experiment per study, a parent run per execution, a child
run per trial with its resolved config, metric histories, tags and artifacts.

The tracking store is MLflow's own default (a `mlflow.db` SQLite file in the working
directory) unless `MLFLOW_TRACKING_URI` names another (a server, a database). Everything
goes through `MlflowClient` with explicit run ids, so several trials of a fused group
log side by side. Metrics are buffered and sent with `log_batch` once per epoch.

A trial's run is created in the training thread (its id is needed at once); everything
else it writes (params, each epoch's metrics, its end: summary, result.json, figure,
checkpoints, status) is handed to the process's background writer (util/background.py)
and written in that order while the training goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import mlflow
import torch
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.uri import is_local_uri

from cnnbench.config.trial import TrialConfig
from cnnbench.errors import TrackingError
from cnnbench.track import jobs, stores
from cnnbench.track.liveness import heartbeat, orphaned, stamp
from cnnbench.track.schema import (
    EPOCH,
    METRIC_TRAIN_LOSS,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    PREFIX_STATS,
    STATS_METRICS,
    STATS_TAGS,
    TAG_BOOT,
    TAG_DATASET,
    TAG_DEVICE,
    TAG_FUSED_WITH,
    TAG_HEARTBEAT,
    TAG_HOST,
    TAG_KEY,
    TAG_KIND,
    TAG_MODEL,
    TAG_PID,
    TAG_REASON,
    TAG_RESUMED_FROM_EPOCH,
    TAG_SEED,
    TAG_STATUS,
    TAG_STUDY,
    TAG_TORCH_VERSION,
)
from cnnbench.train.result import DIVERGED, FINISHED, INTERRUPTED, Recorder, TrialResult
from cnnbench.util import interrupt, processes
from cnnbench.util.background import writer
from cnnbench.util.text import fmt, masked  # noqa: F401  (re-exported here)

DONE = (FINISHED, DIVERGED)  # outcomes that a resumed study does not train again
METRICS_EVERY_S = 1.0  # a trial's per-epoch metrics go to MLflow at most this often (MlflowRecorder.epoch)


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the store cannot be used."""
    shown = masked(uri)
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                resp.read(1)
        except urllib.error.HTTPError as err:
            raise TrackingError(f"MLflow tracking URI {shown}: server answered HTTP {err.code}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"MLflow tracking URI {shown} cannot be reached ({reason}); "
                                "start the server or fix MLFLOW_TRACKING_URI") from None
        return
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise TrackingError(f"MLflow tracking URI {shown}: folder {path.parent} is missing or not writable")
        why = stores.damaged(path)
        if why:
            raise TrackingError(f"MLflow tracking URI {shown}: {path} is {why}; restore it from a backup, or move it "
                                "away to start a new record (the studies then train again)")
    stores.require_driver(uri)
    try:
        client = stores.mlflow_client(uri)
        stores.retry_busy(lambda: client.search_experiments(max_results=1))
    except Exception as err:
        secret = urllib.parse.urlsplit(uri).password
        detail = " ".join(str(err).split())[:200]
        detail = detail.replace(secret, "***") if secret else detail
        raise TrackingError(f"MLflow tracking URI {shown} cannot be used ({type(err).__name__}: {detail})") from None


@functools.cache
def git_commit() -> str:
    """The code version of the cnnbench checkout (with -dirty if tracked files changed)."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=here)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def creator() -> dict[str, str]:
    """The tags that name the process creating a run (liveness.orphaned reads them)."""
    return {TAG_PID: str(os.getpid()), TAG_HOST: processes.host(), TAG_BOOT: processes.boot_id()}


def _now_ms() -> int:
    return int(time.time() * 1000)


def run_name(config: TrialConfig, varied: Iterable[str]) -> str:
    """Readable in a list: `lr=0.01 seed=0`."""
    return " ".join([f"{k}={fmt(getattr(config, k))}" for k in varied] + [f"seed={config.seed}"])


class Tracker:
    """The MLflow side of one study, sweep or single run."""

    def __init__(self, experiment: str, uri: str | None = None) -> None:
        self.uri = tracking_uri(uri)
        self.client = stores.mlflow_client(self.uri)
        self.experiment_name = experiment
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created meanwhile by another worker
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_parent(self, name: str, *, kind: str, tags: dict[str, str], params: dict[str, Any] | None = None,
                     note: str = "") -> str:
        with interrupt.shielded():  # the caller holds a shield too, so that a Ctrl-C comes once it has the id
            return self._start_parent(name, kind=kind, tags=tags, params=params, note=note)

    def _start_parent(self, name: str, *, kind: str, tags: dict[str, str], params: dict[str, Any] | None,
                      note: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            TAG_STUDY: self.experiment_name, TAG_KIND: kind, MLFLOW_GIT_COMMIT: git_commit(),
            MLFLOW_SOURCE_NAME: "cnnbench", **creator(), **({MLFLOW_RUN_NOTE: note} if note else {}), **tags})
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        jobs.log_params(self.client, run_id, params)

    def end(self, run_id: str, status: str = "FINISHED", reason: str = "") -> None:
        """A run ended (`reason`: why, for a run that did not finish); its heartbeat stops."""
        self.let_go(run_id)
        if reason:
            self.client.set_tag(run_id, TAG_REASON, reason[:5000])
        self.client.set_terminated(run_id, status=status)

    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if Path(p).exists():
                self.client.log_artifact(run_id, str(p), artifact_path)

    def log_stats(self, run_id: str, table: Any, keys: list[str]) -> None:
        """A study's statistics (`report.statistics`, one row per value and accuracy) on its
        parent run: metrics `stats/<accuracy>/<value>/{n,mean,std,ci_low,ci_high,diff,p_holm}`
        (percent; the value as `lr:0.01`, since MLflow keys cannot hold `=` or `,`) and tags
        `stats/<accuracy>/<value>/verdict` and `.../doc_verdict`."""
        metrics, tags, now = [], [], _now_ms()
        for row in table.to_dict("records"):
            # MLflow keys hold letters, digits and _ - . : / and spaces only: `augment:hflip_grayscale`
            value = re.sub(r"[^\w.\- :]", "_", " ".join(f"{k}:{fmt(row[k])}" for k in keys))
            base = f"{PREFIX_STATS}{row['metric']}/{value}"
            for name in STATS_METRICS:
                v = row.get(name)
                if v is not None and v == v:
                    metrics.append(Metric(f"{base}/{name}", float(v), now, 0))
            for name in STATS_TAGS:
                if isinstance(row.get(name), str) and row[name]:
                    tags.append(RunTag(f"{base}/{name}", row[name]))
        for i in range(0, max(len(metrics), len(tags)), 500):
            self.client.log_batch(run_id, metrics=metrics[i:i + 500], tags=tags[i:i + 500], synchronous=True)

    def trial_runs(self, *, parent: str | None = None, extra: str = "") -> list[Any]:
        """Child runs of this experiment (optionally of one parent), every page."""
        query = f"tags.`{TAG_KIND}` = 'trial'"
        if parent:
            query += f" and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'"
        if extra:
            query += f" and {extra}"
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], query, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def runs_with_tag(self, key: str, value: str) -> list[Any]:
        """This experiment's runs whose tag `key` is `value`, newest first."""
        return self.client.search_runs([self.experiment_id], f"tags.`{key}` = '{value}'", max_results=100,
                                       order_by=["attributes.start_time DESC"])

    def finished_trials(self) -> dict[str, Any]:
        """trial key -> the newest run whose outcome is final (finished or diverged)."""
        done: dict[str, Any] = {}
        for run in self.trial_runs():
            key = run.data.tags.get(TAG_KEY)
            if key and run.data.tags.get(TAG_STATUS) in DONE and run.info.status in ("FINISHED", "FAILED"):
                if key not in done or run.info.start_time > done[key].info.start_time:
                    done[key] = run
        return done

    def close_orphans(self, reason: str, *, keep: Iterable[str] = ()) -> list[str]:
        """Runs of this experiment left RUNNING by a process that died (SIGKILL, out of
        memory, a power cut), whatever execution, state folder or spec they belong to, become
        KILLED with `reason`: those whose last heartbeat came from a process of this machine
        that is gone, and those of any machine whose heartbeat is older than ORPHAN_GRACE_S.
        The runs in `keep` stay as they are."""
        closed, keep, now = [], set(keep), time.time()
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
            if run.info.run_id in keep or not orphaned(run, now):
                continue
            self.client.log_batch(run.info.run_id, tags=[RunTag(TAG_STATUS, INTERRUPTED), RunTag(TAG_REASON, reason)],
                                  synchronous=True)
            self.client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
        return closed

    def keep_alive(self, run_id: str, *, stamped: bool = False) -> None:
        """Stamp `run_id`'s heartbeat every HEARTBEAT_S seconds while this process keeps it
        going (`stamped`: the run was created with a stamp, the first beat is not needed)."""
        heartbeat().add(self.client, run_id, stamped=stamped)

    def let_go(self, run_id: str) -> None:
        heartbeat().discard(run_id)

    def recorder(self, config: TrialConfig, *, parent: str, name: str, tags: dict[str, str]) -> "MlflowRecorder":
        return MlflowRecorder(self, config, parent=parent, name=name, tags=tags)

    def load_result(self, run) -> TrialResult:
        """A finished trial's result, from its `result.json` artifact: read where it lies when
        the run's artifacts are a folder here (a copy through MLflow's download was two
        thirds of a study's time reading its runs back), else downloaded."""
        local = artifact_folder(run.info.artifact_uri)
        if local is not None and (local / "result.json").is_file():
            return jobs.result_from_json(json.loads((local / "result.json").read_text()))
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run.info.run_id, "result.json", tmp)
            return jobs.result_from_json(json.loads(Path(path).read_text()))


class MlflowRecorder(Recorder):
    """One trial's child run. Created with its params at `start` (in the training thread: its
    id is needed at once); everything else it writes goes through the background writer
    (track/jobs.py)."""

    def __init__(self, tracker: Tracker, config: TrialConfig, *, parent: str, name: str, tags: dict[str, str]) -> None:
        self.tracker, self.client = tracker, tracker.client
        self.config, self.parent, self.name, self.tags = config, parent, name, tags
        self.uri = stores.absolute(tracker.uri)  # what the writer process opens, whatever its folder
        self.run_id: str | None = None
        self.pending: list[Metric] = []
        self.flushed: float | None = None  # when the metrics were last handed over (monotonic)

    def start(self, config: TrialConfig, info: dict[str, Any], resumed: TrialResult | None) -> None:
        c = config
        tags = {
            **({MLFLOW_PARENT_RUN_ID: self.parent} if self.parent else {}),
            TAG_KIND: "trial" if self.parent else "run", TAG_STUDY: self.tracker.experiment_name,
            TAG_KEY: c.key(), TAG_STATUS: "running", TAG_MODEL: c.model, TAG_DATASET: c.dataset,
            TAG_SEED: str(c.seed), TAG_DEVICE: str(info.get("device", "")),
            TAG_FUSED_WITH: str(info.get("fused_with", 1)), TAG_TORCH_VERSION: _torch_version(),
            MLFLOW_GIT_COMMIT: git_commit(), MLFLOW_SOURCE_NAME: "cnnbench",
            **creator(), TAG_HEARTBEAT: stamp(), **self.tags,
        }
        if resumed is not None:
            tags[TAG_RESUMED_FROM_EPOCH] = str(len(resumed.history))
        run = self.client.create_run(self.tracker.experiment_id, run_name=self.name, tags=tags)
        self.run_id = run.info.run_id
        self.tracker.keep_alive(self.run_id, stamped=True)
        # the trial's settings with its run from its first moment, as its tags are (one commit):
        # what tells a RUNNING run apart, for a person watching and for a process that must
        # find a trial's worker, however late the writer process starts on a busy machine
        jobs.log_params(self.client, self.run_id, c.to_dict())
        if resumed is not None:  # the restored epochs, so that this run holds the whole history
            for samples, loss in resumed.curve:
                self.train_loss(samples, loss)
            for record in resumed.history:
                self._epoch_metrics(record)
            self.flush()

    def hand_over(self, params: dict[str, Any], what: str) -> None:
        metrics, self.pending = self.pending, []
        writer().submit(functools.partial(jobs.log_run, self.uri, self.run_id, params, metrics), what, remote=True)

    def train_loss(self, samples: int, loss: float) -> None:
        self.pending.append(Metric(METRIC_TRAIN_LOSS, loss, _now_ms(), samples))

    def _epoch_metrics(self, record: dict[str, float]) -> None:
        ts, step = _now_ms(), int(record[EPOCH])
        self.pending.extend(Metric(k, float(v), ts, step) for k, v in record.items() if k != EPOCH)

    def epoch(self, record: dict[str, float]) -> str | None:
        """The epoch's metrics: handed over at once for the run's first epoch (a person or a
        process watching sees that it trains), then at most once a second (`METRICS_EVERY_S`;
        each write is two commits, milliseconds per epoch of MLflow's ORM, where a GPU trains
        an epoch of a small network in tens); its end hands over what is left."""
        self._epoch_metrics(record)
        if self.flushed is None or time.monotonic() - self.flushed >= METRICS_EVERY_S:
            self.flush()
        return None

    def flush(self) -> None:
        """The metrics gathered so far, handed to the background writer."""
        if self.run_id is not None and self.pending:
            self.hand_over({}, "mlflow metrics")
            self.flushed = time.monotonic()

    def finish(self, result: TrialResult) -> None:
        """The run's end, handed to the background writer after everything else of it, and
        written even where another write failed (no run is left RUNNING); its heartbeat
        stops first, as the run is closed right after."""
        if self.run_id is None:
            return
        final = dataclasses.replace(result, history=list(result.history), curve=list(result.curve),
                                    final_checkpoint=absolute(result.final_checkpoint),
                                    best_checkpoint=absolute(result.best_checkpoint))
        metrics, self.pending = self.pending, []
        ours = writer()
        ours.submit(functools.partial(self.tracker.let_go, self.run_id), "mlflow run ends with figure and artifacts",
                    check=False, always=True)
        ours.submit(functools.partial(jobs.end_run, self.uri, self.run_id, final, metrics),
                    "mlflow run ends with figure and artifacts", remote=True, check=False, always=True)


def artifact_folder(uri: str) -> Path | None:
    """The folder of a run's artifacts where `uri` is a path or file: URI, else None."""
    try:
        return Path(local_file_uri_to_path(uri)) if is_local_uri(uri, is_tracking_or_registry_uri=False) else None
    except Exception:  # one MLflow refuses as local (a file: URI of another host)
        return None


def absolute(path: Path | None) -> Path | None:
    return Path(os.path.abspath(path)) if path is not None else None


@functools.cache
def _torch_version() -> str:

    return torch.__version__


__all__ = ["Tracker", "MlflowRecorder", "TrackingError", "check_reachable", "tracking_uri", "run_name",
           "RunStatus", "mlflow"]
