"""Fine-tuning: real torch on tiny generated images (random-init ResNet-10t at 32 px keeps each run ~1 s).

Protocol tests (issue 12): the final fit's rows, ties in early stopping, lp-ft's epoch 0, selection that never
sees test labels, the few-shot rule that never sees val, the readable epoch line; the load_digits comparison
with pretrained weights is marked slow.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
from collections import OrderedDict
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
from featx.finetuning import (
    AUGMENTATIONS,
    FinetuneConfig,
    best_grid_index,
    finetune,
    finetune_search,
    fit_probe_fixed_c,
    format_epoch_line,
    hyper_rule,
    train_one_epoch,
    train_transform,
)
from featx.finetuning.env import make_loader
from featx.finetuning.loop import TrainState

BACKBONE = "timm:resnet10t"
WEIGHTS = "none"
SIZE = 32
COLOURS = [(210, 40, 40), (40, 190, 60), (40, 60, 210)]
FAST = {
    "optimizer": "sgd",
    "batch_size": 8,
    "num_workers": 0,
    "device": "cpu",
    "lr": 0.05,
    "warmup_epochs": 0.5,
    "early_stopping_patience": 0,
}


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


def run(
    dataset: Path | Any, out_dir: Path, *, resume: bool = False, image_size: int = SIZE, final_fit: str = "train", **cfg: Any
) -> dict[str, Any]:
    """``final_fit="train"`` unless a test is about the refit: half the training per run."""
    return finetune(
        dataset,
        backbone=BACKBONE,
        weights=WEIGHTS,
        image_size=image_size,
        config=FinetuneConfig(**{**FAST, **cfg}),
        out_dir=out_dir,
        resume=resume,
        progress=False,
        final_fit=final_fit,
    )


def load_ckpt(out_dir: Path) -> dict[str, Any]:
    return torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def _val_loss_and_accuracy(state: dict[str, torch.Tensor], dataset: Path) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the val images of a saved model state, computed here from the files."""
    bb = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE)
    model = nn.Sequential(OrderedDict(backbone=bb.model, head=nn.Sequential(nn.Dropout(0.2), nn.Linear(bb.feature_dim, 3))))
    model.load_state_dict(state)
    model.eval()
    val = load_dataset(dataset).split("val")
    tf = bb.preprocessing.build_transform()
    x = torch.stack([tf(Image.open(val.root / p).convert("RGB")) for p in val.paths])
    y = torch.from_numpy(val.labels)
    with torch.no_grad():
        logits = model(x)
    return nn.functional.cross_entropy(logits, y).item(), float((logits.argmax(1) == y).float().mean())


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
    ckpt = load_ckpt(tmp_path)
    assert ckpt["epoch"] == 3
    # val log-loss: recomputed from the saved weights of the chosen epoch, beside val accuracy everywhere
    best = next(h for h in res["history"] if h["epoch"] == res["best_epoch"])
    assert res["val_log_loss"] == best["val_log_loss"] == ckpt["best_val_log_loss"]
    assert all(h["val_log_loss"] > 0 for h in res["history"])
    loss, acc = _val_loss_and_accuracy(ckpt["best_state"], colours)
    assert acc == res["val_accuracy"] and res["val_log_loss"] == pytest.approx(loss, rel=1e-5)
    assert res["backbone_updated"] is True and res["fine_tune_epochs"] == res["best_epoch"] >= 1


def test_early_stopping_scores_test_with_best_weights(colours: Path, tmp_path: Path) -> None:
    ds = load_dataset(colours)
    ds = replace(ds, splits={**ds.splits, "test": replace(ds.splits["val"], name="test")})  # test = val images
    cfg = FinetuneConfig(**{**FAST, "epochs": 6, "lr": 0.5, "early_stopping_patience": 1, "freeze_bn_stats": False})
    res = finetune(
        ds, backbone=BACKBONE, weights=WEIGHTS, image_size=SIZE, config=cfg, out_dir=tmp_path, progress=False, final_fit="train"
    )
    assert res["stopped_early"] and res["epochs_run"] == res["best_epoch"] + 1 < 6
    assert res["history"][-1]["val_accuracy"] < res["val_accuracy"]  # LR too high: the last weights are worse
    assert res["metrics"]["accuracy"] == res["val_accuracy"]  # test was scored with the best weights


