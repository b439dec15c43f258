"""Fine-tuning baselines: train a backbone (or part of it) end to end with a new linear head.

Strategies, compared with frozen-feature heads on the same :class:`SplitPlan` rows:

* ``full``: every weight trains; backbone parameters at ``lr * backbone_lr_scale`` (discriminative LR).
* ``partial``: only the last ``trainable_blocks`` groups of ``Backbone.blocks`` (and the head) train; frozen
  BatchNorm layers stay in eval mode so their running statistics keep the pretrained values.
* ``head``: frozen backbone in eval mode, Dropout + Linear trained on augmented images (the Keras recipe).
* ``lp-ft`` (Kumar et al., 2022): fit a logistic-regression probe on standardised frozen features (C chosen
  on val, :func:`featx.heads.fit_linear_probe`), fold the scaling into the head, then fine-tune everything at
  ``lr * lp_ft_lr_scale``. The probe-initialised network is scored on val before any update (epoch 0) and stays
  an early-stopping candidate, so LP-FT never ends below its own probe on val.

Protocol (the heads' linear-evaluation protocol, Kornblith et al. 2019, applied to fine-tuning):

* ``selection="val"``: train on train, score val (accuracy and log-loss, the mean cross-entropy) after every
  epoch, keep the best epoch: the highest val accuracy, ties broken by the lower val log-loss, then by the later
  epoch. Early stopping looks at accuracy only: an epoch with equal val accuracy counts as progress and resets the
  patience. :func:`finetune_search` does this for every point of an lr x weight-decay grid and picks the point
  whose chosen epoch has the highest val accuracy (ties: lower val log-loss, then first in grid order).
* ``final_fit="train+val"`` (default): retrain from the pretrained weights, with the same seed, on train + val
  for exactly the chosen number of epochs, on the same LR schedule (defined over ``epochs`` and stopped at the
  chosen epoch) -- no val scores are looked at -- and score test once. ``final_fit="train"`` scores the
  best-on-val model trained on train alone.
* ``selection="rule"`` (few-shot draws): no val labels at all; a fixed schedule modelled on BiT's HyperRule
  (:func:`hyper_rule`), no early stopping, test scored once.

The loop has the shape of torchvision's reference script (plain :func:`train_one_epoch` / :func:`evaluate`,
a plain checkpoint dict written each epoch, resume at ``epoch + 1``) without its AMP pitfalls: forward and
loss run under autocast, a GradScaler exists only for fp16, and each iteration makes exactly one step.

Determinism: every training run (each grid point, the final refit) starts from the pretrained weights with
torch, numpy and ``random`` seeded from ``config.seed``; the train loader's generator is re-seeded from
(seed, epoch) every epoch, and checkpoints carry the RNG states, so a resumed run repeats what the
uninterrupted one would have done on the same machine, device and ``num_workers``. Some CPU and CUDA
kernels (multi-threaded convolution backward, cuDNN algorithm choice) are not bitwise reproducible, so
runs on other machines agree closely rather than exactly.

Augmentation (training images only) is ``config.augment``: names from :data:`AUGMENT_REGISTRY` (default: all,
random resized crop 0.35-1, horizontal flip, shear/zoom), recorded with their parameters in every checkpoint and
result (``augment``); a resume with other augmentation is refused like any other config change.

What the final model is, recorded in every result: ``backbone_updated`` (its backbone's weights or BatchNorm
statistics differ from the pretrained ones: false for ``head``, and for an lp-ft run whose val selection kept
epoch 0, which is the linear probe refit, not a fine-tuned network) and ``fine_tune_epochs`` (the epochs behind
the final model in which backbone parameters took optimizer steps), both measured on what ran, not read off
the strategy name.

Progress: a tqdm bar per epoch (``progress``) and one formatted line per epoch on the ``featx.finetuning``
logger at INFO (:func:`format_epoch_line`); per-step losses and grid details at DEBUG.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featx import __version__, runtime
from featx.backbones import POOLED, Backbone, EmbedderSpec, build_embedder, embedder_spec, load_torch_file
from featx.data import FINAL_FITS, ImageDataset, ImageFiles, RowSelection, Split, SplitPlan, load_dataset, refuse_inside_dataset
from featx.errors import DataError, MismatchError, UsageError
from featx.heads import fit_linear_probe, grid_edges, make_head, probe_weights
from featx.inference import FORWARD_MEMORY_FACTOR, TRAINING_MEMORY_FACTOR, check_forward_memory
from featx.metrics import classification_metrics

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

STRATEGIES = ("full", "partial", "head", "lp-ft")
OPTIMIZERS = ("sgd", "adamw")
# Training-time augmentations (fine-tuning only: val, test and the lp-ft probe's features use the weights' eval
# transform). Name -> the torchvision op and its parameters, recorded with them in every checkpoint and result
# (``augment``). The pipeline order is fixed (crop, flip, affine) whatever order a config lists them in; without
# "random_resized_crop" images get the eval resize + center crop. Interpolation is the weights' own. The default
# is all three (every figure so far); "affine" is a shear, which, like "hflip", changes what a digit or a letter
# looks like: turn them off for such data (``augment=()`` or ``"none"``).
AUGMENT_REGISTRY: dict[str, dict[str, Any]] = {
    "random_resized_crop": {"op": "RandomResizedCrop", "scale": [0.35, 1.0], "ratio": [3 / 4, 4 / 3]},
    "hflip": {"op": "RandomHorizontalFlip", "p": 0.5},
    "affine": {"op": "RandomAffine", "degrees": 0.0, "shear": 10.0, "scale": [0.9, 1.1]},
}
AUGMENTATIONS = tuple(AUGMENT_REGISTRY)
NO_AUGMENT = "none"
SELECTIONS = ("val", "rule")
CHECKPOINT_NAME = "checkpoint.pt"  # the selection (or rule) stage
FINAL_CHECKPOINT_NAME = "final_checkpoint.pt"  # the train+val refit
RESULT_NAME = "result.json"
GRID_DIR = "grid"  # finetune_search: one sub-folder (with its checkpoint) per grid point
# Options that may change on resume: they do not alter the epochs already run.
RESUMABLE_FIELDS = frozenset({"epochs", "early_stopping_patience", "device", "num_workers"})

# lr x weight-decay grids for finetune_search, per optimizer. ``lr`` is the head's LR; full/partial backbones
# train at lr * backbone_lr_scale, lp-ft everything at lr * lp_ft_lr_scale. SGD's weight decay is an L2 term,
# AdamW's is decoupled (multiplied by the LR), hence the different scales. "gpu": 8 runs per strategy;
# "cpu": a documented 2-run shrink for a 2-core machine. On load_digits (30 images per class, 64 px, full,
# AdamW, 10 epochs) head LR 3e-3 reached val 0.97 while 1e-2 collapsed to 0.26: a one-point recipe can fail
# where a small grid does not.
SEARCH_GRIDS: dict[str, dict[str, dict[str, list[float]]]] = {
    "gpu": {
        "sgd": {"lr": [1e-3, 3e-3, 1e-2, 3e-2], "weight_decay": [0.0, 1e-4]},
        "adamw": {"lr": [3e-4, 1e-3, 3e-3, 1e-2], "weight_decay": [0.0, 0.05]},
    },
    "cpu": {
        "sgd": {"lr": [3e-3, 1e-2], "weight_decay": [1e-4]},
        "adamw": {"lr": [1e-3, 3e-3], "weight_decay": [0.05]},
    },
}

# Few-shot rule (selection="rule"), modelled on BiT's HyperRule (Kolesnikov et al. 2020): schedule length by
# dataset size, a fixed LR, linear warm-up then decay, no weight decay, no early stopping, no val labels.
# BiT: 500 / 10k / 20k steps at batch 512 for < 20k / < 500k / more images, LR 0.003, warm-up 100 steps,
# step decay. featx scales the step counts by 1/5 for a CPU budget at batch <= 32 (``rule_steps`` overrides),
# uses its cosine decay after a 20 % warm-up, and the optimizer's own LR below (head LR, as everywhere here).
RULE_STEPS = ((20_000, 100), (500_000, 2_000), (None, 4_000))
RULE_LR = {"sgd": 0.01, "adamw": 3e-3}
RULE_WARMUP_FRACTION = 0.2

# The one-run recipe when no --lr/--weight-decay is given, per optimizer. AdamW is the default: on
# load_digits written out as images (112 px, full fine-tuning, 4 epochs) it reached 0.972 test accuracy against
# SGD's 0.947 on the same rows (benchmarks/results/finetune_defaults.md). Head LR; backbones train at
# lr * backbone_lr_scale.
DEFAULT_LR = {"sgd": 0.01, "adamw": 3e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option that changes a fine-tuning run's numbers; recorded in checkpoints and results."""

    strategy: str = "full"  # full | partial | head | lp-ft
    trainable_blocks: int = 2  # partial: train the last N entries of backbone.blocks (+ the new head)
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd (momentum)
    lr: float | None = None  # head LR (None: DEFAULT_LR[optimizer]); backbone params get lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY[optimizer]
    dropout: float = 0.2
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0  # linear warm-up then cosine decay, stepped per iteration
    augment: tuple[str, ...] = AUGMENTATIONS  # names from AUGMENT_REGISTRY (any subset); () or "none" = none
    early_stopping_patience: int = 3  # epochs without val-accuracy improvement (ties count as progress); 0 disables
    lp_ft_lr_scale: float = 0.1  # lp-ft: the second stage uses lr * this for every parameter
    # BatchNorm running statistics stay as pretrained (eval mode) while gamma/beta still train: with the
    # small batches of small datasets, batch statistics shift the features and can undo a linear probe
    # (Keras' fine-tuning guide keeps BN in inference mode for the same reason). False = classic train mode.
    freeze_bn_stats: bool = True
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast; GradScaler only for fp16)
    channels_last: bool = True
    device: str = "auto"
    num_workers: int | None = None
    seed: int = 0
    rule_steps: int | None = None  # selection="rule": optimizer steps (None: RULE_STEPS by dataset size)

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", _normalize_augment(self.augment))
        # Resolve the per-optimizer defaults once, so that checkpoints and results record the numbers used.
        if self.lr is None and self.optimizer in DEFAULT_LR:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        if self.weight_decay is None and self.optimizer in DEFAULT_WEIGHT_DECAY:
            object.__setattr__(self, "weight_decay", DEFAULT_WEIGHT_DECAY[self.optimizer])

    def validate(self) -> None:
        """Raise :class:`UsageError` for the first invalid value, in scikit-learn's message template."""

        def check(name: str, ok: bool, must: str) -> None:
            if not ok:
                raise UsageError(f"The {name!r} parameter of FinetuneConfig must be {must}. Got {getattr(self, name)!r} instead.")

        def is_int(v: Any, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check("strategy", self.strategy in STRATEGIES, "one of " + ", ".join(map(repr, STRATEGIES)))
        for name, low in (("trainable_blocks", 1), ("epochs", 1), ("batch_size", 1), ("early_stopping_patience", 0), ("seed", 0)):
            check(name, is_int(getattr(self, name), low), f"an int >= {low}")
        check("optimizer", self.optimizer in OPTIMIZERS, "one of " + ", ".join(map(repr, OPTIMIZERS)))
        for name in ("lr", "backbone_lr_scale", "lp_ft_lr_scale"):
            check(name, is_num(getattr(self, name)) and getattr(self, name) > 0, "> 0")
        for name in ("weight_decay", "warmup_epochs"):
            check(name, is_num(getattr(self, name)) and getattr(self, name) >= 0, ">= 0")
        for name in ("momentum", "dropout", "label_smoothing"):
            check(name, is_num(getattr(self, name)) and 0 <= getattr(self, name) < 1, "in [0, 1)")
        check(
            "augment",
            isinstance(self.augment, tuple) and all(a in AUGMENT_REGISTRY for a in self.augment),
            "a list of names from " + ", ".join(map(repr, AUGMENTATIONS)) + f", or {NO_AUGMENT!r} alone",
        )
        check("precision", self.precision in runtime.PRECISIONS, "one of " + ", ".join(map(repr, runtime.PRECISIONS)))
        check("channels_last", isinstance(self.channels_last, bool), "a bool")
        check("freeze_bn_stats", isinstance(self.freeze_bn_stats, bool), "a bool")
        check("device", isinstance(self.device, str), "'auto', 'cpu' or 'cuda[:N]'")
        check("num_workers", self.num_workers is None or is_int(self.num_workers, 0), "None or an int >= 0")
        check("rule_steps", self.rule_steps is None or is_int(self.rule_steps, 1), "None or an int >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = list(self.augment)
        return d


def _normalize_augment(value: Any) -> Any:
    """``augment`` as given -> a tuple of unique names in pipeline order; ``"none"`` (alone) -> ``()``.

    A string is read as a comma-separated list (what a YAML or CLI value gives). Anything else is returned
    unchanged for :meth:`FinetuneConfig.validate` to report; unknown names stay in, at the end.
    """
    if isinstance(value, str):
        value = [a.strip() for a in value.split(",") if a.strip()]
    if not isinstance(value, (tuple, list)) or not all(isinstance(a, str) for a in value):
        return value
    names = [a.strip().lower() for a in value]
    if names == [NO_AUGMENT]:
        return ()
    known = tuple(a for a in AUGMENTATIONS if a in names)
    return known + tuple(dict.fromkeys(a for a in names if a not in AUGMENT_REGISTRY))


def augment_record(augment: Sequence[str]) -> list[dict[str, Any]]:
    """What a checkpoint and a result record about augmentation: each op in pipeline order, with its parameters."""
    return [{"name": name, **json.loads(json.dumps(AUGMENT_REGISTRY[name]))} for name in _normalize_augment(tuple(augment))]


def train_transform(preprocessing: Any, augment: Sequence[str]) -> Callable[[Any], Any]:
    """PIL image -> normalised tensor with ``augment``'s ops (parameters from :data:`AUGMENT_REGISTRY`).

    With the default list this is the transform of ``Preprocessing.build_transform(train=True)``: same ops, same
    order, same parameters, so the same random draws give the same images.
    """
    from torchvision import transforms as T

    names = _normalize_augment(tuple(augment))
    interp = T.InterpolationMode(preprocessing.interpolation)
    ops: list[Any] = []
    if "random_resized_crop" in names:
        a = AUGMENT_REGISTRY["random_resized_crop"]
        ops.append(
            T.RandomResizedCrop(preprocessing.input_size, scale=tuple(a["scale"]), ratio=tuple(a["ratio"]), interpolation=interp)
        )
    else:
        ops += [T.Resize(preprocessing.resize_size, interpolation=interp), T.CenterCrop(preprocessing.input_size)]
    if "hflip" in names:
        ops.append(T.RandomHorizontalFlip(p=AUGMENT_REGISTRY["hflip"]["p"]))
    if "affine" in names:
        a = AUGMENT_REGISTRY["affine"]
        ops.append(T.RandomAffine(degrees=a["degrees"], shear=a["shear"], scale=tuple(a["scale"]), interpolation=interp))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)])


