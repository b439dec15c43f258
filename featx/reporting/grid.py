"""What a row searched on val, read from its own grid (a head's ``sweep``, fine-tuning's ``grid``): the grid points,
the values per hyper-parameter, and whether the chosen value sits at an edge of the grid.

The grid-edge rule and the derived parameters come from the head-kind registry (``featx.heads.kinds``) through
``_grid_edges`` and ``_derived_params``: the budget sentences, the results table's "(grid edge)" mark and the summary
all ask them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from featx.records import FEATURES, ResultRow

from ._format import _is_num


def _grid_entries(r: ResultRow) -> list[dict[str, Any]]:
    """The searched points of a row as flat dicts (parameters, val_accuracy, epochs fields), from a head's
    ``sweep`` or fine-tuning's ``grid``."""
    entries = r.sweep or r.grid or []
    out: list[dict[str, Any]] = []
    if not isinstance(entries, list):
        return out
    for e in entries:
        if not isinstance(e, Mapping):
            continue
        flat = dict(e)
        if isinstance(e.get("params"), Mapping):
            flat.pop("params")
            flat.update(e["params"])
        out.append(flat)
    return out


def _grid_values(r: ResultRow) -> dict[str, list[float]]:
    """Numeric values searched per hyper-parameter, from a head's ``sweep`` or fine-tuning's ``grid``."""
    entries = r.sweep or r.grid or []
    values: dict[str, set[float]] = {}
    if not isinstance(entries, list):
        return {}
    for e in entries:
        if not isinstance(e, Mapping):
            continue
        params = e.get("params") if isinstance(e.get("params"), Mapping) else e
        for k, v in params.items():
            if k not in _NOT_PARAMS and not str(k).endswith("seconds") and _is_num(v):
                values.setdefault(k, set()).add(float(v))
    return {k: sorted(v) for k, v in values.items()}


def _searched_params(r: ResultRow) -> list[str]:
    """The hyper-parameters a row's grid searched: keys of its chosen ``hyperparameters`` that take numeric
    values in the grid (derived ones such as the RBF SVM's gamma left out), in the chosen dict's order."""
    hp = r.hyperparameters if isinstance(r.hyperparameters, Mapping) else {}
    entries = _grid_entries(r)
    derived = _derived_params()
    keys = [k for k in hp if k != "epochs" and derived.get(k) not in hp]
    return [k for k in keys if any(_is_num(e.get(k)) for e in entries)]


def _derived_params() -> dict[str, str]:
    """Hyper-parameters computed from another one that the grid searches (rbf-svm: gamma = gamma_scale / (n_features
    * the features' variance)), from the head-kind registry. Imported here, not at the top: featx.heads is torch-free
    but heavier than the report needs for anything else, and rows do not name their derived parameters."""
    from featx.heads.kinds import derived_params

    return derived_params()


# Fields of a grid point that are results or bookkeeping, not searched hyper-parameters.
_NOT_PARAMS = ("val_accuracy", "val_log_loss", "best_epoch", "epochs", "epochs_run", "seconds", "fine_tune_epochs")


def _grid_edges(r: ResultRow) -> list[tuple[str, Any, str]] | None:
    """None when the chosen hyper-parameters are inside their grid (or nothing says otherwise); else the
    (parameter, value, "smallest"|"largest") edges hit, [] when the row only says "at an edge".

    Heads carry ``at_grid_edge`` (featx.heads knows their natural bounds, e.g. k = 1 for k-NN); for fine-tuning
    it is worked out from ``grid`` for every parameter searched over two values or more (with two, every choice
    is an edge: that is worth saying, as the grid then says nothing about what lies beyond it), except a smallest
    value of 0 or less, which cannot be widened (no weight decay): :func:`featx.heads.grid_edges`, the one
    definition.
    """
    from featx.heads.kinds import grid_edges

    hp = r.hyperparameters if isinstance(r.hyperparameters, Mapping) else {}
    edges = grid_edges(_grid_values(r), hp, derived=_derived_params())
    flag = r.at_grid_edge
    if r.family == FEATURES:
        if flag is None:
            return None  # old rows: nothing recorded, nothing claimed
        return edges if flag else None
    if flag is False:
        return None
    return edges if edges else ([] if flag else None)


def _beyond_edge(r: ResultRow, k: str, side: str) -> float | int | None:
    """The next value past an edge of a grid axis, one grid step further (geometric when the axis is positive)."""
    vals = _grid_values(r).get(k, [])
    if len(vals) < 2:
        return None
    if side == "smallest":
        if vals[0] <= 0:
            return None
        nxt = vals[0] * vals[0] / vals[1]
    else:
        nxt = vals[-1] * vals[-1] / vals[-2] if vals[-2] > 0 else 2 * vals[-1]
    if all(float(v).is_integer() for v in vals):
        return int(round(nxt))
    return float(f"{nxt:.1g}")
