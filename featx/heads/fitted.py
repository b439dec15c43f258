"""A fitted head and its record: :class:`FittedHead`, its metadata and summary, and the checks and carving
that decide which cached rows a head is fitted on."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featx import __version__
from featx.backbones import EmbedderSpec
from featx.cache import FeatureSet, now_iso
from featx.data import RowSelection, SplitPlan
from featx.errors import MismatchError
from featx.metrics import softmax


def predict_scores(estimator: Any, X: np.ndarray) -> np.ndarray:
    """Class probabilities; SVMs have none, so their margins go through a softmax (uncalibrated)."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    return softmax(estimator.decision_function(X))


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


def head_metadata(kind: str, train: Any, val: Any, test: Any, plan: SplitPlan, **extra: Any) -> dict[str, Any]:
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


def head_summary(head: FittedHead) -> dict[str, Any]:
    """JSON-able record of a fitted head: metadata, the sweep curve and test metrics."""
    return {**head.metadata, "sweep": head.sweep, "test_metrics": head.test_metrics}
