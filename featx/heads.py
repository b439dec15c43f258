"""Heads: scikit-learn classifiers on cached features, with the linear-evaluation protocol.

Protocol (Kornblith et al. 2019): sweep the regularisation (and kernel width) on a validation split,
pick the best by validation accuracy (ties go to the stronger regularisation), refit with the chosen
hyper-parameters on train + val, and evaluate once on test. Sweeps run in parallel with joblib, one
BLAS thread per worker (two single-threaded fits beat one fit with two fighting threads on small CPUs).

Heads are saved with skops' secure format; loading refuses any type outside an allowlist, so a head
file someone sent you cannot run code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__
from featx.cache import FeatureSet, embedder_diff, now_iso
from featx.data import SplitPlan
from featx.errors import MismatchError, UsageError
from featx.metrics import classification_metrics, softmax

HEADS = ("logreg", "linear-svm", "rbf-svm", "knn")
_SAFE_TYPE_PREFIXES = ("sklearn.", "numpy.")


def make_head(kind: str, **params: Any) -> Any:
    """An unfitted scikit-learn pipeline for head ``kind`` with hyper-parameters ``params``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import SVC, LinearSVC

    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=params.get("C", 1.0), max_iter=1000, tol=1e-4))
    if kind == "linear-svm":
        return make_pipeline(StandardScaler(), LinearSVC(C=params.get("C", 1.0), max_iter=5000, dual="auto"))
    if kind == "rbf-svm":
        return make_pipeline(StandardScaler(), SVC(kernel="rbf", C=params.get("C", 1.0), gamma=params.get("gamma", "scale")))
    if kind == "knn":
        # L2-normalised features + euclidean distance = cosine neighbours, the usual k-NN probe.
        return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=params.get("n_neighbors", 5), weights="distance"))
    raise UsageError(f"unknown head '{kind}' (choose from {', '.join(HEADS)})")


def param_grid(kind: str, *, n_features: int, n_train: int) -> list[dict[str, Any]]:
    """Hyper-parameter grid, ordered from strongest to weakest regularisation."""
    if kind == "logreg":
        return [{"C": float(c)} for c in np.logspace(-4, 2, 13)]
    if kind == "linear-svm":
        # Larger C on standardised high-dimensional features is effectively hard-margin: liblinear then runs
        # for minutes (52 s for one fit at C=1 on flowers17) and such C values were never selected.
        return [{"C": float(c)} for c in np.logspace(-5, -1, 9)]
    if kind == "rbf-svm":
        return [{"C": float(c), "gamma": float(g / n_features)} for c in np.logspace(-1, 3, 5) for g in (0.1, 1.0, 10.0)]
    if kind == "knn":
        return [{"n_neighbors": k} for k in (20, 10, 5, 3, 1) if k <= n_train]
    raise UsageError(f"unknown head '{kind}' (choose from {', '.join(HEADS)})")


