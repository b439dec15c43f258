"""featx.metrics against hand-computed values and scipy/sklearn references: absent classes, CIs, McNemar, MDE."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm
from sklearn.metrics import f1_score, recall_score

from featx.errors import UsageError
from featx.metrics import bootstrap_interval, classification_metrics, minimum_detectable_difference, paired_comparison

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
    assert r["ci"] == [pytest.approx(exact_lo), pytest.approx(exact_hi)]
    assert (r["n10"], r["n01"]) == (2, 1)


def test_identical_predictions_give_p_one_zero_diff_and_a_rule_of_three_mde() -> None:
    y = np.arange(50) % 3
    a = y.copy()
    a[:10] = (a[:10] + 1) % 3
    r = paired_comparison(y, a, a.copy())
    assert r["diff"] == 0 and r["ci"] == [0.0, 0.0] and r["p_value"] == 1.0
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
