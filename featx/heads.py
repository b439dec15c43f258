"""Heads: scikit-learn classifiers on cached features, with the linear-evaluation protocol.

Protocol (Kornblith et al. 2019): sweep the regularisation (and kernel width) on a validation split,
pick the best by validation accuracy, refit with the chosen hyper-parameters on train + val, and evaluate
once on test. Without a validation split the choice comes from stratified k-fold cross-validation inside the
training rows, and with fewer than two images per class from a fixed rule (:data:`HEAD_DEFAULT_PARAMS`).

Each head kind owns its sweep strategy (:class:`HeadKind`): the features are standardised (or normalised)
once, and every fit of the sweep and the final refit shares that transform, which the exported pipeline
carries. Logistic regression walks the C path from strong to weak regularisation with warm starts and a loose
tolerance, stopping once validation accuracy has clearly peaked, then refits at full tolerance. The linear
SVM solves its primal (L-BFGS on the squared hinge, every class at once) along the same warm path. Sequential
fits run with one BLAS thread, which is faster on these matrix sizes. The RBF SVM computes one
squared-distance matrix for the whole grid and fits libsvm on precomputed kernels. k-NN searches neighbours
once for the largest k and votes for every k. Exported estimators are always the plain scikit-learn classes
of the declared steps, so saved heads load under the allowlist below.

Heads are saved with skops (no pickle). Loading accepts only the exact node types featx writes, checked in
the file's schema before anything is built, so a head file someone sent you cannot run code.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__
from featx.backbones import EmbedderSpec
from featx.cache import FeatureSet, now_iso
from featx.data import RowSelection, SplitPlan
from featx.errors import HeadFileError, MismatchError, UsageError
from featx.metrics import classification_metrics, softmax

SWEEP_TOL = 1e-3  # solver tolerance during a sweep: only the ranking on val matters there
REFIT_TOL = 1e-4  # the final model: scikit-learn's default tolerance
PATIENCE = 3  # stop a regularisation path after this many consecutive points strictly below the best so far
GRAM_MAX_BYTES = int(os.environ.get("FEATX_GRAM_MAX_MB", "4096")) * 2**20  # above: per-point RBF fits instead
SCALE_PRIOR_ROWS = 5  # StandardScaler variances are shrunk towards their mean by this many pseudo-rows
ABSENT_CLASS_BIAS = -1e4  # linear probe: classes without training images can never win
SOLVERS = ("sklearn", "torch")

# The rule used when there are fewer than two labelled images per class (no validation, no cross-validation).
# They are scikit-learn's own defaults where those are sane on standardised CNN features: C=1 for logistic
# regression, C=1 and gamma="scale" (1 / (D * Var X), here gamma_scale=1) for the RBF SVM; the linear SVM
# takes C=1e-3 (inside its grid; larger C is effectively hard-margin there) and k-NN its nearest image.
HEAD_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "logreg": {"C": 1.0},
    "linear-svm": {"C": 1e-3},
    "rbf-svm": {"C": 1.0, "gamma_scale": 1.0},
    "knn": {"n_neighbors": 1},
}


@dataclass
class SweepLevers:
    """The speed levers of the sweeps, all on by default. Turning one off restores the plain way for that
    step (the benchmark's ablation); results stay valid either way."""

    warm_path: bool = True  # logreg / linear-svm: warm starts along the C path
    sweep_tol: bool = True  # loose tolerance (SWEEP_TOL) during the sweep, full tolerance for the refit
    early_stop: bool = True  # stop the path once val accuracy has clearly peaked (PATIENCE)
    primal: bool = True  # linear-svm: featx's warm-started primal solver (L-BFGS, all classes) instead of liblinear
    gram: bool = True  # rbf-svm: one squared-distance matrix and precomputed kernels for the whole grid
    one_search: bool = True  # knn: one neighbour search for the largest k
    # kinds that allow it (linear-svm) with n_jobs > 1: while the path goes on, a second thread refits at the best
    # point so far (used only if it is the final choice; the refit is the same computation either way)
    speculative_refit: bool = True
    fast_search: bool = True  # knn: float32 GEMM + argpartition per block of queries, not scikit-learn's float64 search
    # Sequential fits with one BLAS/OpenMP thread: on small matrices (thousands of rows x 1280) extra BLAS
    # threads cost more than they bring (1.4-3x slower on a 2-core machine, benchmarks/results/bench_heads.md);
    # parallel sweeps (joblib) use one thread per worker either way.
    one_thread: bool = True


@dataclass
class _Ctx:
    """What one sweep + refit share: options, and state carried from the sweep into the refit."""

    levers: SweepLevers
    n_jobs: int
    solver: str = "sklearn"
    device: str | None = None
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # goes into metadata (e.g. stopped_early)


Folds = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class HeadKind:
    """One kind of head: how to build it, what to sweep, how to sweep and refit it, and the exact classes its
    saved file may hold.

    ``steps`` are the pipeline's steps, in order, as featx builds them. They are also the only estimator
    classes :func:`load_head` accepts for this kind (see :data:`SAFE_NODE_TYPES`), so a new kind is
    loadable exactly when it is registered here. ``sweep(X, y, folds, grid, ctx)`` scores grid points on
    the already transformed rows ``X`` (each fold: train rows, val rows); ``refit(X, y, params, ctx)`` fits
    the final classifier (the last step) on transformed rows.
    """

    name: str
    steps: Callable[[], tuple[tuple[str, type], ...]]  # (step name, class), imported lazily
    build: Callable[[dict[str, Any]], Any]  # params -> unfitted Pipeline
    grid: Callable[[int, int, float], list[dict[str, Any]]]  # (n_features, n_train, Var X) -> grid, strongest first
    description: str
    sweep: Callable[[np.ndarray, np.ndarray, Folds, list[dict[str, Any]], _Ctx], list[dict[str, Any]]] | None = None
    refit: Callable[[np.ndarray, np.ndarray, dict[str, Any], _Ctx], Any] | None = None
    tie_break: str = "first"  # "first": strongest regularisation among ties; "default": closest to the default
    one_thread: bool = True  # sweep and refit with one BLAS thread (lever one_thread); False: one big GEMM gains from more
    speculative_refit: bool = False  # its path walk may refit beside the sweep (lever speculative_refit, n_jobs > 1)


def _logreg_steps() -> tuple[tuple[str, type], ...]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    return (("standardscaler", StandardScaler), ("logisticregression", LogisticRegression))


def _linear_svm_steps() -> tuple[tuple[str, type], ...]:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return (("standardscaler", StandardScaler), ("linearsvc", LinearSVC))


def _rbf_svm_steps() -> tuple[tuple[str, type], ...]:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return (("standardscaler", StandardScaler), ("svc", SVC))


def _knn_steps() -> tuple[tuple[str, type], ...]:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer

    return (("normalizer", Normalizer), ("kneighborsclassifier", KNeighborsClassifier))


def _pipeline(steps: tuple[tuple[str, type], ...], *estimators: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return Pipeline([(name, est) for (name, _), est in zip(steps, estimators)])


def _logreg(C: float, tol: float = REFIT_TOL) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=1000, tol=tol)


def _linear_svc(C: float, *, dual: bool | str = "auto", tol: float = REFIT_TOL) -> Any:
    from sklearn.svm import LinearSVC

    return LinearSVC(C=C, max_iter=5000, dual=dual, tol=tol)


def _svc(params: dict[str, Any]) -> Any:
    from sklearn.svm import SVC

    return SVC(kernel="rbf", C=params.get("C", 1.0), gamma=params.get("gamma", "scale"))


def _knn(k: int) -> Any:
    from sklearn.neighbors import KNeighborsClassifier

    # L2-normalised features + euclidean distance = cosine neighbours, the usual k-NN probe. Brute force always:
    # a tree index (chosen automatically for narrow features) would put Cython tree objects into the head file.
    return KNeighborsClassifier(n_neighbors=k, weights="distance", algorithm="brute")


def _build_logreg(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import StandardScaler

    return _pipeline(_logreg_steps(), StandardScaler(), _logreg(params.get("C", 1.0)))


def _build_linear_svm(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import StandardScaler

    return _pipeline(_linear_svm_steps(), StandardScaler(), _linear_svc(params.get("C", 1.0)))


def _build_rbf_svm(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import StandardScaler

    return _pipeline(_rbf_svm_steps(), StandardScaler(), _svc(params))


def _build_knn(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import Normalizer

    return _pipeline(_knn_steps(), Normalizer(), _knn(params.get("n_neighbors", 5)))


# --------------------------------------------------------------------------------------------------
# sweep strategies


_QUIET_LOCK = threading.Lock()
_quiet_state: dict[str, Any] = {"depth": 0, "cm": None}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Sweep fits at a loose tolerance may stop before converging; that is the point, not a warning.
    Re-entrant and safe across threads (a speculative refit runs beside the sweep): only the outermost entry
    and exit touch the process-wide warning filters."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with _QUIET_LOCK:
        if _quiet_state["depth"] == 0:
            cm = warnings.catch_warnings()
            cm.__enter__()
            warnings.simplefilter("ignore", ConvergenceWarning)
            _quiet_state["cm"] = cm
        _quiet_state["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_state["depth"] -= 1
            if _quiet_state["depth"] == 0:
                _quiet_state["cm"].__exit__(None, None, None)
                _quiet_state["cm"] = None


def _threads(ctx: _Ctx, hk: HeadKind) -> contextlib.AbstractContextManager[Any]:
    """One BLAS/OpenMP thread for the sweep and refit (lever ``one_thread``, for the kinds that gain from it),
    restored afterwards."""
    if not (ctx.levers.one_thread and hk.one_thread):
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred) == y).mean()) if len(y) else float("nan")


def _path_order(grid: list[dict[str, Any]]) -> list[int]:
    """Grid indices from strong to weak regularisation (small C first)."""
    return sorted(range(len(grid)), key=lambda i: grid[i]["C"])


def _walk_path(
    grid: list[dict[str, Any]], folds: Folds, ctx: _Ctx, fit_point: Callable[[int, float, float], float]
) -> list[dict[str, Any]]:
    """Score grid points along the C path; ``fit_point(fold, C, tol) -> val accuracy`` keeps its own warm state.
    Stops after PATIENCE consecutive points strictly below the best so far (lever ``early_stop``)."""
    tol = SWEEP_TOL if ctx.levers.sweep_tol else REFIT_TOL
    curve: dict[int, dict[str, Any]] = {}
    best, best_i, below, proposed = -1.0, -1, 0, -1
    for i in _path_order(grid):
        t0 = time.perf_counter()
        acc = float(np.mean([fit_point(f, float(grid[i]["C"]), tol) for f in range(len(folds))]))
        curve[i] = {"params": grid[i], "val_accuracy": acc, "seconds": time.perf_counter() - t0}
        if acc > best:
            best, best_i, below = acc, i, 0
        else:
            if acc < best:
                below += 1
            if proposed != best_i and (on_best := ctx.state.get("on_best")):  # the best has held one point: refit it
                on_best(grid[best_i])
                proposed = best_i
        if ctx.levers.early_stop and below >= PATIENCE and len(curve) < len(grid):
            ctx.info["stopped_early"] = True
            break
    ctx.info.setdefault("stopped_early", False)
    return [curve[i] for i in sorted(curve)]


def _sweep_logreg(X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], ctx: _Ctx) -> list[dict[str, Any]]:
    parts = [(X[tr], y[tr], X[va], y[va]) for tr, va in folds]
    if ctx.solver == "torch":
        warm_t: list[Any] = [None] * len(folds)

        def fit_point_t(f: int, C: float, tol: float) -> float:
            Xtr, ytr, Xva, yva = parts[f]
            lr = _torch_logreg_arrays(Xtr, ytr, C, tol=tol, init=warm_t[f] if ctx.levers.warm_path else None, device=ctx.device)
            warm_t[f] = lr
            ctx.state.setdefault("warm", {})[C] = lr if f == 0 else ctx.state["warm"].get(C)
            return _accuracy(lr.predict(Xva), yva)

        return _walk_path(grid, folds, ctx, fit_point_t)

    models: list[Any] = [None] * len(folds)

    def fit_point(f: int, C: float, tol: float) -> float:
        Xtr, ytr, Xva, yva = parts[f]
        m = models[f] if ctx.levers.warm_path and models[f] is not None else _logreg(C, tol)
        m.set_params(C=C, tol=tol, warm_start=ctx.levers.warm_path)
        with _quiet():
            m.fit(Xtr, ytr)
        models[f] = m
        if f == 0:
            ctx.state.setdefault("warm", {})[C] = (m.coef_.copy(), m.intercept_.copy(), m.classes_.copy())
        return _accuracy(m.predict(Xva), yva)

    return _walk_path(grid, folds, ctx, fit_point)


def _refit_logreg(X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: _Ctx) -> Any:
    C = float(params["C"])
    warm = ctx.state.get("warm", {}).get(C) if ctx.levers.warm_path else None
    if ctx.solver == "torch":
        return _torch_logreg_arrays(X, y, C, tol=REFIT_TOL, init=warm, device=ctx.device)
    m = _logreg(C, REFIT_TOL)
    if warm is not None and np.array_equal(warm[2], np.unique(y)):
        m.set_params(warm_start=True)
        m.coef_, m.intercept_ = warm[0].copy(), warm[1].copy()
    with _quiet():
        m.fit(X, y)
    m.set_params(warm_start=False)
    return m


# linear SVM: OvR squared hinge, L2, bias as a regularised feature of value 1 (exactly LinearSVC's problem)


def _ovr_targets(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    if len(classes) == 2:
        return np.where(y == classes[1], 1.0, -1.0)[:, None]
    return np.where(y[:, None] == classes[None, :], 1.0, -1.0)


def _sqhinge_primal(
    X: np.ndarray, Y: np.ndarray, C: float, *, tol: float, W0: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """min 0.5||W||^2 + C sum max(0, 1 - Y * (X W[:-1] + W[-1]))^2 for every class column at once (L-BFGS).
    Stops when the gradient's largest entry is below ``tol`` times its value at W = 0."""
    from scipy.optimize import minimize

    d, k = X.shape[1], Y.shape[1]

    def fg(w: np.ndarray) -> tuple[float, np.ndarray]:
        W = w.reshape(d + 1, k)
        Z = X @ W[:d] + W[d]
        M = np.maximum(0.0, 1.0 - Y * Z)
        GZ = (-2.0 * C) * Y * M
        G = np.empty_like(W)
        G[:d] = X.T @ GZ + W[:d]
        G[d] = GZ.sum(axis=0) + W[d]
        return 0.5 * float((W * W).sum()) + C * float((M * M).sum()), G.ravel()

    g0 = np.abs(fg(np.zeros((d + 1) * k))[1]).max()
    w0 = np.zeros((d + 1) * k) if W0 is None else W0.ravel()
    res = minimize(fg, w0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": tol * g0, "ftol": 1e-14, "maxcor": 20})
    return res.x.reshape(d + 1, k), int(res.nit)


def _linear_svc_from(W: np.ndarray, classes: np.ndarray, C: float, n_iter: int, d: int) -> Any:
    """A fitted LinearSVC holding the primal solution ``W`` (what LinearSVC.fit would store)."""
    m = _linear_svc(C, dual=False)
    m.coef_ = np.ascontiguousarray(W[:d].T)
    m.intercept_ = W[d].copy()
    m.classes_ = classes
    m.n_features_in_ = d
    m.n_iter_ = n_iter
    return m


def _sweep_linear_svm(X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], ctx: _Ctx) -> list[dict[str, Any]]:
    d = X.shape[1]
    # featx's primal solver whatever the shape: where features outnumber samples liblinear's dual coordinate
    # descent (what LinearSVC picks there) is slower still at the larger C values (flowers17: 13x).
    if ctx.levers.primal:
        X64 = X.astype(np.float64)
        parts = []
        for tr, va in folds:
            classes = np.unique(y[tr])
            parts.append((X64[tr], _ovr_targets(y[tr], classes), X64[va], y[va], classes))
        warm: list[np.ndarray | None] = [None] * len(folds)

        def fit_point(f: int, C: float, tol: float) -> float:
            Xtr, Ytr, Xva, yva, classes = parts[f]
            W, _ = _sqhinge_primal(Xtr, Ytr, C, tol=tol, W0=warm[f] if ctx.levers.warm_path else None)
            warm[f] = W
            if f == 0:
                ctx.state.setdefault("warm", {})[C] = W
            scores = Xva @ W[:d] + W[d]
            pred = classes[(scores[:, 0] > 0).astype(int)] if len(classes) == 2 else classes[scores.argmax(axis=1)]
            return _accuracy(pred, yva)

        return _walk_path(grid, folds, ctx, fit_point)
    # the plain way: liblinear per grid point (dual when features outnumber samples), points in parallel
    tol = SWEEP_TOL if ctx.levers.sweep_tol else REFIT_TOL
    return _parallel_points(grid, folds, ctx, lambda p: _linear_svc(p["C"], tol=tol), X, y, backend="loky")


def _refit_linear_svm(X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: _Ctx) -> Any:
    C = float(params["C"])
    d = X.shape[1]
    if ctx.levers.primal:
        classes = np.unique(y)
        warm = ctx.state.get("warm", {}).get(C) if ctx.levers.warm_path else None
        W, nit = _sqhinge_primal(X.astype(np.float64), _ovr_targets(y, classes), C, tol=1e-5, W0=warm)
        return _linear_svc_from(W, classes, C, nit, d)
    with _quiet():
        return _linear_svc(C).fit(X, y)


def _score_point(est: Any, X: np.ndarray, y: np.ndarray, folds: Folds) -> float:
    accs = []
    for tr, va in folds:
        with _quiet():
            accs.append(_accuracy(est.fit(X[tr], y[tr]).predict(X[va]), y[va]))
    return float(np.mean(accs))


def _parallel_points(
    grid: list[dict[str, Any]],
    folds: Folds,
    ctx: _Ctx,
    make: Callable[[dict[str, Any]], Any],
    X: np.ndarray,
    y: np.ndarray,
    *,
    backend: str,
) -> list[dict[str, Any]]:
    """Every grid point fitted from scratch (on every fold), points spread over ``ctx.n_jobs`` workers."""
    from joblib import Parallel, delayed, parallel_config

    def one(p: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        return {"params": p, "val_accuracy": _score_point(make(p), X, y, folds), "seconds": time.perf_counter() - t0}

    jobs = min(len(grid), ctx.n_jobs)
    if jobs == 1:
        return [one(p) for p in grid]
    with parallel_config(backend=backend, inner_max_num_threads=1 if backend == "loky" else None):
        return Parallel(n_jobs=jobs)(delayed(one)(p) for p in grid)


# RBF SVM: one squared-distance matrix for the grid; libsvm on precomputed kernels, exported as an rbf SVC


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared euclidean distances (float32 GEMM; clipped at 0)."""
    A32, B32 = A.astype(np.float32, copy=False), B.astype(np.float32, copy=False)
    D = A32 @ B32.T
    D *= -2.0
    D += (A32 * A32).sum(axis=1)[:, None]
    D += (B32 * B32).sum(axis=1)[None, :]
    np.maximum(D, 0.0, out=D)
    return D


def _gram_fits(n: int) -> bool:
    """Peak memory of the precomputed-kernel path: the float32 distances of all n rows (4 n^2 bytes) plus one
    float64 kernel of the rows being fitted (at most 8 n^2, the refit on train + val)."""
    return 12 * n * n <= GRAM_MAX_BYTES


def _rbf_kernel(D: np.ndarray, rows: np.ndarray, cols: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma * D[rows][:, cols]) as float64, built in place (a view of D when the rows are contiguous)."""
    r, c = _contiguous(rows), _contiguous(cols)
    sub = D[r, c] if isinstance(r, slice) and isinstance(c, slice) else D[np.ix_(rows, cols)]
    K = np.multiply(sub, -gamma, dtype=np.float64)
    np.exp(K, out=K)
    return K


def _sweep_rbf_svm(X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], ctx: _Ctx) -> list[dict[str, Any]]:
    if not (ctx.levers.gram and _gram_fits(len(X))):
        return _parallel_points(grid, folds, ctx, _svc, X, y, backend="loky")
    from joblib import Parallel, delayed, parallel_config
    from sklearn.svm import SVC

    t0 = time.perf_counter()
    D = _sq_dists(X, X)
    ctx.state["sq_dists"] = D
    gram_seconds = time.perf_counter() - t0
    gammas = sorted({float(p["gamma"]) for p in grid})
    scores: dict[tuple[float, float], list[float]] = {}
    seconds: dict[tuple[float, float], float] = {}

    def one(C: float, Ktr: np.ndarray, Kva: np.ndarray, tr: np.ndarray, va: np.ndarray) -> tuple[float, float]:
        t2 = time.perf_counter()
        acc = _accuracy(SVC(kernel="precomputed", C=C).fit(Ktr, y[tr]).predict(Kva), y[va])
        return acc, time.perf_counter() - t2

    for g in gammas:
        Cs = sorted({float(p["C"]) for p in grid if float(p["gamma"]) == g})
        for tr, va in folds:
            t1 = time.perf_counter()
            Ktr = _rbf_kernel(D, tr, tr, g)
            Kva = _rbf_kernel(D, va, tr, g)
            kernel_s = time.perf_counter() - t1
            jobs = min(len(Cs), ctx.n_jobs)
            with parallel_config(backend="threading"):  # libsvm releases the GIL; the kernels are shared, not copied
                if jobs > 1:
                    out = Parallel(n_jobs=jobs)(delayed(one)(C, Ktr, Kva, tr, va) for C in Cs)
                else:
                    out = [one(C, Ktr, Kva, tr, va) for C in Cs]
            del Ktr, Kva  # freed before the next kernels are built
            for C, (acc, s) in zip(Cs, out):
                scores.setdefault((C, g), []).append(acc)
                seconds[(C, g)] = seconds.get((C, g), 0.0) + s + (kernel_s + gram_seconds / len(gammas)) / len(Cs)
    return [
        {
            "params": p,
            "val_accuracy": float(np.mean(scores[(float(p["C"]), float(p["gamma"]))])),
            "seconds": seconds[(float(p["C"]), float(p["gamma"]))],
        }
        for p in grid
    ]


def _svc_from_precomputed(pre: Any, X: np.ndarray, params: dict[str, Any]) -> Any:
    """An rbf SVC holding the solution libsvm found on the precomputed rbf kernel of ``X``: the same dual
    problem, so the same support vectors and coefficients; only where the kernel is evaluated differs."""
    svc = _svc(params)
    for k, v in vars(pre).items():
        if k not in svc.get_params():  # fitted state (public and private), not hyper-parameters
            setattr(svc, k, v)
    svc.support_vectors_ = np.ascontiguousarray(X[pre.support_], dtype=np.float64)
    svc.shape_fit_ = X.shape
    svc._gamma = float(params["gamma"])
    svc.n_features_in_ = X.shape[1]
    return svc


def _refit_rbf_svm(X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: _Ctx, rows: np.ndarray | None = None) -> Any:
    from sklearn.svm import SVC

    D = ctx.state.get("sq_dists")
    if D is None or not ctx.levers.gram:
        with _quiet():
            return _svc(params).fit(X, y)
    sel = np.arange(len(D)) if rows is None else rows
    K = _rbf_kernel(D, sel, sel, float(params["gamma"]))
    pre = SVC(kernel="precomputed", C=float(params["C"])).fit(K, y)
    return _svc_from_precomputed(pre, X, params)


# k-NN: one neighbour search for the largest k, a distance-weighted vote for each k (as KNeighborsClassifier votes)


KNN_BLOCK_BYTES = 64 * 2**20  # query rows per block: this many bytes of float32 scores


def _knn_search(A: np.ndarray, B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``A`` for every row of ``B`` (Euclidean): (distances, indices), ascending, ties
    to the lower row.

    One float32 GEMM per block of queries gives |a|^2 - 2 a.b (which ranks like the distance) and
    ``argpartition`` the k smallest: scikit-learn's brute search upcasts float32 blocks to float64 for its GEMM,
    which is about half of its time. float32 rounding moves a squared distance by ~1e-7 |a|^2; where that could
    hide an exact duplicate (d^2 below 1e-5 of the norms) the rows are compared, so exact matches stay at 0 and
    outvote the rest, as in scikit-learn."""
    A32 = np.ascontiguousarray(A, dtype=np.float32)
    B32 = np.ascontiguousarray(B, dtype=np.float32)
    n = len(A32)
    k = min(k, n)
    a2 = np.einsum("ij,ij->i", A32, A32)
    b2 = np.einsum("ij,ij->i", B32, B32).astype(np.float64)
    dist = np.empty((len(B32), k))
    ind = np.empty((len(B32), k), dtype=np.int64)
    step = max(1, KNN_BLOCK_BYTES // (4 * max(1, n)))
    for s in range(0, len(B32), step):
        Bb = B32[s : s + step]
        S = Bb @ A32.T
        S *= -2.0
        S += a2
        cand = np.argpartition(S, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), (len(Bb), n))
        d2 = np.take_along_axis(S, cand, axis=1).astype(np.float64) + b2[s : s + step, None]
        scale = a2[cand] + b2[s : s + step, None]
        for r, j in zip(*np.nonzero(d2 <= 1e-5 * np.maximum(scale, 1e-30))):  # near-zero: exact duplicate or not
            d2[r, j] = float(((A32[cand[r, j]] - Bb[r]).astype(np.float64) ** 2).sum())
        d = np.sqrt(np.maximum(d2, 0.0))
        order = np.lexsort((cand, d), axis=1)
        dist[s : s + step] = np.take_along_axis(d, order, axis=1)
        ind[s : s + step] = np.take_along_axis(cand, order, axis=1)
    return dist, ind


def _vote(dist: np.ndarray, labels: np.ndarray, k: int, classes: np.ndarray) -> np.ndarray:
    d, lab = dist[:, :k], labels[:, :k]
    with np.errstate(divide="ignore"):
        w = 1.0 / d
    inf = np.isinf(w)
    rows = inf.any(axis=1)
    w[rows] = inf[rows]  # an exact match outvotes everything (scikit-learn's rule)
    idx = np.searchsorted(classes, lab) + len(classes) * np.arange(len(d))[:, None]
    votes = np.bincount(idx.ravel(), weights=w.ravel(), minlength=len(d) * len(classes)).reshape(len(d), len(classes))
    return classes[votes.argmax(axis=1)]


def _sweep_knn(X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], ctx: _Ctx) -> list[dict[str, Any]]:
    if not ctx.levers.one_search:
        return _parallel_points(grid, folds, ctx, lambda p: _knn(p["n_neighbors"]), X, y, backend="threading")
    accs: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    for tr, va in folds:
        ks = [int(p["n_neighbors"]) for p in grid]
        kmax = min(max(ks), len(tr))
        if ctx.levers.fast_search:
            dist, ind = _knn_search(X[tr], X[va], kmax)
        else:
            from sklearn.neighbors import NearestNeighbors

            dist, ind = NearestNeighbors(n_neighbors=kmax, algorithm="brute").fit(X[tr]).kneighbors(X[va])
        labels = y[tr][ind]
        classes = np.unique(y[tr])
        for k in ks:
            accs.setdefault(k, []).append(_accuracy(_vote(dist, labels, min(k, kmax), classes), y[va]))
    per = (time.perf_counter() - t0) / len(grid)
    return [{"params": p, "val_accuracy": float(np.mean(accs[int(p["n_neighbors"])])), "seconds": per} for p in grid]


def _refit_knn(X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: _Ctx) -> Any:
    return _knn(min(int(params["n_neighbors"]), len(y))).fit(X, y)


def _rbf_grid(d: int, n: int, var: float) -> list[dict[str, Any]]:
    base = 1.0 / (d * (var if var > 0 else 1.0))  # scikit-learn's gamma="scale"
    return [
        {"C": float(c), "gamma": float(s * base), "gamma_scale": s} for c in np.logspace(-1, 3, 5) for s in (0.03, 0.1, 0.3, 1.0)
    ]


HEAD_KINDS: dict[str, HeadKind] = {
    k.name: k
    for k in (
        HeadKind(
            "logreg",
            _logreg_steps,
            _build_logreg,
            lambda d, n, var: [{"C": float(c)} for c in np.logspace(-4, 2, 13)],
            "StandardScaler + multinomial L-BFGS logistic regression",
            _sweep_logreg,
            _refit_logreg,
        ),
        HeadKind(
            "linear-svm",
            _linear_svm_steps,
            _build_linear_svm,
            # Larger C on standardised high-dimensional features is effectively hard-margin: liblinear then runs
            # for minutes (52 s for one fit at C=1 on flowers17) and such C values were never selected.
            lambda d, n, var: [{"C": float(c)} for c in np.logspace(-5, -1, 9)],
            "StandardScaler + LinearSVC",
            _sweep_linear_svm,
            _refit_linear_svm,
            speculative_refit=True,  # 1.04-1.28x (bench_heads.md); logreg's two fits slow each other down instead
        ),
        HeadKind(
            "rbf-svm",
            _rbf_svm_steps,
            _build_rbf_svm,
            _rbf_grid,  # gamma relative to the data's scale: gamma_scale / (D * Var X)
            "StandardScaler + SVC(rbf)",
            _sweep_rbf_svm,
            _refit_rbf_svm,
            tie_break="default",
        ),
        HeadKind(
            "knn",
            _knn_steps,
            _build_knn,
            lambda d, n, var: [{"n_neighbors": k} for k in (20, 10, 5, 3, 1) if k <= n],
            "L2-normalise + k-NN (cosine), distance-weighted",
            _sweep_knn,
            _refit_knn,
            one_thread=False,  # the neighbour search is one large matrix product: 1.3-1.6x faster on both cores
        ),
    )
}
HEADS = tuple(HEAD_KINDS)


def head_kind(kind: str) -> HeadKind:
    if kind not in HEAD_KINDS:
        raise UsageError(f"unknown head '{kind}' (choose from {', '.join(HEADS)})")
    return HEAD_KINDS[kind]


def make_head(kind: str, **params: Any) -> Any:
    """An unfitted scikit-learn pipeline for head ``kind`` with hyper-parameters ``params``."""
    return head_kind(kind).build(params)


def param_grid(kind: str, *, n_features: int, n_train: int, x_var: float = 1.0) -> list[dict[str, Any]]:
    """Hyper-parameter grid, ordered from strongest to weakest regularisation. ``x_var``: variance of the
    transformed features (the RBF kernel width is relative to it)."""
    return head_kind(kind).grid(n_features, n_train, x_var)


def default_params(kind: str, *, n_features: int, x_var: float = 1.0) -> dict[str, Any]:
    """:data:`HEAD_DEFAULT_PARAMS` resolved for this data (the RBF gamma from its relative scale)."""
    p = dict(HEAD_DEFAULT_PARAMS[head_kind(kind).name])
    if "gamma_scale" in p:
        p["gamma"] = float(p["gamma_scale"] / (n_features * (x_var if x_var > 0 else 1.0)))
    return p


def predict_scores(estimator: Any, X: np.ndarray) -> np.ndarray:
    """Class probabilities; SVMs have none, so their margins go through a softmax (uncalibrated)."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    return softmax(estimator.decision_function(X))


# --------------------------------------------------------------------------------------------------
# torch logistic regression (multinomial, L-BFGS, full batch): CUDA, and streamed fits larger than memory


def _torch_device(device: str | None) -> Any:
    """None or "auto": CUDA when there is one, else the CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _torch_lbfgs_logreg(
    batches: Callable[[], Iterable[tuple[Any, Any]]],
    n: int,
    d: int,
    n_classes: int,
    C: float,
    *,
    tol: float,
    max_iter: int = 1000,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    device: str | None = None,
    max_eval: int | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise scikit-learn's objective, mean log-loss + ||W||^2 / (2 C n) (intercept unpenalised), with
    full-batch L-BFGS; ``batches()`` yields (X, y) pieces whose gradients are accumulated, so the data never
    has to be in memory at once. Binary problems use one logit, like scikit-learn. ``max_eval`` caps the
    objective evaluations (one pass over ``batches()`` each); ``stats`` receives evals, grad_max and converged.
    Returns (coef, intercept, iterations)."""
    import torch
    import torch.nn.functional as F

    dev = _torch_device(device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    k = 1 if n_classes == 2 else n_classes
    W = torch.zeros(k, d, dtype=dtype, device=dev)
    b = torch.zeros(k, dtype=dtype, device=dev)
    if init is not None:
        W.copy_(torch.as_tensor(init[0])), b.copy_(torch.as_tensor(init[1]))
    W.requires_grad_(True), b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=max_iter,
        max_eval=max_eval,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    seen: dict[tuple[float, ...], float] = {}

    def closure() -> Any:
        opt.zero_grad()
        total = 0.0
        for Xc, yc in batches():
            Xt = torch.as_tensor(Xc, device=dev).to(dtype)
            yt = torch.as_tensor(yc, device=dev)
            z = Xt @ W.T + b
            if k == 1:
                loss = F.binary_cross_entropy_with_logits(z[:, 0], yt.to(dtype), reduction="sum") / n
            else:
                loss = F.cross_entropy(z, yt.long(), reduction="sum") / n
            loss.backward()
            total += float(loss.detach())
        reg = (W * W).sum() / (2.0 * C * n)
        reg.backward()
        if stats is not None:  # this point's largest gradient, to tell afterwards whether the final point converged
            seen[_point_key(W, b)] = max(float(W.grad.abs().max()), float(b.grad.abs().max()))
        return torch.tensor(total + float(reg.detach()))

    opt.step(closure)
    state = opt.state[opt._params[0]]
    n_iter = int(state.get("n_iter", 0))
    if stats is not None:
        key = _point_key(W, b)
        if key not in seen:  # not expected: L-BFGS ends on an evaluated point; one more pass measures it
            closure()
        grad_max = seen[key]
        stats.update(evals=int(state.get("func_evals", 0)), grad_max=grad_max, converged=grad_max <= tol)
    return W.detach().cpu().numpy().astype(np.float64), b.detach().cpu().numpy().astype(np.float64), n_iter


def _point_key(W: Any, b: Any) -> tuple[float, ...]:
    w = W.detach()
    return float(w.sum()), float(w.abs().sum()), float((w * w).sum()), float(b.detach().sum())


def _export_logreg(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, C: float, n_iter: int) -> Any:
    """A plain fitted scikit-learn LogisticRegression holding a solution found elsewhere (safe to save)."""
    m = _logreg(C)
    m.coef_ = np.ascontiguousarray(coef, dtype=np.float64)
    m.intercept_ = np.ascontiguousarray(intercept, dtype=np.float64)
    m.classes_ = np.asarray(classes)
    m.n_features_in_ = int(coef.shape[1])
    m.n_iter_ = np.asarray([n_iter], dtype=np.int32)
    return m


def _torch_logreg_arrays(
    X: np.ndarray, y: np.ndarray, C: float, *, tol: float, init: Any = None, device: str | None = None
) -> Any:
    """In-memory torch fit of (already transformed) X; ``init`` a previous LogisticRegression (warm start)."""
    import torch

    classes = np.unique(y)
    idx = np.searchsorted(classes, y)
    dev = _torch_device(device)
    Xt = torch.as_tensor(X, device=dev).to(torch.float64 if dev.type == "cpu" else torch.float32)
    yt = torch.as_tensor(idx, device=dev)
    start = (init.coef_, init.intercept_) if init is not None and np.array_equal(init.classes_, classes) else None
    coef, icpt, nit = _torch_lbfgs_logreg(
        lambda: [(Xt, yt)], len(y), X.shape[1], len(classes), C, tol=tol, init=start, device=device
    )
    return _export_logreg(coef, icpt, classes, C, nit)


# --------------------------------------------------------------------------------------------------
# choosing, and fitting on arrays


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


def _log_distance(p: dict[str, Any], q: dict[str, Any]) -> float:
    keys = [k for k in ("C", "gamma_scale", "n_neighbors") if k in p and k in q]
    return sum(abs(math.log10(float(p[k]) / float(q[k]))) for k in keys)


def choose(kind: str, curve: list[dict[str, Any]], default: dict[str, Any] | None = None) -> int:
    """Index of the chosen point: the best val accuracy; ties go to the strongest regularisation (first in
    grid order), or for the RBF SVM to the point closest to its default (log scale), so a val split that
    cannot separate grid points (1-2 shots) does not push C to its smallest value and collapse the SVM."""
    best = max(c["val_accuracy"] for c in curve)
    tied = [i for i, c in enumerate(curve) if c["val_accuracy"] >= best - 1e-12]
    if head_kind(kind).tie_break == "default" and len(tied) > 1:
        ref = default or HEAD_DEFAULT_PARAMS[kind]
        return min(tied, key=lambda i: (_log_distance(curve[i]["params"], ref), i))
    return tied[0]


def grid_edge(grid: list[dict[str, Any]], params: dict[str, Any]) -> bool:
    """Whether a chosen value sits at the end of its grid axis (so the best may lie outside the grid). k = 1
    for k-NN is not an edge: there is no smaller k."""
    for key in ("C", "gamma_scale", "n_neighbors"):
        values = sorted({float(p[key]) for p in grid if key in p})
        if len(values) > 1 and key in params:
            v = float(params[key])
            if v == values[-1] or (v == values[0] and key != "n_neighbors"):
                return True
    return False


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


def _contiguous(rows: np.ndarray) -> np.ndarray | slice:
    return slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) and np.all(np.diff(rows) == 1) else rows


def fit_head_arrays(
    kind: str,
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
    5, smallest class count)), refit on all of (X, y); with fewer, ``"rule"``: :data:`HEAD_DEFAULT_PARAMS`.
    The transform (StandardScaler / Normalizer) is fitted once on X and shared by every fit and the export.
    ``solver="torch"`` (logreg only) fits with torch L-BFGS, optionally on ``device``.
    """
    hk = head_kind(kind)
    if final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {final_fit!r}")
    if solver not in SOLVERS:
        raise UsageError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if solver == "torch" and kind != "logreg":
        raise UsageError(f"solver 'torch' fits logistic regression only, not a {kind} head")
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y) or len(y) == 0:
        raise UsageError(f"X must be (rows, features) with one label per row, got {X.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise UsageError("a head needs at least two classes in the training rows")
    if not np.isfinite(X).all() or (X_val is not None and not np.isfinite(np.asarray(X_val)).all()):
        raise UsageError("features contain NaN or infinite values")  # one line now, not an error deep in a sweep
    ctx = _Ctx(levers or SweepLevers(), max(1, n_jobs or os.cpu_count() or 1), solver, device, seed)
    with _threads(ctx, hk):
        return _fit_head_arrays(hk, kind, X, y, X_val, y_val, cv_folds, final_fit, grid, seed, ctx)


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
    kind: str,
    X: np.ndarray,
    y: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    cv_folds: int | None,
    final_fit: str,
    grid: list[dict[str, Any]] | None,
    seed: int,
    ctx: _Ctx,
) -> HeadFit:
    steps = hk.steps()
    prep = fit_transform_step(steps[0][1], X)  # one transform, fitted once, shared by every fit and exported
    Xt = prep.transform(X)
    x_var = float(Xt.var()) if kind == "rbf-svm" else 1.0
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
    default = default_params(kind, n_features=X.shape[1], x_var=x_var)
    rows = _contiguous(fit_rows)
    speculative = (
        _SpeculativeRefit(lambda p: hk.refit(X_all[rows], y_all[rows], p, ctx))
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
                curve = hk.sweep(X_all, y_all, folds, full_grid, ctx)
            except BaseException:
                if speculative:
                    speculative.result({})  # stop the refit thread before the error goes up
                raise
            finally:
                ctx.state.pop("on_best", None)
            best_params = curve[choose(kind, curve, default)]["params"]
        t1 = time.perf_counter()
        clf = speculative.result(best_params) if speculative else None
    if clf is not None:
        ctx.info["refit_overlapped"] = True
    elif kind == "rbf-svm":
        clf = _refit_rbf_svm(X_all[rows], y_all[rows], best_params, ctx, rows=fit_rows)
    else:
        clf = hk.refit(X_all[rows], y_all[rows], best_params, ctx)
    ctx.info.update(sweep_seconds=t1 - t0, refit_seconds=time.perf_counter() - t1)
    estimator = _pipeline(steps, prep, clf)
    edge = selection != "rule" and grid_edge(full_grid, best_params)
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
    scaler, lr = hf.estimator.steps[0][1], hf.estimator.steps[1][1]
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
    if hf.selection == "val" and X_val is not None and y_val is not None:
        val_acc = _accuracy(hf.estimator.predict(np.asarray(X_val)), np.asarray(y_val))
    elif hf.selection == "cv":
        val_acc = max(c["val_accuracy"] for c in hf.curve)
    else:
        val_acc = float("nan")
    curve = [{"C": float(c["params"]["C"]), "val_accuracy": c["val_accuracy"]} for c in hf.curve]
    return LinearProbe(coef, intercept, float(hf.best_params["C"]), val_acc, curve, hf.at_grid_edge, hf.selection)


def sweep(
    kind: str,
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
    ctx = _Ctx(levers or SweepLevers(), max(1, n_jobs or os.cpu_count() or 1), solver)
    with _threads(ctx, hk):
        prep = fit_transform_step(hk.steps()[0][1], Xtr)
        X = np.concatenate([prep.transform(Xtr), prep.transform(Xva)])
        y = np.concatenate([ytr, yva])
        grid = grid or hk.grid(Xtr.shape[1], len(ytr), float(X[: len(ytr)].var()) if kind == "rbf-svm" else 1.0)
        return hk.sweep(X, y, [(np.arange(len(ytr)), np.arange(len(ytr), len(y)))], grid, ctx)


@dataclass
class FittedHead:
    """A head refit on train + val with the chosen hyper-parameters, plus everything needed to use it."""

    kind: str
    estimator: Any
    classes: list[str]
    best_params: dict[str, Any]
    val_accuracy: float
    sweep: list[dict[str, Any]]
    test_metrics: dict[str, Any] | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return predict_scores(self.estimator, X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.estimator.predict(X)

    @property
    def embedder(self) -> EmbedderSpec:
        """The embedder whose features this head expects (heads written by featx 0.1.0 are converted)."""
        md = self.metadata
        if "weights_id" in (md.get("embedder") or {}):
            return EmbedderSpec.from_legacy_metadata(md)
        return EmbedderSpec.from_dict(md["embedder"])


def check_same_embedder(sets: dict[str, Any]) -> None:
    """All caches fed to one head must come from the same backbone, weights, layer and preprocessing."""
    items = list(sets.items())
    ref_name, ref = items[0]
    for name, fs in items[1:]:
        diff = ref.embedder.differences(fs.embedder)
        if diff:
            raise MismatchError(
                f"{name} cache differs from {ref_name} cache in {', '.join(diff)}: {fs.path.name} vs {ref.path.name}"
            )
        if fs.classes != ref.classes:
            raise MismatchError(f"{name} cache has other classes than {ref_name} cache")


def split_features(train: FeatureSet, val: FeatureSet | None, test: FeatureSet | None, plan: SplitPlan) -> dict[str, FeatureSet]:
    """Carve missing val/test splits out of the train cache exactly as fine-tuning does (same rows)."""
    labels = train.split_labels if train.split_labels is not None else train.labels
    carved = plan.carve(labels, has_val=val is not None, has_test=test is not None)
    out = {name: train.select(RowSelection("train", rows)) for name, rows in carved.items()}
    if val is not None:
        out["val"] = val
    if test is not None:
        out["test"] = test
    return out


FINAL_FITS = ("train+val", "train")


def _head_metadata(kind: str, train: Any, val: Any, test: Any, plan: SplitPlan, **extra: Any) -> dict[str, Any]:
    return {
        "featx_version": __version__,
        "created_at": now_iso(),
        "head": kind,
        "classes": list(train.classes),
        "embedder": train.embedder.to_dict(),
        **extra,
        "caches": {n: fs.attrs.get("key") for n, fs in (("train", train), ("val", val), ("test", test)) if fs is not None},
        "split_plan": {"val_fraction": plan.val_fraction, "test_fraction": plan.test_fraction, "seed": plan.seed},
        "libraries": {p: importlib.metadata.version(p) for p in ("scikit-learn", "numpy")},
    }


# float32 features per chunk read and processed at once. Each chunk briefly exists ~4 times (read, selected,
# standardised, float64 for the solver), and the next one is read meanwhile: at 32 MiB a streamed fit needed
# ~800 MB and a 768 MB limit killed it.
STREAM_CHUNK_BYTES = 8 * 2**20
# The C sweep of a streamed fit runs in memory on a seeded random subsample of the training rows of at most this
# many bytes of float32 features (13,107 rows at 1280 dims): a full-batch L-BFGS fit costs ~30 passes over the
# rows, so sweeping a 13-point grid streamed would read the cache hundreds of times.
STREAM_SWEEP_BYTES = 64 * 2**20
STREAM_MAX_PASSES = 200  # the streamed refit stops here (and warns) if L-BFGS has not converged


def fit_head(
    train: FeatureSet | str | os.PathLike[str],
    val: FeatureSet | str | os.PathLike[str] | None = None,
    test: FeatureSet | str | os.PathLike[str] | None = None,
    *,
    kind: str = "logreg",
    plan: SplitPlan | None = None,
    grid: list[dict[str, Any]] | None = None,
    n_jobs: int | None = None,
    final_fit: str = "train+val",
    solver: str = "sklearn",
    device: str | None = None,
    stream: bool = False,
    chunk_rows: int | None = None,
    sweep_rows: int | None = None,
    max_passes: int = STREAM_MAX_PASSES,
    levers: SweepLevers | None = None,
) -> FittedHead:
    """Sweep on val, refit with the chosen values, evaluate once on test. Missing val/test are carved from train.

    ``final_fit``: ``train+val`` (default; Kornblith et al. 2019) refits on both splits, ``train`` keeps the
    model fitted on train alone, as fine-tuning does with ``--final-fit train``. ``solver="torch"``: logistic
    regression with torch L-BFGS (on ``device``). ``stream=True``: train/val/test are cache files read in row
    chunks, never whole (logreg only; ``sweep_rows``, ``max_passes``: see :func:`fit_head_streamed`).
    """
    if stream:
        return fit_head_streamed(
            train,
            val,
            test,
            kind=kind,
            plan=plan,
            grid=grid,
            final_fit=final_fit,
            device=device,
            chunk_rows=chunk_rows,
            sweep_rows=sweep_rows,
            max_passes=max_passes,
            levers=levers,
        )
    head_kind(kind)  # raises for an unknown kind
    if final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {final_fit!r}")
    if not isinstance(train, FeatureSet) or not all(s is None or isinstance(s, FeatureSet) for s in (val, test)):
        raise UsageError("fit_head takes loaded caches (FeatureSet); pass stream=True to read cache files in chunks")
    check_same_embedder({n: fs for n, fs in {"train": train, "val": val, "test": test}.items() if fs is not None})
    plan = plan or SplitPlan()
    parts = split_features(train, val, test, plan)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    if len(np.unique(tr.labels)) < 2:
        raise UsageError("a head needs at least two classes in the training split")
    t0 = time.perf_counter()
    hf = fit_head_arrays(
        kind,
        tr.features,
        tr.labels,
        X_val=va.features if len(va.labels) else None,
        y_val=va.labels if len(va.labels) else None,
        final_fit=final_fit,
        grid=grid,
        n_jobs=n_jobs,
        seed=plan.seed,
        solver=solver if kind == "logreg" else "sklearn",  # the torch solver is for logistic regression only
        device=device,
        levers=levers,
    )
    fit_seconds = time.perf_counter() - t0
    estimator = hf.estimator
    metrics = classification_metrics(te.labels, estimator.predict(te.features), len(train.classes)) if len(te.labels) else None
    val_acc = max(c["val_accuracy"] for c in hf.curve) if hf.curve else float("nan")
    metadata = _head_metadata(
        kind,
        train,
        val,
        test,
        plan,
        best_params=hf.best_params,
        val_accuracy=val_acc,
        fit_seconds=fit_seconds,
        final_fit=final_fit,
        n_train=len(tr.labels),
        n_val=len(va.labels),
        n_fit=hf.n_fit,
        n_test=len(te.labels),
        selection=hf.selection,
        at_grid_edge=hf.at_grid_edge,
        solver=solver if kind == "logreg" else "sklearn",
        **hf.info,
    )
    return FittedHead(kind, estimator, list(train.classes), hf.best_params, val_acc, hf.curve, metrics, metadata)


# --------------------------------------------------------------------------------------------------
# streamed fit: caches larger than memory


def _open_reader(ref: Any) -> Any:
    from featx.cache import CacheReader

    if isinstance(ref, CacheReader):
        return ref
    if isinstance(ref, FeatureSet):
        return CacheReader(ref.path)
    return CacheReader(ref)


def _prefetched(items: Iterator[Any]) -> Iterator[Any]:
    """Iterate ``items`` with the next one produced in a background thread: chunk reads (HDF5, checksums) overlap
    with the solver's work on the current chunk (torch and numpy release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix="featx-read") as pool:
        pending = pool.submit(next, items, done)
        while (item := pending.result()) is not done:
            pending = pool.submit(next, items, done)
            yield item


def _subsample(rows: np.ndarray, labels: np.ndarray, m: int, seed: int) -> np.ndarray:
    """``m`` of ``rows`` drawn at random (seeded), plus one row of every class the draw missed; sorted."""
    if m >= len(rows):
        return np.sort(rows)
    pick = np.random.default_rng(seed).choice(len(rows), size=m, replace=False)
    missing = np.setdiff1d(labels, labels[pick])
    extra = [int(np.flatnonzero(labels == c)[0]) for c in missing]
    return np.sort(rows[np.concatenate([pick, np.asarray(extra, dtype=np.int64)])])


def fit_head_streamed(
    train: Any,
    val: Any = None,
    test: Any = None,
    *,
    kind: str = "logreg",
    plan: SplitPlan | None = None,
    grid: list[dict[str, Any]] | None = None,
    final_fit: str = "train+val",
    device: str | None = None,
    chunk_rows: int | None = None,
    sweep_rows: int | None = None,
    max_passes: int = STREAM_MAX_PASSES,
    levers: SweepLevers | None = None,
) -> FittedHead:
    """:func:`fit_head` for caches that need not fit in memory (logistic regression only).

    Pass 1 fits the StandardScaler (``partial_fit``) and keeps a seeded random subsample of ``sweep_rows``
    training rows (default: STREAM_SWEEP_BYTES of features; all rows when they fit). The C path is fitted in memory
    on that subsample (warm starts, sweep tolerance) and every point is scored on the whole val split in one pass.
    The final fit is torch L-BFGS on full-batch gradients accumulated chunk by chunk over all training (+ val) rows
    (scikit-learn's objective at the chosen C), warm-started from the subsample's solution: one pass per function
    evaluation, at most ``max_passes``. Memory holds the subsample, two chunks of rows (``chunk_rows``, default
    STREAM_CHUNK_BYTES of features), the labels and the model, never the feature matrix."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    if kind != "logreg":
        raise UsageError(f"streamed fits support the logreg head only, not {kind}")
    if final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {final_fit!r}")
    if max_passes < 1 or (sweep_rows is not None and sweep_rows < 1):
        raise UsageError("max_passes and sweep_rows must be positive")
    plan = plan or SplitPlan()
    lev = levers or SweepLevers()
    readers = {n: _open_reader(r) for n, r in (("train", train), ("val", val), ("test", test)) if r is not None}
    try:
        check_same_embedder(readers)
        tr_reader = readers["train"]
        d = tr_reader.feature_dim
        step = chunk_rows or max(tr_reader.chunk_rows, STREAM_CHUNK_BYTES // (4 * max(1, d)))
        carved = plan.carve(tr_reader.labels, has_val="val" in readers, has_test="test" in readers)
        sources: dict[str, list[tuple[Any, np.ndarray | None]]] = {}
        for name in ("train", "val", "test"):
            if name in readers and name != "train":
                sources[name] = [(readers[name], None)]
            elif name in carved:
                sources[name] = [(tr_reader, tr_reader.rows_of(RowSelection("train", carved[name])))]

        def raw_chunks(name: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            for reader, rows in sources.get(name, []):
                yield from _prefetched(reader.iter_chunks(rows, chunk_rows=step))

        def labels_of(name: str) -> np.ndarray:
            """The labels of a split's valid rows in the order raw_chunks yields them, without reading features."""
            return np.concatenate([np.empty(0, np.int64)] + [r.labels[r.valid_rows(rows)] for r, rows in sources.get(name, [])])

        t0 = time.perf_counter()
        reader0, rows0 = sources["train"][0]
        tr_rows = reader0.valid_rows(rows0)
        if len(tr_rows) == 0:
            raise UsageError("the training split has no decodable rows")
        y_tr = reader0.labels[tr_rows]
        classes = np.unique(y_tr)
        if len(classes) < 2:
            raise UsageError("a head needs at least two classes in the training split")
        m = sweep_rows or max(1, STREAM_SWEEP_BYTES // (4 * max(1, d)))
        sub_rows = _subsample(tr_rows, y_tr, m, plan.seed)
        scaler = StandardScaler()
        sub_X, sub_y = [], []
        for r, Xc, yc in raw_chunks("train"):  # pass 1: scaler statistics and the sweep's subsample
            scaler.partial_fit(Xc)
            take = np.isin(r, sub_rows, assume_unique=True)
            if take.any():
                sub_X.append(Xc[take]), sub_y.append(yc[take])
        shrink_scaler(scaler)
        mean32, scale32 = scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)

        def standardise(Xc: np.ndarray) -> np.ndarray:
            Xc -= mean32  # the scaler's transform, in place and in float32 (each chunk is its own copy)
            Xc /= scale32
            return Xc

        X_sub = standardise(np.concatenate(sub_X))
        del sub_X
        y_sub = np.concatenate(sub_y)
        y_va = labels_of("val")

        def standardised(names: tuple[str, ...]) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
            def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                for name in names:
                    for _, Xc, yc in raw_chunks(name):
                        keep = np.isin(yc, classes)
                        yield standardise(Xc if keep.all() else Xc[keep]), np.searchsorted(classes, yc[keep])

            return gen

        def predict_split(models: list[tuple[np.ndarray, np.ndarray]], name: str) -> list[np.ndarray]:
            out: list[list[np.ndarray]] = [[] for _ in models]
            for _, Xc, _ in raw_chunks(name):
                Xs = scaler.transform(Xc)  # exactly what the exported pipeline does, so the metrics are the head's
                for j, (coef, icpt) in enumerate(models):
                    z = Xs @ coef.T + icpt
                    out[j].append(classes[(z[:, 0] > 0).astype(int)] if z.shape[1] == 1 else classes[z.argmax(axis=1)])
            return [np.concatenate(o) if o else np.empty(0, classes.dtype) for o in out]

        grid = grid or head_kind(kind).grid(d, len(y_tr), 1.0)
        ctx = _Ctx(lev, 1, "torch", device)
        fits: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        if len(y_va):
            selection, curve = "val", []
            tol = SWEEP_TOL if lev.sweep_tol else REFIT_TOL
            order = _path_order(grid)
            model = None
            with _threads(ctx, head_kind(kind)):
                for i in order:  # the whole path on the subsample: fits are cheap, val is scored in one pass below
                    t_point = time.perf_counter()
                    C = float(grid[i]["C"])
                    model = model if lev.warm_path and model is not None else _logreg(C, tol)
                    model.set_params(C=C, tol=tol, warm_start=lev.warm_path)
                    with _quiet():
                        model.fit(X_sub, np.searchsorted(classes, y_sub))
                    fits[C] = (model.coef_.copy(), model.intercept_.copy())
                    curve.append({"params": grid[i], "val_accuracy": 0.0, "seconds": time.perf_counter() - t_point})
            preds = predict_split([fits[float(grid[i]["C"])] for i in order], "val")
            for point, pred in zip(curve, preds):
                point["val_accuracy"] = _accuracy(pred, y_va)
            curve = [curve[order.index(i)] for i in range(len(grid))]
            best_params = curve[choose(kind, curve)]["params"]
            ctx.info["stopped_early"] = False
        else:
            selection, curve, best_params = "rule", [], default_params(kind, n_features=d)
        del X_sub
        t1 = time.perf_counter()
        names = ("train", "val") if final_fit == "train+val" else ("train",)
        n_fit = len(y_tr) + (int(np.isin(y_va, classes).sum()) if final_fit == "train+val" else 0)
        C = float(best_params["C"])
        stats: dict[str, Any] = {}
        coef, icpt, nit = _torch_lbfgs_logreg(
            standardised(names),
            n_fit,
            d,
            len(classes),
            C,
            tol=REFIT_TOL,
            init=fits.get(C) if lev.warm_path else None,
            device=device,
            max_eval=max_passes,
            stats=stats,
        )
        if not stats["converged"]:
            warnings.warn(
                f"streamed logreg fit stopped after {stats['evals']} passes without converging (largest gradient "
                f"{stats['grad_max']:.2g} > tol {REFIT_TOL:g}); pass a larger max_passes",
                ConvergenceWarning,
                stacklevel=2,
            )
        estimator = _pipeline(_logreg_steps(), scaler, _export_logreg(coef, icpt, classes, C, nit))
        ctx.info.update(
            sweep_seconds=t1 - t0,
            refit_seconds=time.perf_counter() - t1,
            sweep_rows=len(y_sub),
            refit_passes=stats["evals"],
            refit_converged=stats["converged"],
        )
        fit_seconds = time.perf_counter() - t0
        te_labels = labels_of("test")
        metrics = None
        if len(te_labels):
            metrics = classification_metrics(te_labels, predict_split([(coef, icpt)], "test")[0], len(tr_reader.classes))
        val_acc = max(c["val_accuracy"] for c in curve) if curve else float("nan")
        metadata = _head_metadata(
            kind,
            tr_reader,
            readers.get("val"),
            readers.get("test"),
            plan,
            best_params=best_params,
            val_accuracy=val_acc,
            fit_seconds=fit_seconds,
            final_fit=final_fit,
            n_train=len(y_tr),
            n_val=len(y_va),
            n_fit=n_fit,
            n_test=len(te_labels),
            selection=selection,
            at_grid_edge=selection != "rule" and grid_edge(grid, best_params),
            solver="torch",
            stream=True,
            chunk_rows=step,
            **ctx.info,
        )
        return FittedHead(kind, estimator, list(tr_reader.classes), best_params, val_acc, curve, metrics, metadata)
    finally:
        for name, r in readers.items():
            if r is not ({"train": train, "val": val, "test": test}[name]):
                r.close()


def head_summary(head: FittedHead) -> dict[str, Any]:
    """JSON-able record of a fitted head: metadata, the sweep curve and test metrics."""
    return {**head.metadata, "sweep": head.sweep, "test_metrics": head.test_metrics}


def save_head(head: FittedHead, path: str | os.PathLike[str]) -> Path:
    """Write the head as a skops file (no pickle) and a JSON summary beside it (``.json``)."""
    import skops.io as sio

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {"estimator": head.estimator, "summary_json": json.dumps(head_summary(head))}
    tmp = p.with_name(p.name + ".tmp")
    sio.dump(payload, tmp)
    os.replace(tmp, p)
    p.with_suffix(".json").write_text(json.dumps(head_summary(head), indent=2))
    return p


# --------------------------------------------------------------------------------------------------
# Loading head files from anywhere: only what featx writes, checked before anything is constructed
#
# skops builds objects from a JSON schema of typed nodes. Its own default trust set is broad (every public
# scikit-learn estimator, numpy and scipy ufuncs, ...) and ``trusted=`` can only add to it, so featx checks
# the schema itself against the exact node types that featx writes, then hands skops that same list.

PAYLOAD_KEYS = frozenset({"estimator", "summary_json"})
_CONTAINER_NODE_TYPES = frozenset(
    {
        ("DictNode", "builtins.dict"),
        ("ListNode", "builtins.list"),
        ("TupleNode", "builtins.tuple"),
        ("JsonNode", "builtins.str"),  # JSON-encoded primitives (numbers, strings, bools, None)
        ("TypeNode", "builtins.str"),  # the key type of dicts
        ("NdArrayNode", "numpy.ndarray"),  # stored with numpy's own format, read with allow_pickle=False
        ("NdArrayNode", "numpy.float64"),  # numpy float scalars (e.g. StandardScaler.n_samples_seen_)
    }
)
_MAX_SCHEMA_BYTES = 64 * 2**20
_MAX_COMPRESSION_RATIO = 200  # arrays of features never compress like this; zip bombs do


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def safe_node_types() -> frozenset[tuple[str, str]]:
    """Every (skops loader, type) a featx head file may hold: the containers and numpy arrays above, the
    Pipeline, and the exact step classes of each registered head kind."""
    from sklearn.pipeline import Pipeline

    estimators = {("ObjectNode", _type_name(Pipeline))}
    estimators |= {("ObjectNode", _type_name(cls)) for kind in HEAD_KINDS.values() for _, cls in kind.steps()}
    return _CONTAINER_NODE_TYPES | frozenset(estimators)


def _refuse(p: Path, why: str) -> HeadFileError:
    return HeadFileError(f"refusing to load head file {p}: {why}")


def _vet_head_file(p: Path) -> None:
    """Check the archive and every node of its schema against :func:`safe_node_types`; raise on the first
    problem. Nothing is imported or constructed from the file here."""
    import zipfile
    import zlib

    allowed = safe_node_types()
    if not zipfile.is_zipfile(p):
        raise _refuse(p, "it is not a skops archive (featx never opens pickles); re-create it with featx fit-head")
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise _refuse(p, "the archive lists a member twice")
            if "schema.json" not in names:
                raise _refuse(p, "it has no schema.json; it is not a head file written by featx")
            for info in infos:
                if info.file_size > _MAX_COMPRESSION_RATIO * max(info.compress_size, 1024):
                    raise _refuse(p, f"member {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}x")
            schema_info = z.getinfo("schema.json")
            if schema_info.file_size > _MAX_SCHEMA_BYTES:
                raise _refuse(p, f"schema.json is {schema_info.file_size} bytes")
            bad = z.testzip()  # CRC of every member: truncation and bit rot
            if bad is not None:
                raise _refuse(p, f"member {bad!r} is damaged (CRC mismatch); re-create the head with featx fit-head")
            schema = json.loads(z.read("schema.json"))
    except HeadFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise _refuse(
            p, f"the archive is damaged or truncated ({type(exc).__name__}); re-create it with featx fit-head"
        ) from None

    files: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        if "__loader__" in node or "__class__" in node or "__module__" in node:
            loader, module, cls = node.get("__loader__"), node.get("__module__"), node.get("__class__")
            if not all(isinstance(v, str) for v in (loader, module, cls)):
                raise _refuse(p, f"malformed node at {where}")
            if (loader, f"{module}.{cls}") not in allowed:
                raise _refuse(
                    p,
                    f"it contains type {module}.{cls} ({loader}) at {where}, which featx never writes "
                    "(allowed: featx.heads.safe_node_types())",
                )
            if loader == "NdArrayNode":
                if node.get("type") != "numpy" or not isinstance(node.get("file"), str):
                    raise _refuse(p, f"array node at {where} is not stored in numpy's format")
                files.append(node["file"])
        for key, value in node.items():
            walk(value, f"{where}.{key}")

    walk(schema, "$")
    content = schema.get("content") if isinstance(schema, dict) else None
    if schema.get("__loader__") != "DictNode" or not isinstance(content, dict) or set(content) != PAYLOAD_KEYS:
        got = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise _refuse(p, f"its payload must hold exactly the keys {sorted(PAYLOAD_KEYS)}, it holds {got}")
    if content["estimator"].get("__loader__") != "ObjectNode" or content["summary_json"].get("__loader__") != "JsonNode":
        raise _refuse(p, "its estimator or summary is not stored the way featx writes them")
    extra = sorted(set(names) - {"schema.json", *files})
    if extra:
        raise _refuse(p, f"the archive holds members that no node refers to, e.g. {extra[0]!r}")
    missing = sorted(set(files) - set(names))
    if missing:
        raise _refuse(p, f"the archive lacks array member {missing[0]!r}; re-create the head with featx fit-head")


def _check_estimator(p: Path, kind: str, est: Any) -> None:
    """The loaded pipeline has exactly the steps featx builds for ``kind``, and fitted arrays whose shapes and
    dtypes agree with each other (libsvm and the k-NN search index into them without bounds checks)."""
    from sklearn.pipeline import Pipeline

    expected = head_kind(kind).steps()
    if type(est) is not Pipeline or not isinstance(getattr(est, "steps", None), list):
        raise _refuse(p, f"its estimator is a {type(est).__name__}, not the Pipeline featx writes")
    got = [(name, type(step)) for name, step in est.steps] if all(isinstance(s, tuple) and len(s) == 2 for s in est.steps) else []
    if got != list(expected):
        raise _refuse(p, f"its pipeline steps {[n for n, _ in got]} are not those of a {kind} head")

    def arr(obj: Any, name: str, ndim: int, kinds: str) -> np.ndarray:
        a = getattr(obj, name, None)
        if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype.kind not in kinds:
            raise _refuse(p, f"{type(obj).__name__}.{name} is missing or malformed")
        return a

    def ok(cond: bool, what: str) -> None:
        if not cond:
            raise _refuse(p, f"inconsistent fitted state: {what}")

    first, last = est.steps[0][1], est.steps[-1][1]
    d = getattr(first, "n_features_in_", None)
    ok(isinstance(d, int) and d > 0, "n_features_in_")
    if hasattr(first, "mean_"):  # StandardScaler
        ok(arr(first, "mean_", 1, "f").shape == (d,) and arr(first, "scale_", 1, "f").shape == (d,), "scaler width")
    else:  # Normalizer
        ok(first.norm == "l2", "normalizer norm")
    classes = arr(last, "classes_", 1, "iu")
    k = len(classes)
    ok(k >= 2 and getattr(last, "n_features_in_", None) == d, "classes or width of the classifier")
    if kind in ("logreg", "linear-svm"):
        rows = 1 if k == 2 else k
        ok(arr(last, "coef_", 2, "f").shape == (rows, d) and arr(last, "intercept_", 1, "f").shape == (rows,), "coef_ shape")
    elif kind == "rbf-svm":
        sv = arr(last, "support_vectors_", 2, "f")
        n_sv = sv.shape[0]
        n_support = arr(last, "_n_support", 1, "i")
        ok(sv.dtype == np.float64 and sv.shape[1] == d and n_sv > 0, "support vectors")
        ok(n_support.shape == (k,) and int(n_support.sum()) == n_sv and (n_support >= 0).all(), "_n_support")
        ok(arr(last, "_dual_coef_", 2, "f").shape == (k - 1, n_sv), "_dual_coef_")
        ok(arr(last, "_intercept_", 1, "f").shape == (k * (k - 1) // 2,), "_intercept_")
        ok(arr(last, "support_", 1, "i").shape == (n_sv,), "support_")
        ok(tuple(getattr(last, "shape_fit_", ()))[1:] == (d,) and last.kernel == "rbf" and not last._sparse, "kernel")
        ok(arr(last, "_probA", 1, "f").size == 0 and arr(last, "_probB", 1, "f").size == 0, "probability arrays")
    elif kind == "knn":
        fit_x = arr(last, "_fit_X", 2, "f")
        y = arr(last, "_y", 1, "iu")
        n = fit_x.shape[0]
        ok(last._fit_method == "brute" and getattr(last, "_tree", None) is None, "search method")
        ok(fit_x.shape[1] == d and y.shape == (n,) and last.n_samples_fit_ == n, "training rows")
        ok(isinstance(last.n_neighbors, int) and 1 <= last.n_neighbors <= n and last.weights in ("distance", "uniform"), "k")
        ok(y.size == 0 or (0 <= y.min() and y.max() < k), "labels")
        ok(last.effective_metric_ == "euclidean", "metric")


def load_head(path: str | os.PathLike[str]) -> FittedHead:
    """Load a head saved by :func:`save_head`.

    The file is vetted before anything is built from it: an intact archive, only the node types featx
    writes (:func:`safe_node_types`), exactly the payload keys featx writes, no stray members. After
    loading, the pipeline must have the steps of its head kind and consistent fitted arrays.
    """
    import skops.io as sio

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"head file not found: {p}")
    _vet_head_file(p)
    allowed_names = sorted({name for _, name in safe_node_types()})
    untrusted = sio.get_untrusted_types(file=p)
    refused = [t for t in untrusted if t not in allowed_names]
    if refused:  # cannot happen after the schema walk; kept as a second, independent check
        raise _refuse(p, f"it contains type {refused[0]}, which featx never writes")
    try:
        payload = sio.load(p, trusted=allowed_names)
    except Exception as exc:
        raise _refuse(p, f"skops could not read it ({type(exc).__name__}); re-create it with featx fit-head") from None
    if type(payload) is not dict or set(payload) != PAYLOAD_KEYS or not isinstance(payload["summary_json"], str):
        raise _refuse(p, "its payload is not the one featx writes")
    try:
        s = json.loads(payload["summary_json"])
        kind, classes = s["head"], s["classes"]
        best, val_acc = s["best_params"], s["val_accuracy"]
    except (ValueError, KeyError, TypeError):
        raise _refuse(p, "its summary is not a featx head summary; re-create it with featx fit-head") from None
    if kind not in HEAD_KINDS:
        raise _refuse(p, f"unknown head kind {kind!r} (this featx knows {', '.join(HEADS)})")
    _check_estimator(p, kind, payload["estimator"])
    if len(classes) != len(payload["estimator"].steps[-1][1].classes_):
        raise _refuse(p, "its summary and its classifier disagree on the number of classes")
    return FittedHead(
        kind,
        payload["estimator"],
        classes,
        best,
        val_acc,
        s.get("sweep", []),
        s.get("test_metrics"),
        {k: v for k, v in s.items() if k not in ("sweep", "test_metrics")},
    )