def _ctrl_c_after_checkpoints(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """A real SIGINT, sent by the run to itself once its ``n``-th checkpoint is durable (a failpoint: exact, no race)."""
    monkeypatch.setenv("FEATX_FAILPOINTS", f"finetune.checkpoint_saved={n}:SIGINT")


def test_resume_after_interrupt_matches_uninterrupted_run(colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"strategy": "full", "epochs": 3}
    whole = run(colours, tmp_path / "whole", **cfg)

    _ctrl_c_after_checkpoints(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(colours, tmp_path / "cut", **cfg)
    monkeypatch.delenv("FEATX_FAILPOINTS")
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
    res = run(colours, tmp_path, strategy="full", epochs=1)  # freeze_bn_stats defaults to True
    assert res["backbone_updated"] is True and res["fine_tune_epochs"] == 1  # full, one epoch: a fine-tuned backbone
    assert res["history"][0]["steps"] == 3  # 24 images at batch 8
    after = load_ckpt(tmp_path)["model"]
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], start[k]) for k in stats)
    bn_weights = [k.replace("running_mean", "weight") for k in stats if k.endswith("running_mean")]
    assert any(not torch.equal(after[k], start[k]) for k in bn_weights)


def test_few_shot_train_rows_leave_val_and_test_whole(colours: Path, tmp_path: Path) -> None:
    ds = load_dataset(colours)
    plan = SplitPlan()
    train_labels = ds.split("train").labels[plan.resolve(ds)["train"].array]
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
        final_fit="train",
    )
    assert (res["n_train"], res["n_val"], res["n_test"]) == (6, 12, 12)
    assert res["history"][0]["images"] == 6


def test_head_trains_only_the_linear_layer(colours: Path, tmp_path: Path) -> None:
    start = initial_backbone_state()
    res = run(colours, tmp_path, strategy="head", epochs=2)
    after = load_ckpt(tmp_path)["model"]
    assert res["trainable_params"] == 512 * 3 + 3
    assert res["backbone_updated"] is False and res["fine_tune_epochs"] == 0 and res["best_epoch"] >= 1  # the head trained
    assert all(torch.equal(after[k], v) for k, v in start.items())  # incl. BN running stats
    momentum = load_ckpt(tmp_path)["optimizer"]["state"]
    assert len(momentum) == 2 and all(s["momentum_buffer"].abs().sum() > 0 for s in momentum.values())


def test_lp_ft_initialises_head_from_probe(colours: Path, tmp_path: Path) -> None:
    res = run(colours, tmp_path, strategy="lp-ft", epochs=1, lr=0.01)
    lp = res["lp_stage"]
    assert lp["val_accuracy"] >= 0.75 and lp["standardized"]  # chance is 1/3
    assert lp["head_val_accuracy"] == lp["val_accuracy"]  # the torch head predicts what the probe predicts
    assert lp["C"] in [p["C"] for p in lp["curve"]] and lp["seconds"] > 0
    assert res["history"][0]["epoch"] == 0 and res["history"][0]["val_accuracy"] == lp["val_accuracy"]
    assert res["trainable_params"] == res["total_params"]
    assert res["wall_seconds"] > lp["seconds"] + res["train_seconds"]
    # whichever epoch val kept, the record says whether the final model is a fine-tuned network or the probe
    assert res["backbone_updated"] is (res["best_epoch"] >= 1) and res["fine_tune_epochs"] == res["best_epoch"]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_copy_reproduces_fit_head_logreg_probabilities(n_classes: int) -> None:
    from featx.heads import make_head

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.0, (n_classes, 16))
    y = np.arange(120) % n_classes
    x = (centres[y] + rng.normal(0, 1.2, (120, 16))).astype(np.float32) * np.linspace(0.1, 50, 16, dtype=np.float32)
    coef, intercept = fit_probe_fixed_c(x[:80], y[:80], 0.3, n_classes=n_classes + 1)  # one class never seen
    ref = make_head("logreg", C=0.3).fit(x[:80], y[:80])  # fit-head's pipeline: StandardScaler + LogisticRegression
    logits = torch.from_numpy(x[80:]) @ torch.from_numpy(coef).T + torch.from_numpy(intercept)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    assert probs[:, n_classes].max() < 1e-3  # the absent class is never predicted
    np.testing.assert_allclose(probs[:, :n_classes], ref.predict_proba(x[80:]), atol=2e-3)


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