def predict_scores(estimator: Any, X: np.ndarray) -> np.ndarray:
    """Class probabilities; SVMs have none, so their margins go through a softmax (uncalibrated)."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    return softmax(estimator.decision_function(X))


def _score_one(
    kind: str, params: dict[str, Any], Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray
) -> dict[str, Any]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = make_head(kind, **params).fit(Xtr, ytr)
    return {"params": params, "val_accuracy": float((est.predict(Xva) == yva).mean()), "seconds": time.perf_counter() - t0}


def sweep(
    kind: str,
    Xtr: np.ndarray,
    ytr: np.ndarray,
    Xva: np.ndarray,
    yva: np.ndarray,
    *,
    grid: list[dict[str, Any]] | None = None,
    n_jobs: int | None = None,
) -> list[dict[str, Any]]:
    """Fit every grid point on train, score on val; returns the whole curve (in grid order)."""
    from joblib import Parallel, delayed, parallel_config

    grid = grid or param_grid(kind, n_features=Xtr.shape[1], n_train=len(ytr))
    jobs = min(len(grid), n_jobs or os.cpu_count() or 1)
    if jobs == 1:
        return [_score_one(kind, p, Xtr, ytr, Xva, yva) for p in grid]
    with parallel_config(backend="loky", inner_max_num_threads=1):
        return Parallel(n_jobs=jobs)(delayed(_score_one)(kind, p, Xtr, ytr, Xva, yva) for p in grid)


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


def check_same_embedder(sets: dict[str, FeatureSet]) -> None:
    """All caches fed to one head must come from the same backbone, weights, layer and preprocessing."""
    items = list(sets.items())
    ref_name, ref = items[0]
    for name, fs in items[1:]:
        diff = embedder_diff(ref.embedder, fs.embedder)
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
    position_to_row = {int(p): r for r, p in enumerate(train.indices)}  # undecodable images have no row
    out = {}
    for name, positions in carved.items():
        out[name] = train.subset(np.asarray([position_to_row[int(p)] for p in positions if int(p) in position_to_row]))
    if val is not None:
        out["val"] = val
    if test is not None:
        out["test"] = test
    return out


def fit_head(
    train: FeatureSet,
    val: FeatureSet | None = None,
    test: FeatureSet | None = None,
    *,
    kind: str = "logreg",
    plan: SplitPlan | None = None,
    grid: list[dict[str, Any]] | None = None,
    n_jobs: int | None = None,
) -> FittedHead:
    """Sweep on val, refit on train + val, evaluate on test. Missing val/test are carved from train."""
    if kind not in HEADS:
        raise UsageError(f"unknown head '{kind}' (choose from {', '.join(HEADS)})")
    check_same_embedder({n: fs for n, fs in {"train": train, "val": val, "test": test}.items() if fs is not None})
    plan = plan or SplitPlan()
    parts = split_features(train, val, test, plan)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    if len(np.unique(tr.labels)) < 2:
        raise UsageError("a head needs at least two classes in the training split")
    t0 = time.perf_counter()
    curve = sweep(kind, tr.features, tr.labels, va.features, va.labels, grid=grid, n_jobs=n_jobs)
    best = max(range(len(curve)), key=lambda i: (curve[i]["val_accuracy"], -i))  # ties: earlier = stronger reg.
    best_params = curve[best]["params"]
    estimator = make_head(kind, **best_params).fit(
        np.concatenate([tr.features, va.features]), np.concatenate([tr.labels, va.labels])
    )
    fit_seconds = time.perf_counter() - t0
    metrics = classification_metrics(te.labels, estimator.predict(te.features), len(train.classes)) if len(te.labels) else None
    metadata = {
        "featx_version": __version__,
        "created_at": now_iso(),
        "head": kind,
        "classes": list(train.classes),
        "embedder": train.embedder,
        "weights": train.attrs.get("weights"),
        "weights_sha256": train.attrs.get("weights_sha256"),
        "image_size": (train.attrs.get("spec") or {}).get("image_size"),
        "best_params": best_params,
        "val_accuracy": curve[best]["val_accuracy"],
        "fit_seconds": fit_seconds,
        "n_train": len(tr.labels),
        "n_val": len(va.labels),
        "n_test": len(te.labels),
        "caches": {n: fs.attrs.get("key") for n, fs in (("train", train), ("val", val), ("test", test)) if fs is not None},
        "split_plan": {"val_fraction": plan.val_fraction, "test_fraction": plan.test_fraction, "seed": plan.seed},
        "libraries": {p: importlib.metadata.version(p) for p in ("scikit-learn", "numpy")},
    }
    return FittedHead(kind, estimator, list(train.classes), best_params, curve[best]["val_accuracy"], curve, metrics, metadata)


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


def load_head(path: str | os.PathLike[str]) -> FittedHead:
    """Load a head saved by :func:`save_head`; files holding types outside scikit-learn/numpy are refused."""
    import skops.io as sio

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"head file not found: {p}")
    try:
        untrusted = sio.get_untrusted_types(file=p)
    except Exception as exc:
        raise UsageError(f"{p} is not a featx head file ({type(exc).__name__})") from None
    refused = [t for t in untrusted if not t.startswith(_SAFE_TYPE_PREFIXES)]
    if refused:
        raise UsageError(f"refusing to load {p}: it contains untrusted types {', '.join(refused[:3])}")
    payload = sio.load(p, trusted=untrusted)
    if not isinstance(payload, dict) or "estimator" not in payload or "summary_json" not in payload:
        raise UsageError(f"{p} is not a featx head file")
    s = json.loads(payload["summary_json"])
    return FittedHead(
        s["head"],
        payload["estimator"],
        s["classes"],
        s["best_params"],
        s["val_accuracy"],
        s.get("sweep", []),
        s.get("test_metrics"),
        {k: v for k, v in s.items() if k not in ("sweep", "test_metrics")},
    )
