"""The verdict: the val-chosen fine-tuning run against the val-chosen features model, paired over the same test
images, with Holm's correction across the report's datasets; and the plain sentences that say it, each computed from
the numbers (what was chosen, whether the "fine-tuning" model is a probe, close calls, the budget, wall time, the
few-shot crossing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from featx.metrics import holm_adjust
from featx.records import FEATURES, FINETUNE, DatasetResult, ResultRow

from ._format import (
    ALPHA,
    _fmt_acc_ci,
    _fmt_float,
    _fmt_p,
    _fmt_points,
    _fmt_points_ci,
    _fmt_ratio,
    _fmt_seconds,
    _images,
    _is_num,
)
from .budget import _epoch_budgets, budget_flags, budget_sentences
from .fewshot import fewshot_crossing
from .paired import _pair, _pairable
from .selection import LayerRow, _fine_tune_epochs, _row_ok, _val_key, backbone_updated, family_choices


def compare_chosen(dataset_result: DatasetResult | Mapping[str, Any], *, n_boot: int = 0, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of the val-chosen fine-tuning run (a) against the val-chosen features model (b).

    Returns a dict with ``"head"`` (the features model in the paired test: the chosen layer probe when it
    carries per-image test predictions, else the head chosen on the pooled features), ``"finetune"`` (the chosen
    fine-tuning row) and ``"paired"`` (``featx.metrics.paired_comparison``'s dict, ``diff`` = fine-tuning −
    head, or None with ``"why"`` saying what was missing); and also ``"features"`` (the features family's choice,
    possibly a layer probe, a :class:`~featx.reporting.selection.LayerRow`), ``"pooled_head"``, ``"layer_unpaired"``
    (a layer probe was chosen but cannot be paired), ``"pooled_paired"`` (fine-tuning against the pooled head when
    the layer probe was paired), ``"probe_kept"`` (the chosen fine-tuning model never updated the backbone),
    ``"trained"`` / ``"trained_paired"`` (the closest run that did, and its paired result), ``"runner_ups"`` (family
    -> the runner-up and its paired result, for choices decided by one val image or less) and ``"choices"``
    (:func:`family_choices`). Rows are :class:`featx.records.ResultRow`. Raises ``MismatchError`` when two rows were
    scored on different test images or with different labels.
    """
    ds = DatasetResult.from_dict(dataset_result)
    choices = family_choices(ds)
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
    if isinstance(feat, LayerRow):
        if tune is not None and _pairable(feat, tune, ds):
            out["head"] = feat
            if pooled is not None:
                out["pooled_paired"] = _pair(pooled, tune, ds, **kw)[0]
        else:
            out["layer_unpaired"] = True
    head = out["head"]
    if head is None or tune is None:
        out["why"] = "one family has no row with a val accuracy"
        return out
    out["paired"], out["why"] = _pair(head, tune, ds, **kw)
    if out["probe_kept"] and choices["trained"] is not None:
        trained = choices["trained"]["chosen"]
        out["trained"] = trained
        out["trained_paired"] = _pair(head, trained, ds, **kw)[0]
    compare_tune = out["trained"] if out["probe_kept"] else tune
    for fam, other in (("features", compare_tune), ("finetune", head)):
        d = choices[fam]
        if d is None or not d["close"]:
            continue
        runner = d["runner_up"]
        paired = None
        if other is not None:
            a, b = (other, runner) if fam == "features" else (runner, other)
            if _pairable(b, a, ds):
                paired = _pair(b, a, ds, **kw)[0]
        out["runner_ups"][fam] = {"row": runner, "paired": paired, "against": other}
    return out


def verdict(dataset_result: DatasetResult | Mapping[str, Any], *, family: Mapping[str, Any] | None = None) -> str:
    """Plain sentences for one dataset, each computed from the numbers.

    Names what was chosen on val in each family, compares the two paired on the same test images
    (``compare_chosen``), says when a chosen "fine-tuning" model is in fact a probe, when a choice was decided
    by one val image or less (with what the runner-up would have given), and when the compute budget may decide
    the outcome (``budget_sentences``); compares wall time, and states the few-shot crossing point with its
    uncertainty over draws. ``family`` (``{"k", "holm_p"}``, from the report) adds Holm's correction across the
    report's datasets.
    """
    ds = DatasetResult.from_dict(dataset_result)
    ok = [r for r in ds.rows if _row_ok(r)]
    failed = [r for r in ds.rows if not _row_ok(r)]
    failed_note = ""
    if failed:
        names = ", ".join(f"{r.family}/{r.strategy}" for r in failed)
        failed_note = f" ({names} failed and {'is' if len(failed) == 1 else 'are'} left out)"
    families = {
        FEATURES: [r for r in ok if r.family == FEATURES],
        FINETUNE: [r for r in ok if r.family == FINETUNE],
    }
    cmp = compare_chosen(ds)
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
                f"Only {what} produced results here; the one chosen on val is {only.strategy} "
                f"(val {_fmt_float(only.val_accuracy)}, test {_fmt_acc_ci(only)}){failed_note}."
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
    budget = budget_sentences(ds)
    if budget and word not in ("finetune", "none"):
        sentences.append("The budget may have decided this verdict, for these reasons.")
    sentences += budget
    if head is not None and tune is not None:
        timed = head if _is_num(head.wall_seconds) else cmp["pooled_head"] or head
        ratio = _time_sentence(
            timed,
            tune,
            head_label="the chosen head" if timed is cmp["features"] else f"the pooled head {timed.strategy}",
            tune_label=(
                f"The fine-tuning run ({tune.strategy}, which ended with its probe)" if cmp["probe_kept"] else "Fine-tuning"
            ),
        )
        if ratio:
            sentences.append(ratio)
    if ds.fewshot:
        sentences.append(fewshot_crossing(ds.fewshot, head_row=cmp["pooled_head"], finetune_row=tune, rows=ok)["text"])
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


