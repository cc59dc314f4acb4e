"""`cnnbench report`: run the notebooks headless and export them as HTML in `results/`.

For every study folder in `results/` (it holds `summary.csv`) whose study has runs in
the tracking store, `notebooks/analysis.ipynb` runs through papermill with that study
and becomes `results/<study>/report.html`; every sweep folder (`trials.csv` or
`best.yaml`) whose Optuna storage is here gets `notebooks/sweep.ipynb` the same way; `notebooks/models.ipynb` runs
once into `results/models.html`; `results/index.html` links them all. Each HTML file is
written atomically, so a notebook that fails leaves the previous report in place.
The notebooks are the checkout's `notebooks/`, or an installed cnnbench's copy of them
(tools/resources.py); running them needs the report extra (`pip install 'cnnbench[report]'`).
"""

from __future__ import annotations

import contextlib
import html
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from cnnbench.errors import ConfigError
from cnnbench.tools import resources
from cnnbench.track.stores import quiet_mlflow
from cnnbench.track import reader
from cnnbench.track.writer import check_reachable
from cnnbench.track.writer import tracking_uri as resolve_uri
from cnnbench.util import fileio
from cnnbench.util.environ import variables
from cnnbench.util.extras import require

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding this cnnbench package
NOTEBOOK_DIR = resources.folder("notebooks")  # the checkout's notebooks/, else the installed copy
KERNEL = "python3"  # `make install` registers the venv's interpreter under this name
CELL_TIMEOUT = 600  # seconds one cell may run


@dataclass
class Job:
    notebook: str  # file name in notebooks/
    name: str  # the study or sweep
    kind: str  # study | sweep | models
    parameters: dict[str, Any]
    html: Path


