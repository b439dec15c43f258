"""Classification metrics shared by heads, fine-tuning and the report: pure functions of labels."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy (with a percentile-bootstrap 95% interval over test images), macro recall, macro F1,
    mean per-class accuracy and the confusion matrix (rows = true class).

    Mean per-class accuracy equals macro recall by definition; both are reported because papers use
    either name. Classes absent from ``y_true`` are left out of the macro averages.
    """
    from sklearn.metrics import confusion_matrix, f1_score, recall_score

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = np.arange(n_classes)
    present = np.unique(y_true)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
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
    rng = np.random.default_rng(seed)
    block = max(1, 5_000_000 // len(values))  # bounded memory for large test sets
    means = np.concatenate(
        [values[rng.integers(0, len(values), size=(min(block, n - i), len(values)))].mean(axis=1) for i in range(0, n, block)]
    )
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:  # binary decision_function: margin for class 1
        scores = np.stack([-scores, scores], axis=1)
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
