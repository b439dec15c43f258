"""featx.metrics against hand-computed values and scipy/sklearn references: absent classes, CIs, McNemar, MDE, the
seed-free paired interval (never at odds with McNemar), Wilson intervals and Holm's correction."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm
from sklearn.metrics import f1_score, recall_score

from featx.errors import UsageError
from featx.metrics import (
    bootstrap_interval,
    classification_metrics,
    holm_adjust,
    mcnemar_exact_p,
    minimum_detectable_difference,
    paired_comparison,
    paired_difference_interval,
    wilson_interval,
)

# ---------------------------------------------------------------------------------------------- classification_metrics


def test_hand_computed_metrics_on_a_small_case() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(y_true, y_pred, 3)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls: 2/3, 1/2, 1/1 -> mean 13/18
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["mean_per_class_accuracy"] == pytest.approx(m["macro_recall"])
    # precisions: 2/2, 1/2, 1/2; F1 = 2PR/(P+R): 0.8, 0.5, 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_absent_classes_are_left_out_of_the_macro_averages() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.choice([0, 2, 4], size=200)  # classes 1, 3 and 5 never occur in the test set
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 6, size=200))  # some predictions into 1, 3, 5
    assert set(np.unique(y_pred)) >= {1, 3, 5}
    m = classification_metrics(y_true, y_pred, 6)
    present = [0, 2, 4]
    assert m["macro_recall"] == pytest.approx(recall_score(y_true, y_pred, labels=present, average="macro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro"))
    assert m["mean_per_class_accuracy"] == pytest.approx(m["macro_recall"])
    # the sklearn default (union of true and predicted labels) would average in three zero-F1 classes
    assert m["macro_f1"] > f1_score(y_true, y_pred, average="macro") + 0.1
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (6, 6) and cm.sum() == 200 and cm[[1, 3, 5]].sum() == 0


def test_class_never_predicted_has_zero_recall_and_f1_without_warnings() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1])  # class 2 never predicted
    with np.errstate(all="raise"):
        m = classification_metrics(y_true, y_pred, 3)
    assert m["macro_recall"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))


def test_metrics_match_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        k = int(rng.integers(2, 8))
        y_true = rng.integers(0, k, size=150)
        y_pred = np.where(rng.random(150) < 0.6, y_true, rng.integers(0, k, size=150))
        m = classification_metrics(y_true, y_pred, k)
        present = np.unique(y_true)
        assert m["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
        assert m["macro_recall"] == pytest.approx(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
        assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def test_labels_out_of_range_or_mismatched_lengths_are_refused() -> None:
    with pytest.raises(UsageError, match=r"\[0, 3\)"):
        classification_metrics(np.array([0, 1, 3]), np.array([0, 1, 2]), 3)
    with pytest.raises(UsageError, match="prediction"):
        classification_metrics(np.array([0, 1, 2]), np.array([0, -1, 2]), 3)
    with pytest.raises(UsageError, match="3 true labels but 2"):
        classification_metrics(np.array([0, 1, 2]), np.array([0, 1]), 3)
    # integer-valued floats (e.g. labels read back from JSON) are fine
    assert classification_metrics(np.array([0.0, 1.0]), np.array([0.0, 0.0]), 2)["accuracy"] == 0.5


def test_empty_test_set_gives_nan_not_a_crash() -> None:
    m = classification_metrics(np.array([], dtype=int), np.array([], dtype=int), 2)
    assert m["n"] == 0 and math.isnan(m["accuracy"]) and math.isnan(m["macro_f1"])
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]


# ---------------------------------------------------------------------------------------------- bootstrap CI


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 400, 3200):
        correct = (rng.random(n) < 0.8).astype(float)
        m = classification_metrics(correct.astype(int), np.ones(n, dtype=int), 2)
        lo, hi = m["accuracy_ci95"]
        assert lo <= m["accuracy"] <= hi
        widths.append(hi - lo)
        # close to the normal-approximation width 2 * 1.96 * sqrt(p(1-p)/n)
        p = correct.mean()
        assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.25)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(8, rel=0.3)  # width ~ 1/sqrt(n)


def test_bootstrap_interval_is_seeded_and_degenerate_cases() -> None:
    v = np.array([1, 0, 1, 1, 0, 1, 1, 1], dtype=float)
    assert bootstrap_interval(v, seed=5) == bootstrap_interval(v, seed=5)
    assert bootstrap_interval(np.ones(10)) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([])))


# ---------------------------------------------------------------------------------------------- paired comparison


def _pair(n10: int, n01: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two prediction vectors with the given 2x2 agreement table (binary task)."""
    y = np.zeros(n10 + n01 + both + neither, dtype=int)
    a = np.concatenate([np.zeros(n10), np.ones(n01), np.zeros(both), np.ones(neither)]).astype(int)
    b = np.concatenate([np.ones(n10), np.zeros(n01), np.zeros(both), np.ones(neither)]).astype(int)
    return y, a, b