_DEFAULT_PLAN = SplitPlan()  # a frozen singleton: safe as a default argument


# --------------------------------------------------------------------------------------------------
# The loop (torchvision reference shape)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Iterable[Any],
    device: torch.device,
    precision: str,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = False,
    *,
    channels_last: bool = False,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over ``loader`` (batches of ``ImageFiles`` items) with one optimizer and scheduler step per batch.

    The caller sets train/eval modes (frozen BatchNorm layers must stay in eval). Images that failed to
    decode are left out of the loss rather than trained on as black squares. Returns the mean loss and
    accuracy, ``images``, ``steps`` (optimizer steps taken) and ``seconds``.
    """
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    loss_sum, correct, seen, step = 0.0, 0, 0, 1
    debug = log.isEnabledFor(logging.DEBUG)
    t0 = time.perf_counter()
    bar = runtime.progress_bar(None, total=total, desc=desc, enabled=progress)
    try:
        for images, labels, _, errors in loader:
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            if not ok.all():
                images, labels = images[ok], labels[ok]
                if len(labels) == 0:
                    continue
            x = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = labels.to(device, non_blocking=True)
            with runtime.autocast(device, precision):
                logits = model(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            n = len(y)
            loss_sum += loss.item() * n
            correct += int((logits.argmax(1) == y).sum().item())
            seen += n
            bar.update(n)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
            if debug:
                log.debug("%s step %d: loss %.4f, lr %.2e", desc, step, loss.item(), optimizer.param_groups[-1]["lr"])
            step += 1
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return {
        "loss": loss_sum / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "images": seen,
        "steps": step - 1,
        "seconds": seconds,
    }


def evaluate(
    model: nn.Module, loader: Iterable[Any], device: torch.device, precision: str, *, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions in loader order: ``(y_true, y_pred)``; eval mode, no autograd."""
    y_true, y_pred, _ = _predict(model, loader, device, precision, channels_last=channels_last, log_loss=False)
    return y_true, y_pred


