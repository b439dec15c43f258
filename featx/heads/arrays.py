"""Fitting a head on arrays: the linear-evaluation protocol's choice (val, cross-validation or the kind's rule),
the refit, and the linear probe LP-FT starts from (raw-space weights)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featx.data import FINAL_FITS
from featx.errors import UsageError
from featx.heads.builders import _pipeline
from featx.heads.kinds import Folds, Grid, HeadKind, SweepContext, SweepLevers, head_kind
from featx.heads.sweeps import _accuracy, _contiguous, _quiet, _threads, each_point

SCALE_PRIOR_ROWS = 5  # StandardScaler variances are shrunk towards their mean by this many pseudo-rows
ABSENT_CLASS_BIAS = -1e4  # linear probe: classes without training images can never win
SOLVERS = ("sklearn", "torch")


@dataclass
class HeadFit:
    """A head fitted on arrays: the exported pipeline, the chosen values, the sweep curve and how they were chosen
    ("val", "cv" or "rule"), the rows of the final fit and whether the choice sits at the edge of the grid."""

    estimator: Any
    best_params: dict[str, Any]
    curve: list[dict[str, Any]]
    selection: str
    n_fit: int
    at_grid_edge: bool
    info: dict[str, Any] = field(default_factory=dict)


def _log_distance(hk: HeadKind, p: dict[str, Any], q: dict[str, Any]) -> float:
    keys = [k for k in hk.searched(p) if k in q]
    return sum(abs(math.log10(float(p[k]) / float(q[k]))) for k in keys)


def choose(kind: str | HeadKind, curve: list[dict[str, Any]], default: dict[str, Any] | None = None) -> int:
    """Index of the chosen point: the best val accuracy; ties go to the strongest regularisation (first in
    grid order), or for the RBF SVM to the point closest to its default (log scale), so a val split that
    cannot separate grid points (1-2 shots) does not push C to its smallest value and collapse the SVM."""
    best = max(c["val_accuracy"] for c in curve)
    tied = [i for i, c in enumerate(curve) if c["val_accuracy"] >= best - 1e-12]
    hk = head_kind(kind)
    if hk.tie_break == "default" and len(tied) > 1:
        ref = default or dict(hk.defaults)
        return min(tied, key=lambda i: (_log_distance(hk, curve[i]["params"], ref), i))
    return tied[0]


def shrink_scaler(scaler: Any) -> Any:
    """Shrink a fitted StandardScaler's per-feature variances towards their mean, as if SCALE_PRIOR_ROWS more
    rows had the average variance. With thousands of rows this changes nothing that matters; with a few shots
    it stops features that happen to be (nearly) constant on the few training images (common after a ReLU)
    from being blown up by a tiny standard deviation, which made every test point look infinitely far away
    (the RBF SVM then predicted one class: 0.46 at 1 shot on hymenoptera)."""
    n = float(np.max(scaler.n_samples_seen_))
    var = (n * scaler.var_ + SCALE_PRIOR_ROWS * float(np.mean(scaler.var_))) / (n + SCALE_PRIOR_ROWS)
    scaler.var_ = var
    scaler.scale_ = np.where(var > 0, np.sqrt(var), 1.0)
    return scaler


def fit_transform_step(cls: type, X: np.ndarray) -> Any:
    """The first pipeline step, fitted once on X (a StandardScaler's variances shrunk, see :func:`shrink_scaler`)."""
    step = cls().fit(X)
    return shrink_scaler(step) if hasattr(step, "var_") else step


def _sweep(hk: HeadKind, X: np.ndarray, y: np.ndarray, folds: Folds, grid: Grid, ctx: SweepContext) -> list[dict[str, Any]]:
    return (hk.sweep or each_point(hk))(X, y, folds, grid, ctx)


def _refit(hk: HeadKind, X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: SweepContext, rows: np.ndarray) -> Any:
    """The final classifier on transformed rows; ``rows``: their positions among the rows the sweep saw."""
    if hk.refit is not None:
        return hk.refit(X, y, params, ctx, rows)
    with _quiet():
        return hk.build(params)[-1].fit(X, y)


def fit_head_arrays(
    kind: str | HeadKind,
    X: np.ndarray,
    y: np.ndarray,
    *,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    cv_folds: int | None = None,
    final_fit: str = "train+val",
    grid: list[dict[str, Any]] | None = None,
    n_jobs: int | None = None,
    seed: int = 0,
    solver: str = "sklearn",
    device: str | None = None,
    levers: SweepLevers | None = None,
) -> HeadFit:
    """Choose hyper-parameters and fit head ``kind`` on arrays.

    Selection: ``"val"`` when ``X_val`` is given (refit on train + val, or on train with ``final_fit="train"``);
    otherwise ``"cv"``: stratified k-fold inside (X, y) when every class has >= 2 rows (folds = min(cv_folds or
    5, smallest class count)), refit on all of (X, y); with fewer, ``"rule"``: the kind's ``defaults``.
    The transform (StandardScaler / Normalizer) is fitted once on X and shared by every fit and the export.
    ``solver="torch"`` (kinds whose ``solvers`` name it: logreg) fits with torch L-BFGS, optionally on ``device``.
    """
    hk = head_kind(kind)
    if final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {final_fit!r}")
    if solver not in SOLVERS:
        raise UsageError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if solver not in hk.solvers:
        raise UsageError(f"solver {solver!r} does not fit a {hk.name} head (it takes {', '.join(hk.solvers)})")
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y) or len(y) == 0:
        raise UsageError(f"X must be (rows, features) with one label per row, got {X.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise UsageError("a head needs at least two classes in the training rows")
    if not np.isfinite(X).all() or (X_val is not None and not np.isfinite(np.asarray(X_val)).all()):
        raise UsageError("features contain NaN or infinite values")  # one line now, not an error deep in a sweep
    ctx = SweepContext(levers or SweepLevers(), max(1, n_jobs or os.cpu_count() or 1), solver, device, seed)
    with _threads(ctx, hk):
        return _fit_head_arrays(hk, X, y, X_val, y_val, cv_folds, final_fit, grid, seed, ctx)


class _SpeculativeRefit:
    """Refits at the best point found so far in a second thread while the sweep walks on. Each new best replaces
    the wish; a refit still queued for an older best is skipped. ``result(params)`` waits for the refit at the
    final choice if one was started for it (None otherwise: refit normally)."""

    def __init__(self, refit: Callable[[dict[str, Any]], Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._refit = refit
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="featx-refit")
        self._wanted: str | None = None
        self._futures: dict[str, Any] = {}

    def propose(self, params: dict[str, Any]) -> None:
        key = json.dumps(params, sort_keys=True, default=str)
        self._wanted = key
        self._futures[key] = self._pool.submit(lambda: self._refit(params) if self._wanted == key else None)

    def result(self, params: dict[str, Any]) -> Any:
        key = json.dumps(params, sort_keys=True, default=str)
        self._wanted = key  # anything still queued for another point is skipped
        try:
            fut = self._futures.get(key)
            return fut.result() if fut is not None else None
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _fit_head_arrays(
    hk: HeadKind,
    X: np.ndarray,
    y: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    cv_folds: int | None,
    final_fit: str,
    grid: list[dict[str, Any]] | None,
    seed: int,
    ctx: SweepContext,
) -> HeadFit:
    steps = hk.steps()
    prep = fit_transform_step(steps[0][1], X)  # one transform, fitted once, shared by every fit and exported
    Xt = prep.transform(X)
    x_var = float(Xt.var()) if hk.scale_relative else 1.0
    n_tr = len(y)
    if X_val is not None and y_val is not None and len(y_val):
        selection = "val"
        X_all = np.concatenate([Xt, prep.transform(np.asarray(X_val))])
        y_all = np.concatenate([y, np.asarray(y_val)])
        folds: Folds = [(np.arange(n_tr), np.arange(n_tr, len(y_all)))]
        fit_rows = np.arange(len(y_all)) if final_fit == "train+val" else np.arange(n_tr)
    else:
        X_all, y_all, fit_rows = Xt, y, np.arange(n_tr)
        counts = np.unique(y, return_counts=True)[1]
        n_folds = min(cv_folds or 5, int(counts.min()))
        if n_folds >= 2:
            from sklearn.model_selection import StratifiedKFold

            selection = "cv"
            folds = list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(n_tr), y))
        else:
            selection, folds = "rule", []
    t0 = time.perf_counter()
    default = hk.default_params(X.shape[1], x_var)
    rows = _contiguous(fit_rows)
    speculative = (
        _SpeculativeRefit(lambda p: _refit(hk, X_all[rows], y_all[rows], p, ctx, fit_rows))
        if (
            selection != "rule"
            and ctx.levers.speculative_refit
            and ctx.n_jobs > 1
            and ctx.solver == "sklearn"
            and hk.speculative_refit
        )
        else None
    )
    with _quiet():  # one quiet window over the sweep, the refit beside it and the wait for that refit
        if selection == "rule":
            curve, best_params, full_grid = [], default, [default]
        else:
            full_grid = grid or hk.grid(X.shape[1], min(len(tr) for tr, _ in folds), x_var)
            if speculative:
                ctx.state["on_best"] = speculative.propose
            try:
                curve = _sweep(hk, X_all, y_all, folds, full_grid, ctx)
            except BaseException:
                if speculative:
                    speculative.result({})  # stop the refit thread before the error goes up
                raise
            finally:
                ctx.state.pop("on_best", None)
            best_params = curve[choose(hk, curve, default)]["params"]
        t1 = time.perf_counter()
        clf = speculative.result(best_params) if speculative else None
    if clf is not None:
        ctx.info["refit_overlapped"] = True
    else:
        clf = _refit(hk, X_all[rows], y_all[rows], best_params, ctx, fit_rows)
    ctx.info.update(sweep_seconds=t1 - t0, refit_seconds=time.perf_counter() - t1)
    estimator = _pipeline(steps, prep, clf)
    edge = selection != "rule" and hk.at_grid_edge(full_grid, best_params)
    return HeadFit(estimator, best_params, curve, selection, len(fit_rows), edge, ctx.info)