def test_paired_counts_difference_and_mcnemar_match_a_direct_binomial() -> None:
    y, a, b = _pair(n10=14, n01=4, both=70, neither=12)
    r = paired_comparison(y, a, b)
    assert (r["n"], r["n10"], r["n01"]) == (100, 14, 4)
    assert r["diff"] == pytest.approx(0.10)
    assert r["acc_a"] == pytest.approx(0.84) and r["acc_b"] == pytest.approx(0.74)
    # McNemar exact: two-sided binomial on the 18 discordant pairs, computed by hand from the pmf
    direct = min(1.0, 2 * binom.cdf(4, 18, 0.5))
    assert r["p_value"] == pytest.approx(direct)
    assert r["p_value"] == pytest.approx(binomtest(14, 18, 0.5).pvalue)
    assert r["p_value"] == pytest.approx(0.03088, abs=1e-4)
    # swapping a and b flips the sign and keeps the test
    s = paired_comparison(y, b, a)
    assert s["diff"] == pytest.approx(-0.10) and s["p_value"] == pytest.approx(r["p_value"])
    assert (s["n10"], s["n01"]) == (4, 14)
    assert s["ci"][0] == pytest.approx(-r["ci"][1], abs=0.02)


def test_paired_ci_contains_the_difference_and_is_narrower_than_unpaired() -> None:
    rng = np.random.default_rng(7)
    n = 400
    y = rng.integers(0, 5, size=n)
    hard = rng.random(n) < 0.3  # both classifiers fail mostly on the same hard images
    a = np.where(hard & (rng.random(n) < 0.9), (y + 1) % 5, y)
    b = np.where(hard & (rng.random(n) < 0.8), (y + 2) % 5, y)
    r = paired_comparison(y, a, b, n_boot=4000)
    lo, hi = r["ci"]
    assert lo <= r["diff"] <= hi
    ca = bootstrap_interval((a == y).astype(float), n=4000)
    cb = bootstrap_interval((b == y).astype(float), n=4000)
    unpaired = math.sqrt(((ca[1] - ca[0]) / 2) ** 2 + ((cb[1] - cb[0]) / 2) ** 2) * 2
    assert hi - lo < unpaired  # pairing removes the shared difficulty of the images


def test_paired_bootstrap_matches_brute_force_enumeration_of_all_resamples() -> None:
    # 6 images: per-image difference of correctness d = ok_a - ok_b
    y = np.array([0, 0, 0, 0, 0, 0])
    a = np.array([0, 0, 0, 1, 0, 1])  # correct on 0,1,2,4
    b = np.array([1, 0, 1, 0, 0, 1])  # correct on 1,3,4
    d = (a == y).astype(int) - (b == y).astype(int)  # [1, 0, 1, -1, 0, 0]
    n = len(d)
    # exact bootstrap distribution of the mean difference: all n**n ordered resamples, equally likely
    sums = np.array([d[list(idx)].sum() for idx in itertools.product(range(n), repeat=n)])
    values, counts = np.unique(sums, return_counts=True)
    cdf = np.cumsum(counts) / counts.sum()
    exact_lo = values[np.searchsorted(cdf, 0.025)] / n
    exact_hi = values[np.searchsorted(cdf, 0.975)] / n
    # neither quantile sits within 5 Monte-Carlo standard errors of a jump of the exact CDF
    assert not np.any(np.abs(cdf - 0.025) < 0.004) and not np.any(np.abs(cdf - 0.975) < 0.004)
    r = paired_comparison(y, a, b, n_boot=40_000, seed=1)
    assert r["diff"] == pytest.approx(1 / 6)
    assert r["ci_bootstrap"] == [pytest.approx(exact_lo), pytest.approx(exact_hi)]
    assert (r["n10"], r["n01"]) == (2, 1)


