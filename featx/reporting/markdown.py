"""``report.md``: the header, the summary table, the protocol, and per dataset its facts, results table, plots, few-shot
tables and the verdict's sentences. Text only: every number comes from the records, every conclusion from
:mod:`.verdict`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from featx.errors import UsageError
from featx.records import FEATURES, FINETUNE, BenchMeta, BenchResults, DatasetResult, FewshotPoint, LayerPoint, ResultRow

from ._format import (
    _CHOSEN_MARK,
    _DASH,
    _IMPROVING_MARK,
    _SHARED_MARK,
    ALPHA,
    LEVEL,
    _cell,
    _fmt_acc_ci,
    _fmt_float,
    _fmt_hparams,
    _fmt_hvalue,
    _fmt_p,
    _fmt_params,
    _fmt_points,
    _fmt_points_ci,
    _fmt_seconds,
    _is_finetune_method,
    _is_num,
    _norm_shot,
    _sentence,
    _shot_key,
    _shot_label,
    _truncate,
    _wilson_of,
)
from .budget import _epoch_budget, _more_epochs, _still_improving
from .fewshot import _all_per_class, _fewshot_stats, _method_order, fewshot_crossing
from .grid import _grid_edges, _grid_entries, _searched_params
from .selection import LayerRow, _layer_points, _row_ok, backbone_updated, family_choices, select_on_val
from .verdict import _WORDS, report_summary, verdict


def _read_results(results: BenchResults | Mapping[str, Any]) -> BenchResults:
    """The typed results, read once at the entry: a :class:`BenchResults` as is, a dict (``results.json``'s
    shape, any schema up to the current one) through :meth:`BenchResults.from_dict`."""
    if isinstance(results, BenchResults):
        return results
    if not isinstance(results, Mapping) or not isinstance(results.get("datasets"), Mapping):
        got = type(results).__name__ if not isinstance(results, Mapping) else f"keys {sorted(results)}"
        raise UsageError(f"The 'results' parameter of write_report must be a dict with a 'datasets' mapping. Got {got} instead.")
    return BenchResults.from_dict(dict(results))


def render_report(results: BenchResults | Mapping[str, Any], plots: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The whole ``report.md`` as a string; ``plots`` maps dataset -> plot kind -> relative file name."""
    res = _read_results(results)
    datasets, meta = res.datasets, res.meta
    plots = plots or {}
    lines = ["# featx benchmark report", ""]
    lines += ["| | |", "|---|---|"]
    lines.append(f"| featx version | {_cell('unknown' if meta.featx_version is None else meta.featx_version)} |")
    lines.append(f"| code | {_fmt_code(meta.code)} |")
    lines.append(f"| created | {_cell('unknown' if meta.created_at is None else meta.created_at)} |")
    lines.append(f"| machine | {_cell('unknown' if meta.machine is None else meta.machine)} |")
    if meta.quick is not None:
        lines.append(f"| mode | {'quick (reduced grid)' if meta.quick else 'full'} |")
    command = ("" if meta.command is None else str(meta.command)).replace("`", "'")
    lines.append(f"| command | `{_cell(command)}` |" if command else "| command | unknown |")
    stale = _stale_cells(meta)
    if stale:
        lines += ["", *_stale_block(stale)]
    summary = report_summary(datasets)
    if summary["rows"]:
        lines += ["", "## Summary", "", *render_summary(summary)]
    lines += ["", "## Protocol", "", *render_protocol(meta, datasets)]
    lines += ["", "## Budget notes", ""]
    if meta.budget_notes:
        lines += [f"- {str(n).strip()}" for n in meta.budget_notes]
    else:
        lines.append("No budget notes were recorded: the grid was run as configured.")
    for name, ds in datasets.items():
        family = {"k": summary["k"], "holm_p": summary["holm"].get(name)}
        cells = [c for c in stale if _cell_of(str(c.get("cell")), name, list(datasets))]
        lines += ["", *_render_dataset(name, ds, plots.get(name, {}), family=family, stale=cells)]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- summary


