"""Fine-tuning: real torch on tiny generated images (random-init ResNet-10t at 32 px keeps each run ~1 s)."""

from __future__ import annotations

import _thread
import copy
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featx.backbones import build_backbone
from featx.data import SplitPlan, load_dataset, sample_per_class
from featx.errors import MismatchError, UsageError
from featx.finetuning import FinetuneConfig, finetune, init_head_from_probe, train_one_epoch

BACKBONE = "timm:resnet10t"
WEIGHTS = "none"
SIZE = 32
COLOURS = [(210, 40, 40), (40, 190, 60), (40, 60, 210)]
FAST = {"batch_size": 8, "num_workers": 0, "device": "cpu", "lr": 0.05, "warmup_epochs": 0.5, "early_stopping_patience": 0}


def _make_dataset(root: Path, counts: dict[str, int], n_classes: int = 3, seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png: one noisy colour per class, stripes to give the convolutions edges."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in range(n_classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.tile(np.array(COLOURS[c], np.float32), (40, 40, 1))
                img[:, (np.arange(40) // 5) % 2 == 1] *= 0.6
                img += rng.normal(0, 20, img.shape)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("colours"), {"train": 8, "val": 4, "test": 4})


def run(dataset: Path, out_dir: Path, *, resume: bool = False, image_size: int = SIZE, **cfg: Any) -> dict[str, Any]:
    return finetune(
        dataset,
        backbone=BACKBONE,
        weights=WEIGHTS,
        image_size=image_size,
        config=FinetuneConfig(**{**FAST, **cfg}),
        out_dir=out_dir,
        resume=resume,
        progress=False,
    )


def load_ckpt(out_dir: Path) -> dict[str, Any]:
    return torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def initial_backbone_state() -> dict[str, torch.Tensor]:
    bb = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE)  # weights "none" are seeded: same init every time
    return {f"backbone.{k}": v.clone() for k, v in bb.model.state_dict().items()}


def test_full_finetune_beats_chance_and_writes_result(colours: Path, tmp_path: Path) -> None:
    res = run(colours, tmp_path, strategy="full", epochs=4)
    assert res["metrics"]["accuracy"] >= 0.75  # chance is 1/3
    assert res["n_train"] == 24 and res["n_val"] == 12 and res["n_test"] == 12
    assert res["epochs_run"] == 4 and [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert res["val_accuracy"] == max(h["val_accuracy"] for h in res["history"])
    assert res["trainable_params"] == res["total_params"] > 0
    assert res["train_images_per_s"] > 0 and res["peak_memory_mb"] > 0 and res["lp_stage"] is None
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(res))
    assert load_ckpt(tmp_path)["epoch"] == 3


def test_early_stopping_scores_test_with_best_weights(colours: Path, tmp_path: Path) -> None:
    ds = load_dataset(colours)
    ds = replace(ds, splits={**ds.splits, "test": replace(ds.splits["val"], name="test")})  # test = val images
    cfg = FinetuneConfig(**{**FAST, "epochs": 6, "lr": 0.5, "early_stopping_patience": 1, "freeze_bn_stats": False})
    res = finetune(ds, backbone=BACKBONE, weights=WEIGHTS, image_size=SIZE, config=cfg, out_dir=tmp_path, progress=False)
    assert res["stopped_early"] and res["epochs_run"] == res["best_epoch"] + 1 < 6
    assert res["history"][-1]["val_accuracy"] < res["val_accuracy"]  # LR too high: the last weights are worse
    assert res["metrics"]["accuracy"] == res["val_accuracy"]  # test was scored with the best weights


def _interrupt_when_exists(path: Path, stop: threading.Event) -> threading.Thread:
    """Ctrl-C for the main thread as soon as ``path`` appears (the first epoch's checkpoint)."""

    def watch() -> None:
        while not stop.is_set():
            if path.exists():
                _thread.interrupt_main()
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_resume_after_interrupt_matches_uninterrupted_run(colours: Path, tmp_path: Path) -> None:
    cfg = {"strategy": "full", "epochs": 3}
    whole = run(colours, tmp_path / "whole", **cfg)

    stop = threading.Event()
    watcher = _interrupt_when_exists(tmp_path / "cut" / "checkpoint.pt", stop)
    with pytest.raises(KeyboardInterrupt):
        run(colours, tmp_path / "cut", **cfg)
    stop.set()
    watcher.join()
    saved = load_ckpt(tmp_path / "cut")
    assert saved["epoch"] < 2  # really cut short
    assert not (tmp_path / "cut" / "result.json").exists()

    resumed = run(colours, tmp_path / "cut", resume=True, **cfg)
    assert resumed["resumed_from_epoch"] == saved["epoch"] + 1
    assert len(resumed["history"]) == 3
    assert resumed["history"][: saved["epoch"] + 1] == saved["history"]  # same timings: not re-run
    final, reference = load_ckpt(tmp_path / "cut")["model"], load_ckpt(tmp_path / "whole")["model"]
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert resumed["metrics"]["confusion_matrix"] == whole["metrics"]["confusion_matrix"]
    assert [h["val_accuracy"] for h in resumed["history"]] == [h["val_accuracy"] for h in whole["history"]]

    longer = run(colours, tmp_path / "whole", resume=True, **{**cfg, "epochs": 4})  # continue a finished run
    assert longer["resumed_from_epoch"] == 3 and longer["history"][:3] == whole["history"]
    assert len(longer["history"]) == 4


def test_partial_freezes_all_but_last_block_and_frozen_bn_stats(colours: Path, tmp_path: Path) -> None:
    bb = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE)
    prefixes = tuple("backbone." + p for p in bb.blocks[-1])
    start = initial_backbone_state()
    res = run(colours, tmp_path, strategy="partial", trainable_blocks=1, epochs=1, freeze_bn_stats=False)
    after = load_ckpt(tmp_path)["model"]
    params = {f"backbone.{n}": p.numel() for n, p in bb.model.named_parameters()}
    expected = sum(n for k, n in params.items() if k.startswith(prefixes)) + bb.feature_dim * 3 + 3
    assert res["trainable_params"] == expected < res["total_params"]
    for key, value in start.items():
        if not key.startswith(prefixes):
            assert torch.equal(after[key], value), f"frozen {key} changed"  # weights and BN running stats
    trained = [k for k in params if k.startswith(prefixes)]
    assert all(not torch.equal(after[k], start[k]) for k in trained if k.endswith("weight"))
    bn_stats = [k for k in start if k.startswith(prefixes) and k.endswith("running_mean")]
    assert bn_stats and all(not torch.equal(after[k], start[k]) for k in bn_stats)  # trainable BN: train mode