def test_identical_predictions_give_p_one_zero_diff_and_a_rule_of_three_mde() -> None:
    y = np.arange(50) % 3
    a = y.copy()
    a[:10] = (a[:10] + 1) % 3
    r = paired_comparison(y, a, a.copy())
    assert r["diff"] == 0 and r["p_value"] == 1.0
    # no discordant image in 50 does not prove the difference is 0: Tango's interval, +-z^2 / (n + z^2)
    z2 = norm.ppf(0.975) ** 2
    assert r["ci"] == [pytest.approx(-z2 / (50 + z2)), pytest.approx(z2 / (50 + z2))]
    assert (r["n10"], r["n01"]) == (0, 0)
    assert r["mde_basis"] in ("rule_of_three", "exact_floor")
    assert r["mde"] >= 6 / 50  # the exact test needs at least 6 discordant pairs to reject at 0.05


def test_mde_matches_the_normal_approximation_for_paired_proportions() -> None:
    n, p_d = 372, 0.12
    mde, basis = minimum_detectable_difference(n, p_d)
    assert basis == "normal"
    z_a, z_b = norm.ppf(0.975), norm.ppf(0.8)
    # the defining equation holds: delta*sqrt(n) = z_a*sqrt(p_d) + z_b*sqrt(p_d - delta^2)
    assert mde * math.sqrt(n) == pytest.approx(z_a * math.sqrt(p_d) + z_b * math.sqrt(p_d - mde**2))
    assert mde == pytest.approx((z_a + z_b) * math.sqrt(p_d / n), rel=0.03)  # the large-n shortcut
    # power check by simulation of the exact test: at delta = mde the rejection rate is ~0.8
    rng = np.random.default_rng(0)
    p10, p01 = (p_d + mde) / 2, (p_d - mde) / 2
    draws = rng.multinomial(n, [p10, p01, 1 - p_d], size=1500)
    rejected = np.mean([binomtest(int(k10), int(k10 + k01), 0.5).pvalue < 0.05 for k10, k01, _ in draws])
    assert 0.72 < rejected < 0.88
    # more images -> smaller detectable difference; more disagreement -> larger
    assert minimum_detectable_difference(4 * n, p_d)[0] < mde < minimum_detectable_difference(n, 2 * p_d)[0]


def test_paired_comparison_refuses_unpaired_inputs() -> None:
    with pytest.raises(UsageError, match="same test images"):
        paired_comparison(np.array([0, 1, 1]), np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(UsageError, match="no test images"):
        paired_comparison(np.array([]), np.array([]), np.array([]))


# ---------------------------------------------------------------------------------------------- seed-free intervals


def _tango_score(n10: int, n01: int, n: int, delta: float) -> float:
    """Tango's (1998) score statistic for H0: p10 - p01 = delta, written out from the paper (Fagerland et al. 2013)."""
    a, b = 2 * n, -n10 - n01 + (2 * n - n10 + n01) * delta
    c = -n01 * delta * (1 - delta)
    q = (math.sqrt(max(b * b - 4 * a * c, 0.0)) - b) / (2 * a)
    return (n10 - n01 - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))


def test_paired_interval_never_disagrees_with_mcnemar_and_holds_the_difference() -> None:
    for n in (40, 153):
        for n10 in range(0, 31):
            for n01 in range(0, 31):
                if n10 + n01 > n:
                    continue
                lo, hi = paired_difference_interval(n10, n01, n)
                p = mcnemar_exact_p(n10, n01)
                assert lo <= (n10 - n01) / n <= hi, (n10, n01, n)
                assert (p < 0.05) == (lo > 0 or hi < 0), (n10, n01, n, p, lo, hi)
                assert -1 <= lo <= hi <= 1


