"""Tables and figures of a study, beside the numbers its document reported.

`summary.csv` has one row per trial; `table.md` aggregates the seeds of each scientific
value (mean ± std, n), picks the best nuisance setting per scientific value (the
tuning playbook's isolation), and puts the document's figures and the difference beside
ours; `stats.csv` holds the statistics of `cnnbench.report.stats` (intervals, verdicts against the
best value and the document); the figures are seaborn line plots with a band over seeds
(the 95% interval of the mean for accuracy). Every file is written
to a temporary name and renamed, so a crash leaves the previous version intact.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cnnbench.config.spec import StudySpec  # noqa: E402
from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import dataset_info
from cnnbench.models.summary import model_cost
from cnnbench.report import stats  # noqa: E402
from cnnbench.track.schema import EPOCH, TEST_ACC, TEST_LOSS, TRAIN_EPOCH_LOSS, VAL_ACC  # noqa: E402
from cnnbench.train.result import DIVERGED, TrialResult  # noqa: E402
from cnnbench.util import fileio
from cnnbench.util.text import fmt


@dataclass
class TrialRow:
    """One trial of a study: its config, its (possibly epoch-truncated) result, its run."""
    index: int
    config: TrialConfig
    result: TrialResult
    run_id: str


def truncate(result: TrialResult, epochs: int, n_train: int) -> TrialResult:
    """The first `epochs` epochs of a longer run at a schedule that does not depend on the
    epoch count: the same numbers a run of `epochs` epochs would have produced."""
    history = [r for r in result.history if r[EPOCH] <= epochs]
    curve = [p for p in result.curve if p[0] <= epochs * n_train]
    status = result.status
    if status == DIVERGED and len(result.history) >= epochs and all(
            all(math.isfinite(v) for v in r.values()) for r in history):
        status = "finished"  # it diverged later than this shorter run would have stopped
    frac = len(history) / max(len(result.history), 1)
    out = TrialResult(config=result.config.replace(epochs=epochs), status=status, reason=result.reason,
                      history=history, curve=curve, train_seconds=result.train_seconds * frac,
                      wall_seconds=result.wall_seconds * frac, images=int(result.images * frac),
                      device=result.device, fused_with=result.fused_with)
    out.best_epoch = out.best(_select(out))[1]
    return out


def _select(result: TrialResult) -> str:
    return VAL_ACC if any(VAL_ACC in r for r in result.history) else TEST_ACC


def _epoch_columns(spec: StudySpec) -> list[int]:
    """Extra per-epoch accuracy columns that the document reports (e.g. epoch 9)."""
    found = set()
    for row in spec.reported:
        for key in row:
            m = re.fullmatch(r"epoch(\d+)_test_acc", str(key))
            if m and int(m.group(1)) != 1:
                found.add(int(m.group(1)))
    return sorted(found)


def summary_frame(spec: StudySpec, rows: Sequence[TrialRow]) -> pd.DataFrame:
    records = []
    extra = _epoch_columns(spec)
    for row in rows:
        r, c = row.result, row.config
        best, best_epoch = r.best(TEST_ACC)
        rec: dict[str, Any] = {"study": spec.name, "trial": row.index}
        rec.update({k: getattr(c, k) for k in spec.varied})
        rec.update({
            "seed": c.seed, "status": r.status, "diverged": r.status == DIVERGED, "epochs": c.epochs,
            "epoch1_test_acc": r.metric(TEST_ACC, 1), "final_test_acc": r.metric(TEST_ACC)
            if len(r.history) == c.epochs else math.nan,
            "best_test_acc": best, "best_epoch": best_epoch if best_epoch is not None else pd.NA,
        })
        for e in extra:
            rec[f"epoch{e}_test_acc"] = r.metric(TEST_ACC, e)
        if any(VAL_ACC in h for h in r.history):
            rec["best_val_acc"], rec["best_val_epoch"] = r.best(VAL_ACC)
        if "model" in spec.varied:  # architectures side by side: their size and cost
            cost = _model_cost(c)
            rec.update({"params": cost["params"], "macs_per_image": cost["macs"]})
        rec.update({"train_seconds": round(r.train_seconds, 3), "images_per_second": round(r.images_per_second, 1),
                    "fused_with": r.fused_with, "device": r.device, "mlflow_run_id": row.run_id,
                    "trial_key": c.key(), "reason": r.reason})
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _model_cost(config: TrialConfig) -> dict[str, int]:

    info = dataset_info(config.dataset)
    return model_cost(config.model, (info.channels, info.size, info.size), num_classes=info.classes)


def _fmt(values: pd.Series, digits: int = 2) -> str:
    """One value, or mean ± sample std over seeds."""
    v = values.dropna()
    if v.empty:
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:,.{digits}f}"
    return f"{v.mean():,.{digits}f} ± {v.std(ddof=1):,.{digits}f}"


def _fmt_ci(values: pd.Series, digits: int = 2) -> str:
    """Mean ± std with the 95% interval of the mean beside it: `98.63 ± 0.26 [97.98, 99.28]`;
    one value: `98.63 [n=1]` (no interval can be given)."""
    v = values.dropna()
    if v.empty:
        return "–"
    low, high = stats.mean_interval(v)
    if len(v) == 1:
        return f"{v.iloc[0]:,.{digits}f} [n=1]"
    return f"{_fmt(v, digits)} [{low:,.{digits}f}, {high:,.{digits}f}]"


def metric_columns(spec: StudySpec, frame: pd.DataFrame) -> list[str]:
    """The accuracies the statistics cover: epoch 1, the document's other epochs, final, best."""
    keys = ["epoch1_test_acc", *[f"epoch{e}_test_acc" for e in _epoch_columns(spec)], "final_test_acc",
            "best_test_acc"]
    return [k for k in keys if k in frame]