def render_summary(summary: Mapping[str, Any]) -> list[str]:
    """The summary table (one row per dataset, from :func:`~featx.reporting.verdict.report_summary`) and the
    follow-up rule, as Markdown lines."""
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
            tune_cell = f"{_cell(tune.strategy)} (val {_fmt_float(tune.val_accuracy)})"
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
                f"— (closest trained run, {_cell(cmp['trained'].strategy)}: "
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
    text = f"{_cell(feat.strategy)} (val {_fmt_float(feat.val_accuracy)})" + _close_note(ch.get("features"))
    if cmp["layer_unpaired"] and pooled is not None:
        text += f"; not paired (no per-image predictions): the paired test uses {_cell(pooled.strategy)}"
    return text


def _close_note(d: Mapping[str, Any] | None) -> str:
    if not d or not d["close"]:
        return ""
    if d["tied"]:
        how = "val log-loss" if d["decided_by"] == "val log-loss" else "grid order"
        return f", tie on val broken by {how}"
    return ", by 1 val image"


# ---------------------------------------------------------------------------------------------- header: code, stale cells


def _fmt_code(code: Any) -> str:
    if not isinstance(code, Mapping) or not code:
        return "not recorded (results from before featx recorded its code version)"
    parts = []
    if code.get("featx_version"):
        parts.append(f"featx {_cell(code['featx_version'])}")
    if code.get("source_sha256"):
        parts.append(f"source sha256 {_cell(str(code['source_sha256'])[:16])}")
    return ", ".join(parts) or _DASH


def _stale_cells(meta: BenchMeta) -> list[Mapping[str, Any]]:
    cells = meta.stale_cells
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


# ---------------------------------------------------------------------------------------------- protocol

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


def render_protocol(
    meta: BenchMeta | Mapping[str, Any], datasets: Mapping[str, DatasetResult | Mapping[str, Any]] | None = None
) -> list[str]:
    """Markdown bullets stating how both families were trained, chosen and charged, from ``meta["protocol"]``;
    with ``datasets``, also what each family searched, which hyper-parameters never moved the val score and
    each family's augmentation, read from the rows themselves (not from hand-written notes)."""
    proto = BenchMeta.from_dict(meta, where="meta").protocol
    from_rows = _protocol_from_rows({name: DatasetResult.from_dict(ds) for name, ds in (datasets or {}).items()})
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


def _protocol_from_rows(datasets: Mapping[str, DatasetResult]) -> list[str]:
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


# ---------------------------------------------------------------------------------------------- what the rows searched


