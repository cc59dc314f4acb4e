"""The Ray executor on a real two-node Ray cluster, with PostgreSQL and an MLflow server.

Every scenario runs in one go in tests/ray_scenarios.py, inside a network namespace whose
only interface is loopback (.ci/ray-netns), because these machines may send traffic only
to loopback and Ray would otherwise pick the machine's outward address for its nodes; a
two-node cluster then lives entirely on 127.0.0.1. This module starts it once (a few
minutes), then checks each scenario's facts. Needs root (a network namespace), the ray
extra and the PostgreSQL server of .ci/postgres; CI has all three.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.ray]


@pytest.fixture(scope="module")
def facts(tmp_path_factory, data_root) -> dict:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a network namespace needs root and unshare (CI has both)")
    if not os.environ.get("CNNBENCH_TEST_POSTGRES_SOCKET"):
        if os.environ.get("CNNBENCH_REQUIRE_POSTGRES"):
            pytest.fail("CNNBENCH_TEST_POSTGRES_SOCKET is not set (source .ci/postgres)")
        pytest.skip("no PostgreSQL server: source .ci/postgres")
    out = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "CNNBENCH_DATA": str(data_root), "CNNBENCH_PG_SOCKET": os.environ["CNNBENCH_TEST_POSTGRES_SOCKET"],
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([str(REPO / ".ci" / "ray-netns"), sys.executable, str(REPO / "tests" / "ray_scenarios.py"),
                           str(out)], env=env, capture_output=True, text=True, timeout=2400)
    log = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, log
    found = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    for name, f in found.items():
        assert "error" not in f, f"scenario {name}: {f.get('traceback', f['error'])}\n{log}"
    return found


def kinds(runs: list[dict], kind: str) -> list[dict]:
    return [r for r in runs if r["tags"].get("cnnbench.kind") == kind]


def finished_once(runs: list[dict], key: str = "cnnbench.trial_key") -> Counter:
    return Counter(r["tags"][key] for r in kinds(runs, "trial") if r["status"] == "FINISHED")


def test_a_grid_study_on_two_nodes_trains_every_trial_once(facts):
    f = facts["study"]
    assert f["outcome"], "the driver did not write the results"
    trained = finished_once(f["runs"])
    assert len(trained) == 4 and set(trained.values()) == {1}  # 2 lr x 2 seeds, each once
    assert not [r for r in f["runs"] if r["status"] == "RUNNING"]
    (parent,) = kinds(f["runs"], "study")
    assert parent["status"] == "FINISHED"
    assert {r["tags"]["mlflow.parentRunId"] for r in kinds(f["runs"], "trial")} == {parent["id"]}
    trials = kinds(f["runs"], "trial")
    assert {r["tags"]["cnnbench.executor"] for r in trials} == {"ray"}
    assert len({r["tags"]["cnnbench.node"] for r in trials}) == 2  # runs from both nodes
    assert {"summary.csv", "table.md", "stats.csv"} <= set(f["results"])
    assert Counter(t["state"] for t in f["trials"]) == {"COMPLETE": 4}


def test_a_fused_sweep_on_two_nodes_trains_every_trial_once(facts):
    f = facts["sweep"]
    assert f["outcome"]
    search = [r for r in f["runs"] if r["tags"].get("cnnbench.phase") == "search" and r["status"] == "FINISHED"]
    assert len(search) == 4 and len({r["tags"]["optuna.trial_number"] for r in search}) == 4
    assert not [r for r in f["runs"] if r["status"] == "RUNNING"]
    assert Counter(t["state"] for t in f["trials"])["COMPLETE"] == 4
    assert max(int(r["tags"]["fused_with"]) for r in search) == 2  # trained fused, two at a time


def test_a_node_lost_mid_epoch_hands_its_trial_to_the_other_node(facts):
    f = facts["node"]
    assert f["removed"], "the node was not removed mid-epoch"
    lost = [t for t in f["trials"] if t["state"] == "FAIL"]
    assert len(lost) == 1 and lost[0]["ended"] - f["removed"]["at"] < 10  # queued again within 10 s
    assert Counter(t["state"] for t in f["trials"]) == {"COMPLETE": 2, "FAIL": 1}  # the Optuna count is exact
    assert not [r for r in f["runs"] if r["status"] == "RUNNING"]
    trained = finished_once(f["runs"])
    assert len(trained) == 2 and set(trained.values()) == {1}
    resumed = [r for r in kinds(f["runs"], "trial") if r["status"] == "FINISHED"
               and r["tags"].get("cnnbench.resumed_from_epoch")]
    assert len(resumed) == 1 and int(resumed[0]["tags"]["cnnbench.resumed_from_epoch"]) >= 1
    # resumed on the other node from the shared checkpoint: the same numbers as undisturbed
    reference = {r["params"]["lr"]: r["acc"] for r in kinds(f["reference"], "trial") if r["status"] == "FINISHED"}
    assert resumed[0]["acc"] == reference[resumed[0]["params"]["lr"]]


def test_ctrl_c_to_the_driver_stops_every_worker_and_the_same_command_finishes(facts):
    f = facts["ctrl_c"]
    assert f["stopped"]["status"] == 130, f["stopped"]["stderr"]
    assert {r["status"] for r in f["stopped"]["runs"]} == {"KILLED"}
    assert f["again"]["status"] == 0, f["again"]["stderr"]
    assert not [r for r in f["runs"] if r["status"] == "RUNNING"]
    trained = finished_once(f["runs"])
    assert len(trained) == 2 and set(trained.values()) == {1}


def test_a_sqlite_storage_is_refused_when_a_node_is_another_machine(facts):
    f = facts["refused"]
    assert f["status"] == 2, f["stderr"]
    last = f["stderr"].strip().splitlines()[-1]
    assert last.startswith("cnnbench: error: --storage sqlite:") and "postgresql://" in last, last
    assert not f["optuna_db"] and not f["runs"]  # nothing created


@pytest.mark.chaos
def test_chaos_on_ray_removes_nodes_and_loses_nothing(facts):
    f = facts["chaos"]
    assert f["removals"] >= 1, "every job ended before a node could be removed"
    assert f["statuses"] == [0, 0, 0], f["logs"]
    assert not f["problems"], "\n".join(f["problems"])