def report_summary(datasets: Mapping[str, DatasetResult | Mapping[str, Any]]) -> dict[str, Any]:
    """One entry per dataset for the summary table, with Holm's correction across the datasets whose verdict
    pairs a fine-tuned model with a head: ``{"rows": {name: {...}}, "k", "holm": {name: adjusted p}}``."""
    rows: dict[str, dict[str, Any]] = {}
    for name, entry in datasets.items():
        ds = DatasetResult.from_dict(entry)
        if not any(_row_ok(r) for r in ds.rows):
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


# ---------------------------------------------------------------------------------------------- sentence builders


def _head_name(r: ResultRow | None) -> str:
    return f"the feature head ({r.strategy})" if r is not None else "the feature head"


def _tune_name(r: ResultRow | None) -> str:
    return f"fine-tuning ({r.strategy})" if r is not None else "fine-tuning"


def _name_of(it: ResultRow) -> str:
    return str(it.strategy)


def _observed(r: Mapping[str, Any], t: str, h: str) -> str:
    return f"{t} − {h} = {_fmt_points(r['diff'], signed=True)} points{_fmt_points_ci(r['ci'])}, McNemar {_fmt_p(r['p_value'])}"


def _val_score(it: ResultRow, n_val: int | None) -> str:
    v = float(it.val_accuracy)  # type: ignore[arg-type]
    return f"{int(round(v * n_val))}/{n_val} val images" if n_val else f"val {v:.3f}"


def _probe_words(r: ResultRow) -> str:
    refit = " (refit on train + val)" if r.final_fit == "train+val" else ""
    if str(r.strategy) == "head":
        return "never updates the backbone (it trains a linear layer on the frozen features)"
    if str(r.strategy) == "lp-ft" and _fine_tune_epochs(r) == 0:
        return f"kept its epoch-0 model: the linear probe{refit}, with 0 fine-tuning epochs and no backbone update"
    return "kept a model that never updated the backbone (0 fine-tuning epochs)"


def _fmt_choice(r: ResultRow) -> str:
    return f"(val {_fmt_float(r.val_accuracy)}, test {_fmt_acc_ci(r)})"


def _chosen_sentence(cmp: Mapping[str, Any], failed_note: str) -> str:
    feat, pooled, tune = cmp["features"], cmp["pooled_head"], cmp["finetune"]
    if isinstance(feat, LayerRow):
        dim = f"{feat.dim}-d, " if feat.dim is not None else ""
        val = _fmt_float(feat.val_accuracy)
        fpart = f"among the features, a logistic-regression probe on {feat.layer} ({dim}val {val}, test {_fmt_acc_ci(feat)})"
        if pooled is not None:
            fpart += f", ahead on val of the best head on the pooled features, {pooled.strategy} {_fmt_choice(pooled)};"
    else:
        fpart = f"the feature head {(feat or pooled).strategy} {_fmt_choice(feat or pooled)}"
    tpart = f"fine-tuning {tune.strategy} {_fmt_choice(tune)}"
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
    gap = float(tune.val_accuracy) - float(trained.val_accuracy)
    behind = f"{_images(int(round(gap * n_val)))} behind" if n_val else f"{_fmt_points(gap)} points behind"
    text = (
        f"Of the runs that updated the backbone, {trained.strategy} came closest on val (val "
        f"{_fmt_float(trained.val_accuracy)}, {behind} the probe's {_fmt_float(tune.val_accuracy)}; "
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


def _time_sentence(
    head: ResultRow,
    tune: ResultRow,
    *,
    head_label: str = "the chosen head",
    tune_label: str = "Fine-tuning",
) -> str:
    t_h, t_t = head.wall_seconds, tune.wall_seconds
    if not (_is_num(t_h) and _is_num(t_t)) or float(t_h) <= 0 or float(t_t) <= 0:  # type: ignore[arg-type]
        return ""
    t_h, t_t = float(t_h), float(t_t)  # type: ignore[arg-type]
    times = f"{_fmt_seconds(t_t)} vs {_fmt_seconds(t_h)} wall time, the head's including the shared feature extraction"
    if t_t >= t_h:
        return f"{tune_label} took {_fmt_ratio(t_t / t_h)} longer than {head_label} ({times})."
    lower = tune_label[0].lower() + tune_label[1:]
    return f"{head_label[0].upper()}{head_label[1:]} took {_fmt_ratio(t_h / t_t)} longer than {lower} ({times})."
