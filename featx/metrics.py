"""Classification metrics shared by heads, fine-tuning and the report: pure functions of labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from featx.errors import UsageError

MDE_ALPHA = 0.05  # two-sided significance level of the minimum detectable difference
MDE_POWER = 0.8


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, *, bootstrap: int = 0, seed: int = 0
) -> dict[str, Any]:
    """Accuracy with a 95% interval, macro recall, macro F1, mean per-class accuracy and the confusion matrix
    (rows = true class, ``n_classes`` × ``n_classes``).

    The accuracy interval is Wilson's score interval (:func:`wilson_interval`): a function of the counts alone,
    so a printed end never moves with a random seed (``accuracy_ci_method = "wilson"``). ``bootstrap > 0``
    gives the older percentile bootstrap over test images with that many resamples instead (``"bootstrap"``).

    Mean per-class accuracy equals macro recall by definition; both are reported because papers use
    either name. Macro averages run over the classes present in ``y_true``: a class with no test image
    has no recall, and predictions into it already count as misses of the true classes. Labels outside
    ``[0, n_classes)`` raise ``UsageError`` instead of silently dropping rows from the confusion matrix.
    """
    from sklearn.metrics import confusion_matrix, f1_score, recall_score

    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise UsageError(f"classification_metrics: {len(y_true)} true labels but {len(y_pred)} predictions")
    for name, y in (("true label", y_true), ("prediction", y_pred)):
        if len(y) and (not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)) or y.min() < 0 or y.max() >= n_classes):
            raise UsageError(
                f"classification_metrics: every {name} must be an integer in [0, {n_classes}); got {y.min()}..{y.max()}"
            )
    y_true, y_pred = y_true.astype(np.int64), y_pred.astype(np.int64)
    labels = np.arange(n_classes)
    cm = confusion_matrix(y_true, y_pred, labels=labels) if len(y_true) else np.zeros((n_classes, n_classes), dtype=np.int64)
    if len(y_true) == 0:
        nan = float("nan")
        return {
            "n": 0,
            "accuracy": nan,
            "accuracy_ci95": [nan, nan],
            "accuracy_ci_method": "wilson" if bootstrap <= 0 else "bootstrap",
            "macro_recall": nan,
            "macro_f1": nan,
            "mean_per_class_accuracy": nan,
            "confusion_matrix": cm.tolist(),
        }
    present = np.unique(y_true)
    per_class = cm.diagonal()[present] / cm.sum(axis=1)[present]
    correct = (y_true == y_pred).astype(np.float64)
    if bootstrap > 0:
        lo, hi = bootstrap_interval(correct, n=bootstrap, seed=seed)
    else:
        lo, hi = wilson_interval(int(correct.sum()), len(correct))
    return {
        "n": len(y_true),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [lo, hi],
        "accuracy_ci_method": "wilson" if bootstrap <= 0 else "bootstrap",
        "macro_recall": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "mean_per_class_accuracy": float(per_class.mean()),
        "confusion_matrix": cm.tolist(),
    }


def wilson_interval(k: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``k`` successes in ``n`` trials (e.g. correct test images).

    Deterministic (no resampling), never outside [0, 1], and close to nominal coverage even near 0 or 1,
    where the normal (Wald) interval collapses; (nan, nan) for n = 0."""
    from scipy.stats import norm

    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise UsageError(f"wilson_interval: k must lie in [0, n] = [0, {n}], got {k}")
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # the ends are exact where the data are: no successes -> 0, all successes -> 1 (rounding aside)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)


