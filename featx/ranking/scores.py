"""Transferability scores: how well a frozen representation will serve a linear classifier, from (features, labels)
alone, without fitting one. Each is a small numpy/scipy function written from its paper's equations; higher is
better for all of them. Only the rows a probe would fit on should be passed (featx.rank passes the train rows).

* :func:`logme`: LogME (You et al., ICML 2021): the log marginal likelihood (evidence) of a Bayesian linear model
  per class, maximised over its two precisions by MacKay's fixed point, averaged over classes.
* :func:`hscore_shrinkage`: the H-score (Bao et al., ICIP 2019) with a Ledoit-Wolf shrinkage estimate of the feature
  covariance (Ibrahim, Ponomareva & Mazumder, "Newer is not always better: rethinking transferability metrics,
  their peculiarities, stability and performance", ECML-PKDD 2022 / arXiv 2110.06893).
* :func:`knn_loo`: leave-one-out k-nearest-neighbour accuracy (cosine similarity), a non-parametric check.

Input checks (:func:`check_inputs`) raise a one-line :class:`~featx.errors.UsageError`: not 2-D, rows and labels of
different lengths, fewer than 2 rows per class on average, one class, NaN/inf, every feature constant.
N < D is handled (LogME through the N x N Gram matrix, the H-score through shrinkage, which exists for that case).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from featx.errors import UsageError

__all__ = [
    "SCORES",
    "GramStats",
    "check_inputs",
    "hscore_shrinkage",
    "knn_loo",
    "ledoit_wolf_shrinkage",
    "logme",
    "logme_from_gram",
]


def check_inputs(features: Any, labels: Any, *, what: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """``(float64 features (N, D), int labels 0..C-1)`` or a one-line UsageError saying what is wrong."""
    x = np.asarray(features)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise UsageError(f"{what} must be a 2-D array (rows x features), got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(f"{what}: {len(x)} rows but labels of shape {y.shape} (one label per row)")
    if x.shape[1] == 0 or len(x) < 2:
        raise UsageError(f"{what} of shape {x.shape}: need at least 2 rows and 1 feature")
    if not np.issubdtype(x.dtype, np.number):
        raise UsageError(f"{what} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UsageError(f"{what} hold {int(bad.sum())} NaN/inf value(s) (first at row {r}, column {c}): drop or fix those rows")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise UsageError(f"labels hold one class ({classes[0]!r}) in {len(y)} rows: a score needs at least 2 classes")
    if np.ptp(x, axis=0).max() == 0:
        raise UsageError(f"{what}: every one of the {x.shape[1]} features is constant over the {len(x)} rows (no information)")
    return x, codes.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# LogME


@dataclass
class GramStats:
    """What LogME needs from the rows, accumulated chunk by chunk: ``F^T F`` (D x D), ``F^T Y`` (D x C, Y one-hot),
    ``sum(Y**2)`` per class and N. :meth:`add` one chunk at a time; wide layers cost D x D memory, never N x D."""

    gram: np.ndarray
    fty: np.ndarray
    yy: np.ndarray
    colsum: np.ndarray
    n: int = 0

    @classmethod
    def empty(cls, dim: int, n_classes: int) -> GramStats:
        return cls(np.zeros((dim, dim)), np.zeros((dim, n_classes)), np.zeros(n_classes), np.zeros(dim), 0)

    def add(self, features: np.ndarray, codes: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if not np.isfinite(f).all():
            raise UsageError(f"features hold NaN/inf value(s) in a chunk of {len(f)} rows: drop or fix those rows")
        onehot = np.zeros((len(f), self.fty.shape[1]))
        onehot[np.arange(len(f)), codes] = 1.0
        self.gram += f.T @ f
        self.fty += f.T @ onehot
        self.yy += onehot.sum(axis=0)
        self.colsum += f.sum(axis=0)
        self.n += len(f)

    def check(self) -> None:
        """The checks of :func:`check_inputs` that need every row: rows, classes present, a non-constant feature."""
        if self.n < 2:
            raise UsageError(f"features: {self.n} row(s); a score needs at least 2")
        present = np.flatnonzero(self.yy > 0)
        if len(present) < 2:
            raise UsageError(f"labels hold one class in {self.n} rows: a score needs at least 2 classes")
        mean = self.colsum / self.n
        var = np.diag(self.gram) / self.n - mean**2
        if (var <= 1e-12 * np.maximum(np.diag(self.gram) / self.n, 1e-300)).all():
            raise UsageError(
                f"features: every one of the {len(var)} features is constant over the {self.n} rows (no information)"
            )

    @classmethod
    def of_chunks(cls, chunks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, n_classes: int) -> GramStats:
        stats = cls.empty(dim, n_classes)
        for f, codes in chunks:
            stats.add(f, codes)
        return stats


def _evidence(sigma: np.ndarray, x2: np.ndarray, res_x2: float, n: int, d: int, max_iter: int, tol: float) -> float:
    """Maximised log evidence / N of y = F w + noise, w ~ N(0, 1/alpha), noise ~ N(0, 1/beta), given the nonzero
    eigenvalues ``sigma`` of F^T F and ``x2`` = (u_i^T y)^2 for their left singular vectors u_i (``res_x2`` = the part
    of |y|^2 outside their span). You et al. 2021, Algorithm 1 (MacKay's fixed point for alpha and beta)."""
    alpha, beta = 1.0, 1.0
    k = len(sigma)
    for _ in range(max_iter):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())  # effective number of parameters
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())  # |m|^2, m the posterior mean of w
        res2 = float((x2 / (1 + sigma / t) ** 2).sum() + res_x2)  # |y - F m|^2
        alpha = gamma / (m2 + 1e-5)
        beta = (n - gamma) / (res2 + 1e-5)
        if abs(alpha / beta - t) / t <= tol:
            break
    # log|A| with A = alpha I + beta F^T F: the D - k directions F does not span contribute log(alpha) each
    logdet = float(np.log(alpha + beta * sigma).sum()) + (d - k) * np.log(alpha)
    evidence = (
        d / 2.0 * np.log(alpha)
        + n / 2.0 * np.log(beta)
        - 0.5 * logdet
        - beta / 2.0 * res2
        - alpha / 2.0 * m2
        - n / 2.0 * np.log(2 * np.pi)
    )
    return float(evidence / n)


