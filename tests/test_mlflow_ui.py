"""A real `mlflow server` on loopback: a tiny lr study recorded through its REST API, read
back through the REST client, and shown in the MLflow UI by headless Chromium."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, TINY_STUDY

pytestmark = [pytest.mark.server, pytest.mark.slow]
NAMES = [f"lr={lr} seed=0" for lr in ("0.001", "0.005", "0.01", "0.05", "0.1")]
IN_CI = os.environ.get("CNNBENCH_CI") == "1"  # set by .ci/run: there the browser test must run


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_root):
    """One server for the module, over a sqlite store with proxied artifacts; the lr study
    is run against it through MLFLOW_TRACKING_URI=http://127.0.0.1:<port>."""
    from cnnbench.tools.ui import mlflow_server

    from cnnbench.cli import main

    root = tmp_path_factory.mktemp("server")
    with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", log=root / "server.log") as url, \
            pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for key, value in {"MLFLOW_TRACKING_URI": url, "CNNBENCH_DATA": str(data_root),
                           "CNNBENCH_HOME": str(root / ".cnnbench")}.items():
            mp.setenv(key, value)
        status = main(["study", str(REPO / "studies" / "lr.yaml"), *TINY_STUDY, "--seeds", "0"])
        assert status == 0, (root / "server.log").read_text()[-2000:]
        yield url, root


def test_the_study_is_on_the_server_nested_with_histories_and_artifacts(server):
    url, root = server
    client = MlflowClient(url)  # the REST client
    exp = client.get_experiment_by_name("lr")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("cnnbench.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("cnnbench.kind") == "trial"]
    assert len(parents) == 1 and len(trials) == 5
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    assert sorted(t.info.run_name for t in trials) == sorted(NAMES)
    for t in trials:
        # grouping and side-by-side comparison in the UI go by these
        assert t.data.tags["scientific.lr"] == t.data.params["lr"] and t.data.tags["cnnbench.scientific"] == "lr"
        loss = client.get_metric_history(t.info.run_id, "train/loss")  # the full curve, step = samples seen
        assert [m.step for m in loss] == list(range(128, 2 * 640 + 1, 128))
        assert [m.step for m in client.get_metric_history(t.info.run_id, "test/acc")] == [1, 2]
        listed = {a.path for a in client.list_artifacts(t.info.run_id)}
        assert {"curves.png", "result.json", "config.json", "checkpoints"} <= listed
    # artifacts went through the server into its --artifacts-destination, not a local mlruns/
    assert trials[0].info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((root / "artifacts").rglob("curves.png")) and not (root / "mlruns").exists()
    assert (parents[0].data.tags["cnnbench.kind"], parents[0].info.status) == ("study", "FINISHED")


def _need_chromium() -> None:
    from cnnbench.tools.ui import CHROMIUM

    if not os.access(CHROMIUM, os.X_OK):
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI runs this test")


def test_the_ui_lists_the_study_runs(server, tmp_path):
    _need_chromium()
    from cnnbench.tools.ui import find_runs

    url, _ = server
    found = find_runs(url, "lr", NAMES, screenshot=tmp_path / "runs.png")
    assert found == NAMES
    assert (tmp_path / "runs.png").stat().st_size > 20_000


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_ui_screenshot_saves_the_comparison_view(server, tmp_path, capsys, monkeypatch):
    """`cnnbench ui-screenshot` as `make ui-screenshot` runs it (a server of its own over
    the sqlite store), and the same view straight from the running server."""
    _need_chromium()
    from cnnbench.track.reader import NoRuns
    from cnnbench.cli import main
    from cnnbench.tools.ui import screenshot

    url, root = server
    monkeypatch.chdir(tmp_path)  # the screenshot's own server keeps its artifacts here
    local, charts = tmp_path / "local.png", tmp_path / "charts.png"
    assert main(["ui-screenshot", "--study", "lr", "--out", str(local), "--charts", str(charts), "--tracking-uri",
                 f"sqlite:///{root / 'mlflow.db'}"]) == 0
    printed = capsys.readouterr().out
    assert f"{local}: the MLflow comparison view of study lr" in printed and f"{charts}: the chart view" in printed
    [remote] = screenshot("lr", tmp_path / "http.png", tracking_uri=url)
    for png in (local, remote, charts):
        width, height = _png_size(png)
        assert width == 1500 and height >= 1000 and png.stat().st_size > 40_000, png
    with pytest.raises(NoRuns, match="no MLflow experiment 'nosuch'"):
        screenshot("nosuch", tmp_path / "x.png", tracking_uri=url)
    assert not (tmp_path / "x.png").exists()