def test_default_recipe_is_adamw_and_sgd_keeps_its_own(colours: Path, tmp_path: Path) -> None:
    """AdamW 3e-3 / wd 0.05 by default (SGD 0.01 collapsed on digits); --optimizer sgd gets SGD's numbers; explicit wins."""
    from featx.cli import main

    assert (FinetuneConfig().optimizer, FinetuneConfig().lr, FinetuneConfig().weight_decay) == ("adamw", 3e-3, 0.05)
    assert (FinetuneConfig(optimizer="sgd").lr, FinetuneConfig(optimizer="sgd").weight_decay) == (0.01, 1e-4)
    assert FinetuneConfig(optimizer="sgd", lr=0.2, weight_decay=0.0).to_dict()["lr"] == 0.2
    assert replace(FinetuneConfig(), lr=1e-4).weight_decay == 0.05
    out = tmp_path / "ft"
    argv = ["-q", "finetune", str(colours), "--strategy", "head", "--epochs", "1", "--image-size", str(SIZE)]
    argv += ["--num-workers", "0", "--device", "cpu", "--final-fit", "train", "--out-dir", str(out)]
    assert main(argv) == 0
    cfg = json.loads((out / "result.json").read_text())["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"]) == ("adamw", 3e-3, 0.05)
    assert main([*argv, "--optimizer", "sgd", "--out-dir", str(tmp_path / "sgd")]) == 0
    cfg = json.loads((tmp_path / "sgd" / "result.json").read_text())["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"]) == ("sgd", 0.01, 1e-4)


