"""The few-shot curve: mean accuracy per method and shot count with its t-interval over draws, what the "all" point
trained on, and where fine-tuning catches up with the heads (:func:`fewshot_crossing`), with its uncertainty."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from featx.metrics import paired_comparison
from featx.records import FEATURES, FINETUNE, DatasetResult, FewshotPoint, ResultRow

from ._format import (
    ALPHA,
    LEVEL,
    _fmt_p,
    _fmt_points,
    _fmt_points_ci,
    _is_finetune_method,
    _is_num,
    _norm_shot,
    _shot_key,
    _shot_label,
    _shot_phrase,
)
from .paired import _paired_inputs
from .selection import _fewshot_methods, _row_ok, backbone_updated


def _t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over draws; a single value has no width."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, mean, mean
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def _fewshot_stats(points: Sequence[FewshotPoint]) -> dict[str, dict[Any, dict[str, float]]]:
    """method -> shots -> {mean, std, min, max, lo, hi, half, n} over draws (lo/hi: 95% t-interval of the mean)."""
    acc: dict[str, dict[Any, list[float]]] = {}
    for p in points:
        if p.status == "failed" or not _is_num(p.accuracy) or p.shots is None:
            continue
        acc.setdefault(str(p.method), {}).setdefault(_norm_shot(p.shots), []).append(float(p.accuracy))  # type: ignore[arg-type]
    out: dict[str, dict[Any, dict[str, float]]] = {}
    for m, per in acc.items():
        out[m] = {}
        for s, v in per.items():
            mean, lo, hi = _t_interval(v)
            out[m][s] = {
                "mean": mean,
                "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "min": float(np.min(v)),
                "max": float(np.max(v)),
                "lo": max(0.0, lo),  # clipped to the possible range, for the plot's band
                "hi": min(1.0, hi),
                "half": hi - mean,
                "n": len(v),
            }
    return out


def _method_order(stats: Mapping[str, Any]) -> list[str]:
    """Feature heads first, then fine-tuning methods, each alphabetically."""
    return sorted(stats, key=lambda m: (_is_finetune_method(m), m))


def _fewshot_regimes(points: Sequence[FewshotPoint | Mapping[str, Any]]) -> dict[tuple[str, Any], str]:
    """(method, shots) -> "val" (hyper-parameters chosen on val: the full-data grid) or "no-val" (a few-shot
    draw: cross-validation inside the draw or a fixed rule). A point without ``selection`` counts as "val" at
    "all" and "no-val" elsewhere."""
    out: dict[tuple[str, Any], str] = {}
    for p in map(FewshotPoint.from_dict, points):
        s = _norm_shot(p.shots)
        regime = "val" if p.selection == "val" or (p.selection is None and s == "all") else "no-val"
        out.setdefault((str(p.method), s), regime)
    return out


def _all_per_class(ds: DatasetResult) -> dict[str, Any] | None:
    """What the "all" point of the few-shot curve trained on: ``{"n_fit", "per_class", "final_fit"}``."""
    n_classes = len(ds.classes or [])
    pts = [p for p in ds.fewshot if _norm_shot(p.shots) == "all" and _is_num(p.n_fit)]
    n_fit = max((int(p.n_fit) for p in pts), default=None)  # type: ignore[arg-type]
    if n_fit is None and _is_num(ds.n_fit):
        n_fit = int(ds.n_fit)  # type: ignore[arg-type]
    if n_fit is None:
        n_fit = max((int(r.n_fit) for r in ds.rows if _row_ok(r) and _is_num(r.n_fit)), default=None)  # type: ignore[arg-type]
    if n_fit is None or n_classes < 1:
        return None
    fits = {str(r.final_fit) for r in ds.rows if _row_ok(r) and r.final_fit}
    final_fit = ds.final_fit or (fits.pop() if len(fits) == 1 else None)
    return {"n_fit": n_fit, "per_class": n_fit / n_classes, "final_fit": final_fit}


def _probe_methods(ds: DatasetResult) -> list[str]:
    """Few-shot method names (``finetune:<strategy>``) whose full-data row never updated the backbone."""
    return [f"{FINETUNE}:{r.strategy}" for r in ds.rows if _row_ok(r) and r.family == FINETUNE and backbone_updated(r) is False]


def _all_tick(s: Any, images_per_class_all: float | None, all_per_class: Mapping[str, Any] | None = None) -> str:
    """The "all" tick: what its models trained on. With ``all_per_class`` (n_fit per class): "all / ~65 per class /
    train+val, val-tuned"; else the recorded images per class."""
    if s != "all":
        return str(s)
    if all_per_class and _is_num(all_per_class.get("per_class")):
        n = float(all_per_class["per_class"])
        count = f"{n:.0f}" if n.is_integer() else f"~{n:.0f}"
        fit = all_per_class.get("final_fit") or "full train"
        return f"all\n{count}/class\n{fit},\nval-tuned"
    if images_per_class_all:
        n = float(images_per_class_all)
        return f"all\n(~{n:.0f})" if not n.is_integer() else f"all\n({n:.0f})"
    return str(s)