def test_freeze_bn_stats_keeps_every_running_statistic_but_trains_bn_affine(colours: Path, tmp_path: Path) -> None:
    start = initial_backbone_state()
    run(colours, tmp_path, strategy="full", epochs=1)  # freeze_bn_stats defaults to True
    after = load_ckpt(tmp_path)["model"]
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], start[k]) for k in stats)
    bn_weights = [k.replace("running_mean", "weight") for k in stats if k.endswith("running_mean")]
    assert any(not torch.equal(after[k], start[k]) for k in bn_weights)


def test_few_shot_train_rows_leave_val_and_test_whole(colours: Path, tmp_path: Path) -> None:
    ds = load_dataset(colours)
    plan = SplitPlan()
    train_labels = ds.split("train").labels[plan.resolve(ds)["train"][1]]
    rows = sample_per_class(train_labels, 2, seed=1)  # what the bench does for a 2-shot draw
    res = finetune(
        ds,
        backbone=BACKBONE,
        weights=WEIGHTS,
        image_size=SIZE,
        config=FinetuneConfig(**FAST, epochs=1),
        split_plan=plan,
        train_rows=rows,
        out_dir=tmp_path,
        progress=False,
    )
    assert (res["n_train"], res["n_val"], res["n_test"]) == (6, 12, 12)
    assert res["history"][0]["images"] == 6


def test_head_trains_only_the_linear_layer(colours: Path, tmp_path: Path) -> None:
    start = initial_backbone_state()
    res = run(colours, tmp_path, strategy="head", epochs=2)
    after = load_ckpt(tmp_path)["model"]
    assert res["trainable_params"] == 512 * 3 + 3
    assert all(torch.equal(after[k], v) for k, v in start.items())  # incl. BN running stats
    momentum = load_ckpt(tmp_path)["optimizer"]["state"]
    assert len(momentum) == 2 and all(s["momentum_buffer"].abs().sum() > 0 for s in momentum.values())


