"""Formatting shared by the report's sentences, tables and plots: numbers, Markdown cells, shot counts, a row's accuracy
with its interval. A leaf of the package: it imports nothing from the other report modules."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from featx.metrics import wilson_interval
from featx.records import FINETUNE, LayerPoint, ResultRow

ALPHA = 0.05  # significance level of the verdict (two-sided)
LEVEL = 0.95  # level of every interval in the report
_DASH = "—"
_SHARED_MARK = "†"
_IMPROVING_MARK = "↑"
_CHOSEN_MARK = "✓"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def _cell(v: Any) -> str:
    return str(v).replace("\r", " ").replace("\n", " ").replace("|", "\\|").strip()


def _truncate(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _sentence(text: Any) -> str:
    s = " ".join(str(text).split())
    if not s:
        return s
    s = s[0].upper() + s[1:]
    return s if s.endswith((".", "!", "?")) else s + "."


def _fmt_float(v: Any) -> str:
    return f"{float(v):.3f}" if _is_num(v) else _DASH


def _fmt_seconds(s: Any) -> str:
    if not _is_num(s):
        return _DASH
    s = float(s)
    if s < 1:
        return f"{s:.2f} s"
    if s < 100:
        return f"{s:.1f} s"
    return f"{s:,.0f} s"


def _fmt_ratio(r: float) -> str:
    return f"{r:.0f}×" if r >= 10 else f"{r:.1f}×"


def _fmt_params(n: Any) -> str:
    """2562 -> 2.6k, 3400000 -> 3.4M: orders of magnitude matter here, not the last digit."""
    if not _is_num(n):
        return _DASH
    x, unit = float(n), ""
    for next_unit in ("k", "M", "B"):
        if abs(x) < 999.95:
            break
        x, unit = x / 1000.0, next_unit
    if not unit:
        return f"{x:.0f}"
    return f"{x:.1f}{unit}" if abs(x) < 99.95 else f"{x:.0f}{unit}"


def _fmt_hparams(h: Any) -> str:
    if not isinstance(h, Mapping) or not h:
        return _DASH
    return _cell(", ".join(f"{k}={_fmt_hvalue(v)}" for k, v in sorted(h.items())))


def _fmt_hvalue(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_p(p: float) -> str:
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def _fmt_points(x: float, *, signed: bool = False) -> str:
    """A fraction as accuracy points: 0.041 -> 4.1 (signed: +4.1 / −4.1)."""
    v = float(x) * 100
    if not signed:
        return f"{abs(v):.1f}"
    if round(v, 1) == 0:
        return "0.0"
    return f"+{v:.1f}" if v > 0 else f"−{abs(v):.1f}"


def _fmt_points_ci(ci: Sequence[float] | None) -> str:
    if not ci:
        return ""
    return f" [{_fmt_points(ci[0], signed=True)}, {_fmt_points(ci[1], signed=True)}]"


def _images(k: int) -> str:
    return f"{k} val image{'s' if k != 1 else ''}"


# ---------------------------------------------------------------------------------------------- shot counts


def _norm_shot(s: Any) -> Any:
    if isinstance(s, bool):
        return str(s)
    if isinstance(s, (int, np.integer)):
        return int(s)
    if isinstance(s, float) and s.is_integer():
        return int(s)
    if isinstance(s, str) and s.strip().isdigit():
        return int(s.strip())
    return str(s)


def _shot_key(s: Any) -> tuple[int, float, str]:
    if isinstance(s, int):
        return (0, float(s), "")
    return (1, 0.0, "") if s == "all" else (2, 0.0, str(s))


def _shot_label(s: Any) -> str:
    return str(s)


def _shot_phrase(s: Any, *, bare: bool = False) -> str:
    if s == "all":
        return "the full training set" if bare else "with the full training set"
    text = f"{s} shot{'s' if s != 1 else ''} per class"
    return text if bare else f"at {text}"


def _is_finetune_method(method: str) -> bool:
    """Few-shot methods are ``<head strategy>`` or ``finetune:<strategy>``."""
    return str(method).startswith(FINETUNE)


# ---------------------------------------------------------------------------------------------- a row's accuracy


def _ci(r: ResultRow | LayerPoint) -> tuple[float, float] | None:
    ci = r.accuracy_ci95
    if isinstance(ci, Sequence) and len(ci) == 2 and all(_is_num(v) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def _wilson_of(r: ResultRow | LayerPoint) -> tuple[float, float] | None:
    """Wilson's 95% interval of a row's accuracy from its ``test_predictions`` and ``test_labels``; None when they
    are missing or do not reproduce the row's accuracy."""
    preds, ys = r.test_predictions, r.test_labels
    if not isinstance(preds, Sequence) or isinstance(preds, str) or not preds or ys is None or len(ys) != len(preds):
        return None
    k = int(np.sum(np.asarray(preds) == np.asarray(ys)))
    if _is_num(r.accuracy) and abs(k / len(preds) - float(r.accuracy)) > 1e-9:
        return None
    return wilson_interval(k, len(preds), level=LEVEL)


def _fmt_acc_ci(r: ResultRow | LayerPoint) -> str:
    """Accuracy [95% interval]: Wilson's score interval from the row's per-image results when it has them (no seed,
    so the printed ends are fixed), else the interval recorded with the row."""
    if not _is_num(r.accuracy):
        return _DASH
    ci = _wilson_of(r) or _ci(r)
    acc = f"{float(r.accuracy):.3f}"
    return f"{acc} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else acc