def _search_summary(ds: DatasetResult) -> list[dict[str, Any]]:
    """What each row searched on val, from its own grid: configurations, values per hyper-parameter, epochs."""
    out = []
    for r in ds.rows:
        if not _row_ok(r):
            continue
        entries = _grid_entries(r)
        if not entries:
            continue
        params = [(k, len({float(e[k]) for e in entries if _is_num(e.get(k))})) for k in _searched_params(r)]
        epochs = _epoch_budget(r) if r.family == FINETUNE else None
        out.append(
            {
                "family": r.family,
                "strategy": str(r.strategy),
                "n": len(entries),
                "params": params,
                "epochs": int(epochs) if _is_num(epochs) else None,
                "epoch0": r.family == FINETUNE and str(r.strategy) == "lp-ft",
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


def _unchanged_counts(ds: DatasetResult) -> dict[tuple[str, str], dict[str, Any]]:
    """(family, parameter) -> how often varying that parameter alone (the others fixed) left the val accuracy
    exactly unchanged: ``{"unchanged", "total", "probe", "by": {strategy: [unchanged, total]}}``; ``probe`` counts
    the unchanged cases where every run kept LP-FT's epoch-0 probe (where lr and weight decay never act)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in ds.rows:
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
                rec = out.setdefault((str(r.family), k), {"unchanged": 0, "total": 0, "probe": 0, "by": {}})
                by = rec["by"].setdefault(str(r.strategy), [0, 0])
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


def _augment_text(datasets: Mapping[str, DatasetResult]) -> str:
    seen: dict[str, list[tuple[str, ...]]] = {}
    for ds in datasets.values():
        for r in ds.rows:
            if _row_ok(r) and r.family == FINETUNE and isinstance(r.augment, (list, tuple)):
                aug = tuple(_fmt_augment_op(a) for a in r.augment)
                if aug not in seen.setdefault(str(r.strategy), []):
                    seen[str(r.strategy)].append(aug)
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


# ---------------------------------------------------------------------------------------------- tables


def render_results_table(dataset_result: DatasetResult | Mapping[str, Any]) -> str:
    """Markdown table of all strategies: heads, then fine-tuning, each in the grid's order; failed rows last.

    The rows chosen on val are marked; the table is deliberately not sorted by test accuracy. Wall time of a
    head is "total (shared† + fit)": the shared part (scan, model build, extraction) is paid once for all
    heads, as the footnote under the table says. Epochs are "best / run", with ↑ when the run was still
    improving at the end of its budget.
    """
    rows = DatasetResult.from_dict(dataset_result).rows
    ok = [r for r in rows if _row_ok(r)]
    ok = [r for r in ok if r.family == FEATURES] + [r for r in ok if r.family != FEATURES]
    bad = [r for r in rows if not _row_ok(r)]
    chosen = {id(select_on_val(r for r in ok if r.family == fam)) for fam in (FEATURES, FINETUNE)}
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
            _cell(r.family),
            _cell(r.strategy),
            _CHOSEN_MARK if id(r) in chosen else "",
            _fmt_float(r.val_accuracy),
            _fmt_acc_ci(r),
            _fmt_float(r.macro_f1),
            _fmt_nfit(r),
            _fmt_wall(r),
            _fmt_memory(r),
            _fmt_params(r.trainable_params),
            _fmt_epochs(r),
            _fmt_hparams(r.hyperparameters) + (" (grid edge)" if _grid_edges(r) is not None else ""),
        ]
        out.append("| " + " | ".join(cells) + " |")
    for r in bad:
        status = r.status or "no result"
        err = _truncate(str(r.error or "no accuracy recorded"), 200)
        cells = [_cell(r.family), _cell(r.strategy), "", f"**{_cell(status)}**: {_cell(err)}"]
        cells += [_DASH] * (len(header) - len(cells))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render_fewshot_table(points: Sequence[FewshotPoint | Mapping[str, Any]]) -> str:
    """Shots × method table: mean test accuracy over draws ± the half-width of its 95% t-interval, (n draws).

    A single draw is shown without a ± part, which would suggest a measured spread.
    """
    stats = _fewshot_stats([FewshotPoint.from_dict(p) for p in points])
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


def _fmt_nfit(r: ResultRow) -> str:
    if not _is_num(r.n_fit):
        return _DASH
    return f"{int(r.n_fit)} ({_cell(r.final_fit)})" if r.final_fit else f"{int(r.n_fit)}"  # type: ignore[arg-type]


def _fmt_wall(r: ResultRow) -> str:
    """Heads: "total (shared† + fit)", the shared part being everything before the fit (scan, build, extraction)."""
    wall, fit = r.wall_seconds, r.fit_seconds
    if r.family == FEATURES and _is_num(wall) and _is_num(fit):
        shared = max(0.0, float(wall) - float(fit))  # type: ignore[arg-type]
        return f"{_fmt_seconds(wall)} ({_fmt_seconds(shared)}{_SHARED_MARK} + fit {_fmt_seconds(fit)})"
    return _fmt_seconds(wall)


def _fmt_memory(r: ResultRow) -> str:
    mb = r.peak_memory_mb
    if not _is_num(mb):
        return _DASH
    kind = r.memory_kind
    return f"{float(mb):,.0f} MB" + (f" ({_cell(kind)})" if kind else "")  # type: ignore[arg-type]


def _fmt_epochs(r: ResultRow) -> str:
    best, run, budget = r.best_epoch, r.epochs_run, r.epochs_budget
    if not _is_num(best) and not _is_num(run):
        return _DASH
    text = f"{int(best) if _is_num(best) else _DASH} / {int(run) if _is_num(run) else _DASH}"  # type: ignore[arg-type]
    if _is_num(budget) and _is_num(run) and int(budget) != int(run):  # type: ignore[arg-type]
        text += f" (budget {int(budget)})"  # type: ignore[arg-type]
    text += f" {_IMPROVING_MARK}" if _still_improving(r) else ""
    return text + (" probe" if r.family == FINETUNE and backbone_updated(r) is False else "")


# ---------------------------------------------------------------------------------------------- one dataset


def _render_dataset(
    name: str,
    ds: DatasetResult,
    plots: Mapping[str, str],
    *,
    family: Mapping[str, Any] | None = None,
    stale: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    lines = [f"## Dataset: {name}", ""]
    classes = list(ds.classes or [])
    shown = ", ".join(str(c) for c in classes[:10]) + (", …" if len(classes) > 10 else "")
    facts = []
    if ds.backbone:
        facts.append(f"- Backbone: `{ds.backbone}`")
    facts.append(f"- Classes: {len(classes)}" + (f" ({shown})" if classes else ""))
    splits = ds.splits or {}
    if splits:
        facts.append("- Splits: " + "; ".join(f"{k}: {v}" for k, v in splits.items()))
    fit_line = _nfit_fact(ds)
    if fit_line:
        facts.append(fit_line)
    ext = ds.extraction or {}
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
    rows = ds.rows
    if rows:
        lines.append(render_results_table(ds).rstrip())
        lines.append("")
        kinds = {r.memory_kind for r in rows if _row_ok(r)}
        recorded = any(_row_ok(r) and _wilson_of(r) is None for r in rows)
        lines.append(
            f"{_CHOSEN_MARK} marks the head (on the pooled features) and the fine-tuning strategy chosen on val accuracy "
            "(ties: the lower val log-loss where recorded, else first in the grid's order); test accuracy chose nothing. "
            "Accuracy is top-1 on the test set with a 95% Wilson score interval computed from the per-image results"
            + (" (rows without per-image results show the interval recorded with them)" if recorded else "")
            + ". Peak memory is the run's own measurement, its kind in brackets"
            + (" (rss: resident memory of the process tree)." if "rss" in kinds else ".")
        )
        if any(_row_ok(r) and r.family == FINETUNE and r.best_epoch is not None for r in rows):
            lines.append(
                f"Epochs: the epoch whose model was kept (chosen on val; 0 = before any update) / epochs run; "
                f'{_IMPROVING_MARK} = still improving when the epoch budget ran out; "probe" = the kept model never updated '
                "the backbone, so that row is a linear probe, not fine-tuning."
            )
        if any(_row_ok(r) and r.family == FEATURES and r.fit_seconds is not None for r in rows):
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

    fewshot = ds.fewshot
    stats = _fewshot_stats(fewshot)
    if fewshot and stats:
        lines += ["", "### Data efficiency", ""]
        lines.append(render_fewshot_table(fewshot).rstrip())
        lines += ["", _fewshot_caption(fewshot, stats, _all_per_class(ds))]
        for skipped in ds.fewshot_skipped:
            lines.append(f"Not measured: {_cell(skipped)}.")
        rows_ok = [r for r in rows if _row_ok(r)]
        head = select_on_val(r for r in rows_ok if r.family == FEATURES)
        tune = select_on_val(r for r in rows_ok if r.family == FINETUNE)
        crossing = fewshot_crossing(fewshot, head_row=head, finetune_row=tune, rows=rows_ok)
        table = render_crossing_table(crossing)
        if table:
            lines += ["", table.rstrip()]
        lines += ["", f"**Crossing point.** {crossing['text']}"]

    layer_text = _layerwise_sentence(ds.layerwise, ds)
    if layer_text:
        lines += ["", "### Layer-wise probe", "", layer_text]

    lines += ["", "### What the numbers say", "", verdict(ds, family=family)]
    return lines


def _nfit_fact(ds: DatasetResult) -> str | None:
    ok = [r for r in ds.rows if _row_ok(r)]
    parts, values = [], {}
    for fam, label in ((FEATURES, "heads"), (FINETUNE, "fine-tuning")):
        ns = sorted({int(r.n_fit) for r in ok if r.family == fam and _is_num(r.n_fit)})  # type: ignore[arg-type]
        fits = sorted({str(r.final_fit) for r in ok if r.family == fam and r.final_fit})
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


def _fewshot_caption(
    points: Sequence[FewshotPoint],
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
        if p.selection and _norm_shot(p.shots) != "all" and _is_num(p.accuracy):
            fam = "fine-tuning" if _is_finetune_method(str(p.method)) else "heads"
            counts[(fam, str(p.selection))] = counts.get((fam, str(p.selection)), 0) + 1
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


def _layerwise_sentence(points: Sequence[LayerPoint], ds: DatasetResult | None = None) -> str:
    pts = _layer_points(points)
    if not pts:
        return ""
    chosen = select_on_val(pts)
    deepest = pts[-1]

    def describe(p: LayerPoint) -> str:
        dim = f"{p.dim}-d, " if p.dim is not None else ""
        return f"{_cell(p.layer)} ({dim}val {_fmt_float(p.val_accuracy)}, test {_fmt_acc_ci(p)})"

    if chosen is None:
        return (
            "No val accuracy was recorded per layer, so no layer is named best (choosing on test would flatter it); "
            "the plot shows each layer's test accuracy."
        )
    text = f"A logistic-regression probe per layer; the layer chosen on val is {describe(chosen)}."
    text += " That is the deepest layer tapped." if chosen is deepest else f" The deepest layer tapped is {describe(deepest)}."
    if ds is not None:
        d = family_choices(ds)["features"]
        feat = d["chosen"] if d else None
        if isinstance(feat, LayerRow):
            paired = isinstance(feat.test_predictions, Sequence) and bool(feat.test_predictions)
            text += (
                f" It is ahead on val of every head on the pooled features, so it is the features family's choice in the "
                f"verdict below{'' if paired else ' (unpaired: the layer points carry no per-image test predictions)'}."
            )
    return text + _layer_score_text(pts, chosen)


def _layer_score_text(pts: Sequence[LayerPoint], chosen: LayerPoint) -> str:
    """When the points carry transferability scores (featx rank's, on the probe's train rows): a table of each
    layer's score beside its probe accuracies, and what the score would have picked. Nothing for older results."""
    names = sorted({k for p in pts for k in (p.scores or {})}, key=lambda k: (k != "logme", k))
    if not names:
        return ""
    lines = ["", "", "| layer | dim | " + " | ".join(names) + " | probe val | probe test |", "|---" * (len(names) + 4) + "|"]
    for p in pts:
        sc = p.scores or {}
        dim = str(p.dim) if p.dim is not None else _DASH
        row = [_cell(p.layer), dim, *(_fmt_float(sc.get(k)) for k in names), _fmt_float(p.val_accuracy), _fmt_acc_ci(p)]
        lines.append("| " + " | ".join(row) + " |")
    name = names[0]
    scored = [p for p in pts if p.scores and name in p.scores]
    pick = max(scored, key=lambda p: float((p.scores or {})[name]))
    same = (
        " (the same layer)"
        if pick is chosen
        else f"; the layer chosen on val, {_cell(chosen.layer)}, measured {_fmt_acc_ci(chosen)}"
    )
    lines += [
        "",
        f"Scored on the probe's train rows before fitting anything, {name} would have picked {_cell(pick.layer)}: the probe "
        f"measured test {_fmt_acc_ci(pick)} for it{same}.",
    ]
    return "\n".join(lines)
