"""`cnnbench.report.stats` on fixed inputs: every figure against scipy.stats (or the textbook
formula) computed here, and the verdict rules on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from cnnbench.report import stats

A = [98.61, 98.37, 98.91, 98.55]  # accuracies (%), four seeds
B = [98.52, 98.58, 98.49, 98.60]


def test_interval_of_the_mean_and_prediction_interval_are_student_t():
    x = np.array(A)
    n, mean, sem = len(x), x.mean(), st.sem(x)
    assert stats.mean_interval(x) == pytest.approx(st.t.interval(0.95, n - 1, loc=mean, scale=sem))
    s = x.std(ddof=1)
    assert stats.prediction_interval(x) == pytest.approx(
        st.t.interval(0.95, n - 1, loc=mean, scale=s * math.sqrt(1 + 1 / n)))
    d = stats.describe(x)
    assert d["n"] == 4 and d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(s)
    # the prediction interval of one run is wider than the mean's
    assert stats.prediction_interval(x)[1] - stats.prediction_interval(x)[0] > d["ci_high"] - d["ci_low"]


def test_n_below_two_gives_no_interval():
    for values in ([98.5], [], [98.5, math.nan]):
        assert all(math.isnan(v) for v in stats.mean_interval(values))
        assert all(math.isnan(v) for v in stats.prediction_interval(values))
    one = stats.describe([98.5])
    assert one["n"] == 1 and one["mean"] == 98.5 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    assert stats.document_verdict([98.5], 98.4)["doc_verdict"] == stats.UNTESTED
    assert math.isnan(stats.difference([98.5], B, paired=False)["p"])


def test_welch_difference_against_the_welch_satterthwaite_formula():
    x, y = np.array(A), np.array(B)
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
    half = st.t.ppf(0.975, df) * math.sqrt(vx + vy)
    got = stats.difference(x, y, paired=False)
    assert got["test"] == stats.WELCH
    assert got["diff"] == pytest.approx(x.mean() - y.mean())
    assert got["p"] == pytest.approx(2 * st.t.sf(abs(t), df))
    assert (got["diff_ci_low"], got["diff_ci_high"]) == pytest.approx((x.mean() - y.mean() - half,
                                                                        x.mean() - y.mean() + half))


def test_paired_difference_is_a_one_sample_t_on_the_differences():
    d = np.array(A) - np.array(B)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    half = st.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    got = stats.difference(A, B, paired=True)
    assert got["test"] == stats.PAIRED
    assert got["p"] == pytest.approx(2 * st.t.sf(abs(t), len(d) - 1))
    assert (got["diff_ci_low"], got["diff_ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    with pytest.raises(ValueError):
        stats.difference(A, B[:3], paired=True)


def test_zero_variance_is_exact():
    assert stats.difference([98.0] * 3, [97.0] * 3, paired=False)["p"] == 0.0
    same = stats.difference([98.0] * 3, [98.0] * 3, paired=True)
    assert same["p"] == 1.0 and same["diff"] == 0.0 and same["diff_ci_low"] == same["diff_ci_high"] == 0.0
    # paired: a constant shift has no spread in the differences, however spread the values are
    assert stats.difference([97.1, 98.2, 98.9], [97.0, 98.1, 98.8], paired=True)["p"] == 0.0


def _holm_by_definition(p):
    """Holm's adjusted p-value of each test, straight from the definition."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for rank, i in enumerate(order):
        out[i] = max(min(1.0, (m - r) * p[order[r]]) for r in range(rank + 1))
    return out


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.005], [0.5, 0.2], [0.001], [0.04, 0.04, 0.9]])
def test_holm_matches_its_definition(p):
    assert stats.holm(p) == pytest.approx(_holm_by_definition(p))


def test_holm_leaves_nan_out_of_the_family():
    got = stats.holm([0.01, math.nan, 0.04])
    assert math.isnan(got[1]) and got[0] == pytest.approx(0.02) and got[2] == pytest.approx(0.04)


