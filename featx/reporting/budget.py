"""Where the compute budget, not the models, may decide the verdict: fine-tuning runs (or their grid points) still
improving at their last epoch, and chosen hyper-parameters at an edge of the searched grid; each said with what to
run to settle it, and one follow-up rule (:func:`_more_epochs`) for every dataset where that happens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from featx.records import FEATURES, FINETUNE, DatasetResult, ResultRow

from ._format import _fmt_float, _fmt_hvalue, _is_num
from .grid import _beyond_edge, _grid_edges, _grid_entries, _searched_params
from .selection import _row_ok


def budget_sentences(dataset_result: DatasetResult | Mapping[str, Any]) -> list[str]:
    """Where the compute budget, not the models, may decide the verdict: fine-tuning runs still improving at
    their last epoch (the chosen run, or other grid points of a strategy), and chosen hyper-parameters on the
    edge of the searched grid; each with what to run."""
    return [item["text"] for item in _budget_items(DatasetResult.from_dict(dataset_result))]


def budget_flags(dataset_result: DatasetResult | Mapping[str, Any]) -> list[str]:
    """Short reasons why the budget may have decided the verdict (empty: nothing says so), for the summary."""
    items = _budget_items(DatasetResult.from_dict(dataset_result))
    labels = {
        "improving": "still improving at the last epoch",
        "grid_improving": "grid points still improving",
        "edge": "chosen value at a grid edge",
    }
    out = []
    for kind, label in labels.items():
        whats = [i["what"] for i in items if i["kind"] == kind]
        if whats:
            out.append(f"{label}: {', '.join(whats)}")
    return out


def _budget_items(ds: DatasetResult) -> list[dict[str, str]]:
    """Each reason the budget may have decided the verdict: ``{"text": sentence, "kind": "improving" |
    "grid_improving" | "edge", "what": the runs or parameters concerned}``."""
    ok = [r for r in ds.rows if _row_ok(r)]
    out: list[dict[str, str]] = []
    by_budget: dict[Any, list[str]] = {}
    for r in ok:
        if r.family == FINETUNE and _still_improving(r):
            by_budget.setdefault(_epoch_budget(r), []).append(str(r.strategy))
    for budget, names in by_budget.items():
        who = f"fine-tuning ({', '.join(names)})"
        verb = "was" if len(names) == 1 else "were"
        if _is_num(budget):
            n = int(budget)
            more = _more_epochs(n)
            text = (
                f"{who[0].upper()}{who[1:]} {verb} still improving when {'its' if len(names) == 1 else 'their'} {n} epochs "
                f"ended: this budget under-states it; run with --epochs {more} (bench config: finetune: {{epochs: {more}}}) "
                "to settle it."
            )
        else:
            text = (
                f"{who[0].upper()}{who[1:]} {verb} still improving at the last epoch run: this budget under-states it; "
                "run with more epochs to settle it."
            )
        out.append({"text": text, "kind": "improving", "what": ", ".join(names)})
    for r in ok:
        if r.family != FINETUNE or _still_improving(r):
            continue
        points = _improving_grid_points(r)
        if not points:
            continue
        n = _epoch_budget(r)
        best = max((float(p["val_accuracy"]) for p in points if _is_num(p.get("val_accuracy"))), default=None)
        where = _describe_points(points, r)
        run = (
            f"run with --epochs {_more_epochs(int(n))} (bench config: finetune: {{epochs: {_more_epochs(int(n))}}})"
            if _is_num(n)
            else "run with more epochs"
        )
        out.append(
            {
                "text": (
                    f"Fine-tuning ({r.strategy}) kept a run that had stopped improving, but its grid "
                    f"point{'s' if len(points) > 1 else ''} at {where} {'were' if len(points) > 1 else 'was'} still improving "
                    f"when {'their' if len(points) > 1 else 'its'} {int(n) if _is_num(n) else 'last'} epochs ended "
                    f"(best val {_fmt_float(best)} against the chosen {_fmt_float(r.val_accuracy)}): more epochs might "
                    f"change the choice; {run} to settle it."
                ),
                "kind": "grid_improving",
                "what": f"{r.strategy} ({where})",
            }
        )
    for r in ok:
        edges = _grid_edges(r)
        if edges is None:
            continue
        name = f"the {r.strategy} head" if r.family == FEATURES else f"fine-tuning ({r.strategy})"
        if not edges:
            out.append(
                {
                    "text": (
                        f"The hyper-parameters chosen for {name} sit at an edge of the searched grid, so a wider grid might "
                        "do better; widen it past that edge and re-run to settle it."
                    ),
                    "kind": "edge",
                    "what": str(r.strategy),
                }
            )
            continue
        parts = [f"{k}={_fmt_hvalue(v)} is the {side} value searched" for k, v, side in edges]
        if r.family == FEATURES:
            fix = "pass a wider grid (fit_head(..., grid=...)) and re-run"
        else:
            beyond = [f"{k} {_fmt_hvalue(nxt)}" for k, _, side in edges if (nxt := _beyond_edge(r, k, side)) is not None]
            fix = f"extend the bench config's fine-tuning grid past {'them' if len(edges) > 1 else 'it'}"
            fix += f" (e.g. {', '.join(beyond)})" if beyond else ""
            fix += " and re-run"
        out.append(
            {
                "text": (
                    f"For {name}, {' and '.join(parts)}: the best value may lie beyond the grid's "
                    f"{'edges' if len(edges) > 1 else 'edge'}; {fix} to settle it."
                ),
                "kind": "edge",
                "what": f"{r.strategy} {' and '.join(k for k, _, _ in edges)}",
            }
        )
    return out


def _epoch_budget(r: ResultRow) -> Any:
    return r.epochs_budget or r.epochs_run


def _more_epochs(n: int) -> int:
    """The one follow-up rule for an epoch budget that was still improving: double it, at least 5 more."""
    return max(2 * n, n + 5)


def _still_improving(r: ResultRow) -> bool:
    """The flag when recorded; else best epoch == last epoch run == the epoch budget."""
    if r.still_improving is not None:
        return bool(r.still_improving)
    best, run, budget = r.best_epoch, r.epochs_run, r.epochs_budget
    return all(_is_num(v) for v in (best, run, budget)) and int(best) == int(run) == int(budget)  # type: ignore[arg-type]


def _improving_grid_points(r: ResultRow) -> list[dict[str, Any]]:
    budget = _epoch_budget(r)
    out = []
    for e in _grid_entries(r):
        flag = e.get("still_improving")
        if flag is None:
            best, run = e.get("best_epoch"), e.get("epochs_run")
            flag = all(_is_num(v) for v in (best, run, budget)) and int(best) == int(run) == int(budget)
        if flag:
            out.append(e)
    return out


def _describe_points(points: Sequence[Mapping[str, Any]], r: ResultRow) -> str:
    """Grid points in few words: only the parameters whose values among ``points`` are not every value searched."""
    entries = _grid_entries(r)
    parts = []
    for k in _searched_params(r):
        every = sorted({float(e[k]) for e in entries if _is_num(e.get(k))})
        vals = sorted({float(p[k]) for p in points if _is_num(p.get(k))})
        if len(every) > 1 and vals and vals != every:
            parts.append(f"{k}={' or '.join(_fmt_hvalue(v) for v in vals)}")
    return ", ".join(parts) if parts else "every grid point"


def _epoch_budgets(ds: DatasetResult) -> list[int]:
    """The epoch budgets of a dataset's fine-tuning runs that were still improving (the run or a grid point)."""
    return [
        int(b)
        for r in ds.rows
        if _row_ok(r)
        and r.family == FINETUNE
        and _is_num(b := _epoch_budget(r))
        and (_still_improving(r) or _improving_grid_points(r))
    ]
