"""Benchmark results -> a report folder: ``results.json``, ``report.md`` and PNG plots.

Pure rendering: this module reads the dict that ``featx bench`` produces and never runs a model, so a
report can be rebuilt from ``results.json`` alone (and tests need no torch). Every sentence in the
report is computed from the numbers; where the numbers cannot support a conclusion the text says so.

The protocol the report enforces (issues 12 and 21):

* **Selection never sees test.** The best head, the best fine-tuning strategy and the best layer are the
  rows with the highest ``val_accuracy``; ties go to the lower ``val_log_loss`` where every tied row has one,
  else to the first in the rows' order (the grid's order). Test accuracy is shown for every row but chooses
  nothing; a row without ``val_accuracy`` cannot be chosen. When the layer-wise probe ran, the features
  family's choice includes its layers. A choice decided by one val image or less is said next to the verdict,
  with what the runner-up would have given.
* **A paired verdict.** The chosen head and the chosen fine-tuning run predicted the same test images
  (``test_positions``), so they are compared with ``featx.metrics.paired_comparison``: the accuracy
  difference with an interval computed from the counts (no seed: the printed ends never move) that never
  disagrees with McNemar's exact test, and the smallest difference this test set could detect. With several
  datasets the p-values are also Holm-adjusted across the report.
* **A probe is not fine-tuning.** A fine-tuning run whose chosen model never updated the backbone (LP-FT
  keeping its epoch-0 probe, the ``head`` strategy) is said to have added nothing at this budget; the run that
  did train and came closest is shown with its paired result, for reference.
* **The budget is named.** A fine-tuning run (or grid point) whose best epoch was its last with the epoch
  budget spent (``still_improving``), or a chosen hyper-parameter on the edge of its grid (any grid of two
  values or more), is said next to the verdict with what to run to settle it; the summary applies one
  follow-up rule to every dataset where that happens.

Input schema (optional parts may be missing; a row with ``status == "failed"`` carries only ``error``)::

    {"meta": {featx_version, created_at, command, machine, quick, budget_notes: [str],
              code?: {featx_version, source_sha256}, stale_cells?: [{cell, changed: [str]}],
              protocol?: {final_fit, selection, fewshot_selection, fewshot_draws_heads, fewshot_draws_finetune,
                          finetune_grid, finetune_epochs?, costs, ... (any other key is listed as is)}},
     "datasets": {name: {backbone, classes, splits: {split: str}, images_per_class_all?, n_fit?, test_labels?,
                         extraction?: {seconds, images_per_s, n_images, peak_memory_mb},
                         rows: [{family, strategy, accuracy, accuracy_ci95, macro_f1, val_accuracy?, val_log_loss?,
                                 n_val?, wall_seconds, extract_seconds?, fit_seconds?, peak_memory_mb, memory_kind,
                                 trainable_params, n_fit?, final_fit?, hyperparameters?, at_grid_edge?, sweep?,
                                 best_epoch?, epochs_run?, epochs_budget?, still_improving?, grid?, augment?,
                                 backbone_updated?, fine_tune_epochs?,
                                 test_positions?, test_predictions?, test_labels?, status?, error?}],
                         fewshot?: [{method, shots: int | "all", draw, accuracy, family?, selection?, n_fit?}],
                         fewshot_skipped?: [str],
                         layerwise?: [{layer, depth, dim, accuracy, val_accuracy?, val_log_loss?, macro_f1?,
                                       test_predictions?, test_positions?, test_labels?}]}}}
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

from featx.data import RowSelection
from featx.errors import MismatchError, UsageError
from featx.metrics import holm_adjust, paired_comparison, wilson_interval

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
        extra = {
            "images_per_class_all": ds.get("images_per_class_all"),
            "chance": chance,
            "all_per_class": _all_per_class(ds),
            "probe_at_all": _probe_methods(ds),
        }
        jobs.append(("fewshot", plot_fewshot, ds.get("fewshot") or [], extra))
    if _layer_points(ds.get("layerwise") or []):
        jobs.append(("layerwise", plot_layerwise, ds.get("layerwise") or [], {"chance": chance}))
    return jobs


def select_on_val(items: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The item with the highest ``val_accuracy``; ties go to the lower ``val_log_loss`` when every tied item
    has one, else to the first in the given order.

    Items without a finite ``val_accuracy`` (or failed rows) are never chosen: test accuracy is not a
    fallback, because choosing on test makes the reported test score optimistic.
    """
    ranked = rank_on_val(items)
    return ranked[0] if ranked else None


