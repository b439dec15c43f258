"""Classification metrics shared by heads, fine-tuning and the report: pure functions of labels."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from featx.errors import UsageError

MDE_ALPHA = 0.05  # two-sided significance level of the minimum detectable difference
MDE_POWER = 0.8


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy (with a percentile-bootstrap 95% interval over test images), macro recall, macro F1,
    mean per-class accuracy and the confusion matrix (rows = true class, ``n_classes`` × ``n_classes``).

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
            "macro_recall": nan,
            "macro_f1": nan,
            "mean_per_class_accuracy": nan,
            "confusion_matrix": cm.tolist(),
        }
    present = np.unique(y_true)
    per_class = cm.diagonal()[present] / cm.sum(axis=1)[present]
    correct = (y_true == y_pred).astype(np.float64)
    lo, hi = bootstrap_interval(correct, n=bootstrap, seed=seed)
    return {
        "n": len(y_true),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [lo, hi],
        "macro_recall": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "mean_per_class_accuracy": float(per_class.mean()),
        "confusion_matrix": cm.tolist(),
    }


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
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Compare two classifiers scored on the SAME test images: paired, so image difficulty cancels out.

    Returns ``{"diff", "ci", "p_value", "n01", "n10", "n", "mde", "mde_basis", "acc_a", "acc_b", "level"}``:

    - ``diff`` = accuracy(a) − accuracy(b) (a fraction, not points);
    - ``ci``: percentile interval at ``level`` of that difference over ``n_boot`` paired bootstrap resamples
      (the same resampled images for both classifiers);
    - ``n10``: images a gets right and b gets wrong; ``n01``: a wrong, b right; so diff = (n10 − n01) / n;
    - ``p_value``: McNemar's exact test, two-sided: ``binomtest(n10, n10 + n01, 0.5)`` (1.0 with no
      discordant pair);
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
    from scipy.stats import binomtest

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
    if n_boot > 0:
        diffs = _bootstrap_means(ok_a - ok_b, n=n_boot, seed=seed)
        alpha = (1.0 - level) / 2.0
        ci = [float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1.0 - alpha))]
    else:
        ci = [float("nan"), float("nan")]
    p_value = float(binomtest(n10, n10 + n01, 0.5).pvalue) if n10 + n01 else 1.0
    mde, basis = minimum_detectable_difference(n, (n01 + n10) / n)
    return {
        "diff": diff,
        "ci": ci,
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
