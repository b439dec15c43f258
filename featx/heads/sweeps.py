"""The sweep algorithms of the built-in kinds, and their refits.

Every fit of a sweep and the final refit share one transform (fitted once, exported with the pipeline).
Logistic regression walks the C path from strong to weak regularisation with warm starts and a loose tolerance,
stopping once validation accuracy has clearly peaked (:func:`_walk_path`), then refits at full tolerance. The
linear SVM solves its primal (L-BFGS on the squared hinge, every class at once) along the same warm path. The RBF
SVM computes one squared-distance matrix for the whole grid and fits libsvm on precomputed kernels. k-NN searches
neighbours once for the largest k and votes for every k. Kinds without a sweep of their own fit every grid point
from scratch (:func:`each_point`). Exported estimators are always the plain scikit-learn classes of the declared
steps, so saved heads load under the allow-list.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from featx.heads.builders import REFIT_TOL, SWEEP_TOL, _knn, _linear_svc, _logreg, _svc
from featx.heads.kinds import Folds, Grid, HeadKind, Sweep, SweepContext
from featx.heads.torch_solver import _torch_logreg_arrays

PATIENCE = 3  # stop a regularisation path after this many consecutive points strictly below the best so far
# A warm-started path carries each point's approximate iterate into the next: two points whose val accuracies differ
# by a couple of images can swap order with the path, and a 1e-5 change in the features (PyTorch vs ONNX Runtime)
# can swap them. The points within this many val images of the path's best are scored again by a cold fit at the
# refit's tolerance (what each point's own converged fit gives, independent of the path) before the choice.
NEAR_TIE_IMAGES = 2
GRAM_MAX_BYTES = int(os.environ.get("FEATX_GRAM_MAX_MB", "4096")) * 2**20  # above: per-point RBF fits instead


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


def _threads(ctx: SweepContext, hk: HeadKind) -> contextlib.AbstractContextManager[Any]:
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
    grid: list[dict[str, Any]], folds: Folds, ctx: SweepContext, fit_point: Callable[[int, float, float, bool], float]
) -> list[dict[str, Any]]:
    """Score grid points along the C path; ``fit_point(fold, C, tol, warm) -> val accuracy`` keeps its own warm
    state (used and updated when ``warm``). Stops after PATIENCE consecutive points strictly below the best so far
    (lever ``early_stop``). With a warm path, the near ties of the best are then scored again from cold starts."""
    tol = SWEEP_TOL if ctx.levers.sweep_tol else REFIT_TOL
    curve: dict[int, dict[str, Any]] = {}
    best, best_i, below, proposed = -1.0, -1, 0, -1
    for i in _path_order(grid):
        t0 = time.perf_counter()
        acc = float(np.mean([fit_point(f, float(grid[i]["C"]), tol, ctx.levers.warm_path) for f in range(len(folds))]))
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
    near = near_ties({i: c["val_accuracy"] for i, c in curve.items()}, min(len(va) for _, va in folds))
    ctx.info["cold_rescored"] = []  # the C values scored again from cold starts
    if ctx.levers.warm_path and len(near) > 1:
        from concurrent.futures import ThreadPoolExecutor

        def cold(task: tuple[int, int]) -> tuple[float, float]:  # independent fits: spread over n_jobs threads
            t0 = time.perf_counter()
            acc = fit_point(task[1], float(grid[task[0]]["C"]), REFIT_TOL, False)
            return acc, time.perf_counter() - t0

        tasks = [(i, f) for i in near for f in range(len(folds))]
        with ThreadPoolExecutor(max(1, min(ctx.n_jobs, len(tasks))), thread_name_prefix="featx-near-ties") as pool:
            done = dict(zip(tasks, pool.map(cold, tasks)))
        for i in near:
            curve[i]["val_accuracy"] = float(np.mean([done[i, f][0] for f in range(len(folds))]))
            curve[i]["seconds"] += sum(done[i, f][1] for f in range(len(folds)))
        ctx.info["cold_rescored"] = [float(grid[i]["C"]) for i in near]
    return [curve[i] for i in sorted(curve)]


def near_ties(val_accuracy: dict[int, float], n_val: int) -> list[int]:
    """The points whose val accuracy is within NEAR_TIE_IMAGES val images of the best (in the mapping's order)."""
    best = max(val_accuracy.values())
    return [i for i, acc in val_accuracy.items() if acc >= best - NEAR_TIE_IMAGES / max(n_val, 1) - 1e-12]


def _sweep_logreg(X: np.ndarray, y: np.ndarray, folds: Folds, grid: Grid, ctx: SweepContext) -> list[dict[str, Any]]:
    parts = [(X[tr], y[tr], X[va], y[va]) for tr, va in folds]
    if ctx.solver == "torch":
        warm_t: list[Any] = [None] * len(folds)

        def fit_point_t(f: int, C: float, tol: float, warm: bool) -> float:
            Xtr, ytr, Xva, yva = parts[f]
            lr = _torch_logreg_arrays(Xtr, ytr, C, tol=tol, init=warm_t[f] if warm else None, device=ctx.device)
            if warm:  # only the path's fits are its state (the refit's start); a cold re-score leaves it alone
                warm_t[f] = lr
                ctx.state.setdefault("warm", {})[C] = lr if f == 0 else ctx.state["warm"].get(C)
            return _accuracy(lr.predict(Xva), yva)

        return _walk_path(grid, folds, ctx, fit_point_t)

    models: list[Any] = [None] * len(folds)

    def fit_point(f: int, C: float, tol: float, warm: bool) -> float:
        Xtr, ytr, Xva, yva = parts[f]
        m = models[f] if warm and models[f] is not None else _logreg(C, tol)
        m.set_params(C=C, tol=tol, warm_start=warm)
        with _quiet():
            m.fit(Xtr, ytr)
        if warm:  # only the path's fits are its state (the refit's start); a cold re-score leaves it alone
            models[f] = m
            if f == 0:
                ctx.state.setdefault("warm", {})[C] = (m.coef_.copy(), m.intercept_.copy(), m.classes_.copy())
        return _accuracy(m.predict(Xva), yva)

    return _walk_path(grid, folds, ctx, fit_point)


def _refit_logreg(X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: SweepContext, rows: np.ndarray) -> Any:
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


def _sweep_linear_svm(X: np.ndarray, y: np.ndarray, folds: Folds, grid: Grid, ctx: SweepContext) -> list[dict[str, Any]]:
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

        def fit_point(f: int, C: float, tol: float, warm_start: bool) -> float:
            Xtr, Ytr, Xva, yva, classes = parts[f]
            W, _ = _sqhinge_primal(Xtr, Ytr, C, tol=tol, W0=warm[f] if warm_start else None)
            if warm_start:  # only the path's fits are its state; a cold re-score leaves it alone
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


def _refit_linear_svm(X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: SweepContext, rows: np.ndarray) -> Any:
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
    ctx: SweepContext,
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


def _contiguous(rows: np.ndarray) -> np.ndarray | slice:
    return slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) and np.all(np.diff(rows) == 1) else rows


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