@dataclass
class LinearProbe:
    """A linear probe in the RAW feature space (standardisation folded in): logits = X @ coef.T + intercept.
    Classes without training rows have zero weights and a bias of ABSENT_CLASS_BIAS."""

    coef: np.ndarray  # (n_classes, D) float32
    intercept: np.ndarray  # (n_classes,) float32
    C: float
    val_accuracy: float
    curve: list[dict[str, Any]]
    at_grid_edge: bool
    selection: str = "val"


def probe_weights(pipeline: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted logreg pipeline (StandardScaler + LogisticRegression) as raw-space ``(coef, intercept)`` over
    ``n_classes`` classes, float32: the one way LP-FT's network head is built from a probe.

    The scaling is folded in: ``W((x - m) / s) + b = (W / s) x + (b - (W / s) m)``. Binary problems give one margin
    ``z``; rows ``[-z/2, z/2]`` reproduce its probabilities under softmax. Classes without training rows get zero
    weights and a bias of ABSENT_CLASS_BIAS (never predicted)."""
    scaler, lr = pipeline.steps[0][1], pipeline.steps[-1][1]
    w = lr.coef_ / scaler.scale_[None, :]
    b = lr.intercept_ - w @ scaler.mean_
    classes = np.asarray(lr.classes_, dtype=np.int64)
    if len(classes) == 2:  # one logit for class 1 -> two symmetric softmax rows, same probabilities
        w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    if classes.min() < 0 or classes.max() >= n_classes:
        raise UsageError(f"labels must lie in 0..{n_classes - 1}, got {classes.min()}..{classes.max()}")
    coef = np.zeros((n_classes, w.shape[1]), dtype=np.float32)
    intercept = np.full(n_classes, ABSENT_CLASS_BIAS, dtype=np.float32)
    coef[classes], intercept[classes] = w, b
    return coef, intercept


def fit_linear_probe(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    n_classes: int,
    grid: list[dict[str, Any]] | None = None,
    n_jobs: int | None = None,
    seed: int = 0,
    solver: str = "sklearn",
    device: str | None = None,
) -> LinearProbe:
    """The logistic-regression sweep of ``fit-head`` (kind "logreg") as a probe for LP-FT: C chosen on val
    (or by CV / rule without val), final fit on the training rows only (val stays held out for fine-tuning's
    early stopping). ``val_accuracy`` is that final probe's accuracy on val (CV mean without val, NaN by rule)."""
    y_train = np.asarray(y_train)
    hf = fit_head_arrays(
        "logreg",
        X_train,
        y_train,
        X_val=X_val,
        y_val=y_val,
        final_fit="train",
        grid=grid,
        n_jobs=n_jobs,
        seed=seed,
        solver=solver,
        device=device,
    )
    coef, intercept = probe_weights(hf.estimator, n_classes)
    if hf.selection == "val" and X_val is not None and y_val is not None:
        val_acc = _accuracy(hf.estimator.predict(np.asarray(X_val)), np.asarray(y_val))
    elif hf.selection == "cv":
        val_acc = max(c["val_accuracy"] for c in hf.curve)
    else:
        val_acc = float("nan")
    curve = [{"C": float(c["params"]["C"]), "val_accuracy": c["val_accuracy"]} for c in hf.curve]
    return LinearProbe(coef, intercept, float(hf.best_params["C"]), val_acc, curve, hf.at_grid_edge, hf.selection)


def sweep(
    kind: str | HeadKind,
    Xtr: np.ndarray,
    ytr: np.ndarray,
    Xva: np.ndarray,
    yva: np.ndarray,
    *,
    grid: list[dict[str, Any]] | None = None,
    n_jobs: int | None = None,
    levers: SweepLevers | None = None,
    solver: str = "sklearn",
) -> list[dict[str, Any]]:
    """Score the grid on val after fitting on train (raw features: the transform is fitted here, once). The
    curve is in grid order and may stop early along a regularisation path."""
    hk = head_kind(kind)
    ctx = SweepContext(levers or SweepLevers(), max(1, n_jobs or os.cpu_count() or 1), solver)
    with _threads(ctx, hk):
        prep = fit_transform_step(hk.steps()[0][1], Xtr)
        X = np.concatenate([prep.transform(Xtr), prep.transform(Xva)])
        y = np.concatenate([ytr, yva])
        grid = grid or hk.grid(Xtr.shape[1], len(ytr), float(X[: len(ytr)].var()) if hk.scale_relative else 1.0)
        return _sweep(hk, X, y, [(np.arange(len(ytr)), np.arange(len(ytr), len(y)))], grid, ctx)