def test_package_import_is_torch_free_and_every_public_name_resolves() -> None:
    # the bench reads STRATEGIES and the augmentation registry while it checks a config: no torch for that
    code = (
        "import sys, featx.finetuning as f; print('torch' in sys.modules); "
        "[getattr(f, n) for n in f.__all__]; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    import featx.finetuning as ft
    from featx.finetuning import checkpoints, loop, probe, run

    assert ft.finetune is run.finetune and ft.train_one_epoch is loop.train_one_epoch
    assert ft.RESUMABLE_FIELDS is checkpoints.RESUMABLE_FIELDS and ft.fit_probe_fixed_c is probe.fit_probe_fixed_c
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ft.nope  # noqa: B018


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
    with pytest.raises(MismatchError, match=r"augment=\['random_resized_crop', 'hflip', 'affine'\], this run has augment=\[\]"):
        run(colours, tmp_path, resume=True, strategy="head", epochs=2, augment="none")
    with pytest.raises(MismatchError, match="32 px"):
        run(colours, tmp_path, resume=True, strategy="head", epochs=2, image_size=48)


# --------------------------------------------------------------------------------------------------
# Protocol (issue 12)


def _positions(ds_path: Path) -> dict[str, list[list[Any]]]:
    """Dataset positions of each split, computed from the default plan independently of finetune."""
    resolved = SplitPlan().resolve(load_dataset(ds_path))
    return {name: [[rows.split, int(r)] for r in rows.positions] for name, rows in resolved.items()}


def test_final_fit_retrains_on_train_plus_val_rows_for_the_chosen_epochs(colours: Path, tmp_path: Path) -> None:
    res = run(colours, tmp_path, strategy="full", epochs=2, final_fit="train+val")
    pos = _positions(colours)
    assert res["final_fit"] == "train+val" and res["selection"] == "val"
    assert res["train_rows"] == pos["train"] and res["val_rows"] == pos["val"] and res["test_rows"] == pos["test"]
    assert res["fit_rows"] == pos["train"] + pos["val"] and res["n_fit"] == 36
    assert res["final_epochs"] == res["best_epoch"] >= 1  # exactly the epoch count chosen on val
    assert [h["images"] for h in res["final_history"]] == [36] * res["best_epoch"]
    assert all(h["val_accuracy"] is None for h in res["final_history"])  # the refit never looks at val scores
    final = torch.load(tmp_path / "final_checkpoint.pt", map_location="cpu", weights_only=True)
    assert final["stage"] == "final" and final["target_epochs"] == res["best_epoch"]
    assert res["test_labels"] == load_dataset(colours).split("test").labels.tolist()
    assert len(res["test_predictions"]) == 12
    assert res["metrics"]["accuracy"] == np.mean(np.array(res["test_predictions"]) == np.array(res["test_labels"]))
    assert res["peak_memory_mb"] > 0 and res["host_rss_mb"] > 0 and res["memory_kind"] == "rss"

    train_only = run(colours, tmp_path / "train", strategy="full", epochs=2)
    assert train_only["n_fit"] == 24 and train_only["fit_rows"] == pos["train"] and train_only["final_history"] is None


def test_final_fit_resumes_after_interrupt(colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"strategy": "full", "epochs": 3, "final_fit": "train+val"}
    whole = run(colours, tmp_path / "whole", **cfg)
    assert whole["final_epochs"] >= 2  # the refit has more than one epoch to be cut in
    _ctrl_c_after_checkpoints(monkeypatch, whole["epochs_run"] + 1)  # one per selection epoch, then the refit's first
    with pytest.raises(KeyboardInterrupt):
        run(colours, tmp_path / "cut", **cfg)
    monkeypatch.delenv("FEATX_FAILPOINTS")
    saved = (
        load_ckpt(tmp_path / "cut").get("epoch"),
        torch.load(tmp_path / "cut" / "final_checkpoint.pt", weights_only=True)["epoch"],
    )
    assert saved[1] < whole["final_epochs"] - 1  # cut inside the refit
    resumed = run(colours, tmp_path / "cut", resume=True, **cfg)
    assert (
        resumed["final_history"][: saved[1] + 1]
        == torch.load(tmp_path / "cut" / "final_checkpoint.pt", weights_only=True)["history"][: saved[1] + 1]
    )
    assert resumed["test_predictions"] == whole["test_predictions"] and resumed["best_epoch"] == whole["best_epoch"]
    again = run(colours, tmp_path / "whole", resume=True, **cfg)  # resuming a finished run repeats its result
    assert again["test_predictions"] == whole["test_predictions"] and again["final_history"] == whole["final_history"]


def test_ties_count_as_progress_and_reset_patience() -> None:
    model = nn.Linear(2, 2)
    state = TrainState()
    for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.7, 0.6], start=1):
        with torch.no_grad():
            model.bias.fill_(epoch)  # each epoch's weights are recognisable
        state.consider(epoch, acc, model)
    assert state.best_epoch == 4 and state.best_val_accuracy == 0.7  # the later epoch with equal accuracy
    assert state.epochs_without_improvement == 1  # reset at epoch 4
    assert state.best_state is not None and torch.equal(state.best_state["bias"], torch.full((2,), 4.0))


