"""featx.ranking: the scores on generated features where the right order is known, against independent oracles,
on degenerate input; featx.rank / `featx rank` end to end on small generated images (train rows only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featx.errors import UsageError
from featx.ranking import SCORES, GramStats, hscore_shrinkage, knn_loo, logme, logme_from_gram
from featx.ranking.scores import ledoit_wolf_shrinkage
from tests.conftest import make_imagefolder


def signal_features(strength: float, n: int = 240, d: int = 32, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian noise plus ``strength`` x a class-specific direction: more strength, more linearly separable."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centres = rng.normal(size=(c, d))
    return rng.normal(size=(n, d)) + strength * centres[y], y


# --------------------------------------------------------------------------------------------------
# Order on controlled signal


@pytest.mark.parametrize("name", sorted(SCORES))
@pytest.mark.parametrize("shape", [(240, 32), (120, 200)], ids=["N>D", "N<D"])
def test_scores_order_features_by_label_signal(name: str, shape: tuple[int, int]) -> None:
    n, d = shape
    scale = np.sqrt(32 / d)  # the same signal-to-noise per row whatever the width
    values = [SCORES[name](*signal_features(s * scale, n=n, d=d)) for s in (0.0, 0.3, 0.5, 0.8)]
    assert all(np.isfinite(values))
    assert values == sorted(values) and len(set(values)) == len(values), (name, values)


# --------------------------------------------------------------------------------------------------
# LogME against oracles


def logme_dense(f: np.ndarray, y: np.ndarray) -> float:
    """An independent oracle: the same fixed point (You et al. 2021, Algorithm 1) written in the primal, with the
    D x D matrices formed explicitly (A = alpha I + beta F^T F, m = beta A^-1 F^T y, gamma = D - alpha tr(A^-1),
    log|A| by slogdet) instead of featx's eigenbasis."""
    n, d = f.shape
    g = f.T @ f
    out = []
    for k in range(int(y.max()) + 1):
        t_ = (y == k).astype(float)
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            m_mat = g + t * np.eye(d)
            m = np.linalg.solve(m_mat, f.T @ t_)
            gamma = d - t * np.trace(np.linalg.inv(m_mat))
            m2, res2 = m @ m, ((t_ - f @ m) ** 2).sum()
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * g)[1]
        ev = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - logdet / 2
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        out.append(ev / n)
    return float(np.mean(out))


@pytest.mark.parametrize("shape", [(200, 16, 3), (120, 40, 5), (30, 64, 3)], ids=["N>D", "N>D-5cls", "N<D"])
def test_logme_equals_the_dense_oracle(shape: tuple[int, int, int]) -> None:
    n, d, c = shape
    rng = np.random.default_rng(1)
    y = np.arange(n) % c
    f = rng.normal(size=(n, d)) + np.eye(c, d)[y]
    assert logme(f, y) == pytest.approx(logme_dense(f, y), rel=1e-9, abs=1e-9)


def logme_reference(f: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """You et al.'s published LogME code (thuml/LogME, ``LogME._fit_fixed_point``: the fixed point of the JMLR
    version, arXiv 2110.10545), re-implemented here independently of featx: an SVD of F (for N > D their
    ``truncated_svd``: the SVD of F^T F, singular values > 1e-10 kept), then per class the iteration on
    sigma = s^2 and x = U^T y. Returns ``(score, alpha per class)``."""
    n, d = f.shape
    if n > d:
        _, s2, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s2)
        k = int((s > 1e-10).sum())
        s, vh = s[:k], vh[:k]
        u = (f @ vh.T) / s
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = (s**2).reshape(-1, 1)
    evidences, alphas = [], []
    for c in range(int(y.max()) + 1):
        y_ = (y == c).astype(np.float64).reshape(-1, 1)
        x2 = (u.T @ y_) ** 2
        res_x2 = (y_**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidence = (
            d / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))  # over the k = rank(F) singular values only
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
        alphas.append(alpha)
    return float(np.mean(evidences)), np.array(alphas)


@pytest.mark.parametrize("shape", [(200, 16, 3), (120, 40, 5), (300, 8, 2), (64, 64, 4)], ids=str)
def test_logme_equals_the_published_reference_code_when_features_have_full_column_rank(
    shape: tuple[int, int, int],
) -> None:
    n, d, c = shape
    rng = np.random.default_rng(25)
    y = np.arange(n) % c
    f = rng.normal(size=(n, d)) + 0.8 * np.eye(c, d)[y]
    assert logme(f, y) == pytest.approx(logme_reference(f, y)[0], rel=1e-10)