def headline(frame: pd.DataFrame) -> str:
    """The accuracy the table's verdict is about: the final one, else the best epoch's
    (trials that all stopped early)."""
    return "final_test_acc" if "final_test_acc" in frame and frame["final_test_acc"].notna().any() else "best_test_acc"


def paired_seeds(spec: StudySpec) -> bool:
    """Whether a seed gives the same initial weights and data order across the study's
    values: in cnnbench it does whenever the architecture is the same (the data order is
    a permutation seeded by (seed, epoch); the weights are drawn in the same order)."""
    return "model" not in spec.varied


def statistics(spec: StudySpec, frame: pd.DataFrame) -> pd.DataFrame:
    """`results/<study>/stats.csv`: `stats.study_stats` of the trials (after isolation),
    one row per value and accuracy, with the document's figures where it gives any."""
    frame = isolate(spec, frame)
    sci, by = list(spec.scientific), list(spec.scientific) + list(spec.nuisance)
    docs = {tuple(fmt(r.get(k)) for k in sci): r for r in spec.reported}
    reported = {}
    for key in frame.drop_duplicates(by)[by].itertuples(index=False, name=None):
        doc = docs.get(tuple(fmt(v) for v in key[:len(sci)]), {})
        reported[key] = {k: float(v) for k, v in doc.items() if k.endswith("_test_acc")}
    out = stats.study_stats(frame, by, metric_columns(spec, frame), paired_seeds=paired_seeds(spec),
                            reported=reported)
    out.insert(0, "study", spec.name)
    return out


def isolate(spec: StudySpec, frame: pd.DataFrame) -> pd.DataFrame:
    """Per scientific value, keep the nuisance setting with the best mean score (the
    tuning playbook's isolation); without nuisance hyperparameters, every row."""
    if not spec.nuisance or frame.empty:
        return frame
    score = "best_val_acc" if "best_val_acc" in frame else "best_test_acc"
    sci, nui = list(spec.scientific), list(spec.nuisance)
    means = frame.groupby(sci + nui, dropna=False)[score].mean().reset_index()
    best = means.loc[means.groupby(sci, dropna=False)[score].idxmax()]
    keep = frame.merge(best[sci + nui], on=sci + nui)
    return keep


