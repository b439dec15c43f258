"""Benchmark results -> a report folder: ``results.json``, ``report.md`` and PNG plots.

Pure rendering: this module reads the dict that ``featx bench`` produces and never runs a model, so a
report can be rebuilt from ``results.json`` alone (and tests need no torch). Every sentence in the
report is computed from the numbers; where the numbers cannot support a conclusion the text says so.

Input schema (optional parts may be missing; a row with ``status == "failed"`` carries only ``error``)::

    {"meta": {featx_version, created_at, command, machine, quick, budget_notes: [str]},
     "datasets": {name: {backbone, classes, splits: {split: str}, images_per_class_all?,
                         extraction?: {seconds, images_per_s, n_images, peak_memory_mb},
                         rows: [{family, strategy, accuracy, accuracy_ci95, macro_f1, wall_seconds,
                                 extract_seconds?, fit_seconds?, train_seconds?, peak_memory_mb,
                                 memory_kind, trainable_params, epochs_run?, hyperparameters?, status?, error?}],
                         fewshot?: [{method, shots: int | "all", draw, accuracy}],
                         layerwise?: [{layer, depth, dim, accuracy, macro_f1?}]}}}
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featx.errors import UsageError

DPI = 150
FEATURES = "features"
FINETUNE = "finetune"
_FAMILY_STYLE = {  # colour, marker, legend label
    FEATURES: ("tab:blue", "o", "feature heads (frozen backbone)"),
    FINETUNE: ("tab:orange", "s", "fine-tuning"),
}
_EXTRA_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_DASH = "—"
_SHARED_MARK = "†"

# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def write_report(results: dict, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the plots into ``out_dir``; return every path written.

    Keys of the returned dict: ``"report"``, ``"results"`` and one key per plot, equal to the PNG's file
    stem (``<dataset>_accuracy_vs_time``, ``<dataset>_fewshot``, ``<dataset>_layerwise``). A plot is
    written only when its section has data, so the report never links to an empty figure.
    """
    datasets = _check_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    results_path = out / "results.json"
    _write_text(results_path, json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
    written["results"] = results_path

    plots: dict[str, dict[str, str]] = {}
    slugs = _unique_slugs(list(datasets))
    for name, ds in datasets.items():
        plots[name] = {}
        chance = _chance(ds)
        title = f"{name} ({ds['backbone']})" if ds.get("backbone") else name
        jobs = []
        if _plottable_rows(ds.get("rows") or []):
            extraction = (ds.get("extraction") or {}).get("seconds")
            jobs.append(("accuracy_vs_time", plot_accuracy_vs_time, ds.get("rows") or [], {"extraction_seconds": extraction}))
        if _fewshot_stats(ds.get("fewshot") or []):
            jobs.append(
                (
                    "fewshot",
                    plot_fewshot,
                    ds.get("fewshot") or [],
                    {"images_per_class_all": ds.get("images_per_class_all"), "chance": chance},
                )
            )
        if _layer_points(ds.get("layerwise") or []):
            jobs.append(("layerwise", plot_layerwise, ds.get("layerwise") or [], {"chance": chance}))
        for kind, plot, data, extra in jobs:
            stem = f"{slugs[name]}_{kind}"
            path = plot(data, out / f"{stem}.png", title, **extra)
            written[stem] = path
            plots[name][kind] = path.name

    report_path = out / "report.md"
    _write_text(report_path, render_report(results, plots))
    written["report"] = report_path
    return written


def verdict(dataset_result: dict) -> str:
    """Two to four plain sentences for one dataset, each one computed from the numbers.

    Compares the best feature head with the best fine-tuning strategy (accuracy, whether the 95%
    bootstrap intervals overlap, wall-time ratio) and states the few-shot crossing point when a
    few-shot curve was measured. Overlapping intervals are reported as "statistically
    indistinguishable on this test set", never as a win for either side.
    """
    rows = dataset_result.get("rows") or []
    ok = [r for r in rows if _row_ok(r)]
    failed = [r for r in rows if not _row_ok(r)]
    head = _best(r for r in ok if r.get("family") == FEATURES)
    tune = _best(r for r in ok if r.get("family") == FINETUNE)
    failed_note = ""
    if failed:
        names = ", ".join(f"{r.get('family', '?')}/{r.get('strategy', '?')}" for r in failed)
        failed_note = f" ({names} failed and {'is' if len(failed) == 1 else 'are'} left out)"

    sentences: list[str] = []
    if head is None and tune is None:
        sentences.append(f"No strategy produced a result on this dataset{failed_note}.")
        sentences.append("There is nothing to compare.")
    elif head is None or tune is None:
        only = head if head is not None else tune
        what = "feature heads" if head is not None else "fine-tuning strategies"
        missing = "fine-tuning" if head is not None else "feature-head"
        sentences.append(
            f"Only {what} produced results here; the best is {only.get('strategy')} at {_fmt_acc_ci(only)} "
            f"test accuracy{failed_note}."
        )
        sentences.append(f"There is no {missing} result to compare it with, so no winner can be named.")
    else:
        sentences.append(
            f"The best feature head ({head.get('strategy')}) reaches {_fmt_acc_ci(head)} test accuracy and the best "
            f"fine-tuning strategy ({tune.get('strategy')}) reaches {_fmt_acc_ci(tune)}{failed_note}."
        )
        sentences.append(_compare_sentence(head, tune))
        ratio = _time_sentence(head, tune)
        if ratio:
            sentences.append(ratio)
    fewshot = dataset_result.get("fewshot") or []
    if fewshot:
        sentences.append(fewshot_crossing(fewshot)["text"])
    return " ".join(sentences)


def fewshot_crossing(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The smallest shot count at which the best fine-tuning method's mean accuracy is at least the best
    head's mean, over shot counts measured for both families.

    Returns ``{"case", "shots", "text"}`` with case ``"ahead_from_start"``, ``"crosses"``, ``"never"`` or
    ``"undetermined"`` (no shot count was measured for both families); ``shots`` is ``None`` unless it crosses
    or is ahead from the start.
    """
    stats = _fewshot_stats(points)
    shots_common = sorted(
        {s for m, per in stats.items() if _is_finetune_method(m) for s in per}
        & {s for m, per in stats.items() if not _is_finetune_method(m) for s in per},
        key=_shot_key,
    )
    if not shots_common:
        has_tune = any(_is_finetune_method(m) for m in stats)
        has_head = any(not _is_finetune_method(m) for m in stats)
        why = (
            "no shot count was measured for both heads and fine-tuning"
            if has_tune and has_head
            else f"the few-shot curve has no {'fine-tuning' if has_head else 'feature-head'} method"
        )
        return {"case": "undetermined", "shots": None, "text": f"No few-shot crossing point can be given: {why}."}

    def best(shot: Any, finetune: bool) -> tuple[str, float]:
        cands = [(per[shot]["mean"], m) for m, per in stats.items() if _is_finetune_method(m) == finetune and shot in per]
        mean, method = max(cands, key=lambda c: (c[0], _neg_str(c[1])))
        return method, mean

    for i, shot in enumerate(shots_common):
        t_method, t_mean = best(shot, True)
        h_method, h_mean = best(shot, False)
        if t_mean >= h_mean:
            detail = f"(best fine-tuning {t_method} {t_mean:.3f} vs best head {h_method} {h_mean:.3f}, mean over draws)"
            if i == 0:
                text = f"In the few-shot runs fine-tuning is ahead from the first point, {_shot_phrase(shot)} {detail}."
                return {"case": "ahead_from_start", "shots": shot, "text": text}
            text = (
                f"In the few-shot runs fine-tuning catches up with the heads at {_shot_phrase(shot, bare=True)} "
                f"{detail}; below that the heads are ahead."
            )
            return {"case": "crosses", "shots": shot, "text": text}
    span = f"{_shot_label(shots_common[0])}–{_shot_label(shots_common[-1])} shots per class"
    if len(shots_common) == 1:
        span = _shot_phrase(shots_common[0], bare=True)
    text = (
        f"In the few-shot runs fine-tuning never catches up within the measured range ({span}): "
        f"the best head's mean accuracy is higher at every shot count."
    )
    return {"case": "never", "shots": None, "text": text}


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def render_report(results: dict, plots: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The whole ``report.md`` as a string; ``plots`` maps dataset -> plot kind -> relative file name."""
    datasets = _check_results(results)
    plots = plots or {}
    meta = results.get("meta") or {}
    lines = ["# featx benchmark report", ""]
    lines += ["| | |", "|---|---|"]
    lines.append(f"| featx version | {_cell(meta.get('featx_version', 'unknown'))} |")
    lines.append(f"| created | {_cell(meta.get('created_at', 'unknown'))} |")
    lines.append(f"| machine | {_cell(meta.get('machine', 'unknown'))} |")
    if "quick" in meta:
        lines.append(f"| mode | {'quick (reduced grid)' if meta['quick'] else 'full'} |")
    command = str(meta.get("command", "")).replace("`", "'")
    lines.append(f"| command | `{_cell(command)}` |" if command else "| command | unknown |")
    lines += ["", "## Budget notes", ""]
    notes = meta.get("budget_notes") or []
    if notes:
        lines += [f"- {str(n).strip()}" for n in notes]
    else:
        lines.append("No budget notes were recorded: the grid was run as configured.")
    for name, ds in datasets.items():
        lines += ["", *_render_dataset(name, ds, plots.get(name, {}))]
    return "\n".join(lines).rstrip() + "\n"


def render_results_table(dataset_result: Mapping[str, Any]) -> str:
    """Side-by-side Markdown table of all strategies, best accuracy first, failed rows last.

    Feature-head wall time is shown as "extract X s + fit Y s": the extraction is shared by all heads,
    which a footnote under the table states (see ``render_results_footnote``).
    """
    rows = list(dataset_result.get("rows") or [])
    ok = sorted((r for r in rows if _row_ok(r)), key=lambda r: (-float(r["accuracy"]), str(r.get("strategy"))))
    bad = [r for r in rows if not _row_ok(r)]
    header = [
        "Family",
        "Strategy",
        "Accuracy [95% CI]",
        "Macro-F1",
        "Wall time",
        "Peak memory",
        "Trainable params",
        "Epochs",
        "Hyperparameters",
    ]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in ok:
        cells = [
            _cell(r.get("family", _DASH)),
            _cell(r.get("strategy", _DASH)),
            _fmt_acc_ci(r),
            _fmt_float(r.get("macro_f1")),
            _fmt_wall(r),
            _fmt_memory(r),
            _fmt_params(r.get("trainable_params")),
            _cell(r["epochs_run"]) if r.get("epochs_run") is not None else _DASH,
            _fmt_hparams(r.get("hyperparameters")),
        ]
        out.append("| " + " | ".join(cells) + " |")
    for r in bad:
        status = r.get("status") or "no result"
        err = _truncate(str(r.get("error") or "no accuracy recorded"), 200)
        cells = [_cell(r.get("family", _DASH)), _cell(r.get("strategy", _DASH)), f"**{_cell(status)}**: {_cell(err)}"]
        cells += [_DASH] * (len(header) - len(cells))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render_fewshot_table(points: Sequence[Mapping[str, Any]]) -> str:
    """Shots × method table of mean ± std accuracy over draws (population std, ddof=0).

    A single draw is shown without "± 0.000", which would suggest a measured spread; when cells have
    different numbers of draws each cell states its ``n``.
    """
    stats = _fewshot_stats(points)
    if not stats:
        return ""
    methods = _method_order(stats)
    shots = sorted({s for per in stats.values() for s in per}, key=_shot_key)
    counts = {per[s]["n"] for per in stats.values() for s in per}
    uniform = len(counts) == 1
    out = [
        "| Shots per class | " + " | ".join(_cell(m) for m in methods) + " |",
        "|---|" + "|".join(["---"] * len(methods)) + "|",
    ]
    for s in shots:
        cells = []
        for m in methods:
            st = stats[m].get(s)
            if st is None:
                cells.append(_DASH)
                continue
            cell = f"{st['mean']:.3f}" if st["n"] == 1 else f"{st['mean']:.3f} ± {st['std']:.3f}"
            cells.append(cell if uniform else f"{cell} (n={st['n']})")
        out.append(f"| {_shot_label(s)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _render_dataset(name: str, ds: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    lines = [f"## Dataset: {name}", ""]
    classes = list(ds.get("classes") or [])
    shown = ", ".join(str(c) for c in classes[:10]) + (", …" if len(classes) > 10 else "")
    facts = []
    if ds.get("backbone"):
        facts.append(f"- Backbone: `{ds['backbone']}`")
    facts.append(f"- Classes: {len(classes)}" + (f" ({shown})" if classes else ""))
    splits = ds.get("splits") or {}
    if splits:
        facts.append("- Splits: " + "; ".join(f"{k}: {v}" for k, v in splits.items()))
    ext = ds.get("extraction") or {}
    if ext:
        parts = []
        if ext.get("seconds") is not None:
            parts.append(_fmt_seconds(ext["seconds"]))
        if ext.get("n_images") is not None:
            parts.append(f"{ext['n_images']} images")
        if ext.get("images_per_s") is not None:
            parts.append(f"{ext['images_per_s']:.1f} images/s")
        if ext.get("peak_memory_mb") is not None:
            parts.append(f"peak memory {ext['peak_memory_mb']:,.0f} MB")
        facts.append("- Feature extraction (once, shared by all heads): " + ", ".join(parts))
    lines += [*facts, "", "### Results on the test set", ""]
    rows = ds.get("rows") or []
    if rows:
        lines.append(render_results_table(ds).rstrip())
        lines.append("")
        kinds = {r.get("memory_kind") for r in rows if _row_ok(r)}
        lines.append(
            "Accuracy is top-1 on the test set with a 95% percentile-bootstrap interval over test images. "
            "Peak memory is the run's own measurement, its kind in brackets"
            + (" (rss: resident memory of the process)." if "rss" in kinds else ".")
        )
        if any(_row_ok(r) and r.get("family") == FEATURES and r.get("extract_seconds") is not None for r in rows):
            lines += [
                "",
                f"{_SHARED_MARK} Feature extraction runs once per dataset and is shared by all feature heads; each "
                "head's wall time counts it in full, so heads differ only in their fit time.",
            ]
    else:
        lines.append("No result rows were recorded for this dataset.")

    if plots:
        lines += ["", "### Plots", ""]
        captions = {
            "accuracy_vs_time": "Accuracy vs wall time",
            "fewshot": "Data efficiency (accuracy vs shots per class)",
            "layerwise": "Layer-wise transferability (linear probe per layer)",
        }
        for kind in ("accuracy_vs_time", "fewshot", "layerwise"):
            if kind in plots:
                lines += [f"![{name}: {captions[kind]}]({plots[kind]})", ""]
        lines.pop()

    fewshot = ds.get("fewshot") or []
    if fewshot and _fewshot_stats(fewshot):
        lines += ["", "### Data efficiency", ""]
        lines.append(render_fewshot_table(fewshot).rstrip())
        lines += ["", _fewshot_caption(_fewshot_stats(fewshot)), ""]
        lines.append(f"**Crossing point.** {fewshot_crossing(fewshot)['text']}")

    lines += ["", "### What the numbers say", "", verdict(dict(ds))]
    return lines


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def plot_accuracy_vs_time(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str,
    *,
    extraction_seconds: float | None = None,
) -> Path:
    """Scatter of test accuracy vs wall time (log x), one colour per family, CI error bars, labelled points.

    No chance line here: it would squeeze the accuracies, which usually differ by a few points, into a
    sliver at the top. Raises ``UsageError`` when no row has both an accuracy and a positive wall time.
    """
    pts = _plottable_rows(rows)
    if not pts:
        raise UsageError(f"plot_accuracy_vs_time: no row with accuracy and wall_seconds > 0 to plot for '{title}'")
    fig, ax = _new_figure(7.5, 5.2)
    families = sorted({str(r.get("family")) for r in pts}, key=lambda f: (f not in _FAMILY_STYLE, f))
    bars: list[tuple[float, float, float]] = []  # x, low, high: obstacles for the point labels
    for i, fam in enumerate(families):
        colour, marker, label = _FAMILY_STYLE.get(fam, (_EXTRA_COLOURS[i % len(_EXTRA_COLOURS)], "D", fam))
        sel = [r for r in pts if str(r.get("family")) == fam]
        x = np.array([float(r["wall_seconds"]) for r in sel])
        y = np.array([float(r["accuracy"]) for r in sel])
        ci = [_ci(r) or (float(r["accuracy"]), float(r["accuracy"])) for r in sel]
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
    _pad_log_x(ax, [float(r["wall_seconds"]) for r in pts] + ([extraction_seconds] if extraction_seconds else []))
    ax.margins(y=0.12)
    ax.set_xlabel("wall time per strategy, seconds (log scale; heads include the shared extraction)")
    ax.set_ylabel("test accuracy (bars: 95% bootstrap CI)")
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
    labelled = [(float(r["wall_seconds"]), float(r["accuracy"]), str(r.get("strategy"))) for r in pts]
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
    points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str,
    *,
    images_per_class_all: float | None = None,
    chance: float | None = None,
) -> Path:
    """Mean accuracy vs shots per class (log x), one line per method, min–max band over draws.

    The "all" point sits at ``images_per_class_all`` when known (and beyond the largest shot count),
    otherwise one doubling to the right of the largest shot count; its tick says "all" either way.
    """
    stats = _fewshot_stats(points)
    if not stats:
        raise UsageError(f"plot_fewshot: no few-shot point with an accuracy to plot for '{title}'")
    shots = sorted({s for per in stats.values() for s in per}, key=_shot_key)
    ints = [s for s in shots if isinstance(s, int)]
    xpos: dict[Any, float] = {s: float(s) for s in ints}
    others = [s for s in shots if not isinstance(s, int)]
    right: float | None = float(max(ints)) if ints else None
    for s in others:
        if s == "all" and _is_num(images_per_class_all) and (right is None or float(images_per_class_all) > right):
            xpos[s] = float(images_per_class_all)
        else:
            xpos[s] = right * 2 if right else 1.0
        right = xpos[s] if right is None else max(right, xpos[s])
    log_x = all(v > 0 for v in xpos.values())

    fig, ax = _new_figure(7.5, 4.8)
    heads = [m for m in _method_order(stats) if not _is_finetune_method(m)]
    tunes = [m for m in _method_order(stats) if _is_finetune_method(m)]
    head_colours = ("tab:blue", "tab:cyan", "tab:purple", "tab:olive", "tab:gray")
    tune_colours = ("tab:orange", "tab:red", "tab:brown", "tab:pink", "tab:green")
    for group, colours, style, marker in ((heads, head_colours, "-", "o"), (tunes, tune_colours, "--", "s")):
        for i, m in enumerate(group):
            per = stats[m]
            ss = sorted(per, key=_shot_key)
            x = np.array([xpos[s] for s in ss])
            mean = np.array([per[s]["mean"] for s in ss])
            lo = np.array([per[s]["min"] for s in ss])
            hi = np.array([per[s]["max"] for s in ss])
            colour = colours[i % len(colours)]
            ax.plot(x, mean, linestyle=style, marker=marker, color=colour, label=m, linewidth=1.8, markersize=5)
            ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
    if chance:
        ax.axhline(chance, color="0.6", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    if log_x:
        ax.set_xscale("log")
        _pad_log_x(ax, list(xpos.values()))
    ticks = [xpos[s] for s in shots]
    labels = [_all_tick(s, images_per_class_all) if not isinstance(s, int) else str(s) for s in shots]
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel("training images per class (shots)" + (", log scale" if log_x else ""))
    ax.set_ylabel("test accuracy (mean over draws)")
    ax.set_title(f"{title}: data efficiency (band: min–max over draws)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8.5, framealpha=0.9)
    return _save(fig, path)


def plot_layerwise(
    points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str,
    *,
    chance: float | None = None,
) -> Path:
    """Linear-probe accuracy (and macro-F1 when present) vs depth; x ticks are the layer names and widths."""
    pts = _layer_points(points)
    if not pts:
        raise UsageError(f"plot_layerwise: no layer with a depth and an accuracy to plot for '{title}'")
    width = min(14.0, max(7.0, 0.75 * len(pts)))
    fig, ax = _new_figure(width, 4.8)
    depth = [float(p["depth"]) for p in pts]
    ax.plot(depth, [float(p["accuracy"]) for p in pts], "-o", color="tab:blue", label="probe accuracy", linewidth=1.8)
    f1 = [(float(p["depth"]), float(p["macro_f1"])) for p in pts if _is_num(p.get("macro_f1"))]
    if f1:
        ax.plot(
            [d for d, _ in f1], [v for _, v in f1], "--s", color="tab:green", label="probe macro-F1", linewidth=1.4, markersize=4
        )
    best = max(pts, key=lambda p: float(p["accuracy"]))
    at_right = best is pts[-1] and len(pts) > 1
    ax.annotate(
        f"best: {float(best['accuracy']):.3f}",
        (float(best["depth"]), float(best["accuracy"])),
        xytext=(-6 if at_right else 0, 10),
        textcoords="offset points",
        ha="right" if at_right else "center",
        fontsize=8.5,
    )
    ax.margins(x=0.05, y=0.1)
    if chance:
        ax.axhline(chance, color="0.6", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    labels = [str(p.get("layer", p["depth"])) + (f"\n{p['dim']}-d" if p.get("dim") is not None else "") for p in pts]
    rotate = len(pts) > 6 or max(len(str(p.get("layer", ""))) for p in pts) > 12
    ax.set_xticks(depth, labels, rotation=35 if rotate else 0, ha="right" if rotate else "center", fontsize=8.5)
    ax.set_xlabel("layer (depth order; feature width below the name)")
    ax.set_ylabel("test accuracy of a linear probe")
    ax.set_title(f"{title}: layer-wise transferability")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8.5, framealpha=0.9)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_results(results: Any) -> dict[str, Any]:
    if not isinstance(results, Mapping) or not isinstance(results.get("datasets"), Mapping):
        got = type(results).__name__ if not isinstance(results, Mapping) else f"keys {sorted(results)}"
        raise UsageError(f"The 'results' parameter of write_report must be a dict with a 'datasets' mapping. Got {got} instead.")
    return dict(results["datasets"])


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays and paths are written as plain JSON; anything else is an error, not a repr."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"results contain a {type(obj).__name__} that cannot be written as JSON: {obj!r}")


def _write_text(path: Path, text: str) -> None:
    """Atomic write: a crash leaves the old file or none, never half a report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _unique_slugs(names: Sequence[str]) -> dict[str, str]:
    slugs: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "dataset"
        slug, k = base, 2
        while slug in used:
            slug, k = f"{base}-{k}", k + 1
        used.add(slug)
        slugs[name] = slug
    return slugs


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def _row_ok(r: Mapping[str, Any]) -> bool:
    return r.get("status", "ok") != "failed" and _is_num(r.get("accuracy"))


def _ci(r: Mapping[str, Any]) -> tuple[float, float] | None:
    ci = r.get("accuracy_ci95")
    if isinstance(ci, Sequence) and len(ci) == 2 and all(_is_num(v) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def _best(rows: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """Highest accuracy; ties go to the faster strategy, then to the name (deterministic)."""
    rows = list(rows)
    if not rows:
        return None
    inf = float("inf")
    return min(
        rows,
        key=lambda r: (
            -float(r["accuracy"]),
            float(r["wall_seconds"]) if _is_num(r.get("wall_seconds")) else inf,
            str(r.get("strategy")),
        ),
    )


def _compare_sentence(head: Mapping[str, Any], tune: Mapping[str, Any]) -> str:
    a_h, a_t = float(head["accuracy"]), float(tune["accuracy"])
    diff = abs(a_t - a_h) * 100
    ci_h, ci_t = _ci(head), _ci(tune)
    if ci_h is None or ci_t is None:
        return (
            f"No 95% interval was recorded for both, so the {diff:.1f}-point difference in accuracy "
            f"cannot be called significant or not."
        )
    if ci_h[0] <= ci_t[1] and ci_t[0] <= ci_h[1]:
        return (
            f"Their 95% bootstrap intervals overlap, so the two are statistically indistinguishable on this "
            f"test set (difference {diff:.1f} points)."
        )
    winner = f"fine-tuning ({tune.get('strategy')})" if a_t > a_h else f"the feature head ({head.get('strategy')})"
    return f"The 95% intervals do not overlap: {winner} is better by {diff:.1f} points of accuracy."


def _time_sentence(head: Mapping[str, Any], tune: Mapping[str, Any]) -> str:
    t_h, t_t = head.get("wall_seconds"), tune.get("wall_seconds")
    if not (_is_num(t_h) and _is_num(t_t)) or float(t_h) <= 0 or float(t_t) <= 0:
        return ""
    t_h, t_t = float(t_h), float(t_t)
    times = f"{_fmt_seconds(t_t)} vs {_fmt_seconds(t_h)} wall time, the head's including feature extraction"
    if t_t >= t_h:
        return f"Fine-tuning took {_fmt_ratio(t_t / t_h)} longer than the best head ({times})."
    return f"The best head took {_fmt_ratio(t_h / t_t)} longer than fine-tuning ({times})."


def _fmt_ratio(r: float) -> str:
    return f"{r:.0f}×" if r >= 10 else f"{r:.1f}×"


def _chance(ds: Mapping[str, Any]) -> float | None:
    n = len(ds.get("classes") or [])
    return 1.0 / n if n >= 2 else None


def _plottable_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if _row_ok(r) and _is_num(r.get("wall_seconds")) and float(r["wall_seconds"]) > 0]


def _layer_points(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    pts = [p for p in points if _is_num(p.get("depth")) and _is_num(p.get("accuracy"))]
    return sorted(pts, key=lambda p: float(p["depth"]))


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


def _all_tick(s: Any, images_per_class_all: float | None) -> str:
    if s == "all" and images_per_class_all:
        n = float(images_per_class_all)
        return f"all\n(~{n:.0f})" if not n.is_integer() else f"all\n({n:.0f})"
    return str(s)


def _is_finetune_method(method: str) -> bool:
    return str(method).startswith(FINETUNE)


def _neg_str(s: str) -> tuple[int, ...]:
    """Sort key that prefers the alphabetically first name under ``max``."""
    return tuple(-ord(c) for c in s)


def _fewshot_stats(points: Sequence[Mapping[str, Any]]) -> dict[str, dict[Any, dict[str, float]]]:
    """method -> shots -> {mean, std, min, max, n} over draws; points without an accuracy are skipped."""
    acc: dict[str, dict[Any, list[float]]] = {}
    for p in points:
        if p.get("status") == "failed" or not _is_num(p.get("accuracy")) or p.get("shots") is None:
            continue
        acc.setdefault(str(p.get("method")), {}).setdefault(_norm_shot(p["shots"]), []).append(float(p["accuracy"]))
    return {
        m: {
            s: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v)), "n": len(v)}
            for s, v in per.items()
        }
        for m, per in acc.items()
    }


def _fewshot_caption(stats: Mapping[str, Mapping[Any, Mapping[str, float]]]) -> str:
    counts = sorted({int(st["n"]) for per in stats.values() for st in per.values()})
    if counts == [1]:
        draws = "one draw per cell, so no spread is shown"
    elif len(counts) == 1:
        draws = f"mean ± std over {counts[0]} draws"
    else:
        draws = "mean ± std over draws (n per cell; a single draw has no ± part)"
    has_all = any("all" in per for per in stats.values())
    return f"Test accuracy per shot count and method: {draws}." + (' "all" is the full training set.' if has_all else "")


def _method_order(stats: Mapping[str, Any]) -> list[str]:
    """Feature heads first, then fine-tuning methods, each alphabetically."""
    return sorted(stats, key=lambda m: (_is_finetune_method(m), m))


def _cell(v: Any) -> str:
    return str(v).replace("\r", " ").replace("\n", " ").replace("|", "\\|").strip()


def _truncate(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _fmt_float(v: Any) -> str:
    return f"{float(v):.3f}" if _is_num(v) else _DASH


def _fmt_acc_ci(r: Mapping[str, Any]) -> str:
    if not _is_num(r.get("accuracy")):
        return _DASH
    ci = _ci(r)
    acc = f"{float(r['accuracy']):.3f}"
    return f"{acc} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else acc


def _fmt_seconds(s: Any) -> str:
    if not _is_num(s):
        return _DASH
    s = float(s)
    if s < 1:
        return f"{s:.2f} s"
    if s < 100:
        return f"{s:.1f} s"
    return f"{s:,.0f} s"


def _fmt_wall(r: Mapping[str, Any]) -> str:
    if r.get("family") == FEATURES and _is_num(r.get("extract_seconds")) and _is_num(r.get("fit_seconds")):
        return f"extract {_fmt_seconds(r['extract_seconds'])}{_SHARED_MARK} + fit {_fmt_seconds(r['fit_seconds'])}"
    return _fmt_seconds(r.get("wall_seconds"))


def _fmt_memory(r: Mapping[str, Any]) -> str:
    mb = r.get("peak_memory_mb")
    if not _is_num(mb):
        return _DASH
    kind = r.get("memory_kind")
    return f"{float(mb):,.0f} MB" + (f" ({_cell(kind)})" if kind else "")


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
