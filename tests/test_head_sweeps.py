"""Every fast path of the head sweeps against the plain reference: same choices, same predictions.

The problems are small generated "pooled CNN features" (non-negative, class structure); nothing here checks speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from featx.cache import load_cache
from featx.errors import CacheError, UsageError
from featx.heads import (
    HEAD_DEFAULT_PARAMS,
    HEADS,
    HeadFit,
    SweepLevers,
    fit_head,
    fit_head_arrays,
    fit_linear_probe,
    fit_transform_step,
    load_head,
    save_head,
)

OFF = SweepLevers(
    warm_path=False,
    sweep_tol=False,
    early_stop=False,
    primal=False,
    gram=False,
    one_search=False,
    one_thread=False,
    fast_search=False,
    speculative_refit=False,
)


def pooled_like(
    n: int, *, d: int = 48, k: int = 4, sep: float = 0.35, seed: int = 0, centers_seed: int = 99
) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative, sparse-ish features with class structure (ReLU of class centre + noise), float32."""
    centers = np.random.default_rng(centers_seed).normal(size=(k, d)) * sep
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = np.maximum(centers[y] + rng.normal(size=(n, d)), 0.0).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def problem() -> dict[str, np.ndarray]:
    X, y = pooled_like(400, seed=0)
    Xv, yv = pooled_like(200, seed=1)
    return {"X": X, "y": y, "Xv": Xv, "yv": yv}


