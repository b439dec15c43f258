"""featx bench: both families get the same rows and the same few-shot draws, the final fit follows the protocol,
finished cells are skipped, and ``-q`` quiets the cells' own processes."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from featx.bench import BenchConfig, FewShotConfig, load_bench_config, run_bench
from featx.cli import main
from featx.data import SAMPLE_DATASET, SplitPlan, load_dataset, sample_per_class
from featx.errors import UsageError

from .conftest import make_imagefolder

TINY = {"backbones": ["timm:resnet10t"], "weights": "none", "image_size": 32, "device": "cpu"}


def sample_config() -> BenchConfig:
    """The embedded sample (15 train / 4 val / 6 test per class), capped at 5 training images per class."""
    return BenchConfig(
        datasets=[str(SAMPLE_DATASET)],
        **TINY,
        heads=["logreg", "knn"],
        strategies=["full"],
        finetune={"epochs": 1, "batch_size": 16, "num_workers": 0, "optimizer": "adamw"},
        finetune_grid={"lr": [1e-3, 1e-2], "weight_decay": [0.0]},
        max_train_per_class=5,
        fewshot=FewShotConfig(
            shots=[1, 2], draws=5, finetune_strategy="full", finetune_shots=[2], finetune_draws=3, finetune_rule_steps=4
        ),
        layerwise=True,
        budget_notes=["tiny test grid"],
    )


def test_bench_same_rows_same_draws_and_final_fit(tmp_path: Path) -> None:
    config = sample_config()
    out = run_bench(config, out_dir=tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert out["failed"] == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    ds = results["datasets"]["clothing10"]
    rows = ds["rows"]
    assert [(r["family"], r["strategy"]) for r in rows] == [("features", "logreg"), ("features", "knn"), ("finetune", "full")]

    # the rows the protocol says, computed here from the split plan: capped train, whole val and test
    data = load_dataset(SAMPLE_DATASET)
    expected_train = sample_per_class(data.split("train").labels, 5, seed=0).tolist()
    expected = {"train": expected_train, "val": list(range(40)), "test": list(range(60))}
    for r in rows:
        assert r["train_positions"] == expected["train"], r["strategy"]
        assert r["val_positions"] == expected["val"], r["strategy"]
        assert r["test_positions"] == expected["test"], r["strategy"]
        assert r["test_labels"] == data.split("test").labels.tolist()
        assert len(r["test_predictions"]) == 60 and 0.0 <= r["accuracy"] <= 1.0
        assert r["accuracy"] == pytest.approx(np.mean(np.array(r["test_predictions"]) == data.split("test").labels))
        # final fit on train + val for both families, with the row counts to show it
        assert r["final_fit"] == "train+val" and r["n_fit"] == 50 + 40, r["strategy"]
        assert r["memory_kind"] == "rss" and r["host_rss_mb"] > 0 and r["wall_seconds"] > 0
    heads = [r for r in rows if r["family"] == "features"]
    assert all(isinstance(r["at_grid_edge"], bool) and r["val_accuracy"] is not None for r in heads)
    ft = rows[-1]
    assert {(g["lr"], g["weight_decay"]) for g in ft["grid"]} == {(1e-3, 0.0), (1e-2, 0.0)}
    assert ft["best_epoch"] is not None and ft["epochs_budget"] == 1 and isinstance(ft["still_improving"], bool)
    assert results["meta"]["protocol"]["final_fit"] == "train+val"

    # few-shot: exactly k labels per class for the heads; fine-tuning draw d == head draw d, image for image
    train_labels = data.split("train").labels
    points = [p for p in ds["fewshot"] if p["shots"] != "all"]
    head_points = [p for p in points if p["family"] == "features"]
    ft_points = [p for p in points if p["family"] == "finetune"]
    assert sorted({(p["shots"], p["draw"]) for p in head_points}) == [(k, d) for k in (1, 2) for d in range(5)]
    assert sorted((p["shots"], p["draw"]) for p in ft_points) == [(2, 0), (2, 1), (2, 2)]
    for p in head_points:
        k = p["shots"]
        assert p["n_fit"] == 10 * k
        assert Counter(train_labels[p["train_positions"]].tolist()) == dict.fromkeys(range(10), k)
        assert p["selection"] == ("rule" if k == 1 else "cv")
    draws = {(p["shots"], p["draw"], p["method"]): p["train_positions"] for p in head_points}
    for p in ft_points:
        assert p["selection"] == "rule"
        assert p["train_positions"] == draws[(2, p["draw"], "logreg")] == draws[(2, p["draw"], "knn")]
    assert len({tuple(draws[(2, d, "logreg")]) for d in range(3)}) == 3  # draws differ from each other
    assert all(p["val_accuracy"] is not None for p in ds["layerwise"])

    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Dataset: clothing10" in report and "tiny test grid" in report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (tmp_path / "out" / link).read_bytes()[:4] == b"\x89PNG"

    # a second run skips every finished cell; removing one cell re-runs exactly that one
    cells = sorted((tmp_path / "out" / "cells").glob("*.json"))
    mtimes = {c: c.stat().st_mtime_ns for c in cells}
    (layerwise,) = (tmp_path / "out" / "cells").glob("clothing10-*-timm_resnet10t-layerwise.json")  # name, path hash, backbone
    layerwise.unlink()
    again = run_bench(config, out_dir=tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert again["failed"] == 0
    assert {c: c.stat().st_mtime_ns for c in cells if "layerwise" not in c.name} == {
        c: m for c, m in mtimes.items() if "layerwise" not in c.name
    }
    assert json.loads((tmp_path / "out" / "results.json").read_text())["datasets"]["clothing10"]["rows"] == rows


def test_cli_final_fit_train_carved_splits_and_quiet_children(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """``--final-fit train`` makes both families train on train only; ``-q`` silences the cells' processes."""
    data = make_imagefolder(tmp_path / "data", {"train": 12}, n_classes=3)  # val and test carved from train
    grid = {
        "datasets": [str(data)],
        **TINY,
        "heads": ["logreg"],
        "strategies": ["head"],
        "finetune": {"epochs": 1, "batch_size": 8, "num_workers": 0},
        "finetune_grid": {"lr": [0.01], "weight_decay": [0.0]},
        "fewshot": None,
        "layerwise": False,
    }
    (tmp_path / "grid.yaml").write_text(json.dumps(grid))  # JSON is YAML
    args = ["bench", "--config", str(tmp_path / "grid.yaml"), "--cache-dir", str(tmp_path / "cache")]
    assert main(["-q", *args, "--out-dir", str(tmp_path / "quiet"), "--final-fit", "train"]) == 0
    err = capfd.readouterr().err
    assert "runs in process" not in err and "INFO" not in err and "img/s" not in err

    results = json.loads((tmp_path / "quiet" / "results.json").read_text())
    assert results["meta"]["protocol"]["final_fit"] == "train"
    rows = results["datasets"]["data"]["rows"]
    carved = SplitPlan().carve(load_dataset(data).split("train").labels, has_val=False, has_test=False)
    assert [r["family"] for r in rows] == ["features", "finetune"]
    for r in rows:
        for split in ("train", "val", "test"):
            assert r[f"{split}_positions"] == carved[split].tolist(), (r["strategy"], split)
        assert r["final_fit"] == "train" and r["n_fit"] == len(carved["train"])

    # without -q the cells' own processes log (the features cell is a fresh process)
    grid["strategies"] = []
    (tmp_path / "grid.yaml").write_text(json.dumps(grid))
    assert main([*args, "--out-dir", str(tmp_path / "loud")]) == 0
    assert "runs in process" in capfd.readouterr().err


