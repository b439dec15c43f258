"""Heads on cached features: the linear-evaluation protocol, persistence, safe loading, prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from featx.cache import load_cache
from featx.data import SplitPlan
from featx.errors import MismatchError
from featx.estimators import ImageFeatureExtractor
from featx.extraction import extract
from featx.heads import HEADS, fit_head, load_head, save_head
from featx.prediction import predict


@pytest.mark.parametrize("kind", HEADS)
def test_every_head_beats_chance_on_the_sample(sample_caches: dict[str, Path], kind: str) -> None:
    sets = {s: load_cache(sample_caches[s]) for s in ("train", "val", "test")}
    head = fit_head(sets["train"], sets["val"], sets["test"], kind=kind, n_jobs=1)
    assert head.test_metrics is not None
    assert head.test_metrics["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert head.test_metrics["n"] == 60 and len(head.test_metrics["confusion_matrix"]) == 10
    assert head.best_params in [p["params"] for p in head.sweep]
    assert head.val_accuracy == max(p["val_accuracy"] for p in head.sweep)
    lo, hi = head.test_metrics["accuracy_ci95"]
    assert lo <= head.test_metrics["accuracy"] <= hi
    assert head.metadata["n_train"] == 150 and head.metadata["n_val"] == 40


def test_parallel_sweep_equals_sequential_sweep(sample_caches: dict[str, Path]) -> None:
    sets = [load_cache(sample_caches[s]) for s in ("train", "val", "test")]
    a = fit_head(*sets, kind="logreg", n_jobs=1)
    b = fit_head(*sets, kind="logreg", n_jobs=2)
    assert [p["val_accuracy"] for p in a.sweep] == [p["val_accuracy"] for p in b.sweep]
    assert a.best_params == b.best_params


def test_missing_val_and_test_are_carved_from_train(sample_caches: dict[str, Path]) -> None:
    train = load_cache(sample_caches["train"])
    head = fit_head(train, kind="logreg", plan=SplitPlan(0.2, 0.2, seed=1), n_jobs=1)
    md = head.metadata
    # test: 20% of 15 per class = 3; val: 20% of the 12 left = 2 (rounded); train: the other 10
    assert (md["n_train"], md["n_val"], md["n_test"]) == (100, 20, 30)


def test_save_load_round_trip(sample_caches: dict[str, Path], tmp_path: Path) -> None:
    """Every kind round-trips in tests/test_head_files.py; here: the JSON summary beside it and its contents."""
    sets = [load_cache(sample_caches[s]) for s in ("train", "val", "test")]
    head = fit_head(*sets, kind="linear-svm", n_jobs=1)
    path = save_head(head, tmp_path / "h.skops")
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["best_params"] == head.best_params and summary["head"] == "linear-svm"
    loaded = load_head(path)
    X = sets[2].features
    np.testing.assert_allclose(loaded.predict_proba(X).sum(axis=1), 1.0)
    assert loaded.metadata["embedder"] == head.metadata["embedder"]


def test_head_predicts_the_same_as_predict_on_raw_images(
    sample_caches: dict[str, Path], sample_dataset: Path, tmp_path: Path
) -> None:
    sets = [load_cache(sample_caches[s]) for s in ("train", "val", "test")]
    head = fit_head(*sets, kind="logreg", n_jobs=1)
    path = save_head(head, tmp_path / "h.skops")
    test = sets[2]
    preds = predict(path, [sample_dataset / "test"], device="cpu", batch_size=7, num_workers=0)
    by_path = dict(zip(preds.paths, range(len(preds.paths))))
    order = [by_path[str(sample_dataset / p)] for p in test.paths]
    expected = head.predict_proba(test.features)
    np.testing.assert_allclose(preds.probabilities[order], expected, atol=1e-4)
    assert [preds.labels[i] for i in order] == [head.classes[i] for i in head.predict(test.features)]
    from_cache = predict(path, cache=sample_caches["test"])
    np.testing.assert_allclose(from_cache.probabilities, expected, atol=1e-6)


def test_head_refuses_features_from_another_embedder(
    sample_caches: dict[str, Path], sample_dataset: Path, tmp_path: Path
) -> None:
    sets = [load_cache(sample_caches[s]) for s in ("train", "val", "test")]
    head = fit_head(*sets, kind="knn", n_jobs=1)
    path = save_head(head, tmp_path / "h.skops")
    [other] = extract(sample_dataset, splits=["test"], image_size=64, cache_dir=sample_caches["cache_dir"], progress=False)
    with pytest.raises(MismatchError, match="preprocessing"):
        predict(path, cache=other.path)
    with pytest.raises(MismatchError, match="differs from train cache in preprocessing"):
        fit_head(sets[0], sets[1], load_cache(other.path), kind="logreg")


def test_sklearn_pipeline_with_the_image_transformer(sample_dataset: Path) -> None:
    import pickle

    from featx.data import load_dataset

    ds = load_dataset(sample_dataset)
    train, test = ds.split("train"), ds.split("test")
    pipe = Pipeline(
        [("features", ImageFeatureExtractor(image_size=64, device="cpu")), ("head", LogisticRegression(max_iter=2000))]
    )
    X_train = [str(train.root / p) for p in train.paths]
    X_test = [str(test.root / p) for p in test.paths]
    pipe.fit(X_train, train.labels)
    assert (pipe.predict(X_test) == test.labels).mean() > 0.3
    assert pipe.named_steps["features"].n_features_out_ == 1280
    assert clone(pipe).get_params()["features__image_size"] == 64
    restored = pickle.loads(pickle.dumps(pipe))  # configuration travels, the backbone is rebuilt
    assert restored.named_steps["features"].backbone_ is None
    np.testing.assert_allclose(restored.predict_proba(X_test[:5]), pipe.predict_proba(X_test[:5]), atol=1e-5)
