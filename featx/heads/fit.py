"""fit_head: the linear-evaluation protocol on cached features (Kornblith et al. 2019).

Sweep on val, pick the best by validation accuracy, refit with the chosen hyper-parameters on train + val (or
train alone), and evaluate once on test. Missing val/test splits are carved from train exactly as fine-tuning
carves them."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from featx.cache import FeatureSet
from featx.data import FINAL_FITS, SplitPlan
from featx.errors import UsageError
from featx.heads.arrays import SOLVERS, fit_head_arrays
from featx.heads.fitted import FittedHead, check_same_embedder, head_metadata, split_features
from featx.heads.kinds import HeadKind, SweepLevers, head_kind
from featx.heads.streamed import STREAM_MAX_PASSES, fit_head_streamed
from featx.metrics import classification_metrics


def fit_head(
    train: FeatureSet | str | os.PathLike[str],
    val: FeatureSet | str | os.PathLike[str] | None = None,
    test: FeatureSet | str | os.PathLike[str] | None = None,
    *,
    kind: str | HeadKind = "logreg",
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
    regression with torch L-BFGS (on ``device``; other kinds fit with scikit-learn). ``stream=True``: train/val/test
    are cache files read in row chunks, never whole (logreg only; ``sweep_rows``, ``max_passes``: see :func:`fit_head_streamed`).
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
    hk = head_kind(kind)
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
    if solver in SOLVERS and solver not in hk.solvers:  # e.g. torch fits logreg only: the other kinds use scikit-learn
        solver = "sklearn"
    hf = fit_head_arrays(
        hk,
        tr.features,
        tr.labels,
        X_val=va.features if len(va.labels) else None,
        y_val=va.labels if len(va.labels) else None,
        final_fit=final_fit,
        grid=grid,
        n_jobs=n_jobs,
        seed=plan.seed,
        solver=solver,
        device=device,
        levers=levers,
    )
    fit_seconds = time.perf_counter() - t0
    estimator = hf.estimator
    metrics = classification_metrics(te.labels, estimator.predict(te.features), len(train.classes)) if len(te.labels) else None
    val_acc = max(c["val_accuracy"] for c in hf.curve) if hf.curve else float("nan")
    metadata = head_metadata(
        hk.name,
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
        solver=solver,
        **hf.info,
    )
    return FittedHead(hk.name, estimator, list(train.classes), hf.best_params, val_acc, hf.curve, metrics, metadata)


def fit_heads(
    train: FeatureSet | str | os.PathLike[str],
    val: FeatureSet | str | os.PathLike[str] | None = None,
    test: FeatureSet | str | os.PathLike[str] | None = None,
    *,
    kinds: list[str | HeadKind] | tuple[str | HeadKind, ...],
    scheduler: str | None = None,
    **options: Any,
) -> dict[str, FittedHead]:
    """:func:`fit_head` for each of ``kinds`` on the same caches (``options``: its keywords); returns kind name -> head.

    ``scheduler`` (``tcp://HOST:8786`` or ``local:N``; needs ``featx[dask]``, see :mod:`featx.cluster`): the kinds are
    independent Dask tasks, one per kind. Loaded caches are scattered to every worker once (``broadcast=True``) and
    each task reads them there; cache files (``stream=True``) are read by the tasks, so they must be on a filesystem the
    workers share. Each head is the one :func:`fit_head` gives here (same sweep, choice, refit and test metrics)."""
    names = list(dict.fromkeys(head_kind(k).name for k in kinds))
    if scheduler is None:
        return {name: fit_head(train, val, test, kind=name, **options) for name in names}
    from featx.cluster import dask_client

    with dask_client(scheduler) as client:
        given = [s for s in (train, val, test) if s is not None]
        inputs = [train, val, test]
        if not options.get("stream"):  # the features go to every worker once, not once per task
            scattered = iter(client.scatter(given, broadcast=True, hash=False))
            inputs = [None if s is None else next(scattered) for s in inputs]
        futures = {name: client.submit(fit_head, *inputs, kind=name, pure=False, **options) for name in names}
        return {name: future.result() for name, future in futures.items()}