# ---------------------------------------------------------------------------------------------- the crossing


def fewshot_crossing(
    points: Sequence[FewshotPoint | Mapping[str, Any]],
    *,
    head_row: ResultRow | Mapping[str, Any] | None = None,
    finetune_row: ResultRow | Mapping[str, Any] | None = None,
    rows: Sequence[ResultRow | Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Where fine-tuning catches up with the heads in the few-shot curve, and how sure that is.

    One head method is compared with one fine-tuning method, never the best of several at each shot count
    (that would pick on test): the head chosen on val in the full-data grid (``head_row``) when the curve has
    it, else the first head method in the points' order; likewise for fine-tuning (``finetune_row``).
    At each shot count measured for both, the difference fine-tuning − head is averaged over the draws both
    ran (draw d of k shots is the same images for both), with a 95% t-interval over those draws; at
    ``"all"`` with ``rows`` given, the two full-data rows are compared paired over the test images instead, and
    a fine-tuning row whose model never updated the backbone (an LP-FT probe) is marked ``"probe"`` there and
    left out of the crossing (it is listed in ``per_shot`` all the same).

    Returns ``{"case", "shots", "text", "head_method", "finetune_method", "per_shot", "bracket"}``; case is
    ``"ahead_from_start"``, ``"crosses"`` (the smallest shot count whose mean difference is >= 0),
    ``"never"`` or ``"undetermined"``; ``bracket`` = (last shot count where the head is clearly ahead,
    first where fine-tuning is clearly ahead), None where there is none.
    """
    pts = [FewshotPoint.from_dict(p) for p in points]
    head = None if head_row is None else ResultRow.from_dict(head_row)
    tune = None if finetune_row is None else ResultRow.from_dict(finetune_row)
    full = None if rows is None else [ResultRow.from_dict(r) for r in rows]
    stats = _fewshot_stats(pts)
    heads, tunes = _fewshot_methods(pts, head, tune)
    base = {"case": "undetermined", "shots": None, "head_method": None, "finetune_method": None, "per_shot": [], "bracket": None}
    if not heads or not tunes:
        missing = "fine-tuning" if heads else "feature-head"
        return {**base, "text": f"No few-shot crossing point can be given: the few-shot curve has no {missing} method."}
    (h_method, h_why), (t_method, _) = heads, tunes
    base.update(head_method=h_method, finetune_method=t_method)
    shots_common = sorted(set(stats.get(h_method, {})) & set(stats.get(t_method, {})), key=_shot_key)
    if not shots_common:
        text = f"No few-shot crossing point can be given: no shot count was measured for both {h_method} and {t_method}."
        return {**base, "text": text}
    per_shot_all = [_fewshot_difference(pts, h_method, t_method, s, full) for s in shots_common]
    base["per_shot"] = per_shot_all
    per_shot = [p for p in per_shot_all if not p.get("probe")]
    probe_note = ""
    if len(per_shot) < len(per_shot_all):
        probe_note = (
            f" With the full training set, {t_method.split(':', 1)[-1]}'s model is its epoch-0 probe (no backbone update), "
            "so that point says nothing about fine-tuning and is left out of the crossing."
        )
    if not per_shot:
        return {**base, "text": "No few-shot crossing point can be given: no shot count has a fine-tuned model." + probe_note}
    heads_clear = [p["shots"] for p in per_shot if p["status"] == "head"]
    tune_clear = [p["shots"] for p in per_shot if p["status"] == "finetune"]
    cross = next((i for i, p in enumerate(per_shot) if p["diff"] >= 0), None)
    last_head = None
    if heads_clear:
        below = [s for s in heads_clear if cross is None or _shot_key(s) < _shot_key(per_shot[cross]["shots"])]
        last_head = below[-1] if below else None
    bracket = (last_head, tune_clear[0] if tune_clear else None)
    base["bracket"] = bracket
    who = f"fine-tuning ({t_method.split(':', 1)[-1]})"
    whom = f"the {h_method} head ({h_why})"
    if cross is None:
        compared = [p["shots"] for p in per_shot]
        span = (
            _shot_phrase(compared[0], bare=True)
            if len(compared) == 1
            else f"{_shot_label(compared[0])}–{_shot_label(compared[-1])} shots per class"
        )
        case, shots = "never", None
        text = f"In the few-shot runs {who} never catches up with {whom} within the measured range ({span})"
        if heads_clear:
            text += f"; the head is clearly ahead at {_list_shots(heads_clear)} ({_interval_basis(per_shot)})."
        else:
            text += f", but no shot count shows a clear difference ({_interval_basis(per_shot)})."
    else:
        p = per_shot[cross]
        shots = p["shots"]
        detail = f"{_fmt_points(p['diff'], signed=True)} points{_fmt_points_ci(p['ci'])}, {p['basis']}"
        if cross == 0:
            case = "ahead_from_start"
            text = (
                f"In the few-shot runs {who} is level with or ahead of {whom} from the first point, "
                f"{_shot_phrase(shots)} ({detail})"
            )
        else:
            case = "crosses"
            text = (
                f"In the few-shot runs {who} catches up with {whom} at {_shot_phrase(shots, bare=True)} ({detail}); "
                "below that the head is ahead on average"
            )
        text += _bracket_clause(p, bracket) + f" ({_interval_basis(per_shot)})."
    return {**base, "case": case, "shots": shots, "text": text + probe_note}


def _fewshot_difference(
    points: Sequence[FewshotPoint], head: str, tune: str, shot: Any, rows: Sequence[ResultRow] | None
) -> dict[str, Any]:
    """Fine-tuning − head at one shot count: paired over draws (or over test images at "all" when the
    full-data rows are given), with its 95% interval and who is clearly ahead."""
    if shot == "all" and rows:
        h_row = next((r for r in rows if r.family == FEATURES and r.strategy == head), None)
        t_row = next((r for r in rows if r.family == FINETUNE and f"{FINETUNE}:{r.strategy}" == tune), None)
        if h_row is not None and t_row is not None:
            inputs = _paired_inputs(h_row, t_row, DatasetResult())
            if not isinstance(inputs, str):
                r = paired_comparison(*inputs, level=LEVEL)
                lo, hi = r["ci"]
                sig = r["p_value"] < ALPHA and (lo > 0 or hi < 0)
                status = ("finetune" if r["diff"] > 0 else "head") if sig else "unclear"
                probe = backbone_updated(t_row) is False
                return {
                    "shots": shot,
                    "diff": r["diff"],
                    "ci": (lo, hi),
                    "n": r["n"],
                    "basis": f"paired over {r['n']} test images (McNemar {_fmt_p(r['p_value'])})"
                    + ("; the fine-tuning model is its epoch-0 probe" if probe else ""),
                    "status": "probe" if probe else status,
                    "probe": probe,
                }
    per: dict[str, dict[Any, list[float]]] = {head: {}, tune: {}}
    for p in points:
        m = str(p.method)
        if m in per and p.status != "failed" and _is_num(p.accuracy) and _norm_shot(p.shots) == shot:
            per[m].setdefault(p.draw, []).append(float(p.accuracy))  # type: ignore[arg-type]
    h = {d: float(np.mean(v)) for d, v in per[head].items()}
    t = {d: float(np.mean(v)) for d, v in per[tune].items()}
    common = [d for d in t if d in h and d is not None]
    if common:
        diffs = [t[d] - h[d] for d in common]
        mean, lo, hi = _t_interval(diffs)
        n = len(diffs)
        basis = f"{n} paired draw{'s' if n != 1 else ''}"
    else:  # draws not identified: compare the means, unpaired
        mean_h, _, hi_h = _t_interval(list(h.values()))
        mean_t, _, hi_t = _t_interval(list(t.values()))
        mean, n = mean_t - mean_h, min(len(h), len(t))
        half = math.hypot(hi_h - mean_h, hi_t - mean_t)
        lo, hi = mean - half, mean + half
        basis = f"unpaired, {len(t)}/{len(h)} draws"
    ci = (max(-1.0, lo), min(1.0, hi)) if n >= 2 else None  # a difference of accuracies lies in [-1, 1]
    status = "unclear" if ci is None else ("finetune" if lo > 0 else "head" if hi < 0 else "unclear")
    return {"shots": shot, "diff": mean, "ci": ci, "n": n, "basis": basis, "status": status}


def _list_shots(shots: Sequence[Any]) -> str:
    ints = [str(s) for s in shots if s != "all"]
    parts = []
    if ints:
        parts.append(
            (", ".join(ints[:-1]) + " and " + ints[-1] if len(ints) > 1 else ints[0])
            + f" shot{'s' if ints != ['1'] else ''} per class"
        )
    if "all" in shots:
        parts.append("the full training set")
    return " and at ".join(parts)


def _interval_basis(per_shot: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    if any("draw" in p["basis"] and p["ci"] for p in per_shot):
        parts.append("95% t-intervals over the draws both families ran")
    if any(p["basis"].startswith("paired over") for p in per_shot):
        parts.append('at "all" an exact paired interval over test images')
    if any(p["ci"] is None for p in per_shot):
        parts.append("a single draw has no interval")
    return "; ".join(parts) if parts else "no intervals"


def _bracket_clause(p: Mapping[str, Any], bracket: tuple[Any, Any]) -> str:
    last_head, first_tune = bracket
    if p["status"] == "finetune":
        below = f", and the head is clearly ahead up to {_shot_phrase(last_head, bare=True)}" if last_head is not None else ""
        return f"; there fine-tuning is clearly ahead{below}"
    why = "one draw there gives no interval" if p["ci"] is None else "the interval there includes no difference"
    if last_head is not None and first_tune is not None:
        where = (
            f"the head is clearly ahead up to {_shot_phrase(last_head, bare=True)} and fine-tuning clearly ahead from "
            f"{_shot_phrase(first_tune, bare=True)}, so the crossing lies between the two"
        )
    elif last_head is not None:
        where = f"the head is clearly ahead up to {_shot_phrase(last_head, bare=True)} and fine-tuning is clearly ahead nowhere"
    elif first_tune is not None:
        where = f"fine-tuning is clearly ahead from {_shot_phrase(first_tune, bare=True)}"
    else:
        where = "no shot count shows a clear difference either way"
    return f"; {why}, so the crossing point is uncertain: {where}"
