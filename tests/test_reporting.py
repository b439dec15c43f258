"""Report rendering: files, JSON round trip, Markdown content, valid PNGs, verdict and crossing logic.

Everything runs on a hand-built results dict shaped like ``featx bench`` output, so no model is needed.
Golden files live in ``tests/data/reporting/``; regenerate them with ``FEATX_UPDATE_GOLDEN=1 pytest``.
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
import pytest

from featx.errors import UsageError
from featx.reporting import (
    fewshot_crossing,
    plot_layerwise,
    render_fewshot_table,
    render_results_table,
    verdict,
    write_report,
)

GOLDEN = Path(__file__).parent / "data" / "reporting"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(family: str, strategy: str, acc: float, ci: tuple[float, float], wall: float, **extra: Any) -> dict:
    row = {
        "family": family,
        "strategy": strategy,
        "accuracy": acc,
        "accuracy_ci95": list(ci),
        "macro_f1": round(acc - 0.01, 3),
        "macro_recall": round(acc - 0.005, 3),
        "wall_seconds": wall,
        "peak_memory_mb": 900.0,
        "memory_kind": "rss",
    }
    row.update(extra)
    return row


def _head(strategy: str, acc: float, ci: tuple[float, float], fit: float, extract: float = 12.3, **extra: Any) -> dict:
    return _row(
        "features",
        strategy,
        acc,
        ci,
        extract + fit,
        extract_seconds=extract,
        fit_seconds=fit,
        trainable_params=2562,
        images_per_s=30.1,
        **extra,
    )


def _tune(strategy: str, acc: float, ci: tuple[float, float], wall: float, params: int, **extra: Any) -> dict:
    extra = {"epochs_run": 3, "images_per_s": 7.5, **extra}
    return _row("finetune", strategy, acc, ci, wall, train_seconds=wall - 20, trainable_params=params, **extra)


def _fewshot(curves: dict[str, dict[Any, list[float]]]) -> list[dict]:
    return [
        {"method": m, "shots": s, "draw": d, "accuracy": a}
        for m, per in curves.items()
        for s, accs in per.items()
        for d, a in enumerate(accs)
    ]


def make_results() -> dict:
    """Two datasets: a complete one, and one with a failed fine-tuning cell and no layer-wise section."""
    flowers = {
        "backbone": "efficientnet_lite0",
        "classes": ["daisy", "rose", "tulip"],
        "splits": {"train": "244 images", "val": "49 images (carved from train, seed 0)", "test": "153 images"},
        "images_per_class_all": 81.3,
        "extraction": {"seconds": 12.3, "images_per_s": 36.3, "n_images": 446, "peak_memory_mb": 880.0},
        "rows": [
            _head("logreg", 0.931, (0.895, 0.961), 0.8, hyperparameters={"C": 0.1}),
            _head("linear_svm", 0.915, (0.876, 0.948), 0.3, hyperparameters={"C": 0.01}),
            _tune("full", 0.941, (0.908, 0.967), 620.0, 3_400_000, peak_memory_mb=2100.0),
            _tune("last_block", 0.902, (0.863, 0.941), 410.0, 610_000),
        ],
        "fewshot": _fewshot(
            {
                "logreg": {1: [0.41, 0.45, 0.38], 5: [0.70, 0.72, 0.69], 20: [0.85, 0.86, 0.84], "all": [0.931]},
                "finetune:full": {1: [0.30, 0.33, 0.31], 5: [0.62, 0.66, 0.60], 20: [0.86, 0.88, 0.85], "all": [0.941]},
            }
        ),
        "layerwise": [
            {"layer": "blocks.0", "depth": 0, "dim": 16, "accuracy": 0.52, "macro_f1": 0.50},
            {"layer": "blocks.2", "depth": 2, "dim": 40, "accuracy": 0.71, "macro_f1": 0.69},
            {"layer": "blocks.4", "depth": 4, "dim": 112, "accuracy": 0.86, "macro_f1": 0.85},
            {"layer": "pre_logits", "depth": 6, "dim": 1280, "accuracy": 0.93, "macro_f1": 0.92},
        ],
    }
    pets = {
        "backbone": "efficientnet_lite0",
        "classes": ["cat", "dog"],
        "splits": {"train": "180 images", "val": "36 images (carved from train, seed 0)", "test": "100 images"},
        "extraction": {"seconds": 8.0, "images_per_s": 39.5, "n_images": 316, "peak_memory_mb": 850.0},
        "rows": [
            _head("logreg", 0.97, (0.94, 0.99), 0.5, extract=8.0, hyperparameters={"C": 1.0}),
            _tune("full", 0.85, (0.78, 0.91), 400.0, 3_400_000),
            {
                "family": "finetune",
                "strategy": "partial",
                "status": "failed",
                "error": "RuntimeError: DataLoader worker exited unexpectedly",
            },
        ],
        "fewshot": _fewshot(
            {
                "logreg": {1: [0.80, 0.84], 5: [0.92, 0.93]},
                "finetune:full": {1: [0.55, 0.60], 5: [0.74, 0.70]},
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
            "budget_notes": ["fine-tuning capped at 3 epochs on CPU", "few-shot draws reduced from 5 to 3"],
        },
        "datasets": {"flowers-mini": flowers, "pets-mini": pets},
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


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+(?=[A-Z])", text) if s]


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


def test_report_has_meta_budget_notes_and_every_dataset_and_strategy(report: tuple) -> None:
    results, written, _ = report
    md = written["report"].read_text(encoding="utf-8")
    assert md.startswith("# featx benchmark report\n")
    assert "`featx bench --datasets flowers-mini pets-mini --quick`" in md
    assert "| featx version | 0.1.0 |" in md
    assert "2-core CPU, no GPU" in md
    for note in results["meta"]["budget_notes"]:
        assert f"- {note}\n" in md
    for name, ds in results["datasets"].items():
        assert f"## Dataset: {name}\n" in md
        for row in ds["rows"]:
            assert f"| {row['family']} | {row['strategy']} |" in md
    assert md.count("### What the numbers say") == 2
    assert "- Classes: 3 (daisy, rose, tulip)" in md
    assert "test: 153 images" in md


def test_report_table_formats_ci_time_memory_params_and_failed_rows(report: tuple) -> None:
    _, written, _ = report
    md = written["report"].read_text(encoding="utf-8")
    assert "| features | logreg | 0.931 [0.895, 0.961] | 0.921 | extract 12.3 s† + fit 0.80 s | 900 MB (rss) | 2.6k |" in md
    assert "| finetune | full | 0.941 [0.908, 0.967] | 0.931 | 620 s | 2,100 MB (rss) | 3.4M | 3 |" in md
    assert "| finetune | partial | **failed**: RuntimeError: DataLoader worker exited unexpectedly |" in md
    assert "shared by all feature heads" in md  # the † footnote
    flowers = md.split("## Dataset: flowers-mini")[1].split("## Dataset: pets-mini")[0]
    order = [flowers.index(f"| {s} |") for s in ("full", "logreg", "linear_svm", "last_block")]
    assert order == sorted(order)  # sorted by accuracy, best first


def test_image_links_point_to_existing_pngs_and_cover_all_plots(report: tuple) -> None:
    _, written, out = report
    md = written["report"].read_text(encoding="utf-8")
    links = _links(md)
    assert links, "report has no image links"
    for link in links:
        assert not Path(link).is_absolute()
        assert (out / link).is_file(), link
    assert {Path(link).stem for link in links} == set(written) - {"report", "results"}
    pets = md.split("## Dataset: pets-mini")[1]
    assert "layerwise" not in " ".join(_links(pets))  # no layer-wise section -> no plot, no dangling link


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
    write_report(make_results(), tmp_path)
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


# ---------------------------------------------------------------------------------------------- verdict


def _dataset(head: dict, tune: dict, **extra: Any) -> dict:
    return {"rows": [head, tune], **extra}


def test_verdict_overlapping_intervals_are_indistinguishable() -> None:
    text = verdict(make_results()["datasets"]["flowers-mini"])
    assert "statistically indistinguishable on this test set" in text
    assert "better by" not in text
    assert "logreg" in text and "full" in text
    assert "0.931 [0.895, 0.961]" in text and "0.941 [0.908, 0.967]" in text
    assert "Fine-tuning took 47× longer" in text  # 620 s / 13.1 s
    assert 2 <= len(_sentences(text)) <= 4


def test_verdict_separate_intervals_name_the_better_side_and_the_gap() -> None:
    text = verdict(make_results()["datasets"]["pets-mini"])
    assert "the feature head (logreg) is better by 12.0 points" in text
    assert "indistinguishable" not in text
    assert "partial failed and is left out" in text
    assert 2 <= len(_sentences(text)) <= 4

    ds = _dataset(_head("logreg", 0.80, (0.75, 0.85), 1.0), _tune("full", 0.95, (0.91, 0.98), 50.0, 10))
    text = verdict(ds)
    assert "fine-tuning (full) is better by 15.0 points" in text
    assert "Fine-tuning took 3.8× longer" in text  # 50 / 13.3


def test_verdict_touching_intervals_count_as_overlap() -> None:
    ds = _dataset(_head("logreg", 0.80, (0.75, 0.85), 1.0), _tune("full", 0.90, (0.85, 0.95), 50.0, 10))
    assert "indistinguishable" in verdict(ds)


def test_verdict_reports_a_faster_finetune_and_missing_intervals_honestly() -> None:
    head = _head("logreg", 0.80, (0.75, 0.85), 1.0)
    tune = _tune("full", 0.82, (0.0, 0.0), 4.0, 10)
    del tune["accuracy_ci95"]
    text = verdict(_dataset(head, tune))
    assert "cannot be called significant or not" in text
    assert "better by" not in text and "indistinguishable" not in text
    assert "The best head took 3.3× longer than fine-tuning" in text


def test_verdict_with_only_one_family_names_no_winner() -> None:
    text = verdict({"rows": [_head("logreg", 0.9, (0.85, 0.94), 1.0)]})
    assert "Only feature heads produced results" in text
    assert "no fine-tuning result to compare" in text
    assert "better" not in text and "indistinguishable" not in text
    assert "few-shot" not in text  # no curve measured -> no crossing claim


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


# ---------------------------------------------------------------------------------------------- crossing


def test_crossing_when_finetune_catches_up() -> None:
    result = fewshot_crossing(make_results()["datasets"]["flowers-mini"]["fewshot"])
    assert result["case"] == "crosses"
    assert result["shots"] == 20
    assert "catches up with the heads at 20 shots per class" in result["text"]
    assert "catches up" in verdict(make_results()["datasets"]["flowers-mini"])


def test_crossing_never_within_range() -> None:
    result = fewshot_crossing(make_results()["datasets"]["pets-mini"]["fewshot"])
    assert result == {"case": "never", "shots": None, "text": result["text"]}
    assert "never catches up within the measured range (1–5 shots per class)" in result["text"]


def test_crossing_ahead_from_first_point() -> None:
    pts = _fewshot({"logreg": {1: [0.4, 0.5], 5: [0.7]}, "svm": {1: [0.45]}, "finetune:full": {1: [0.5, 0.5], 5: [0.6]}})
    result = fewshot_crossing(pts)
    assert result["case"] == "ahead_from_start"
    assert result["shots"] == 1
    assert "ahead from the first point" in result["text"]


def test_crossing_counts_a_tie_as_caught_up() -> None:
    pts = _fewshot({"logreg": {1: [0.5], 5: [0.7]}, "finetune:full": {1: [0.5], 5: [0.6]}})
    assert fewshot_crossing(pts)["case"] == "ahead_from_start"


def test_crossing_uses_means_over_draws_and_the_best_method_of_each_family() -> None:
    # one fine-tuning draw beats the head at 1 shot, but the mean does not; a second, better head method
    # must be the one compared against at 5 shots.
    pts = _fewshot(
        {
            "logreg": {1: [0.6, 0.6], 5: [0.70], 10: [0.8]},
            "svm": {5: [0.90], 10: [0.7]},
            "finetune:full": {1: [0.9, 0.1], 5: [0.85], 10: [0.81]},
        }
    )
    result = fewshot_crossing(pts)
    assert (result["case"], result["shots"]) == ("crosses", 10)


def test_crossing_at_the_full_training_set_and_undetermined_cases() -> None:
    pts = _fewshot({"logreg": {2: [0.6], "all": [0.9]}, "finetune:full": {2: [0.5], "all": [0.92]}})
    result = fewshot_crossing(pts)
    assert (result["case"], result["shots"]) == ("crosses", "all")
    assert "at the full training set" in result["text"]

    assert fewshot_crossing(_fewshot({"logreg": {1: [0.5]}}))["case"] == "undetermined"
    disjoint = fewshot_crossing(_fewshot({"logreg": {1: [0.5]}, "finetune:full": {5: [0.6]}}))
    assert disjoint["case"] == "undetermined"
    assert "no shot count was measured for both" in disjoint["text"]


# ---------------------------------------------------------------------------------------------- golden


def _small_dataset() -> dict:
    return {
        "rows": [
            _head("logreg", 0.5, (0.4, 0.6), 0.25, hyperparameters={"C": 0.1, "max_iter": 1000}),
            _tune("full", 0.75, (0.7, 0.8), 1234.5, 999_950, peak_memory_mb=2048.0, memory_kind="cuda"),
            {"family": "finetune", "strategy": "partial", "status": "failed", "error": "shape | mismatch\nin layer 3"},
            _tune("linear", 0.6, (0.5, 0.7), 30.0, 512, epochs_run=None),
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
