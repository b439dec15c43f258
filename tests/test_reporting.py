"""Report rendering: files, JSON round trip, Markdown content, valid PNGs, selection on val only, the paired
verdict, budget sentences, the protocol statement and the few-shot crossing with its uncertainty.

Everything runs on a hand-built results dict shaped like ``featx bench`` output (rows with test predictions,
positions and labels), so no model is needed. Golden files live in ``tests/data/reporting/``; regenerate them
with ``FEATX_UPDATE_GOLDEN=1 pytest``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from scipy.stats import binomtest

from featx.errors import MismatchError, UsageError
from featx.metrics import classification_metrics, paired_comparison
from featx.records import SCHEMA_VERSION
from featx.reporting import (
    budget_sentences,
    compare_chosen,
    fewshot_crossing,
    plot_layerwise,
    render_fewshot_table,
    render_protocol,
    render_report,
    render_results_table,
    select_on_val,
    selections,
    verdict,
    write_report,
)

GOLDEN = Path(__file__).parent / "data" / "reporting"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labels(n: int, k: int) -> list[int]:
    return [i % k for i in range(n)]


def _predictions(labels: list[int], wrong: range | list[int], k: int) -> list[int]:
    """Predictions that are right everywhere except at the positions in ``wrong``."""
    bad = set(wrong)
    return [(y + 1) % k if i in bad else y for i, y in enumerate(labels)]


def _scored(labels: list[int], preds: list[int], k: int, positions: list[int] | None = None) -> dict:
    """The test-set fields of a row, as the bench records them."""
    m = classification_metrics(np.array(labels), np.array(preds), k, bootstrap=200)
    return {
        "accuracy": m["accuracy"],
        "accuracy_ci95": m["accuracy_ci95"],
        "macro_f1": m["macro_f1"],
        "macro_recall": m["macro_recall"],
        "test_labels": list(labels),
        "test_predictions": list(preds),
        "test_positions": list(positions if positions is not None else range(len(labels))),
    }


def _head(strategy: str, val: float, scored: dict, fit: float = 0.8, shared: float = 12.3, **extra: Any) -> dict:
    return {
        "family": "features",
        "strategy": strategy,
        "val_accuracy": val,
        **scored,
        "wall_seconds": shared + fit,
        "extract_seconds": shared,
        "fit_seconds": fit,
        "peak_memory_mb": 900.0,
        "memory_kind": "rss",
        "trainable_params": 2562,
        "n_fit": 293,
        "final_fit": "train+val",
        "at_grid_edge": False,
        **extra,
    }


def _tune(strategy: str, val: float, scored: dict, wall: float, params: int, **extra: Any) -> dict:
    row = {
        "family": "finetune",
        "strategy": strategy,
        "val_accuracy": val,
        **scored,
        "wall_seconds": wall,
        "peak_memory_mb": 900.0,
        "memory_kind": "rss",
        "trainable_params": params,
        "n_fit": 293,
        "final_fit": "train+val",
        "best_epoch": 3,
        "epochs_run": 5,
        "epochs_budget": 5,
        "still_improving": False,
        "hyperparameters": {"lr": 0.001, "weight_decay": 0.0001, "epochs": 3},
        "grid": [{"lr": lr, "weight_decay": 0.0001, "val_accuracy": 0.8, "best_epoch": 3} for lr in (0.0003, 0.001, 0.003)],
    }
    row.update(extra)
    return row


def _fewshot(curves: dict[str, dict[Any, list[float]]]) -> list[dict]:
    return [
        {
            "method": m,
            "family": "finetune" if m.startswith("finetune") else "features",
            "shots": s,
            "draw": d,
            "accuracy": a,
            "selection": "rule" if m.startswith("finetune") or s == 1 else "cv",
        }
        for m, per in curves.items()
        for s, accs in per.items()
        for d, a in enumerate(accs)
    ]


PROTOCOL = {
    "final_fit": "train+val",
    "final_fit_text": "both families choose hyper-parameters on val, then refit on train + val "
    "(fine-tuning with the epoch count chosen on val)",
    "selection": "val",
    "fewshot_selection": "cv|rule",
    "fewshot_draws_heads": 5,
    "fewshot_draws_finetune": 3,
    "finetune_grid": {"lr": [0.0003, 0.001, 0.003], "weight_decay": [0.0001]},
    "finetune_epochs": 5,
    "costs": "wall time from image files to a trained model, for both families",
    "seed_note": "seed 0 for every split",
}


def make_results() -> dict:
    """Two datasets: flowers (no detectable difference), pets (the head is clearly better; a failed cell)."""
    k, y = 3, _labels(153, 3)
    flowers = {
        "backbone": "efficientnet_lite0",
        "classes": ["daisy", "rose", "tulip"],
        "splits": {"train": "244 images", "val": "49 images (carved from train, seed 0)", "test": "153 images"},
        "images_per_class_all": 81.3,
        "extraction": {"seconds": 12.3, "images_per_s": 36.3, "n_images": 446, "peak_memory_mb": 880.0},
        "rows": [
            # logreg is chosen on val although linear_svm is not worse on test; full is chosen over last_block
            _head("logreg", 0.95, _scored(y, _predictions(y, range(0, 11), k), k), hyperparameters={"C": 0.1}),
            _head("linear_svm", 0.93, _scored(y, _predictions(y, range(0, 13), k), k), fit=0.3, hyperparameters={"C": 0.01}),
            _tune("full", 0.96, _scored(y, _predictions(y, range(2, 11), k), k), 620.0, 3_400_000, peak_memory_mb=2100.0),
            _tune("last_block", 0.90, _scored(y, _predictions(y, range(0, 15), k), k), 410.0, 610_000),
        ],
        "fewshot": _fewshot(
            {
                "logreg": {1: [0.41, 0.45, 0.38], 5: [0.70, 0.72, 0.69], 20: [0.85, 0.86, 0.84]},
                "linear_svm": {1: [0.60, 0.62, 0.61], 5: [0.90, 0.91, 0.92], 20: [0.95, 0.95, 0.96]},
                "finetune:full": {1: [0.30, 0.33, 0.31], 5: [0.62, 0.66, 0.60], 20: [0.88, 0.90, 0.87]},
            }
        ),
        "layerwise": [
            {"layer": "blocks.0", "depth": 0, "dim": 16, "val_accuracy": 0.50, "accuracy": 0.52, "macro_f1": 0.50},
            {"layer": "blocks.2", "depth": 2, "dim": 40, "val_accuracy": 0.70, "accuracy": 0.71, "macro_f1": 0.69},
            {"layer": "blocks.4", "depth": 4, "dim": 112, "val_accuracy": 0.91, "accuracy": 0.86, "macro_f1": 0.85},
            {"layer": "pre_logits", "depth": 6, "dim": 1280, "val_accuracy": 0.90, "accuracy": 0.93, "macro_f1": 0.92},
        ],
    }
    k, y = 2, _labels(100, 2)
    pets = {
        "backbone": "efficientnet_lite0",
        "classes": ["cat", "dog"],
        "splits": {"train": "180 images", "val": "36 images (carved from train, seed 0)", "test": "100 images"},
        "extraction": {"seconds": 8.0, "images_per_s": 39.5, "n_images": 316, "peak_memory_mb": 850.0},
        "rows": [
            _head(
                "logreg", 0.97, _scored(y, _predictions(y, range(0, 3), k), k), fit=0.5, shared=8.0, hyperparameters={"C": 1.0}
            ),
            _tune("full", 0.85, _scored(y, _predictions(y, range(0, 15), k), k), 400.0, 3_400_000),
            {
                "family": "finetune",
                "strategy": "partial",
                "status": "failed",
                "error": "RuntimeError: DataLoader worker exited unexpectedly",
            },
        ],
        "fewshot": _fewshot(
            {
                "logreg": {1: [0.80, 0.84, 0.82], 5: [0.92, 0.93, 0.94]},
                "finetune:full": {1: [0.55, 0.60, 0.58], 5: [0.74, 0.70, 0.72]},
            }
        ),
    }
    return {
        "meta": {
            "featx_version": "0.1.0",
            "created_at": "2025-01-02T03:04:05+00:00",
            "command": "featx bench --datasets flowers-mini pets-mini --quick",
            "machine": "2-core CPU, no GPU",
            "quick": True,
            "budget_notes": ["fine-tuning capped at 5 epochs on CPU", "few-shot draws reduced from 5 to 3"],
            "protocol": dict(PROTOCOL),
        },
        "datasets": {"flowers-mini": flowers, "pets-mini": pets},
        "schema": SCHEMA_VERSION,  # results.json is written with the schema version: the round trip includes it
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, Path], Path]:
    """One write_report call shared by the file-level tests (plots are the slow part)."""
    results = make_results()
    out = tmp_path_factory.mktemp("report")
    written = write_report(copy.deepcopy(results), out)
    return results, written, out


def _links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def _section(md: str, name: str) -> str:
    return md.split(f"## Dataset: {name}\n")[1].split("\n## Dataset: ")[0]


# ---------------------------------------------------------------------------------------------- files


def test_every_returned_file_exists_inside_out_dir(report: tuple) -> None:
    _, written, out = report
    assert {"report", "results"} <= set(written)
    for key, path in written.items():
        assert path.is_file(), key
        assert path.parent == out, key
    assert written["report"].name == "report.md"
    assert written["results"].name == "results.json"
    expected_plots = {
        "flowers-mini_accuracy_vs_time",
        "flowers-mini_fewshot",
        "flowers-mini_layerwise",
        "pets-mini_accuracy_vs_time",
        "pets-mini_fewshot",
    }
    assert set(written) - {"report", "results"} == expected_plots
    assert {p.stem for p in out.glob("*.png")} == expected_plots  # nothing extra, no leftover temp files
    assert not list(out.glob(".*"))


def test_results_json_round_trips_with_sorted_keys(report: tuple) -> None:
    results, written, _ = report
    text = written["results"].read_text(encoding="utf-8")
    loaded = json.loads(text)
    assert loaded == results
    assert list(loaded) == sorted(results)
    assert list(loaded["meta"]) == sorted(results["meta"])
    assert "\n  " in text  # pretty-printed


def test_report_has_meta_protocol_budget_notes_and_every_dataset_and_strategy(report: tuple) -> None:
    results, written, _ = report
    md = written["report"].read_text(encoding="utf-8")
    assert md.startswith("# featx benchmark report\n")
    assert "`featx bench --datasets flowers-mini pets-mini --quick`" in md
    assert "| featx version | 0.1.0 |" in md
    assert "2-core CPU, no GPU" in md
    assert md.index("## Protocol") < md.index("## Budget notes") < md.index("## Dataset:")
    for note in results["meta"]["budget_notes"]:
        assert f"- {note}\n" in md
    for name, ds in results["datasets"].items():
        assert f"## Dataset: {name}\n" in md
        for row in ds["rows"]:
            assert f"| {row['family']} | {row['strategy']} |" in md
    assert md.count("### What the numbers say") == 2
    assert "- Classes: 3 (daisy, rose, tulip)" in md
    assert "test: 153 images" in md
    assert "- Final models trained on (n_fit): heads 293 images (train+val); fine-tuning 293 images (train+val)" in md


def test_report_table_shows_val_choice_nfit_best_epoch_and_failed_rows(report: tuple) -> None:
    _, written, _ = report
    md = written["report"].read_text(encoding="utf-8")
    flowers = _section(md, "flowers-mini")
    assert (
        "| features | logreg | ✓ | 0.950 | 0.928 [" in flowers
        and "| 293 (train+val) | 13.1 s (12.3 s† + fit 0.80 s) | 900 MB (rss) | 2.6k | — | C=0.1 |" in flowers
    )
    assert "| finetune | full | ✓ | 0.960 | 0.941 [" in flowers and "| 2,100 MB (rss) | 3.4M | 3 / 5 |" in flowers
    assert "| features | linear_svm |  | 0.930 |" in flowers and "| finetune | last_block |  | 0.900 |" in flowers
    assert "| finetune | partial |  | **failed**: RuntimeError: DataLoader worker exited unexpectedly |" in md
    assert "shared by all feature heads" in md  # the † footnote
    # grid order, heads first: not sorted by test accuracy
    order = [flowers.index(f"| {s} |") for s in ("logreg", "linear_svm", "full", "last_block")]
    assert order == sorted(order)


def test_image_links_point_to_existing_pngs_and_cover_all_plots(report: tuple) -> None:
    _, written, out = report
    md = written["report"].read_text(encoding="utf-8")
    links = _links(md)
    assert links, "report has no image links"
    for link in links:
        assert not Path(link).is_absolute()
        assert (out / link).is_file(), link
    assert {Path(link).stem for link in links} == set(written) - {"report", "results"}
    assert "layerwise" not in " ".join(_links(_section(md, "pets-mini")))  # no layer-wise section -> no plot


def test_pngs_are_valid_150_dpi_and_not_blank(report: tuple) -> None:
    from PIL import Image

    _, written, _ = report
    for key, path in written.items():
        if path.suffix != ".png":
            continue
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, key
        assert len(data) > 20_000, key
        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] >= 600 and img.shape[1] >= 900, (key, img.shape)
        assert img[..., :3].std() > 0.05, key  # something was drawn
        with Image.open(path) as im:
            assert round(im.info["dpi"][0]) == 150, key


def test_write_report_leaves_no_pyplot_figures(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    results = make_results()
    del results["datasets"]["flowers-mini"]  # one dataset is enough here
    write_report(results, tmp_path)
    assert plt.get_fignums() == before


def test_dataset_without_optional_sections_still_renders(tmp_path: Path) -> None:
    results = make_results()
    ds = results["datasets"]["pets-mini"]
    del ds["fewshot"], ds["extraction"]
    ds["rows"] = [r for r in ds["rows"] if r.get("status") == "failed"]
    del results["datasets"]["flowers-mini"]
    written = write_report(results, tmp_path)
    assert set(written) == {"report", "results"}  # nothing to plot
    md = written["report"].read_text(encoding="utf-8")
    assert _links(md) == []
    assert "### Data efficiency" not in md
    assert "No strategy produced a result on this dataset" in md


def test_old_results_without_predictions_protocol_or_val_render_without_a_verdict() -> None:
    """Results from before issue 12: no test predictions, no protocol, no best_epoch; still a readable report."""
    results = make_results()
    del results["meta"]["protocol"]
    for ds in results["datasets"].values():
        for r in ds["rows"]:
            for key in (
                "test_predictions",
                "test_positions",
                "test_labels",
                "n_fit",
                "final_fit",
                "best_epoch",
                "still_improving",
            ):
                r.pop(key, None)
    md = render_report(results)
    assert "No protocol was recorded with these results" in md
    assert "No paired comparison is possible: the head and fine-tuning rows carry no test predictions" in md
    assert "better by" not in md and "detectable" not in md
    assert "| — / 5 |" in md  # epochs run, best epoch unknown
    for r in results["datasets"]["pets-mini"]["rows"]:
        r.pop("val_accuracy", None)
    text = verdict(results["datasets"]["pets-mini"])
    assert "No val accuracy was recorded for the feature heads" in text and "no verdict is given" in text


def test_write_report_rejects_a_dict_without_datasets(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'datasets' mapping"):
        write_report({"meta": {}}, tmp_path)


def test_plot_raises_when_there_is_nothing_to_plot(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no layer"):
        plot_layerwise([{"layer": "x", "dim": 3}], tmp_path / "l.png", "empty")
    assert not (tmp_path / "l.png").exists()


def test_importing_reporting_does_not_import_torch() -> None:
    code = "import sys, featx.reporting; print('torch' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------- selection on val


def test_select_on_val_ignores_test_and_breaks_ties_by_order() -> None:
    rows = [
        {"strategy": "a", "val_accuracy": 0.8, "accuracy": 0.99},
        {"strategy": "b", "val_accuracy": 0.9, "accuracy": 0.50},
        {"strategy": "c", "val_accuracy": 0.9, "accuracy": 0.60},
        {"strategy": "d", "accuracy": 1.0},  # no val accuracy: never chosen
        {"strategy": "e", "val_accuracy": 0.99, "status": "failed"},
    ]
    assert select_on_val(rows)["strategy"] == "b"
    assert select_on_val([rows[3]]) is None


def test_selections_use_val_for_head_finetune_layer_and_fewshot_methods() -> None:
    ds = make_results()["datasets"]["flowers-mini"]
    assert selections(ds) == {
        "head": "logreg",  # val 0.95 > linear_svm's 0.93
        "finetune": "full",
        "layer": "blocks.4",  # val 0.91 although pre_logits has the higher test accuracy
        "fewshot_head": "logreg",  # the head chosen on val, not the best few-shot curve (linear_svm)
        "fewshot_finetune": "finetune:full",
    }


def test_permuting_test_labels_and_test_accuracies_leaves_every_selection_unchanged() -> None:
    rng = np.random.default_rng(0)
    results = make_results()
    baseline = {name: selections(ds) for name, ds in results["datasets"].items()}
    chosen_lines = {name: _chosen_rows(render_results_table(ds)) for name, ds in results["datasets"].items()}
    for trial in range(5):
        shuffled = copy.deepcopy(results)
        for ds in shuffled["datasets"].values():
            ok = [r for r in ds["rows"] if "accuracy" in r]
            accs = rng.permutation([r["accuracy"] for r in ok])
            perm = rng.permutation(len(ok[0]["test_labels"]))
            for r, a in zip(ok, accs):
                r["accuracy"] = float(a)
                r["test_labels"] = [r["test_labels"][i] for i in perm]  # same permutation for every row: still paired
            layer_accs = rng.permutation([p["accuracy"] for p in ds.get("layerwise", [])])
            for p, a in zip(ds.get("layerwise", []), layer_accs):
                p["accuracy"] = float(a)
            few_accs = rng.permutation([p["accuracy"] for p in ds["fewshot"]])
            for p, a in zip(ds["fewshot"], few_accs):
                p["accuracy"] = float(a)
        for name, ds in shuffled["datasets"].items():
            assert selections(ds) == baseline[name], (trial, name)
            assert _chosen_rows(render_results_table(ds)) == chosen_lines[name], (trial, name)
            assert f"the feature head {baseline[name]['head']} (val" in verdict(ds)
        md = render_report(shuffled)
        assert "the layer chosen on val is blocks.4" in md


def _chosen_rows(table: str) -> list[str]:
    return [" | ".join(line.split(" | ")[:2]) for line in table.splitlines() if " | ✓ | " in line]


# ---------------------------------------------------------------------------------------------- paired verdict


def test_verdict_no_detectable_difference_names_the_test_size_and_the_mde() -> None:
    ds = make_results()["datasets"]["flowers-mini"]
    text = verdict(ds)
    head, tune = ds["rows"][0], ds["rows"][2]
    r = paired_comparison(np.array(head["test_labels"]), np.array(tune["test_predictions"]), np.array(head["test_predictions"]))
    assert (r["n10"], r["n01"]) == (2, 0) and r["p_value"] == pytest.approx(0.5)
    assert "No difference detectable at this test size (n = 153)" in text
    assert f"differences under {100 * r['mde']:.1f} points would go unseen" in text
    assert "McNemar p = 0.50" in text
    assert "better by" not in text
    assert "Chosen on val: the feature head logreg (val 0.950, test 0.928 [" in text and "fine-tuning full (val 0.960" in text
    assert "Fine-tuning took 47× longer than the chosen head" in text  # 620 s / 13.1 s
    assert "indistinguishable" not in text


def test_verdict_significant_difference_names_the_better_side_with_interval_and_p() -> None:
    text = verdict(make_results()["datasets"]["pets-mini"])
    p = binomtest(12, 12, 0.5).pvalue  # 12 discordant pairs, all won by the head
    assert p < 0.001
    assert re.search(r"The feature head \(logreg\) is better by 12\.0 points \[\d+\.\d, \d+\.\d\], McNemar p < 0\.001", text)
    assert "(paired over n = 100 test images)" in text
    assert "partial failed and is left out" in text

    k, y = 2, _labels(200, 2)
    ds = {
        "rows": [
            _head("logreg", 0.8, _scored(y, _predictions(y, range(0, 40), k), k)),
            _tune("full", 0.9, _scored(y, _predictions(y, range(0, 12), k), k), 50.0, 10),
        ]
    }
    text = verdict(ds)
    cmp = compare_chosen(ds)["paired"]
    assert cmp["diff"] == pytest.approx(0.14) and (cmp["n10"], cmp["n01"]) == (28, 0)
    lo, hi = cmp["ci"]
    assert f"Fine-tuning (full) is better by 14.0 points [{100 * lo:.1f}, {100 * hi:.1f}], McNemar p < 0.001" in text
    assert "Fine-tuning took 3.8× longer" in text  # 50 / 13.1


def test_verdict_pairs_rows_whose_test_positions_come_in_another_order() -> None:
    ds = make_results()["datasets"]["pets-mini"]
    before = compare_chosen(ds)["paired"]
    tune = ds["rows"][1]
    order = list(reversed(range(len(tune["test_positions"]))))
    for key in ("test_positions", "test_predictions", "test_labels"):
        tune[key] = [tune[key][i] for i in order]
    after = compare_chosen(ds)["paired"]
    assert (after["diff"], after["n10"], after["n01"], after["p_value"]) == (
        before["diff"],
        before["n10"],
        before["n01"],
        before["p_value"],
    )


def test_verdict_refuses_rows_scored_on_different_test_images_or_labels(tmp_path: Path) -> None:
    results = make_results()
    tune = results["datasets"]["pets-mini"]["rows"][1]
    tune["test_positions"] = [p + 50 for p in tune["test_positions"]]
    with pytest.raises(MismatchError, match=r"different test images \(100 vs 100 images, 50 in common\)"):
        verdict(results["datasets"]["pets-mini"])
    with pytest.raises(MismatchError):
        write_report(results, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written

    results = make_results()
    tune = results["datasets"]["pets-mini"]["rows"][1]
    tune["test_labels"] = [1 - y for y in tune["test_labels"]]
    with pytest.raises(MismatchError, match="different test labels"):
        verdict(results["datasets"]["pets-mini"])


def test_verdict_with_only_one_family_names_no_winner() -> None:
    k, y = 2, _labels(50, 2)
    text = verdict({"rows": [_head("logreg", 0.9, _scored(y, y, k))]})
    assert "Only feature heads produced results here; the one chosen on val is logreg" in text
    assert "no fine-tuning result to compare" in text
    assert "better" not in text and "detectable" not in text
    assert "few-shot" not in text  # no curve measured -> no crossing claim


# ---------------------------------------------------------------------------------------------- budget


def test_still_improving_finetune_is_named_next_to_the_verdict_with_what_to_run() -> None:
    ds = make_results()["datasets"]["flowers-mini"]
    assert budget_sentences(ds) == []
    ds["rows"][2].update(best_epoch=5, still_improving=True)
    text = verdict(ds)
    assert (
        "Fine-tuning (full) was still improving when its 5 epochs ended: this budget under-states it; run with --epochs 10"
        in text
    )
    assert text.index("would go unseen") < text.index("still improving")  # next to the verdict
    # worked out from the epochs when the flag is missing (older rows)
    ds["rows"][3].update(best_epoch=5, epochs_run=5, epochs_budget=5)
    del ds["rows"][3]["still_improving"]
    assert "Fine-tuning (full, last_block) were still improving when their 5 epochs ended" in " ".join(budget_sentences(ds))
    assert "| 5 / 5 ↑ |" in render_results_table(ds)


def test_head_at_grid_edge_says_which_edge_and_what_to_run() -> None:
    ds = make_results()["datasets"]["flowers-mini"]
    head = ds["rows"][0]
    head.update(
        hyperparameters={"C": 0.0001},
        at_grid_edge=True,
        sweep=[{"C": c, "val_accuracy": 0.9} for c in (0.0001, 0.001, 0.01, 0.1)],
    )
    sentences = budget_sentences(ds)
    assert sentences == [
        "For the logreg head, C=0.0001 is the smallest value searched: the best value may lie beyond the grid's edge; "
        "pass a wider grid (fit_head(..., grid=...)) and re-run to settle it."
    ]
    assert "C=0.0001 (grid edge)" in render_results_table(ds)
    head["at_grid_edge"] = False
    assert budget_sentences(ds) == []
    # fine-tuning: an lr at the top of a three-point grid is an edge too
    ds["rows"][2]["hyperparameters"]["lr"] = 0.003
    assert "For fine-tuning (full), lr=0.003 is the largest value searched" in budget_sentences(ds)[0]


# ---------------------------------------------------------------------------------------------- protocol


def test_protocol_is_stated_from_meta() -> None:
    lines = render_protocol({"protocol": PROTOCOL})
    text = "\n".join(lines)
    assert "**Final fit (train+val):** Both families choose hyper-parameters on val, then refit on train + val" in text
    assert "**Selection on val:** the best head, the best fine-tuning strategy and the best layer" in text
    assert "lr {0.0003, 0.001, 0.003} × weight decay {0.0001}; at most 5 epochs, the epoch count chosen on val" in text
    assert "cross-validation inside the draw" in text and "Draws per shot count: heads 5, fine-tuning 3" in text
    assert "**Costs counted alike:** Wall time from image files to a trained model, for both families." in text
    assert "McNemar's exact test" in text and "computed from the counts" in text and "Tango's score interval" in text
    assert "Holm's correction" in text
    assert "- seed_note: seed 0 for every split" in text  # keys the report does not know are still shown
    train_only = "\n".join(render_protocol({"protocol": {"final_fit": "train"}}))
    assert "keep the model trained on train only" in train_only


def test_families_fitting_different_row_counts_are_flagged() -> None:
    ds = make_results()["datasets"]["flowers-mini"]
    ds["rows"][2]["n_fit"] = 244
    md = render_report({"meta": {}, "datasets": {"x": ds}})
    assert "heads 293 images (train+val); fine-tuning 244–293 images (train+val)" in md
    assert "not the same labelled images for both families" in md


# ---------------------------------------------------------------------------------------------- crossing


def test_crossing_compares_the_val_chosen_head_paired_over_draws() -> None:
    results = make_results()
    ds = results["datasets"]["flowers-mini"]
    rows = ds["rows"]
    result = fewshot_crossing(ds["fewshot"], head_row=rows[0], finetune_row=rows[2], rows=rows)
    assert (result["head_method"], result["finetune_method"]) == ("logreg", "finetune:full")
    assert result["case"] == "crosses" and result["shots"] == 20
    at20 = result["per_shot"][-1]
    diffs = np.array([0.88 - 0.85, 0.90 - 0.86, 0.87 - 0.84])
    assert at20["diff"] == pytest.approx(diffs.mean())
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, df=2)
    assert at20["ci"] == (pytest.approx(diffs.mean() - half), pytest.approx(diffs.mean() + half))
    assert at20["basis"] == "3 paired draws"
    assert "catches up with the logreg head (chosen on val in the full-data grid) at 20 shots per class" in result["text"]
    assert result["bracket"] == (5, 20)  # the head clearly ahead at 1 and 5; fine-tuning clearly ahead at 20
    assert "there fine-tuning is clearly ahead" in result["text"]
    md = render_report(results)
    assert "| Shots per class | finetune:full − logreg (points) | 95% interval | based on | clearly ahead |" in md


def test_crossing_point_uncertain_when_the_interval_includes_zero() -> None:
    pts = _fewshot(
        {
            "logreg": {1: [0.50, 0.52, 0.51], 5: [0.70, 0.72, 0.71], 10: [0.80, 0.80, 0.80], 20: [0.85, 0.85, 0.85]},
            "finetune:full": {1: [0.30, 0.32, 0.31], 5: [0.75, 0.65, 0.70], 10: [0.80, 0.90, 0.84], 20: [0.95, 0.96, 0.95]},
        }
    )
    result = fewshot_crossing(pts)
    assert result["case"] == "crosses" and result["shots"] == 10
    assert result["bracket"] == (1, 20)
    assert "the crossing point is uncertain: the head is clearly ahead up to 1 shot per class and fine-tuning" in result["text"]
    assert "clearly ahead from 20 shots per class, so the crossing lies between the two" in result["text"]


def test_crossing_never_within_range() -> None:
    result = fewshot_crossing(make_results()["datasets"]["pets-mini"]["fewshot"])
    assert result["case"] == "never" and result["shots"] is None
    assert (
        "never catches up with the logreg head (the only head in the curve) within the measured range (1–5 shots"
        in result["text"]
    )
    assert "the head is clearly ahead at 1 and 5 shots per class" in result["text"]


def test_crossing_ahead_from_first_point_and_ties() -> None:
    pts = _fewshot({"logreg": {1: [0.4, 0.5], 5: [0.7]}, "svm": {1: [0.45]}, "finetune:full": {1: [0.5, 0.5], 5: [0.6]}})
    result = fewshot_crossing(pts)
    assert result["head_method"] == "logreg"  # first head in the grid; none was chosen on val
    assert result["case"] == "ahead_from_start" and result["shots"] == 1
    assert "level with or ahead of the logreg head (the first head in the grid" in result["text"]
    tie = _fewshot({"logreg": {1: [0.5], 5: [0.7]}, "finetune:full": {1: [0.5], 5: [0.6]}})
    assert fewshot_crossing(tie)["case"] == "ahead_from_start"


def test_crossing_at_all_uses_the_paired_test_of_the_full_data_rows() -> None:
    ds = make_results()["datasets"]["pets-mini"]
    rows = [r for r in ds["rows"] if "accuracy" in r]
    pts = _fewshot({"logreg": {2: [0.9, 0.92], "all": [0.97]}, "finetune:full": {2: [0.5, 0.52], "all": [0.85]}})
    result = fewshot_crossing(pts, head_row=rows[0], finetune_row=rows[1], rows=rows)
    last = result["per_shot"][-1]
    assert last["shots"] == "all" and last["basis"].startswith("paired over 100 test images")
    assert last["diff"] == pytest.approx(-0.12) and last["status"] == "head"
    without_rows = fewshot_crossing(pts)["per_shot"][-1]
    assert without_rows["ci"] is None and without_rows["basis"] == "1 paired draw"


def test_crossing_undetermined_cases() -> None:
    assert fewshot_crossing(_fewshot({"logreg": {1: [0.5]}}))["case"] == "undetermined"
    disjoint = fewshot_crossing(_fewshot({"logreg": {1: [0.5]}, "finetune:full": {5: [0.6]}}))
    assert disjoint["case"] == "undetermined"
    assert "no shot count was measured for both logreg and finetune:full" in disjoint["text"]


def test_fewshot_table_shows_mean_and_t_interval_over_draws() -> None:
    table = render_fewshot_table(_fewshot({"logreg": {1: [0.40, 0.50, 0.45], "all": [0.9]}}))
    half = 4.302652729911275 * np.std([0.40, 0.50, 0.45], ddof=1) / np.sqrt(3)
    assert f"| 1 | 0.450 ± {half:.3f} (n=3) |" in table
    assert "| all | 0.900 (n=1) |" in table


def test_layerwise_section_names_the_layer_chosen_on_val() -> None:
    md = render_report(make_results())
    flowers = _section(md, "flowers-mini")
    assert "the layer chosen on val is blocks.4 (112-d, val 0.910, test 0.860)" in flowers
    assert "The deepest layer tapped is pre_logits (1280-d, val 0.900, test 0.930)" in flowers


def test_dataset_names_become_distinct_safe_file_names(tmp_path: Path) -> None:
    results = make_results()
    pets = results["datasets"].pop("pets-mini")
    results["datasets"] = {"oxford pets/v2": pets, "oxford_pets_v2": copy.deepcopy(pets)}
    written = write_report(results, tmp_path)
    assert {"oxford_pets_v2_accuracy_vs_time", "oxford_pets_v2-2_accuracy_vs_time"} <= set(written)
    md = written["report"].read_text(encoding="utf-8")
    assert "## Dataset: oxford pets/v2\n" in md
    links = _links(md)
    assert len(links) == len(set(links)) == 4
    assert all((tmp_path / link).is_file() for link in links)


# ---------------------------------------------------------------------------------------------- golden


def _small_dataset() -> dict:
    k, y = 2, _labels(20, 2)
    return {
        "rows": [
            _head(
                "logreg",
                0.55,
                _scored(y, _predictions(y, range(10), k), k),
                fit=0.25,
                hyperparameters={"C": 0.1, "max_iter": 1000},
            ),
            _tune(
                "full",
                0.8,
                _scored(y, _predictions(y, range(5), k), k),
                1234.5,
                999_950,
                peak_memory_mb=2048.0,
                memory_kind="cuda",
                best_epoch=5,
                still_improving=True,
            ),
            {"family": "finetune", "strategy": "partial", "status": "failed", "error": "shape | mismatch\nin layer 3"},
            _tune("linear", 0.6, _scored(y, _predictions(y, range(8), k), k), 30.0, 512, best_epoch=None, epochs_run=None),
        ],
        "fewshot": _fewshot(
            {"logreg": {"all": [0.5], 1: [0.2, 0.3], 4: [0.4]}, "finetune:full": {1: [0.1, 0.1], 4: [0.45, 0.55]}}
        ),
    }


@pytest.mark.parametrize(
    ("name", "render"),
    [
        ("results_table.md", lambda ds: render_results_table(ds)),
        ("fewshot_table.md", lambda ds: render_fewshot_table(ds["fewshot"])),
    ],
)
def test_golden_markdown_tables(name: str, render: Any) -> None:
    text = render(_small_dataset())
    path = GOLDEN / name
    if os.environ.get("FEATX_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")
