"""The report's figures: accuracy vs wall time, the few-shot curve, the layer-wise probe. matplotlib is imported
inside the functions (Agg canvas, no pyplot), so importing the report stays light."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featx.errors import UsageError
from featx.records import FEATURES, FINETUNE, FewshotPoint, LayerPoint, ResultRow

from ._format import _ci, _fmt_seconds, _is_finetune_method, _is_num, _shot_key, _wilson_of
from .fewshot import _all_tick, _fewshot_regimes, _fewshot_stats, _method_order
from .selection import _layer_points, _row_ok, select_on_val

DPI = 150
_FAMILY_STYLE = {  # colour, marker, legend label
    FEATURES: ("tab:blue", "o", "feature heads (frozen backbone)"),
    FINETUNE: ("tab:orange", "s", "fine-tuning"),
}
_EXTRA_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _plottable_rows(rows: Sequence[ResultRow]) -> list[ResultRow]:
    return [r for r in rows if _row_ok(r) and _is_num(r.wall_seconds) and float(r.wall_seconds) > 0]  # type: ignore[arg-type]


def plot_accuracy_vs_time(
    rows: Sequence[ResultRow | Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str,
    *,
    extraction_seconds: float | None = None,
) -> Path:
    """Scatter of test accuracy vs wall time (log x), one colour per family, CI error bars, labelled points.

    No chance line here: it would squeeze the accuracies, which usually differ by a few points, into a
    sliver at the top. Raises ``UsageError`` when no row has both an accuracy and a positive wall time.
    """
    pts = _plottable_rows([ResultRow.from_dict(r) for r in rows])
    if not pts:
        raise UsageError(f"plot_accuracy_vs_time: no row with accuracy and wall_seconds > 0 to plot for '{title}'")
    fig, ax = _new_figure(7.5, 5.2)
    families = sorted({str(r.family) for r in pts}, key=lambda f: (f not in _FAMILY_STYLE, f))
    bars: list[tuple[float, float, float]] = []  # x, low, high: obstacles for the point labels
    for i, fam in enumerate(families):
        colour, marker, label = _FAMILY_STYLE.get(fam, (_EXTRA_COLOURS[i % len(_EXTRA_COLOURS)], "D", fam))
        sel = [r for r in pts if str(r.family) == fam]
        x = np.array([float(r.wall_seconds) for r in sel])
        y = np.array([float(r.accuracy) for r in sel])
        ci = [_wilson_of(r) or _ci(r) or (float(r.accuracy), float(r.accuracy)) for r in sel]
        lo = np.array([c[0] for c in ci])
        hi = np.array([c[1] for c in ci])
        yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
        ax.errorbar(
            x,
            y,
            yerr=yerr,
            fmt=marker,
            color=colour,
            ecolor=colour,
            elinewidth=1.2,
            capsize=3,
            markersize=7,
            label=label,
            zorder=3,
        )
        bars += [(float(a), float(min(b, c)), float(max(b, d))) for a, b, c, d in zip(x, lo, y, hi)]
    if extraction_seconds and extraction_seconds > 0:
        ax.axvline(
            extraction_seconds,
            color="0.5",
            linestyle=":",
            linewidth=1.2,
            label=f"feature extraction ({_fmt_seconds(extraction_seconds)}), shared by all heads",
        )
    ax.set_xscale("log")
    _pad_log_x(ax, [float(r.wall_seconds) for r in pts] + ([extraction_seconds] if extraction_seconds else []))
    ax.margins(y=0.12)
    ax.set_xlabel("wall time per strategy, seconds (log scale; heads include the shared extraction)")
    ax.set_ylabel("test accuracy (bars: 95% CI)")
    ax.set_title(f"{title}: accuracy vs wall time")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("feature extraction"))  # families first
    fig.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside lower center",
        ncols=min(3, len(labels)),
        fontsize=8.5,
        frameon=False,
    )
    labelled = [(float(r.wall_seconds), float(r.accuracy), str(r.strategy)) for r in pts]
    _place_point_labels(fig, ax, labelled, bars)
    return _save(fig, path)


def _place_point_labels(
    fig: Any, ax: Any, points: Sequence[tuple[float, float, str]], bars: Sequence[tuple[float, float, float]]
) -> None:
    """Label each point without overprinting another label, marker or error bar.

    Heads share the extraction time, so their points sit almost on one vertical line; fixed offsets would
    put one head's name next to another head's point. Greedy search over offsets right, then left, of
    the point, in display space after the layout is fixed; a shifted label gets a thin leader line.
    """
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # fixes the constrained layout, so display coordinates are final
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    obstacles = []
    for x, lo, hi in bars:
        (x0, y0), (_, y1) = to_px([(x, lo), (x, hi)])
        obstacles.append(Bbox([[x0 - 6, y0 - 6], [x0 + 6, y1 + 6]]))
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    steps = [0, 11, -11, 22, -22, 33, -33, 44, -44]
    candidates = [(8, dy, "left") for dy in steps] + [(-8, dy, "right") for dy in steps]
    for x, y, text in sorted(points, key=lambda p: (-p[1], p[0])):
        best = None
        for dx, dy, ha in candidates:
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va="center",
                fontsize=8.5,
                zorder=4,
                annotation_clip=False,
                arrowprops=None
                if dy == 0
                else {"arrowstyle": "-", "color": "0.45", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4},
            )
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = frame.containsx(box.x0) and frame.containsx(box.x1) and frame.containsy(box.y0) and frame.containsy(box.y1)
            if inside and not any(box.overlaps(o) for o in [*placed, *obstacles]):
                best = (ann, box)
                break
            ann.remove()
        if best is None:  # crowded: fall back to the plain right-hand label
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(8, 0),
                textcoords="offset points",
                ha="left",
                va="center",
                fontsize=8.5,
                zorder=4,
                annotation_clip=False,
            )
            ann.set_in_layout(False)
            best = (ann, ann.get_window_extent(renderer))
        placed.append(best[1])


def plot_fewshot(
    points: Sequence[FewshotPoint | Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str,
    *,
    images_per_class_all: float | None = None,
    chance: float | None = None,
    all_per_class: Mapping[str, Any] | None = None,
    probe_at_all: Iterable[str] = (),
) -> Path:
    """Mean accuracy vs shots per class (log x), one line per method, band: 95% t-interval of the mean over draws.

    The "all" point sits at the images per class its models trained on (``all_per_class``: n_fit / classes,
    train + val under the train+val protocol), else at ``images_per_class_all``, and beyond the largest shot
    count either way; its tick says what it trained on and that it was tuned on val. Points chosen differently
    (few-shot draws: no val labels; "all": hyper-parameters chosen on val) are not joined by the method's line:
    a thin dotted segment marks the change of regime. Methods in ``probe_at_all`` (a fine-tuning method whose
    "all" model never updated the backbone) get a hollow marker there.
    """
    points = [FewshotPoint.from_dict(p) for p in points]
    stats = _fewshot_stats(points)
    if not stats:
        raise UsageError(f"plot_fewshot: no few-shot point with an accuracy to plot for '{title}'")
    shots = sorted({s for per in stats.values() for s in per}, key=_shot_key)
    ints = [s for s in shots if isinstance(s, int)]
    xpos: dict[Any, float] = {s: float(s) for s in ints}
    others = [s for s in shots if not isinstance(s, int)]
    right: float | None = float(max(ints)) if ints else None
    per_class = float(all_per_class["per_class"]) if all_per_class and _is_num(all_per_class.get("per_class")) else None
    at_all = per_class if per_class is not None else images_per_class_all
    for s in others:
        if s == "all" and _is_num(at_all) and (right is None or float(at_all) > right):
            xpos[s] = float(at_all)
        else:
            xpos[s] = right * 2 if right else 1.0
        right = xpos[s] if right is None else max(right, xpos[s])
    log_x = all(v > 0 for v in xpos.values())
    regimes = _fewshot_regimes(points)

    fig, ax = _new_figure(7.5, 4.8)
    heads = [m for m in _method_order(stats) if not _is_finetune_method(m)]
    tunes = [m for m in _method_order(stats) if _is_finetune_method(m)]
    head_colours = ("tab:blue", "tab:cyan", "tab:purple", "tab:olive", "tab:gray")
    tune_colours = ("tab:orange", "tab:red", "tab:brown", "tab:pink", "tab:green")
    joined_across = False
    for group, colours, style, marker in ((heads, head_colours, "-", "o"), (tunes, tune_colours, "--", "s")):
        for i, m in enumerate(group):
            per = stats[m]
            ss = sorted(per, key=_shot_key)
            colour = colours[i % len(colours)]
            ns = sorted({int(per[s]["n"]) for s in ss if s != "all"} or {int(per[s]["n"]) for s in ss})
            draws = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
            label: str | None = f"{m} ({draws} draw{'s' if ns[-1] != 1 else ''})"
            runs: list[list[Any]] = []
            for s in ss:
                if runs and regimes.get((m, runs[-1][-1])) == regimes.get((m, s)):
                    runs[-1].append(s)
                else:
                    runs.append([s])
            for k, run in enumerate(runs):
                x = np.array([xpos[s] for s in run])
                mean = np.array([per[s]["mean"] for s in run])
                ax.plot(x, mean, linestyle=style, marker=marker, color=colour, label=label, linewidth=1.8, markersize=5)
                label = None
                ax.fill_between(
                    x, [per[s]["lo"] for s in run], [per[s]["hi"] for s in run], color=colour, alpha=0.15, linewidth=0
                )
                if k:
                    prev = runs[k - 1][-1]
                    ax.plot(
                        [xpos[prev], xpos[run[0]]],
                        [per[prev]["mean"], per[run[0]]["mean"]],
                        linestyle=":",
                        color=colour,
                        linewidth=1.0,
                        alpha=0.7,
                    )
                    joined_across = True
    probes = [m for m in set(probe_at_all) if "all" in stats.get(m, {})]
    for m in probes:
        ax.plot([xpos["all"]], [stats[m]["all"]["mean"]], "s", markersize=9, markerfacecolor="white", markeredgecolor="0.2")
    if probes:
        ax.plot(
            [],
            [],
            "s",
            markerfacecolor="white",
            markeredgecolor="0.2",
            linestyle="none",
            label="hollow: a probe, no backbone update",
        )
    if joined_across:
        ax.plot([], [], linestyle=":", color="0.4", linewidth=1.0, label="dotted: joins few-shot (no val) to val-tuned points")
    if chance:
        ax.axhline(chance, color="0.6", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    if log_x:
        ax.set_xscale("log")
        _pad_log_x(ax, list(xpos.values()))
    ticks = [xpos[s] for s in shots]
    labels = [_all_tick(s, images_per_class_all, all_per_class) if not isinstance(s, int) else str(s) for s in shots]
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel("training images per class (shots)" + (", log scale" if log_x else ""))
    ax.set_ylabel("test accuracy (mean over draws, band: 95% CI)")
    ax.set_title(f"{title}: data efficiency")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8.5, framealpha=0.9)
    return _save(fig, path)


def plot_layerwise(
    points: Sequence[LayerPoint | Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str,
    *,
    chance: float | None = None,
) -> Path:
    """Linear-probe test accuracy (and macro-F1, val accuracy when present) vs depth; x ticks are the layer names
    and widths. The layer chosen on val accuracy is marked; with no val accuracy no layer is marked (the
    highest test point is not a fair "best")."""
    pts = _layer_points([LayerPoint.from_dict(p) for p in points])
    if not pts:
        raise UsageError(f"plot_layerwise: no layer with a depth and an accuracy to plot for '{title}'")
    width = min(14.0, max(7.0, 0.75 * len(pts)))
    fig, ax = _new_figure(width, 4.8)
    depth = [float(p.depth) for p in pts]
    ax.plot(depth, [float(p.accuracy) for p in pts], "-o", color="tab:blue", label="probe test accuracy", linewidth=1.8)
    _plot_optional(ax, pts, "macro_f1", "--s", "tab:green", "probe test macro-F1", 1.4)
    _plot_optional(ax, pts, "val_accuracy", ":^", "tab:gray", "probe val accuracy", 1.2)
    chosen = select_on_val(pts)
    if chosen is not None:  # a legend entry, not an annotation: nothing to collide with the curves
        ax.plot(
            [float(chosen.depth)],
            [float(chosen.accuracy)],
            "o",
            markersize=13,
            markerfacecolor="none",
            markeredgecolor="tab:red",
            markeredgewidth=1.6,
            label=f"chosen on val: {chosen.layer} (test {float(chosen.accuracy):.3f})",
        )
    ax.margins(x=0.05, y=0.1)
    if chance:
        ax.axhline(chance, color="0.6", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    labels = [str(p.layer) + (f"\n{p.dim}-d" if p.dim is not None else "") for p in pts]
    rotate = len(pts) > 6 or max(len(str(p.layer)) for p in pts) > 12
    ax.set_xticks(depth, labels, rotation=35 if rotate else 0, ha="right" if rotate else "center", fontsize=8.5)
    ax.set_xlabel("layer (depth order; feature width below the name)")
    ax.set_ylabel("accuracy of a linear probe")
    ax.set_title(f"{title}: layer-wise transferability")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8.5, framealpha=0.9)
    return _save(fig, path)


def _new_figure(width: float, height: float) -> tuple[Any, Any]:
    """A standalone Agg figure: no pyplot, so no global figure registry and no backend switching."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        fig.clear()  # drop artists now; the figure was never registered with pyplot
    return path


def _pad_log_x(ax: Any, xs: Sequence[float]) -> None:
    xs = [x for x in xs if x and x > 0]
    if xs:
        ax.set_xlim(min(xs) / 1.6, max(xs) * 2.2)


def _plot_optional(ax: Any, pts: Sequence[Any], field: str, style: str, colour: str, label: str, width: float) -> None:
    """A secondary series vs depth, drawn only through the layers that recorded ``field``."""
    xy = [(float(p.depth), float(getattr(p, field))) for p in pts if _is_num(getattr(p, field))]
    if xy:
        ax.plot([d for d, _ in xy], [v for _, v in xy], style, color=colour, label=label, linewidth=width, markersize=4)
