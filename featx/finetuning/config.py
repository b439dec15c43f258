"""What a fine-tuning run is asked to do: :class:`FinetuneConfig`, the strategies and optimizers, the per-optimizer
defaults, the lr x weight-decay search grids, the few-shot rule (:func:`hyper_rule`) and the training
augmentations (:data:`AUGMENT_REGISTRY`, :func:`train_transform`, :func:`augment_record`).

Imports no torch (torchvision only inside :func:`train_transform`), so ``import featx.finetuning`` stays cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from featx import runtime
from featx.errors import UsageError

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


def default_search_grid(optimizer: str, device: str = "cuda") -> dict[str, list[float]]:
    """:data:`SEARCH_GRIDS` for ``optimizer``: the 8-point GPU grid, or the 2-point CPU shrink."""
    return {k: list(v) for k, v in SEARCH_GRIDS["cpu" if device == "cpu" else "gpu"][optimizer].items()}


def check_grid(grid: Any) -> dict[str, list[float]]:
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
