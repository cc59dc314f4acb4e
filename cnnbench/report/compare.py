"""`cnnbench compare A B`: does a second execution of a study reproduce the first?

Two executions of the same study (fp32 against bf16, CPU against GPU, two torch
versions, two commits) are read from their `summary.csv` (a `results/<study>/` folder,
committed results included, or an MLflow study run, whose `results/summary.csv`
artifact is the same file), matched trial by trial on the study's varied settings and
the seed, and compared per trial config with `stats.compare_executions`: the paired
difference B − A over the seeds both ran, its 95% interval, a Holm-corrected p-value,
and whether B reproduces A within seed noise. `write_compare` writes
`<out>/compare-<name>/compare.md` and `compare.csv`; `cnnbench compare` calls it.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from cnnbench.errors import ConfigError
from cnnbench.report import stats
from cnnbench.track.stores import quiet_mlflow
from cnnbench.track.writer import check_reachable
from cnnbench.track.writer import tracking_uri as resolve
from cnnbench.util import fileio

RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # an MLflow run id
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name we are willing to create
METRICS = ("epoch1_test_acc", "final_test_acc", "best_test_acc")
LABELS = {"epoch1_test_acc": "epoch 1", "final_test_acc": "final", "best_test_acc": "best epoch"}


@dataclass
class Execution:
    """One execution of a study: its trials (summary.csv's rows) and where they came from."""
    study: str
    trials: pd.DataFrame
    source: str  # the folder or the MLflow run, as the user named it
    label: str  # how the tables name it (A's and B's labels)
    path: Path | None  # the results folder, None for an MLflow run

    @property
    def keys(self) -> list[str]:
        """The study's varied settings: summary.csv's columns between `trial` and `seed`."""
        cols = list(self.trials.columns)
        return cols[cols.index("trial") + 1:cols.index("seed")]


def load_execution(source: str | Path, *, label: str | None = None, tracking_uri: str | None = None) -> Execution:
    """A results folder holding `summary.csv`, or an MLflow study run id (its
    `results/summary.csv` artifact). Raises ConfigError naming `source` when it is neither."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        csv = path / "summary.csv"
        if not csv.is_file():
            raise ConfigError(f"{path}: no summary.csv here; name a results/<study>/ folder written by cnnbench study")
        return _execution(csv, text, label or path.name, path)
    if RUN_ID.match(text):
        return _from_run(text, label, tracking_uri)
    raise ConfigError(f"{text}: no such results folder (nor an MLflow run id)")


def _execution(csv: Path, source: str, label: str, path: Path | None) -> Execution:
    try:
        trials = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(f"{csv}: not a summary.csv ({' '.join(str(err).split())[:120]})") from None
    need = {"study", "trial", "seed", *METRICS}
    missing = sorted(need - set(trials.columns))
    if missing or trials.empty or list(trials.columns).index("trial") > list(trials.columns).index("seed"):
        raise ConfigError(f"{csv}: not a cnnbench summary.csv (missing {', '.join(missing) or 'trial rows'})")
    studies = sorted(set(trials["study"].astype(str)))
    if len(studies) != 1:
        raise ConfigError(f"{csv}: holds several studies ({', '.join(studies)})")
    return Execution(studies[0], trials, source, label, path)


def _from_run(run_id: str, label: str | None, tracking_uri: str | None) -> Execution:

    quiet_mlflow()
    uri = resolve(tracking_uri)
    check_reachable(uri)
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise ConfigError(f"{run_id}: no such MLflow run in {uri}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            csv = Path(client.download_artifacts(run_id, "results/summary.csv", tmp))
        except Exception:
            raise ConfigError(f"{run_id}: this MLflow run has no results/summary.csv artifact "
                              "(name a study run, the parent of its trials)") from None
        return _execution(csv, run_id, label or run_id[:8], None)


def compare(a: Execution, b: Execution) -> pd.DataFrame:
    """Trial by trial, B against A (`stats.compare_executions`), with `study` first.
    Raises ConfigError when they are not two executions of one study."""
    if a.study != b.study:
        raise ConfigError(f"{a.source} is study {a.study!r}, {b.source} is study {b.study!r}: "
                          "compare two executions of the same study")
    if a.keys != b.keys:
        raise ConfigError(f"{a.source} varies {', '.join(a.keys)}, {b.source} varies {', '.join(b.keys)}: "
                          "not the same study design")
    matched = a.trials[a.keys + ["seed"]].merge(b.trials[b.keys + ["seed"]])
    if matched.empty:
        raise ConfigError(f"{a.source} and {b.source} have no trial in common (same {', '.join(a.keys)} and seed)")
    metrics = [m for m in _metrics(a.trials) if m in b.trials]
    out = stats.compare_executions(a.trials, b.trials, a.keys, metrics)
    out.insert(0, "study", a.study)
    return out


def _metrics(trials: pd.DataFrame) -> list[str]:
    extra = sorted((c for c in trials if re.fullmatch(r"epoch(\d+)_test_acc", c) and c != "epoch1_test_acc"),
                   key=lambda c: int(re.findall(r"\d+", c)[0]))
    return ["epoch1_test_acc", *extra, "final_test_acc", "best_test_acc"]


def default_name(a: Execution, b: Execution) -> str:
    """`<A>-<B>` from the labels, or from the folder names; where both folders have the same
    name (results/lr against other/results/lr), the study and the first folders above that differ."""
    if a.label != b.label:
        name = f"{a.label}-{b.label}" if a.label.startswith(a.study) else f"{a.study}-{a.label}-{b.label}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    pa, pb = (a.path or Path(a.source)).resolve(), (b.path or Path(b.source)).resolve()
    for x, y in zip(reversed(pa.parts), reversed(pb.parts)):
        if x != y:
            return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{a.study}-{x}-{y}")
    return f"{a.study}-{a.label}-again"


def _num(value: float, sign: str = "") -> str:
    return "–" if value != value else f"{value:{sign}.2f}"


def _p(value: float) -> str:
    return "–" if value != value else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def training_work(trials: pd.DataFrame) -> tuple[float, float]:
    """(model-images, seconds) of an execution's training: every trial's images, and the
    training time with a fused group's counted once (each trial its share, train_seconds /
    fused_with), so that executions that fused their trials differently compare; nan
    without the columns."""
    if not {"images_per_second", "train_seconds"} <= set(trials):
        return math.nan, math.nan
    t = trials.dropna(subset=["images_per_second", "train_seconds"])
    shared = t["fused_with"].fillna(1).clip(lower=1) if "fused_with" in t else 1
    return float((t["images_per_second"] * t["train_seconds"]).sum()), float((t["train_seconds"] / shared).sum())


def training_rate(trials: pd.DataFrame) -> float:
    """Model-images per second of training (`training_work`)."""
    images, seconds = training_work(trials)
    return images / seconds if seconds > 0 else math.nan


def _speed(e: Execution) -> str:
    t = e.trials
    images, seconds = training_work(t)
    rate = images / seconds if seconds > 0 else math.nan
    device = ", ".join(sorted(set(t["device"].dropna().astype(str)))) if "device" in t else "?"
    return (f"{len(t)} trials on {device or '?'}" + (f", {rate:,.0f} model-images/s of training" if rate == rate else "")
            + (f", {seconds:,.0f} s of training in all (a fused group's once)" if seconds == seconds else ""))


def compare_markdown(a: Execution, b: Execution, table: pd.DataFrame, command: str = "") -> str:
    """compare.md: what was compared, a verdict count per accuracy, one table per accuracy."""
    keys = a.keys
    seeds = sorted(set(a.trials["seed"]) & set(b.trials["seed"]))
    only_a = len(a.trials.merge(b.trials[keys + ["seed"]], how="left", indicator=True).query("_merge == 'left_only'"))
    only_b = len(b.trials.merge(a.trials[keys + ["seed"]], how="left", indicator=True).query("_merge == 'left_only'"))
    out = [f"# Does {b.label} reproduce {a.label}? Study `{a.study}`", "",
           f"- A = **{a.label}**: `{a.source}` ({_speed(a)})",
           f"- B = **{b.label}**: `{b.source}` ({_speed(b)})",
           f"- matched on {', '.join(keys)} and seed (seeds {', '.join(map(str, seeds))}); "
           f"{only_a} trial(s) only in A, {only_b} only in B, left out", ""]
    ratio = training_rate(b.trials) / training_rate(a.trials)
    if ratio == ratio:
        out += [f"Speed: B trains at {ratio:.2f}x A's model-images per second of training (every trial's images "
                "over the training time, a fused group's counted once; the same machine only if both ran on it "
                "under the same load).", ""]
    out += ["Per trial config, B − A in test accuracy (percentage points) over the seeds both ran: the mean "
            "paired difference with its 95% interval (paired t test: the same seed starts from the same weights "
            "and data order in both), p Holm-corrected over the configs; `identical`: every pair equal; "
            "`within seed noise`: p ≥ 0.05, B reproduces A as far as these seeds can tell (compare the interval "
            "with A's seed-to-seed std); `differs`: p < 0.05 or only one side diverged; `untested`: fewer than "
            "two pairs.", ""]
    for metric in table["metric"].unique():
        rows = table[table["metric"] == metric]
        name = LABELS.get(metric, metric.replace("_test_acc", "").replace("epoch", "epoch "))
        counts = rows["verdict"].value_counts()
        summary = ", ".join(f"{counts[v]} {v}" for v in (stats.SAME, stats.REPRODUCES, stats.DIFFERS, stats.UNTESTED)
                            if v in counts)
        out += [f"## {name} test accuracy: {summary}", "",
                "| " + " | ".join(keys) + f" | pairs | A ({a.label}) | B ({b.label}) | A's seed std | "
                "B − A [95% CI] | p (Holm) | verdict |",
                "|" + "---|" * (len(keys) + 7)]
        for r in rows.to_dict("records"):
            ci = f" [{_num(r['diff_ci_low'], '+')}, {_num(r['diff_ci_high'], '+')}]" if r["diff_ci_low"] == r["diff_ci_low"] else ""
            div = "".join(f", {r[f'diverged_{s}']} diverged in {s.upper()}" for s in "ab" if r[f"diverged_{s}"])
            out.append("| " + " | ".join(_show(r[k]) for k in keys) + f" | {r['pairs']} | {_num(r['mean_a'])} | "
                       f"{_num(r['mean_b'])} | {_num(r['std_a'])} | {_num(r['diff'], '+')}{ci} | {_p(r['p_holm'])} | "
                       f"{r['verdict']}{div} |")
        out.append("")
    if command:
        out += [f"Produced by `{command}`.", ""]
    return "\n".join(out)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) and not math.isnan(value) else str(value)


def write_compare(a: Execution, b: Execution, out_root: str | Path = "results", *, name: str | None = None,
                  command: str = "") -> tuple[Path, Path, pd.DataFrame]:
    """Compare B with A and write `<out_root>/compare-<name>/compare.md` and `compare.csv`
    (atomically, and only once everything is computed). Returns the two paths and the frame."""
    table = compare(a, b)
    name = name or default_name(a, b)
    if not NAME.match(name):
        raise ConfigError(f"--name: {name!r} is not a folder name (letters, digits, '.', '_', '-')")
    folder = Path(out_root) / (name if name.startswith("compare-") else f"compare-{name}")
    fileio.check_writable(folder)
    text = compare_markdown(a, b, table, command)
    md, csv = folder / "compare.md", folder / "compare.csv"
    fileio.write_text(csv, table.to_csv(index=False))
    fileio.write_text(md, text)
    return md, csv, table


__all__ = ["Execution", "load_execution", "compare", "compare_markdown", "default_name", "write_compare"]


def compare_command(a: str, b: str, *, labels: str | None = None, name: str | None = None, out: str = "results",
                    tracking_uri: str | None = None, command: str = "") -> tuple[Path, Path]:
    """`cnnbench compare A B`: `labels` as the command takes it ("fp32,bf16"); returns the
    markdown and CSV files written."""
    pair: list[str | None] = [None, None]
    if labels is not None:
        pair = [x.strip() for x in labels.split(",")]
        if len(pair) != 2 or not all(pair) or pair[0] == pair[1]:
            raise ConfigError(f"--labels: expected two different labels separated by a comma, got {labels!r}")
    first = load_execution(a, label=pair[0], tracking_uri=tracking_uri)
    second = load_execution(b, label=pair[1], tracking_uri=tracking_uri)
    md, csv, _ = write_compare(first, second, out, name=name, command=command)
    return md, csv
