"""The head-kind contract and its registry.

A :class:`HeadKind` owns everything featx knows about one kind of head: its pipeline steps, how to build it,
its grid and its default rule, which parameters are derived from searched ones, its sweep and refit, the check
a loaded file must pass and how to count its parameters. Code elsewhere looks the name up once
(:func:`head_kind`) and passes the object; adding a kind is one :func:`register_head_kind` call. The registry is
also the safe-load allow-list: a head file may hold exactly the step classes of a registered kind
(:func:`featx.heads.files.safe_node_types`).

Imports neither scikit-learn nor torch (kinds import theirs lazily), so any layer may look a kind up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featx.errors import UsageError

Folds = list[tuple[np.ndarray, np.ndarray]]
Steps = tuple[tuple[str, type], ...]
Grid = list[dict[str, Any]]


@dataclass
class SweepLevers:
    """The speed levers of the sweeps, all on by default. Turning one off restores the plain way for that
    step (the benchmark's ablation); results stay valid either way."""

    warm_path: bool = True  # logreg / linear-svm: warm starts along the C path
    sweep_tol: bool = True  # loose tolerance (SWEEP_TOL) during the sweep, full tolerance for the refit
    early_stop: bool = True  # stop the path once val accuracy has clearly peaked (PATIENCE)
    primal: bool = True  # linear-svm: featx's warm-started primal solver (L-BFGS, all classes) instead of liblinear
    gram: bool = True  # rbf-svm: one squared-distance matrix and precomputed kernels for the whole grid
    one_search: bool = True  # knn: one neighbour search for the largest k
    # kinds that allow it (linear-svm) with n_jobs > 1: while the path goes on, a second thread refits at the best
    # point so far (used only if it is the final choice; the refit is the same computation either way)
    speculative_refit: bool = True
    fast_search: bool = True  # knn: float32 GEMM + argpartition per block of queries, not scikit-learn's float64 search
    # Sequential fits with one BLAS/OpenMP thread: on small matrices (thousands of rows x 1280) extra BLAS
    # threads cost more than they bring (1.4-3x slower on a 2-core machine, benchmarks/results/bench_heads.md);
    # parallel sweeps (joblib) use one thread per worker either way.
    one_thread: bool = True


@dataclass
class SweepContext:
    """What one sweep + refit share: options, and state carried from the sweep into the refit."""

    levers: SweepLevers
    n_jobs: int
    solver: str = "sklearn"
    device: str | None = None
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # goes into metadata (e.g. stopped_early)


class FittedState:
    """What a kind's ``check_fitted`` uses to vet a loaded classifier: ``arr`` fetches a fitted array of the expected
    rank and dtype kinds, ``ok`` refuses the file unless a condition holds (both raise the loader's error)."""

    def __init__(self, refuse: Callable[[str], Exception]) -> None:
        self._refuse = refuse

    def arr(self, obj: Any, name: str, ndim: int, kinds: str) -> np.ndarray:
        a = getattr(obj, name, None)
        if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype.kind not in kinds:
            raise self._refuse(f"{type(obj).__name__}.{name} is missing or malformed")
        return a

    def ok(self, cond: bool, what: str) -> None:
        if not cond:
            raise self._refuse(f"inconsistent fitted state: {what}")


Sweep = Callable[[np.ndarray, np.ndarray, Folds, Grid, SweepContext], list[dict[str, Any]]]
# (transformed rows, labels, params, ctx, the rows' positions among the rows the sweep saw) -> fitted classifier
Refit = Callable[[np.ndarray, np.ndarray, dict[str, Any], SweepContext, np.ndarray], Any]


@dataclass(frozen=True)
class HeadKind:
    """One kind of head.

    ``steps()`` are the pipeline's steps, in order, as featx builds them (imported lazily); they are also the only
    estimator classes a saved head of this kind may hold. ``build(params)`` gives the unfitted pipeline;
    ``grid(n_features, n_train, x_var)`` the grid, strongest regularisation first; ``defaults`` the rule used with
    fewer than two images per class (``resolve_defaults(params, n_features, x_var)`` completes it for the data).
    ``sweep(X, y, folds, grid, ctx)`` scores grid points on already transformed rows (each fold: train rows, val
    rows) and ``refit(X, y, params, ctx, rows)`` fits the final classifier (the last step); without them every
    grid point is fitted from scratch (:func:`featx.heads.sweeps.each_point`) and the refit is ``build(params)``'s
    last step fitted. ``check_fitted(classifier, n_features, n_classes, state)`` vets a loaded classifier (libsvm
    and the k-NN search index into fitted arrays without bounds checks); ``n_params(classifier)`` counts what it
    stores.
    """

    name: str
    description: str
    steps: Callable[[], Steps]
    build: Callable[[dict[str, Any]], Any]
    grid: Callable[[int, int, float], Grid]
    defaults: Mapping[str, Any]
    check_fitted: Callable[[Any, int, int, FittedState], None]
    n_params: Callable[[Any], int]
    sweep: Sweep | None = None
    refit: Refit | None = None
    resolve_defaults: Callable[[dict[str, Any], int, float], dict[str, Any]] | None = None
    derived: Mapping[str, str] = field(default_factory=dict)  # parameter -> the searched one it is computed from
    lower_bounds: Mapping[str, float] = field(default_factory=dict)  # natural bounds (see grid_edges); default 0
    scale_relative: bool = False  # grid and defaults depend on the variance of the transformed features
    solvers: tuple[str, ...] = ("sklearn",)  # "torch": torch L-BFGS (fit_head's solver=)
    streamable: bool = False  # fit_head_streamed fits it
    tie_break: str = "first"  # "first": strongest regularisation among ties; "default": closest to the default
    one_thread: bool = True  # sweep and refit with one BLAS thread (lever one_thread); False: one big GEMM gains from more
    speculative_refit: bool = False  # its path walk may refit beside the sweep (lever speculative_refit, n_jobs > 1)

    def default_params(self, n_features: int, x_var: float = 1.0) -> dict[str, Any]:
        """The default rule resolved for this data."""
        p = dict(self.defaults)
        return self.resolve_defaults(p, n_features, x_var) if self.resolve_defaults else p

    def searched(self, params: Mapping[str, Any]) -> list[str]:
        """The keys of ``params`` a grid searches (derived parameters left out)."""
        return [k for k in params if self.derived.get(k) not in params]

    def at_grid_edge(self, grid: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> bool:
        """Whether a chosen value sits at the end of its grid axis (so the best may lie outside the grid)."""
        return bool(grid_edges(grid_axes(grid), params, derived=self.derived, lower_bounds=self.lower_bounds))

    def count_params(self, estimator: Any) -> int:
        """The numbers the fitted pipeline's classifier stores (what ``trainable_params`` reports)."""
        return int(self.n_params(estimator[-1]))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def grid_axes(points: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """The sorted numeric values searched per parameter in a list of grid points."""
    values: dict[str, set[float]] = {}
    for p in points:
        for k, v in p.items():
            if _is_num(v):
                values.setdefault(k, set()).add(float(v))
    return {k: sorted(v) for k, v in values.items()}


def grid_edges(
    axes: Mapping[str, Sequence[float]],
    chosen: Mapping[str, Any],
    *,
    derived: Mapping[str, str] | None = None,
    lower_bounds: Mapping[str, float] | None = None,
) -> list[tuple[str, Any, str]]:
    """The one definition of "at a grid edge", for heads, fine-tuning and the report: every chosen value that sits at
    an end of its axis in ``axes`` (sorted values searched per parameter), as (parameter, value, "smallest" |
    "largest"), in ``chosen``'s order.

    Only axes of two values or more count (with two, every choice is an edge: the grid then says nothing about
    what lies beyond). A parameter computed from a searched one (``derived``, e.g. rbf-svm's gamma from
    gamma_scale) is named once, through the searched one. A smallest value at or below the parameter's natural
    lower bound (``lower_bounds``, 0 when not named: no weight decay; 1 for k-NN's k) is not an edge: nothing lies
    below it to search.
    """
    derived = derived or {}
    lower_bounds = lower_bounds or {}
    edges = []
    for k, v in chosen.items():
        if derived.get(k) in chosen:
            continue
        vals = axes.get(k, [])
        if not _is_num(v) or len(vals) < 2:
            continue
        if math.isclose(float(v), vals[0], rel_tol=1e-9, abs_tol=1e-15):
            if float(v) > lower_bounds.get(k, 0.0):
                edges.append((k, v, "smallest"))
        elif math.isclose(float(v), vals[-1], rel_tol=1e-9):
            edges.append((k, v, "largest"))
    return edges


# --------------------------------------------------------------------------------------------------
# the registry

HEAD_KINDS: dict[str, HeadKind] = {}


def register_head_kind(kind: HeadKind) -> HeadKind:
    """Add a head kind: fit-head, save/load (its step classes join the allow-list), predict and the report then
    know it."""
    if kind.name in HEAD_KINDS:
        raise UsageError(f"head kind {kind.name!r} is registered already")
    HEAD_KINDS[kind.name] = kind
    return kind


def unregister_head_kind(name: str) -> None:
    """Remove a head kind (its files stop loading)."""
    HEAD_KINDS.pop(name, None)


def head_kind(kind: str | HeadKind) -> HeadKind:
    """The registered kind of this name (a HeadKind is returned as it is)."""
    if isinstance(kind, HeadKind):
        return kind
    if kind not in HEAD_KINDS:
        raise UsageError(f"unknown head '{kind}' (choose from {', '.join(HEADS)})")
    return HEAD_KINDS[kind]


def make_head(kind: str | HeadKind, **params: Any) -> Any:
    """An unfitted scikit-learn pipeline for head ``kind`` with hyper-parameters ``params``."""
    return head_kind(kind).build(params)


def param_grid(kind: str | HeadKind, *, n_features: int, n_train: int, x_var: float = 1.0) -> Grid:
    """Hyper-parameter grid, ordered from strongest to weakest regularisation. ``x_var``: variance of the
    transformed features (the RBF kernel width is relative to it)."""
    return head_kind(kind).grid(n_features, n_train, x_var)


def default_params(kind: str | HeadKind, *, n_features: int, x_var: float = 1.0) -> dict[str, Any]:
    """The kind's default rule resolved for this data (the RBF gamma from its relative scale)."""
    return head_kind(kind).default_params(n_features, x_var)


def derived_params() -> dict[str, str]:
    """Every registered kind's derived parameters (parameter -> the searched one it is computed from)."""
    return {k: v for kind in HEAD_KINDS.values() for k, v in kind.derived.items()}


class _KindNames(Sequence[str]):
    """The registered kind names, in registration order (a live view of the registry)."""

    def __getitem__(self, i: Any) -> Any:
        return tuple(HEAD_KINDS)[i]

    def __len__(self) -> int:
        return len(HEAD_KINDS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(HEAD_KINDS))

    def __contains__(self, name: object) -> bool:
        return name in HEAD_KINDS

    def __repr__(self) -> str:
        return repr(tuple(HEAD_KINDS))


class _DefaultRules(Mapping[str, Mapping[str, Any]]):
    """Each registered kind's default rule (``HeadKind.defaults``), by name (a live view of the registry)."""

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        return HEAD_KINDS[name].defaults

    def __len__(self) -> int:
        return len(HEAD_KINDS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(HEAD_KINDS))


HEADS: Sequence[str] = _KindNames()
# The rule used when there are fewer than two labelled images per class (no validation, no cross-validation).
HEAD_DEFAULT_PARAMS: Mapping[str, Mapping[str, Any]] = _DefaultRules()