def evaluate_log_loss(
    model: nn.Module, loader: Iterable[Any], device: torch.device, precision: str, *, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`evaluate` plus the log-loss: the mean cross-entropy (natural log, no label smoothing) of the
    float32 logits over the same images, the ones accuracy counts (NaN or inf when the network diverged)."""
    y_true, y_pred, loss = _predict(model, loader, device, precision, channels_last=channels_last, log_loss=True)
    return y_true, y_pred, loss


def _predict(
    model: nn.Module, loader: Iterable[Any], device: torch.device, precision: str, *, channels_last: bool, log_loss: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.eval()
    y_true: list[np.ndarray] = []
    y_pred: list[np.ndarray] = []
    nll_sum = 0.0
    with torch.inference_mode():
        for images, labels, _, _ in loader:
            x = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with runtime.autocast(device, precision):
                logits = model(x)
            if log_loss:
                y = labels.to(logits.device)
                nll_sum += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item())
            y_true.append(labels.numpy())
            y_pred.append(logits.argmax(1).cpu().numpy())
    y_all = np.concatenate(y_true)
    return y_all, np.concatenate(y_pred), nll_sum / max(len(y_all), 1)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per iteration: linear warm-up to 1, then cosine decay towards 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    return factor


def format_epoch_line(
    epoch: int,
    epochs: int,
    *,
    train_loss: float | None = None,
    train_accuracy: float | None = None,
    val_accuracy: float | None = None,
    best_epoch: int | None = None,
    best_val_accuracy: float | None = None,
    lr: float | None = None,
    seconds: float | None = None,
    prefix: str = "",
) -> str:
    """One readable progress line per epoch, e.g.
    ``epoch 3/5  train loss 0.412 acc 0.871  val acc 0.902 (best, epoch 3)  lr 3.0e-03  41.2 s``."""
    parts = [f"{prefix}epoch {epoch}/{epochs}"]
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.3f} acc {train_accuracy or 0.0:.3f}")
    elif epoch == 0:
        parts.append("before any update")
    if val_accuracy is not None:
        if best_epoch == epoch:
            parts.append(f"val acc {val_accuracy:.3f} (best, epoch {best_epoch})")
        else:
            parts.append(f"val acc {val_accuracy:.3f} (best {best_val_accuracy or 0.0:.3f}, epoch {best_epoch})")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


# --------------------------------------------------------------------------------------------------
# Linear probe (stage 1 of lp-ft)


def fit_probe_fixed_c(X: np.ndarray, y: np.ndarray, C: float, *, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """fit-head's logistic regression (StandardScaler + LogisticRegression) at ``C``, as raw-space ``(coef, intercept)``
    (:func:`featx.heads.probe_weights`). Used for the train+val refit at the C chosen on val, where no val score may
    be looked at.
    """
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = make_head("logreg", C=float(C)).fit(X, y)
    return probe_weights(pipe, n_classes)


def init_head_from_probe(linear: nn.Linear, coef: np.ndarray, intercept: np.ndarray) -> None:
    """Copy a probe's raw-space weights into the network's last layer."""
    import torch

    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(coef, dtype=np.float32)))
        linear.bias.copy_(torch.from_numpy(np.asarray(intercept, dtype=np.float32)))


# --------------------------------------------------------------------------------------------------
# Setup helpers


def _resolve_splits(
    ds: ImageDataset, plan: SplitPlan, train_rows: Sequence[int] | np.ndarray | None
) -> tuple[dict[str, Split], dict[str, RowSelection]]:
    """The train/val/test splits and the rows of the dataset they hold."""
    resolved = plan.resolve(ds, train_rows)
    positions = {name: resolved[name] for name in ("train", "val", "test")}
    splits = {name: rows.split_of(ds, name) for name, rows in positions.items()}
    for name, s in splits.items():
        if len(s) == 0:
            raise DataError(f"the {name} rows of {ds.root} are empty: add images or change the split plan")
    if len(np.unique(splits["train"].labels)) < 2:
        raise DataError(f"the train rows of {ds.root} hold fewer than 2 classes")
    return splits, positions


def _concat_splits(a: Split, b: Split, name: str) -> Split:
    """Two splits of one dataset as one (train + val for the final fit); paths are relative to the same root."""
    return Split(name, a.root, a.paths + b.paths, np.concatenate([a.labels, b.labels]), a.classes)


def hyper_rule(n_train: int, config: FinetuneConfig) -> tuple[FinetuneConfig, dict[str, Any]]:
    """The few-shot rule (no val labels): schedule length by dataset size, fixed LR, no early stopping.

    Modelled on BiT's HyperRule (Kolesnikov et al. 2020), scaled to a CPU budget (see :data:`RULE_STEPS`).
    Returns the config to train with (``epochs`` = the rule's, patience 0) and a record of the rule.
    """
    steps = config.rule_steps or next(s for limit, s in RULE_STEPS if limit is None or n_train < limit)
    batch = config.batch_size
    per_epoch = max(1, n_train // batch if n_train % batch == 1 and n_train > batch else math.ceil(n_train / batch))
    epochs = max(1, math.ceil(steps / per_epoch))
    cfg = replace(
        config,
        epochs=epochs,
        lr=RULE_LR[config.optimizer],
        weight_decay=0.0,
        warmup_epochs=RULE_WARMUP_FRACTION * epochs,
        early_stopping_patience=0,
    )
    info = {
        "name": "featx few-shot rule (after BiT HyperRule)",
        "n_train": n_train,
        "steps": epochs * per_epoch,
        "target_steps": steps,
        "epochs": epochs,
        "lr": cfg.lr,
        "weight_decay": 0.0,
        "warmup_fraction": RULE_WARMUP_FRACTION,
    }
    return cfg, info


def _trainable_prefixes(config: FinetuneConfig, blocks: list[list[str]]) -> tuple[str, ...] | None:
    """Backbone parameter-name prefixes that train: ``None`` = all, ``()`` = none."""
    if config.strategy == "head":
        return ()
    if config.strategy == "partial":
        if not 1 <= config.trainable_blocks <= len(blocks):
            raise UsageError(
                f"trainable_blocks must be in [1, {len(blocks)}] for this backbone "
                f"(it has {len(blocks)} blocks), got {config.trainable_blocks}"
            )
        return tuple(p for group in blocks[-config.trainable_blocks :] for p in group)
    return None


def _is_trainable(name: str, prefixes: tuple[str, ...] | None) -> bool:
    return prefixes is None or name.startswith(prefixes)


def _set_train_mode(model: nn.Module, strategy: str, prefixes: tuple[str, ...] | None, freeze_bn_stats: bool = False) -> None:
    """Train mode, except a frozen backbone (``head``) and BatchNorm layers whose statistics must not move:
    those in frozen blocks always, all of them with ``freeze_bn_stats``."""
    from torch.nn.modules.batchnorm import _BatchNorm

    model.train()
    if strategy == "head":
        model.backbone.eval()
        return
    for name, module in model.backbone.named_modules():
        if isinstance(module, _BatchNorm) and (freeze_bn_stats or not _is_trainable(name + ".", prefixes)):
            module.eval()


def _make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    import torch

    lp_ft = config.strategy == "lp-ft"
    head_lr = config.lr * (config.lp_ft_lr_scale if lp_ft else 1.0)
    backbone_lr = head_lr if lp_ft else config.lr * config.backbone_lr_scale
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": backbone_lr},
        {"params": list(model.head.parameters()), "lr": head_lr},
    ]
    groups = [g for g in groups if g["params"]]  # the head group stays last
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=head_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=head_lr, weight_decay=config.weight_decay)


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: torch is seeded per worker already; seed numpy and random from it."""
    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _make_loader(bb: Backbone, split: Split, *, train: bool, config: FinetuneConfig, workers: int, device: torch.device) -> Any:
    import torch
    from torch.utils.data import DataLoader

    size = bb.preprocessing.input_size
    transform = train_transform(bb.preprocessing, config.augment) if train else bb.preprocessing.build_transform()
    files = ImageFiles(split.root, split.paths, split.labels, transform, failed_shape=(3, size, size))
    return DataLoader(
        files,
        batch_size=config.batch_size,
        shuffle=train,
        num_workers=workers,
        generator=torch.Generator() if train else None,
        worker_init_fn=_seed_worker,
        drop_last=train and len(split) % config.batch_size == 1,  # a batch of one breaks BatchNorm in train mode
        persistent_workers=workers > 0 and not train,  # train workers restart per epoch: exact resume
        pin_memory=device.type == "cuda",
    )


def _rng_state() -> dict[str, Any]:
    """RNG states as plain lists and tensors, so the checkpoint loads with ``weights_only=True``."""
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _rows_key(splits: dict[str, Split]) -> str:
    """Which images and labels a stage uses (not their content: the dataset may move)."""
    h = hashlib.sha256()
    for name, s in splits.items():
        h.update(f"\x1d{name}".encode())
        for path, label in zip(s.paths, s.labels.tolist()):
            h.update(f"\x1e{path}\x1f{label}".encode())
    return h.hexdigest()


def _load_checkpoint(path: Path, config: FinetuneConfig, bb: Backbone, rows_key: str) -> dict[str, Any]:
    """Read a checkpoint for ``resume`` and refuse one that belongs to another run."""
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} is not a featx checkpoint (it holds a {type(ckpt).__name__})")
    hint = "; use another out_dir or resume=False"
    if not isinstance(ckpt.get("embedder"), dict):
        raise MismatchError(f"checkpoint {path} was written by an older featx and cannot be resumed{hint}")
    old = EmbedderSpec.from_dict(ckpt["embedder"])
    diff = old.differences(bb.spec)
    if diff:
        raise MismatchError(
            f"checkpoint {path} was made with {old.describe()}, not {bb.spec.describe()} (different {', '.join(diff)}){hint}"
        )
    old_cfg, new_cfg = ckpt.get("config") or {}, config.to_dict()
    for key in new_cfg:
        if key not in RESUMABLE_FIELDS and old_cfg.get(key) != new_cfg[key]:
            raise MismatchError(
                f"checkpoint {path} was made with {key}={old_cfg.get(key)!r}, this run has {key}={new_cfg[key]!r}{hint}"
            )
    if ckpt.get("rows_key") != rows_key:
        raise MismatchError(f"checkpoint {path} was made on other train/val/test images or labels{hint}")
    # The names are in the config (checked above); the parameters behind them must match too (checkpoints
    # written before this record hold the names only).
    old_aug, new_aug = ckpt.get("augment"), augment_record(config.augment)
    if old_aug is not None and old_aug != new_aug:
        raise MismatchError(f"checkpoint {path} was made with augmentation {old_aug!r}, this run has {new_aug!r}{hint}")
    return ckpt


def _save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary name, then rename: an interrupted write never replaces a good file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _loss_rank(loss: float | None) -> float:
    """A log-loss for comparisons: lower is better; missing, NaN and infinite ones are the worst (and equal)."""
    return loss if loss is not None and math.isfinite(loss) else math.inf


@dataclass
class _TrainState:
    """What an epoch leaves behind; saved in the checkpoint next to model, optimizer and RNG states."""

    next_epoch: int = 0  # 0-based index of the next training epoch
    best_val_accuracy: float = -1.0
    best_epoch: int = 0  # 1-based like history[i]["epoch"]; 0 = before any update (lp-ft's probe)
    best_state: dict[str, Any] | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_log_loss: float | None = None  # val log-loss of the best epoch (None: not measured)

    def consider(self, epoch: int, val_accuracy: float, model: nn.Module, val_log_loss: float | None = None) -> None:
        """Early-stopping bookkeeping and the choice of epoch.

        Best epoch: the highest val accuracy; among equal accuracies the lower val log-loss; among equal (or
        unmeasured) log-losses the later epoch, so a warm-up epoch is only kept when it really is the best.
        A NaN or infinite log-loss (a diverged network) ranks below every finite one.
        Patience: an epoch whose val accuracy is at least the best so far counts as progress (ties included,
        even when their log-loss is higher) and resets it; the stopping rule looks at accuracy only.
        """
        if val_accuracy >= self.best_val_accuracy:
            self.epochs_without_improvement = 0
            tie = val_accuracy == self.best_val_accuracy
            if tie and val_log_loss is not None and self.best_val_log_loss is not None:
                if _loss_rank(val_log_loss) > _loss_rank(self.best_val_log_loss):
                    return
            self.best_val_accuracy, self.best_val_log_loss, self.best_epoch = val_accuracy, val_log_loss, epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.epochs_without_improvement += 1

    @property
    def epochs_run(self) -> int:
        return sum(1 for h in self.history if h["epoch"] > 0)


@dataclass
class _Env:
    """What every training run of one call shares: dataset rows, backbone (reset to ``pretrained`` per run), loaders."""

    ds: ImageDataset
    splits: dict[str, Split]
    positions: dict[str, RowSelection]
    bb: Backbone
    pretrained: dict[str, Any]
    device: Any
    workers: int
    prefixes: tuple[str, ...] | None
    progress: bool
    loaders: dict[tuple[str, bool], Any] = field(default_factory=dict)
    features: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.ds.classes)

    def split(self, name: str) -> Split:
        if name == "fit" and "fit" not in self.splits:
            self.splits["fit"] = _concat_splits(self.splits["train"], self.splits["val"], "fit")
        return self.splits[name]

    def loader(self, name: str, *, train: bool, config: FinetuneConfig) -> Any:
        key = (name, train)
        if key not in self.loaders:
            self.loaders[key] = _make_loader(
                self.bb, self.split(name), train=train, config=config, workers=self.workers, device=self.device
            )
        return self.loaders[key]

    def probe_features(self, name: str, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
        """Pretrained (frozen) pooled features and labels of a split; images that failed to decode are left out."""
        if name not in self.features:
            from featx.inference import compute_features

            self.bb.model.load_state_dict(self.pretrained)  # runs before this one changed the weights in place
            s = self.split(name)
            X, errors = compute_features(
                self.bb,
                s.root,
                s.paths,
                precision=config.precision,
                settings=runtime.InferenceSettings.from_env(device=self.device, num_workers=self.workers),
                progress=self.progress,
            )
            ok = np.array([not e for e in errors], dtype=bool)
            self.features[name] = (X[ok], s.labels[ok])
        return self.features[name]

    def build_model(self, config: FinetuneConfig, probe: tuple[np.ndarray, np.ndarray] | None) -> nn.Module:
        """The pretrained backbone and a new head (seeded), or the probe copied into it."""
        import torch
        from torch import nn

        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.bb.model.load_state_dict(self.pretrained)
        head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(self.bb.feature_dim, self.n_classes))
        if probe is not None:
            init_head_from_probe(head[1], *probe)
        model = nn.Sequential(OrderedDict(backbone=self.bb.model, head=head))
        for name, p in model.backbone.named_parameters():
            p.requires_grad_(_is_trainable(name, self.prefixes))
        fmt = torch.channels_last if config.channels_last else torch.contiguous_format
        return model.to(self.device, memory_format=fmt)


