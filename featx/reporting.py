"""Benchmark results -> a report folder: ``results.json``, ``report.md`` and PNG plots.

Pure rendering: this module reads the dict that ``featx bench`` produces and never runs a model, so a
report can be rebuilt from ``results.json`` alone (and tests need no torch). Every sentence in the
report is computed from the numbers; where the numbers cannot support a conclusion the text says so.

The protocol the report enforces (issue 12):

* **Selection never sees test.** The best head, the best fine-tuning strategy and the best layer are the
  rows with the highest ``val_accuracy`` (ties: the first in the rows' order, i.e. the grid's order). Test
  accuracy is shown for every row but chooses nothing; a row without ``val_accuracy`` cannot be chosen.
* **A paired verdict.** The chosen head and the chosen fine-tuning run predicted the same test images
  (``test_positions``), so they are compared with ``featx.metrics.paired_comparison``: the accuracy
  difference with a paired bootstrap interval, McNemar's exact test, and the smallest difference this
  test set could detect.
* **The budget is named.** A fine-tuning run whose best epoch was its last with the epoch budget spent
  (``still_improving``), or a chosen hyper-parameter on the edge of its grid (``at_grid_edge``), is said
  next to the verdict with what to run to settle it.

Input schema (optional parts may be missing; a row with ``status == "failed"`` carries only ``error``)::

    {"meta": {featx_version, created_at, command, machine, quick, budget_notes: [str],
              protocol?: {final_fit, selection, fewshot_selection, fewshot_draws_heads, fewshot_draws_finetune,
                          finetune_grid, finetune_epochs?, costs, ... (any other key is listed as is)}},
     "datasets": {name: {backbone, classes, splits: {split: str}, images_per_class_all?, test_labels?,
                         extraction?: {seconds, images_per_s, n_images, peak_memory_mb},
                         rows: [{family, strategy, accuracy, accuracy_ci95, macro_f1, val_accuracy?,
                                 wall_seconds, extract_seconds?, fit_seconds?, peak_memory_mb, memory_kind,
                                 trainable_params, n_fit?, final_fit?, hyperparameters?, at_grid_edge?, sweep?,
                                 best_epoch?, epochs_run?, epochs_budget?, still_improving?, grid?,
                                 test_positions?, test_predictions?, test_labels?, status?, error?}],
                         fewshot?: [{method, shots: int | "all", draw, accuracy, family?, selection?}],
                         fewshot_skipped?: [str],
                         layerwise?: [{layer, depth, dim, accuracy, val_accuracy?, macro_f1?}]}}}
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

from featx.errors import MismatchError, UsageError

DPI = 150
FEATURES = "features"
FINETUNE = "finetune"
ALPHA = 0.05  # significance level of the verdict (two-sided)
LEVEL = 0.95  # level of every interval in the report
_FAMILY_STYLE = {  # colour, marker, legend label
    FEATURES: ("tab:blue", "o", "feature heads (frozen backbone)"),
    FINETUNE: ("tab:orange", "s", "fine-tuning"),
}
_EXTRA_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_DASH = "—"
_SHARED_MARK = "†"
_IMPROVING_MARK = "↑"
_CHOSEN_MARK = "✓"

# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def write_report(results: dict, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the plots into ``out_dir``; return every path written.

    Keys of the returned dict: ``"report"``, ``"results"`` and one key per plot, equal to the PNG's file
    stem (``<dataset>_accuracy_vs_time``, ``<dataset>_fewshot``, ``<dataset>_layerwise``). A plot is
    written only when its section has data, so the report never links to an empty figure. The report is
    rendered before anything is written, so results that cannot be compared (``MismatchError``) leave
    the folder untouched.
    """
    datasets = _check_results(results)
    out = Path(out_dir)
    slugs = _unique_slugs(list(datasets))
    plot_names = {name: _plot_jobs(ds) for name, ds in datasets.items()}
    planned = {name: {kind: f"{slugs[name]}_{kind}.png" for kind, *_ in jobs} for name, jobs in plot_names.items()}
    report_text = render_report(results, planned)  # raises before any file is written

    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    results_path = out / "results.json"
    _write_text(results_path, json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
    written["results"] = results_path
    for name, ds in datasets.items():
        title = f"{name} ({ds['backbone']})" if ds.get("backbone") else name
        for kind, plot, data, extra in plot_names[name]:
            path = plot(data, out / planned[name][kind], title, **extra)
            written[path.stem] = path
    report_path = out / "report.md"
    _write_text(report_path, report_text)
    written["report"] = report_path
    return written


def _plot_jobs(ds: Mapping[str, Any]) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    chance = _chance(ds)
    jobs: list[tuple[str, Any, Any, dict[str, Any]]] = []
    rows = ds.get("rows") or []
    if _plottable_rows(rows):
        extraction = (ds.get("extraction") or {}).get("seconds")
        jobs.append(("accuracy_vs_time", plot_accuracy_vs_time, rows, {"extraction_seconds": extraction}))
    if _fewshot_stats(ds.get("fewshot") or []):
        extra = {"images_per_class_all": ds.get("images_per_class_all"), "chance": chance}
        jobs.append(("fewshot", plot_fewshot, ds.get("fewshot") or [], extra))
    if _layer_points(ds.get("layerwise") or []):
        jobs.append(("layerwise", plot_layerwise, ds.get("layerwise") or [], {"chance": chance}))
    return jobs


def select_on_val(items: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The item with the highest ``val_accuracy``; ties go to the first in the given order.

    Items without a finite ``val_accuracy`` (or failed rows) are never chosen: test accuracy is not a
    fallback, because choosing on test makes the reported test score optimistic.
    """
    best = None
    for item in items:
        if item.get("status") == "failed" or not _is_num(item.get("val_accuracy")):
            continue
        if best is None or float(item["val_accuracy"]) > float(best["val_accuracy"]):
            best = item
    return best


def selections(dataset_result: Mapping[str, Any]) -> dict[str, Any]:
    """Every choice the report makes for one dataset, all on val: ``{"head", "finetune", "layer",
    "fewshot_head", "fewshot_finetune"}`` (names, or None where nothing could be chosen)."""
    rows = [r for r in dataset_result.get("rows") or [] if _row_ok(r)]
    head = select_on_val(r for r in rows if r.get("family") == FEATURES)
    tune = select_on_val(r for r in rows if r.get("family") == FINETUNE)
    layer = select_on_val(_layer_points(dataset_result.get("layerwise") or []))
    few_head, few_tune = _fewshot_methods(dataset_result.get("fewshot") or [], head, tune)
    return {
        "head": head.get("strategy") if head else None,
        "finetune": tune.get("strategy") if tune else None,
        "layer": layer.get("layer") if layer else None,
        "fewshot_head": few_head[0] if few_head else None,
        "fewshot_finetune": few_tune[0] if few_tune else None,
    }


def compare_chosen(dataset_result: Mapping[str, Any], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of the val-chosen fine-tuning run (a) against the val-chosen head (b).

    Returns ``{"head", "finetune", "paired"}`` where ``paired`` is ``featx.metrics.paired_comparison``'s dict
    (``diff`` = fine-tuning − head) or None, with ``"why"`` saying what was missing. Raises
    ``MismatchError`` when the two rows were scored on different test images or with different labels.
    """
    rows = [r for r in dataset_result.get("rows") or [] if _row_ok(r)]
    head = select_on_val(r for r in rows if r.get("family") == FEATURES)
    tune = select_on_val(r for r in rows if r.get("family") == FINETUNE)
    out: dict[str, Any] = {"head": head, "finetune": tune, "paired": None, "why": None}
    if head is None or tune is None:
        out["why"] = "one family has no row with a val accuracy"
        return out
    inputs = _paired_inputs(head, tune, dataset_result)
    if isinstance(inputs, str):
        out["why"] = inputs
        return out
    from featx.metrics import paired_comparison

    y, pred_tune, pred_head = inputs
    out["paired"] = paired_comparison(y, pred_tune, pred_head, n_boot=n_boot, seed=seed, level=LEVEL)
    return out


def verdict(dataset_result: dict) -> str:
    """Plain sentences for one dataset, each computed from the numbers.

    Names what was chosen on val in each family, compares the two paired on the same test images
    (``compare_chosen``), says when the compute budget may decide the outcome (``budget_sentences``),
    compares wall time, and states the few-shot crossing point with its uncertainty over draws.
    """
    rows = dataset_result.get("rows") or []
    ok = [r for r in rows if _row_ok(r)]
    failed = [r for r in rows if not _row_ok(r)]
    failed_note = ""
    if failed:
        names = ", ".join(f"{r.get('family', '?')}/{r.get('strategy', '?')}" for r in failed)
        failed_note = f" ({names} failed and {'is' if len(failed) == 1 else 'are'} left out)"
    families = {
        FEATURES: [r for r in ok if r.get("family") == FEATURES],
        FINETUNE: [r for r in ok if r.get("family") == FINETUNE],
    }
    cmp = compare_chosen(dataset_result)
    head, tune = cmp["head"], cmp["finetune"]

    sentences: list[str] = []
    if not families[FEATURES] and not families[FINETUNE]:
        sentences.append(f"No strategy produced a result on this dataset{failed_note}.")
        sentences.append("There is nothing to compare.")
    elif not families[FEATURES] or not families[FINETUNE]:
        have = FEATURES if families[FEATURES] else FINETUNE
        what = "feature heads" if have == FEATURES else "fine-tuning strategies"
        missing = "fine-tuning" if have == FEATURES else "feature-head"
        only = head if have == FEATURES else tune
        if only is not None:
            sentences.append(
                f"Only {what} produced results here; the one chosen on val is {only.get('strategy')} "
                f"(val {_fmt_float(only.get('val_accuracy'))}, test {_fmt_acc_ci(only)}){failed_note}."
            )
        else:
            sentences.append(f"Only {what} produced results here, none with a val accuracy to choose by{failed_note}.")
        sentences.append(f"There is no {missing} result to compare it with, so no winner can be named.")
    elif head is None or tune is None:
        lacking = "feature heads" if head is None else "fine-tuning runs"
        sentences.append(
            f"No val accuracy was recorded for the {lacking}{failed_note}, so no row can be chosen without looking "
            "at test: no verdict is given (re-run the bench to record val accuracies)."
        )
    else:
        sentences.append(
            f"Chosen on val: the feature head {head.get('strategy')} (val {_fmt_float(head.get('val_accuracy'))}, "
            f"test {_fmt_acc_ci(head)}) and fine-tuning {tune.get('strategy')} (val {_fmt_float(tune.get('val_accuracy'))}, "
            f"test {_fmt_acc_ci(tune)}){failed_note}."
        )
        sentences.append(_paired_sentence(cmp))
    sentences += budget_sentences(dataset_result)
    if head is not None and tune is not None:
        ratio = _time_sentence(head, tune)
        if ratio:
            sentences.append(ratio)
    fewshot = dataset_result.get("fewshot") or []
    if fewshot:
        sentences.append(fewshot_crossing(fewshot, head_row=head, finetune_row=tune, rows=ok)["text"])
    return " ".join(sentences)


def budget_sentences(dataset_result: Mapping[str, Any]) -> list[str]:
    """Where the compute budget, not the models, may decide the verdict: fine-tuning runs still improving at
    their last epoch, and chosen hyper-parameters on the edge of the searched grid; each with what to run."""
    ok = [r for r in dataset_result.get("rows") or [] if _row_ok(r)]
    out: list[str] = []
    by_budget: dict[Any, list[str]] = {}
    for r in ok:
        if r.get("family") == FINETUNE and _still_improving(r):
            by_budget.setdefault(r.get("epochs_budget") or r.get("epochs_run"), []).append(str(r.get("strategy")))
    for budget, names in by_budget.items():
        who = f"fine-tuning ({', '.join(names)})"
        verb = "was" if len(names) == 1 else "were"
        if _is_num(budget):
            n = int(budget)
            more = max(2 * n, n + 5)
            out.append(
                f"{who[0].upper()}{who[1:]} {verb} still improving when {'its' if len(names) == 1 else 'their'} {n} epochs "
                f"ended: this budget under-states it; run with --epochs {more} (bench config: finetune: {{epochs: {more}}}) "
                "to settle it."
            )
        else:
            out.append(
                f"{who[0].upper()}{who[1:]} {verb} still improving at the last epoch run: this budget under-states it; "
                "run with more epochs to settle it."
            )
    for r in ok:
        edges = _grid_edges(r)
        if edges is None:
            continue
        name = f"the {r.get('strategy')} head" if r.get("family") == FEATURES else f"fine-tuning ({r.get('strategy')})"
        if not edges:
            out.append(
                f"The hyper-parameters chosen for {name} sit at an edge of the searched grid, so a wider grid might do "
                "better; widen it past that edge and re-run to settle it."
            )
            continue
        parts = [f"{k}={_fmt_hvalue(v)} is the {side} value searched" for k, v, side in edges]
        fix = (
            "pass a wider grid (fit_head(..., grid=...)) and re-run"
            if r.get("family") == FEATURES
            else "extend the bench config's fine-tuning grid past it and re-run"
        )
        out.append(
            f"For {name}, {' and '.join(parts)}: the best value may lie beyond the grid's "
            f"{'edges' if len(edges) > 1 else 'edge'}; {fix} to settle it."
        )
    return out


def fewshot_crossing(
    points: Sequence[Mapping[str, Any]],
    *,
    head_row: Mapping[str, Any] | None = None,
    finetune_row: Mapping[str, Any] | None = None,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Where fine-tuning catches up with the heads in the few-shot curve, and how sure that is.

    One head method is compared with one fine-tuning method, never the best of several at each shot count
    (that would pick on test): the head chosen on val in the full-data grid (``head_row``) when the curve has
    it, else the first head method in the points' order; likewise for fine-tuning (``finetune_row``).
    At each shot count measured for both, the difference fine-tuning − head is averaged over the draws both
    ran (draw d of k shots is the same images for both), with a 95% t-interval over those draws; at
    ``"all"`` with ``rows`` given, the two full-data rows are compared paired over the test images instead.

    Returns ``{"case", "shots", "text", "head_method", "finetune_method", "per_shot", "bracket"}``; case is
    ``"ahead_from_start"``, ``"crosses"`` (the smallest shot count whose mean difference is >= 0),
    ``"never"`` or ``"undetermined"``; ``bracket`` = (last shot count where the head is clearly ahead,
    first where fine-tuning is clearly ahead), None where there is none.
    """
    stats = _fewshot_stats(points)
    heads, tunes = _fewshot_methods(points, head_row, finetune_row)
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
    per_shot = [_fewshot_difference(points, h_method, t_method, s, rows) for s in shots_common]
    base["per_shot"] = per_shot
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
        span = (
            _shot_phrase(shots_common[0], bare=True)
            if len(shots_common) == 1
            else f"{_shot_label(shots_common[0])}–{_shot_label(shots_common[-1])} shots per class"
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
    return {**base, "case": case, "shots": shots, "text": text}


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
    lines += ["", "## Protocol", "", *render_protocol(meta)]
    lines += ["", "## Budget notes", ""]
    notes = meta.get("budget_notes") or []
    if notes:
        lines += [f"- {str(n).strip()}" for n in notes]
    else:
        lines.append("No budget notes were recorded: the grid was run as configured.")
    for name, ds in datasets.items():
        lines += ["", *_render_dataset(name, ds, plots.get(name, {}))]
    return "\n".join(lines).rstrip() + "\n"


_PROTOCOL_KNOWN = (
    "final_fit",
    "final_fit_text",
    "selection",
    "head_grids",
    "finetune_grid",
    "finetune_epochs",
    "fewshot_selection",
    "fewshot_labels",
    "fewshot_draws_heads",
    "fewshot_draws_finetune",
    "same_rows",
    "costs",
)


def render_protocol(meta: Mapping[str, Any]) -> list[str]:
    """Markdown bullets stating how both families were trained, chosen and charged, from ``meta["protocol"]``."""
    proto = meta.get("protocol")
    if not isinstance(proto, Mapping) or not proto:
        return [
            "No protocol was recorded with these results (they predate featx's protocol record): how the final models "
            "were fitted is unknown. Selection below still uses val accuracy only, where rows have one."
        ]
    out = []
    final_fit = proto.get("final_fit")
    text = proto.get("final_fit_text")
    if not text and final_fit == "train+val":
        text = (
            "both families choose hyper-parameters on val, then refit on train + val "
            "(fine-tuning for the epoch count chosen on val)"
        )
    elif not text and final_fit == "train":
        text = "both families choose hyper-parameters on val and keep the model trained on train only"
    if final_fit or text:
        out.append(
            f"- **Final fit ({_cell(final_fit or 'unstated')}):** {_sentence(text or 'not described')} "
            "Each dataset lists the images each family's final model trained on (n_fit)."
        )
    sel = proto.get("selection", "val")
    out.append(
        f"- **Selection on {_cell(sel)}:** the best head, the best fine-tuning strategy and the best layer are the ones "
        f"with the highest {_cell(sel)} accuracy (ties: the first in the grid's order). Test is scored for what was "
        "chosen; other rows show their test scores for reference only, and they choose nothing."
    )
    if proto.get("head_grids"):
        out.append(f"- **Heads' grids:** {_sentence(proto['head_grids'])}")
    grid = proto.get("finetune_grid")
    if grid or proto.get("finetune_epochs"):
        parts = []
        if grid:
            parts.append(_fmt_grid(grid))
        if _is_num(proto.get("finetune_epochs")):
            parts.append(f"at most {int(proto['finetune_epochs'])} epochs, the epoch count chosen on val")
        out.append(f"- **Fine-tuning grid (chosen on val, per strategy):** {'; '.join(parts)}.")
    few = []
    if proto.get("fewshot_labels"):
        few.append(_sentence(proto["fewshot_labels"]))
    elif proto.get("fewshot_selection"):
        few.append(
            f"Hyper-parameters of a few-shot draw come from {_fewshot_selection_words(proto['fewshot_selection'])}; "
            "no val labels are used."
        )
    draws = [
        f"{label} {int(proto[key])}"
        for key, label in (("fewshot_draws_heads", "heads"), ("fewshot_draws_finetune", "fine-tuning"))
        if _is_num(proto.get(key))
    ]
    if draws:
        few.append(f"Draws per shot count: {', '.join(draws)}; tables and plots show the mean and its 95% interval over draws.")
    if few:
        out.append(f"- **Few-shot:** {' '.join(few)}")
    if proto.get("same_rows"):
        out.append(f"- **Same images:** {_sentence(proto['same_rows'])}")
    if proto.get("costs"):
        out.append(f"- **Costs counted alike:** {_sentence(proto['costs'])}")
    out.append(
        f"- **Verdict:** the chosen head and the chosen fine-tuning run are compared on the same test images: accuracy "
        f"difference with a paired bootstrap {LEVEL:.0%} interval, McNemar's exact test (two-sided, alpha {ALPHA}), and the "
        "smallest difference this test set could detect with 80% power. Where a run was still improving at its last "
        "epoch, or a chosen value sits at the edge of its grid, the verdict says so (see the budget notes below)."
    )
    for key, value in proto.items():
        if key not in _PROTOCOL_KNOWN:
            shown = json.dumps(value, default=str) if isinstance(value, (Mapping, list)) else str(value)
            out.append(f"- {_cell(key)}: {_cell(shown)}")
    return out


def render_results_table(dataset_result: Mapping[str, Any]) -> str:
    """Markdown table of all strategies: heads, then fine-tuning, each in the grid's order; failed rows last.

    The rows chosen on val are marked; the table is deliberately not sorted by test accuracy. Wall time of a
    head is "total (shared† + fit)": the shared part (scan, model build, extraction) is paid once for all
    heads, as the footnote under the table says. Epochs are "best / run", with ↑ when the run was still
    improving at the end of its budget.
    """
    rows = list(dataset_result.get("rows") or [])
    ok = [r for r in rows if _row_ok(r)]
    ok = [r for r in ok if r.get("family") == FEATURES] + [r for r in ok if r.get("family") != FEATURES]
    bad = [r for r in rows if not _row_ok(r)]
    chosen = {id(select_on_val(r for r in ok if r.get("family") == fam)) for fam in (FEATURES, FINETUNE)}
    header = [
        "Family",
        "Strategy",
        "Chosen on val",
        "Val acc.",
        "Test accuracy [95% CI]",
        "Macro-F1",
        "Fit on (n_fit)",
        "Wall time",
        "Peak memory",
        "Trainable params",
        "Best epoch / run",
        "Hyperparameters",
    ]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in ok:
        cells = [
            _cell(r.get("family", _DASH)),
            _cell(r.get("strategy", _DASH)),
            _CHOSEN_MARK if id(r) in chosen else "",
            _fmt_float(r.get("val_accuracy")),
            _fmt_acc_ci(r),
            _fmt_float(r.get("macro_f1")),
            _fmt_nfit(r),
            _fmt_wall(r),
            _fmt_memory(r),
            _fmt_params(r.get("trainable_params")),
            _fmt_epochs(r),
            _fmt_hparams(r.get("hyperparameters")) + (" (grid edge)" if _grid_edges(r) is not None else ""),
        ]
        out.append("| " + " | ".join(cells) + " |")
    for r in bad:
        status = r.get("status") or "no result"
        err = _truncate(str(r.get("error") or "no accuracy recorded"), 200)
        cells = [_cell(r.get("family", _DASH)), _cell(r.get("strategy", _DASH)), "", f"**{_cell(status)}**: {_cell(err)}"]
        cells += [_DASH] * (len(header) - len(cells))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render_fewshot_table(points: Sequence[Mapping[str, Any]]) -> str:
    """Shots × method table: mean test accuracy over draws ± the half-width of its 95% t-interval, (n draws).

    A single draw is shown without a ± part, which would suggest a measured spread.
    """
    stats = _fewshot_stats(points)
    if not stats:
        return ""
    methods = _method_order(stats)
    shots = sorted({s for per in stats.values() for s in per}, key=_shot_key)
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
            cell = f"{st['mean']:.3f}" if st["n"] == 1 else f"{st['mean']:.3f} ± {st['half']:.3f}"
            cells.append(f"{cell} (n={st['n']})")
        out.append(f"| {_shot_label(s)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render_crossing_table(crossing: Mapping[str, Any]) -> str:
    """Per shot count: fine-tuning − head in points with its 95% interval, the draws it rests on, and who is ahead."""
    per = crossing.get("per_shot") or []
    if not per:
        return ""
    head, tune = crossing.get("head_method"), crossing.get("finetune_method")
    out = [
        f"| Shots per class | {_cell(tune)} − {_cell(head)} (points) | 95% interval | based on | clearly ahead |",
        "|---|---|---|---|---|",
    ]
    words = {"head": _cell(head), "finetune": _cell(tune), "unclear": "neither"}
    for p in per:
        ci = f"[{_fmt_points(p['ci'][0], signed=True)}, {_fmt_points(p['ci'][1], signed=True)}]" if p["ci"] else _DASH
        out.append(
            f"| {_shot_label(p['shots'])} | {_fmt_points(p['diff'], signed=True)} | {ci} | {p['basis']} | {words[p['status']]} |"
        )
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
    fit_line = _nfit_fact(ds)
    if fit_line:
        facts.append(fit_line)
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
            f"{_CHOSEN_MARK} marks the head and the fine-tuning strategy chosen on val accuracy (ties: first in the grid's "
            "order); test accuracy chose nothing. Accuracy is top-1 on the test set with a 95% percentile-bootstrap "
            "interval over test images. Peak memory is the run's own measurement, its kind in brackets"
            + (" (rss: resident memory of the process tree)." if "rss" in kinds else ".")
        )
        if any(_row_ok(r) and r.get("family") == FINETUNE and r.get("best_epoch") is not None for r in rows):
            lines.append(
                f"Epochs: the epoch whose model was kept (chosen on val; 0 = before any update) / epochs run; "
                f"{_IMPROVING_MARK} = still improving when the epoch budget ran out."
            )
        if any(_row_ok(r) and r.get("family") == FEATURES and r.get("fit_seconds") is not None for r in rows):
            lines += [
                "",
                f"{_SHARED_MARK} Dataset scan, model build and feature extraction run once per dataset and are shared by all "
                "feature heads; each head's wall time counts them in full, so heads differ only in their fit time.",
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
    stats = _fewshot_stats(fewshot)
    if fewshot and stats:
        lines += ["", "### Data efficiency", ""]
        lines.append(render_fewshot_table(fewshot).rstrip())
        lines += ["", _fewshot_caption(fewshot, stats)]
        for skipped in ds.get("fewshot_skipped") or []:
            lines.append(f"Not measured: {_cell(skipped)}.")
        rows_ok = [r for r in rows if _row_ok(r)]
        head = select_on_val(r for r in rows_ok if r.get("family") == FEATURES)
        tune = select_on_val(r for r in rows_ok if r.get("family") == FINETUNE)
        crossing = fewshot_crossing(fewshot, head_row=head, finetune_row=tune, rows=rows_ok)
        table = render_crossing_table(crossing)
        if table:
            lines += ["", table.rstrip()]
        lines += ["", f"**Crossing point.** {crossing['text']}"]

    layer_text = _layerwise_sentence(ds.get("layerwise") or [])
    if layer_text:
        lines += ["", "### Layer-wise probe", "", layer_text]

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
    """Mean accuracy vs shots per class (log x), one line per method, band: 95% t-interval of the mean over draws.

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
            lo = np.array([per[s]["lo"] for s in ss])
            hi = np.array([per[s]["hi"] for s in ss])
            colour = colours[i % len(colours)]
            ns = sorted({int(per[s]["n"]) for s in ss if s != "all"} or {int(per[s]["n"]) for s in ss})
            draws = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
            label = f"{m} ({draws} draw{'s' if ns[-1] != 1 else ''})"
            ax.plot(x, mean, linestyle=style, marker=marker, color=colour, label=label, linewidth=1.8, markersize=5)
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
    ax.set_ylabel("test accuracy (mean over draws, band: 95% CI)")
    ax.set_title(f"{title}: data efficiency")
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
    """Linear-probe test accuracy (and macro-F1, val accuracy when present) vs depth; x ticks are the layer names
    and widths. The layer chosen on val accuracy is marked; with no val accuracy no layer is marked (the
    highest test point is not a fair "best")."""
    pts = _layer_points(points)
    if not pts:
        raise UsageError(f"plot_layerwise: no layer with a depth and an accuracy to plot for '{title}'")
    width = min(14.0, max(7.0, 0.75 * len(pts)))
    fig, ax = _new_figure(width, 4.8)
    depth = [float(p["depth"]) for p in pts]
    ax.plot(depth, [float(p["accuracy"]) for p in pts], "-o", color="tab:blue", label="probe test accuracy", linewidth=1.8)
    f1 = [(float(p["depth"]), float(p["macro_f1"])) for p in pts if _is_num(p.get("macro_f1"))]
    if f1:
        ax.plot(
            [d for d, _ in f1],
            [v for _, v in f1],
            "--s",
            color="tab:green",
            label="probe test macro-F1",
            linewidth=1.4,
            markersize=4,
        )
    val = [(float(p["depth"]), float(p["val_accuracy"])) for p in pts if _is_num(p.get("val_accuracy"))]
    if val:
        ax.plot(
            [d for d, _ in val],
            [v for _, v in val],
            ":^",
            color="tab:gray",
            label="probe val accuracy",
            linewidth=1.2,
            markersize=4,
        )
    chosen = select_on_val(pts)
    if chosen is not None:  # a legend entry, not an annotation: nothing to collide with the curves
        ax.plot(
            [float(chosen["depth"])],
            [float(chosen["accuracy"])],
            "o",
            markersize=13,
            markerfacecolor="none",
            markeredgecolor="tab:red",
            markeredgewidth=1.6,
            label=f"chosen on val: {chosen.get('layer', chosen['depth'])} (test {float(chosen['accuracy']):.3f})",
        )
    ax.margins(x=0.05, y=0.1)
    if chance:
        ax.axhline(chance, color="0.6", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    labels = [str(p.get("layer", p["depth"])) + (f"\n{p['dim']}-d" if p.get("dim") is not None else "") for p in pts]
    rotate = len(pts) > 6 or max(len(str(p.get("layer", ""))) for p in pts) > 12
    ax.set_xticks(depth, labels, rotation=35 if rotate else 0, ha="right" if rotate else "center", fontsize=8.5)
    ax.set_xlabel("layer (depth order; feature width below the name)")
    ax.set_ylabel("accuracy of a linear probe")
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


def _time_sentence(head: Mapping[str, Any], tune: Mapping[str, Any]) -> str:
    t_h, t_t = head.get("wall_seconds"), tune.get("wall_seconds")
    if not (_is_num(t_h) and _is_num(t_t)) or float(t_h) <= 0 or float(t_t) <= 0:
        return ""
    t_h, t_t = float(t_h), float(t_t)
    times = f"{_fmt_seconds(t_t)} vs {_fmt_seconds(t_h)} wall time, the head's including the shared feature extraction"
    if t_t >= t_h:
        return f"Fine-tuning took {_fmt_ratio(t_t / t_h)} longer than the chosen head ({times})."
    return f"The chosen head took {_fmt_ratio(t_h / t_t)} longer than fine-tuning ({times})."


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
    """Heads: "total (shared† + fit)", the shared part being everything before the fit (scan, build, extraction)."""
    wall, fit = r.get("wall_seconds"), r.get("fit_seconds")
    if r.get("family") == FEATURES and _is_num(wall) and _is_num(fit):
        shared = max(0.0, float(wall) - float(fit))
        return f"{_fmt_seconds(wall)} ({_fmt_seconds(shared)}{_SHARED_MARK} + fit {_fmt_seconds(fit)})"
    return _fmt_seconds(wall)


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


# ----------------------------------------------------------------------------------------------
# selection, pairing, budget and few-shot helpers
# ----------------------------------------------------------------------------------------------


def _position_key(p: Any) -> Any:
    """Positions are ints or ``[split, position]`` pairs; make them hashable and comparable."""
    if isinstance(p, (list, tuple)):
        return tuple(_position_key(x) for x in p)
    if isinstance(p, (np.integer, float)) and float(p).is_integer():
        return int(p)
    return p


def _paired_inputs(
    head: Mapping[str, Any], tune: Mapping[str, Any], ds: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(labels, fine-tuning predictions, head predictions) aligned on the same test images, or why not.

    Rows whose ``test_positions`` are the same images in another order are aligned; different images, or
    different labels for the same image, raise ``MismatchError``: a paired test on them would be wrong.
    """
    names = f"the chosen head ({head.get('strategy')}) and fine-tuning ({tune.get('strategy')})"
    preds = {"head": head.get("test_predictions"), "finetune": tune.get("test_predictions")}
    lacking = [k for k, v in preds.items() if not isinstance(v, Sequence) or isinstance(v, str) or len(v) == 0]
    if lacking:
        which = " and ".join("fine-tuning" if k == FINETUNE else k for k in lacking)
        which += " rows carry" if len(lacking) > 1 else " row carries"
        return f"the {which} no test predictions (results from before featx recorded them)"
    pos = {"head": head.get("test_positions"), "finetune": tune.get("test_positions")}
    if any(not isinstance(v, Sequence) or isinstance(v, str) for v in pos.values()):
        return "test positions were not recorded, so it cannot be checked that both scored the same images"
    for fam, row in (("head", head), ("finetune", tune)):
        if len(preds[fam]) != len(pos[fam]):
            raise MismatchError(
                f"{fam} row {row.get('strategy')}: {len(preds[fam])} test predictions for {len(pos[fam])} test positions"
            )
    keys_h = [_position_key(p) for p in pos["head"]]
    keys_t = [_position_key(p) for p in pos["finetune"]]
    labels_h = head.get("test_labels") if head.get("test_labels") is not None else ds.get("test_labels")
    labels_t = tune.get("test_labels") if tune.get("test_labels") is not None else ds.get("test_labels")
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


def _paired_sentence(cmp: Mapping[str, Any]) -> str:
    head, tune, r = cmp["head"], cmp["finetune"], cmp["paired"]
    h, t = f"the feature head ({head.get('strategy')})", f"fine-tuning ({tune.get('strategy')})"
    if r is None:
        return (
            f"No paired comparison is possible: {cmp['why']}; test accuracies alone cannot say which is better, "
            "so no verdict is given."
        )
    n, diff, (lo, hi), p, mde = r["n"], r["diff"], r["ci"], r["p_value"], r["mde"]
    sig_p, sig_ci = p < ALPHA, (lo > 0 or hi < 0)
    unseen = f"differences under {_fmt_points(mde)} points would go unseen"
    if sig_p and sig_ci:
        winner, (a, b) = (t, (lo, hi)) if diff > 0 else (h, (hi, lo))
        return (
            f"{winner[0].upper()}{winner[1:]} is better by {_fmt_points(diff)} points [{_fmt_points(a)}, {_fmt_points(b)}], "
            f"McNemar {_fmt_p(p)} (paired over n = {n} test images)."
        )
    observed = f"{t} − {h} = {_fmt_points(diff, signed=True)} points{_fmt_points_ci((lo, hi))}, McNemar {_fmt_p(p)}"
    if sig_p or sig_ci:
        return (
            f"The evidence is borderline (n = {n} test images): {observed}; the test and the interval disagree, so no "
            f"difference is claimed, and {unseen}."
        )
    return f"No difference detectable at this test size (n = {n}): {observed}; {unseen}."


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


def _still_improving(r: Mapping[str, Any]) -> bool:
    """The flag when recorded; else best epoch == last epoch run == the epoch budget."""
    flag = r.get("still_improving")
    if flag is not None:
        return bool(flag)
    best, run, budget = r.get("best_epoch"), r.get("epochs_run"), r.get("epochs_budget")
    return all(_is_num(v) for v in (best, run, budget)) and int(best) == int(run) == int(budget)


def _grid_values(r: Mapping[str, Any]) -> dict[str, list[float]]:
    """Numeric values searched per hyper-parameter, from a head's ``sweep``/``curve`` or fine-tuning's ``grid``."""
    entries = r.get("sweep") or r.get("curve") or r.get("grid") or []
    values: dict[str, set[float]] = {}
    if not isinstance(entries, list):
        return {}
    for e in entries:
        if not isinstance(e, Mapping):
            continue
        params = e.get("params") if isinstance(e.get("params"), Mapping) else e
        for k, v in params.items():
            if k not in ("val_accuracy", "best_epoch", "seconds", "epochs") and _is_num(v):
                values.setdefault(k, set()).add(float(v))
    return {k: sorted(v) for k, v in values.items()}


# Hyper-parameters computed from another one that the grid searches (rbf-svm: gamma = gamma_scale / (n_features *
# the features' variance)); an edge is reported for the searched one only.
DERIVED_PARAMS = {"gamma": "gamma_scale"}


def _grid_edges(r: Mapping[str, Any]) -> list[tuple[str, Any, str]] | None:
    """None when the chosen hyper-parameters are inside their grid (or nothing says otherwise); else the
    (parameter, value, "smallest"|"largest") edges hit, [] when the row only says "at an edge".

    Heads carry ``at_grid_edge``; for fine-tuning it is worked out from ``grid``, and only for a parameter
    searched over at least three values (with two, every choice is an edge and says nothing).
    """
    hp = r.get("hyperparameters") if isinstance(r.get("hyperparameters"), Mapping) else {}
    grid = _grid_values(r)
    edges = []
    for k, v in hp.items():
        if DERIVED_PARAMS.get(k) in hp:  # e.g. rbf-svm's gamma follows from gamma_scale: one choice, named once
            continue
        vals = grid.get(k, [])
        if not _is_num(v) or len(vals) < (2 if r.get("family") == FEATURES else 3):
            continue
        if math.isclose(float(v), vals[0], rel_tol=1e-9):
            edges.append((k, v, "smallest"))
        elif math.isclose(float(v), vals[-1], rel_tol=1e-9):
            edges.append((k, v, "largest"))
    flag = r.get("at_grid_edge")
    if r.get("family") == FEATURES:
        if flag is None:
            return None  # old rows: nothing recorded, nothing claimed
        return edges if flag else None
    if flag is False:
        return None
    return edges if edges else ([] if flag else None)


def _fewshot_methods(
    points: Sequence[Mapping[str, Any]], head_row: Mapping[str, Any] | None, tune_row: Mapping[str, Any] | None
) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(method, why) for the head and the fine-tuning method the crossing compares: the ones chosen on val in
    the full-data grid when the curve has them, else the only / first method in the points' order."""
    order: list[str] = []
    for p in points:
        m = str(p.get("method"))
        if p.get("status") != "failed" and _is_num(p.get("accuracy")) and m not in order:
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
        pick(heads, str(head_row.get("strategy")) if head_row else None, "head"),
        pick(tunes, f"{FINETUNE}:{tune_row.get('strategy')}" if tune_row else None, "fine-tuning method"),
    )


def _t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over draws; a single value has no width."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, mean, mean
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def _fewshot_difference(
    points: Sequence[Mapping[str, Any]], head: str, tune: str, shot: Any, rows: Sequence[Mapping[str, Any]] | None
) -> dict[str, Any]:
    """Fine-tuning − head at one shot count: paired over draws (or over test images at "all" when the
    full-data rows are given), with its 95% interval and who is clearly ahead."""
    if shot == "all" and rows:
        h_row = next((r for r in rows if r.get("family") == FEATURES and r.get("strategy") == head), None)
        t_row = next((r for r in rows if r.get("family") == FINETUNE and f"{FINETUNE}:{r.get('strategy')}" == tune), None)
        if h_row is not None and t_row is not None:
            inputs = _paired_inputs(h_row, t_row, {})
            if not isinstance(inputs, str):
                from featx.metrics import paired_comparison

                r = paired_comparison(*inputs, level=LEVEL)
                lo, hi = r["ci"]
                sig = r["p_value"] < ALPHA and (lo > 0 or hi < 0)
                status = ("finetune" if r["diff"] > 0 else "head") if sig else "unclear"
                return {
                    "shots": shot,
                    "diff": r["diff"],
                    "ci": (lo, hi),
                    "n": r["n"],
                    "basis": f"paired over {r['n']} test images (McNemar {_fmt_p(r['p_value'])})",
                    "status": status,
                }
    per: dict[str, dict[Any, list[float]]] = {head: {}, tune: {}}
    for p in points:
        m = str(p.get("method"))
        if m in per and p.get("status") != "failed" and _is_num(p.get("accuracy")) and _norm_shot(p.get("shots")) == shot:
            per[m].setdefault(p.get("draw"), []).append(float(p["accuracy"]))
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
        parts.append('at "all" a paired bootstrap interval over test images')
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


def _fewshot_stats(points: Sequence[Mapping[str, Any]]) -> dict[str, dict[Any, dict[str, float]]]:
    """method -> shots -> {mean, std, min, max, lo, hi, half, n} over draws (lo/hi: 95% t-interval of the mean)."""
    acc: dict[str, dict[Any, list[float]]] = {}
    for p in points:
        if p.get("status") == "failed" or not _is_num(p.get("accuracy")) or p.get("shots") is None:
            continue
        acc.setdefault(str(p.get("method")), {}).setdefault(_norm_shot(p["shots"]), []).append(float(p["accuracy"]))
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


def _fewshot_caption(points: Sequence[Mapping[str, Any]], stats: Mapping[str, Mapping[Any, Mapping[str, float]]]) -> str:
    has_all = any("all" in per for per in stats.values())
    text = (
        "Test accuracy per shot count and method: the mean over draws ± the half-width of its 95% t-interval, with n "
        "the number of draws (a single draw has no ± part)."
    )
    counts: dict[tuple[str, str], int] = {}
    for p in points:
        if p.get("selection") and _norm_shot(p.get("shots")) != "all" and _is_num(p.get("accuracy")):
            fam = "fine-tuning" if _is_finetune_method(str(p.get("method"))) else "heads"
            counts[(fam, str(p["selection"]))] = counts.get((fam, str(p["selection"])), 0) + 1
    if counts:
        words = {"cv": "cross-validation inside the draw", "rule": "the fixed rule", "val": "val"}
        parts = [f"{fam} {words.get(sel, sel)} ({n} fits)" for (fam, sel), n in sorted(counts.items())]
        text += " Few-shot hyper-parameters came from: " + "; ".join(parts) + "."
    if has_all:
        text += ' "all" is the full-data grid above (hyper-parameters chosen on val).'
    return text


def _fmt_grid(grid: Any) -> str:
    if isinstance(grid, Mapping) and grid and all(isinstance(v, Mapping) for v in grid.values()):
        return "; ".join(f"{_cell(k)}: {_fmt_grid(v)}" for k, v in grid.items())
    if isinstance(grid, Mapping):
        return (
            " × ".join(
                f"{str(k).replace('_', ' ')} {{{', '.join(_fmt_hvalue(x) for x in v)}}}" if isinstance(v, list) else f"{k} {v}"
                for k, v in grid.items()
            )
            or "none (one setting)"
        )
    return _cell(grid)


def _fewshot_selection_words(sel: Any) -> str:
    words = {
        "cv|rule": "cross-validation inside the draw where every class has two images or more, else a fixed documented rule",
        "cv": "cross-validation inside the draw",
        "rule": "a fixed documented rule",
    }
    return words.get(str(sel), _cell(sel))


def _sentence(text: Any) -> str:
    s = " ".join(str(text).split())
    if not s:
        return s
    s = s[0].upper() + s[1:]
    return s if s.endswith((".", "!", "?")) else s + "."


def _fmt_nfit(r: Mapping[str, Any]) -> str:
    n = r.get("n_fit")
    if not _is_num(n):
        return _DASH
    return f"{int(n)} ({_cell(r['final_fit'])})" if r.get("final_fit") else f"{int(n)}"


def _nfit_fact(ds: Mapping[str, Any]) -> str | None:
    ok = [r for r in ds.get("rows") or [] if _row_ok(r)]
    parts, values = [], {}
    for fam, label in ((FEATURES, "heads"), (FINETUNE, "fine-tuning")):
        ns = sorted({int(r["n_fit"]) for r in ok if r.get("family") == fam and _is_num(r.get("n_fit"))})
        fits = sorted({str(r["final_fit"]) for r in ok if r.get("family") == fam and r.get("final_fit")})
        if not ns:
            continue
        values[fam] = ns
        n_text = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        parts.append(f"{label} {n_text} images" + (f" ({', '.join(fits)})" if fits else ""))
    if not parts:
        return None
    line = "- Final models trained on (n_fit): " + "; ".join(parts)
    if len(values) == 2 and values[FEATURES] != values[FINETUNE]:
        line += " — **not the same labelled images for both families**, so the comparison is not like for like"
    return line


def _fmt_epochs(r: Mapping[str, Any]) -> str:
    best, run, budget = r.get("best_epoch"), r.get("epochs_run"), r.get("epochs_budget")
    if not _is_num(best) and not _is_num(run):
        return _DASH
    text = f"{int(best) if _is_num(best) else _DASH} / {int(run) if _is_num(run) else _DASH}"
    if _is_num(budget) and _is_num(run) and int(budget) != int(run):
        text += f" (budget {int(budget)})"
    return text + (f" {_IMPROVING_MARK}" if _still_improving(r) else "")


def _layerwise_sentence(points: Sequence[Mapping[str, Any]]) -> str:
    pts = _layer_points(points)
    if not pts:
        return ""
    chosen = select_on_val(pts)
    deepest = pts[-1]

    def describe(p: Mapping[str, Any]) -> str:
        dim = f"{p['dim']}-d, " if p.get("dim") is not None else ""
        return f"{_cell(p.get('layer', p['depth']))} ({dim}val {_fmt_float(p.get('val_accuracy'))}, test {_fmt_acc_ci(p)})"

    if chosen is None:
        return (
            "No val accuracy was recorded per layer, so no layer is named best (choosing on test would flatter it); "
            "the plot shows each layer's test accuracy."
        )
    text = f"A logistic-regression probe per layer; the layer chosen on val is {describe(chosen)}."
    if chosen is deepest:
        return text + " That is the deepest layer tapped."
    return text + f" The deepest layer tapped is {describe(deepest)}."
