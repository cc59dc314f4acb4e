"""The MLflow UI driven from code: a tracking server on loopback, and headless Chromium.

`mlflow_server` starts `mlflow server` on 127.0.0.1 and a free port and stops it on
exit; `find_runs` opens a study's experiment in the UI the way a person would (expand
the study run, read the trial names); `screenshot_compare` saves the comparison view
of a study's trials side by side as a PNG (`make ui-screenshot`). The browser is
Debian's `chromium` (CHROMIUM, or $CNNBENCH_CHROMIUM) driven by Playwright: no browser
is downloaded. Playwright comes with the ui extra (`pip install 'cnnbench[ui]'`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from mlflow import MlflowClient

from cnnbench.errors import ConfigError
from cnnbench.track.reader import NoRuns, trial_runs
from cnnbench.track.schema import (
    METRIC_FINAL_TEST_ACC,
    METRIC_TRAIN_LOSS,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    PARAM_SEED,
    PREFIX_SCIENTIFIC,
)
from cnnbench.track.stores import quiet_mlflow
from cnnbench.track.writer import check_reachable
from cnnbench.track.writer import tracking_uri as resolve_uri
from cnnbench.util import fileio
from cnnbench.util.extras import require

CHROMIUM = os.environ.get("CNNBENCH_CHROMIUM", "/usr/bin/chromium")
# no network chatter of its own: the only server it talks to is MLflow on loopback
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# MLflow 3's UI opens on its GenAI views; this query switches it to training runs
ML_VIEW = "workflowType=machine_learning"


class UIError(RuntimeError):
    """The server or the browser cannot be started, or the UI does not show what it should."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, *, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Until `url`/health answers OK (the server needs ~15 s on a busy CPU)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UIError(f"mlflow server exited with status {proc.returncode} before it answered")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise UIError(f"mlflow server at {url} did not answer /health within {timeout:.0f} s")


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts: str | os.PathLike, *, port: int | None = None,
                  log: str | os.PathLike | None = None, timeout: float = 120.0) -> Iterator[str]:
    """Run `mlflow server` on loopback for the `with` block; yield its URL.

    Artifacts of new experiments go through the server (`--serve-artifacts`, the default)
    into `artifacts`. One worker: this is a test and screenshot server, not a team's.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", str(Path(artifacts).resolve()), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    log_file = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, timeout=timeout, proc=proc)
        yield url
    finally:
        _stop(proc)
        if log:
            log_file.close()


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it forked (its own process group, by its id)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def check_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        raise UIError(f"{CHROMIUM}: no Chromium; install Debian's (apt-get install chromium) or set CNNBENCH_CHROMIUM")


@contextlib.contextmanager
def browser_page(width: int = 1600, height: int = 1000) -> Iterator[object]:
    """A page of a fresh headless Chromium (a new profile each time, removed after)."""
    from playwright.sync_api import sync_playwright  # the ui extra: imported where used

    check_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def _experiment_id(url: str, study: str) -> str:

    exp = MlflowClient(url).get_experiment_by_name(study)
    if exp is None:
        raise UIError(f"{url} has no experiment {study!r}")
    return exp.experiment_id


def _expand_study_runs(page, names: list[str]) -> None:
    """Open the study runs (listed by `names`) in the runs table so that their trials show."""
    for name in names:
        row = page.locator("[role=row]", has_text=name).first
        row.wait_for()
        row.locator("button[data-component-id$='runnamecellrenderer.tsx_46']").click()  # the +/- beside the name


def find_runs(url: str, study: str, names: list[str], *, screenshot: str | os.PathLike | None = None) -> list[str]:
    """Open the study's experiment in the UI, expand its study runs, and return which of
    `names` (trial run names, `lr=0.01 seed=0`) it shows. UIError if the first never shows."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # the ui extra: imported where used

    client = MlflowClient(url)
    parents = sorted(set(trial_runs(study, url)[f"tags.{MLFLOW_PARENT_RUN_ID}"].dropna()))
    with browser_page() as page:
        page.goto(f"{url}/#/experiments/{_experiment_id(url, study)}/runs?{ML_VIEW}")
        try:
            _expand_study_runs(page, [client.get_run(p).info.run_name for p in parents])
            page.get_by_text(names[0], exact=True).first.wait_for()
        except PlaywrightTimeout:
            raise UIError(f"the MLflow UI at {url} shows no run named {names[0]!r}") from None
        if screenshot:
            page.screenshot(path=str(screenshot))
        return [n for n in names if page.get_by_text(n, exact=True).count()]


def compare_url(url: str, study: str) -> tuple[str, list[str]]:
    """The comparison view of the study's trials (seed 0 of each value, in the spec's
    order) and their run names."""

    runs = trial_runs(study, url)
    sci = [f"params.{k}" for k in runs.attrs["scientific"] + runs.attrs["nuisance"] if f"params.{k}" in runs]
    seed = runs[f"params.{PARAM_SEED}"].astype(int)
    runs = runs[seed == seed.min()]
    order = runs[sci].apply(lambda col: col.astype(float) if _numeric(col) else col)
    runs = runs.assign(**{f"_k{i}": order[c] for i, c in enumerate(sci)})
    runs = runs.sort_values([f"_k{i}" for i in range(len(sci))]).head(12)
    ids, exp_id = list(runs["run_id"]), _experiment_id(url, study)
    return (f"{url}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp_id])}&{ML_VIEW}",
            list(runs[f"tags.{MLFLOW_RUN_NAME}"]))