def rank_on_val(items: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Items ordered as the selection rule prefers them: val accuracy (higher first), then, within an exact tie,
    val log-loss (lower first) when every tied item has one, then the given order. Items that cannot be
    chosen (failed, no finite val accuracy) are left out."""
    pool = [it for it in items if it.get("status") != "failed" and _is_num(it.get("val_accuracy"))]
    ranked = sorted(pool, key=lambda it: -_val_key(it))  # stable: the given order within a tie
    out: list[Mapping[str, Any]] = []
    i = 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and _val_key(ranked[j]) == _val_key(ranked[i]):
            j += 1
        group = ranked[i:j]
        if len(group) > 1 and all(_is_num(g.get("val_log_loss")) for g in group):
            group = sorted(group, key=lambda g: float(g["val_log_loss"]))
        out += group
        i = j
    return out


def choice_detail(items: Iterable[Mapping[str, Any]], *, n_val: int | None = None) -> dict[str, Any] | None:
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
        losses = [chosen.get("val_log_loss"), *(t.get("val_log_loss") for t in tied)]
        decided = "val log-loss" if all(_is_num(v) for v in losses) and float(losses[0]) < float(losses[1]) else "order"
    nv = _n_val(chosen) or n_val
    margin = None if runner is None else float(chosen["val_accuracy"]) - float(runner["val_accuracy"])
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


def backbone_updated(row: Mapping[str, Any]) -> bool | None:
    """Whether the model a fine-tuning row reports ever updated the backbone: the row's ``backbone_updated``
    when recorded; else False for the ``head`` strategy (a linear layer on the frozen backbone) and for a
    chosen fine-tuning epoch count of 0 (``fine_tune_epochs``, else the chosen ``epochs``, else ``best_epoch``:
    LP-FT keeping its epoch-0 probe); None when nothing says. Feature heads never update it."""
    flag = row.get("backbone_updated")
    if isinstance(flag, (bool, np.bool_)):
        return bool(flag)
    if row.get("family") != FINETUNE:
        return False
    if str(row.get("strategy")) == "head":
        return False
    epochs = _fine_tune_epochs(row)
    return None if epochs is None else epochs > 0


def selections(dataset_result: Mapping[str, Any]) -> dict[str, Any]:
    """Every choice the report makes for one dataset, all on val: ``{"head", "finetune", "layer",
    "fewshot_head", "fewshot_finetune"}`` (names, or None where nothing could be chosen). ``head`` is the
    choice among the heads on the pooled features; :func:`family_choices` adds the layers to it."""
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


def family_choices(dataset_result: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """:func:`choice_detail` for ``"head"`` (heads on the pooled features), ``"features"`` (those heads and,
    when the layer-wise probe ran, a logistic-regression probe per layer), ``"finetune"`` (every fine-tuning
    strategy) and ``"trained"`` (only the fine-tuning runs that updated the backbone)."""
    rows = [r for r in dataset_result.get("rows") or [] if _row_ok(r)]
    heads = [r for r in rows if r.get("family") == FEATURES]
    tunes = [r for r in rows if r.get("family") == FINETUNE]
    n_val = next((_n_val(r) for r in rows if _n_val(r)), None)
    return {
        "head": choice_detail(heads, n_val=n_val),
        "features": choice_detail([*heads, *_layer_candidates(dataset_result, heads)], n_val=n_val),
        "finetune": choice_detail(tunes, n_val=n_val),
        "trained": choice_detail([r for r in tunes if backbone_updated(r) is not False], n_val=n_val),
    }


def compare_chosen(dataset_result: Mapping[str, Any], *, n_boot: int = 0, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of the val-chosen fine-tuning run (a) against the val-chosen features model (b).

    Returns a dict with ``"head"`` (the features model in the paired test: the chosen layer probe when it
    carries per-image test predictions, else the head chosen on the pooled features), ``"finetune"`` (the chosen
    fine-tuning row) and ``"paired"`` (``featx.metrics.paired_comparison``'s dict, ``diff`` = fine-tuning −
    head, or None with ``"why"`` saying what was missing); and also ``"features"`` (the features family's choice,
    possibly a layer probe), ``"pooled_head"``, ``"layer_unpaired"`` (a layer probe was chosen but cannot be
    paired), ``"pooled_paired"`` (fine-tuning against the pooled head when the layer probe was paired),
    ``"probe_kept"`` (the chosen fine-tuning model never updated the backbone), ``"trained"`` /
    ``"trained_paired"`` (the closest run that did, and its paired result), ``"runner_ups"`` (family -> the
    runner-up and its paired result, for choices decided by one val image or less) and ``"choices"``
    (:func:`family_choices`). Raises ``MismatchError`` when two rows were scored on different test images or
    with different labels.
    """
    choices = family_choices(dataset_result)
    pooled = choices["head"]["chosen"] if choices["head"] else None
    feat = choices["features"]["chosen"] if choices["features"] else None
    tune = choices["finetune"]["chosen"] if choices["finetune"] else None
    out: dict[str, Any] = {
        "head": pooled,
        "finetune": tune,
        "paired": None,
        "why": None,
        "features": feat,
        "pooled_head": pooled,
        "layer_unpaired": False,
        "pooled_paired": None,
        "probe_kept": tune is not None and backbone_updated(tune) is False,
        "trained": None,
        "trained_paired": None,
        "runner_ups": {},
        "choices": choices,
    }
    kw = {"n_boot": n_boot, "seed": seed}
    if feat is not None and feat.get("_layer") is not None:
        if tune is not None and _pairable(feat, tune, dataset_result):
            out["head"] = feat
            if pooled is not None:
                out["pooled_paired"] = _pair(pooled, tune, dataset_result, **kw)[0]
        else:
            out["layer_unpaired"] = True
    head = out["head"]
    if head is None or tune is None:
        out["why"] = "one family has no row with a val accuracy"
        return out
    out["paired"], out["why"] = _pair(head, tune, dataset_result, **kw)
    if out["probe_kept"] and choices["trained"] is not None:
        trained = choices["trained"]["chosen"]
        out["trained"] = trained
        out["trained_paired"] = _pair(head, trained, dataset_result, **kw)[0]
    compare_tune = out["trained"] if out["probe_kept"] else tune
    for fam, other in (("features", compare_tune), ("finetune", head)):
        d = choices[fam]
        if d is None or not d["close"]:
            continue
        runner = d["runner_up"]
        paired = None
        if other is not None:
            a, b = (other, runner) if fam == "features" else (runner, other)
            if _pairable(b, a, dataset_result):
                paired = _pair(b, a, dataset_result, **kw)[0]
        out["runner_ups"][fam] = {"row": runner, "paired": paired, "against": other}
    return out


def verdict(dataset_result: dict, *, family: Mapping[str, Any] | None = None) -> str:
    """Plain sentences for one dataset, each computed from the numbers.

    Names what was chosen on val in each family, compares the two paired on the same test images
    (``compare_chosen``), says when a chosen "fine-tuning" model is in fact a probe, when a choice was decided
    by one val image or less (with what the runner-up would have given), and when the compute budget may decide
    the outcome (``budget_sentences``); compares wall time, and states the few-shot crossing point with its
    uncertainty over draws. ``family`` (``{"k", "holm_p"}``, from the report) adds Holm's correction across the
    report's datasets.
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
    word = "none"
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
        sentences.append(_chosen_sentence(cmp, failed_note))
        if cmp["layer_unpaired"]:
            sentences.append(
                f"The layer-wise probe recorded no per-image test predictions, so it cannot be paired with fine-tuning: "
                f"the paired comparison below uses {_head_name(cmp['pooled_head'])}, the head chosen on val on the pooled "
                f"features (the layer probe's own test interval is the unpaired one above)."
            )
        if cmp["probe_kept"]:
            sentences += _probe_sentences(cmp)
        else:
            sentences.append(_paired_sentence(cmp))
            if cmp["pooled_paired"] is not None:
                r = cmp["pooled_paired"]
                sentences.append(
                    f"Against {_head_name(cmp['pooled_head'])}, the head chosen on the pooled features: "
                    f"{_observed(r, _tune_name(tune), _head_name(cmp['pooled_head']))}."
                )
            holm = _holm_sentence(cmp, family)
            if holm:
                sentences.append(holm)
        sentences += _close_call_sentences(cmp)
        word = verdict_word(cmp, (family or {}).get("holm_p"))
    budget = budget_sentences(dataset_result)
    if budget and word not in ("finetune", "none"):
        sentences.append("The budget may have decided this verdict, for these reasons.")
    sentences += budget
    if head is not None and tune is not None:
        timed = head if _is_num(head.get("wall_seconds")) else cmp["pooled_head"] or head
        ratio = _time_sentence(
            timed,
            tune,
            head_label="the chosen head" if timed is cmp["features"] else f"the pooled head {timed.get('strategy')}",
            tune_label=f"The fine-tuning run ({tune.get('strategy')}, which ended with its probe)"
            if cmp["probe_kept"]
            else "Fine-tuning",
        )
        if ratio:
            sentences.append(ratio)
    fewshot = dataset_result.get("fewshot") or []
    if fewshot:
        sentences.append(fewshot_crossing(fewshot, head_row=cmp["pooled_head"], finetune_row=tune, rows=ok)["text"])
    return " ".join(sentences)


def verdict_word(cmp: Mapping[str, Any], holm_p: float | None = None) -> str:
    """One word for the summary: ``"finetune"`` / ``"head"`` (better, also after Holm's correction when given),
    ``"finetune_unadjusted"`` / ``"head_unadjusted"`` (significant on this dataset alone, not after Holm),
    ``"no_difference"``, ``"probe_only"`` (the chosen fine-tuning model never updated the backbone) or
    ``"none"`` (nothing to compare)."""
    if cmp.get("finetune") is None or cmp.get("head") is None:
        return "none"
    if cmp.get("probe_kept"):
        return "probe_only"
    r = cmp.get("paired")
    if r is None:
        return "none"
    if r["p_value"] >= ALPHA:
        return "no_difference"
    side = "finetune" if r["diff"] > 0 else "head"
    return side if holm_p is None or holm_p < ALPHA else f"{side}_unadjusted"


_WORDS = {
    "finetune": "fine-tuning better",
    "head": "head better",
    "finetune_unadjusted": "fine-tuning ahead on this dataset alone, not after Holm",
    "head_unadjusted": "head ahead on this dataset alone, not after Holm",
    "no_difference": "no difference detected",
    "probe_only": "fine-tuning added nothing (probe kept)",
    "none": "no verdict",
}


def budget_sentences(dataset_result: Mapping[str, Any]) -> list[str]:
    """Where the compute budget, not the models, may decide the verdict: fine-tuning runs still improving at
    their last epoch (the chosen run, or other grid points of a strategy), and chosen hyper-parameters on the
    edge of the searched grid; each with what to run."""
    return [item["text"] for item in _budget_items(dataset_result)]


def budget_flags(dataset_result: Mapping[str, Any]) -> list[str]:
    """Short reasons why the budget may have decided the verdict (empty: nothing says so), for the summary."""
    items = _budget_items(dataset_result)
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


def _budget_items(dataset_result: Mapping[str, Any]) -> list[dict[str, str]]:
    """Each reason the budget may have decided the verdict: ``{"text": sentence, "kind": "improving" |
    "grid_improving" | "edge", "what": the runs or parameters concerned}``."""
    ok = [r for r in dataset_result.get("rows") or [] if _row_ok(r)]
    out: list[dict[str, str]] = []
    by_budget: dict[Any, list[str]] = {}
    for r in ok:
        if r.get("family") == FINETUNE and _still_improving(r):
            by_budget.setdefault(_epoch_budget(r), []).append(str(r.get("strategy")))
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
        if r.get("family") != FINETUNE or _still_improving(r):
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
                    f"Fine-tuning ({r.get('strategy')}) kept a run that had stopped improving, but its grid "
                    f"point{'s' if len(points) > 1 else ''} at {where} {'were' if len(points) > 1 else 'was'} still improving "
                    f"when {'their' if len(points) > 1 else 'its'} {int(n) if _is_num(n) else 'last'} epochs ended "
                    f"(best val {_fmt_float(best)} against the chosen {_fmt_float(r.get('val_accuracy'))}): more epochs might "
                    f"change the choice; {run} to settle it."
                ),
                "kind": "grid_improving",
                "what": f"{r.get('strategy')} ({where})",
            }
        )
    for r in ok:
        edges = _grid_edges(r)
        if edges is None:
            continue
        name = f"the {r.get('strategy')} head" if r.get("family") == FEATURES else f"fine-tuning ({r.get('strategy')})"
        if not edges:
            out.append(
                {
                    "text": (
                        f"The hyper-parameters chosen for {name} sit at an edge of the searched grid, so a wider grid might "
                        "do better; widen it past that edge and re-run to settle it."
                    ),
                    "kind": "edge",
                    "what": str(r.get("strategy")),
                }
            )
            continue
        parts = [f"{k}={_fmt_hvalue(v)} is the {side} value searched" for k, v, side in edges]
        if r.get("family") == FEATURES:
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
                "what": f"{r.get('strategy')} {' and '.join(k for k, _, _ in edges)}",
            }
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
    ``"all"`` with ``rows`` given, the two full-data rows are compared paired over the test images instead, and
    a fine-tuning row whose model never updated the backbone (an LP-FT probe) is marked ``"probe"`` there and
    left out of the crossing (it is listed in ``per_shot`` all the same).

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
    per_shot_all = [_fewshot_difference(points, h_method, t_method, s, rows) for s in shots_common]
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
    lines.append(f"| code | {_fmt_code(meta.get('code'))} |")
    lines.append(f"| created | {_cell(meta.get('created_at', 'unknown'))} |")
    lines.append(f"| machine | {_cell(meta.get('machine', 'unknown'))} |")
    if "quick" in meta:
        lines.append(f"| mode | {'quick (reduced grid)' if meta['quick'] else 'full'} |")
    command = str(meta.get("command", "")).replace("`", "'")
    lines.append(f"| command | `{_cell(command)}` |" if command else "| command | unknown |")
    stale = _stale_cells(meta)
    if stale:
        lines += ["", *_stale_block(stale)]
    summary = report_summary(datasets)
    if summary["rows"]:
        lines += ["", "## Summary", "", *render_summary(summary)]
    lines += ["", "## Protocol", "", *render_protocol(meta, datasets)]
    lines += ["", "## Budget notes", ""]
    notes = meta.get("budget_notes") or []
    if notes:
        lines += [f"- {str(n).strip()}" for n in notes]
    else:
        lines.append("No budget notes were recorded: the grid was run as configured.")
    for name, ds in datasets.items():
        family = {"k": summary["k"], "holm_p": summary["holm"].get(name)}
        cells = [c for c in stale if _cell_of(str(c.get("cell")), name, list(datasets))]
        lines += ["", *_render_dataset(name, ds, plots.get(name, {}), family=family, stale=cells)]
    return "\n".join(lines).rstrip() + "\n"


def report_summary(datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One entry per dataset for the summary table, with Holm's correction across the datasets whose verdict
    pairs a fine-tuned model with a head: ``{"rows": {name: {...}}, "k", "holm": {name: adjusted p}}``."""
    rows: dict[str, dict[str, Any]] = {}
    for name, ds in datasets.items():
        ok = [r for r in ds.get("rows") or [] if _row_ok(r)]
        if not ok:
            continue
        cmp = compare_chosen(ds)
        primary = None if cmp["probe_kept"] else cmp["paired"]
        rows[name] = {"cmp": cmp, "primary": primary, "budget": budget_flags(ds), "epochs": _epoch_budgets(ds)}
    family = [name for name, r in rows.items() if r["primary"] is not None]
    adjusted = holm_adjust([rows[n]["primary"]["p_value"] for n in family]) if family else []
    holm = dict(zip(family, adjusted))
    for name, r in rows.items():
        r["word"] = verdict_word(r["cmp"], holm.get(name) if len(family) > 1 else None)
    return {"rows": rows, "k": len(family), "holm": holm}


def render_summary(summary: Mapping[str, Any]) -> list[str]:
    """The summary table (one row per dataset) and the follow-up rule, as Markdown lines."""
    k = summary["k"]
    out = [
        "| Dataset | Head chosen on val | Fine-tuning chosen on val | Fine-tuning − head, points [95% CI] | McNemar p "
        f"| Holm p ({k} dataset{'s' if k != 1 else ''}) | Verdict | Budget may have decided it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["rows"].items():
        cmp = r["cmp"]
        ch = cmp["choices"]
        head_cell = _summary_head_cell(cmp)
        tune = cmp["finetune"]
        tune_cell = _DASH
        if tune is not None:
            tune_cell = f"{_cell(tune.get('strategy'))} (val {_fmt_float(tune.get('val_accuracy'))})"
            if cmp["probe_kept"]:
                tune_cell += ": probe kept, no backbone update"
            tune_cell += _close_note(ch.get("finetune"))
        p = r["primary"]
        if p is not None:
            diff = f"{_fmt_points(p['diff'], signed=True)}{_fmt_points_ci(p['ci'])}"
            pval = _fmt_p(p["p_value"]).replace("p = ", "").replace("p ", "")
        elif cmp["probe_kept"] and cmp["trained_paired"] is not None:
            t = cmp["trained_paired"]
            diff = (
                f"— (closest trained run, {_cell(cmp['trained'].get('strategy'))}: "
                f"{_fmt_points(t['diff'], signed=True)}{_fmt_points_ci(t['ci'])}, not chosen on val)"
            )
            pval = _DASH
        else:
            diff, pval = _DASH, _DASH
        holm = summary["holm"].get(name)
        holm_cell = _fmt_p(holm).replace("p = ", "").replace("p ", "") if holm is not None and k > 1 else _DASH
        budget = "yes: " + "; ".join(r["budget"]) if r["budget"] else "no"
        word = _WORDS[r["word"]]
        if cmp["layer_unpaired"] and r["word"] not in ("probe_only", "none"):
            word += " (against the pooled head; the layer probe is not paired)"
        cells = [_cell(name), head_cell, tune_cell, diff, pval, holm_cell, word, _cell(budget)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "Fine-tuning − head is paired over the test images both scored, with an interval computed from the counts that "
        "never disagrees with McNemar's exact test. "
        + (
            f"Holm's correction runs over the {k} datasets whose verdict pairs a fine-tuned model with a head, so the "
            f"family-wise error stays at {ALPHA}; a dataset whose chosen fine-tuning model is a probe has no such verdict. "
            if k > 1
            else "With one paired verdict there is nothing to correct for. "
        )
        + "The verdict word uses the Holm-adjusted p where there is one."
    )
    fired = [name for name, r in summary["rows"].items() if r["budget"]]
    if fired:
        budgets = sorted({int(e) for r in summary["rows"].values() for e in r["epochs"]})
        what = "every grid widened one step past each edge its dataset names"
        if budgets:
            n = _more_epochs(budgets[-1])
            what = f"--epochs {n} (twice the largest epoch budget that was still improving, at least 5 more) and {what}"
        names = ", ".join(_cell(n) for n in fired)
        out.append("")
        out.append(
            f"**Follow-up, one rule for every dataset where the budget may have decided ({names}).** "
            f"Re-run {'them' if len(fired) > 1 else 'it'} with {what}, then read the verdicts again."
        )
    else:
        out.append("")
        out.append(
            "No dataset's verdict depends on the budget by these checks (no run still improving, no choice at a grid edge)."
        )
    return out


def _summary_head_cell(cmp: Mapping[str, Any]) -> str:
    feat, pooled, ch = cmp["features"], cmp["pooled_head"], cmp["choices"]
    if feat is None:
        return _DASH
    text = f"{_cell(feat.get('strategy'))} (val {_fmt_float(feat.get('val_accuracy'))})" + _close_note(ch.get("features"))
    if cmp["layer_unpaired"] and pooled is not None:
        text += f"; not paired (no per-image predictions): the paired test uses {_cell(pooled.get('strategy'))}"
    return text


def _close_note(d: Mapping[str, Any] | None) -> str:
    if not d or not d["close"]:
        return ""
    if d["tied"]:
        how = "val log-loss" if d["decided_by"] == "val log-loss" else "grid order"
        return f", tie on val broken by {how}"
    return ", by 1 val image"


def _epoch_budgets(ds: Mapping[str, Any]) -> list[int]:
    return [
        int(b)
        for r in ds.get("rows") or []
        if _row_ok(r)
        and r.get("family") == FINETUNE
        and _is_num(b := _epoch_budget(r))
        and (_still_improving(r) or _improving_grid_points(r))
    ]


def _fmt_code(code: Any) -> str:
    if not isinstance(code, Mapping) or not code:
        return "not recorded (results from before featx recorded its code version)"
    parts = []
    if code.get("featx_version"):
        parts.append(f"featx {_cell(code['featx_version'])}")
    if code.get("source_sha256"):
        parts.append(f"source sha256 {_cell(str(code['source_sha256'])[:16])}")
    return ", ".join(parts) or _DASH


def _stale_cells(meta: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    cells = meta.get("stale_cells") or []
    return [c if isinstance(c, Mapping) else {"cell": c} for c in cells] if isinstance(cells, list) else []


def _stale_block(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    out = [
        f"> **Warning: {len(cells)} stale cell{'s' if len(cells) != 1 else ''}.** These cells were reused from an older "
        "code/config/data; their numbers are not from this run's settings:",
        ">",
    ]
    for c in cells:
        changed = c.get("changed") or []
        what = f" (changed: {', '.join(_cell(x) for x in changed)})" if changed else ""
        out.append(f"> - `{_cell(c.get('cell'))}`{what}")
    return out


def _cell_of(cell: str, name: str, names: Sequence[str]) -> bool:
    """Whether a bench cell id (``<dataset>-<backbone>-<kind>``) belongs to dataset ``name`` (the longest
    dataset name that prefixes it wins, so "a" does not claim "a-b"'s cells)."""
    owners = [n for n in names if cell == n or cell.startswith(f"{n}-")]
    return bool(owners) and max(owners, key=len) == name


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


def render_protocol(meta: Mapping[str, Any], datasets: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Markdown bullets stating how both families were trained, chosen and charged, from ``meta["protocol"]``;
    with ``datasets``, also what each family searched, which hyper-parameters never moved the val score and
    each family's augmentation, read from the rows themselves (not from hand-written notes)."""
    proto = meta.get("protocol")
    from_rows = _protocol_from_rows(datasets or {})
    if not isinstance(proto, Mapping) or not proto:
        return [
            "No protocol was recorded with these results (they predate featx's protocol record): how the final models "
            "were fitted is unknown. Selection below still uses val accuracy only, where rows have one.",
            *from_rows,
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
        f"with the highest {_cell(sel)} accuracy (ties: the lower {_cell(sel)} log-loss where every tied row records one, "
        "else the first in the grid's order); when the layer-wise probe ran, the features family's choice includes its "
        "layers. A choice decided by one val image or less is said next to the verdict, with what the runner-up would "
        "have given. Test is scored for what was chosen; other rows show their test scores for reference only, and they "
        "choose nothing."
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
    out += from_rows
    out.append(
        f"- **Verdict:** the chosen head and the chosen fine-tuning run are compared on the same test images: accuracy "
        f"difference with a {LEVEL:.0%} interval computed from the counts (the exact conditional interval joined with "
        f"Tango's score interval: no resampling, so no end moves with a seed, and it excludes 0 exactly when McNemar's "
        f"exact test rejects), McNemar's exact test (two-sided, alpha {ALPHA}), Holm's correction across the report's "
        "datasets, and the smallest difference this test set could detect with 80% power. A fine-tuning model that never "
        "updated the backbone (LP-FT's epoch-0 probe, the head strategy) is not counted as fine-tuning. Where a run was "
        "still improving at its last epoch, or a chosen value sits at the edge of its grid (any grid of two values or "
        "more), the verdict says so."
    )
    for key, value in proto.items():
        if key not in _PROTOCOL_KNOWN:
            shown = json.dumps(value, default=str) if isinstance(value, (Mapping, list)) else str(value)
            out.append(f"- {_cell(key)}: {_cell(shown)}")
    return out


def _protocol_from_rows(datasets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Protocol bullets read from the rows of every dataset: configurations searched, hyper-parameters that never
    changed the val score, augmentation per family."""
    out = []
    per_ds = {name: _search_summary(ds) for name, ds in datasets.items()}
    if any(per_ds.values()):
        out.append(f"- **Searched on val (from the rows):** {_merge_search(list(per_ds.values()))}.")
    unchanged = _unchanged_text([_unchanged_counts(ds) for ds in datasets.values()], across=len(datasets) > 1)
    if unchanged:
        out.append(f"- **Hyper-parameters that did not move the val score:** {unchanged}.")
    aug = _augment_text(datasets)
    if aug:
        out.append(f"- **Augmentation (from the rows):** {aug}.")
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
            _fmt_acc_ci(r, dataset_result.get("test_labels")),
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
    words = {
        "head": _cell(head),
        "finetune": _cell(tune),
        "unclear": "neither",
        "probe": "left out: the fine-tuning model is a probe (no backbone update)",
    }
    for p in per:
        ci = f"[{_fmt_points(p['ci'][0], signed=True)}, {_fmt_points(p['ci'][1], signed=True)}]" if p["ci"] else _DASH
        out.append(
            f"| {_shot_label(p['shots'])} | {_fmt_points(p['diff'], signed=True)} | {ci} | {p['basis']} | {words[p['status']]} |"
        )
    return "\n".join(out) + "\n"


def _render_dataset(
    name: str,
    ds: Mapping[str, Any],
    plots: Mapping[str, str],
    *,
    family: Mapping[str, Any] | None = None,
    stale: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
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
    searched = _search_summary(ds)
    if searched:
        facts.append(f"- Searched on val (from the rows): {_merge_search([searched])}")
    unchanged = _unchanged_text([_unchanged_counts(ds)], across=False)
    if unchanged:
        facts.append(f"- Did not move the val score: {unchanged}")
    if stale:
        listed = "; ".join(
            f"`{_cell(c.get('cell'))}`"
            + (f" (changed: {', '.join(_cell(x) for x in c.get('changed') or [])})" if c.get("changed") else "")
            for c in stale
        )
        facts.append(f"- **Stale cells reused here (numbers not from this run's settings):** {listed}")
    lines += [*facts, "", "### Results on the test set", ""]
    rows = ds.get("rows") or []
    if rows:
        lines.append(render_results_table(ds).rstrip())
        lines.append("")
        kinds = {r.get("memory_kind") for r in rows if _row_ok(r)}
        recorded = any(_row_ok(r) and _wilson_of(r, ds.get("test_labels")) is None for r in rows)
        lines.append(
            f"{_CHOSEN_MARK} marks the head (on the pooled features) and the fine-tuning strategy chosen on val accuracy "
            "(ties: the lower val log-loss where recorded, else first in the grid's order); test accuracy chose nothing. "
            "Accuracy is top-1 on the test set with a 95% Wilson score interval computed from the per-image results"
            + (" (rows without per-image results show the interval recorded with them)" if recorded else "")
            + ". Peak memory is the run's own measurement, its kind in brackets"
            + (" (rss: resident memory of the process tree)." if "rss" in kinds else ".")
        )
        if any(_row_ok(r) and r.get("family") == FINETUNE and r.get("best_epoch") is not None for r in rows):
            lines.append(
                f"Epochs: the epoch whose model was kept (chosen on val; 0 = before any update) / epochs run; "
                f'{_IMPROVING_MARK} = still improving when the epoch budget ran out; "probe" = the kept model never updated '
                "the backbone, so that row is a linear probe, not fine-tuning."
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
        lines += ["", _fewshot_caption(fewshot, stats, _all_per_class(ds))]
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

    layer_text = _layerwise_sentence(ds.get("layerwise") or [], ds)
    if layer_text:
        lines += ["", "### Layer-wise probe", "", layer_text]

    lines += ["", "### What the numbers say", "", verdict(dict(ds), family=family)]
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
        ci = [_wilson_of(r) or _ci(r) or (float(r["accuracy"]), float(r["accuracy"])) for r in sel]
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


def _fewshot_regimes(points: Sequence[Mapping[str, Any]]) -> dict[tuple[str, Any], str]:
    """(method, shots) -> "val" (hyper-parameters chosen on val: the full-data grid) or "no-val" (a few-shot
    draw: cross-validation inside the draw or a fixed rule). A point without ``selection`` counts as "val" at
    "all" and "no-val" elsewhere."""
    out: dict[tuple[str, Any], str] = {}
    for p in points:
        s = _norm_shot(p.get("shots"))
        sel = p.get("selection")
        regime = "val" if sel == "val" or (sel is None and s == "all") else "no-val"
        out.setdefault((str(p.get("method")), s), regime)
    return out


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


def _time_sentence(
    head: Mapping[str, Any],
    tune: Mapping[str, Any],
    *,
    head_label: str = "the chosen head",
    tune_label: str = "Fine-tuning",
) -> str:
    t_h, t_t = head.get("wall_seconds"), tune.get("wall_seconds")
    if not (_is_num(t_h) and _is_num(t_t)) or float(t_h) <= 0 or float(t_t) <= 0:
        return ""
    t_h, t_t = float(t_h), float(t_t)
    times = f"{_fmt_seconds(t_t)} vs {_fmt_seconds(t_h)} wall time, the head's including the shared feature extraction"
    if t_t >= t_h:
        return f"{tune_label} took {_fmt_ratio(t_t / t_h)} longer than {head_label} ({times})."
    lower = tune_label[0].lower() + tune_label[1:]
    return f"{head_label[0].upper()}{head_label[1:]} took {_fmt_ratio(t_h / t_t)} longer than {lower} ({times})."


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


def _fmt_acc_ci(r: Mapping[str, Any], labels: Sequence[Any] | None = None) -> str:
    """Accuracy [95% interval]: Wilson's score interval from the row's per-image results when it has them (no seed,
    so the printed ends are fixed), else the interval recorded with the row."""
    if not _is_num(r.get("accuracy")):
        return _DASH
    ci = _wilson_of(r, labels) or _ci(r)
    acc = f"{float(r['accuracy']):.3f}"
    return f"{acc} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else acc


def _wilson_of(r: Mapping[str, Any], labels: Sequence[Any] | None = None) -> tuple[float, float] | None:
    """Wilson's 95% interval of a row's accuracy from its ``test_predictions`` and labels (the row's own, else
    ``labels``); None when they are missing or do not reproduce the row's accuracy."""
    preds = r.get("test_predictions")
    ys = r.get("test_labels") if r.get("test_labels") is not None else labels
    if not isinstance(preds, Sequence) or isinstance(preds, str) or not preds or ys is None or len(ys) != len(preds):
        return None
    k = int(np.sum(np.asarray(preds) == np.asarray(ys)))
    if _is_num(r.get("accuracy")) and abs(k / len(preds) - float(r["accuracy"])) > 1e-9:
        return None
    return wilson_interval(k, len(preds), level=LEVEL)


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


def _val_key(it: Mapping[str, Any]) -> float:
    """Val accuracy rounded so that the same fraction of val images computed twice compares equal."""
    return round(float(it["val_accuracy"]), 12)


def _n_val(r: Mapping[str, Any]) -> int | None:
    if _is_num(r.get("n_val")) and int(r["n_val"]) > 0:
        return int(r["n_val"])
    pos = r.get("val_positions")
    return len(pos) if isinstance(pos, Sequence) and not isinstance(pos, str) and len(pos) else None


def _fine_tune_epochs(r: Mapping[str, Any]) -> int | None:
    """Fine-tuning epochs behind the reported model: ``fine_tune_epochs``, else the chosen ``epochs``, else
    ``best_epoch`` (0 = LP-FT's probe, before any update)."""
    hp = r.get("hyperparameters") if isinstance(r.get("hyperparameters"), Mapping) else {}
    for v in (r.get("fine_tune_epochs"), hp.get("epochs"), r.get("best_epoch")):
        if _is_num(v):
            return int(v)
    return None


def _layer_candidates(ds: Mapping[str, Any], heads: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The layer-wise probes as candidates of the features family. The deepest point is left out when it is
    the logreg head on the pooled features itself (same val and test accuracy): the same model twice."""
    pts = [p for p in _layer_points(ds.get("layerwise") or []) if _is_num(p.get("val_accuracy"))]
    logreg = next((r for r in heads if r.get("strategy") == "logreg"), None)
    out = []
    for i, p in enumerate(pts):
        same = (
            logreg is not None
            and i == len(pts) - 1
            and math.isclose(float(p["val_accuracy"]), float(logreg.get("val_accuracy", math.nan)), abs_tol=1e-12)
            and math.isclose(float(p["accuracy"]), float(logreg.get("accuracy", math.nan)), abs_tol=1e-12)
        )
        if same:
            continue
        layer = p.get("layer", p["depth"])
        out.append({**p, "family": FEATURES, "strategy": f"logreg on {layer}", "_layer": layer})
    return out


def _pairable(head: Mapping[str, Any], tune: Mapping[str, Any], ds: Mapping[str, Any]) -> bool:
    return not isinstance(_paired_inputs(head, tune, ds), str)


def _pair(
    head: Mapping[str, Any], tune: Mapping[str, Any], ds: Mapping[str, Any], *, n_boot: int = 0, seed: int = 0
) -> tuple[dict[str, Any] | None, str | None]:
    """(paired_comparison of tune against head, None) or (None, why not)."""
    inputs = _paired_inputs(head, tune, ds)
    if isinstance(inputs, str):
        return None, inputs
    y, pred_tune, pred_head = inputs
    return paired_comparison(y, pred_tune, pred_head, n_boot=n_boot, seed=seed, level=LEVEL), None


def _head_name(r: Mapping[str, Any] | None) -> str:
    return f"the feature head ({r.get('strategy')})" if r is not None else "the feature head"


def _tune_name(r: Mapping[str, Any] | None) -> str:
    return f"fine-tuning ({r.get('strategy')})" if r is not None else "fine-tuning"


def _observed(r: Mapping[str, Any], t: str, h: str) -> str:
    return f"{t} − {h} = {_fmt_points(r['diff'], signed=True)} points{_fmt_points_ci(r['ci'])}, McNemar {_fmt_p(r['p_value'])}"


def _val_score(it: Mapping[str, Any], n_val: int | None) -> str:
    v = float(it["val_accuracy"])
    return f"{int(round(v * n_val))}/{n_val} val images" if n_val else f"val {v:.3f}"


def _images(k: int) -> str:
    return f"{k} val image{'s' if k != 1 else ''}"


def _probe_words(r: Mapping[str, Any]) -> str:
    refit = " (refit on train + val)" if r.get("final_fit") == "train+val" else ""
    if str(r.get("strategy")) == "head":
        return "never updates the backbone (it trains a linear layer on the frozen features)"
    if str(r.get("strategy")) == "lp-ft" and _fine_tune_epochs(r) == 0:
        return f"kept its epoch-0 model: the linear probe{refit}, with 0 fine-tuning epochs and no backbone update"
    return "kept a model that never updated the backbone (0 fine-tuning epochs)"


def _fmt_choice(r: Mapping[str, Any]) -> str:
    return f"(val {_fmt_float(r.get('val_accuracy'))}, test {_fmt_acc_ci(r)})"


def _chosen_sentence(cmp: Mapping[str, Any], failed_note: str) -> str:
    feat, pooled, tune = cmp["features"], cmp["pooled_head"], cmp["finetune"]
    if feat is not None and feat.get("_layer") is not None:
        dim = f"{feat['dim']}-d, " if feat.get("dim") is not None else ""
        val = _fmt_float(feat.get("val_accuracy"))
        fpart = f"among the features, a logistic-regression probe on {feat['_layer']} ({dim}val {val}, test {_fmt_acc_ci(feat)})"
        if pooled is not None:
            fpart += f", ahead on val of the best head on the pooled features, {pooled.get('strategy')} {_fmt_choice(pooled)};"
    else:
        fpart = f"the feature head {(feat or pooled).get('strategy')} {_fmt_choice(feat or pooled)}"
    tpart = f"fine-tuning {tune.get('strategy')} {_fmt_choice(tune)}"
    if cmp["probe_kept"]:
        tpart += f", which {_probe_words(tune)}"
    return f"Chosen on val: {fpart} and {tpart}{failed_note}."


def _probe_sentences(cmp: Mapping[str, Any]) -> list[str]:
    out = ["No fine-tuning update beat the probe on val: fine-tuning added nothing here at this budget."]
    trained, r, tune, head = cmp["trained"], cmp["trained_paired"], cmp["finetune"], cmp["head"]
    if trained is None:
        out.append("No fine-tuning run updated the backbone, so fine-tuning proper was not measured on this dataset.")
        return out
    n_val = (cmp["choices"].get("finetune") or {}).get("n_val")
    gap = float(tune["val_accuracy"]) - float(trained["val_accuracy"])
    behind = f"{_images(int(round(gap * n_val)))} behind" if n_val else f"{_fmt_points(gap)} points behind"
    text = (
        f"Of the runs that updated the backbone, {trained.get('strategy')} came closest on val (val "
        f"{_fmt_float(trained.get('val_accuracy'))}, {behind} the probe's {_fmt_float(tune.get('val_accuracy'))}; "
        f"test {_fmt_acc_ci(trained)})"
    )
    if r is not None:
        text += f"; paired with {_head_name(head)}: {_observed(r, _tune_name(trained), _head_name(head))}"
    out.append(text + "; val preferred the probe, so this is for reference, not the verdict.")
    return out


def _paired_sentence(cmp: Mapping[str, Any]) -> str:
    head, tune, r = cmp["head"], cmp["finetune"], cmp["paired"]
    h, t = _head_name(head), _tune_name(tune)
    if r is None:
        return (
            f"No paired comparison is possible: {cmp['why']}; test accuracies alone cannot say which is better, "
            "so no verdict is given."
        )
    n, diff, (lo, hi), p, mde = r["n"], r["diff"], r["ci"], r["p_value"], r["mde"]
    if p < ALPHA:  # the interval excludes 0 exactly then (featx.metrics.paired_difference_interval)
        winner, (a, b) = (t, (lo, hi)) if diff > 0 else (h, (-hi, -lo))
        return (
            f"{winner[0].upper()}{winner[1:]} is better by {_fmt_points(diff)} points [{_fmt_points(a)}, {_fmt_points(b)}], "
            f"McNemar {_fmt_p(p)} (paired over n = {n} test images)."
        )
    return (
        f"No difference detectable at this test size (n = {n}): {_observed(r, t, h)}; "
        f"differences under {_fmt_points(mde)} points would go unseen."
    )


def _holm_sentence(cmp: Mapping[str, Any], family: Mapping[str, Any] | None) -> str:
    r = cmp.get("paired")
    if not family or r is None or family.get("holm_p") is None or int(family.get("k") or 0) < 2:
        return ""
    k, adj = int(family["k"]), float(family["holm_p"])
    if r["p_value"] >= ALPHA:
        return ""
    who = "fine-tuning" if r["diff"] > 0 else "the head"
    if adj < ALPHA:
        return f"That holds after Holm's correction across the report's {k} paired verdicts (adjusted {_fmt_p(adj)})."
    return (
        f"Across the report's {k} paired verdicts, Holm's correction gives adjusted {_fmt_p(adj)}: not significant at "
        f"{ALPHA} family-wise, so this is not a clear win for {who} across the report."
    )


def _close_call_sentences(cmp: Mapping[str, Any]) -> list[str]:
    out = []
    now = verdict_word(cmp)
    for fam, label in (("features", "feature-head"), ("finetune", "fine-tuning")):
        d = cmp["choices"].get(fam)
        ru = cmp["runner_ups"].get(fam)
        if not d or not d["close"] or ru is None:
            continue
        chosen, runner, nv = d["chosen"], d["runner_up"], d["n_val"]
        if d["tied"]:
            names = [_name_of(chosen), *(_name_of(t) for t in d["tied"])]
            listed = ", ".join(names[:-1]) + " and " + names[-1]
            how = (
                f"the lower val log-loss chose {_name_of(chosen)}"
                if d["decided_by"] == "val log-loss"
                else f"no val log-loss was recorded to break the tie, so the grid's order chose {_name_of(chosen)}"
            )
            every = "both" if len(names) == 2 else "all"
            text = f"The {label} choice is a tie on val: {listed} {every} scored {_val_score(chosen, nv)}; {how}."
        else:
            level = [_name_of(it) for it in d["ranked"][2:] if _val_key(it) == _val_key(runner)]
            level_names = ", ".join(level[:-1]) + " and " + level[-1] if len(level) > 1 else "".join(level)
            also = f" (with {level_names} level with {_name_of(runner)})" if level else ""
            text = (
                f"The {label} choice was decided by one val image: {_name_of(chosen)} scored {_val_score(chosen, nv)} against "
                f"{_name_of(runner)}'s {_val_score(runner, nv)}{also}."
            )
        row, paired, against = ru["row"], ru["paired"], ru["against"]
        then = f"Had {_name_of(row)} been chosen, its test accuracy is {_fmt_acc_ci(row)}"
        if fam == "finetune" and backbone_updated(row) is False:
            then += f", but it {_probe_words(row)}"
            word = "probe_only"
        elif paired is not None:
            if fam == "features":
                then += f"; {_observed(paired, _tune_name(against), _head_name(row))}"
            else:
                then += f"; {_observed(paired, _tune_name(row), _head_name(against))}"
            word = "no_difference" if paired["p_value"] >= ALPHA else ("finetune" if paired["diff"] > 0 else "head")
        else:
            then += " (it cannot be paired: no per-image test predictions)"
            word = None
        if word is not None:
            then += f'; the verdict on this dataset alone would read "{_WORDS[word]}"'
            then += ", as now" if word == now else ", not as now"
        out += [text, then + "."]
    return out


def _name_of(it: Mapping[str, Any]) -> str:
    return str(it.get("strategy"))


def _epoch_budget(r: Mapping[str, Any]) -> Any:
    return r.get("epochs_budget") or r.get("epochs_run")


def _more_epochs(n: int) -> int:
    """The one follow-up rule for an epoch budget that was still improving: double it, at least 5 more."""
    return max(2 * n, n + 5)


def _grid_entries(r: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The searched points of a row as flat dicts (parameters, val_accuracy, epochs fields), from a head's
    ``sweep``/``curve`` or fine-tuning's ``grid``."""
    entries = r.get("sweep") or r.get("curve") or r.get("grid") or []
    out = []
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


def _searched_params(r: Mapping[str, Any]) -> list[str]:
    """The hyper-parameters a row's grid searched: keys of its chosen ``hyperparameters`` that take numeric
    values in the grid (derived ones such as the RBF SVM's gamma left out), in the chosen dict's order."""
    hp = r.get("hyperparameters") if isinstance(r.get("hyperparameters"), Mapping) else {}
    entries = _grid_entries(r)
    derived = _derived_params()
    keys = [k for k in hp if k != "epochs" and derived.get(k) not in hp]
    return [k for k in keys if any(_is_num(e.get(k)) for e in entries)]


def _improving_grid_points(r: Mapping[str, Any]) -> list[dict[str, Any]]:
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


def _describe_points(points: Sequence[Mapping[str, Any]], r: Mapping[str, Any]) -> str:
    """Grid points in few words: only the parameters whose values among ``points`` are not every value searched."""
    entries = _grid_entries(r)
    parts = []
    for k in _searched_params(r):
        every = sorted({float(e[k]) for e in entries if _is_num(e.get(k))})
        vals = sorted({float(p[k]) for p in points if _is_num(p.get(k))})
        if len(every) > 1 and vals and vals != every:
            parts.append(f"{k}={' or '.join(_fmt_hvalue(v) for v in vals)}")
    return ", ".join(parts) if parts else "every grid point"


def _beyond_edge(r: Mapping[str, Any], k: str, side: str) -> float | int | None:
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


def _probe_methods(ds: Mapping[str, Any]) -> list[str]:
    """Few-shot method names (``finetune:<strategy>``) whose full-data row never updated the backbone."""
    return [
        f"{FINETUNE}:{r.get('strategy')}"
        for r in ds.get("rows") or []
        if _row_ok(r) and r.get("family") == FINETUNE and backbone_updated(r) is False
    ]


def _all_per_class(ds: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the "all" point of the few-shot curve trained on: ``{"n_fit", "per_class", "final_fit"}``."""
    n_classes = len(ds.get("classes") or [])
    pts = [p for p in ds.get("fewshot") or [] if _norm_shot(p.get("shots")) == "all" and _is_num(p.get("n_fit"))]
    n_fit = max((int(p["n_fit"]) for p in pts), default=None)
    if n_fit is None and _is_num(ds.get("n_fit")):
        n_fit = int(ds["n_fit"])
    if n_fit is None:
        n_fit = max((int(r["n_fit"]) for r in ds.get("rows") or [] if _row_ok(r) and _is_num(r.get("n_fit"))), default=None)
    if n_fit is None or n_classes < 1:
        return None
    fits = {str(r.get("final_fit")) for r in ds.get("rows") or [] if _row_ok(r) and r.get("final_fit")}
    final_fit = ds.get("final_fit") or (fits.pop() if len(fits) == 1 else None)
    return {"n_fit": n_fit, "per_class": n_fit / n_classes, "final_fit": final_fit}


def _search_summary(ds: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What each row searched on val, from its own grid: configurations, values per hyper-parameter, epochs."""
    out = []
    for r in ds.get("rows") or []:
        if not _row_ok(r):
            continue
        entries = _grid_entries(r)
        if not entries:
            continue
        params = [(k, len({float(e[k]) for e in entries if _is_num(e.get(k))})) for k in _searched_params(r)]
        epochs = _epoch_budget(r) if r.get("family") == FINETUNE else None
        out.append(
            {
                "family": r.get("family"),
                "strategy": str(r.get("strategy")),
                "n": len(entries),
                "params": params,
                "epochs": int(epochs) if _is_num(epochs) else None,
                "epoch0": r.get("family") == FINETUNE and str(r.get("strategy")) == "lp-ft",
            }
        )
    return out


def _span(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _merge_search(per_dataset: Sequence[Sequence[Mapping[str, Any]]]) -> str:
    """ "heads: logreg 9–13 C values, …; fine-tuning: full 4 (2 lr × 2 weight_decay) × ≤ 3 epochs, …" over datasets."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for entries in per_dataset:
        for e in entries:
            groups.setdefault((str(e["family"]), e["strategy"]), []).append(e)
    parts: dict[str, list[str]] = {}
    for (fam, strategy), es in groups.items():
        names = list(dict.fromkeys(k for e in es for k, _ in e["params"]))
        counts = {k: [c for e in es for kk, c in e["params"] if kk == k] for k in names}
        n = _span([e["n"] for e in es])
        if len(names) == 1:
            text = f"{strategy} {n} {names[0]} value{'s' if n != '1' else ''}"
        elif names:
            text = f"{strategy} {n} ({' × '.join(f'{_span(counts[k])} {k}' for k in names)})"
        else:
            text = f"{strategy} {n} setting{'s' if n != '1' else ''}"
        epochs = [e["epochs"] for e in es if e["epochs"] is not None]
        if epochs:
            text += f" × ≤ {_span(epochs)} epochs" + (" (+ epoch 0, the probe)" if any(e["epoch0"] for e in es) else "")
        parts.setdefault(fam, []).append(text)
    labels = {FEATURES: "heads", FINETUNE: "fine-tuning"}
    return "; ".join(f"{labels.get(f, f)}: {', '.join(t)}" for f, t in sorted(parts.items(), key=lambda x: x[0] != FEATURES))


def _unchanged_counts(ds: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(family, parameter) -> how often varying that parameter alone (the others fixed) left the val accuracy
    exactly unchanged: ``{"unchanged", "total", "probe", "by": {strategy: [unchanged, total]}}``; ``probe`` counts
    the unchanged cases where every run kept LP-FT's epoch-0 probe (where lr and weight decay never act)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in ds.get("rows") or []:
        if not _row_ok(r):
            continue
        entries = [e for e in _grid_entries(r) if _is_num(e.get("val_accuracy"))]
        params = _searched_params(r)
        for k in params:
            others = [p for p in params if p != k]
            groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
            for e in entries:
                groups.setdefault(tuple(e.get(p) for p in others), []).append(e)
            for g in groups.values():
                if len({float(e[k]) for e in g if _is_num(e.get(k))}) < 2:
                    continue
                vals = [float(e["val_accuracy"]) for e in g]
                same = max(vals) - min(vals) <= 1e-12
                rec = out.setdefault((str(r.get("family")), k), {"unchanged": 0, "total": 0, "probe": 0, "by": {}})
                by = rec["by"].setdefault(str(r.get("strategy")), [0, 0])
                rec["total"] += 1
                by[1] += 1
                if same:
                    rec["unchanged"] += 1
                    by[0] += 1
                    rec["probe"] += all(e.get("backbone_updated") is False or e.get("best_epoch") == 0 for e in g)
    return out


def _unchanged_text(counts: Sequence[Mapping[tuple[str, str], Mapping[str, Any]]], *, across: bool) -> str:
    total: dict[tuple[str, str], dict[str, Any]] = {}
    for c in counts:
        for key, rec in c.items():
            t = total.setdefault(key, {"unchanged": 0, "total": 0, "probe": 0, "by": {}})
            for f in ("unchanged", "total", "probe"):
                t[f] += rec[f]
            for s, (u, n) in rec["by"].items():
                b = t["by"].setdefault(s, [0, 0])
                b[0] += u
                b[1] += n
    labels = {FEATURES: "heads", FINETUNE: "fine-tuning"}
    parts = []
    for (fam, k), t in sorted(total.items(), key=lambda x: (x[0][0] != FINETUNE, x[0][1])):
        if not t["unchanged"]:
            continue
        by = ", ".join(f"{s} {u} of {n}" for s, (u, n) in t["by"].items() if n)
        text = f"{labels.get(fam, fam)} {k}: no change in {t['unchanged']} of the {t['total']} comparisons where it alone varied"
        text += f" ({'over all datasets; ' if across else ''}{by}"
        if t["probe"]:
            text += f"; in {t['probe']} of them every run kept LP-FT's epoch-0 probe, where {k} cannot act"
        parts.append(text + ")")
    return "; ".join(parts)


def _fmt_augment_op(op: Any) -> str:
    """One augmentation as recorded: a name, or featx.finetuning's ``{"name", "op", <parameters>}`` record."""
    if not isinstance(op, Mapping):
        return str(op)

    def value(v: Any) -> str:
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(x) for x in v):
            return f"{float(v[0]):.3g}–{float(v[1]):.3g}"
        return f"{float(v):.3g}" if _is_num(v) else str(v)

    params = [f"{k} {value(v)}" for k, v in op.items() if k not in ("name", "op")]
    return str(op.get("name", op.get("op", "?"))) + (f" ({', '.join(params)})" if params else "")


def _augment_text(datasets: Mapping[str, Mapping[str, Any]]) -> str:
    seen: dict[str, list[tuple[str, ...]]] = {}
    for ds in datasets.values():
        for r in ds.get("rows") or []:
            if _row_ok(r) and r.get("family") == FINETUNE and isinstance(r.get("augment"), (list, tuple)):
                aug = tuple(_fmt_augment_op(a) for a in r["augment"])
                if aug not in seen.setdefault(str(r.get("strategy")), []):
                    seen[str(r.get("strategy"))].append(aug)
    if not seen:
        return ""

    def words(augs: list[tuple[str, ...]]) -> str:
        return " or ".join(", ".join(a) if a else "none" for a in augs)

    variants = {words(v) for v in seen.values()}
    if len(variants) == 1:
        tune = f"fine-tuning ({', '.join(seen)}): {variants.pop()}"
    else:
        tune = "fine-tuning: " + "; ".join(f"{s} {words(v)}" for s, v in seen.items())
    return "heads: none — features of the centre crop (the weights' own preprocessing); " + tune


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
    # bare positions (bench rows) index the test rows' source split; [split, position] pairs name theirs
    source = (ds.get("position_sources") or {}).get("test", "test")
    try:
        recorded = {fam: RowSelection.from_record(v, source) for fam, v in pos.items()}
    except ValueError:
        return "test positions are not dataset positions, so it cannot be checked that both scored the same images"
    keys_h, keys_t = ([(r.split, p) for p in r.positions] for r in (recorded["head"], recorded["finetune"]))
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
            if k not in _NOT_PARAMS and not str(k).endswith("seconds") and _is_num(v):
                values.setdefault(k, set()).add(float(v))
    return {k: sorted(v) for k, v in values.items()}


def _derived_params() -> dict[str, str]:
    """Hyper-parameters computed from another one that the grid searches (rbf-svm: gamma = gamma_scale / (n_features
    * the features' variance)), from the head-kind registry. Imported here, not at the top: featx.heads is torch-free
    but heavier than this module needs for anything else, and rows do not name their derived parameters."""
    from featx.heads.kinds import derived_params

    return derived_params()


# Fields of a grid point that are results or bookkeeping, not searched hyper-parameters.
_NOT_PARAMS = ("val_accuracy", "val_log_loss", "best_epoch", "epochs", "epochs_run", "seconds", "fine_tune_epochs")


def _grid_edges(r: Mapping[str, Any]) -> list[tuple[str, Any, str]] | None:
    """None when the chosen hyper-parameters are inside their grid (or nothing says otherwise); else the
    (parameter, value, "smallest"|"largest") edges hit, [] when the row only says "at an edge".

    Heads carry ``at_grid_edge`` (featx.heads knows their natural bounds, e.g. k = 1 for k-NN); for fine-tuning
    it is worked out from ``grid`` for every parameter searched over two values or more (with two, every choice
    is an edge: that is worth saying, as the grid then says nothing about what lies beyond it), except a smallest
    value of 0 or less, which cannot be widened (no weight decay): :func:`featx.heads.grid_edges`, the one
    definition.
    """
    from featx.heads.kinds import grid_edges

    hp = r.get("hyperparameters") if isinstance(r.get("hyperparameters"), Mapping) else {}
    edges = grid_edges(_grid_values(r), hp, derived=_derived_params())
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


def _fewshot_caption(
    points: Sequence[Mapping[str, Any]],
    stats: Mapping[str, Mapping[Any, Mapping[str, float]]],
    all_info: Mapping[str, Any] | None = None,
) -> str:
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
        if all_info:
            fit = (
                "train + val"
                if all_info.get("final_fit") == "train+val"
                else (all_info.get("final_fit") or "the full training set")
            )
            text += (
                f' "all" is the full-data grid above: its models trained on {fit} ({all_info["n_fit"]} images, about '
                f"{all_info['per_class']:.0f} per class) with hyper-parameters chosen on val, while the few-shot draws saw no "
                'val labels; the plot places "all" at that count and marks the change of regime with a dotted segment.'
            )
        else:
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
    text += f" {_IMPROVING_MARK}" if _still_improving(r) else ""
    return text + (" probe" if r.get("family") == FINETUNE and backbone_updated(r) is False else "")


def _layerwise_sentence(points: Sequence[Mapping[str, Any]], ds: Mapping[str, Any] | None = None) -> str:
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
    text += " That is the deepest layer tapped." if chosen is deepest else f" The deepest layer tapped is {describe(deepest)}."
    if ds is not None:
        feat = (family_choices(ds).get("features") or {}).get("chosen")
        if feat is not None and feat.get("_layer") is not None:
            paired = isinstance(feat.get("test_predictions"), Sequence) and bool(feat.get("test_predictions"))
            text += (
                f" It is ahead on val of every head on the pooled features, so it is the features family's choice in the "
                f"verdict below{'' if paired else ' (unpaired: the layer points carry no per-image test predictions)'}."
            )
    return text