@contextlib.contextmanager
def _logs_above_bars(enabled: bool) -> Iterator[None]:
    """Route log lines through ``tqdm.write`` while bars are shown, so the epoch lines do not tear them."""
    if not enabled:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


@dataclass
class _StageOutcome:
    state: _TrainState
    model: nn.Module
    meta: dict[str, Any]
    resumed_from: int | None
    config: FinetuneConfig


def _run_stage(
    env: _Env,
    cfg: FinetuneConfig,
    *,
    stage: str,
    fit: str,
    use_val: bool,
    epochs: int,
    probe: Callable[[], tuple[tuple[np.ndarray, np.ndarray] | None, dict[str, Any]]],
    ckpt_path: Path,
    resume: bool,
    label: str = "",
) -> _StageOutcome:
    """Train ``epochs`` epochs (at most) on split ``fit`` from the pretrained start, on ``cfg``'s LR schedule.

    ``use_val``: score val after every epoch, keep the best (early stopping, lp-ft's epoch 0 a candidate).
    Otherwise the last weights are the result (final refit, rule). ``probe()`` gives the lp-ft head and a record
    stored in the checkpoint (``meta``); it is only called for a fresh start. A ``select``/``rule`` checkpoint
    that belongs to another run is refused (MismatchError); a stale ``final`` checkpoint is started over.
    """
    import torch
    from torch import nn

    splits = {fit: env.split(fit), **({"val": env.split("val")} if use_val else {}), "test": env.split("test")}
    rows_key = _rows_key(splits)
    ckpt = None
    if resume and ckpt_path.is_file():
        try:
            ckpt = _load_checkpoint(ckpt_path, cfg, env.bb, rows_key)
            if ckpt.get("stage", stage) != stage or (
                stage == "final" and (ckpt.get("target_epochs") != epochs or ckpt.get("config") != cfg.to_dict())
            ):
                raise MismatchError(f"checkpoint {ckpt_path} belongs to another stage or epoch count")
        except MismatchError:
            if stage != "final":
                raise
            log.info("%s: stale final-fit checkpoint, starting the refit over", ckpt_path)
            ckpt = None
    if ckpt is None:
        head_init, meta = probe()
    else:
        head_init, meta = None, dict(ckpt.get("meta") or {})
    model = env.build_model(cfg, head_init)
    cl = cfg.channels_last
    train_loader = env.loader(fit, train=True, config=cfg)
    optimizer = _make_optimizer(model, cfg)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.epochs * steps, round(cfg.warmup_epochs * steps)))
    scaler = torch.amp.GradScaler(env.device.type) if cfg.precision == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    state = _TrainState()
    resumed_from = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        state = _TrainState(
            next_epoch=ckpt["epoch"] + 1,
            best_val_accuracy=ckpt["best_val_accuracy"],
            best_epoch=ckpt["best_epoch"],
            best_state=ckpt["best_state"],
            epochs_without_improvement=ckpt["epochs_without_improvement"],
            history=list(ckpt["history"]),
            best_val_log_loss=ckpt.get("best_val_log_loss"),  # None from a checkpoint older than the log-loss
        )
        _set_rng_state(ckpt["rng"])
        resumed_from = state.next_epoch
        log.info("%sresuming from %s after epoch %d", label, ckpt_path, state.next_epoch)
    elif use_val and cfg.strategy == "lp-ft":  # epoch 0: the probe-initialised network is a candidate
        t0 = time.perf_counter()
        val_loader = env.loader("val", train=False, config=cfg)
        y_true, y_pred, val_loss = evaluate_log_loss(model, val_loader, env.device, cfg.precision, channels_last=cl)
        acc = float(np.mean(y_true == y_pred))
        state.consider(0, acc, model, val_loss)
        state.history.append(
            {
                "epoch": 0,
                "train_loss": None,
                "train_accuracy": None,
                "val_accuracy": acc,
                "val_log_loss": val_loss,
                "lr": 0.0,
                "images": 0,
                "steps": 0,
                "seconds": 0.0,
            }
        )
        meta.setdefault("lp_stage", {})["head_val_accuracy"] = acc
        log.info(
            format_epoch_line(
                0, epochs, val_accuracy=acc, best_epoch=0, best_val_accuracy=acc, seconds=time.perf_counter() - t0, prefix=label
            )
        )

    for epoch in range(state.next_epoch, epochs):
        if use_val and cfg.early_stopping_patience and state.epochs_without_improvement >= cfg.early_stopping_patience:
            log.info("%searly stopping: no val improvement for %d epochs", label, cfg.early_stopping_patience)
            break
        t0 = time.perf_counter()
        _set_train_mode(model, cfg.strategy, env.prefixes, cfg.freeze_bn_stats)
        train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        stats = train_one_epoch(
            model,
            criterion,
            optimizer,
            scheduler,
            train_loader,
            env.device,
            cfg.precision,
            scaler,
            env.progress,
            channels_last=cl,
            desc=f"{label}epoch {epoch + 1}/{epochs}",
        )
        entry = {
            "epoch": epoch + 1,
            "train_loss": stats["loss"],
            "train_accuracy": stats["accuracy"],
            "val_accuracy": None,
            "val_log_loss": None,
            "lr": optimizer.param_groups[-1]["lr"],
            "images": stats["images"],
            "steps": stats["steps"],
            "seconds": stats["seconds"],
        }
        if use_val:
            y_true, y_pred, entry["val_log_loss"] = evaluate_log_loss(
                model, env.loader("val", train=False, config=cfg), env.device, cfg.precision, channels_last=cl
            )
            entry["val_accuracy"] = float(np.mean(y_true == y_pred))
            state.consider(epoch + 1, entry["val_accuracy"], model, entry["val_log_loss"])
        state.history.append(entry)
        state.next_epoch = epoch + 1
        log.info(
            format_epoch_line(
                epoch + 1,
                epochs,
                train_loss=entry["train_loss"],
                train_accuracy=entry["train_accuracy"],
                val_accuracy=entry["val_accuracy"],
                best_epoch=state.best_epoch if use_val else None,
                best_val_accuracy=state.best_val_accuracy,
                lr=entry["lr"],
                seconds=time.perf_counter() - t0,
                prefix=label,
            )
        )
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            **{k: v for k, v in vars(state).items() if k != "next_epoch"},
            "stage": stage,
            "target_epochs": epochs,
            "config": cfg.to_dict(),
            "augment": augment_record(cfg.augment),
            "embedder": env.bb.spec.to_dict(),
            "rows_key": rows_key,
            "meta": meta,
            "lp_stage": meta.get("lp_stage"),
            "rng": _rng_state(),
            "featx_version": __version__,
        }
        _save_atomic(ckpt_path, lambda p, c=checkpoint: torch.save(c, p))

    if use_val:
        assert state.best_state is not None  # epochs >= 1 is validated, and a checkpoint holds >= 1 epoch
        model.load_state_dict(state.best_state)
    return _StageOutcome(state, model, meta, resumed_from, cfg)