@pytest.mark.parametrize("paired", [True, False])
def test_power_agrees_with_simulated_t_tests(paired):
    """The noncentral-t power against the rejection rate of simulated t tests."""
    rng = np.random.default_rng(0)
    n, effect, reps = 6, 1.3, 4000
    if paired:
        d = rng.normal(effect, 1.0, size=(reps, n))
        p = st.ttest_1samp(d, 0.0, axis=1).pvalue
    else:
        x, y = rng.normal(effect, 1.0, size=(reps, n)), rng.normal(0.0, 1.0, size=(reps, n))
        p = st.ttest_ind(x, y, axis=1).pvalue
    assert stats.power(effect, n, paired=paired) == pytest.approx((p < 0.05).mean(), abs=0.025)


@pytest.mark.parametrize("paired", [True, False])
def test_seeds_needed_is_the_smallest_n_with_80_percent_power(paired):
    x, y = np.array(A), np.array(B)
    n = stats.seeds_needed(x, y, paired=paired)
    sd = np.std(x - y, ddof=1) if paired else math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
    effect = abs(x.mean() - y.mean()) / sd

    def power(k):  # written out here: P(|T| > t_crit) for T ~ noncentral t
        df = k - 1 if paired else 2 * k - 2
        nc = effect * math.sqrt(k if paired else k / 2)
        crit = st.t.ppf(0.975, df)
        return 1 - st.nct.cdf(crit, df, nc) + st.nct.cdf(-crit, df, nc)

    assert n >= 2 and power(int(n)) >= 0.8 and (n == 2 or power(int(n) - 1) < 0.8)
    assert math.isnan(stats.seeds_needed([98.0, 98.2], [98.2, 98.0], paired=True))  # no difference to find
    assert math.isnan(stats.seeds_needed([98.0], [97.0], paired=False))  # no spread estimate


def test_document_verdict_uses_the_prediction_interval():
    x = np.array(A)
    low, high = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=x.std(ddof=1) * math.sqrt(1 + 1 / len(x)))
    inside, outside = (low + high) / 2, high + 0.1
    assert stats.document_verdict(x, inside)["doc_verdict"] == stats.CONSISTENT
    assert stats.document_verdict(x, outside)["doc_verdict"] == stats.OUTSIDE
    # outside the mean's interval but inside one run's: a one-seed figure is judged by the latter
    ci_high = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))[1]
    assert stats.document_verdict(x, (ci_high + high) / 2)["doc_verdict"] == stats.CONSISTENT
    assert stats.document_verdict([11.35] * 3, 11.35)["doc_verdict"] == stats.CONSISTENT  # zero spread, equal
    assert stats.document_verdict([11.35] * 3, 11.40)["doc_verdict"] == stats.OUTSIDE
    assert stats.document_verdict(x, math.nan)["doc_verdict"] == ""


def _trials(values: dict, seeds=None, diverged=()) -> pd.DataFrame:
    rows = []
    for value, accs in values.items():
        for i, acc in enumerate(accs):
            seed = (seeds or {}).get(value, range(len(accs)))[i]
            rows.append({"lr": value, "seed": seed, "final_test_acc": acc, "diverged": (value, seed) in diverged})
    return pd.DataFrame(rows)


def _verdicts(frame, **kw):
    out = stats.study_stats(frame, ["lr"], ["final_test_acc"], **{"paired_seeds": True, **kw})
    return out.set_index("lr")


def test_verdicts_a_clear_difference_and_none():
    clear = _verdicts(_trials({0.01: [98.6, 98.7, 98.5, 98.65], 0.1: [95.1, 95.3, 95.0, 95.2],
                               0.05: [98.62, 98.66, 98.55, 98.6]}))
    assert clear.loc[0.01, "verdict"] == stats.BEST and clear.loc[0.1, "verdict"] == stats.WORSE
    assert clear.loc[0.05, "verdict"] == stats.WITHIN and clear.loc[0.05, "seeds_needed"] >= 2
    assert (clear["best"] == "lr=0.01").all()
    # the Holm p-values are those of the paired tests against the best value, adjusted together
    raw = [st.ttest_rel([95.1, 95.3, 95.0, 95.2], [98.6, 98.7, 98.5, 98.65]).pvalue,
           st.ttest_rel([98.62, 98.66, 98.55, 98.6], [98.6, 98.7, 98.5, 98.65]).pvalue]
    assert [clear.loc[0.1, "p_holm"], clear.loc[0.05, "p_holm"]] == pytest.approx(_holm_by_definition(raw))
    assert (clear.loc[[0.1, 0.05], "test"] == stats.PAIRED).all()

    none = _verdicts(_trials({0.01: [98.1, 98.3, 98.2], 0.1: [98.3, 98.1, 98.2]}))
    assert sorted(none["verdict"]) == sorted([stats.BEST, stats.WITHIN])
    assert none["seeds_needed"].isna().all()  # no difference: no number of seeds finds one