def test_bench_config_errors(tmp_path: Path) -> None:
    cases = {
        "datasets: [nowhere]\n": "bench dataset not found",
        "colour: blue\n": "unknown bench setting",
        "strategies: [magic]\n": "unknown strategy",
        "final_fit: test\n": "final_fit must be one of",
        "finetune_grid: {lr: []}\n": "finetune_grid",
        "fewshot: {shots: [1, 2], finetune_shots: [5]}\n": "not in shots",
        "fewshot: {draws: 2, finetune_draws: 3}\n": "finetune_draws",
    }
    for text, message in cases.items():
        (tmp_path / "grid.yaml").write_text(text)
        with pytest.raises(UsageError, match=message):
            load_bench_config(tmp_path / "grid.yaml")
    (tmp_path / "grid.yaml").write_text("final_fit: train\n")
    assert load_bench_config(tmp_path / "grid.yaml").final_fit == "train"
    assert load_bench_config(tmp_path / "grid.yaml", final_fit="train+val").final_fit == "train+val"
    defaults = BenchConfig()
    assert defaults.fewshot is not None and defaults.fewshot.draws >= 5 and defaults.fewshot.finetune_draws >= 3
    assert defaults.final_fit == "train+val"


@pytest.mark.slow
def test_quick_bench_on_the_embedded_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's main job, end to end (a few minutes on 2 CPU cores)."""
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "bench", "--quick"]) == 0
    out = tmp_path / "runs" / "bench-quick"
    results = json.loads((out / "results.json").read_text())
    rows = results["datasets"]["clothing10"]["rows"]
    assert {r["strategy"] for r in rows} == {"logreg", "linear-svm", "knn", "head", "lp-ft"}
    assert all(r["accuracy"] > 0.3 for r in rows)  # 10 classes: chance is 0.1
    assert len({tuple(r["test_positions"]) for r in rows}) == 1
    assert (out / "clothing10_fewshot.png").is_file() and (out / "clothing10_layerwise.png").is_file()
    assert "report:" in capsys.readouterr().out