@dataclass
class Outcome:
    written: list[Job] = field(default_factory=list)
    failed: list[tuple[Job, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line each: what and why
    index: Path | None = None


def check_kernel(name: str = KERNEL) -> None:
    """Fail early, with the fix, when Jupyter has no kernel of that name."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # the report extra: imported where used

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise ConfigError(f"no Jupyter kernel named {name!r}: run `make install` (it registers the virtual "
                          "environment's Python), or `python -m ipykernel install --sys-prefix --name python3`") from None


def check_results(results_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    """The folders of `results_dir` by name; a ConfigError if it or a named one is missing."""
    if not results_dir.is_dir():
        raise ConfigError(f"{results_dir}: no such folder; run a study first (cnnbench study studies/lr.yaml)")
    folders = {p.name: p for p in sorted(results_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    unknown = [n for n in names or [] if n not in folders and n != "models"]
    if unknown:
        raise ConfigError(f"{results_dir}/{unknown[0]}: no such study or sweep folder "
                          f"(there: {', '.join(folders) or 'none'})")
    return folders


def discover(results_dir: Path, *, names: list[str] | None = None,
             tracking_uri: str | None = None) -> tuple[list[Job], list[str]]:
    """The notebooks to run for `results_dir` (all its studies and sweeps, or `names`)."""
    folders = check_results(results_dir, names)
    common = {"tracking_uri": tracking_uri, "results_dir": str(results_dir.resolve())}
    jobs, skipped = [], []
    for name, folder in folders.items():
        if names and name not in names:
            continue
        if _is_sweep(folder):
            try:
                reader.load_sweep(name)
            except reader.NoRuns as err:
                skipped.append(f"{name}: {err}")
                continue
            jobs.append(Job("sweep.ipynb", name, "sweep", {"sweep": name, **common}, folder / "report.html"))
        elif (folder / "summary.csv").is_file():
            try:
                reader.trial_runs(name, tracking_uri)
            except reader.NoRuns as err:
                skipped.append(f"{name}: {err}")
                continue
            jobs.append(Job("analysis.ipynb", name, "study", {"study": name, **common}, folder / "report.html"))
    if not names or "models" in names:
        jobs.append(Job("models.ipynb", "models", "models", {"study": "models", **common}, results_dir / "models.html"))
    return jobs, skipped


def _is_sweep(folder: Path) -> bool:
    """A sweep's results folder (`cnnbench sweep` writes trials.csv and best.yaml there)."""
    return (folder / "trials.csv").is_file() or (folder / "best.yaml").is_file()


@contextlib.contextmanager
def _kernel_imports_this_checkout() -> Iterator[None]:
    """The kernel is a fresh process: make it import this cnnbench, not another install."""
    before = os.environ.get("PYTHONPATH")
    with variables({"PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), *([before] if before else [])])}):
        yield


def execute(notebook: Path, parameters: dict[str, Any], *, cwd: Path, timeout: int = CELL_TIMEOUT):
    """Run `notebook` with papermill (parameters injected after the `parameters` cell) and
    return the executed notebook. Raises papermill's PapermillExecutionError on a failing cell."""
    import nbformat  # the report extra: imported where used
    import papermill  # the report extra: imported where used

    with tempfile.TemporaryDirectory() as tmp, _kernel_imports_this_checkout():
        out = Path(tmp) / notebook.name
        papermill.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name=KERNEL,
                                   cwd=str(cwd), progress_bar=False, log_output=False, execution_timeout=timeout)
        return nbformat.read(out, as_version=4)


def to_html(executed, title: str) -> str:
    """The executed notebook as one HTML page: text, tables and figures, without the code."""
    from nbconvert import HTMLExporter  # the report extra: imported where used

    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(executed, resources={"metadata": {"name": title}})
    return body


def build_reports(results_dir: Path, *, names: list[str] | None = None, tracking_uri: str | None = None,
                  timeout: int = CELL_TIMEOUT, progress: bool = True) -> Outcome:
    """Run every notebook `discover` finds and write its HTML; then `results/index.html`."""
    require("report", what="cnnbench report")
    check_results(results_dir, names)  # bad input first, before the slow imports

    quiet_mlflow()
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    check_kernel()
    fileio.check_writable(results_dir)
    jobs, skipped = discover(results_dir, names=names, tracking_uri=uri)
    outcome = Outcome(skipped=skipped)
    from papermill.exceptions import PapermillExecutionError  # the report extra: imported where used

    bar = tqdm(jobs, desc="report", unit="notebook", disable=not progress, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(f"{job.notebook} {job.name}")
        try:
            executed = execute(resources.path("notebooks", job.notebook), job.parameters, cwd=Path.cwd(), timeout=timeout)
        except PapermillExecutionError as err:
            outcome.failed.append((job, f"cell {err.exec_count}: {err.ename}: {' '.join(str(err.evalue).split())[:300]}"))
            continue
        fileio.write_text(job.html, to_html(executed, f"{job.name}: {job.kind} report"))
        outcome.written.append(job)
    bar.close()
    outcome.index = write_index(results_dir)
    return outcome


def write_index(results_dir: Path) -> Path:
    """`results/index.html`: a link to every report, with what each folder holds."""
    rows = []
    for page in sorted(results_dir.glob("*/report.html")) + sorted(results_dir.glob("models.html")):
        folder = page.parent if page.name == "report.html" else None
        name = folder.name if folder else "models"
        kind = ("sweep" if _is_sweep(folder) else "study") if folder else "architectures"
        extra = [f'<a href="{html.escape(str(p.relative_to(results_dir)))}">{html.escape(p.name)}</a>'
                 for p in sorted(folder.iterdir()) if folder and p.is_file() and p.name != "report.html"
                 and not p.name.startswith(".")] if folder else []
        rows.append(f'<tr><td><a href="{html.escape(str(page.relative_to(results_dir)))}">{html.escape(name)}</a></td>'
                    f"<td>{kind}</td><td>{' · '.join(extra)}</td></tr>")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    shots = {"mlflow-compare.png": "the comparison view", "mlflow-charts.png": "the chart view of train/loss"}
    image = "".join(f'<p>The MLflow UI, {what} (<code>make ui-screenshot</code>):</p><img src="{name}" width="900">'
                    for name, what in shots.items() if (results_dir / name).is_file())
    page = (f"<!doctype html><meta charset=utf-8><title>cnnbench results</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td{{padding:.3em 1em}}</style>"
            f"<h1>cnnbench results</h1><p>Reports written {stamp} by <code>cnnbench report</code>.</p>"
            f"<table><tr><th>report</th><th>kind</th><th>files</th></tr>{''.join(rows)}</table>{image}\n")
    path = results_dir / "index.html"
    fileio.write_text(path, page)
    return path