def test_logme_equals_the_reference_code_on_rank_deficient_features() -> None:
    """18 columns of rank 12 (N > D): the reference's truncated SVD keeps the round-off eigenvalues of F^T F
    (their square roots, ~1e-7, pass its 1e-10 cut), so its log|A| counts log(alpha) for them: it agrees with featx."""
    rng = np.random.default_rng(7)
    y = np.arange(150) % 3
    base = rng.normal(size=(150, 12)) + np.eye(3, 12)[y]
    f = np.hstack([base, base[:, :6] + base[:, 6:]])
    assert logme(f, y) == pytest.approx(logme_reference(f, y)[0], rel=1e-8)
    assert logme(f, y) == pytest.approx(logme_dense(f, y), rel=1e-8)


@pytest.mark.parametrize("shape", [(40, 300, 4), (30, 64, 3)], ids=str)
def test_logme_departs_from_the_reference_code_when_n_below_d_by_exactly_the_missing_log_det_term(
    shape: tuple[int, int, int],
) -> None:
    """With N < D the reference code's log|A| sums log(alpha + beta sigma_i) over the N singular values of its thin
    SVD only, dropping the (D - N) log(alpha) of the directions F does not span, while keeping D/2 log(alpha): its
    score grows with D/N (here by whole units), so wide layers would win whenever N < D. featx uses the exact log|A|
    of the paper's equation (what the dense oracle above computes). The difference is exactly
    (D - N) / (2N) mean_c log(alpha_c), with the same alpha_c: everything else agrees."""
    n, d, c = shape
    rng = np.random.default_rng(7)
    y = np.arange(n) % c
    f = rng.normal(size=(n, d)) + np.eye(c, d)[y]
    ref, alphas = logme_reference(f, y)
    assert logme(f, y) == pytest.approx(logme_dense(f, y), rel=1e-8)
    assert logme(f, y) == pytest.approx(ref - (d - n) / (2 * n) * float(np.mean(np.log(alphas))), rel=1e-8)
    assert ref - logme(f, y) > 0.5  # the dropped term is not a rounding matter


def test_logme_streamed_over_chunks_equals_in_memory() -> None:
    f, y = signal_features(0.5, n=101, d=24)
    stats = GramStats.of_chunks(((f[i : i + 7], y[i : i + 7]) for i in range(0, len(f), 7)), 24, 4)
    assert logme_from_gram(stats) == pytest.approx(logme(f, y), rel=1e-10)


def test_logme_ignores_label_names_and_a_class_absent_from_the_rows() -> None:
    f, y = signal_features(0.5)
    assert logme(f, np.array(["abcd"[k] for k in y])) == pytest.approx(logme(f, y))
    stats = GramStats.empty(f.shape[1], 6)  # classes 4 and 5 have no rows here
    stats.add(f, y)
    assert logme_from_gram(stats) == pytest.approx(logme(f, y), rel=1e-10)


# --------------------------------------------------------------------------------------------------
# H-score and k-NN against oracles


@pytest.mark.parametrize("shape", [(200, 16), (40, 90)], ids=["N>D", "N<D"])
def test_ledoit_wolf_shrinkage_equals_scikit_learn(shape: tuple[int, int]) -> None:
    from sklearn.covariance import ledoit_wolf

    x, _ = signal_features(0.7, n=shape[0], d=shape[1])
    xc = x - x.mean(axis=0)
    cov, s_ref = ledoit_wolf(xc, assume_centered=True)
    s, mu = ledoit_wolf_shrinkage(xc)
    assert s == pytest.approx(s_ref, rel=1e-9)
    assert np.allclose((1 - s) * xc.T @ xc / len(xc) + s * mu * np.eye(shape[1]), cov)


@pytest.mark.parametrize("shape", [(200, 16), (40, 90)], ids=["N>D", "N<D"])
def test_hscore_equals_the_shrinkage_formula_with_dense_matrices(shape: tuple[int, int]) -> None:
    """Ibrahim et al.'s regularised H-score written directly: tr(pinv(cov_LW) (1 - s) cov_g), scikit-learn's LW."""
    from sklearn.covariance import ledoit_wolf

    x, y = signal_features(0.7, n=shape[0], d=shape[1])
    xc = x - x.mean(axis=0)
    cov, s = ledoit_wolf(xc, assume_centered=True)
    g = np.zeros_like(xc)
    for k in np.unique(y):
        g[y == k] = xc[y == k].mean(axis=0)
    cov_g = g.T @ g / len(g)
    expected = np.trace(np.linalg.pinv(cov, rcond=1e-15) @ ((1 - s) * cov_g))
    assert hscore_shrinkage(x, y) == pytest.approx(expected, rel=1e-8)


