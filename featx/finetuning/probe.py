"""LP-FT's first stage (Kumar et al., 2022): a logistic-regression probe on the pretrained network's frozen,
standardised features (:func:`featx.heads.fit_linear_probe`, C chosen on val), folded into raw-space weights
(:func:`featx.heads.probe_weights`) and copied into the new head before fine-tuning.

A stage asks its ``probe()`` for the head to start from and a record (``lp_stage``) only when it starts fresh:
:func:`selection_probe` fits one probe per call, shared by every grid point (frozen features do not depend on lr
or weight decay); :func:`final_probe` refits it on train + val at the C chosen on val, with no new look at val.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from featx.heads import fit_linear_probe, make_head, probe_weights

log = logging.getLogger("featx.finetuning")

Head = tuple[np.ndarray, np.ndarray]  # raw-space (coef, intercept)
# () -> (the head to start from, or None for a fresh seeded one; the record kept in the checkpoint's "meta")
Probe = Callable[[], tuple[Head | None, dict[str, Any]]]
# split name ("train", "val", "fit") -> frozen pooled features and labels
Features = Callable[[str], tuple[np.ndarray, np.ndarray]]


def no_probe() -> tuple[Head | None, dict[str, Any]]:
    """Every strategy but lp-ft: a fresh head, nothing to record."""
    return None, {}


def selection_probe(features: Features, *, n_classes: int, use_val: bool) -> Probe:
    """Stage 1 for the selection (or rule) runs: C chosen on val (or by the probe's rule without val), fitted
    once on first use and shared by every later call."""
    fitted: list[tuple[Head, dict[str, Any]]] = []

    def probe() -> tuple[Head | None, dict[str, Any]]:
        if not fitted:
            t0 = time.perf_counter()
            Xtr, ytr = features("train")
            Xva, yva = features("val") if use_val else (None, None)
            p = fit_linear_probe(Xtr, ytr, Xva, yva, n_classes=n_classes)
            info = {
                "C": float(p.C),
                "val_accuracy": None if p.val_accuracy is None else float(p.val_accuracy),
                "curve": list(p.curve),
                "at_grid_edge": bool(p.at_grid_edge),
                "selection": p.selection,
                "standardized": True,
                "seconds": time.perf_counter() - t0,
            }
            log.info(
                "lp-ft probe: C=%g chosen by %s (accuracy %s, %.1f s)",
                info["C"],
                info["selection"],
                info["val_accuracy"],
                info["seconds"],
            )
            fitted.append(((p.coef, p.intercept), info))
        head, info = fitted[0]
        return head, {"lp_stage": dict(info)}

    return probe


def final_probe(features: Features, lp_info: dict[str, Any], *, n_classes: int) -> Probe:
    """Stage 1 for the train + val refit: the probe refitted on ``features("fit")`` at the C chosen on val."""

    def probe() -> tuple[Head | None, dict[str, Any]]:
        X, y = features("fit")
        head = fit_probe_fixed_c(X, y, lp_info["C"], n_classes=n_classes)  # the C chosen on val, no new look
        return head, {"lp_stage": {**lp_info, "final_C": lp_info["C"], "final_n_fit": len(y)}}

    return probe


def fit_probe_fixed_c(X: np.ndarray, y: np.ndarray, C: float, *, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """fit-head's logistic regression (StandardScaler + LogisticRegression) at ``C``, as raw-space ``(coef, intercept)``
    (:func:`featx.heads.probe_weights`). Used for the train+val refit at the C chosen on val, where no val score may
    be looked at.
    """
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = make_head("logreg", C=float(C)).fit(X, y)
    return probe_weights(pipe, n_classes)


def init_head_from_probe(linear: nn.Linear, coef: np.ndarray, intercept: np.ndarray) -> None:
    """Copy a probe's raw-space weights into the network's last layer."""
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(coef, dtype=np.float32)))
        linear.bias.copy_(torch.from_numpy(np.asarray(intercept, dtype=np.float32)))