def _sweep_rbf_svm(X: np.ndarray, y: np.ndarray, folds: Folds, grid: Grid, ctx: SweepContext) -> list[dict[str, Any]]:
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


def _refit_rbf_svm(X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: SweepContext, rows: np.ndarray) -> Any:
    from sklearn.svm import SVC

    D = ctx.state.get("sq_dists")
    if D is None or not ctx.levers.gram:
        with _quiet():
            return _svc(params).fit(X, y)
    K = _rbf_kernel(D, rows, rows, float(params["gamma"]))
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


def _sweep_knn(X: np.ndarray, y: np.ndarray, folds: Folds, grid: Grid, ctx: SweepContext) -> list[dict[str, Any]]:
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


def _refit_knn(X: np.ndarray, y: np.ndarray, params: dict[str, Any], ctx: SweepContext, rows: np.ndarray) -> Any:
    return _knn(min(int(params["n_neighbors"]), len(y))).fit(X, y)


def each_point(hk: HeadKind) -> Sweep:
    """The sweep of a kind without one of its own: every grid point's classifier (the last step of
    ``hk.build(params)``) fitted from scratch on every fold, points spread over threads."""

    def sweep(X: np.ndarray, y: np.ndarray, folds: Folds, grid: Grid, ctx: SweepContext) -> list[dict[str, Any]]:
        return _parallel_points(grid, folds, ctx, lambda p: hk.build(p)[-1], X, y, backend="threading")

    return sweep