def _scaled(p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The transform featx fits once and exports (a StandardScaler, variances shrunk by 5 pseudo-rows)."""
    s = fit_transform_step(StandardScaler, p["X"])
    return s.transform(p["X"]), s.transform(p["Xv"])


def test_logreg_warm_path_chooses_what_cold_fits_choose(problem: dict[str, np.ndarray]) -> None:
    fast = fit_head_arrays("logreg", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"], n_jobs=1)
    Xs, Xvs = _scaled(problem)
    cold = {}
    for c in np.logspace(-4, 2, 13):
        m = LogisticRegression(C=c, max_iter=1000).fit(Xs, problem["y"])
        cold[float(c)] = float((m.predict(Xvs) == problem["yv"]).mean())
    best = max(cold.values())
    assert fast.best_params["C"] == min(c for c, a in cold.items() if a == best)  # ties: strongest regularisation
    for point in fast.curve:  # the loose-tolerance warm path scores every point close to the cold fit (4 of 200 rows)
        assert abs(point["val_accuracy"] - cold[point["params"]["C"]]) <= 0.02
    assert fast.selection == "val" and fast.n_fit == 600
    assert fast.info["stopped_early"] and len(fast.curve) < 13  # this problem peaks early: the path stopped
    plain = fit_head_arrays("logreg", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"], n_jobs=1, levers=OFF)
    assert plain.best_params == fast.best_params and len(plain.curve) == 13
    np.testing.assert_allclose(fast.estimator[-1].coef_, plain.estimator[-1].coef_, atol=2e-3)


@pytest.mark.parametrize("kind", ["logreg", "linear-svm"])
def test_near_ties_are_chosen_on_cold_fits_whatever_the_path(problem: dict[str, np.ndarray], kind: str) -> None:
    """The points within NEAR_TIE_IMAGES val images of the warm path's best are scored again by cold fits at the
    refit tolerance (in parallel threads with n_jobs > 1): their accuracies are then the path-free ones (the plain
    loop's), so the choice no longer depends on where the path's approximate iterates happened to stop, and features
    perturbed at the 1e-5 level (another runtime) choose the same point."""
    from featx.heads.sweeps import near_ties

    assert near_ties({0: 0.5, 1: 0.9, 2: 0.89, 3: 0.88, 4: 0.87}, n_val=100) == [1, 2, 3]  # within 2 of 100 images
    Xv, yv = problem["Xv"][:100], problem["yv"][:100]  # a small val split: several points within 2 images
    kw: dict[str, Any] = {"X_val": Xv, "y_val": yv, "n_jobs": 1}
    warm = fit_head_arrays(kind, problem["X"], problem["y"], **kw)
    cold = fit_head_arrays(kind, problem["X"], problem["y"], levers=SweepLevers(warm_path=False, sweep_tol=False), **kw)
    assert len(warm.info["cold_rescored"]) >= 3
    two = fit_head_arrays(kind, problem["X"], problem["y"], **{**kw, "n_jobs": 2})  # the re-scores on two threads
    assert two.curve == [{**c, "seconds": t["seconds"]} for c, t in zip(warm.curve, two.curve)]
    cold_acc = {c["params"]["C"]: c["val_accuracy"] for c in cold.curve}
    for c in warm.curve:
        if c["params"]["C"] in warm.info["cold_rescored"]:
            assert c["val_accuracy"] == pytest.approx(cold_acc[c["params"]["C"]], abs=0.5 / len(yv)), c
    rng = np.random.default_rng(7)
    for _ in range(3):
        X = (problem["X"] * (1 + 1e-5 * rng.standard_normal(problem["X"].shape))).astype(np.float32)
        Xv_noisy = (Xv * (1 + 1e-5 * rng.standard_normal(Xv.shape))).astype(np.float32)
        other = fit_head_arrays(kind, X, problem["y"], **{**kw, "X_val": Xv_noisy})
        assert other.best_params == warm.best_params


def test_speculative_refit_is_the_same_refit(problem: dict[str, np.ndarray]) -> None:
    """The refit a second thread starts while the path goes on is the refit done afterwards, bit for bit; the
    warning filters it shares with the sweep come back unchanged."""
    import warnings

    kind = "linear-svm"
    filters = list(warnings.filters)
    kw: dict[str, Any] = {"X_val": problem["Xv"], "y_val": problem["yv"], "n_jobs": 2}
    fast = fit_head_arrays(kind, problem["X"], problem["y"], **kw)
    plain = fit_head_arrays(kind, problem["X"], problem["y"], levers=SweepLevers(speculative_refit=False), **kw)
    assert fast.info.get("refit_overlapped") and "refit_overlapped" not in plain.info
    assert fast.best_params == plain.best_params
    np.testing.assert_array_equal(fast.estimator[-1].coef_, plain.estimator[-1].coef_)
    np.testing.assert_array_equal(fast.estimator[-1].intercept_, plain.estimator[-1].intercept_)
    assert list(warnings.filters) == filters
    bad = problem["X"].copy()
    bad[3, 5] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        fit_head_arrays(kind, bad, problem["y"], **kw)
    assert "refit_overlapped" not in fit_head_arrays("logreg", problem["X"], problem["y"], **kw).info  # logreg: sequential


def test_torch_logreg_agrees_with_sklearn_at_the_same_c(problem: dict[str, np.ndarray]) -> None:
    ref = fit_head_arrays("logreg", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"], grid=[{"C": 0.05}])
    tor = fit_head_arrays(
        "logreg", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"], grid=[{"C": 0.05}], solver="torch"
    )
    a, b = ref.estimator[-1], tor.estimator[-1]
    assert type(b) is LogisticRegression and b.n_iter_[0] > 0 and b.n_features_in_ == 48
    np.testing.assert_array_equal(a.classes_, b.classes_)
    np.testing.assert_allclose(b.coef_, a.coef_, atol=2e-3, rtol=1e-2)
    Xt = pooled_like(500, seed=7)[0]
    assert (ref.estimator.predict(Xt) == tor.estimator.predict(Xt)).mean() >= 0.99
    np.testing.assert_allclose(tor.estimator.predict_proba(Xt), ref.estimator.predict_proba(Xt), atol=2e-3)
    # binary problems: one logit, as scikit-learn
    mask = problem["y"] < 2
    a2 = fit_head_arrays("logreg", problem["X"][mask], problem["y"][mask], grid=[{"C": 0.3}], cv_folds=2).estimator
    b2 = fit_head_arrays(
        "logreg", problem["X"][mask], problem["y"][mask], grid=[{"C": 0.3}], cv_folds=2, solver="torch"
    ).estimator
    assert b2[-1].coef_.shape == (1, 48)
    np.testing.assert_allclose(b2[-1].coef_, a2[-1].coef_, atol=2e-3, rtol=1e-2)


@pytest.fixture(scope="module")
def wide() -> dict[str, np.ndarray]:
    """Fewer samples than features (flowers17's shape: 816 x 1280), where LinearSVC itself would pick the dual."""
    X, y = pooled_like(90, d=160, k=3, seed=0)
    Xv, yv = pooled_like(60, d=160, k=3, seed=1)
    return {"X": X, "y": y, "Xv": Xv, "yv": yv}


@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_linear_svm_primal_path_matches_liblinear(shape: str, request: pytest.FixtureRequest) -> None:
    problem = request.getfixturevalue("problem" if shape == "tall" else "wide")
    fast = fit_head_arrays("linear-svm", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"], n_jobs=1)
    plain = fit_head_arrays(
        "linear-svm", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"], n_jobs=1, levers=OFF
    )
    assert fast.best_params == plain.best_params
    by_c = {p["params"]["C"]: p["val_accuracy"] for p in plain.curve}
    for point in fast.curve:
        assert abs(point["val_accuracy"] - by_c[point["params"]["C"]]) <= 0.01
    # the exported LinearSVC holds the solution liblinear's primal solver finds for the same problem
    X_fit = np.concatenate(_scaled(problem))
    ref = LinearSVC(C=fast.best_params["C"], dual=shape == "wide", tol=1e-7, max_iter=200000).fit(
        X_fit, np.concatenate([problem["y"], problem["yv"]])
    )
    got = fast.estimator[-1]
    assert type(got) is LinearSVC
    np.testing.assert_allclose(got.coef_, ref.coef_, atol=1e-3, rtol=1e-2)
    np.testing.assert_allclose(got.intercept_, ref.intercept_, atol=1e-3)


def test_rbf_precomputed_gram_sweep_equals_plain_svc(problem: dict[str, np.ndarray]) -> None:
    fast = fit_head_arrays("rbf-svm", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"], n_jobs=2)
    Xs, Xvs = _scaled(problem)
    for point in fast.curve:
        p = point["params"]
        plain = SVC(C=p["C"], gamma=p["gamma"]).fit(Xs, problem["y"])
        assert abs(point["val_accuracy"] - float((plain.predict(Xvs) == problem["yv"]).mean())) <= 1 / 200 + 1e-9
    # the exported estimator is a genuine rbf SVC, equal to one fitted directly with the chosen values
    got = fast.estimator[-1]
    assert type(got) is SVC and got.kernel == "rbf"
    X_fit = np.concatenate([Xs, Xvs])
    direct = SVC(C=fast.best_params["C"], gamma=fast.best_params["gamma"]).fit(
        X_fit, np.concatenate([problem["y"], problem["yv"]])
    )
    Xt = fast.estimator[0].transform(pooled_like(300, seed=5)[0])
    assert (got.predict(Xt) == direct.predict(Xt)).mean() >= 0.99
    np.testing.assert_allclose(got.decision_function(Xt), direct.decision_function(Xt), atol=1e-3)


def test_knn_search_equals_scikit_learns_brute_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 GEMM candidates re-ranked by exact distances: the neighbours and distances of scikit-learn's search,
    across many query blocks and row sub-blocks, and for k at or above the number of rows."""
    from sklearn.neighbors import NearestNeighbors

    import featx.heads.sweeps as sweeps

    A, B = pooled_like(700, seed=41)[0], pooled_like(150, seed=42)[0]
    monkeypatch.setattr(sweeps, "KNN_BLOCK_BYTES", 4 * 700 * 16)
    for k, rows in ((20, 700), (30, 30), (40, 30)):
        ref_d, ref_i = NearestNeighbors(n_neighbors=min(k, rows), algorithm="brute").fit(A[:rows]).kneighbors(B)
        d, i = sweeps._knn_search(A[:rows], B, k)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-6)


def test_knn_one_search_equals_one_classifier_per_k(problem: dict[str, np.ndarray]) -> None:
    fast = fit_head_arrays("knn", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"])
    n = Normalizer()
    Xn, Xvn = n.transform(problem["X"]), n.transform(problem["Xv"])
    for point in fast.curve:
        k = point["params"]["n_neighbors"]
        ref = KNeighborsClassifier(n_neighbors=k, weights="distance", algorithm="brute").fit(Xn, problem["y"])
        assert point["val_accuracy"] == float((ref.predict(Xvn) == problem["yv"]).mean())
    # duplicated rows: zero distances vote like scikit-learn's (exact matches only)
    Xd = np.concatenate([problem["X"][:50], problem["X"][:50]])
    yd = np.concatenate([problem["y"][:50], problem["y"][:50]])
    dup = fit_head_arrays("knn", Xd, yd, X_val=problem["X"][:50], y_val=problem["y"][:50])
    assert all(p["val_accuracy"] == 1.0 for p in dup.curve)


def test_selection_val_cv_rule_and_row_counts(problem: dict[str, np.ndarray]) -> None:
    X, y = problem["X"], problem["y"]
    cv = fit_head_arrays("logreg", X[:40], y[:40], cv_folds=3)  # 10 per class: 3 folds
    assert cv.selection == "cv" and cv.n_fit == 40 and cv.curve
    two = fit_head_arrays("knn", X[:8], y[:8])  # 2 per class: 2-fold CV inside the draw
    assert two.selection == "cv" and two.n_fit == 8
    for kind in HEADS:
        rule = fit_head_arrays(kind, X[:4], y[:4])  # one per class: the documented rule, no search
        assert isinstance(rule, HeadFit) and rule.selection == "rule" and rule.curve == [] and not rule.at_grid_edge
        assert {k: rule.best_params[k] for k in HEAD_DEFAULT_PARAMS[kind]} == HEAD_DEFAULT_PARAMS[kind]
    val_train = fit_head_arrays("logreg", X, y, X_val=problem["Xv"], y_val=problem["yv"], final_fit="train")
    assert val_train.n_fit == 400
    with pytest.raises(UsageError):
        fit_head_arrays("knn", X, y, solver="torch")


def test_rbf_svm_does_not_collapse_at_one_and_two_shots() -> None:
    """Few-shot draws: the RBF SVM stays close to the nearest-neighbour rule instead of predicting one class."""
    Xt, yt = pooled_like(400, k=4, sep=0.8, seed=3)
    for shots in (1, 2):
        accs = {}
        for kind in ("rbf-svm", "knn"):
            draws = []
            for draw in range(5):
                X, y = pooled_like(4 * shots, k=4, sep=0.8, seed=100 + draw)
                pred = fit_head_arrays(kind, X, y).estimator.predict(Xt)
                draws.append(float((pred == yt).mean()))
                assert len(np.unique(pred)) > 1
            accs[kind] = float(np.mean(draws))
        assert accs["rbf-svm"] > 0.5 and accs["rbf-svm"] >= accs["knn"] - 0.1, (shots, accs)  # chance: 0.25


def test_linear_probe_in_raw_feature_space(problem: dict[str, np.ndarray]) -> None:
    X, y = problem["X"], problem["y"]
    keep = y != 2  # class 2 absent from training
    probe = fit_linear_probe(X[keep], y[keep], problem["Xv"], problem["yv"], n_classes=6)
    assert probe.coef.shape == (6, 48) and probe.coef.dtype == np.float32 and probe.intercept.dtype == np.float32
    assert not probe.coef[[2, 4, 5]].any() and (probe.intercept[[2, 4, 5]] < -1e3).all()
    head = fit_head_arrays("logreg", X[keep], y[keep], X_val=problem["Xv"], y_val=problem["yv"], final_fit="train")
    logits = problem["Xv"] @ probe.coef.T + probe.intercept
    np.testing.assert_array_equal(logits.argmax(axis=1), head.estimator.predict(problem["Xv"]))
    assert probe.C == head.best_params["C"] and probe.val_accuracy == float((logits.argmax(1) == problem["yv"]).mean())
    assert [c["C"] for c in probe.curve] == [c["params"]["C"] for c in head.curve]
    binary = fit_linear_probe(X[y < 2], y[y < 2], None, None, n_classes=2)  # CV inside the training rows
    assert binary.selection == "cv"
    p = np.exp(X @ binary.coef.T + binary.intercept)
    ref = fit_head_arrays("logreg", X[y < 2], y[y < 2]).estimator.predict_proba(X)
    np.testing.assert_allclose(p / p.sum(axis=1, keepdims=True), ref, atol=1e-4)


def _write_cache(
    path: Path, X: np.ndarray, y: np.ndarray, attrs: dict[str, Any], classes: list[str], chunk: int, dtype: Any = np.float32
) -> Path:
    """A cache with featx's layout, written by featx's own cache writer in row blocks."""
    from featx.cache import write_cache_file

    blocks = ((s, X[s : s + chunk], np.ones(len(X[s : s + chunk]), bool), []) for s in range(0, len(y), chunk))
    return write_cache_file(
        path,
        n_rows=len(y),
        blocks=blocks,
        labels=y,
        paths=[f"{i}.png" for i in range(len(y))],
        classes=classes,
        attrs={**attrs, "dtype": np.dtype(dtype).name},
        dtype=dtype,
    )


def test_streamed_fit_agrees_with_the_in_memory_fit(sample_caches: dict[str, Path], tmp_path: Path) -> None:
    template = load_cache(sample_caches["train"]).attrs
    X, y = pooled_like(900, d=40, k=4, seed=11)
    Xv, yv = pooled_like(300, d=40, k=4, seed=12)
    Xt, yt = pooled_like(300, d=40, k=4, seed=13)
    classes = ["a", "b", "c", "d"]
    paths = {
        n: _write_cache(tmp_path / f"{n}.h5", a, b, {**template, "split": n}, classes, 64)
        for n, a, b in (("train", X, y), ("val", Xv, yv), ("test", Xt, yt))
    }
    mem = fit_head(*[load_cache(paths[n]) for n in ("train", "val", "test")], kind="logreg", n_jobs=1)
    streamed = fit_head(paths["train"], paths["val"], paths["test"], kind="logreg", stream=True, chunk_rows=100)
    assert streamed.metadata["stream"] and streamed.metadata["n_fit"] == mem.metadata["n_fit"] == 1200
    assert streamed.best_params == mem.best_params
    assert (streamed.predict(Xt) == mem.predict(Xt)).mean() >= 0.99
    np.testing.assert_allclose(streamed.estimator[0].mean_, mem.estimator[0].mean_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.estimator[-1].coef_, mem.estimator[-1].coef_, atol=5e-3, rtol=2e-2)
    assert abs(streamed.test_metrics["accuracy"] - mem.test_metrics["accuracy"]) <= 0.01
    loaded = load_head(save_head(streamed, tmp_path / "streamed.skops"))  # the export passes the allowlist
    np.testing.assert_array_equal(loaded.predict(Xt), streamed.predict(Xt))
    carved = fit_head(paths["train"], kind="logreg", stream=True)  # val and test carved from train, like in memory
    carved_mem = fit_head(load_cache(paths["train"]), kind="logreg")
    assert carved.metadata["n_val"] == carved_mem.metadata["n_val"] and carved.metadata["n_test"] == carved_mem.metadata["n_test"]
    with pytest.raises(UsageError, match="logreg"):
        fit_head(paths["train"], kind="knn", stream=True)


def test_streamed_fit_sweeps_a_subsample_and_refits_on_every_row(sample_caches: dict[str, Path], tmp_path: Path) -> None:
    """The streamed sweep runs on a seeded subsample; the final fit uses every row at the chosen C and equals the
    in-memory fit at that C; a capped fit says it did not converge; a damaged chunk stops it with CacheError."""
    from sklearn.exceptions import ConvergenceWarning

    template = load_cache(sample_caches["train"]).attrs
    X, y = pooled_like(900, d=40, k=4, seed=31)
    Xv, yv = pooled_like(300, d=40, k=4, seed=32)
    paths = {
        n: _write_cache(tmp_path / f"{n}.h5", a, b, {**template, "split": n}, ["a", "b", "c", "d"], 64)
        for n, a, b in (("train", X, y), ("val", Xv, yv))
    }
    s = fit_head(paths["train"], paths["val"], kind="logreg", stream=True, sweep_rows=250, chunk_rows=100)
    again = fit_head(paths["train"], paths["val"], kind="logreg", stream=True, sweep_rows=250, chunk_rows=100)
    md = s.metadata
    assert 250 <= md["sweep_rows"] <= 254 and md["refit_converged"] and md["refit_passes"] >= 2
    assert md["n_fit"] == md["n_train"] + 300 and md["n_train"] < 900  # test carved from train
    assert [(c["params"], c["val_accuracy"]) for c in again.sweep] == [(c["params"], c["val_accuracy"]) for c in s.sweep]
    carved = load_cache(paths["train"])
    mem = fit_head(carved, load_cache(paths["val"]), kind="logreg", grid=[s.best_params], n_jobs=1)
    np.testing.assert_allclose(s.estimator[-1].coef_, mem.estimator[-1].coef_, atol=5e-3, rtol=2e-2)
    assert s.test_metrics["accuracy"] == pytest.approx(mem.test_metrics["accuracy"], abs=0.01)
    with pytest.warns(ConvergenceWarning, match="max_passes"):
        capped = fit_head(paths["train"], paths["val"], kind="logreg", stream=True, grid=[s.best_params], max_passes=2)
    assert not capped.metadata["refit_converged"] and capped.metadata["refit_passes"] < md["refit_passes"]
    with h5py.File(paths["train"], "r") as f:
        info = f["features"].id.get_chunk_info(f["features"].id.get_num_chunks() // 2)
    with paths["train"].open("r+b") as fh:  # invert 16 bytes inside a feature chunk
        fh.seek(info.byte_offset + info.size // 2)
        data = fh.read(16)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))
    with pytest.raises(CacheError):
        fit_head(paths["train"], paths["val"], kind="logreg", stream=True, chunk_rows=100)


def test_sample_heads_save_and_load_with_every_lever(sample_caches: dict[str, Path], tmp_path: Path) -> None:
    """Heads exported by the fast paths (primal LinearSVC, transplanted rbf SVC, torch logreg) load under the allowlist."""
    sets = [load_cache(sample_caches[s]) for s in ("train", "val", "test")]
    for kind, solver in (("linear-svm", "sklearn"), ("rbf-svm", "sklearn"), ("logreg", "torch")):
        head = fit_head(*sets, kind=kind, solver=solver, n_jobs=1)
        loaded = load_head(save_head(head, tmp_path / f"{kind}.skops"))
        np.testing.assert_allclose(loaded.predict_proba(sets[2].features), head.predict_proba(sets[2].features), atol=1e-12)
        assert head.metadata["selection"] == "val" and "at_grid_edge" in head.metadata


def test_float16_cache_gives_the_float32_choices(sample_caches: dict[str, Path], tmp_path: Path) -> None:
    """A float16 cache (what CUDA fp16 extraction writes) reads back as float32 and leads every head, in memory
    and streamed, to the choices and predictions of the float32 cache of the same features."""
    template = load_cache(sample_caches["train"]).attrs
    X, y = pooled_like(600, d=40, k=4, seed=21)
    Xv, yv = pooled_like(200, d=40, k=4, seed=22)
    Xt = pooled_like(300, d=40, k=4, seed=23)[0]
    caches = {}
    for dtype in (np.float32, np.float16):
        for name, A, b in (("train", X, y), ("val", Xv, yv)):
            caches[dtype, name] = _write_cache(
                tmp_path / f"{np.dtype(dtype).name}-{name}.h5", A, b, {**template, "split": name}, ["a", "b", "c", "d"], 64, dtype
            )
    half = load_cache(caches[np.float16, "train"])
    assert half.features.dtype == np.float32
    np.testing.assert_array_equal(half.features, X.astype(np.float16).astype(np.float32))
    for kind in HEADS:
        f32 = fit_head(load_cache(caches[np.float32, "train"]), load_cache(caches[np.float32, "val"]), kind=kind, n_jobs=1)
        f16 = fit_head(half, load_cache(caches[np.float16, "val"]), kind=kind, n_jobs=1)
        assert f16.best_params == f32.best_params, kind
        assert (f16.predict(Xt) == f32.predict(Xt)).mean() >= 0.98, kind
    s32 = fit_head(caches[np.float32, "train"], caches[np.float32, "val"], kind="logreg", stream=True)
    s16 = fit_head(caches[np.float16, "train"], caches[np.float16, "val"], kind="logreg", stream=True)
    assert s16.best_params == s32.best_params and (s16.predict(Xt) == s32.predict(Xt)).mean() >= 0.98


def test_one_thread_lever_restores_the_thread_pools(problem: dict[str, np.ndarray]) -> None:
    """Sweeps run with one BLAS thread and give the caller's thread pools back unchanged."""
    from threadpoolctl import threadpool_info

    before = [(p["internal_api"], p["num_threads"]) for p in threadpool_info()]
    fast = fit_head_arrays("logreg", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"])
    plain = fit_head_arrays("logreg", problem["X"], problem["y"], X_val=problem["Xv"], y_val=problem["yv"], levers=OFF)
    assert [(p["internal_api"], p["num_threads"]) for p in threadpool_info()] == before
    assert fast.best_params == plain.best_params