def bootstrap_interval(values: np.ndarray, *, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. per-image correctness)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0 or n <= 0:
        return float("nan"), float("nan")
    means = _bootstrap_means(values, n=n, seed=seed)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def _bootstrap_means(values: np.ndarray, *, n: int, seed: int) -> np.ndarray:
    """``n`` means of resamples (with replacement) of ``values``, in blocks of bounded memory."""
    rng = np.random.default_rng(seed)
    block = max(1, 5_000_000 // len(values))
    return np.concatenate(
        [values[rng.integers(0, len(values), size=(min(block, n - i), len(values)))].mean(axis=1) for i in range(0, n, block)]
    )


def paired_comparison(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *, n_boot: int = 0, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Compare two classifiers scored on the SAME test images: paired, so image difficulty cancels out.

    Returns ``{"diff", "ci", "ci_method", "p_value", "n01", "n10", "n", "mde", "mde_basis", "acc_a", "acc_b",
    "level"}`` (plus ``"ci_bootstrap"`` when ``n_boot > 0``):

    - ``diff`` = accuracy(a) − accuracy(b) (a fraction, not points);
    - ``n10``: images a gets right and b gets wrong; ``n01``: a wrong, b right; so diff = (n10 − n01) / n;
    - ``p_value``: McNemar's exact test, two-sided: ``binomtest(n10, n10 + n01, 0.5)`` (1.0 with no
      discordant pair);
    - ``ci``: :func:`paired_difference_interval` at ``level``: computed from the counts alone (no resampling, so
      no end moves with a seed), and 0 lies outside it exactly when ``p_value < 1 − level``: the interval and
      McNemar's test never disagree;
    - ``ci_bootstrap`` (only with ``n_boot > 0``): the older percentile interval over ``n_boot`` paired bootstrap
      resamples (the same resampled images for both classifiers), for reference;
    - ``mde``: the smallest true accuracy difference this test set would detect with probability 0.8 at
      two-sided alpha 0.05, given n and the observed discordance rate ``p_d = (n01 + n10) / n``. Normal
      approximation for paired proportions (Connor 1987): solve
      ``delta·sqrt(n) = z_a·sqrt(p_d) + z_b·sqrt(p_d − delta²)`` for delta, i.e.
      ``delta = sqrt(p_d) · (z_a·sqrt(n) + z_b·sqrt(n − z_a² + z_b²)) / (n + z_b²)`` with z_a = z(0.975),
      z_b = z(0.8). Two guards: with no discordant pair p_d is replaced by 3/n (the "rule of three" 95%
      upper bound of a rate never observed in n trials), and delta is at least k_min/n, where k_min is the
      fewest discordant pairs with which the exact test can reject at all (6 at alpha 0.05).
      ``mde_basis`` says which applied: ``"normal"``, ``"rule_of_three"`` or ``"exact_floor"``.
    """
    y_true = np.asarray(y_true).reshape(-1)
    pred_a = np.asarray(pred_a).reshape(-1)
    pred_b = np.asarray(pred_b).reshape(-1)
    if not (len(y_true) == len(pred_a) == len(pred_b)):
        raise UsageError(
            f"paired_comparison: lengths differ ({len(y_true)} labels, {len(pred_a)} and {len(pred_b)} predictions); "
            "both classifiers must predict the same test images"
        )
    n = len(y_true)
    if n == 0:
        raise UsageError("paired_comparison: no test images to compare")
    if not 0 < level < 1:
        raise UsageError(f"paired_comparison: level must be in (0, 1), got {level}")
    ok_a = (pred_a == y_true).astype(np.float64)
    ok_b = (pred_b == y_true).astype(np.float64)
    n10 = int(np.sum((ok_a == 1) & (ok_b == 0)))
    n01 = int(np.sum((ok_a == 0) & (ok_b == 1)))
    diff = float(ok_a.mean() - ok_b.mean())
    p_value = mcnemar_exact_p(n10, n01)
    lo, hi = paired_difference_interval(n10, n01, n, level=level)
    mde, basis = minimum_detectable_difference(n, (n01 + n10) / n)
    out = {
        "diff": diff,
        "ci": [lo, hi],
        "ci_method": PAIRED_CI_METHOD,
        "p_value": p_value,
        "n01": n01,
        "n10": n10,
        "n": n,
        "mde": mde,
        "mde_basis": basis,
        "acc_a": float(ok_a.mean()),
        "acc_b": float(ok_b.mean()),
        "level": level,
    }
    if n_boot > 0:
        diffs = _bootstrap_means(ok_a - ok_b, n=n_boot, seed=seed)
        alpha = (1.0 - level) / 2.0
        out["ci_bootstrap"] = [float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1.0 - alpha))]
    return out


PAIRED_CI_METHOD = "exact-conditional+tango"


def mcnemar_exact_p(n10: int, n01: int) -> float:
    """McNemar's exact test, two-sided: the binomial test of n10 successes in n10 + n01 discordant pairs at 0.5
    (1.0 with no discordant pair)."""
    from scipy.stats import binomtest

    if n10 < 0 or n01 < 0:
        raise UsageError(f"mcnemar_exact_p: counts must be non-negative, got {n10} and {n01}")
    return float(binomtest(int(n10), int(n10 + n01), 0.5).pvalue) if n10 + n01 else 1.0


def paired_difference_interval(n10: int, n01: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Interval at ``level`` for the difference of two paired accuracies, (n10 − n01) / n, from the counts alone.

    Two standard intervals for a difference of paired proportions, joined (the smallest interval holding both):

    - the exact conditional interval: given the m = n10 + n01 discordant images, n10 ~ Binomial(m, π) and the
      difference is (m / n)·(2π − 1); the Clopper–Pearson interval for π, mapped through that line. It inverts
      the very binomial test McNemar's exact test runs, so it excludes 0 exactly when McNemar's p < 1 − level;
    - Tango's score interval (Tango 1998; recommended by Fagerland, Lydersen & Laake 2013), which also carries
      the uncertainty of the discordance rate m / n that the conditional interval treats as known (the
      conditional interval alone would end at the observed difference when every discordant image goes one way).

    Tango's interval excludes 0 whenever the exact test rejects (its test at 0 is the uncorrected McNemar z,
    which is never more conservative than the exact test; checked for every m ≤ 3000), so the joined interval
    still excludes 0 exactly when McNemar's exact p < 1 − level; the last lines enforce that against rounding.
    No resampling: the same counts give the same interval on every machine and seed.
    """
    from scipy.optimize import brentq
    from scipy.stats import beta, norm

    if n <= 0 or n10 < 0 or n01 < 0 or n10 + n01 > n:
        raise UsageError(f"paired_difference_interval: need 0 <= n10 + n01 <= n, got n10={n10}, n01={n01}, n={n}")
    if not 0 < level < 1:
        raise UsageError(f"paired_difference_interval: level must be in (0, 1), got {level}")
    alpha = 1.0 - level
    m = n10 + n01
    d = (n10 - n01) / n
    # exact conditional (Clopper-Pearson on the discordant pairs)
    if m:
        pi_lo = float(beta.ppf(alpha / 2, n10, m - n10 + 1)) if n10 > 0 else 0.0
        pi_hi = float(beta.ppf(1 - alpha / 2, n10 + 1, m - n10)) if n10 < m else 1.0
        c_lo, c_hi = (m / n) * (2 * pi_lo - 1), (m / n) * (2 * pi_hi - 1)
    else:
        c_lo = c_hi = 0.0
    # Tango's score interval: the two roots of T(delta) = +-z
    z = float(norm.ppf(1 - alpha / 2))

    def score(delta: float) -> float:
        a_ = 2.0 * n
        b_ = -n10 - n01 + (2.0 * n - n10 + n01) * delta
        c_ = -n01 * delta * (1.0 - delta)
        q = (math.sqrt(max(b_ * b_ - 4.0 * a_ * c_, 0.0)) - b_) / (2.0 * a_)  # constrained MLE of P(a wrong, b right)
        var = n * (2.0 * q + delta * (1.0 - delta))
        num = n10 - n01 - n * delta
        if var <= 0.0:
            return 0.0 if num == 0 else math.copysign(math.inf, num)
        return num / math.sqrt(var)

    eps = 1e-12
    t_lo = -1.0 if d <= -1.0 + eps or score(-1.0 + eps) < z else brentq(lambda x: score(x) - z, -1.0 + eps, d, xtol=1e-12)
    t_hi = 1.0 if d >= 1.0 - eps or score(1.0 - eps) > -z else brentq(lambda x: score(x) + z, d, 1.0 - eps, xtol=1e-12)
    lo, hi = max(-1.0, min(c_lo, t_lo, d)), min(1.0, max(c_hi, t_hi, d))
    # the interval and McNemar's exact test must never disagree
    if mcnemar_exact_p(n10, n01) < alpha:
        if d > 0 and lo <= 0:
            lo = c_lo
        elif d < 0 and hi >= 0:
            hi = c_hi
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return float(lo), float(hi)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of several p-values (family-wise error), in the input order.

    The i-th smallest p becomes max over j <= i of min(1, (k − j + 1)·p_(j)) for k p-values: reject the
    hypotheses whose adjusted p is below alpha and the family-wise error rate stays at most alpha."""
    ps = [float(p) for p in p_values]
    if any(not (0.0 <= p <= 1.0) for p in ps):
        raise UsageError(f"holm_adjust: p-values must lie in [0, 1], got {ps}")
    k = len(ps)
    order = sorted(range(k), key=lambda i: ps[i])
    out = [0.0] * k
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * ps[i]))
        out[i] = running
    return out


def minimum_detectable_difference(
    n: int, discordance: float, *, alpha: float = MDE_ALPHA, power: float = MDE_POWER
) -> tuple[float, str]:
    """Smallest paired accuracy difference detectable at ``alpha`` (two-sided) with ``power``; see
    ``paired_comparison`` for the formula and its two guards. Returns ``(delta, basis)``."""
    from scipy.stats import norm

    if n <= 0:
        raise UsageError("minimum_detectable_difference: n must be positive")
    basis = "normal"
    p_d = float(discordance)
    if p_d <= 0:
        p_d, basis = min(1.0, 3.0 / n), "rule_of_three"
    z_a = float(norm.ppf(1 - alpha / 2))
    z_b = float(norm.ppf(power))
    delta = math.sqrt(p_d) * (z_a * math.sqrt(n) + z_b * math.sqrt(max(0.0, n - z_a**2 + z_b**2))) / (n + z_b**2)
    floor = _min_discordant_to_reject(alpha) / n
    if floor > delta:
        delta, basis = floor, "exact_floor"
    return min(1.0, delta), basis


def _min_discordant_to_reject(alpha: float) -> int:
    """Fewest discordant pairs for which McNemar's exact two-sided test can reach p <= alpha (all one way)."""
    k = 1
    while min(1.0, 2 * 0.5**k) > alpha:
        k += 1
    return k


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:  # binary decision_function: margin for class 1
        scores = np.stack([-scores, scores], axis=1)
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