def test_lp_ft_epoch_zero_is_a_candidate(colours: Path, tmp_path: Path) -> None:
    from featx.inference import compute_features

    # lr so large that every update destroys the network: the probe-initialised model (epoch 0) must win
    res = run(colours, tmp_path, strategy="lp-ft", epochs=2, lr=500.0, lp_ft_lr_scale=1.0, early_stopping_patience=0)
    lp = res["lp_stage"]
    assert res["best_epoch"] == 0 and res["history"][0]["epoch"] == 0
    assert all(h["val_accuracy"] < lp["head_val_accuracy"] for h in res["history"][1:])
    assert res["val_accuracy"] == lp["head_val_accuracy"] == lp["val_accuracy"]
    # the returned model is the probe-initialised one: same test predictions as the probe on frozen features
    ds = load_dataset(colours)
    bb = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE)
    X = {n: compute_features(bb, ds.root, ds.split(n).paths, device="cpu", num_workers=0)[0] for n in ("train", "val", "test")}
    from featx.heads import fit_linear_probe

    probe = fit_linear_probe(X["train"], ds.split("train").labels, X["val"], ds.split("val").labels, n_classes=3)
    assert probe.C == lp["C"]
    assert res["test_predictions"] == np.argmax(X["test"] @ probe.coef.T + probe.intercept, axis=1).tolist()
    # a "fine-tuning" result that is a linear probe says so, although the selection run did train the backbone
    assert res["backbone_updated"] is False and res["fine_tune_epochs"] == 0
    assert all(h["steps"] > 0 for h in res["history"][1:])
    # val log-loss of epoch 0 = the probe's cross-entropy on frozen val features, recomputed here
    logits = torch.from_numpy(X["val"] @ probe.coef.T + probe.intercept).double()
    probe_loss = nn.functional.cross_entropy(logits, torch.from_numpy(ds.split("val").labels)).item()
    assert res["val_log_loss"] == res["history"][0]["val_log_loss"] == pytest.approx(probe_loss, rel=1e-4)

    refit = run(colours, tmp_path / "tv", strategy="lp-ft", epochs=2, lr=500.0, lp_ft_lr_scale=1.0, final_fit="train+val")
    assert refit["best_epoch"] == 0 and refit["final_epochs"] == 0 and refit["n_fit"] == 36  # the probe refit on train+val
    assert refit["lp_stage"]["final_n_fit"] == 36 and refit["lp_stage"]["final_C"] == lp["C"]
    assert refit["backbone_updated"] is False and refit["fine_tune_epochs"] == 0 and refit["val_log_loss"] == res["val_log_loss"]


def test_search_selects_on_val_only(colours: Path, tmp_path: Path) -> None:
    ds = load_dataset(colours)
    test = ds.splits["test"]
    shuffled = replace(ds, splits={**ds.splits, "test": replace(test, labels=np.roll(test.labels, 5))})
    grid = {"lr": [0.003, 0.3], "weight_decay": [0.0, 1e-3]}
    out = []
    for i, d in enumerate((ds, shuffled)):
        out.append(
            finetune_search(
                d,
                backbone=BACKBONE,
                weights=WEIGHTS,
                image_size=SIZE,
                config=FinetuneConfig(**{**FAST, "epochs": 1}),
                out_dir=tmp_path / str(i),
                progress=False,
                final_fit="train",
                grid=grid,
            )
        )
    a, b = out
    assert [(r["lr"], r["weight_decay"]) for r in a["grid"]] == [(0.003, 0.0), (0.003, 1e-3), (0.3, 0.0), (0.3, 1e-3)]
    assert [r["val_accuracy"] for r in a["grid"]] == [r["val_accuracy"] for r in b["grid"]]
    assert a["chosen"] == b["chosen"] and a["test_predictions"] == b["test_predictions"]
    assert a["test_labels"] != b["test_labels"]  # the test labels really differed
    best = max(r["val_accuracy"] for r in a["grid"])
    tied = [r for r in a["grid"] if r["val_accuracy"] == best]
    first = min(tied, key=lambda r: r["val_log_loss"])  # ties: lower val log-loss (min keeps the first of equals)
    assert (a["chosen"]["lr"], a["chosen"]["weight_decay"]) == (first["lr"], first["weight_decay"])
    assert a["val_accuracy"] == best and a["config"]["lr"] == first["lr"]
    assert a["val_log_loss"] == a["chosen"]["val_log_loss"] == first["val_log_loss"]
    assert all(r["backbone_updated"] is True and r["best_epoch"] == 1 for r in a["grid"])
    assert (tmp_path / "0" / "grid" / "lr0.003-wd0" / "checkpoint.pt").is_file()
    with pytest.raises(UsageError, match="grid"):
        finetune_search(colours, config=FinetuneConfig(**FAST), out_dir=tmp_path / "x", grid={"lr": [0.0]})


