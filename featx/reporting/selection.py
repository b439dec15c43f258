"""Every choice the report makes, all on val: the best head, fine-tuning strategy and layer, how close each choice
was, and the facts about a row that a choice depends on (did it produce a result, did its model ever update the
backbone, how many val images scored it).

Selection never sees test: the chosen item has the highest ``val_accuracy``; ties go to the lower ``val_log_loss``
where every tied item has one, else to the first in the given order (the grid's order). An item without a finite
``val_accuracy`` (or a failed row) is never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from featx.records import FEATURES, FINETUNE, DatasetResult, FewshotPoint, LayerPoint, ResultRow

from ._format import _is_finetune_method, _is_num

T = TypeVar("T")


@dataclass
class LayerRow(ResultRow):
    """A layer-wise probe point as a candidate of the features family: a logistic-regression probe on ``layer``,
    named ``"logreg on <layer>"``. The report's own shape, never written to ``results.json``."""

    layer: str | None = None
    depth: int | None = None
    dim: int | None = None

    @classmethod
    def of(cls, p: LayerPoint) -> LayerRow:
        return cls(
            family=FEATURES,
            strategy=f"logreg on {p.layer}",
            layer=p.layer,
            depth=p.depth,
            dim=p.dim,
            status=p.status,
            error=p.error,
            accuracy=p.accuracy,
            accuracy_ci95=p.accuracy_ci95,
            macro_f1=p.macro_f1,
            val_accuracy=p.val_accuracy,
            val_log_loss=p.val_log_loss,
            hyperparameters=p.hyperparameters,
            test_positions=p.test_positions,
            test_predictions=p.test_predictions,
            test_labels=p.test_labels,
        )


# ---------------------------------------------------------------------------------------------- choosing on val