def test_lp_ft_initialises_head_from_probe(colours: Path, tmp_path: Path) -> None:
    res = run(colours, tmp_path, strategy="lp-ft", epochs=1, lr=0.01)
    lp = res["lp_stage"]
    assert lp["val_accuracy"] >= 0.75  # chance is 1/3
    assert lp["head_val_accuracy"] == lp["val_accuracy"]  # the torch head predicts what the probe predicts
    assert lp["seconds"] > 0 and lp["C"] in lp["c_grid"]
    assert res["trainable_params"] == res["total_params"]
    assert res["wall_seconds"] > lp["seconds"] + res["train_seconds"]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_copy_reproduces_sklearn_probabilities(n_classes: int) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.0, (n_classes, 16))
    y = np.arange(120) % n_classes
    x = (centres[y] + rng.normal(0, 1.2, (120, 16))).astype(np.float32)
    linear = nn.Linear(16, n_classes)
    info = init_head_from_probe(linear, x[:80], y[:80], x[80:], y[80:])
    ref = LogisticRegression(C=info["C"], max_iter=1000).fit(x[:80], y[:80])
    with torch.no_grad():
        probs = torch.softmax(linear(torch.from_numpy(x[80:])), dim=1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(x[80:]), atol=2e-3)
    assert info["head_val_accuracy"] == info["val_accuracy"] == max(info["val_accuracy_curve"])


def _step_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g), torch.arange(6), [""] * 6) for _ in range(2)]


def _train_tiny(model: nn.Module, precision: str) -> dict[str, float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return train_one_epoch(model, nn.CrossEntropyLoss(), opt, sched, _step_batches(), torch.device("cpu"), precision, None, False)


def test_fp32_step_equals_manual_sgd_and_bf16_step_runs() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    manual = copy.deepcopy(base)
    for x, y, _, _ in _step_batches():  # plain SGD by hand: exactly one update per batch
        grads = torch.autograd.grad(nn.functional.cross_entropy(manual(x), y), list(manual.parameters()))
        with torch.no_grad():
            for p, g in zip(manual.parameters(), grads):
                p -= 0.1 * g
    fp32 = copy.deepcopy(base)
    stats = _train_tiny(fp32, "fp32")
    assert stats["images"] == 12
    for p, q in zip(fp32.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q)
    bf16 = copy.deepcopy(base)
    stats = _train_tiny(bf16, "bf16")
    assert np.isfinite(stats["loss"])
    for p, q, p0 in zip(bf16.parameters(), fp32.parameters(), base.parameters()):
        assert p.dtype == torch.float32 and not torch.equal(p, p0)  # weights stay fp32, and they moved
        assert not torch.equal(p, q)  # autocast really ran in bf16 ...
        torch.testing.assert_close(p, q, atol=3e-2, rtol=0)  # ... and stayed close to fp32


def test_config_validation_message() -> None:
    with pytest.raises(UsageError, match=r"^The 'lr' parameter of FinetuneConfig must be > 0\. Got -1 instead\.$"):
        FinetuneConfig(lr=-1).validate()
    FinetuneConfig().validate()


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"strategy": "linear"}, "'strategy' parameter"),
        ({"augment": ("rotate",)}, "'augment' parameter"),
        ({"epochs": 0}, "'epochs' parameter"),
        ({"precision": "fp16"}, "fp16 needs a CUDA device"),
    ],
)
def test_usage_errors_come_before_any_work(tmp_path: Path, cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):  # the dataset does not even exist: no DataError first
        finetune(tmp_path / "missing", config=FinetuneConfig(**{**FAST, **cfg}), out_dir=tmp_path / "out")


def test_usage_and_mismatch_errors(colours: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"trainable_blocks must be in \[1, 5\]"):
        run(colours, tmp_path, strategy="partial", trainable_blocks=6)
    with pytest.raises(UsageError, match="no checkpoint"):
        run(colours, tmp_path, resume=True)
    with pytest.raises(UsageError, match="train_rows"):
        finetune(colours, backbone=BACKBONE, weights=WEIGHTS, config=FinetuneConfig(**FAST), out_dir=tmp_path, train_rows=[0, 24])
    run(colours, tmp_path, strategy="head", epochs=1)
    with pytest.raises(MismatchError, match=r"lr=0\.05, this run has lr=0\.1"):
        run(colours, tmp_path, resume=True, strategy="head", epochs=2, lr=0.1)
    with pytest.raises(MismatchError, match="32 px"):
        run(colours, tmp_path, resume=True, strategy="head", epochs=2, image_size=48)