def test_paired_interval_holds_the_exact_conditional_and_tango_intervals() -> None:
    from scipy.stats import beta

    z = norm.ppf(0.975)
    for n10, n01, n in ((4, 12, 153), (14, 4, 100), (12, 0, 100), (25, 19, 360)):
        lo, hi = paired_difference_interval(n10, n01, n)
        m = n10 + n01
        pi_lo = beta.ppf(0.025, n10, m - n10 + 1) if n10 else 0.0
        pi_hi = beta.ppf(0.975, n10 + 1, m - n10) if n10 < m else 1.0
        cond = ((m / n) * (2 * pi_lo - 1), (m / n) * (2 * pi_hi - 1))
        # Tango's ends are where the score statistic reaches +-z; the joined interval reaches at least that far
        # (the end next to 0 may be the conditional one when McNemar's exact test rejects)
        assert _tango_score(n10, n01, n, hi) == pytest.approx(-z, abs=1e-6) or hi == pytest.approx(cond[1])
        assert lo <= cond[0] + 1e-12 and hi >= cond[1] - 1e-12
        assert _tango_score(n10, n01, n, lo) == pytest.approx(z, abs=1e-6) or lo == pytest.approx(cond[0])
    # every discordant image one way: the conditional interval would stop at the observed difference; Tango's does not
    lo, hi = paired_difference_interval(12, 0, 100)
    assert hi > 0.12 + 0.05 and lo == pytest.approx((12 / 100) * (2 * 0.025 ** (1 / 12) - 1))


def test_hymenoptera_interval_does_not_move_with_the_seed() -> None:
    """Issue 21: 4 vs 12 discordant images of 153 (McNemar p = 0.077) printed [−10.5, −0.7] with seed 0's bootstrap."""
    y, a, b = _pair(n10=4, n01=12, both=128, neither=9)
    printed = set()
    for seed in range(6):
        r = paired_comparison(y, a, b, n_boot=2000, seed=seed)
        printed.add(tuple(f"{100 * v:.1f}" for v in r["ci"]))
        assert r["ci_method"] == "exact-conditional+tango"
    assert len(printed) == 1  # the printed ends are the same under every seed
    lo, hi = r["ci"]
    assert r["p_value"] == pytest.approx(binomtest(4, 16, 0.5).pvalue) and r["p_value"] > 0.05
    assert lo < 0 < hi  # the test does not reject, so the interval reaches 0: they agree
    # the bootstrap's upper end, by contrast, moves with the seed around 0 (the coin flip of the issue)
    boot_hi = {round(paired_comparison(y, a, b, n_boot=2000, seed=s)["ci_bootstrap"][1], 4) for s in range(6)}
    assert len(boot_hi) > 1


def test_paired_interval_covers_at_the_nominal_level() -> None:
    rng = np.random.default_rng(0)
    for n, p10, p01 in ((153, 0.03, 0.08), (100, 0.1, 0.0), (360, 0.05, 0.03)):
        truth = p10 - p01
        draws = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=600)
        cache: dict[tuple[int, int], tuple[float, float]] = {}
        hits = 0
        for k10, k01, _ in draws:
            key = (int(k10), int(k01))
            if key not in cache:
                cache[key] = paired_difference_interval(*key, n)
            hits += cache[key][0] <= truth <= cache[key][1]
        assert hits / len(draws) >= 0.93, (n, p10, p01, hits / len(draws))


def test_wilson_interval_hand_values_and_classification_metrics_default() -> None:
    z = norm.ppf(0.975)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z * z / (10 + z * z)))
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z * z))
    k, n = 144, 153
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(k, n) == (pytest.approx(centre - half), pytest.approx(centre + half))
    y_true = np.array([0, 1] * 50)
    y_pred = y_true.copy()
    y_pred[:13] = 1 - y_pred[:13]
    m = classification_metrics(y_true, y_pred, 2)
    assert m["accuracy_ci_method"] == "wilson" and m["accuracy_ci95"] == list(wilson_interval(87, 100))
    assert classification_metrics(y_true, y_pred, 2, seed=5)["accuracy_ci95"] == m["accuracy_ci95"]  # no seed in it
    assert classification_metrics(y_true, y_pred, 2, bootstrap=500)["accuracy_ci_method"] == "bootstrap"


def test_holm_adjustment_matches_hand_values() -> None:
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.0768, 0.0228, 0.66]) == pytest.approx([0.1536, 0.0684, 0.66])
    assert holm_adjust([0.5]) == [0.5] and holm_adjust([]) == []
    assert holm_adjust([0.9, 0.8]) == [1.0, 1.0]  # 2 × 0.8 capped at 1; monotone in the sorted order
    with pytest.raises(UsageError):
        holm_adjust([1.5])
