"""A head kind is one registration: a toy kind (nearest centroid, with a grid and a derived parameter) registered
in one place runs through fit_head and `featx fit-head`, save/load (its file loads only while it is registered),
prediction on a cache (API and `featx predict`) and the report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featx.cache import load_cache
from featx.cli import main
from featx.errors import HeadFileError, UsageError
from featx.heads import (
    HEAD_DEFAULT_PARAMS,
    HEADS,
    FittedState,
    HeadKind,
    fit_head,
    fit_head_arrays,
    head_kind,
    load_head,
    register_head_kind,
    safe_node_types,
    save_head,
    unregister_head_kind,
)
from featx.prediction import predict
from featx.reporting import budget_sentences, render_results_table

SCALES = (0.0, 0.1, 0.3, 1.0)


def _steps() -> tuple[tuple[str, type], ...]:
    from sklearn.neighbors import NearestCentroid
    from sklearn.preprocessing import StandardScaler

    return (("standardscaler", StandardScaler), ("nearestcentroid", NearestCentroid))


def _build(params: dict[str, Any]) -> Any:
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    centroid = NearestCentroid(shrink_threshold=params["shrink"] or None)
    return Pipeline([("standardscaler", StandardScaler()), ("nearestcentroid", centroid)])


def _check(last: Any, d: int, k: int, s: FittedState) -> None:
    s.ok(s.arr(last, "centroids_", 2, "f").shape == (k, d), "centroids")


# the one place the toy kind is defined: build, grid (shrink derived from the searched shrink_scale), rule, check,
# parameter count; no sweep or refit of its own (every grid point is fitted from scratch)
TOY = HeadKind(
    "centroid",
    "StandardScaler + nearest centroid (shrunken)",
    _steps,
    _build,
    lambda d, n, var: [{"shrink_scale": s, "shrink": s * 2.0} for s in SCALES],
    {"shrink_scale": 0.0, "shrink": 0.0},
    _check,
    lambda last: int(last.centroids_.size),
    derived={"shrink": "shrink_scale"},
)
NEAREST_CENTROID = ("ObjectNode", "sklearn.neighbors._nearest_centroid.NearestCentroid")


@pytest.fixture()
def toy() -> Iterator[HeadKind]:
    register_head_kind(TOY)
    try:
        yield TOY
    finally:
        unregister_head_kind(TOY.name)


@pytest.fixture(scope="module")
def sample_sets(sample_caches: dict[str, Path]) -> list[Any]:
    return [load_cache(sample_caches[s]) for s in ("train", "val", "test")]


def test_registering_a_kind_makes_it_known_everywhere(toy: HeadKind) -> None:
    assert "centroid" in HEADS and HEADS[-1] == "centroid" and head_kind("centroid") is toy
    assert HEAD_DEFAULT_PARAMS["centroid"] == {"shrink_scale": 0.0, "shrink": 0.0}
    assert NEAREST_CENTROID in safe_node_types()
    with pytest.raises(UsageError, match="registered already"):
        register_head_kind(TOY)
    X = np.random.default_rng(0).normal(size=(12, 4)) + np.repeat(np.eye(3, 4) * 4, 4, axis=0)
    with np.errstate(invalid="ignore"):  # scikit-learn's within-class spread of one image per class is 0 / 0
        fit = fit_head_arrays(toy, X[[0, 4, 8]], np.array([0, 1, 2]), n_jobs=1)  # one image per class: the kind's rule
    assert fit.selection == "rule" and fit.best_params == {"shrink_scale": 0.0, "shrink": 0.0}


def test_unregistered_kind_is_unknown() -> None:
    assert "centroid" not in HEADS and NEAREST_CENTROID not in safe_node_types()
    with pytest.raises(UsageError, match="unknown head 'centroid'"):
        head_kind("centroid")


def test_toy_kind_fits_saves_loads_predicts_and_reports(
    toy: HeadKind, sample_sets: list[Any], sample_caches: dict[str, Path], tmp_path: Path
) -> None:
    head = fit_head(*sample_sets, kind="centroid", n_jobs=1)
    assert head.kind == "centroid" and head.metadata["head"] == "centroid" and head.metadata["selection"] == "val"
    assert [p["params"]["shrink_scale"] for p in head.sweep] == list(SCALES)
    assert head.best_params in [p["params"] for p in head.sweep]
    assert head.test_metrics is not None and head.test_metrics["accuracy"] > 0.3  # 10 classes: chance is 0.1
    edge = head.metadata["at_grid_edge"]
    assert edge == (head.best_params["shrink_scale"] == SCALES[-1])  # 0 (no shrinkage) is the natural bound, no edge

    path = save_head(head, tmp_path / "toy.skops")
    loaded = load_head(path)
    assert loaded.kind == "centroid" and loaded.best_params == head.best_params
    test = sample_sets[2]
    np.testing.assert_array_equal(loaded.predict(test.features), head.predict(test.features))
    preds = predict(path, cache=sample_caches["test"])
    assert preds.labels == [head.classes[i] for i in head.predict(test.features)]
    assert np.allclose(preds.probabilities.sum(axis=1), 1.0)  # no predict_proba: softmax of the margins

    # the report: a bench-shaped row of the toy kind, its parameters counted by the kind
    row = {
        "family": "features",
        "strategy": "centroid",
        "accuracy": head.test_metrics["accuracy"],
        "accuracy_ci95": head.test_metrics["accuracy_ci95"],
        "macro_f1": head.test_metrics["macro_f1"],
        "val_accuracy": head.val_accuracy,
        "hyperparameters": head.best_params,
        "at_grid_edge": True,
        "sweep": [{**c["params"], "val_accuracy": c["val_accuracy"]} for c in head.sweep],
        "trainable_params": toy.count_params(head.estimator),
        "wall_seconds": 1.0,
        "fit_seconds": 1.0,
        "peak_memory_mb": 100.0,
        "n_fit": head.metadata["n_fit"],
        "final_fit": "train+val",
    }
    assert row["trainable_params"] == 10 * test.features.shape[1]  # one centroid per class
    row["hyperparameters"] = {"shrink_scale": 1.0, "shrink": 2.0}
    table = render_results_table({"rows": [row]})
    assert "| centroid |" in table and "shrink_scale=1" in table and "(grid edge)" in table
    sentences = budget_sentences({"rows": [row]})
    # the derived parameter (shrink) is named through the searched one, from the registry
    assert len(sentences) == 1 and "shrink_scale=1 is the largest value searched" in sentences[0]
    assert "shrink=" not in sentences[0]

    unregister_head_kind("centroid")  # the same file no longer loads: only registered kinds are allowed
    with pytest.raises(HeadFileError, match=r"contains type sklearn\.neighbors\._nearest_centroid\.NearestCentroid"):
        load_head(path)
    register_head_kind(toy)


def test_toy_kind_through_the_cli(toy: HeadKind, sample_caches: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "heads"
    args = ["-q", "fit-head", "--head", "centroid", "--out-dir", str(out), "--n-jobs", "1"]
    args += ["--train", str(sample_caches["train"]), "--val", str(sample_caches["val"]), "--test", str(sample_caches["test"])]
    assert main(args) == 0, capsys.readouterr().err
    (path,) = out.glob("*-centroid.skops")
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["head"] == "centroid" and summary["test_metrics"]["accuracy"] > 0.3
    capsys.readouterr()
    assert main(["-q", "predict", str(path), "--cache", str(sample_caches["test"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 60 and lines[0].startswith("path,label")
    assert main(["fit-head", "--help"]) == 0
    assert "--headHEADlogreg,linear-svm,rbf-svm,knn,centroid,comma-separated" in "".join(capsys.readouterr().out.split())
