"""What the bench writes into its rows for the issue-21 report: fine-tuning rows and few-shot points say what the final
model is (backbone_updated, fine_tune_epochs, val_log_loss, augment), the layer-wise probe carries per-image test
predictions the report can pair with fine-tuning, heads carry their val log-loss, augmentation is set per dataset in
the grid file, and both families charge the backbone build the same way (build_seconds)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featx.bench import BenchConfig, FewShotConfig, load_bench_config, run_bench, unmatched_dataset_keys
from featx.bench.fingerprint import finetune_identity
from featx.cli import main
from featx.errors import UsageError
from featx.finetuning import AUGMENTATIONS
from featx.reporting import compare_chosen, render_report, verdict

from .conftest import make_imagefolder

TINY = {"backbones": ["timm:resnet10t"], "weights": "none", "image_size": 32, "device": "cpu"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny bench: 3 classes, three heads, full fine-tuning, one few-shot draw each, the layer-wise probe; the
    dataset's fine-tuning augmentation set by its name."""
    root = tmp_path_factory.mktemp("bench-rows")
    data = make_imagefolder(root / "shapes", {"train": 8, "val": 3, "test": 4}, n_classes=3)
    config = BenchConfig(
        datasets=[str(data)],
        **TINY,
        heads=["logreg", "knn", "linear-svm"],
        strategies=["full"],
        finetune={"epochs": 1, "batch_size": 8, "num_workers": 0},
        finetune_grid={"lr": [0.01], "weight_decay": [0.0]},
        augment={"shapes": ["random_resized_crop"]},
        fewshot=FewShotConfig(
            shots=[2], draws=1, finetune_strategy="full", finetune_shots=[2], finetune_draws=1, finetune_rule_steps=2
        ),
        layerwise=True,
    )
    out = run_bench(config, out_dir=root / "out", cache_dir=str(root / "cache"), progress=False)
    assert out["failed"] == 0
    return json.loads((root / "out" / "results.json").read_text())["datasets"]["shapes"]


def test_finetune_rows_and_points_say_what_the_final_model_is(bench: dict[str, Any]) -> None:
    (row,) = [r for r in bench["rows"] if r["family"] == "finetune"]
    assert row["backbone_updated"] is True and row["fine_tune_epochs"] == 1  # full, 1 epoch: epoch 0 is no candidate
    assert isinstance(row["val_log_loss"], float) and np.isfinite(row["val_log_loss"])
    assert [a["name"] for a in row["augment"]] == ["random_resized_crop"]  # the dataset's own list, with parameters
    assert row["augment"][0]["scale"] == [0.35, 1.0]
    (point,) = [p for p in bench["fewshot"] if p["family"] == "finetune" and p["shots"] == 2]
    assert isinstance(point["backbone_updated"], bool) and point["fine_tune_epochs"] >= 0
    assert [a["name"] for a in point["augment"]] == ["random_resized_crop"]  # few-shot fine-tuning gets it too


def test_heads_carry_val_log_loss_where_they_have_probabilities(bench: dict[str, Any]) -> None:
    heads = {r["strategy"]: r for r in bench["rows"] if r["family"] == "features"}
    for kind in ("logreg", "knn"):
        assert isinstance(heads[kind]["val_log_loss"], float) and heads[kind]["val_log_loss"] >= 0, kind
    assert heads["linear-svm"]["val_log_loss"] is None


def test_both_families_charge_the_backbone_build(bench: dict[str, Any]) -> None:
    for r in bench["rows"]:
        assert r["build_seconds"] > 0 and r["wall_seconds"] >= r["build_seconds"], r["strategy"]
    assert bench["extraction"]["build_seconds"] == bench["rows"][0]["build_seconds"]


def test_layer_points_carry_test_predictions_and_the_report_pairs_the_layer_probe(bench: dict[str, Any]) -> None:
    head = bench["rows"][0]
    points = bench["layerwise"]
    assert len(points) >= 2
    for p in points:
        assert p["test_positions"] == head["test_positions"] and p["test_labels"] == head["test_labels"]
        assert len(p["test_predictions"]) == len(p["test_positions"]) == 12
        assert p["accuracy"] == pytest.approx(np.mean(np.array(p["test_predictions"]) == np.array(p["test_labels"])))
        assert isinstance(p["val_log_loss"], float) and np.isfinite(p["val_log_loss"])

    # make the shallowest layer the val choice (the tiny set ties everything on val): the report pairs it, on the
    # predictions and positions the bench recorded
    ds = copy.deepcopy(bench)
    for r in ds["rows"]:
        r["val_accuracy"] = 0.5 if r["family"] == "features" else r["val_accuracy"]
    for i, p in enumerate(ds["layerwise"]):
        p["val_accuracy"] = 1.0 if i == 0 else 0.5
    layer = ds["layerwise"][0]["layer"]
    cmp = compare_chosen(ds)
    assert not cmp["layer_unpaired"] and cmp["head"].strategy == f"logreg on {layer}" and cmp["paired"] is not None
    assert cmp["paired"]["n"] == 12
    assert cmp["paired"]["acc_b"] == pytest.approx(ds["layerwise"][0]["accuracy"])  # b: the layer probe
    text = verdict(ds)
    assert f"a logistic-regression probe on {layer}" in text and "cannot be paired" not in text
    md = render_report({"meta": {}, "datasets": {"shapes": ds}})
    assert "so it is the features family's choice in the verdict below." in md and "(unpaired" not in md


def test_augment_setting_per_dataset_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_imagefolder(tmp_path / "ds", {"train": 2}, n_classes=2)
    other = make_imagefolder(tmp_path / "other", {"train": 2}, n_classes=2)
    config = BenchConfig(datasets=[str(data), str(other)], augment={"ds": ["random_resized_crop"], "nowhere": ["hflip"]})
    assert config.finetune_for(str(data))["augment"] == ["random_resized_crop"]
    assert "augment" not in config.finetune_for(str(other))  # unset: fine-tuning's default list
    assert unmatched_dataset_keys(config) == {"augment": ["nowhere"]}
    assert BenchConfig(augment=["none"]).augment_for("anything") == ["none"]

    # part of the fine-tuning cells' fingerprint through their config; the default written out changes nothing
    assert finetune_identity({"augment": ["none"]}, "full")["augment"] == []
    default = finetune_identity({}, "full")
    assert default == finetune_identity({"augment": list(AUGMENTATIONS)}, "full")
    assert default != finetune_identity({"augment": ["random_resized_crop"]}, "full")

    (tmp_path / "grid.yaml").write_text(f"datasets: [{data}]\naugment: {{ds: [random_resized_crop, blur]}}\n")
    assert main(["-q", "bench", "--config", str(tmp_path / "grid.yaml"), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featx: error: bench setting augment.ds must be") and "'blur'" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()

    (tmp_path / "grid.yaml").write_text(f"datasets: [{data}]\naugment: [hflip]\nfinetune: {{augment: [affine]}}\n")
    with pytest.raises(UsageError, match=r"augment and finetune\.augment"):
        load_bench_config(tmp_path / "grid.yaml")
