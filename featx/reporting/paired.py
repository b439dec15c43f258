"""Two rows paired over the same test images: their predictions aligned on ``test_positions`` (bare dataset positions
or ``[split, position]`` pairs, read by ``featx.data.RowSelection``), then ``featx.metrics.paired_comparison``.
Different images, or different labels for the same image, raise ``MismatchError``: a paired test on them would be
wrong."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featx.data import RowSelection
from featx.errors import MismatchError
from featx.metrics import paired_comparison
from featx.records import FINETUNE, DatasetResult, ResultRow

from ._format import LEVEL


def _paired_inputs(head: ResultRow, tune: ResultRow, ds: DatasetResult) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(labels, fine-tuning predictions, head predictions) aligned on the same test images, or why not.

    Rows whose ``test_positions`` are the same images in another order are aligned; different images, or
    different labels for the same image, raise ``MismatchError``: a paired test on them would be wrong.
    """
    names = f"the chosen head ({head.strategy}) and fine-tuning ({tune.strategy})"
    preds: dict[str, Any] = {"head": head.test_predictions, "finetune": tune.test_predictions}
    lacking = [k for k, v in preds.items() if not isinstance(v, Sequence) or isinstance(v, str) or len(v) == 0]
    if lacking:
        which = " and ".join("fine-tuning" if k == FINETUNE else k for k in lacking)
        which += " rows carry" if len(lacking) > 1 else " row carries"
        return f"the {which} no test predictions (results from before featx recorded them)"
    pos: dict[str, Any] = {"head": head.test_positions, "finetune": tune.test_positions}
    if any(not isinstance(v, Sequence) or isinstance(v, str) for v in pos.values()):
        return "test positions were not recorded, so it cannot be checked that both scored the same images"
    for fam, row in (("head", head), ("finetune", tune)):
        if len(preds[fam]) != len(pos[fam]):
            n_pred, n_pos = len(preds[fam]), len(pos[fam])
            raise MismatchError(f"{fam} row {row.strategy}: {n_pred} test predictions for {n_pos} test positions")
    # bare positions (bench rows) index the test rows' source split; [split, position] pairs name theirs
    source = (ds.position_sources or {}).get("test", "test")
    try:
        recorded = {fam: RowSelection.from_record(v, source) for fam, v in pos.items()}
    except ValueError:
        return "test positions are not dataset positions, so it cannot be checked that both scored the same images"
    keys_h, keys_t = ([(r.split, p) for p in r.positions] for r in (recorded["head"], recorded["finetune"]))
    labels_h, labels_t = head.test_labels, tune.test_labels
    if labels_h is None or labels_t is None:
        return "no test labels were recorded with the predictions"
    if len(labels_h) != len(keys_h) or len(labels_t) != len(keys_t):
        raise MismatchError(
            f"{names}: test labels and test positions differ in length "
            f"({len(labels_h)}/{len(keys_h)}, {len(labels_t)}/{len(keys_t)})"
        )
    order = np.arange(len(keys_t))
    if keys_h != keys_t:
        same_set = len(set(keys_h)) == len(keys_h) and set(keys_h) == set(keys_t) and len(keys_h) == len(keys_t)
        if not same_set:
            common = len(set(keys_h) & set(keys_t))
            raise MismatchError(
                f"{names} were scored on different test images ({len(keys_h)} vs {len(keys_t)} images, {common} in common): "
                "a paired comparison needs the same test_positions; re-run both on the same split plan"
            )
        where = {k: i for i, k in enumerate(keys_t)}
        order = np.array([where[k] for k in keys_h])
    y_h = np.asarray(labels_h)
    y_t = np.asarray(labels_t)[order]
    if not np.array_equal(y_h, y_t):
        raise MismatchError(f"{names} record different test labels for the same test images ({int(np.sum(y_h != y_t))} differ)")
    return y_h, np.asarray(preds["finetune"])[order], np.asarray(preds["head"])


def _pairable(head: ResultRow, tune: ResultRow, ds: DatasetResult) -> bool:
    return not isinstance(_paired_inputs(head, tune, ds), str)


def _pair(
    head: ResultRow, tune: ResultRow, ds: DatasetResult, *, n_boot: int = 0, seed: int = 0
) -> tuple[dict[str, Any] | None, str | None]:
    """(paired_comparison of tune against head, None) or (None, why not)."""
    inputs = _paired_inputs(head, tune, ds)
    if isinstance(inputs, str):
        return None, inputs
    y, pred_tune, pred_head = inputs
    return paired_comparison(y, pred_tune, pred_head, n_boot=n_boot, seed=seed, level=LEVEL), None