def test_knn_loo_equals_a_plain_loop() -> None:
    x, y = signal_features(0.3, n=90, d=12)
    xc = x - x.mean(axis=0)
    xn = xc / np.linalg.norm(xc, axis=1, keepdims=True)
    correct = 0
    for i in range(len(x)):
        sim = xn @ xn[i]
        sim[i] = -np.inf
        nn = np.argsort(-sim, kind="stable")[:5]
        votes = np.bincount(y[nn], weights=sim[nn] + 1, minlength=4)
        correct += int(votes.argmax() == y[i])
    assert knn_loo(x, y, k=5, chunk_rows=16) == pytest.approx(correct / len(x))


# --------------------------------------------------------------------------------------------------
# Degenerate input: one line, UsageError


@pytest.mark.parametrize("name", sorted(SCORES))
@pytest.mark.parametrize(
    "case,message",
    [
        ("one_class", "one class"),
        ("constant", "constant"),
        ("nan", "NaN/inf"),
        ("inf", "NaN/inf"),
        ("one_row", "at least 2 rows"),
        ("1d", "2-D"),
        ("mismatch", "one label per row"),
    ],
)
def test_degenerate_input_is_a_one_line_usage_error(name: str, case: str, message: str) -> None:
    x, y = signal_features(0.5, n=40, d=6)
    if case == "one_class":
        y = np.zeros_like(y)
    elif case == "constant":
        x = np.ones_like(x) * 3.0
    elif case == "nan":
        x[5, 2] = np.nan
    elif case == "inf":
        x[7, 1] = np.inf
    elif case == "one_row":
        x, y = x[:1], y[:1]
    elif case == "1d":
        x = x[:, 0]
    elif case == "mismatch":
        y = y[:-1]
    with pytest.raises(UsageError, match=message) as err:
        SCORES[name](x, y)
    assert "\n" not in str(err.value)


def test_streamed_logme_refuses_degenerate_rows() -> None:
    x, y = signal_features(0.5, n=40, d=6)
    for xs, ys, message in [(x, np.zeros_like(y), "one class"), (np.ones_like(x), y, "constant")]:
        with pytest.raises(UsageError, match=message):
            logme_from_gram(GramStats.of_chunks([(xs, ys)], 6, 4))
    bad = x.copy()
    bad[3, 3] = np.nan
    with pytest.raises(UsageError, match="NaN/inf"):
        GramStats.of_chunks([(bad, y)], 6, 4)


# --------------------------------------------------------------------------------------------------
# featx.rank and `featx rank` on generated images