def best_grid_index(rows: Sequence[dict[str, Any]]) -> int:
    """The grid point to keep: highest ``val_accuracy``; ties: lower ``val_log_loss`` (a missing, NaN or infinite
    one counts as worst), then the first in grid order."""

    def key(i: int) -> tuple[float, float, int]:
        return (rows[i]["val_accuracy"], -_loss_rank(rows[i].get("val_log_loss")), -i)

    return max(range(len(rows)), key=key)


def _backbone_changed(state: dict[str, Any], pretrained: dict[str, Any], *, prefix: str = "") -> bool:
    """Whether any backbone weight or buffer (BatchNorm statistics included) in ``state`` differs from the
    pretrained one. ``prefix``: how ``state`` names the backbone's entries (``"backbone."`` in a model state)."""
    import torch

    for name, value in pretrained.items():
        now = state.get(prefix + name)
        if now is None or not torch.equal(now.detach().to("cpu"), value.to("cpu")):
            return True
    return False


def _point_name(cfg: FinetuneConfig) -> str:
    return f"lr{cfg.lr:g}-wd{cfg.weight_decay:g}"


def default_search_grid(optimizer: str, device: str = "cuda") -> dict[str, list[float]]:
    """:data:`SEARCH_GRIDS` for ``optimizer``: the 8-point GPU grid, or the 2-point CPU shrink."""
    return {k: list(v) for k, v in SEARCH_GRIDS["cpu" if device == "cpu" else "gpu"][optimizer].items()}


