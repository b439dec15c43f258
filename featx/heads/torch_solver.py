"""Logistic regression in torch (multinomial, L-BFGS, full batch): on CUDA, and for streamed fits larger than
memory. Solutions are exported as plain fitted scikit-learn LogisticRegression objects (safe to save). torch is
imported inside the functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from featx.heads.builders import _logreg


def _torch_device(device: str | None) -> Any:
    """None or "auto": CUDA when there is one, else the CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _torch_lbfgs_logreg(
    batches: Callable[[], Iterable[tuple[Any, Any]]],
    n: int,
    d: int,
    n_classes: int,
    C: float,
    *,
    tol: float,
    max_iter: int = 1000,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    device: str | None = None,
    max_eval: int | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise scikit-learn's objective, mean log-loss + ||W||^2 / (2 C n) (intercept unpenalised), with
    full-batch L-BFGS; ``batches()`` yields (X, y) pieces whose gradients are accumulated, so the data never
    has to be in memory at once. Binary problems use one logit, like scikit-learn. ``max_eval`` caps the
    objective evaluations (one pass over ``batches()`` each); ``stats`` receives evals, grad_max and converged.
    Returns (coef, intercept, iterations)."""
    import torch
    import torch.nn.functional as F

    dev = _torch_device(device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    k = 1 if n_classes == 2 else n_classes
    W = torch.zeros(k, d, dtype=dtype, device=dev)
    b = torch.zeros(k, dtype=dtype, device=dev)
    if init is not None:
        W.copy_(torch.as_tensor(init[0])), b.copy_(torch.as_tensor(init[1]))
    W.requires_grad_(True), b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=max_iter,
        max_eval=max_eval,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    seen: dict[tuple[float, ...], float] = {}

    def closure() -> Any:
        opt.zero_grad()
        total = 0.0
        for Xc, yc in batches():
            Xt = torch.as_tensor(Xc, device=dev).to(dtype)
            yt = torch.as_tensor(yc, device=dev)
            z = Xt @ W.T + b
            if k == 1:
                loss = F.binary_cross_entropy_with_logits(z[:, 0], yt.to(dtype), reduction="sum") / n
            else:
                loss = F.cross_entropy(z, yt.long(), reduction="sum") / n
            loss.backward()
            total += float(loss.detach())
        reg = (W * W).sum() / (2.0 * C * n)
        reg.backward()
        if stats is not None:  # this point's largest gradient, to tell afterwards whether the final point converged
            seen[_point_key(W, b)] = max(float(W.grad.abs().max()), float(b.grad.abs().max()))
        return torch.tensor(total + float(reg.detach()))

    opt.step(closure)
    state = opt.state[opt._params[0]]
    n_iter = int(state.get("n_iter", 0))
    if stats is not None:
        key = _point_key(W, b)
        if key not in seen:  # not expected: L-BFGS ends on an evaluated point; one more pass measures it
            closure()
        grad_max = seen[key]
        stats.update(evals=int(state.get("func_evals", 0)), grad_max=grad_max, converged=grad_max <= tol)
    return W.detach().cpu().numpy().astype(np.float64), b.detach().cpu().numpy().astype(np.float64), n_iter


def _point_key(W: Any, b: Any) -> tuple[float, ...]:
    w = W.detach()
    return float(w.sum()), float(w.abs().sum()), float((w * w).sum()), float(b.detach().sum())


def _export_logreg(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, C: float, n_iter: int) -> Any:
    """A plain fitted scikit-learn LogisticRegression holding a solution found elsewhere (safe to save)."""
    m = _logreg(C)
    m.coef_ = np.ascontiguousarray(coef, dtype=np.float64)
    m.intercept_ = np.ascontiguousarray(intercept, dtype=np.float64)
    m.classes_ = np.asarray(classes)
    m.n_features_in_ = int(coef.shape[1])
    m.n_iter_ = np.asarray([n_iter], dtype=np.int32)
    return m


def _torch_logreg_arrays(
    X: np.ndarray, y: np.ndarray, C: float, *, tol: float, init: Any = None, device: str | None = None
) -> Any:
    """In-memory torch fit of (already transformed) X; ``init`` a previous LogisticRegression (warm start)."""
    import torch

    classes = np.unique(y)
    idx = np.searchsorted(classes, y)
    dev = _torch_device(device)
    Xt = torch.as_tensor(X, device=dev).to(torch.float64 if dev.type == "cpu" else torch.float32)
    yt = torch.as_tensor(idx, device=dev)
    start = (init.coef_, init.intercept_) if init is not None and np.array_equal(init.classes_, classes) else None
    coef, icpt, nit = _torch_lbfgs_logreg(
        lambda: [(Xt, yt)], len(y), X.shape[1], len(classes), C, tol=tol, init=start, device=device
    )
    return _export_logreg(coef, icpt, classes, C, nit)