def _val_field(item: Any, name: str) -> Any:
    """One val field of a candidate: a row, a layer point, or a plain dict with the same keys (selection ranks any
    of them, and returns the items it was given)."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def select_on_val(items: Iterable[T]) -> T | None:
    """The item with the highest ``val_accuracy``; ties go to the lower ``val_log_loss`` when every tied item
    has one, else to the first in the given order.

    Items without a finite ``val_accuracy`` (or failed rows) are never chosen: test accuracy is not a
    fallback, because choosing on test makes the reported test score optimistic.
    """
    ranked = rank_on_val(items)
    return ranked[0] if ranked else None


def rank_on_val(items: Iterable[T]) -> list[T]:
    """Items ordered as the selection rule prefers them: val accuracy (higher first), then, within an exact tie,
    val log-loss (lower first) when every tied item has one, then the given order. Items that cannot be
    chosen (failed, no finite val accuracy) are left out."""
    pool = [it for it in items if _val_field(it, "status") != "failed" and _is_num(_val_field(it, "val_accuracy"))]
    ranked = sorted(pool, key=lambda it: -_val_key(it))  # stable: the given order within a tie
    out: list[T] = []
    i = 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and _val_key(ranked[j]) == _val_key(ranked[i]):
            j += 1
        group = ranked[i:j]
        if len(group) > 1 and all(_is_num(_val_field(g, "val_log_loss")) for g in group):
            group = sorted(group, key=lambda g: float(_val_field(g, "val_log_loss")))
        out += group
        i = j
    return out


def choice_detail(items: Iterable[Any], *, n_val: int | None = None) -> dict[str, Any] | None:
    """How a val choice was made: ``{"chosen", "runner_up", "tied", "decided_by", "margin", "margin_images",
    "n_val", "close"}``, or None when nothing can be chosen.

    ``tied``: the items level with the chosen one on val accuracy; ``decided_by``: ``"val accuracy"``,
    ``"val log-loss"`` or ``"order"`` (an exact tie with no log-loss to break it: the grid's order decided);
    ``margin_images``: the val-accuracy margin over the runner-up in val images (needs ``n_val``, from the rows
    or the argument); ``close``: the choice was decided by one val image or less.
    """
    ranked = rank_on_val(items)
    if not ranked:
        return None
    chosen = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    tied = [it for it in ranked[1:] if _val_key(it) == _val_key(chosen)]
    decided = "val accuracy"
    if tied:
        losses = [_val_field(it, "val_log_loss") for it in (chosen, *tied)]
        decided = "val log-loss" if all(_is_num(v) for v in losses) and float(losses[0]) < float(losses[1]) else "order"
    nv = _n_val(chosen) or n_val
    margin = None if runner is None else float(_val_field(chosen, "val_accuracy")) - float(_val_field(runner, "val_accuracy"))
    margin_images = None if margin is None or not nv else int(round(margin * nv))
    close = runner is not None and (bool(tied) or (margin_images is not None and margin_images <= 1))
    return {
        "chosen": chosen,
        "runner_up": runner,
        "tied": tied,
        "decided_by": decided,
        "margin": margin,
        "margin_images": margin_images,
        "n_val": nv,
        "close": close,
        "ranked": ranked,
    }


def _val_key(it: Any) -> float:
    """Val accuracy rounded so that the same fraction of val images computed twice compares equal."""
    return round(float(_val_field(it, "val_accuracy")), 12)


def _n_val(r: Any) -> int | None:
    n = _val_field(r, "n_val")
    if _is_num(n) and int(n) > 0:
        return int(n)
    pos = _val_field(r, "val_positions")
    return len(pos) if isinstance(pos, Sequence) and not isinstance(pos, str) and len(pos) else None


# ---------------------------------------------------------------------------------------------- facts about a row


def _row_ok(r: ResultRow) -> bool:
    """The row produced a result: not failed, with a finite test accuracy."""
    return r.status != "failed" and _is_num(r.accuracy)


def backbone_updated(row: ResultRow | Mapping[str, Any]) -> bool | None:
    """Whether the model a fine-tuning row reports ever updated the backbone: the row's ``backbone_updated``
    when recorded; else False for the ``head`` strategy (a linear layer on the frozen backbone) and for a
    chosen fine-tuning epoch count of 0 (``fine_tune_epochs``, else the chosen ``epochs``, else ``best_epoch``:
    LP-FT keeping its epoch-0 probe); None when nothing says. Feature heads never update it."""
    r = ResultRow.from_dict(row)
    if isinstance(r.backbone_updated, (bool, np.bool_)):
        return bool(r.backbone_updated)
    if r.family != FINETUNE:
        return False
    if str(r.strategy) == "head":
        return False
    epochs = _fine_tune_epochs(r)
    return None if epochs is None else epochs > 0


def _fine_tune_epochs(r: ResultRow) -> int | None:
    """Fine-tuning epochs behind the reported model: ``fine_tune_epochs``, else the chosen ``epochs``, else
    ``best_epoch`` (0 = LP-FT's probe, before any update)."""
    hp = r.hyperparameters if isinstance(r.hyperparameters, Mapping) else {}
    for v in (r.fine_tune_epochs, hp.get("epochs"), r.best_epoch):
        if _is_num(v):
            return int(v)
    return None


def _layer_points(points: Sequence[LayerPoint]) -> list[LayerPoint]:
    """The layer points with a depth and an accuracy, shallowest first."""
    pts = [p for p in points if _is_num(p.depth) and _is_num(p.accuracy)]
    return sorted(pts, key=lambda p: float(p.depth))  # type: ignore[arg-type]


def _layer_candidates(ds: DatasetResult, heads: Sequence[ResultRow]) -> list[LayerRow]:
    """The layer-wise probes as candidates of the features family. The deepest point is left out when it is
    the logreg head on the pooled features itself (same val and test accuracy): the same model twice."""
    pts = [p for p in _layer_points(ds.layerwise) if _is_num(p.val_accuracy)]
    logreg = next((r for r in heads if r.strategy == "logreg"), None)
    out = []
    for i, p in enumerate(pts):
        same = (
            logreg is not None
            and i == len(pts) - 1
            and math.isclose(float(p.val_accuracy), _float_or_nan(logreg.val_accuracy), abs_tol=1e-12)  # type: ignore[arg-type]
            and math.isclose(float(p.accuracy), _float_or_nan(logreg.accuracy), abs_tol=1e-12)  # type: ignore[arg-type]
        )
        if not same:
            out.append(LayerRow.of(p))
    return out


def _float_or_nan(v: Any) -> float:
    return math.nan if v is None else float(v)


# ---------------------------------------------------------------------------------------------- a dataset's choices


def selections(dataset_result: DatasetResult | Mapping[str, Any]) -> dict[str, Any]:
    """Every choice the report makes for one dataset, all on val: ``{"head", "finetune", "layer",
    "fewshot_head", "fewshot_finetune"}`` (names, or None where nothing could be chosen). ``head`` is the
    choice among the heads on the pooled features; :func:`family_choices` adds the layers to it."""
    ds = DatasetResult.from_dict(dataset_result)
    rows = [r for r in ds.rows if _row_ok(r)]
    head = select_on_val(r for r in rows if r.family == FEATURES)
    tune = select_on_val(r for r in rows if r.family == FINETUNE)
    layer = select_on_val(_layer_points(ds.layerwise))
    few_head, few_tune = _fewshot_methods(ds.fewshot, head, tune)
    return {
        "head": head.strategy if head else None,
        "finetune": tune.strategy if tune else None,
        "layer": layer.layer if layer else None,
        "fewshot_head": few_head[0] if few_head else None,
        "fewshot_finetune": few_tune[0] if few_tune else None,
    }


def family_choices(dataset_result: DatasetResult | Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """:func:`choice_detail` for ``"head"`` (heads on the pooled features), ``"features"`` (those heads and,
    when the layer-wise probe ran, a logistic-regression probe per layer), ``"finetune"`` (every fine-tuning
    strategy) and ``"trained"`` (only the fine-tuning runs that updated the backbone)."""
    ds = DatasetResult.from_dict(dataset_result)
    rows = [r for r in ds.rows if _row_ok(r)]
    heads = [r for r in rows if r.family == FEATURES]
    tunes = [r for r in rows if r.family == FINETUNE]
    n_val = next((_n_val(r) for r in rows if _n_val(r)), None)
    return {
        "head": choice_detail(heads, n_val=n_val),
        "features": choice_detail([*heads, *_layer_candidates(ds, heads)], n_val=n_val),
        "finetune": choice_detail(tunes, n_val=n_val),
        "trained": choice_detail([r for r in tunes if backbone_updated(r) is not False], n_val=n_val),
    }


def _fewshot_methods(
    points: Sequence[FewshotPoint], head_row: ResultRow | None, tune_row: ResultRow | None
) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(method, why) for the head and the fine-tuning method the few-shot crossing compares: the ones chosen on val
    in the full-data grid when the curve has them, else the only / first method in the points' order."""
    order: list[str] = []
    for p in points:
        m = str(p.method)
        if p.status != "failed" and _is_num(p.accuracy) and m not in order:
            order.append(m)

    def pick(cands: list[str], chosen: str | None, family: str) -> tuple[str, str] | None:
        if not cands:
            return None
        if chosen in cands:
            return chosen, "chosen on val in the full-data grid"
        if len(cands) == 1:
            return cands[0], f"the only {family} in the curve"
        return cands[0], f"the first {family} in the grid, as none was chosen on val"

    heads = [m for m in order if not _is_finetune_method(m)]
    tunes = [m for m in order if _is_finetune_method(m)]
    return (
        pick(heads, str(head_row.strategy) if head_row else None, "head"),
        pick(tunes, f"{FINETUNE}:{tune_row.strategy}" if tune_row else None, "fine-tuning method"),
    )