def test_rule_selection_uses_no_val_rows(colours: Path, tmp_path: Path) -> None:
    ds = load_dataset(colours)
    val = ds.splits["val"]
    broken = replace(
        ds, splits={**ds.splits, "val": replace(val, paths=tuple("gone/" + p for p in val.paths), labels=val.labels[::-1])}
    )
    rows = sample_per_class(ds.split("train").labels, 2, seed=3)
    results = []
    for i, d in enumerate((ds, broken)):
        cfg = FinetuneConfig(**{**FAST, "strategy": "lp-ft", "rule_steps": 3})
        results.append(
            finetune(
                d,
                backbone=BACKBONE,
                weights=WEIGHTS,
                image_size=SIZE,
                config=cfg,
                train_rows=rows,
                out_dir=tmp_path / str(i),
                progress=False,
                selection="rule",
            )
        )
    a, b = results
    assert a["val_rows"] == [] and a["n_val"] == 0 and a["val_accuracy"] is None and a["final_fit"] == "train"
    assert a["fit_rows"] == [["train", int(r)] for r in rows] and a["n_fit"] == 6
    assert a["lp_stage"]["selection"] == "cv"  # the probe's C from CV inside the draw
    assert a["rule"]["steps"] == 3 and a["epochs_run"] == a["rule"]["epochs"] == 3  # 6 images, batch 8: one step per epoch
    assert all(h["val_accuracy"] is None for h in a["history"])
    assert a["test_predictions"] == b["test_predictions"] and a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    with pytest.raises(UsageError, match="rule"):
        finetune(colours, config=FinetuneConfig(**FAST), out_dir=tmp_path / "x", selection="rule", final_fit="train+val")


def test_hyper_rule_schedule_by_dataset_size() -> None:
    small, info = hyper_rule(40, FinetuneConfig(batch_size=32, optimizer="sgd"))
    assert info["target_steps"] == 100 and small.epochs == 50 and small.early_stopping_patience == 0  # 2 steps per epoch
    assert small.weight_decay == 0.0 and small.lr == 0.01
    big, info = hyper_rule(30_000, FinetuneConfig(batch_size=32, optimizer="adamw"))
    assert info["target_steps"] == 2000 and big.epochs == 3 and big.lr == 3e-3