def _logme_spectrum(sigma: np.ndarray, proj: np.ndarray, yy: np.ndarray, n: int, d: int, max_iter: int, tol: float) -> float:
    """``proj`` (k, C): u_i^T y_c for the k nonzero singular directions."""
    x2 = proj**2
    return float(
        np.mean([_evidence(sigma, x2[:, c], float(yy[c] - x2[:, c].sum()), n, d, max_iter, tol) for c in range(len(yy))])
    )


def _nonzero(evals: np.ndarray) -> np.ndarray:
    return evals > max(float(evals.max()), 0.0) * len(evals) * np.finfo(np.float64).eps


def logme_from_gram(stats: GramStats, *, max_iter: int = 11, tol: float = 1e-3) -> float:
    """LogME from accumulated :class:`GramStats` (the streamed path): eigendecompose F^T F (D x D) once;
    u_i^T y = v_i^T F^T y / sqrt(sigma_i). See :func:`logme`."""
    stats.check()
    present = stats.yy > 0  # classes with no row in these rows are not scored
    evals, vecs = np.linalg.eigh(stats.gram)
    keep = _nonzero(evals)
    sigma = evals[keep]
    proj = (vecs[:, keep].T @ stats.fty[:, present]) / np.sqrt(sigma)[:, None]
    return _logme_spectrum(sigma, proj, stats.yy[present], stats.n, stats.gram.shape[0], max_iter, tol)


def logme(features: Any, labels: Any, *, max_iter: int = 11, tol: float = 1e-3) -> float:
    """LogME: You, Liu, Wang & Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
    ICML 2021 (and the extended JMLR 2022 version), Algorithm 1.

    For each class c, y_c (one-hot column) is modelled as F w + e with priors w ~ N(0, alpha^-1 I) and
    e ~ N(0, beta^-1 I); the log evidence log p(y_c | F, alpha, beta) (eq. 2 of the paper) is maximised by MacKay's
    fixed point: gamma = sum sigma_i / (sigma_i + alpha/beta), alpha = gamma / |m|^2, beta = (N - gamma) / |y - F m|^2.
    Everything is written in the eigenbasis of F^T F, so one decomposition serves all classes and iterations: the
    D x D matrix F^T F when N >= D, else the N x N Gram matrix F F^T (wide layers stay fast). The score is the mean
    over classes of the maximised evidence divided by N. Features are used as given (the paper's setting).

    Equal to the authors' published code (thuml/LogME, fixed-point version) when F has full column rank. When
    N < D that code sums log(alpha + beta sigma_i) over the N nonzero sigma_i only, dropping the (D - N) log(alpha)
    of log|A| while keeping D/2 log(alpha), which inflates wide layers' scores by (D - N)/(2N) log(alpha); featx
    keeps the exact log|A| (tests/test_ranking.py checks both the agreement and that exact difference).
    """
    x, y = check_inputs(features, labels)
    n, d = x.shape
    n_classes = int(y.max()) + 1
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1.0
    if n >= d:
        stats = GramStats(x.T @ x, x.T @ onehot, onehot.sum(axis=0), x.sum(axis=0), n)
        return logme_from_gram(stats, max_iter=max_iter, tol=tol)
    evals, u = np.linalg.eigh(x @ x.T)  # F F^T = U S^2 U^T: the same nonzero sigma, u_i directly
    keep = _nonzero(evals)
    return _logme_spectrum(evals[keep], u[:, keep].T @ onehot, onehot.sum(axis=0), n, d, max_iter, tol)


