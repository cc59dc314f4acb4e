"""Is the difference real? The statistics of every study result, in one pure module.

Numbers and pandas frames in, frames out; everything comes from `scipy.stats` (no
hand-written tables). What it answers, for accuracies in percent over seeds:

- per value (`describe`): mean, sample std, n and the 95% Student-t interval of the
  mean; with n < 2 the interval is undefined (NaN), never invented;
- against the best value (`study_stats`): the difference with its 95% interval (Welch's
  t, or the paired t over seeds when every value ran the same seeds and a seed fixes
  the initial weights and the data order), Holm-corrected p-values over the values
  compared, and a verdict `best`, `within noise of best`, `worse` (`untested` with n < 2);
- against a document's one-seed figure (`document_verdict`): the 95% prediction
  interval of a single run, mean ± t·s·sqrt(1 + 1/n), `consistent` or `outside`;
- seeds needed (`seeds_needed`): for a difference the test could not settle, the seeds
  per value that give 80% power for the observed difference and spread (noncentral t,
  `scipy.stats.nct`), at alpha 0.05 divided by the number of values compared (Holm's
  strictest step, so the count suffices whatever the comparison's rank);
- two executions of the same study (`compare_executions`): per trial config, the
  paired difference B − A over matched seeds, and whether B reproduces A within seed
  noise.

A diverged trial has no comparable accuracy: it is left out of n, counted in
`diverged`, and a value with one can be neither `best` nor `within noise of best`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as st

CONFIDENCE = 0.95  # two-sided level of every interval
ALPHA = 0.05  # significance level of every test (after Holm's correction)
POWER = 0.80  # the power `seeds_needed` asks for
MAX_SEEDS = 1000  # `seeds_needed` gives up above this many seeds per value (NaN)
DOC_ROUNDING = 0.005  # documents print accuracies to 2 decimals (percentage points)
EXACT = 1e-9  # differences below this (percentage points) are float noise: zero

BEST, WITHIN, WORSE, UNTESTED = "best", "within noise of best", "worse", "untested"
CONSISTENT, OUTSIDE = "consistent", "outside"
SAME, REPRODUCES, DIFFERS = "identical", "within seed noise", "differs"
PAIRED, WELCH = "paired t", "Welch t"


def _clean(values: Iterable[Any]) -> np.ndarray:
    """Finite floats only (NaN: a metric the trial never reached)."""
    arr = np.asarray(pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce"), dtype=float)
    return arr[np.isfinite(arr)]


def mean_interval(values: Iterable[Any], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Student-t interval of the mean: mean ± t(1 − (1 − c)/2, n − 1) · s / sqrt(n);
    (NaN, NaN) with fewer than two values."""
    x = _clean(values)
    if len(x) < 2:
        return math.nan, math.nan
    half = st.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def prediction_interval(values: Iterable[Any], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Where one more run (one seed) falls with probability `confidence`:
    mean ± t(1 − (1 − c)/2, n − 1) · s · sqrt(1 + 1/n); (NaN, NaN) with n < 2."""
    x = _clean(values)
    if len(x) < 2:
        return math.nan, math.nan
    half = st.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) * math.sqrt(1 + 1 / len(x))
    return float(x.mean() - half), float(x.mean() + half)


def describe(values: Iterable[Any], confidence: float = CONFIDENCE) -> dict[str, float]:
    """n, mean, std (ddof 1; NaN for n < 2) and the interval of the mean."""
    x = _clean(values)
    low, high = mean_interval(x, confidence)
    return {"n": len(x), "mean": float(x.mean()) if len(x) else math.nan,
            "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan, "ci_low": low, "ci_high": high}


def difference(x: Sequence[float], y: Sequence[float], *, paired: bool,
               confidence: float = CONFIDENCE) -> dict[str, Any]:
    """mean(x) − mean(y) with its interval and two-sided p-value: `scipy.stats.ttest_rel`
    when `paired` (x[i] and y[i] ran the same seed), else `ttest_ind(equal_var=False)`
    (Welch). With no spread at all the difference is exact: p = 0 when it is not zero,
    1 when it is. With n < 2 on either side: NaN interval and p."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    test = PAIRED if paired else WELCH
    if paired and len(x) != len(y):
        raise ValueError(f"paired samples of different lengths ({len(x)}, {len(y)})")
    diff = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    out = {"diff": diff, "diff_ci_low": math.nan, "diff_ci_high": math.nan, "p": math.nan, "test": test}
    if len(x) < 2 or len(y) < 2:
        return out
    spread = np.std(x - y) if paired else max(np.std(x), np.std(y))
    if spread < EXACT:  # accuracies are given to 0.01: anything smaller is float rounding
        exact = 0.0 if abs(diff) < EXACT else diff
        return {**out, "diff": exact, "diff_ci_low": exact, "diff_ci_high": exact, "p": 1.0 if exact == 0 else 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision note on near-equal samples
        res = st.ttest_rel(x, y) if paired else st.ttest_ind(x, y, equal_var=False)
        ci = res.confidence_interval(confidence)
    return {**out, "diff_ci_low": float(ci.low), "diff_ci_high": float(ci.high), "p": float(res.pvalue)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), NaNs left out of the family and
    kept as NaN: the k-th smallest of m p-values becomes max over j <= k of
    min(1, (m − j + 1) · p_(j))."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), math.nan)
    idx = [i for i in np.argsort(p, kind="stable") if not math.isnan(p[i])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def power(effect: float, n: int, *, paired: bool, alpha: float = ALPHA) -> float:
    """Power of the two-sided t test with n seeds per value for a standardised difference
    `effect` (difference / sd of the paired differences, or / the root mean square of
    the two values' sds for Welch, approximated by the equal-variance two-sample test)."""
    df = n - 1 if paired else 2 * n - 2
    if df < 1:
        return math.nan
    nc = effect * math.sqrt(n if paired else n / 2)
    crit = st.t.ppf(1 - alpha / 2, df)
    return float(st.nct.sf(crit, df, nc) + st.nct.cdf(-crit, df, nc))


def seeds_needed(x: Sequence[float], y: Sequence[float], *, paired: bool, alpha: float = ALPHA,
                 target: float = POWER) -> float:
    """The smallest number of seeds per value at which the observed difference of x and y,
    at their observed spread, is detected with power `target`; NaN when there is no
    difference, no spread estimate (n < 2), or more than MAX_SEEDS would be needed."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    diff = abs(x.mean() - y.mean())
    sd = np.std(x - y, ddof=1) if paired else math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
    if diff < EXACT or sd < EXACT:
        return math.nan
    for n in range(2, MAX_SEEDS + 1):
        if power(diff / sd, n, paired=paired, alpha=alpha) >= target:
            return float(n)
    return math.nan


def document_verdict(values: Iterable[Any], figure: float, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """A one-seed figure against our prediction interval of a single run: `consistent`
    when it lies inside (widened by the document's rounding), `outside` when not,
    `untested` when n < 2, "" when there is no figure (NaN)."""
    low, high = prediction_interval(values, confidence)
    if figure is None or (isinstance(figure, float) and math.isnan(figure)):
        verdict = ""  # the document gives no figure here
    elif math.isnan(low):
        verdict = UNTESTED
    else:
        verdict = CONSISTENT if low - DOC_ROUNDING <= figure <= high + DOC_ROUNDING else OUTSIDE
    return {"doc": figure, "pi_low": low, "pi_high": high, "doc_verdict": verdict}


# -- frames ------------------------------------------------------------------------------------


def _valid(group: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of a group with a number for `metric`, diverged trials left out."""
    ok = group[metric].notna()
    if "diverged" in group:
        ok &= ~group["diverged"].astype(str).str.lower().eq("true")
    return group[ok]


def _diverged(group: pd.DataFrame) -> int:
    return int(group["diverged"].astype(str).str.lower().eq("true").sum()) if "diverged" in group else 0


def study_stats(frame: pd.DataFrame, by: Sequence[str], metrics: Sequence[str], *, paired_seeds: bool,
                reported: dict[tuple, dict[str, float]] | None = None, seed: str = "seed") -> pd.DataFrame:
    """The tidy statistics of a study: one row per value (the columns `by`) and metric.

    `frame`: one row per trial with the `by` columns, `seed`, the metrics and optionally
    `diverged`. `paired_seeds`: a seed gives the same initial weights and data order
    whichever value it runs (cnnbench: the architecture is the same across values);
    the paired test is used where, besides, both values ran the same seeds.
    `reported`: the document's figures, {value tuple: {metric: figure}}.

    Columns: by..., metric, n, diverged, mean, std, ci_low, ci_high, best (the best
    value's label), diff (this − best), diff_ci_low, diff_ci_high, test, p, p_holm,
    verdict, seeds_needed, doc, pi_low, pi_high, doc_verdict.
    """
    by = list(by)
    reported = reported or {}
    out = []
    groups = [((k if isinstance(k, tuple) else (k,)), g) for k, g in frame.groupby(by, sort=False, dropna=False)]
    for metric in metrics:
        if metric not in frame:
            continue
        rows = _value_rows(groups, by, metric, reported)
        best = _best_value(rows)
        _against_best(rows, best, by, metric, seed, paired_seeds)
        family = [r[2] for r in rows if not math.isnan(r[2].get("p", math.nan))]
        for r, adjusted in zip(family, holm([r["p"] for r in family])):
            r["p_holm"] = adjusted
        _verdicts(rows, best, metric, seed, len(family))
        out.extend(r[2] for r in rows)
    columns = [*by, "metric", "n", "diverged", "mean", "std", "ci_low", "ci_high", "best", "diff", "diff_ci_low",
               "diff_ci_high", "test", "p", "p_holm", "verdict", "seeds_needed", "doc", "pi_low", "pi_high",
               "doc_verdict"]
    return pd.DataFrame.from_records(out, columns=columns)  # metric by metric, values in the frame's order


# (value key, its valid trials, its row of the statistics) per value, in the frame's order
_Rows = list[tuple[tuple, pd.DataFrame, dict[str, Any]]]


def _value_rows(groups: list[tuple[tuple, pd.DataFrame]], by: list[str], metric: str,
                reported: dict[tuple, dict[str, float]]) -> _Rows:
    """Each value's description of `metric` (diverged trials left out) and its document verdict."""
    rows = []
    for key, group in groups:
        valid = _valid(group, metric)
        row = {**dict(zip(by, key)), "metric": metric, **describe(valid[metric]), "diverged": _diverged(group)}
        row.update(document_verdict(valid[metric], reported.get(key, {}).get(metric, math.nan)))
        rows.append((key, valid, row))
    return rows


def _best_value(rows: _Rows) -> tuple | None:
    """The value with the highest mean, among those with no diverged trial if any has none."""
    candidates = [r for r in rows if r[2]["n"] > 0 and r[2]["diverged"] == 0] or [r for r in rows if r[2]["n"] > 0]
    return max(candidates, key=lambda r: r[2]["mean"]) if candidates else None


def _against_best(rows: _Rows, best: tuple | None, by: list[str], metric: str, seed: str,
                  paired_seeds: bool) -> None:
    """Each value's difference to the best one, with its interval and test (paired where
    the seeds pair up)."""
    for key, valid, row in rows:
        row.update({"best": label(by, best[0]) if best else "", "diff": math.nan, "diff_ci_low": math.nan,
                    "diff_ci_high": math.nan, "test": "", "p": math.nan, "seeds_needed": math.nan})
        if best is None or row["n"] == 0:
            continue
        if key == best[0]:
            row.update({"diff": 0.0, "verdict": BEST})
            continue
        x, y = valid.set_index(seed)[metric], best[1].set_index(seed)[metric]
        paired = paired_seeds and set(x.index) == set(y.index) and x.index.is_unique and y.index.is_unique
        if paired:
            y = y.loc[x.index]
        row.update(difference(x.to_numpy(), y.to_numpy(), paired=paired))
        if math.isnan(row["p"]):
            row["test"] = ""


def _verdicts(rows: _Rows, best: tuple | None, metric: str, seed: str, family: int) -> None:
    """Each value's verdict from its Holm p (a diverged seed is worse than any that finished),
    and for `within noise of best` the seeds that would settle it."""
    for key, valid, row in rows:
        row.setdefault("p_holm", math.nan)
        if "verdict" in row:
            continue
        if row["n"] == 0:
            row["verdict"] = UNTESTED
        elif row["diverged"] and best is not None and best[2]["diverged"] == 0:
            row["verdict"] = WORSE  # a seed that diverged is worse than any that finished
        elif math.isnan(row["p_holm"]):
            row["verdict"] = UNTESTED
        elif row["p_holm"] < ALPHA:
            row["verdict"] = WORSE
        else:
            row["verdict"] = WITHIN
            x, y = valid.set_index(seed)[metric], best[1].set_index(seed)[metric]
            paired = row["test"] == PAIRED
            # at the family's strictest Holm level, so that this many seeds settle it whatever its rank
            row["seeds_needed"] = seeds_needed(x.to_numpy(), (y.loc[x.index] if paired else y).to_numpy(),
                                               paired=paired, alpha=ALPHA / family)


def label(by: Sequence[str], key: Sequence[Any]) -> str:
    """`lr=0.01`, `batch_size=64 lr=0.1`: a value as the tables name it."""
    return " ".join(f"{k}={_show(v)}" for k, v in zip(by, key))


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def compare_executions(a: pd.DataFrame, b: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str], *,
                       seed: str = "seed") -> pd.DataFrame:
    """Two executions of one study matched trial by trial (the `keys` columns and `seed`):
    per config and metric, the paired difference B − A over the seeds both ran, its
    interval and Holm-corrected p-value (over the configs), and a verdict: `identical`
    (every pair equal), `within seed noise` (B reproduces A), `differs`, or `untested`
    (fewer than two pairs). A config where only one side diverged `differs`.

    Columns: keys..., metric, pairs, diverged_a, diverged_b, mean_a, mean_b, std_a (A's
    seed-to-seed spread, the noise scale), diff, diff_ci_low, diff_ci_high, p, p_holm,
    verdict.
    """
    keys = list(keys)
    cols = [*keys, seed]
    merged = a.merge(b, on=cols, suffixes=("_a", "_b"), how="inner")
    out = []
    for metric in metrics:
        if f"{metric}_a" not in merged:
            continue
        rows = []
        for key, group in merged.groupby(keys, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            div_a = group["diverged_a"].astype(str).str.lower().eq("true") if "diverged_a" in group else False
            div_b = group["diverged_b"].astype(str).str.lower().eq("true") if "diverged_b" in group else False
            ok = group[f"{metric}_a"].notna() & group[f"{metric}_b"].notna() & ~div_a & ~div_b
            pair = group[ok]
            xa, xb = pair[f"{metric}_a"].to_numpy(float), pair[f"{metric}_b"].to_numpy(float)
            row = {**dict(zip(keys, key)), "metric": metric, "pairs": len(pair),
                   "diverged_a": int(np.sum(div_a)), "diverged_b": int(np.sum(div_b)),
                   "mean_a": float(xa.mean()) if len(xa) else math.nan,
                   "mean_b": float(xb.mean()) if len(xb) else math.nan,
                   "std_a": float(xa.std(ddof=1)) if len(xa) > 1 else math.nan}
            row.update({k: v for k, v in difference(xb, xa, paired=True).items() if k != "test"})
            rows.append(row)
        family = [r for r in rows if not math.isnan(r["p"])]
        for r, adjusted in zip(family, holm([r["p"] for r in family])):
            r["p_holm"] = adjusted
        for r in rows:
            r.setdefault("p_holm", math.nan)
            if r["diverged_a"] != r["diverged_b"]:
                r["verdict"] = DIFFERS
            elif r["pairs"] and r["diff_ci_low"] == r["diff_ci_high"] == 0.0:
                r["verdict"] = SAME
            elif math.isnan(r["p_holm"]):
                r["verdict"] = UNTESTED
            else:
                r["verdict"] = DIFFERS if r["p_holm"] < ALPHA else REPRODUCES
        out.extend(rows)
    columns = [*keys, "metric", "pairs", "diverged_a", "diverged_b", "mean_a", "mean_b", "std_a", "diff",
               "diff_ci_low", "diff_ci_high", "p", "p_holm", "verdict"]
    return pd.DataFrame.from_records(out, columns=columns)


def per_epoch(frame: pd.DataFrame, by: Sequence[str], value: str, epoch: str = "epoch") -> pd.DataFrame:
    """Mean and 95% interval of `value` per group and epoch (the curves' bands):
    columns by..., epoch, n, mean, std, ci_low, ci_high."""
    records = []
    for key, group in frame.groupby([*by, epoch], sort=False, dropna=False, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        records.append({**dict(zip([*by, epoch], key)), **describe(group[value])})
    return pd.DataFrame.from_records(records, columns=[*by, epoch, "n", "mean", "std", "ci_low", "ci_high"])


__all__ = ["CONFIDENCE", "ALPHA", "POWER", "BEST", "WITHIN", "WORSE", "UNTESTED", "CONSISTENT", "OUTSIDE", "SAME",
           "REPRODUCES", "DIFFERS", "PAIRED", "WELCH", "mean_interval", "prediction_interval", "describe",
           "difference", "holm", "power", "seeds_needed", "document_verdict", "study_stats", "label",
           "compare_executions", "per_epoch"]