def _check_grid(grid: Any) -> dict[str, list[float]]:
    if not isinstance(grid, dict) or set(grid) - {"lr", "weight_decay"} or not grid.get("lr"):
        raise UsageError(f"grid must be a dict with a non-empty 'lr' list and an optional 'weight_decay' list, got {grid!r}")
    out = {"lr": list(grid["lr"]), "weight_decay": list(grid.get("weight_decay") or [])}
    for name, values in out.items():
        for v in values:
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
                or (name == "lr" and v == 0)
            ):
                raise UsageError(f"grid {name} values must be finite numbers {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
    return out


# --------------------------------------------------------------------------------------------------
# Entry points


def finetune(
    dataset: str | os.PathLike[str] | ImageDataset,
    embedder: EmbedderSpec | None = None,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    config: FinetuneConfig = FinetuneConfig(),
    split_plan: SplitPlan = _DEFAULT_PLAN,
    train_rows: Sequence[int] | np.ndarray | None = None,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    progress: bool = True,
    final_fit: str | None = None,
    selection: str = "val",
) -> dict[str, Any]:
    """Fine-tune ``embedder`` (an :class:`~featx.backbones.EmbedderSpec` of the pooled layer; ``backbone``,
    ``weights``, ``image_size`` are a convenience that builds it) on ``dataset`` with ``config``'s lr and weight
    decay; returns the result record, also written to ``out_dir/result.json``.

    ``selection="val"``: the epoch is chosen on val (early stopping); ``final_fit`` ``"train+val"`` (default)
    then retrains from the pretrained weights on train + val for exactly that many epochs, ``"train"`` keeps the
    best-on-val model. ``selection="rule"``: no val labels at all, :func:`hyper_rule`'s schedule on ``train_rows``
    (``final_fit`` is ``"train"``). Test is scored once, on the final model.

    ``out_dir/checkpoint.pt`` (selection/rule) and ``out_dir/final_checkpoint.pt`` (the refit) are rewritten after
    every epoch; ``resume=True`` continues from them (only ``epochs``, ``early_stopping_patience``, ``device`` and
    ``num_workers`` may change; a refit whose epoch count or config changed starts over).
    ``train_rows`` selects positions within the plan's train rows (few-shot draws); val and test stay whole.

    Besides the metrics, the result records ``val_accuracy`` and ``val_log_loss`` of the chosen epoch (None under
    the rule), ``backbone_updated`` and ``fine_tune_epochs`` of the final model, and ``augment`` (each training
    augmentation with its parameters).
    """
    return _run(
        dataset,
        embedder=_finetune_embedder(embedder, backbone, weights, image_size, config),
        config=config,
        split_plan=split_plan,
        train_rows=train_rows,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
        final_fit=final_fit,
        selection=selection,
        grid=None,
    )


def finetune_search(
    dataset: str | os.PathLike[str] | ImageDataset,
    embedder: EmbedderSpec | None = None,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    config: FinetuneConfig = FinetuneConfig(),
    split_plan: SplitPlan = _DEFAULT_PLAN,
    train_rows: Sequence[int] | np.ndarray | None = None,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    progress: bool = True,
    final_fit: str | None = None,
    grid: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Tune like the heads: an lr x weight-decay grid for ``config.strategy``, each point trained on train with
    early stopping on val, the best val accuracy chosen (ties: the lower val log-loss at the chosen epoch, then
    first in grid order, lr-major; :func:`best_grid_index`), then the final fit with the chosen values and epoch
    count (see :func:`finetune`). ``grid`` defaults to
    :func:`default_search_grid` for ``config.optimizer`` (the CPU shrink on a CPU device).

    Each grid point keeps its checkpoint in ``out_dir/grid/lr<lr>-wd<wd>/``; ``resume=True`` skips finished points.
    The result is :func:`finetune`'s plus ``grid`` (one row per point: ``val_accuracy`` and ``val_log_loss`` at
    its chosen epoch, ``backbone_updated`` for that epoch's weights, ...) and ``chosen``.
    """
    if grid is None:
        if not isinstance(config, FinetuneConfig):
            raise UsageError(f"config must be a FinetuneConfig, got {type(config).__name__}")
        config.validate()
        grid = default_search_grid(config.optimizer, runtime.resolve_device(config.device).type)
    return _run(
        dataset,
        embedder=_finetune_embedder(embedder, backbone, weights, image_size, config),
        config=config,
        split_plan=split_plan,
        train_rows=train_rows,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
        final_fit=final_fit,
        selection="val",
        grid=_check_grid(grid),
    )


def _finetune_embedder(
    embedder: EmbedderSpec | None, backbone: str | None, weights: str | None, image_size: int | None, config: Any
) -> EmbedderSpec:
    """The pretrained network to fine-tune: ``embedder``, or built from the loose keywords. It must be the pooled
    layer; the compute precision is ``config.precision`` (the spec's, if not fp32, must say the same), and the
    checkpoints record the network at fp32 as they always have."""
    spec = embedder_spec(embedder, backbone=backbone, weights=weights, image_size=image_size)
    if spec.layer != POOLED:
        raise UsageError(f"finetune trains on pooled features; the embedder's layer is '{spec.layer}'")
    if spec.precision not in ("fp32", getattr(config, "precision", "fp32")):
        raise UsageError(f"the embedder's precision is {spec.precision} but config.precision is {config.precision}")
    return spec.with_(precision="fp32")


def _run(
    dataset: str | os.PathLike[str] | ImageDataset,
    *,
    embedder: EmbedderSpec,
    config: FinetuneConfig,
    split_plan: SplitPlan,
    train_rows: Sequence[int] | np.ndarray | None,
    out_dir: str | os.PathLike[str],
    resume: bool,
    progress: bool,
    final_fit: str | None,
    selection: str,
    grid: dict[str, list[float]] | None,
) -> dict[str, Any]:
    t_call = time.perf_counter()
    if not isinstance(config, FinetuneConfig):
        raise UsageError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    config.validate()
    if selection not in SELECTIONS:
        raise UsageError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if final_fit is not None and final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {final_fit!r}")
    if selection == "rule" and final_fit == "train+val":
        raise UsageError("selection='rule' uses no val labels, so the final fit is on train only (final_fit='train')")
    final_fit = final_fit or ("train" if selection == "rule" else "train+val")
    device = runtime.resolve_device(config.device)
    runtime.check_precision(config.precision, device)
    out = Path(out_dir).expanduser()
    if resume and grid is None and not (out / CHECKPOINT_NAME).is_file():
        raise UsageError(f"resume=True but there is no checkpoint at {out / CHECKPOINT_NAME}")
    if resume and grid is not None and not (out / GRID_DIR).is_dir():
        raise UsageError(f"resume=True but there is no grid search to resume in {out / GRID_DIR}")
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    refuse_inside_dataset(out, ds, "--out-dir")
    splits, positions = _resolve_splits(ds, split_plan, train_rows)
    if selection == "rule":  # no val rows at all: not loaded, not hashed, not scored
        splits.pop("val")
        positions.pop("val")
    bb = build_embedder(embedder)
    factor = FORWARD_MEMORY_FACTOR if config.strategy == "head" else TRAINING_MEMORY_FACTOR  # head: frozen features
    check_forward_memory(config.batch_size, bb.preprocessing.input_size, device, "--batch-size", factor=factor)
    prefixes = _trainable_prefixes(config, bb.blocks)
    workers = runtime.default_num_workers() if config.num_workers is None else config.num_workers
    runtime.configure_threads(workers, device)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = {k: v.detach().clone() for k, v in bb.model.state_dict().items()}
    env = _Env(ds, splits, positions, bb, pretrained, device, workers, prefixes, progress)
    n_classes = env.n_classes
    lp = config.strategy == "lp-ft"
    probe_cache: dict[str, Any] = {}

    def selection_probe() -> tuple[tuple[np.ndarray, np.ndarray] | None, dict[str, Any]]:
        """lp-ft: one probe for every grid point (frozen features do not depend on lr or weight decay)."""
        if not lp:
            return None, {}
        if "probe" not in probe_cache:
            t0 = time.perf_counter()
            Xtr, ytr = env.probe_features("train", config)
            Xva, yva = env.probe_features("val", config) if selection == "val" else (None, None)
            p = fit_linear_probe(Xtr, ytr, Xva, yva, n_classes=n_classes)
            info = {
                "C": float(p.C),
                "val_accuracy": None if p.val_accuracy is None else float(p.val_accuracy),
                "curve": list(p.curve),
                "at_grid_edge": bool(p.at_grid_edge),
                "selection": p.selection,
                "standardized": True,
                "seconds": time.perf_counter() - t0,
            }
            log.info(
                "lp-ft probe: C=%g chosen by %s (accuracy %s, %.1f s)",
                info["C"],
                info["selection"],
                info["val_accuracy"],
                info["seconds"],
            )
            probe_cache["probe"] = ((p.coef, p.intercept), info)
        head, info = probe_cache["probe"]
        return head, {"lp_stage": dict(info)}

    grid_rows: list[dict[str, Any]] = []
    rule_info = None
    final_outcome = None
    with runtime.ResourceMeter(device) as meter, _logs_above_bars(progress):
        if selection == "rule":
            cfg, rule_info = hyper_rule(len(splits["train"]), config)
            log.info(
                "few-shot rule: %d images, %d epochs (%d steps), lr %.1e",
                len(splits["train"]),
                cfg.epochs,
                rule_info["steps"],
                cfg.lr,
            )
            chosen = _run_stage(
                env,
                cfg,
                stage="rule",
                fit="train",
                use_val=False,
                epochs=cfg.epochs,
                probe=selection_probe,
                ckpt_path=out / CHECKPOINT_NAME,
                resume=resume,
            )
            model = chosen.model
        else:
            if grid is None:
                points = [(config, out)]
            else:
                wds = grid["weight_decay"] or [config.weight_decay]
                points = [(replace(config, lr=float(lr), weight_decay=float(wd)), None) for lr in grid["lr"] for wd in wds]
                points = [(c, out / GRID_DIR / _point_name(c)) for c, _ in points]
            chosen = None
            for i, (cfg, folder) in enumerate(points):
                assert folder is not None
                folder.mkdir(parents=True, exist_ok=True)
                label = "" if grid is None else f"[{i + 1}/{len(points)} lr {cfg.lr:.0e} wd {cfg.weight_decay:g}] "
                t0 = time.perf_counter()
                o = _run_stage(
                    env,
                    cfg,
                    stage="select",
                    fit="train",
                    use_val=True,
                    epochs=cfg.epochs,
                    probe=selection_probe,
                    ckpt_path=folder / CHECKPOINT_NAME,
                    resume=resume,
                    label=label,
                )
                row = {
                    "lr": cfg.lr,
                    "weight_decay": cfg.weight_decay,
                    "val_accuracy": o.state.best_val_accuracy,
                    "val_log_loss": o.state.best_val_log_loss,
                    "backbone_updated": _backbone_changed(o.state.best_state or {}, env.pretrained, prefix="backbone."),
                    "best_epoch": o.state.best_epoch,
                    "epochs_run": o.state.epochs_run,
                    "still_improving": o.state.best_epoch == o.state.epochs_run == cfg.epochs,
                    "seconds": time.perf_counter() - t0,
                    "resumed_from_epoch": o.resumed_from,
                }
                grid_rows.append(row)
                if grid is not None:
                    log.info("%sval acc %.3f at epoch %d", label, row["val_accuracy"], row["best_epoch"])
                if best_grid_index(grid_rows) == i:  # ties: lower val log-loss, then first in grid order
                    chosen = o
            assert chosen is not None
            cfg = chosen.config
            model = chosen.model
            if len(points) > 1:
                model.load_state_dict(chosen.state.best_state)  # later grid points reused the same modules
            if final_fit == "train+val":
                lp_info = chosen.meta.get("lp_stage") or {}

                def final_probe() -> tuple[tuple[np.ndarray, np.ndarray] | None, dict[str, Any]]:
                    if not lp:
                        return None, {}
                    X, y = env.probe_features("fit", config)
                    head = fit_probe_fixed_c(X, y, lp_info["C"], n_classes=n_classes)  # the C chosen on val, no new look
                    return head, {"lp_stage": {**lp_info, "final_C": lp_info["C"], "final_n_fit": len(y)}}

                final_outcome = _run_stage(
                    env,
                    cfg,
                    stage="final",
                    fit="fit",
                    use_val=False,
                    epochs=chosen.state.best_epoch,
                    probe=final_probe,
                    ckpt_path=out / FINAL_CHECKPOINT_NAME,
                    resume=resume,
                    label="final fit: ",
                )
                model = final_outcome.model
        trained_seconds = time.perf_counter() - t_call
        host_rss_mb = runtime.peak_rss_mb()
        y_true, y_pred = evaluate(
            model, env.loader("test", train=False, config=cfg), device, cfg.precision, channels_last=cfg.channels_last
        )
    state = chosen.state
    histories = [state.history] + ([final_outcome.state.history] if final_outcome is not None else [])
    train_seconds = sum(h["seconds"] for hist in histories for h in hist)
    train_images = sum(h["images"] for hist in histories for h in hist)
    fit_name = "fit" if final_fit == "train+val" and selection == "val" else "train"
    fit_rows = positions["train"].pairs() + (positions["val"].pairs() if fit_name == "fit" else [])
    use_val = selection == "val"
    epochs_budget = cfg.epochs
    # What trained the final model, from what ran: the refit's epochs, or the selection run's up to the chosen one
    # (lp-ft's epoch 0 = the probe alone), or the rule's. The backbone trained in those epochs that took an
    # optimizer step while it had trainable parameters; it is "updated" when its weights or BatchNorm statistics
    # differ from the pretrained ones.
    if final_outcome is not None:
        final_model_history = final_outcome.state.history
    else:
        last = state.best_epoch if use_val else state.epochs_run
        final_model_history = [h for h in state.history if 1 <= h["epoch"] <= last]
    backbone_trainable = any(p.requires_grad for p in model.backbone.parameters())
    fine_tune_epochs = sum(1 for h in final_model_history if h.get("steps", h["images"]) > 0) if backbone_trainable else 0
    backbone_updated = _backbone_changed(model.backbone.state_dict(), env.pretrained)
    result: dict[str, Any] = {
        "strategy": config.strategy,
        "embedder": bb.spec.to_dict(),
        "config": cfg.to_dict(),
        "dataset": ds.name,
        "classes": list(ds.classes),
        "selection": selection,
        "final_fit": final_fit,
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]) if use_val else 0,
        "n_test": len(splits["test"]),
        "n_fit": len(fit_rows),
        "rows_format": "[source split, position in that split of the dataset]",
        "train_rows": positions["train"].pairs(),
        "val_rows": positions["val"].pairs() if use_val else [],
        "test_rows": positions["test"].pairs(),
        "fit_rows": fit_rows,
        "metrics": classification_metrics(y_true, y_pred, n_classes),
        "test_predictions": [int(v) for v in y_pred],
        "test_labels": [int(v) for v in y_true],
        "val_accuracy": state.best_val_accuracy if use_val else None,
        "val_log_loss": state.best_val_log_loss if use_val else None,
        "backbone_updated": backbone_updated,
        "fine_tune_epochs": fine_tune_epochs,
        "augment": augment_record(cfg.augment),
        "best_epoch": state.best_epoch if use_val else state.epochs_run,
        "epochs_run": state.epochs_run,
        "epochs_budget": epochs_budget,
        "still_improving": (state.best_epoch == state.epochs_run == epochs_budget) if use_val else None,
        "stopped_early": state.epochs_run < epochs_budget,
        "final_epochs": final_outcome.state.epochs_run if final_outcome is not None else None,
        "resumed_from_epoch": chosen.resumed_from,
        "history": state.history,
        "final_history": final_outcome.state.history if final_outcome is not None else None,
        "wall_seconds": trained_seconds,
        "train_seconds": train_seconds,
        "train_images_per_s": train_images / max(train_seconds, 1e-9),
        "peak_memory_mb": meter.peak_memory_mb,
        "memory_kind": meter.memory_kind,
        "host_rss_mb": host_rss_mb,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "precision": config.precision,
        "lp_stage": (final_outcome.meta if final_outcome is not None else chosen.meta).get("lp_stage"),
        "rule": rule_info,
        "featx_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if grid is not None:
        lrs = sorted(set(grid["lr"]))
        result["grid"] = grid_rows
        result["grid_spec"] = {"lr": list(grid["lr"]), "weight_decay": grid["weight_decay"] or [config.weight_decay]}
        result["chosen"] = {
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "epochs": state.best_epoch,
            "val_accuracy": state.best_val_accuracy,
            "val_log_loss": state.best_val_log_loss,
        }
        result["at_grid_edge"] = bool(grid_edges({"lr": lrs}, {"lr": cfg.lr}))  # the lr axis (the report reads the whole grid)
        result["train_seconds"] = sum(r["seconds"] for r in grid_rows) + sum(
            h["seconds"] for h in (result["final_history"] or [])
        )
    _save_atomic(out / RESULT_NAME, lambda p: p.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8"))
    return result