def _num(value: float, digits: int = 2, sign: str = "") -> str:
    return "–" if value != value else f"{value:{sign},.{digits}f}"


def _p(value: float) -> str:
    return "–" if value != value else ("< 0.001" if value < 0.001 else f"{value:.3f}")


@dataclass
class _Layout:
    """What every row of a study's table shares: its keys, columns and statistics."""

    sci: list[str]
    nui: list[str]
    doc_keys: list[str]  # our accuracy columns: epoch 1, the document's other epochs, final
    labels: dict[str, str]  # doc key -> "epoch 1", "final", ...
    have_doc: list[str]  # the doc keys the document gives figures for
    main: str  # the headline metric the verdicts are about
    costs: bool  # params, MACs, time and speed columns
    rows_of: dict[tuple[str, tuple[str, ...]], dict[str, Any]]  # (metric, value key) -> its statistics
    reported: dict[tuple[str, ...], dict[str, Any]]  # scientific value key -> the document's figures

    @property
    def main_label(self) -> str:
        return self.labels.get(self.main, "best")


def table_markdown(spec: StudySpec, frame: pd.DataFrame, *, command: str = "", device: str = "",
                   table_stats: pd.DataFrame | None = None) -> str:
    """The study's table: per value, ours (mean ± std [95% CI]) beside the document's
    figures, the difference to the best value with its verdict, and each document figure
    against our prediction interval. `table_stats`: `statistics(spec, frame)` if already
    computed."""
    frame = isolate(spec, frame)
    table_stats = statistics(spec, frame) if table_stats is None else table_stats
    layout = _layout(spec, frame, table_stats)
    head = _table_head(layout)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tests: set[str] = set()
    for values, group in frame.groupby(layout.sci + layout.nui, sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        lines.append("| " + " | ".join(_row_cells(layout, values, group, tests)) + " |")
    last_epoch = int(frame["epochs"].max()) if not frame.empty else 0
    out = _table_preamble(spec, layout, tests, last_epoch) + lines + [""]
    if command or device:
        out += [f"Produced by `{command}`" + (f" on {device}" if device else "") + ".", ""]
    return "\n".join(out)


def _layout(spec: StudySpec, frame: pd.DataFrame, table_stats: pd.DataFrame) -> _Layout:
    sci, nui = list(spec.scientific), list(spec.nuisance)
    extra = _epoch_columns(spec)
    doc_keys = ["epoch1_test_acc", *[f"epoch{e}_test_acc" for e in extra], "final_test_acc"]
    labels = {"epoch1_test_acc": "epoch 1", "final_test_acc": "final", **{f"epoch{e}_test_acc": f"epoch {e}" for e in extra}}
    return _Layout(
        sci=sci, nui=nui, doc_keys=doc_keys, labels=labels,
        have_doc=[k for k in doc_keys if any(k in r for r in spec.reported)],
        main=headline(frame) if not frame.empty else "final_test_acc", costs="params" in frame,
        rows_of={(r["metric"], tuple(fmt(r[k]) for k in sci + nui)): r for r in table_stats.to_dict("records")},
        reported={tuple(fmt(r.get(k)) for k in sci): r for r in spec.reported})


def _table_head(t: _Layout) -> list[str]:
    head = t.sci + t.nui + ["n"] + [f"ours {t.labels[k]}" for k in t.doc_keys] + ["best (epoch)"]
    if t.costs:
        head += ["params", "MACs / image", "train s", "images/s"]
    head += [f"Δ {t.main_label} vs best [95% CI]", "p (Holm)", "verdict", "seeds for 80% power"]
    if t.have_doc:
        head += [f"doc {t.labels[k]}" for k in t.have_doc] + [f"Δ {t.labels[k]}" for k in t.have_doc]
        head += [f"doc {t.labels[k]} vs our 95% PI" for k in t.have_doc]
    return head


def _row_cells(t: _Layout, values: tuple, group: pd.DataFrame, tests: set[str]) -> list[str]:
    """One value's row (its trials `group`); the test its verdict used is added to `tests`."""
    key = tuple(fmt(v) for v in values)
    cells = _ours_cells(t, values, group)
    if t.costs:
        cells += [f"{int(group['params'].iloc[0]):,}", f"{int(group['macs_per_image'].iloc[0]):,}",
                  _fmt(group["train_seconds"], 1), _fmt(group["images_per_second"], 0)]
    cells += _verdict_cells(t.rows_of.get((t.main, key), {}), tests)
    if t.have_doc:
        cells += _doc_cells(t, key, group)
    return cells


def _ours_cells(t: _Layout, values: tuple, group: pd.DataFrame) -> list[str]:
    """The value, n, our accuracy per doc key and the best epoch; diverged and failed trials
    counted in the final cell."""
    n = len(group)
    div = int(group["diverged"].sum())
    cells = [fmt(v) for v in values] + [str(n)]
    for k in t.doc_keys:
        cells.append(_fmt_ci(group[k]) if k in group else "–")
    best_epochs = group["best_epoch"].dropna().astype(int).tolist()
    cells.append(f"{_fmt(group['best_test_acc'])} ({', '.join(map(str, best_epochs)) or '–'})")
    failed = int((~group["status"].isin(["finished", DIVERGED])).sum())
    final = len(values) + 1 + len(t.doc_keys)  # the "ours final" cell
    for count, word in ((div, "diverged"), (failed, "failed")):
        if count:
            cells[final] = f"{word} ({count}/{n})" if cells[final] == "–" else f"{cells[final]}, {word} ({count}/{n})"
    return cells


def _verdict_cells(row: dict[str, Any], tests: set[str]) -> list[str]:
    """Δ vs best [CI], p (Holm), the verdict and the seeds for 80% power, from the row's statistics."""
    verdict = row.get("verdict", stats.UNTESTED)
    if verdict in (stats.BEST, ""):
        cells = ["–", "–"]
    else:
        diff = _num(row.get("diff", math.nan), sign="+")
        ci = (f" [{_num(row['diff_ci_low'], sign='+')}, {_num(row['diff_ci_high'], sign='+')}]"
              if row.get("diff_ci_low") == row.get("diff_ci_low") else "")
        cells = [diff + ci, _p(row.get("p_holm", math.nan))]
        if row.get("test"):
            tests.add(row["test"])
    return cells + [f"**{verdict}**" if verdict == stats.BEST else verdict,
                    _num(row.get("seeds_needed", math.nan), 0) if verdict == stats.WITHIN else "–"]


def _doc_cells(t: _Layout, key: tuple[str, ...], group: pd.DataFrame) -> list[str]:
    """The document's figures, ours minus them, and each against our prediction interval."""
    doc = t.reported.get(key[:len(t.sci)], {})
    cells = [f"{doc[k]:.2f}" if k in doc else "–" for k in t.have_doc]
    for k in t.have_doc:
        ours = group[k].dropna() if k in group else pd.Series(dtype=float)
        cells.append(f"{ours.mean() - doc[k]:+.2f}" if k in doc and not ours.empty else "–")
    for k in t.have_doc:
        r = t.rows_of.get((k, key), {})
        word = r.get("doc_verdict", "") if k in doc else ""
        if word in (stats.CONSISTENT, stats.OUTSIDE):
            word += f" [{r['pi_low']:.2f}, {r['pi_high']:.2f}]"
        cells.append(word or "–")
    return cells


def _table_preamble(spec: StudySpec, t: _Layout, tests: set[str], last_epoch: int) -> list[str]:
    """The title, source and the paragraph that says what the columns are and which test ran."""
    fixed = ", ".join(f"{k}={fmt(v)}" for k, v in spec.fixed.items())
    seeds = ", ".join(map(str, spec.seeds))
    out = [f"# {spec.title}", ""]
    if spec.source:
        out += [f"Source: {spec.source}.", ""]
    if stats.PAIRED in tests:
        how = (f"the paired t test over the seeds both values ran (a seed gives the same initial weights and data "
               f"order for every value here)" + (", Welch's t where they ran different seeds" if stats.WELCH in tests
                                                 else ""))
    else:
        how = "Welch's t test" + ("" if paired_seeds(spec) else " (the architecture varies, so seeds are not paired)")
    main_label = t.main_label
    nuisance = f"; nuisance: {', '.join(t.nui)} (best setting per value shown)" if t.nui else ""
    out += [f"Scientific: {', '.join(t.sci)}{nuisance}; fixed: {fixed or '(defaults)'}; seeds: {seeds} (n per row).", "",
            f"Test accuracy in percent after epoch 1 and after the last epoch ({last_epoch}): mean ± std over seeds "
            "[the 95% Student-t interval of the mean; none when n = 1]. "
            f"Δ {main_label} vs best: this value's {main_label} accuracy minus the best value's, with its 95% interval, "
            f"from {how}; p Holm-corrected over the values compared; verdict `best`, `within noise of best` "
            f"(p ≥ {stats.ALPHA:g}), `worse` (p < {stats.ALPHA:g}, or a seed diverged) or `untested` (n < 2); "
            f"seeds for 80% power: seeds per value that would separate the observed difference from seed noise "
            f"(not shown where the verdict is settled). `stats.csv` has the same for every accuracy."
            + (" `doc` is the document's figure (one run), Δ = ours − doc, and the figure is judged against our 95% "
               "prediction interval for a single run, mean ± t·s·√(1 + 1/n): `consistent` inside it, `outside` not."
               if t.have_doc else ""), ""]
    return out


# -- figures ---------------------------------------------------------------------------------


def _label(keys: Sequence[str], config: TrialConfig) -> str:
    return " ".join(f"{k}={fmt(getattr(config, k))}" for k in keys) or config.model


def curves_frame(spec: StudySpec, rows: Sequence[TrialRow], n_train: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long frames of the first epoch's loss and of test accuracy per epoch, one line per
    varied value (epochs left out when several epoch counts read one run)."""
    shared = len({r.run_id for r in rows}) < len(rows)
    keys = [k for k in spec.varied if not (k == "epochs" and shared)]
    seen, unique = set(), []
    for row in rows:  # one row per distinct run
        if row.run_id not in seen or not row.run_id:
            seen.add(row.run_id)
            unique.append(row)
    loss, acc = [], []
    for row in unique:
        label = _label(keys, row.config)
        for samples, value in row.result.curve:
            if samples <= n_train:
                loss.append({"value": label, "seed": row.config.seed, "samples": samples, "loss": value})
        for rec in row.result.history:
            if TEST_ACC in rec:
                acc.append({"value": label, "seed": row.config.seed, "epoch": rec[EPOCH], "test_acc": rec[TEST_ACC]})
    return pd.DataFrame(loss), pd.DataFrame(acc)


def draw_loss(ax, loss: pd.DataFrame) -> None:
    """The first epoch's training loss against samples seen; columns value, samples, loss
    (several seeds of a value draw its mean and a ±1 sd band)."""
    if not loss.empty:
        sns.lineplot(loss, x="samples", y="loss", hue="value", errorbar="sd", ax=ax, linewidth=1.2)
    ax.set(title="First epoch: training loss", xlabel="training samples seen", ylabel="cross-entropy")


def draw_accuracy(ax, acc: pd.DataFrame, *, zoom: bool = False) -> None:
    """Test accuracy per epoch, one line per value, its band the 95% Student-t interval of
    the mean over seeds (`stats.mean_interval`; none where n = 1); columns value,
    epoch, test_acc. `zoom` narrows the y axis to the top of the curves (and drops the legend)."""
    if not acc.empty:
        sns.lineplot(acc, x="epoch", y="test_acc", hue="value", errorbar=stats.mean_interval, marker="o", ax=ax,
                     legend=not zoom)
        if zoom:
            top = acc.groupby("value", observed=True)["test_acc"].max()
            ax.set_ylim(max(0.0, min(top.min(), top.max() - 3) - 1), min(100.0, top.max() + 0.5))
    ax.set(title="... the same, zoomed on the top" if zoom else "Test accuracy per epoch", xlabel="epoch",
           ylabel="test accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers


def theme() -> None:
    """The look of every cnnbench figure (results/ and the notebooks)."""
    sns.set_theme(style="whitegrid", context="notebook")


def save_figures(spec: StudySpec, rows: Sequence[TrialRow], out_dir: Path, n_train: int) -> list[Path]:
    loss, acc = curves_frame(spec, rows, n_train)
    theme()
    fig = Figure(figsize=(18, 4.8))  # no pyplot: no backend chosen, none switched
    axes = fig.subplots(1, 3)
    draw_loss(axes[0], loss)
    draw_accuracy(axes[1], acc)
    draw_accuracy(axes[2], acc, zoom=True)
    n = len(spec.seeds)
    fig.suptitle(f"{spec.title} (n={n} seed{'s' if n > 1 else ''} per line" + (", band: 95% CI of the mean; loss: ±1 sd)" if n > 1 else ")"))
    fig.tight_layout()
    path = out_dir / "curves.png"
    fileio.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return [path]


def write_results(spec: StudySpec, rows: Sequence[TrialRow], out_dir: Path, *, n_train: int,
                  command: str = "", device: str = "") -> list[Path]:
    """summary.csv, table.md and curves.png under `out_dir`, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = summary_frame(spec, rows)
    csv_path = out_dir / "summary.csv"
    fileio.write_text(csv_path, frame.to_csv(index=False))
    md_path, stats_path = write_tables(spec, frame, out_dir, command=command, device=device)
    return [csv_path, md_path, stats_path, *save_figures(spec, rows, out_dir, n_train)]


def write_tables(spec: StudySpec, frame: pd.DataFrame, out_dir: Path, *, command: str = "",
                 device: str = "") -> tuple[Path, Path]:
    """table.md and stats.csv from a summary frame (as `summary.csv` holds it), atomically:
    what `cnnbench study` writes, and how a committed folder is brought up to date."""
    table_stats = statistics(spec, frame)
    md_path, stats_path = out_dir / "table.md", out_dir / "stats.csv"
    text = table_markdown(spec, frame, command=command, device=device, table_stats=table_stats)
    fileio.write_text(stats_path, table_stats.to_csv(index=False))
    fileio.write_text(md_path, text)
    return md_path, stats_path


def history_text(result: TrialResult) -> str:
    """One trial's epochs as a small table, and its outcome: what `cnnbench run` prints."""
    lines = [f"{'epoch':>5} {'train loss':>10} {'test loss':>9} {'test acc':>8}"]
    for r in result.history:
        lines.append(f"{r[EPOCH]:>5} {r[TRAIN_EPOCH_LOSS]:>10.4f} {r.get(TEST_LOSS, float('nan')):>9.4f} "
                     f"{r.get(TEST_ACC, float('nan')):>7.2f}%")
    lines.append(f"status {result.status}{': ' + result.reason if result.reason else ''}; {result.train_seconds:.1f} s "
                 f"training, {result.images_per_second:,.0f} images/s on {result.device}")
    return "\n".join(lines)
