"""featx bench: a grid runs cell by cell, skips finished cells, and writes a well-formed report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from featx.bench import BenchConfig, FewShotConfig, load_bench_config, run_bench
from featx.cli import main
from featx.errors import UsageError

from .conftest import make_imagefolder


def tiny_config(data: Path) -> BenchConfig:
    return BenchConfig(
        datasets=[str(data)],
        backbones=["timm:resnet10t"],
        weights="none",
        image_size=32,
        heads=["logreg", "knn"],
        strategies=["full"],
        finetune={"epochs": 1, "batch_size": 8, "num_workers": 0},
        fewshot=FewShotConfig(shots=[1, 2], draws=2, finetune_strategy="full", finetune_shots=[1], finetune_draws=1),
        layerwise=True,
        device="cpu",
        budget_notes=["tiny test grid"],
    )


def test_bench_writes_report_and_skips_finished_cells(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 6, "val": 2, "test": 3}, n_classes=3)
    config = tiny_config(data)
    out = run_bench(config, out_dir=tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert out["failed"] == 0
    cells = sorted((tmp_path / "out" / "cells").glob("*.json"))
    assert [c.name for c in cells] == [
        "data-timm_resnet10t-features.json",
        "data-timm_resnet10t-fewshot-ft-1-0.json",
        "data-timm_resnet10t-fewshot-heads.json",
        "data-timm_resnet10t-finetune-full.json",
        "data-timm_resnet10t-layerwise.json",
    ]
    # report files present and well-formed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    ds = results["datasets"]["data"]
    assert {r["strategy"] for r in ds["rows"]} == {"logreg", "knn", "full"}
    assert all(
        0.0 <= r["accuracy"] <= 1.0 and r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] for r in ds["rows"]
    )
    assert {p["method"] for p in ds["fewshot"]} == {"logreg", "knn", "finetune:full"}
    assert [p["layer"] for p in ds["layerwise"]] == ["act1", "layer1", "layer2", "layer3", "layer4", "pooled"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Dataset: data" in report and "What the numbers say" in report and "tiny test grid" in report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (tmp_path / "out" / link).is_file() and (tmp_path / "out" / link).read_bytes()[:4] == b"\x89PNG"
    # a second run skips every finished cell: nothing is recomputed, the report is rewritten the same
    mtimes = {c: c.stat().st_mtime_ns for c in cells}
    again = run_bench(config, out_dir=tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert again["failed"] == 0
    assert {c: c.stat().st_mtime_ns for c in cells} == mtimes
    assert json.loads((tmp_path / "out" / "results.json").read_text())["datasets"] == results["datasets"]
    # removing one cell re-runs exactly that cell
    (tmp_path / "out" / "cells" / "data-timm_resnet10t-layerwise.json").unlink()
    run_bench(config, out_dir=tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert {c: c.stat().st_mtime_ns for c in cells if "layerwise" not in c.name} == {
        c: m for c, m in mtimes.items() if "layerwise" not in c.name
    }


def test_bench_config_errors(tmp_path: Path) -> None:
    (tmp_path / "grid.yaml").write_text("datasets: [nowhere]\n")
    with pytest.raises(UsageError, match="bench dataset not found"):
        load_bench_config(tmp_path / "grid.yaml")
    (tmp_path / "grid.yaml").write_text("colour: blue\n")
    with pytest.raises(UsageError, match="unknown bench setting"):
        load_bench_config(tmp_path / "grid.yaml")
    (tmp_path / "grid.yaml").write_text("strategies: [magic]\n")
    with pytest.raises(UsageError, match="unknown strategy"):
        load_bench_config(tmp_path / "grid.yaml")


@pytest.mark.slow
def test_quick_bench_on_the_embedded_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's main job, end to end (about 2 minutes on 2 CPU cores)."""
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "bench", "--quick"]) == 0
    out = tmp_path / "runs" / "bench-quick"
    results = json.loads((out / "results.json").read_text())
    rows = results["datasets"]["clothing10"]["rows"]
    assert {r["strategy"] for r in rows} == {"logreg", "linear-svm", "knn", "head", "lp-ft"}
    assert all(r["accuracy"] > 0.3 for r in rows)  # 10 classes: chance is 0.1
    assert (out / "clothing10_fewshot.png").is_file() and (out / "clothing10_layerwise.png").is_file()
    assert "report:" in capsys.readouterr().out
