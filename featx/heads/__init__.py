"""Heads: scikit-learn classifiers on cached features, with the linear-evaluation protocol.

Protocol (Kornblith et al. 2019): sweep the regularisation (and kernel width) on a validation split, pick the best
by validation accuracy, refit with the chosen hyper-parameters on train + val, and evaluate once on test. Without
a validation split the choice comes from stratified k-fold cross-validation inside the training rows, and with
fewer than two images per class from the kind's fixed rule (``HeadKind.defaults``).

The package, in dependency order:

- ``kinds``: the :class:`HeadKind` contract, the registry (``register_head_kind``, ``head_kind``, ``HEADS``) that
  doubles as the safe-load allow-list, and the one definition of "at a grid edge" (``grid_edges``).
- ``builders``: the scikit-learn estimators featx builds (steps, constructors, tolerances).
- ``torch_solver``: logistic regression with torch L-BFGS (CUDA; streamed fits), exported as scikit-learn.
- ``sweeps``: each built-in kind's sweep and refit (warm C paths, the primal linear SVM, one Gram matrix for
  the RBF grid, one neighbour search for k-NN), and the plain per-point sweep for kinds without one.
- ``builtin``: the four kinds featx ships (logreg, linear-svm, rbf-svm, knn), registered once each.
- ``arrays``: fit_head_arrays (choice by val / cross-validation / rule, refit), the linear probe for LP-FT.
- ``fitted``: FittedHead and its record, the checks and carving of cached rows.
- ``streamed``: fit_head_streamed, for caches larger than memory.
- ``fit``: fit_head on caches; fit_heads (several kinds, here or as Dask tasks).
- ``files``: save_head / load_head (skops, no pickle; only the node types featx writes).

Imports neither torch nor scikit-learn at import time.
"""

from featx.heads import builtin as _builtin  # noqa: F401  (registers the four built-in kinds)
from featx.heads.arrays import (
    ABSENT_CLASS_BIAS,
    SCALE_PRIOR_ROWS,
    SOLVERS,
    HeadFit,
    LinearProbe,
    choose,
    fit_head_arrays,
    fit_linear_probe,
    fit_transform_step,
    probe_weights,
    shrink_scaler,
    sweep,
)
from featx.heads.builders import REFIT_TOL, SWEEP_TOL
from featx.heads.files import PAYLOAD_KEYS, load_head, safe_node_types, save_head
from featx.heads.fit import fit_head, fit_heads
from featx.heads.fitted import FittedHead, check_same_embedder, head_summary, predict_scores, split_features
from featx.heads.kinds import (
    HEAD_DEFAULT_PARAMS,
    HEAD_KINDS,
    HEADS,
    FittedState,
    HeadKind,
    SweepContext,
    SweepLevers,
    default_params,
    derived_params,
    grid_edges,
    head_kind,
    make_head,
    param_grid,
    register_head_kind,
    unregister_head_kind,
)
from featx.heads.streamed import STREAM_CHUNK_BYTES, STREAM_MAX_PASSES, STREAM_SWEEP_BYTES, fit_head_streamed

__all__ = [
    "ABSENT_CLASS_BIAS",
    "HEADS",
    "HEAD_DEFAULT_PARAMS",
    "HEAD_KINDS",
    "PAYLOAD_KEYS",
    "REFIT_TOL",
    "SCALE_PRIOR_ROWS",
    "SOLVERS",
    "STREAM_CHUNK_BYTES",
    "STREAM_MAX_PASSES",
    "STREAM_SWEEP_BYTES",
    "SWEEP_TOL",
    "FittedHead",
    "FittedState",
    "HeadFit",
    "HeadKind",
    "LinearProbe",
    "SweepContext",
    "SweepLevers",
    "check_same_embedder",
    "choose",
    "default_params",
    "derived_params",
    "fit_head",
    "fit_head_arrays",
    "fit_head_streamed",
    "fit_heads",
    "fit_linear_probe",
    "fit_transform_step",
    "grid_edges",
    "head_kind",
    "head_summary",
    "load_head",
    "make_head",
    "param_grid",
    "predict_scores",
    "probe_weights",
    "register_head_kind",
    "safe_node_types",
    "save_head",
    "shrink_scaler",
    "split_features",
    "sweep",
    "unregister_head_kind",
]