def test_verdicts_n_1_zero_variance_and_unpaired_seeds():
    one = _verdicts(_trials({0.01: [98.6], 0.1: [95.0]}))
    assert one.loc[0.01, "verdict"] == stats.BEST and one.loc[0.1, "verdict"] == stats.UNTESTED
    assert one[["ci_low", "ci_high", "p", "p_holm"]].isna().all().all()

    flat = _verdicts(_trials({0.01: [98.0] * 3, 0.1: [97.0] * 3, 0.05: [98.0] * 3}))
    assert flat.loc[0.1, "verdict"] == stats.WORSE and flat.loc[0.1, "p"] == 0.0
    assert flat.loc[[0.01, 0.05], "verdict"].tolist() in ([stats.BEST, stats.WITHIN], [stats.WITHIN, stats.BEST])

    # different seeds, or an architecture that changes per value: Welch
    frame = _trials({0.01: [98.6, 98.7, 98.5], 0.1: [98.0, 98.4, 98.1]}, seeds={0.1: [3, 4, 5]})
    assert _verdicts(frame).loc[0.1, "test"] == stats.WELCH
    same_seeds = _trials({0.01: [98.6, 98.7, 98.5], 0.1: [98.0, 98.4, 98.1]})
    welch = _verdicts(same_seeds, paired_seeds=False).loc[0.1]
    assert welch["test"] == stats.WELCH
    assert welch["p"] == pytest.approx(st.ttest_ind([98.0, 98.4, 98.1], [98.6, 98.7, 98.5], equal_var=False).pvalue)


def test_a_diverged_trial_is_left_out_and_its_value_is_worse():
    frame = _trials({0.01: [98.6, 98.5, 98.55], 0.5: [98.9, 98.95, math.nan]}, diverged=[(0.5, 2)])
    got = _verdicts(frame)
    assert got.loc[0.5, "n"] == 2 and got.loc[0.5, "diverged"] == 1
    assert got.loc[0.5, "mean"] == pytest.approx(98.925)  # higher than lr 0.01's, but one seed diverged
    assert got.loc[0.01, "verdict"] == stats.BEST and got.loc[0.5, "verdict"] == stats.WORSE


def test_study_stats_gives_every_metric_its_own_best_and_documents():
    frame = _trials({0.01: [98.6, 98.5, 98.55], 0.1: [98.0, 98.4, 98.1]})
    frame["epoch1_test_acc"] = frame["final_test_acc"] - 5 + 10 * (frame["lr"] == 0.1)
    out = stats.study_stats(frame, ["lr"], ["epoch1_test_acc", "final_test_acc"], paired_seeds=True,
                            reported={(0.1,): {"final_test_acc": 99.5}})
    assert out["metric"].tolist() == ["epoch1_test_acc"] * 2 + ["final_test_acc"] * 2
    best = out[out["verdict"] == stats.BEST].set_index("metric")["lr"]
    assert best.to_dict() == {"epoch1_test_acc": 0.1, "final_test_acc": 0.01}
    doc = out[(out["metric"] == "final_test_acc") & (out["lr"] == 0.1)].iloc[0]
    x = np.array([98.0, 98.4, 98.1])
    assert (doc["pi_low"], doc["pi_high"]) == pytest.approx(
        st.t.interval(0.95, 2, loc=x.mean(), scale=x.std(ddof=1) * math.sqrt(4 / 3)))
    assert doc["doc_verdict"] == (stats.CONSISTENT if doc["pi_low"] <= 99.5 <= doc["pi_high"] else stats.OUTSIDE)


