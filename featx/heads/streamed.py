"""Fitting a head on caches that need not fit in memory (kinds whose ``streamable`` is set: logistic regression).

The scaler and the sweep's subsample come from one pass over the training rows, the C path is fitted in memory
on the subsample, and the final fit is torch L-BFGS on gradients accumulated chunk by chunk."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from featx.cache import FeatureSet
from featx.data import FINAL_FITS, RowSelection, SplitPlan
from featx.errors import UsageError
from featx.heads.arrays import choose, shrink_scaler
from featx.heads.builders import REFIT_TOL, SWEEP_TOL, _logreg, _logreg_steps, _pipeline
from featx.heads.fitted import FittedHead, check_same_embedder, head_metadata
from featx.heads.kinds import HeadKind, SweepContext, SweepLevers, head_kind
from featx.heads.sweeps import _accuracy, _path_order, _quiet, _threads, near_ties
from featx.heads.torch_solver import _export_logreg, _torch_lbfgs_logreg
from featx.metrics import classification_metrics

# float32 features per chunk read and processed at once. Each chunk briefly exists ~4 times (read, selected,
# standardised, float64 for the solver), and the next one is read meanwhile: at 32 MiB a streamed fit needed
# ~800 MB and a 768 MB limit killed it.
STREAM_CHUNK_BYTES = 8 * 2**20
# The C sweep of a streamed fit runs in memory on a seeded random subsample of the training rows of at most this
# many bytes of float32 features (13,107 rows at 1280 dims): a full-batch L-BFGS fit costs ~30 passes over the
# rows, so sweeping a 13-point grid streamed would read the cache hundreds of times.
STREAM_SWEEP_BYTES = 64 * 2**20
STREAM_MAX_PASSES = 200  # the streamed refit stops here (and warns) if L-BFGS has not converged


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
    kind: str | HeadKind = "logreg",
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

    hk = head_kind(kind)
    if not hk.streamable:
        raise UsageError(f"streamed fits support the logreg head only, not {hk.name}")
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

        grid = grid or hk.grid(d, len(y_tr), 1.0)
        ctx = SweepContext(lev, 1, "torch", device)
        fits: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        if len(y_va):
            selection, curve = "val", []
            tol = SWEEP_TOL if lev.sweep_tol else REFIT_TOL
            order = _path_order(grid)
            model = None
            with _threads(ctx, hk):
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
            near = near_ties({j: point["val_accuracy"] for j, point in enumerate(curve)}, len(y_va))
            ctx.info["cold_rescored"] = []  # the C values scored again from cold starts
            if lev.warm_path and len(near) > 1:  # as in the in-memory sweep (sweeps._walk_path): cold near-tie scores
                cold: list[tuple[np.ndarray, np.ndarray]] = []
                with _threads(ctx, hk):
                    for j in near:
                        t_point = time.perf_counter()
                        m = _logreg(float(curve[j]["params"]["C"]), REFIT_TOL)
                        with _quiet():
                            m.fit(X_sub, np.searchsorted(classes, y_sub))
                        cold.append((m.coef_.copy(), m.intercept_.copy()))
                        curve[j]["seconds"] += time.perf_counter() - t_point
                for j, pred in zip(near, predict_split(cold, "val")):
                    curve[j]["val_accuracy"] = _accuracy(pred, y_va)
                ctx.info["cold_rescored"] = [float(curve[j]["params"]["C"]) for j in near]
            curve = [curve[order.index(i)] for i in range(len(grid))]
            best_params = curve[choose(hk, curve)]["params"]
            ctx.info["stopped_early"] = False
        else:
            selection, curve, best_params = "rule", [], hk.default_params(d)
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
        metadata = head_metadata(
            hk.name,
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
            at_grid_edge=selection != "rule" and hk.at_grid_edge(grid, best_params),
            solver="torch",
            stream=True,
            chunk_rows=step,
            **ctx.info,
        )
        return FittedHead(hk.name, estimator, list(tr_reader.classes), best_params, val_acc, curve, metrics, metadata)
    finally:
        for name, r in readers.items():
            if r is not ({"train": train, "val": val, "test": test}[name]):
                r.close()