def test_epoch_lines_are_formatted(colours: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    line = format_epoch_line(
        3,
        5,
        train_loss=0.4123,
        train_accuracy=0.8712,
        val_accuracy=0.902,
        best_epoch=3,
        best_val_accuracy=0.902,
        lr=3e-3,
        seconds=41.24,
    )
    assert line == "epoch 3/5  train loss 0.412 acc 0.871  val acc 0.902 (best, epoch 3)  lr 3.0e-03  41.2 s"
    worse = format_epoch_line(4, 5, train_loss=0.3, train_accuracy=0.9, val_accuracy=0.88, best_epoch=3, best_val_accuracy=0.902)
    assert worse == "epoch 4/5  train loss 0.300 acc 0.900  val acc 0.880 (best 0.902, epoch 3)"
    with caplog.at_level(logging.INFO, logger="featx.finetuning"):
        run(colours, tmp_path, strategy="head", epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "featx.finetuning" and r.getMessage().startswith("epoch")]
    pattern = r"epoch [12]/2  train loss \d+\.\d{3} acc [01]\.\d{3}  val acc [01]\.\d{3} \(best.*epoch \d\)"
    pattern += r"  lr \d\.\de[-+]\d\d  \d+\.\d s"
    assert len(lines) == 2 and all(re.fullmatch(pattern, x) for x in lines), lines


def _write_digits(root: Path, per_class: dict[str, int]) -> Path:
    """scikit-learn's 8x8 load_digits as an ImageFolder (stratified, disjoint splits), upsampled to 32x32 RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        start = 0
        for split, n in per_class.items():
            d = root / split / str(c)
            d.mkdir(parents=True, exist_ok=True)
            for i in idx[start : start + n]:
                img = (digits.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(img).resize((32, 32), Image.Resampling.NEAREST).convert("RGB").save(d / f"{i}.png")
            start += n
    return root


@pytest.mark.slow
def test_digits_searched_finetuning_beats_the_linear_probe(tmp_path: Path) -> None:
    """Tiny grayscale digits are far from ImageNet: fine-tuning, tuned on val, should beat the frozen probe."""
    from featx.inference import compute_features

    root = _write_digits(tmp_path / "digits", {"train": 30, "val": 10, "test": 25})
    size = 64
    common = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": size, "progress": False}
    # no flips or crops (they change digits), AdamW at the CPU grid's LRs (backbone at a tenth)
    cfg = FinetuneConfig(
        strategy="full", optimizer="adamw", epochs=10, augment=(), early_stopping_patience=0, num_workers=0, device="cpu"
    )
    res = finetune_search(root, config=cfg, out_dir=tmp_path / "ft", grid={"lr": [3e-3, 1e-2], "weight_decay": [0.05]}, **common)
    ds = load_dataset(root)
    bb = build_backbone("efficientnet_lite0", "imagenet", image_size=size)
    X = {n: compute_features(bb, ds.root, ds.split(n).paths, device="cpu", num_workers=0)[0] for n in ("train", "val", "test")}
    from featx.heads import fit_linear_probe

    y = {n: ds.split(n).labels for n in X}
    probe = fit_linear_probe(X["train"], y["train"], X["val"], y["val"], n_classes=10)
    probe_acc = float(np.mean(np.argmax(X["test"] @ probe.coef.T + probe.intercept, axis=1) == y["test"]))
    assert res["n_fit"] == 400 and res["final_fit"] == "train+val"
    assert res["metrics"]["accuracy"] > probe_acc, (res["metrics"]["accuracy"], probe_acc, res["grid"])


# --------------------------------------------------------------------------------------------------
# What a result must say (issue 21): backbone updated or not, val log-loss, augmentation


def test_epoch_choice_breaks_accuracy_ties_by_val_log_loss() -> None:
    model = nn.Linear(2, 2)
    state = TrainState()
    for epoch, (acc, loss) in enumerate([(0.5, 0.9), (0.7, 0.6), (0.7, 0.4), (0.7, 0.5), (0.7, 0.4)], start=1):
        with torch.no_grad():
            model.bias.fill_(epoch)
        state.consider(epoch, acc, model, loss)
    assert state.best_epoch == 5 and state.best_val_log_loss == 0.4  # lower loss wins a tie; equal loss: the later epoch
    assert torch.equal(state.best_state["bias"], torch.full((2,), 5.0))
    assert state.epochs_without_improvement == 0  # epoch 4 (tied accuracy, higher loss) still counted as progress
    state.consider(6, 0.7, model, float("nan"))  # a diverged epoch never wins a tie
    assert state.best_epoch == 5


def test_grid_choice_breaks_accuracy_ties_by_val_log_loss() -> None:
    rows = [
        {"val_accuracy": 0.8, "val_log_loss": 0.3},
        {"val_accuracy": 0.9, "val_log_loss": 0.5},
        {"val_accuracy": 0.9, "val_log_loss": 0.4},
        {"val_accuracy": 0.9, "val_log_loss": 0.4},
    ]
    assert best_grid_index(rows) == 2  # highest accuracy, then lower log-loss, then first in grid order
    assert best_grid_index([{"val_accuracy": 0.9, "val_log_loss": None}, {"val_accuracy": 0.9, "val_log_loss": 2.0}]) == 1
    assert best_grid_index([{"val_accuracy": 0.9}, {"val_accuracy": 0.9}]) == 0  # rows without a log-loss: grid order
    assert best_grid_index([{"val_accuracy": 0.9, "val_log_loss": float("nan")}, {"val_accuracy": 0.9, "val_log_loss": 9.0}]) == 1


def test_augment_setting_is_normalised_and_validated() -> None:
    assert FinetuneConfig().augment == AUGMENTATIONS == ("random_resized_crop", "hflip", "affine")  # the default: unchanged
    assert all(FinetuneConfig(augment=none).augment == () for none in ("none", ["none"], ("NONE",), []))
    assert FinetuneConfig(augment="hflip, random_resized_crop").augment == ("random_resized_crop", "hflip")  # pipeline order
    assert FinetuneConfig(augment=["hflip", "random_resized_crop"]) == FinetuneConfig(augment=("random_resized_crop", "hflip"))
    for bad in (("rotate",), ["hflip", "shear"], "none,hflip", [3]):
        with pytest.raises(UsageError, match=r"^The 'augment' parameter of FinetuneConfig must be a list of names from") as err:
            FinetuneConfig(augment=bad).validate()
        assert "\n" not in str(err.value)


def test_default_augmentation_is_the_transform_every_earlier_figure_used() -> None:
    """The registry's default pipeline draws the same images as ``Preprocessing.build_transform(train=True)``."""
    pre = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE).preprocessing
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    for names in (AUGMENTATIONS, ("hflip",), ()):
        reference = pre.build_transform(train=True, augment={a: a in names for a in AUGMENTATIONS})
        ours = train_transform(pre, names)
        for seed in range(4):
            torch.manual_seed(seed)
            expected = reference(img)
            torch.manual_seed(seed)
            assert torch.equal(ours(img), expected), (names, seed)