def test_compare_executions_verdicts():
    a = _trials({0.01: [98.6, 98.5, 98.55, 98.7], 0.1: [97.0, 97.4, 97.1, 97.3], 0.05: [98.2, 98.4, 98.3, 98.1],
                 0.5: [90.0, 91.0, 92.0, 93.0]})
    b = a.copy()
    b.loc[b["lr"] == 0.1, "final_test_acc"] += [0.05, -0.04, 0.02, -0.01]  # rounding-level noise
    b.loc[b["lr"] == 0.05, "final_test_acc"] += [1.0, 1.1, 0.9, 1.05]  # a real shift
    b.loc[(b["lr"] == 0.5) & (b["seed"] == 3), ["final_test_acc", "diverged"]] = [math.nan, True]
    got = stats.compare_executions(a, b, ["lr"], ["final_test_acc"]).set_index("lr")
    assert got.loc[0.01, "verdict"] == stats.SAME
    assert got.loc[0.1, "verdict"] == stats.REPRODUCES
    assert got.loc[0.05, "verdict"] == stats.DIFFERS
    assert got.loc[0.5, "verdict"] == stats.DIFFERS and got.loc[0.5, "diverged_b"] == 1 and got.loc[0.5, "pairs"] == 3
    shift = np.array([1.0, 1.1, 0.9, 1.05])
    res = st.ttest_rel(np.array([98.2, 98.4, 98.3, 98.1]) + shift, [98.2, 98.4, 98.3, 98.1])
    assert got.loc[0.05, "diff"] == pytest.approx(shift.mean())
    assert (got.loc[0.05, "diff_ci_low"], got.loc[0.05, "diff_ci_high"]) == pytest.approx(tuple(res.confidence_interval()))
    assert got.loc[0.05, "std_a"] == pytest.approx(np.std([98.2, 98.4, 98.3, 98.1], ddof=1))


def test_the_figures_draw_the_student_t_interval(tmp_path):
    """The isolation plot's error bars and the per-epoch bands are the 95% t interval of the
    mean, computed here with scipy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnnbench.config.spec import StudySpec
    from cnnbench.report.figures import isolation
    from cnnbench.report.tables import draw_accuracy

    spec = StudySpec(name="t", path="t.yaml", title="t", source="", description="", scientific={"lr": (0.01, 0.1)},
                     nuisance={}, fixed={}, seeds=(0, 1, 2), reported=())
    acc = {0.01: [98.1, 98.6, 98.3], 0.1: [97.2, 97.9, 97.4]}
    trials = pd.DataFrame([{"lr": lr, "seed": s, "best_test_acc": a, "final_test_acc": a}
                           for lr, values in acc.items() for s, a in enumerate(values)])

    def t_interval(x):
        x = np.asarray(x)
        return st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))

    fig = isolation(trials, spec)
    segments = [seg for c in fig.axes[0].collections if hasattr(c, "get_segments") for seg in c.get_segments()]
    drawn = sorted((float(seg[0][0]), *sorted((float(seg[0][1]), float(seg[-1][1])))) for seg in segments)
    want = sorted((lr, *t_interval(v)) for lr, v in acc.items())
    assert len(drawn) == len(want)
    for got, expected in zip(drawn, want):
        assert list(got) == pytest.approx([float(v) for v in expected])
    plt.close(fig)

    epochs = pd.DataFrame([{"value": f"lr={lr:g}", "seed": s, "epoch": e, "test_acc": a - (2 - e)}
                           for lr, values in acc.items() for s, a in enumerate(values) for e in (1, 2)])
    fig, ax = plt.subplots()
    draw_accuracy(ax, epochs)
    bands = [p for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")
             for p in c.get_paths()]
    assert len(bands) == 2
    ys = sorted(round(float(y), 6) for p in bands for y in p.vertices[:, 1])
    for (value, epoch), group in epochs.groupby(["value", "epoch"]):
        low, high = t_interval(group["test_acc"])
        assert round(low, 6) in ys and round(high, 6) in ys, (value, epoch)
    plt.close(fig)
