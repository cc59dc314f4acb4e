"""deploy/k8s/: the Kubernetes manifests checked offline, and their contract kept by local
processes.

kubernetes-validate checks every manifest against Kubernetes' own JSON schemas (strict:
no unknown field), with no cluster and no network; what those schemas do not say (an
enum's values, the Job's rules) is checked here: an Indexed Job whose pods never restart
in place and run `cnnbench worker ... --final` with options the real parser accepts.
The contract: N `cnnbench worker` processes (pods) with JOB_COMPLETION_INDEX set, each
with its own state folder, against one fresh SQLite storage and MLflow store (one machine,
so SQLite is allowed); one SIGKILLed mid-trial and started again under its index, as the
Job controller does (on one machine the dead worker's trials are queued again at once,
its pid seen gone; on a cluster after their heartbeat's 60 s). Every trial finishes
exactly once, one worker writes the results, nothing is left RUNNING. (Not run on a real
cluster here: no Kubernetes on these machines.)
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from cluster_checks import Command, check_whole, trial_in_training
from conftest import REPO
from cnnbench.track.schema import ATTR_KEY, ATTR_WORKER_PID, CLAIM_DONE, STUDY_FINAL_CLAIM, TAG_KIND

K8S = REPO / "deploy" / "k8s"
VERSION = "1.37.0"  # the newest Kubernetes whose schemas kubernetes-validate 1.37 ships


def documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc]


def the_job() -> dict:
    jobs = [doc for _, doc in documents() if doc["kind"] == "Job"]
    assert len(jobs) == 1
    return jobs[0]


def test_every_manifest_is_valid_kubernetes_offline():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = documents()
    assert {doc["kind"] for _, doc in docs} >= {"Job", "ConfigMap", "Secret", "Deployment", "Service"}
    for path, doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)  # raises ValidationError, naming the field


def test_the_validator_catches_a_wrong_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = the_job()
    for broken in ({**job, "spec": {**job["spec"], "parallelism": "two"}},
                   {**job, "spec": {**job["spec"], "completionsMode": "Indexed"}}):  # a typo: unknown field
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSION, strict=True)


def test_the_job_is_indexed_never_restarts_in_place_and_runs_cnnbench_worker():
    from cnnbench.cli import build_parser

    job = the_job()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    assert spec["backoffLimitPerIndex"] >= 1 and spec["podFailurePolicy"]["rules"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:2] == ["cnnbench", "worker"] and "--final" in command
    assert (REPO / command[2]).exists()  # the spec, in the image's working folder as in the repository
    env = {e["name"]: e for e in container["env"]}
    for option, variable in (("--storage", "STORAGE"), ("--tracking-uri", "MLFLOW")):
        assert command[command.index(option) + 1] == f"$({variable})" and variable in env
    args = build_parser().parse_args([a.replace("$(STORAGE)", "postgresql://x").replace("$(MLFLOW)", "http://y")
                                      for a in command[1:]])
    assert args.command == "worker" and args.final and args.storage == "postgresql://x"
    # the Secret and ConfigMap it reads hold the keys it reads
    held = {(doc["kind"], doc["metadata"]["name"]): {**doc.get("data", {}), **doc.get("stringData", {})}
            for _, doc in documents() if doc["kind"] in ("Secret", "ConfigMap")}
    for e in env.values():
        ref = e.get("valueFrom", {})
        for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if key in ref:
                assert ref[key]["key"] in held[(kind, ref[key]["name"])], e
    assert held[("Secret", "cnnbench")]["storage"].startswith("postgresql://")


@pytest.mark.slow
def test_the_jobs_contract_with_local_processes(tmp_path, data_root):
    """N pods as N `cnnbench worker` processes (the manifest's command, a tiny study), one
    SIGKILLed mid-trial and started again under its index."""
    n, epochs = 3, 6  # seconds of training after the first epoch seen (cluster_checks.trial_in_training)
    spec = tmp_path / "k8s.yaml"
    spec.write_text("name: k8s\nscientific: {lr: [0.01, 0.02, 0.05]}\nseeds: [0, 1]\n"
                    f"fixed: {{epochs: {epochs}, train_subset: 2000, test_subset: 300, log_every: 10, progress: false}}\n")
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    command = [a.replace("$(STORAGE)", storage).replace("$(MLFLOW)", tracking)
               for a in the_job()["spec"]["template"]["spec"]["containers"][0]["command"]]
    assert command[:2] == ["cnnbench", "worker"]
    args = [command[1], str(spec), *command[3:], "--max-fuse", "1", "--threads", "1", "--results-dir", "results"]

    def pod(index: int, attempt: int) -> Command:
        return Command(args, cwd=tmp_path, env={"JOB_COMPLETION_INDEX": str(index), "CNNBENCH_DATA": str(data_root),
                                                "CNNBENCH_HOME": str(tmp_path / f"pod-{index}-{attempt}")})

    t0 = time.monotonic()
    pods = {i: pod(i, 0) for i in range(n)}  # all at once, on fresh stores: the first creates the study
    deadline = time.monotonic() + 900
    while not list(tmp_path.glob("pod-*-0/checkpoints/k8s/*")):  # training: the stores are made
        assert time.monotonic() < deadline and all(p.proc.poll() is None for p in pods.values())
        time.sleep(0.5)
    victim = trial_in_training(storage, tracking, epochs, alive=lambda: all(p.proc.poll() is None
                                                                          for p in pods.values()))
    index = next(i for i, p in pods.items() if p.proc.pid == victim.user_attrs[ATTR_WORKER_PID])
    os.kill(pods[index].proc.pid, signal.SIGKILL)
    assert pods[index].finish(timeout=60) == -signal.SIGKILL
    pods[index] = pod(index, 1)  # the Job controller's new pod for that index
    statuses = {i: p.finish(timeout=1500) for i, p in pods.items()}
    assert statuses == {i: 0 for i in range(n)}, {i: p.text[-2000:] for i, p in pods.items()}
    named = {i: set(re.findall(r"^\[w(\d+)\] ", p.text, re.M)) for i, p in pods.items()}
    assert all(found <= {str(i)} for i, found in named.items()) and any(named.values()), named  # by its index
    keys = check_whole(storage, tracking, "k8s", 6)
    again = keys[victim.user_attrs[ATTR_KEY]]
    assert len(again) == 2  # lost with its pod, then trained once more
    # the results written by one --final worker (the claim's), and not again after it ended
    import optuna

    claim = optuna.load_study(study_name=optuna.get_all_study_summaries(storage)[0].study_name,
                              storage=storage).user_attrs[STUDY_FINAL_CLAIM]
    (writer,) = [p for p in pods.values() if p.proc.pid == claim[ATTR_WORKER_PID]]
    assert claim[CLAIM_DONE] and writer.ended_at is not None
    assert (tmp_path / "results" / "k8s" / "summary.csv").stat().st_mtime <= writer.ended_at
    print(f"k8s contract: {n} workers, one killed and restarted, {time.monotonic() - t0:.0f} s")


def one_trial_pod(tmp_path: Path, name: str, data_root: Path) -> tuple[str, str, list[str]]:
    """A one-trial study `name` on fresh SQLite stores in `tmp_path`: (storage, tracking, the
    pod's `cnnbench worker ... --final` arguments)."""
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\nscientific: {{lr: [0.05]}}\nseeds: [0]\n"
                    "fixed: {epochs: 1, train_subset: 640, test_subset: 300, log_every: 10, progress: false}\n")
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    return storage, tracking, ["worker", str(spec), "--storage", storage, "--tracking-uri", tracking, "--final",
                               "--results-dir", str(tmp_path / "results"), "--data-dir", str(data_root)]


@pytest.mark.slow
def test_a_pod_started_after_the_end_finds_nothing_to_do(tmp_path, data_root, monkeypatch):
    """A worker started once the study has ended (a pod the Job controller restarted late)
    joins that execution as it ended: no second parent run, no results written again."""
    from cnnbench.cli import main
    import optuna

    storage, tracking, args = one_trial_pod(tmp_path, "late", data_root)
    monkeypatch.setenv("CNNBENCH_HOME", str(tmp_path / "pod-0"))
    assert main(args) == 0
    written = (tmp_path / "results" / "late" / "summary.csv").stat().st_mtime_ns
    monkeypatch.setenv("CNNBENCH_HOME", str(tmp_path / "pod-0-again"))  # a new pod: a state folder of its own
    assert main(args) == 0
    check_whole(storage, tracking, "late", 1)
    assert (tmp_path / "results" / "late" / "summary.csv").stat().st_mtime_ns == written
    (summary,) = optuna.get_all_study_summaries(storage)
    assert len(optuna.load_study(study_name=summary.study_name, storage=storage).trials) == 1


def blocked_on_a_lock(pid: int) -> bool:
    """Whether process `pid` waits for a file lock (/proc/locks lists a waiter as `->`)."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 5)


@pytest.mark.slow
def test_a_pod_started_while_the_results_are_written_leaves_the_parent_run_ended(tmp_path, data_root, monkeypatch):
    """The race CI once met: a pod restarted late joins just after the worker that ends the
    study has closed the parent run, but before it has recorded the results as written. The
    late pod must not reopen the parent run (nothing would end it again). Here the late pod
    starts at that very moment (inside the parent run's end), and the end goes on only once
    the pod has either reopened the run (the bug) or is waiting for the study's lock."""
    from cnnbench.cli import main
    from cnnbench.track.writer import Tracker

    storage, tracking, args = one_trial_pod(tmp_path, "race", data_root)
    late: list[Command] = []
    seen: list[str] = []
    end = Tracker.end

    def ending(self: Tracker, run_id: str, status: str = "FINISHED", reason: str = "") -> None:
        end(self, run_id, status, reason)
        if late or self.client.get_run(run_id).data.tags.get(TAG_KIND) != "study":
            return
        late.append(Command(args, cwd=tmp_path, env={"CNNBENCH_HOME": str(tmp_path / "pod-late")}))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.client.get_run(run_id).info.status == "RUNNING":
                seen.append("reopened")
                return
            if blocked_on_a_lock(late[0].proc.pid):
                seen.append("waiting")
                return
            assert late[0].proc.poll() is None, late[0].text[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"the late pod neither waited nor reopened the run:\n{late[0].text[-3000:]}")

    monkeypatch.setattr(Tracker, "end", ending)
    monkeypatch.setenv("CNNBENCH_HOME", str(tmp_path / "pod-0"))
    assert main(args) == 0
    assert late and late[0].finish(timeout=300) == 0, late[0].text[-3000:]
    assert seen == ["waiting"], late[0].text[-3000:]
    check_whole(storage, tracking, "race", 1)  # one parent run, FINISHED