def _epoch_images(dataset: Path, augment: Any, torch_seed: int, epoch: int) -> dict[int, torch.Tensor]:
    """One training epoch's images as the training loop draws them, by image index."""
    bb = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE)
    cfg = FinetuneConfig(**{**FAST, "augment": augment})
    loader = make_loader(bb, load_dataset(dataset).split("train"), train=True, config=cfg, workers=0, device=torch.device("cpu"))
    torch.manual_seed(torch_seed)
    loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
    return {int(i): x for images, _, index, _ in loader for i, x in zip(index, images)}


def test_augment_none_gives_identical_training_images_across_runs(colours: Path) -> None:
    def same(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)

    none = [_epoch_images(colours, "none", seed, epoch) for seed, epoch in ((0, 0), (1, 1))]
    assert same(*none)  # other RNG state, other epoch: the same pixels
    val_tf = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE).preprocessing.build_transform()
    train = load_dataset(colours).split("train")
    assert torch.equal(none[0][0], val_tf(Image.open(train.root / train.paths[0]).convert("RGB")))  # the eval transform
    default = [_epoch_images(colours, AUGMENTATIONS, seed, epoch) for seed, epoch in ((0, 0), (1, 1), (0, 0))]
    assert not any(torch.equal(default[0][i], default[1][i]) for i in default[0])  # augmented: every image differs
    assert same(default[0], default[2])  # ... and is reproducible from the seeds


def test_augment_is_recorded_in_result_and_checkpoint(colours: Path, tmp_path: Path) -> None:
    res = run(colours, tmp_path / "none", strategy="head", epochs=1, augment="none")
    assert res["augment"] == [] == res["config"]["augment"] and load_ckpt(tmp_path / "none")["augment"] == []
    res = run(colours, tmp_path / "flip", strategy="head", epochs=1, augment=["random_resized_crop", "hflip"])
    assert res["config"]["augment"] == ["random_resized_crop", "hflip"]
    assert res["augment"] == load_ckpt(tmp_path / "flip")["augment"]
    crop, flip = res["augment"]
    assert crop == {"name": "random_resized_crop", "op": "RandomResizedCrop", "scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]}
    assert flip == {"name": "hflip", "op": "RandomHorizontalFlip", "p": 0.5}
    assert json.loads((tmp_path / "flip" / "result.json").read_text())["augment"] == res["augment"]
    # a checkpoint whose augmentation parameters differ (other featx) is refused like any other config change
    ckpt = load_ckpt(tmp_path / "flip")
    ckpt["augment"][0]["scale"] = [0.08, 1.0]
    torch.save(ckpt, tmp_path / "flip" / "checkpoint.pt")
    with pytest.raises(MismatchError, match="augmentation"):
        run(colours, tmp_path / "flip", resume=True, strategy="head", epochs=2, augment=["random_resized_crop", "hflip"])
