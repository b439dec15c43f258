"""Issue 21, the report side: every sentence of the verdict true as written.

Small generated rows (predictions, positions, labels, grids) exercise each rule: a fine-tuning row that is a
probe, val ties broken by log-loss and choices decided by one val image, grid edges of two-point grids, Holm's
correction and the summary table, seed-free intervals, the layer choice, the few-shot "all" point, provenance;
and the acceptance rule that a CPU budget never turns a fine-tuning win into a bare "no difference".
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featx.metrics import holm_adjust, paired_comparison, wilson_interval
from featx.reporting import (
    backbone_updated,
    budget_flags,
    budget_sentences,
    choice_detail,
    compare_chosen,
    family_choices,
    fewshot_crossing,
    plot_fewshot,
    render_protocol,
    render_report,
    render_results_table,
    report_summary,
    select_on_val,
    selections,
    verdict,
    verdict_word,
)
from featx.reporting.fewshot import _all_tick, _fewshot_regimes

K = 2  # classes


def _labels(n: int) -> list[int]:
    return [i % K for i in range(n)]


def _preds(y: list[int], wrong: Any) -> list[int]:
    bad = set(wrong)
    return [(v + 1) % K if i in bad else v for i, v in enumerate(y)]


def _scored(y: list[int], wrong: Any) -> dict[str, Any]:
    preds = _preds(y, wrong)
    k = sum(int(a == b) for a, b in zip(preds, y))
    return {
        "accuracy": k / len(y),
        "accuracy_ci95": list(wilson_interval(k, len(y))),
        "test_labels": list(y),
        "test_predictions": preds,
        "test_positions": list(range(len(y))),
    }


def _signed(x: float) -> str:
    """A fraction as the report prints signed points: +4.1 / −4.1."""
    v = 100 * x
    return "0.0" if round(v, 1) == 0 else (f"+{v:.1f}" if v > 0 else f"−{abs(v):.1f}")


def _head(strategy: str, val: float, y: list[int], wrong: Any, **extra: Any) -> dict[str, Any]:
    return {
        "family": "features",
        "strategy": strategy,
        "val_accuracy": val,
        **_scored(y, wrong),
        "wall_seconds": 12.0,
        "fit_seconds": 1.0,
        "final_fit": "train+val",
        "n_fit": 100,
        "at_grid_edge": False,
        "hyperparameters": {"C": 0.1},
        **extra,
    }


GRID_2x2 = [(lr, wd) for lr in (0.001, 0.003) for wd in (0.0, 0.05)]


def _grid(vals: dict[tuple[float, float], float], best: int = 2, run: int = 3, improving: bool = False) -> list[dict]:
    return [
        {
            "lr": lr,
            "weight_decay": wd,
            "val_accuracy": vals.get((lr, wd), 0.5),
            "best_epoch": best,
            "epochs_run": run,
            "still_improving": improving,
        }
        for lr, wd in GRID_2x2
    ]


def _tune(strategy: str, val: float, y: list[int], wrong: Any, *, lr: float = 0.001, wd: float = 0.0, epochs: int = 2, **extra):
    row = {
        "family": "finetune",
        "strategy": strategy,
        "val_accuracy": val,
        **_scored(y, wrong),
        "wall_seconds": 150.0,
        "final_fit": "train+val",
        "n_fit": 100,
        "best_epoch": epochs,
        "epochs_run": 3,
        "epochs_budget": 3,
        "still_improving": False,
        "hyperparameters": {"epochs": epochs, "lr": lr, "optimizer": "adamw", "weight_decay": wd},
        "grid": _grid({(lr, wd): val}),
    }
    row.update(extra)
    return row


def _probe_lpft(val: float, y: list[int], wrong: Any, **extra: Any) -> dict[str, Any]:
    """LP-FT that kept epoch 0 at every grid point: its final model is the probe refit on train + val."""
    return _tune(
        "lp-ft",
        val,
        y,
        wrong,
        epochs=0,
        epochs_run=2,
        grid=[{**g, "val_accuracy": val, "best_epoch": 0, "epochs_run": 2} for g in _grid({})],
        **extra,
    )


# ---------------------------------------------------------------------------------------------- 1. a probe is not fine-tuning


def _probe_dataset() -> dict[str, Any]:
    y = _labels(300)
    return {
        "classes": ["a", "b"],
        "rows": [
            _head("logreg", 0.90, y, range(0, 30)),
            # LP-FT's epoch-0 probe: exactly the logreg head's predictions
            _probe_lpft(0.92, y, range(0, 30)),
            # full fine-tuning updated the backbone, lost on val at this budget and was still improving
            _tune("full", 0.85, y, range(0, 12), lr=0.003, epochs=3, best_epoch=3, still_improving=True),
        ],
    }


def test_chosen_probe_is_named_a_probe_and_fine_tuning_added_nothing() -> None:
    ds = _probe_dataset()
    cmp = compare_chosen(ds)
    assert cmp["finetune"].strategy == "lp-ft" and cmp["probe_kept"]
    assert verdict_word(cmp) == "probe_only"
    text = verdict(ds)
    assert "fine-tuning lp-ft (val 0.920, test 0.900 [" in text
    assert "which kept its epoch-0 model: the linear probe (refit on train + val), with 0 fine-tuning epochs" in text
    assert "No fine-tuning update beat the probe on val: fine-tuning added nothing here at this budget." in text
    # the probe is never compared with the head as if it were fine-tuning
    assert "Fine-tuning (lp-ft) is better" not in text and "fine-tuning (lp-ft) − the feature head" not in text
    assert "No difference detectable" not in text
    # the run that did train and came closest, with its paired result, for reference
    r = paired_comparison(
        np.array(ds["rows"][0]["test_labels"]), ds["rows"][2]["test_predictions"], ds["rows"][0]["test_predictions"]
    )
    assert "Of the runs that updated the backbone, full came closest on val (val 0.850" in text
    assert f"fine-tuning (full) − the feature head (logreg) = {_signed(r['diff'])} points" in text
    assert "val preferred the probe, so this is for reference, not the verdict" in text
    # it was still improving: the budget caveat comes with the verdict
    assert "The budget may have decided this verdict" in text and "--epochs 8" in text
    assert "| 0 / 2 (budget 3) probe |" in render_results_table(ds)
    assert "The fine-tuning run (lp-ft, which ended with its probe) took" in text


def test_backbone_updated_flag_wins_and_is_derived_when_missing() -> None:
    y = _labels(20)
    lpft = _probe_lpft(0.9, y, [])
    assert backbone_updated(lpft) is False
    assert backbone_updated({**lpft, "backbone_updated": True}) is True  # the recorded flag wins
    assert backbone_updated({**lpft, "fine_tune_epochs": 2}) is True
    full = _tune("full", 0.9, y, [], epochs=3)
    assert backbone_updated(full) is True
    assert backbone_updated({**full, "backbone_updated": False}) is False
    head_strategy = _tune("head", 0.9, y, [], epochs=3)  # the Keras recipe: a linear layer on the frozen backbone
    assert backbone_updated(head_strategy) is False
    assert backbone_updated({"family": "finetune", "strategy": "full"}) is None  # nothing says
    ds = {"rows": [_head("logreg", 0.8, y, [1]), {**full, "backbone_updated": False, "val_accuracy": 0.95}]}
    assert "kept a model that never updated the backbone (0 fine-tuning epochs)" in verdict(ds)
    assert "No fine-tuning run updated the backbone" in verdict(ds)


# ---------------------------------------------------------------------------------------------- 7. ties and one-image margins


def _tie_dataset(**loss: float) -> dict[str, Any]:
    y = _labels(153)
    n_val = {"n_val": 49}
    return {
        "rows": [
            _head("logreg", 48 / 49, y, range(0, 9), **n_val),
            _head("linear-svm", 48 / 49, y, range(0, 8), **n_val),
            _head("knn", 49 / 49, y, range(0, 10), **n_val),
            _tune("full", 48 / 49, y, range(0, 18), **n_val, **({"val_log_loss": loss["full"]} if "full" in loss else {})),
            _tune("lp-ft", 48 / 49, y, range(0, 10), **n_val, **({"val_log_loss": loss["lpft"]} if "lpft" in loss else {})),
        ]
    }


def test_val_tie_without_log_loss_is_decided_by_grid_order_and_said() -> None:
    ds = _tie_dataset()
    d = family_choices(ds)["finetune"]
    assert d["chosen"].strategy == "full" and d["decided_by"] == "order" and d["close"] and d["margin_images"] == 0
    text = verdict(ds)
    assert (
        "The fine-tuning choice is a tie on val: full and lp-ft both scored 48/49 val images; no val log-loss was recorded "
        "to break the tie, so the grid's order chose full." in text
    )
    lpft = ds["rows"][4]
    knn = ds["rows"][2]
    r = paired_comparison(np.array(knn["test_labels"]), lpft["test_predictions"], knn["test_predictions"])
    assert f"Had lp-ft been chosen, its test accuracy is {lpft['accuracy']:.3f} [" in text
    assert f"fine-tuning (lp-ft) − the feature head (knn) = {_signed(r['diff'])} points" in text


def test_val_tie_is_broken_by_the_lower_val_log_loss() -> None:
    ds = _tie_dataset(full=0.30, lpft=0.25)
    assert select_on_val(r for r in ds["rows"] if r["family"] == "finetune")["strategy"] == "lp-ft"
    assert family_choices(ds)["finetune"]["decided_by"] == "val log-loss"
    assert "the lower val log-loss chose lp-ft" in verdict(ds)
    assert selections(ds)["finetune"] == "lp-ft"
    # a log-loss on only some of the tied rows breaks nothing: the grid's order decides
    partial = _tie_dataset(lpft=0.25)
    assert select_on_val(r for r in partial["rows"] if r["family"] == "finetune")["strategy"] == "full"


def test_choice_by_one_val_image_shows_what_the_runner_up_would_have_given() -> None:
    ds = _tie_dataset()
    d = family_choices(ds)["head"]
    assert d["chosen"].strategy == "knn" and d["margin_images"] == 1 and d["close"] and not d["tied"]
    text = verdict(ds)
    assert (
        "The feature-head choice was decided by one val image: knn scored 49/49 val images against logreg's 48/49 val "
        "images (with linear-svm level with logreg)." in text
    )
    logreg, full = ds["rows"][0], ds["rows"][3]
    r = paired_comparison(np.array(logreg["test_labels"]), full["test_predictions"], logreg["test_predictions"])
    assert f"Had logreg been chosen, its test accuracy is {logreg['accuracy']:.3f} [" in text
    assert f"fine-tuning (full) − the feature head (logreg) = {_signed(r['diff'])} points" in text
    assert 'the verdict on this dataset alone would read "' in text
    # two val images apart is not a close call
    far = copy.deepcopy(ds)
    far["rows"][0]["val_accuracy"] = far["rows"][1]["val_accuracy"] = 47 / 49
    assert not family_choices(far)["head"]["close"] and "decided by one val image" not in verdict(far)


def test_choice_detail_counts_images_from_val_positions() -> None:
    items = [{"strategy": "a", "val_accuracy": 0.5, "val_positions": list(range(10))}, {"strategy": "b", "val_accuracy": 0.4}]
    d = choice_detail(items)
    assert d["n_val"] == 10 and d["margin_images"] == 1 and d["close"]
    assert choice_detail([{"strategy": "a", "val_accuracy": 0.5}, {"strategy": "b", "val_accuracy": 0.4}])["close"] is False


# ---------------------------------------------------------------------------------------------- 3. grid edges, searched


def _edge_dataset() -> dict[str, Any]:
    y = _labels(100)
    full_vals = {(0.001, 0.0): 0.80, (0.001, 0.05): 0.80, (0.003, 0.0): 0.90, (0.003, 0.05): 0.88}
    full_grid = _grid(full_vals)
    for g in full_grid:
        if g["lr"] == 0.001:
            g.update(best_epoch=3, epochs_run=3, still_improving=True)
    lpft_vals = {(0.001, 0.0): 0.85, (0.001, 0.05): 0.85, (0.003, 0.0): 0.83, (0.003, 0.05): 0.83}
    return {
        "rows": [
            _head("logreg", 0.86, y, range(10), sweep=[{"C": c, "val_accuracy": 0.8} for c in (0.01, 0.1, 1.0)]),
            _tune("full", 0.90, y, range(8), lr=0.003, wd=0.0, grid=full_grid),
            _tune("lp-ft", 0.85, y, range(9), lr=0.001, wd=0.05, grid=_grid(lpft_vals)),
        ]
    }


def test_edges_of_two_point_grids_are_flagged_with_the_value_to_add() -> None:
    ds = _edge_dataset()
    sentences = budget_sentences(ds)
    assert (
        "For fine-tuning (full), lr=0.003 is the largest value searched: the best value may lie beyond the grid's edge; "
        "extend the bench config's fine-tuning grid past it (e.g. lr 0.009) and re-run to settle it." in sentences
    )
    # weight decay 0 is the smallest value searched, but there is nothing below it: no edge
    assert not any("weight_decay=0 " in s for s in sentences)
    lpft = next(s for s in sentences if s.startswith("For fine-tuning (lp-ft)"))
    assert "lr=0.001 is the smallest value searched and weight_decay=0.05 is the largest value searched" in lpft
    assert "past them (e.g. lr 0.0003, weight_decay 0.1)" in lpft
    # the chosen full run had stopped improving, but its lr=0.001 grid points were still improving at epoch 3
    assert any(
        s.startswith("Fine-tuning (full) kept a run that had stopped improving, but its grid points at lr=0.001 were still")
        and "--epochs 8" in s
        for s in sentences
    )
    flags = budget_flags(ds)
    assert "grid points still improving: full (lr=0.001)" in flags
    assert "chosen value at a grid edge: full lr, lp-ft lr and weight_decay" in flags
    assert "(grid edge)" in render_results_table(ds).splitlines()[3]  # the full row


def test_protocol_states_what_was_searched_and_what_never_moved_val_from_the_rows() -> None:
    ds = _edge_dataset()
    lines = "\n".join(render_protocol({"protocol": {"final_fit": "train+val"}}, {"x": ds, "y": copy.deepcopy(ds)}))
    assert (
        "**Searched on val (from the rows):** heads: logreg 3 C values; fine-tuning: full 4 (2 lr × 2 weight_decay) × ≤ 3 "
        "epochs, lp-ft 4 (2 lr × 2 weight_decay) × ≤ 3 epochs (+ epoch 0, the probe)." in lines
    )
    # weight decay: full changed val at lr 0.003 only; lp-ft never -> 3 of 4 per dataset, 6 of 8 over both
    assert "fine-tuning weight_decay: no change in 6 of the 8 comparisons where it alone varied (over all datasets;" in lines
    assert "full 2 of 4, lp-ft 4 of 4" in lines
    md = render_report({"meta": {}, "datasets": {"x": ds}})
    assert "- Searched on val (from the rows): heads: logreg 3 C values; fine-tuning: full 4" in md
    assert "- Did not move the val score: fine-tuning weight_decay: no change in 3 of the 4 comparisons" in md


# ---------------------------------------------------------------------------------------------- 9. Holm and the summary table


def _paired_rows(y: list[int], n10: int, n01: int, **tune_extra: Any) -> list[dict[str, Any]]:
    """A head and a full fine-tuning row with n10 images only fine-tuning gets right and n01 only the head."""
    head_wrong = range(0, n10)
    tune_wrong = range(n10, n10 + n01)
    one_point = [{"lr": 0.001, "weight_decay": 0.0, "val_accuracy": 0.85, "best_epoch": 2, "epochs_run": 3}]
    tune = _tune("full", 0.85, y, tune_wrong, lr=0.001, wd=0.0, grid=one_point, **tune_extra)
    return [_head("logreg", 0.80, y, head_wrong), tune]


def _family_results() -> dict[str, Any]:
    y = _labels(200)
    improving = {"best_epoch": 3, "still_improving": True, "epochs": 3}
    return {
        "meta": {"featx_version": "9.9"},
        "datasets": {
            "strong": {"rows": _paired_rows(y, 20, 1, **improving)},
            "weak": {"rows": _paired_rows(y, 8, 1)},  # McNemar p = 0.039 alone
            "none": {"rows": _paired_rows(y, 3, 3)},
            "probe": {"rows": [_head("logreg", 0.80, y, range(5)), {**_probe_lpft(0.9, y, range(5)), "grid": []}]},
        },
    }


def test_holm_across_datasets_and_the_summary_table() -> None:
    results = _family_results()
    summary = report_summary(results["datasets"])
    assert summary["k"] == 3 and "probe" not in summary["holm"]  # a probe has no fine-tuning verdict to correct
    raw = {n: summary["rows"][n]["primary"]["p_value"] for n in ("strong", "weak", "none")}
    adjusted = dict(zip(raw, holm_adjust(list(raw.values()))))
    assert summary["holm"] == pytest.approx(adjusted)
    assert raw["weak"] < 0.05 < adjusted["weak"]
    words = {n: r["word"] for n, r in summary["rows"].items()}
    assert words == {"strong": "finetune", "weak": "finetune_unadjusted", "none": "no_difference", "probe": "probe_only"}
    md = render_report(results)
    assert md.index("## Summary") < md.index("## Protocol")
    table = md.split("## Summary")[1].split("## Protocol")[0]
    header = "| Dataset | Head chosen on val | Fine-tuning chosen on val | Fine-tuning − head, points [95% CI] | McNemar p "
    assert header + "| Holm p (3 datasets) | Verdict | Budget may have decided it |" in table
    weak_line = next(line for line in table.splitlines() if line.startswith("| weak |"))
    assert "| fine-tuning ahead on this dataset alone, not after Holm |" in weak_line
    assert f"| {adjusted['weak']:.3f} |" in weak_line
    probe_line = next(line for line in table.splitlines() if line.startswith("| probe |"))
    assert (
        "lp-ft (val 0.900): probe kept, no backbone update" in probe_line
        and "| fine-tuning added nothing (probe kept) |" in probe_line
    )
    # the dataset section says the same as the summary
    weak = md.split("## Dataset: weak")[1].split("## Dataset:")[0]
    assert f"Holm's correction gives adjusted p = {adjusted['weak']:.3f}: not significant at 0.05 family-wise" in weak
    assert "That holds after Holm's correction" in md.split("## Dataset: strong")[1].split("## Dataset:")[0]


def test_follow_up_is_one_rule_for_every_dataset_whose_budget_sentence_fires() -> None:
    results = _family_results()
    md = render_report(results)
    fired = [n for n, ds in results["datasets"].items() if budget_sentences(ds)]
    assert fired == ["strong"]
    assert "**Follow-up, one rule for every dataset where the budget may have decided (strong).** Re-run it with --epochs 8" in md
    # a grid edge in another dataset: the same follow-up names both, with one epoch count
    results["datasets"]["none"]["rows"][1]["hyperparameters"]["lr"] = 0.003
    results["datasets"]["none"]["rows"][1]["grid"] = _grid({(0.003, 0.0): 0.85})
    md = render_report(results)
    assert "(strong, none).** Re-run them with --epochs 8" in md
    assert md.count("**Follow-up") == 1
    quiet = {"meta": {}, "datasets": {"weak": _family_results()["datasets"]["weak"]}}
    assert "No dataset's verdict depends on the budget by these checks" in render_report(quiet)


# ---------------------------------------------------------------------------------------------- 2. seed-free intervals


def test_verdict_interval_is_the_same_under_every_seed() -> None:
    y = _labels(153)
    ds = {"rows": _paired_rows(y, 4, 12)}  # hymenoptera's 4 vs 12 discordant images
    cis = {tuple(compare_chosen(ds, n_boot=2000, seed=s)["paired"]["ci"]) for s in range(5)}
    assert len(cis) == 1
    lo, hi = cis.pop()
    assert lo < 0 < hi
    text = verdict(ds)
    assert "No difference detectable at this test size (n = 153)" in text and "disagree" not in text
    assert f"[{_signed(lo)}, {_signed(hi)}]" in text


# ---------------------------------------------------------------------------------------------- 8. the layer choice


def _layer_dataset(with_predictions: bool) -> dict[str, Any]:
    y = _labels(360)
    logreg = _head("logreg", 0.899, y, range(0, 29))
    layer4 = {"layer": "blocks.4", "depth": 4, "dim": 112, "val_accuracy": 0.934, **_scored(y, range(0, 10))}
    if not with_predictions:
        for k in ("test_predictions", "test_positions", "test_labels"):
            layer4.pop(k)
    pooled = {"layer": "pooled", "depth": 7, "dim": 1280, "val_accuracy": 0.899, "accuracy": logreg["accuracy"]}
    return {
        "rows": [logreg, _tune("full", 0.85, y, range(0, 22), epochs=3)],
        "layerwise": [{"layer": "blocks.1", "depth": 1, "dim": 24, "val_accuracy": 0.8, "accuracy": 0.82}, layer4, pooled],
    }


def test_layer_probe_chosen_on_val_joins_the_features_family_unpaired() -> None:
    ds = _layer_dataset(with_predictions=False)
    cmp = compare_chosen(ds)
    assert cmp["features"].layer == "blocks.4" and cmp["layer_unpaired"] and cmp["head"].strategy == "logreg"
    assert selections(ds)["head"] == "logreg" and selections(ds)["layer"] == "blocks.4"
    text = verdict(ds)
    assert "Chosen on val: among the features, a logistic-regression probe on blocks.4 (112-d, val 0.934, test 0.972 [" in text
    assert "ahead on val of the best head on the pooled features, logreg (val 0.899" in text
    assert "The layer-wise probe recorded no per-image test predictions, so it cannot be paired with fine-tuning" in text
    assert "fine-tuning (full) − the feature head (logreg)" in text or "Fine-tuning (full) is better" in text
    md = render_report({"meta": {}, "datasets": {"digits": ds}})
    assert "so it is the features family's choice in the verdict below (unpaired" in md
    assert "the layer probe is not paired" in md.split("## Summary")[1].split("## Protocol")[0]


def test_layer_probe_with_predictions_is_paired_and_the_pooled_comparison_shown_beside_it() -> None:
    ds = _layer_dataset(with_predictions=True)
    cmp = compare_chosen(ds)
    assert not cmp["layer_unpaired"] and cmp["head"].strategy == "logreg on blocks.4"
    assert cmp["pooled_paired"] is not None
    text = verdict(ds)
    assert "The feature head (logreg on blocks.4) is better by" in text  # the probe leads: fine-tuning does not win
    assert "Fine-tuning (full) is better" not in text
    assert (
        "Against the feature head (logreg), the head chosen on the pooled features: fine-tuning (full) − the feature head" in text
    )


# ---------------------------------------------------------------------------------------------- 5. the few-shot "all" point


def test_fewshot_all_tick_says_what_it_trained_on_and_regimes_are_not_joined(tmp_path: Path) -> None:
    info = {"n_fit": 129, "per_class": 64.5, "final_fit": "train+val"}
    tick = _all_tick("all", 40.0, info)
    assert tick.startswith("all\n") and "/class" in tick and "train+val" in tick and "val-tuned" in tick
    assert "40" not in tick  # not the capped train count
    pts = [
        {"method": "logreg", "shots": 2, "draw": 0, "accuracy": 0.8, "selection": "cv"},
        {"method": "logreg", "shots": "all", "draw": 0, "accuracy": 0.9, "selection": "val"},
        {"method": "finetune:lp-ft", "shots": 2, "draw": 0, "accuracy": 0.7, "selection": "rule"},
        {"method": "finetune:lp-ft", "shots": "all", "draw": 0, "accuracy": 0.9, "selection": "val"},
    ]
    regimes = _fewshot_regimes(pts)
    assert regimes[("finetune:lp-ft", 2)] == "no-val" and regimes[("finetune:lp-ft", "all")] == "val"
    path = plot_fewshot(
        pts, tmp_path / "f.png", "t", images_per_class_all=40.0, all_per_class=info, probe_at_all=["finetune:lp-ft"]
    )
    assert path.is_file() and path.stat().st_size > 10_000


def test_crossing_leaves_out_an_all_point_that_is_a_probe() -> None:
    ds = _probe_dataset()
    pts = [
        {"method": "logreg", "shots": 2, "draw": d, "accuracy": a, "selection": "cv"} for d, a in enumerate((0.6, 0.62, 0.61))
    ] + [
        {"method": "finetune:lp-ft", "shots": 2, "draw": d, "accuracy": a, "selection": "rule"}
        for d, a in enumerate((0.5, 0.52, 0.5))
    ]
    pts += [
        {"method": "logreg", "shots": "all", "draw": 0, "accuracy": 0.9, "selection": "val"},
        {"method": "finetune:lp-ft", "shots": "all", "draw": 0, "accuracy": 0.9, "selection": "val"},
    ]
    rows = ds["rows"]
    result = fewshot_crossing(pts, head_row=rows[0], finetune_row=rows[1], rows=rows)
    assert result["per_shot"][-1]["status"] == "probe"
    assert result["case"] == "never"  # decided by the 2-shot draws alone, not by the probe at "all"
    assert "within the measured range (2 shots per class)" in result["text"]
    assert (
        "lp-ft's model is its epoch-0 probe (no backbone update), so that point says nothing about fine-tuning" in result["text"]
    )


# ---------------------------------------------------------------------------------------------- provenance


def test_code_version_stale_cells_and_augmentation_are_printed() -> None:
    results = _family_results()
    results["meta"]["code"] = {"featx_version": "0.2.0", "source_sha256": "ab" * 32}
    results["meta"]["stale_cells"] = [{"cell": "weak-efficientnet_lite0-features", "changed": ["code", "config"]}]
    aug = [
        {"name": "random_resized_crop", "op": "RandomResizedCrop", "scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]},
        {"name": "hflip", "op": "RandomHorizontalFlip", "p": 0.5},
    ]
    for ds in results["datasets"].values():
        for r in ds["rows"]:
            if r["family"] == "finetune":
                r["augment"] = aug
    md = render_report(results)
    assert f"| code | featx 0.2.0, source sha256 {'ab' * 8} |" in md
    assert "> **Warning: 1 stale cell.** These cells were reused from an older code/config/data; their numbers are not" in md
    assert "> - `weak-efficientnet_lite0-features` (changed: code, config)" in md
    assert md.index("Warning: 1 stale cell") < md.index("## Summary")
    weak = md.split("## Dataset: weak")[1].split("## Dataset:")[0]
    assert "**Stale cells reused here (numbers not from this run's settings):** `weak-efficientnet_lite0-features`" in weak
    assert "Stale cells reused here" not in md.split("## Dataset: strong")[1].split("## Dataset:")[0]
    assert (
        "**Augmentation (from the rows):** heads: none — features of the centre crop (the weights' own preprocessing); "
        "fine-tuning (full, lp-ft): random_resized_crop (scale 0.35–1, ratio 0.75–1.33), hflip (p 0.5)." in md
    )
    old = render_report({"meta": {}, "datasets": {"weak": _family_results()["datasets"]["weak"]}})
    assert "| code | not recorded" in old and "stale cell" not in old and "Augmentation" not in old


# ---------------------------------------------------------------------------------------------- acceptance


def test_cpu_budget_never_turns_a_fine_tuning_lead_into_a_bare_no_difference() -> None:
    """Full fine-tuning leads a linear probe by several points at a GPU budget; at a CPU budget the report must say
    it wins, or that it was still improving and which budget settles it, never a bare "no difference"."""
    y = _labels(300)
    gpu = {"rows": [_head("logreg", 0.86, y, range(0, 40)), _tune("full", 0.93, y, range(40, 55), epochs=8)]}
    assert "Fine-tuning (full) is better by 8.3 points" in verdict(gpu)
    # CPU: 3 epochs, still improving; full ahead of the head on test by 2 points, not significant
    cpu = {
        "rows": [
            _head("logreg", 0.86, y, range(0, 30)),
            _tune("full", 0.87, y, range(24, 48), epochs=3, best_epoch=3, still_improving=True),
        ]
    }
    text = verdict(cpu)
    assert "No difference detectable" in text
    assert "The budget may have decided this verdict" in text
    assert "Fine-tuning (full) was still improving when its 3 epochs ended" in text and "--epochs 8" in text
    # CPU, and LP-FT's probe won on val: fine-tuning added nothing at this budget, and the caveat still comes
    cpu_probe = {"rows": [*cpu["rows"], _probe_lpft(0.90, y, range(0, 30))]}
    text = verdict(cpu_probe)
    assert "fine-tuning added nothing here at this budget" in text and "--epochs 8" in text
    assert "No difference detectable" not in text and "Fine-tuning (full) is better" not in text


def test_where_the_probe_leads_fine_tuning_never_wins() -> None:
    rng = np.random.default_rng(3)
    for _ in range(12):
        n = int(rng.integers(80, 400))
        y = _labels(n)
        head_wrong = rng.choice(n, size=int(n * rng.uniform(0.02, 0.1)), replace=False)
        tune_wrong = rng.choice(n, size=int(n * rng.uniform(0.12, 0.3)), replace=False)
        improving = bool(rng.integers(0, 2))
        ds = {
            "rows": [
                _head("logreg", float(rng.uniform(0.7, 0.95)), y, head_wrong),
                _tune("full", float(rng.uniform(0.7, 0.95)), y, tune_wrong, epochs=3, best_epoch=3, still_improving=improving),
            ]
        }
        text = verdict(ds)
        assert "Fine-tuning (full) is better" not in text
        if "No difference detectable" in text and improving:
            assert "The budget may have decided this verdict" in text