def _numeric(col) -> bool:
    try:
        col.astype(float)
        return True
    except (TypeError, ValueError):
        return False


def screenshot_compare(url: str, study: str, out: str | os.PathLike, *, metric: str = METRIC_FINAL_TEST_ACC) -> Path:
    """Save the comparison view of the study's trials: a parallel-coordinates plot of the
    scientific hyperparameters against `metric`, then the runs side by side (the params
    that differ, every metric)."""

    target, names = compare_url(url, study)
    with browser_page(width=1500, height=1900) as page:
        _open_runs(page, url, study)
        page.goto(target)
        page.get_by_text(names[0], exact=True).first.wait_for()
        _pick_metric(page, metric)
        page.get_by_text("Show diff only", exact=True).first.click()  # parameters: only what differs
        time.sleep(2)  # the plot's transition
        bottom = page.get_by_text("Artifacts", exact=True).first.bounding_box()
        clip = {"x": 0, "y": 0, "width": 1500, "height": bottom["y"] - 10 if bottom else 1900}
        fileio.write_with(Path(out), lambda tmp: page.screenshot(path=str(tmp), type="png", clip=clip))
    return Path(out)


def screenshot_charts(url: str, study: str, out: str | os.PathLike, *, metric: str = METRIC_TRAIN_LOSS) -> Path:
    """Save the chart view of the study's runs grouped by its first scientific
    hyperparameter (a line per value: the mean over seeds), `metric` full screen."""

    runs = trial_runs(study, url)
    group = f"{PREFIX_SCIENTIFIC}{runs.attrs['scientific'][0]}"
    with browser_page(width=1500, height=1000) as page:
        _open_runs(page, url, study)
        page.get_by_text("Group by", exact=True).first.click()
        page.get_by_placeholder("Search").last.fill(group)
        page.get_by_text(group, exact=True).first.click()  # the tag (params come after tags)
        page.keyboard.press("Escape")
        page.locator("label:has(input[value='CHART'])").first.click()  # table | chart | artifacts
        page.get_by_placeholder("Search metric charts").fill(metric)
        full = page.locator("button[data-component-id='fullscreen_button_chartcard']")
        deadline = time.monotonic() + 30
        while full.count() != 1:  # until the search leaves the metric's chart alone
            if time.monotonic() > deadline:
                raise UIError(f"the chart view of {study} shows {full.count()} charts for {metric!r}, not one")
            time.sleep(0.25)
        full.click()
        page.get_by_role("dialog").get_by_text(metric, exact=True).first.wait_for()
        time.sleep(3)  # the plot's transition
        fileio.write_with(Path(out), lambda tmp: page.screenshot(path=str(tmp), type="png"))
    return Path(out)


def _open_runs(page, url: str, study: str) -> None:
    """The experiment's runs table in the training layout, the assistant panel closed."""
    page.goto(f"{url}/#/experiments/{_experiment_id(url, study)}/runs?{ML_VIEW}")
    page.get_by_text("Model training", exact=True).first.click()
    close = page.get_by_role("button", name="Close")  # the assistant panel, open on a first visit
    if close.count():
        close.first.click()


def _pick_metric(page, metric: str) -> None:
    """The parallel-coordinates plot starts on the first metric logged (train/loss): show
    `metric` instead."""
    select = page.get_by_text("Metrics:", exact=True).first.locator("xpath=following-sibling::div[1]")
    chosen = select.locator(".du-bois-light-select-selection-item")
    for i in reversed(range(chosen.count())):
        chosen.nth(i).locator(".du-bois-light-select-selection-item-remove").click()
    select.locator(".du-bois-light-select-selector").click()
    page.locator(f".du-bois-light-select-item-option[title='{metric}']").click()
    page.keyboard.press("Escape")


def screenshot(study: str, out: str | os.PathLike, *, tracking_uri: str | None = None,
               artifacts: str | os.PathLike = "mlartifacts", charts: str | os.PathLike | None = None) -> list[Path]:
    """`make ui-screenshot`: the comparison view of `study` (and, with `charts`, its chart
    view of train/loss), from the server at an http tracking URI or from a server started
    here on the local store."""
    require("ui", what="cnnbench ui-screenshot")

    uri = resolve_uri(tracking_uri)
    with contextlib.ExitStack() as stack:
        if uri.startswith(("http://", "https://")):
            url = uri.rstrip("/")
        else:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "server.log"
            url = stack.enter_context(mlflow_server(uri, artifacts, log=log))
        saved = [screenshot_compare(url, study, out)]
        if charts:
            saved.append(screenshot_charts(url, study, charts))
        return saved


def screenshot_study(study: str, out: str | os.PathLike, *, charts: str | os.PathLike | None = None,
                     tracking_uri: str | None = None) -> list[Path]:
    """`cnnbench ui-screenshot`: the tracking store checked first, then `screenshot`. A UI
    that cannot be shown, or a study without runs, is a one-line ConfigError."""
    require("ui", what="cnnbench ui-screenshot")  # before the store is opened (and maybe created)

    quiet_mlflow()
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    try:
        return screenshot(study, out, tracking_uri=uri, charts=charts)
    except (UIError, NoRuns) as err:
        raise ConfigError(" ".join(str(err).split())) from None