# --------------------------------------------------------------------------------------------------
# Shrinkage H-score


def ledoit_wolf_shrinkage(centered: np.ndarray) -> tuple[float, float]:
    """Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance matrices", Lemma 3.1 /
    Theorem 2: the shrinkage intensity s = min(b^2, d^2) / d^2 towards mu I, mu = tr(S) / D, with S = X^T X / N,
    d^2 = |S - mu I|_F^2 / D and b^2 = (sum_i |x_i x_i^T - S|_F^2 / N^2) / D. Returns ``(s, mu)``; the estimate is
    (1 - s) S + s mu I. Computed without forming D x D when N < D (|X^T X|_F = |X X^T|_F)."""
    n, d = centered.shape
    small = centered @ centered.T if n < d else centered.T @ centered
    s_fro2 = float((small**2).sum()) / n**2  # |S|_F^2
    trace = float((centered**2).sum()) / n
    mu = trace / d
    d2 = (s_fro2 - 2 * mu * trace + d * mu**2) / d
    b2 = (float(((centered**2).sum(axis=1) ** 2).sum()) / n - s_fro2) / (d * n)
    b2 = min(b2, d2)
    return (0.0 if d2 <= 0 else b2 / d2), mu


def hscore_shrinkage(features: Any, labels: Any) -> float:
    """Shrinkage-based H-score: Ibrahim, Ponomareva & Mazumder, "Newer is not always better: rethinking
    transferability metrics, their peculiarities, stability and performance" (ECML-PKDD 2022, arXiv 2110.06893),
    section 4: the H-score of Bao et al. (ICIP 2019), H = tr(cov(f)^-1 cov(E[f | y])), with cov(f) replaced by the
    Ledoit-Wolf estimate (1 - s) S + s mu I and the between-class covariance scaled by (1 - s), which keeps it
    stable when D is large against N (the plain H-score's inverse covariance is then noise).

    Between-class covariance: sum_c (n_c / N) (mean_c - mean)(mean_c - mean)^T (population normalisation, as S)."""
    import scipy.linalg

    x, y = check_inputs(features, labels)
    n, d = x.shape
    xc = x - x.mean(axis=0)
    s, mu = ledoit_wolf_shrinkage(xc)
    n_classes = int(y.max()) + 1
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    means = np.zeros((n_classes, d))
    np.add.at(means, y, xc)
    means /= np.maximum(counts, 1)[:, None]
    weighted = means * np.sqrt(counts / n)[:, None]  # rows r_c: cov_g = R^T R
    if n < d:  # solve in the row space: (1-s) X^T X / N + s mu I, by the Woodbury identity
        a = (1 - s) / n
        k = s * mu
        gram = xc @ xc.T
        inner = scipy.linalg.solve(k * np.eye(n) + a * gram, xc @ weighted.T, assume_a="pos")  # (N, C)
        sol = (weighted.T - a * xc.T @ inner) / k  # cov_alpha^-1 R^T, (D, C)
    else:
        cov = (1 - s) * (xc.T @ xc) / n + s * mu * np.eye(d)
        sol = scipy.linalg.solve(cov, weighted.T, assume_a="pos")
    return float((1 - s) * (weighted.T * sol).sum())


# --------------------------------------------------------------------------------------------------
# Leave-one-out k-NN


def knn_loo(features: Any, labels: Any, *, k: int = 10, chunk_rows: int = 1024) -> float:
    """Leave-one-out k-nearest-neighbour accuracy with cosine similarity on centred features: each row is
    classified by the similarity-weighted vote of its k most similar other rows (Cover & Hart 1967; as a
    transferability proxy e.g. Renggli et al., "Which model to transfer? Finding the needle in the growing
    haystack", CVPR 2022, kNN accuracy). Blocks of ``chunk_rows`` rows bound memory (N x chunk, never N x N)."""
    x, y = check_inputs(features, labels)
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")
    n = len(x)
    k = min(k, n - 1)
    xc = x - x.mean(axis=0)
    norms = np.linalg.norm(xc, axis=1, keepdims=True)
    xn = xc / np.where(norms > 0, norms, 1.0)
    n_classes = int(y.max()) + 1
    correct = 0
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        sim = xn[start:stop] @ xn.T
        sim[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # leave the row itself out
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        w = np.take_along_axis(sim, nn, axis=1) + 1.0  # cosine in [-1, 1] -> weight in [0, 2]
        votes = np.zeros((stop - start, n_classes))
        np.add.at(votes, (np.repeat(np.arange(stop - start), k), y[nn].ravel()), w.ravel())
        correct += int((votes.argmax(axis=1) == y[start:stop]).sum())
    return correct / n


#: Scores by name (the CLI's ``--score`` choices): each ``(features, labels) -> float``, higher is better.
SCORES: dict[str, Callable[[Any, Any], float]] = {
    "logme": logme,
    "hscore": hscore_shrinkage,
    "knn": knn_loo,
}