def test_cli_rank_end_to_end_with_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from featx.cli import main

    data = make_imagefolder(tmp_path / "imgs", {"train": 12, "test": 4}, n_classes=3)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [str(data), "--layers", "blocks.1,blocks.5,pooled", "--score", "logme,hscore,knn", "--image-size", "48"]
    args += ["--cache-dir", str(cache), "--out", str(out), "--device", "cpu"]
    assert main(["-q", "rank", *args, "--verify", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "rank.json").read_text())
    assert (out / "rank.png").stat().st_size > 0
    rows = result["rows"]
    assert [r["layer"] for r in rows] and sorted(r["layer"] for r in rows) == ["blocks.1", "blocks.5", "pooled"]
    assert [r["scores"]["logme"] for r in rows] == sorted((r["scores"]["logme"] for r in rows), reverse=True)
    from featx.data import SplitPlan, load_dataset

    n_fit = len(SplitPlan().resolve(load_dataset(data))["train"])  # 36 train images less the val the plan carves
    assert n_fit < 36 and all(r["n_rows"] == n_fit for r in rows)
    # the cache path (streamed F^T F where N > D, the N x N Gram where N <= D) equals the scores on the arrays
    from featx.cache import load_cache
    from featx.ranking import SCORES as ALL

    plan_train = SplitPlan().resolve(load_dataset(data))["train"]
    dims = sorted((r["dim"], r["layer"]) for r in rows)
    assert dims[0][0] < n_fit < dims[-1][0]  # both paths ran
    for r in rows:
        fs = load_cache(r["cache"]).select(plan_train)
        for name, value in r["scores"].items():
            assert value == pytest.approx(ALL[name](fs.features, fs.labels), rel=1e-6, abs=1e-9), (r["layer"], name)
    assert f"{n_fit} of its 36 rows" in result["rows_scored"] and "carved val out of train" in result["rows_scored"]
    v = result["verify"]
    assert v["k"] == 2 and [r["probe_accuracy"] is not None for r in rows] == [True, True, False]
    assert v["cost_ratio"] > 0 and isinstance(v["holds"], bool)
    assert "verify:" in printed and rows[0]["layer"] in printed
    # a second run scores from the warm cache: nothing extracted
    assert main(["-q", "rank", *args]) == 0
    again = json.loads((out / "rank.json").read_text())
    assert again["extract_seconds"] == 0.0
    assert [r["scores"] for r in again["rows"]] == [{k: r["scores"][k] for k in ("logme", "hscore", "knn")} for r in rows]
    capsys.readouterr()
    assert main(["rank", str(data), "--score", "nope", "--cache-dir", str(cache)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_rank_degenerate_datasets_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from featx.cli import main

    one = make_imagefolder(tmp_path / "one", {"train": 6, "test": 2}, n_classes=1)
    two = make_imagefolder(tmp_path / "two", {"train": 6, "test": 2}, n_classes=2)
    cache = ["--cache-dir", str(tmp_path / "cache"), "--image-size", "48", "--device", "cpu"]
    for args, message in [
        ([str(one)], "class"),
        ([str(two), "--layers", "blocks.99"], "blocks.99"),
        ([str(two), "--layers", " , "], "--layers"),
        ([str(two), "--verify", "-1"], "verify"),
    ]:
        assert main(["-q", "rank", *args, *cache]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (args, err)
    assert not list((tmp_path / "cache").glob("**/*.h5"))  # nothing extracted for a run refused up front


def test_scores_read_only_the_rows_the_probe_fits_on(tmp_path: Path) -> None:
    """Replacing the images of the rows the SplitPlan carves out of train (val/test) leaves every score unchanged;
    replacing one scored image changes them (so the check can fail)."""
    import featx
    from featx.data import SplitPlan, load_dataset
    from tests.conftest import make_image

    a = make_imagefolder(tmp_path / "a", {"train": 10}, n_classes=2, seed=3)
    ds = load_dataset(a)
    carved = SplitPlan().carve(ds.split("train").labels, has_val=False, has_test=False)
    split = ds.split("train")
    rel = [(Path(split.root) / p).relative_to(a) for p in split.paths]
    b, c = tmp_path / "b", tmp_path / "c"
    shutil.copytree(a, b)
    shutil.copytree(a, c)
    rng = np.random.default_rng(9)
    for i in np.concatenate([carved["val"], carved["test"]]):  # other pictures (of the other class) in the carved rows
        make_image(rng, 1 - int(split.labels[i])).save(b / rel[i])
    j = int(carved["train"][0])
    make_image(rng, 1 - int(split.labels[j])).save(c / rel[j])

    def scores(root: Path) -> list[dict[str, float]]:
        res = featx.rank(
            root, layers="blocks.3,pooled", scores=["logme", "hscore", "knn"], image_size=48, cache_dir=tmp_path / "cache"
        )
        assert res.rows[0].n_rows == len(carved["train"])
        return sorted((r.layer, r.scores) for r in res.rows)  # type: ignore[return-value]

    base = scores(a)
    assert scores(b) == base
    assert scores(c) != base


# --------------------------------------------------------------------------------------------------
# The bench's layer-wise section


def test_layer_section_shows_the_score_and_its_pick_only_when_points_carry_scores() -> None:
    from featx.bench.cells import _layer_scores
    from featx.records import LayerPoint
    from featx.reporting.markdown import _layerwise_sentence

    def points(with_scores: bool) -> list[LayerPoint]:
        out = []
        for depth, (layer, val, test) in enumerate([("blocks.5", 0.9, 0.88), ("blocks.6", 0.95, 0.91), ("pooled", 0.93, 0.93)]):
            x, y = signal_features(0.2 + 0.3 * depth, n=80, d=8, seed=depth)
            out.append(
                LayerPoint(
                    layer,
                    depth=depth,
                    dim=8,
                    val_accuracy=val,
                    accuracy=test,
                    scores=_layer_scores(x, y, layer) if with_scores else None,
                )
            )
        return out

    plain = _layerwise_sentence(points(False))
    assert "|" not in plain and "would have picked" not in plain
    scored = _layerwise_sentence(points(True))
    assert scored.startswith(plain)
    assert "| layer | dim | logme | probe val | probe test |" in scored
    assert "logme would have picked pooled: the probe measured test 0.930" in scored
    assert "the layer chosen on val, blocks.6, measured 0.910" in scored
    assert _layer_scores(np.ones((10, 3)), np.arange(10) % 2, "blocks.0") is None  # constant features: no score, no crash
    assert LayerPoint.from_dict(points(True)[0].to_dict()).scores == points(True)[0].scores
