"""The four head kinds featx ships, each registered once: logistic regression, linear SVM, RBF SVM, k-NN.

Their default rules (used with fewer than two labelled images per class: no validation, no cross-validation) are
scikit-learn's own defaults where those are sane on standardised CNN features: C=1 for logistic regression, C=1
and gamma="scale" (1 / (D * Var X), here gamma_scale=1) for the RBF SVM; the linear SVM takes C=1e-3 (inside its
grid; larger C is effectively hard-margin there) and k-NN its nearest image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from featx.heads.builders import (
    _build_knn,
    _build_linear_svm,
    _build_logreg,
    _build_rbf_svm,
    _knn_steps,
    _linear_svm_steps,
    _logreg_steps,
    _rbf_svm_steps,
)
from featx.heads.kinds import FittedState, HeadKind, register_head_kind
from featx.heads.sweeps import (
    _refit_knn,
    _refit_linear_svm,
    _refit_logreg,
    _refit_rbf_svm,
    _sweep_knn,
    _sweep_linear_svm,
    _sweep_logreg,
    _sweep_rbf_svm,
)


def _check_linear(last: Any, d: int, k: int, s: FittedState) -> None:
    rows = 1 if k == 2 else k
    s.ok(s.arr(last, "coef_", 2, "f").shape == (rows, d) and s.arr(last, "intercept_", 1, "f").shape == (rows,), "coef_ shape")


def _linear_params(last: Any) -> int:
    return int(last.coef_.size + np.size(getattr(last, "intercept_", 0)))


def _rbf_grid(d: int, n: int, var: float) -> list[dict[str, Any]]:
    base = 1.0 / (d * (var if var > 0 else 1.0))  # scikit-learn's gamma="scale"
    return [
        {"C": float(c), "gamma": float(s * base), "gamma_scale": s} for c in np.logspace(-1, 3, 5) for s in (0.03, 0.1, 0.3, 1.0)
    ]


def _rbf_defaults(p: dict[str, Any], n_features: int, x_var: float) -> dict[str, Any]:
    p["gamma"] = float(p["gamma_scale"] / (n_features * (x_var if x_var > 0 else 1.0)))
    return p


def _check_rbf(last: Any, d: int, k: int, s: FittedState) -> None:
    sv = s.arr(last, "support_vectors_", 2, "f")
    n_sv = sv.shape[0]
    n_support = s.arr(last, "_n_support", 1, "i")
    s.ok(sv.dtype == np.float64 and sv.shape[1] == d and n_sv > 0, "support vectors")
    s.ok(n_support.shape == (k,) and int(n_support.sum()) == n_sv and (n_support >= 0).all(), "_n_support")
    s.ok(s.arr(last, "_dual_coef_", 2, "f").shape == (k - 1, n_sv), "_dual_coef_")
    s.ok(s.arr(last, "_intercept_", 1, "f").shape == (k * (k - 1) // 2,), "_intercept_")
    s.ok(s.arr(last, "support_", 1, "i").shape == (n_sv,), "support_")
    s.ok(tuple(getattr(last, "shape_fit_", ()))[1:] == (d,) and last.kernel == "rbf" and not last._sparse, "kernel")
    s.ok(s.arr(last, "_probA", 1, "f").size == 0 and s.arr(last, "_probB", 1, "f").size == 0, "probability arrays")


def _check_knn(last: Any, d: int, k: int, s: FittedState) -> None:
    fit_x = s.arr(last, "_fit_X", 2, "f")
    y = s.arr(last, "_y", 1, "iu")
    n = fit_x.shape[0]
    s.ok(last._fit_method == "brute" and getattr(last, "_tree", None) is None, "search method")
    s.ok(fit_x.shape[1] == d and y.shape == (n,) and last.n_samples_fit_ == n, "training rows")
    s.ok(isinstance(last.n_neighbors, int) and 1 <= last.n_neighbors <= n and last.weights in ("distance", "uniform"), "k")
    s.ok(y.size == 0 or (0 <= y.min() and y.max() < k), "labels")
    s.ok(last.effective_metric_ == "euclidean", "metric")


LOGREG = register_head_kind(
    HeadKind(
        "logreg",
        "StandardScaler + multinomial L-BFGS logistic regression",
        _logreg_steps,
        _build_logreg,
        lambda d, n, var: [{"C": float(c)} for c in np.logspace(-4, 2, 13)],
        {"C": 1.0},
        _check_linear,
        _linear_params,
        _sweep_logreg,
        _refit_logreg,
        solvers=("sklearn", "torch"),
        streamable=True,
    )
)
LINEAR_SVM = register_head_kind(
    HeadKind(
        "linear-svm",
        "StandardScaler + LinearSVC",
        _linear_svm_steps,
        _build_linear_svm,
        # Larger C on standardised high-dimensional features is effectively hard-margin: liblinear then runs
        # for minutes (52 s for one fit at C=1 on flowers17) and such C values were never selected.
        lambda d, n, var: [{"C": float(c)} for c in np.logspace(-5, -1, 9)],
        {"C": 1e-3},
        _check_linear,
        _linear_params,
        _sweep_linear_svm,
        _refit_linear_svm,
        speculative_refit=True,  # 1.04-1.28x (bench_heads.md); logreg's two fits slow each other down instead
    )
)
RBF_SVM = register_head_kind(
    HeadKind(
        "rbf-svm",
        "StandardScaler + SVC(rbf)",
        _rbf_svm_steps,
        _build_rbf_svm,
        _rbf_grid,  # gamma relative to the data's scale: gamma_scale / (D * Var X)
        {"C": 1.0, "gamma_scale": 1.0},
        _check_rbf,
        lambda last: int(last.dual_coef_.size + last.support_vectors_.size),
        _sweep_rbf_svm,
        _refit_rbf_svm,
        resolve_defaults=_rbf_defaults,
        derived={"gamma": "gamma_scale"},  # gamma = gamma_scale / (n_features * Var X): one choice, named once
        scale_relative=True,
        tie_break="default",
    )
)
KNN = register_head_kind(
    HeadKind(
        "knn",
        "L2-normalise + k-NN (cosine), distance-weighted",
        _knn_steps,
        _build_knn,
        lambda d, n, var: [{"n_neighbors": k} for k in (20, 10, 5, 3, 1) if k <= n],
        {"n_neighbors": 1},
        _check_knn,
        lambda last: int(last._fit_X.size),  # k-NN stores the training set
        _sweep_knn,
        _refit_knn,
        lower_bounds={"n_neighbors": 1},  # k = 1 is not an edge: there is no smaller k
        one_thread=False,  # the neighbour search is one large matrix product: 1.3-1.6x faster on both cores
    )
)
