"""Fine-tuning baselines: train a backbone (or part of it) end to end with a new linear head.

Strategies, compared with frozen-feature heads on the same :class:`SplitPlan` rows:

* ``full``: every weight trains; backbone parameters at ``lr * backbone_lr_scale`` (discriminative LR).
* ``partial``: only the last ``trainable_blocks`` groups of ``Backbone.blocks`` (and the head) train; frozen
  BatchNorm layers stay in eval mode so their running statistics keep the pretrained values.
* ``head``: frozen backbone in eval mode, Dropout + Linear trained on augmented images (the Keras recipe).
* ``lp-ft`` (Kumar et al., 2022): fit a logistic-regression probe on frozen features, copy it into the head,
  then fine-tune everything at ``lr * lp_ft_lr_scale``, so a random head does not distort the features.

The loop has the shape of torchvision's reference script (plain :func:`train_one_epoch` / :func:`evaluate`,
a plain checkpoint dict written each epoch, resume at ``epoch + 1``) without its AMP pitfalls: forward and
loss run under autocast, a GradScaler exists only for fp16, and each iteration makes exactly one step.

Determinism: torch, numpy and ``random`` are seeded, the train loader's generator is re-seeded from
(seed, epoch) every epoch, and checkpoints carry the RNG states, so a resumed run repeats what the
uninterrupted one would have done on the same machine, device and ``num_workers``. Some CPU and CUDA
kernels (multi-threaded convolution backward, cuDNN algorithm choice) are not bitwise reproducible, so
runs on other machines agree closely rather than exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featx import __version__, runtime
from featx.backbones import DEFAULT_BACKBONE, Backbone, EmbedderSpec, build_backbone, load_torch_file
from featx.data import ImageDataset, ImageFiles, Split, SplitPlan, load_dataset
from featx.errors import DataError, MismatchError, UsageError
from featx.metrics import classification_metrics

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

STRATEGIES = ("full", "partial", "head", "lp-ft")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("random_resized_crop", "hflip", "affine")
LP_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
CHECKPOINT_NAME = "checkpoint.pt"
RESULT_NAME = "result.json"
# Options that may change on resume: they do not alter the epochs already run.
RESUMABLE_FIELDS = frozenset({"epochs", "early_stopping_patience", "device", "num_workers"})


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option that changes a fine-tuning run's numbers; recorded in checkpoints and results."""

    strategy: str = "full"  # full | partial | head | lp-ft
    trainable_blocks: int = 2  # partial: train the last N entries of backbone.blocks (+ the new head)
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd (momentum) | adamw
    lr: float = 0.01  # head LR; backbone params get lr * backbone_lr_scale (discriminative LR)
    backbone_lr_scale: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    dropout: float = 0.2
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0  # linear warm-up then cosine decay, stepped per iteration
    augment: tuple[str, ...] = AUGMENTATIONS  # any subset; () = none
    early_stopping_patience: int = 3  # epochs without val-accuracy improvement; 0 disables
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
            isinstance(self.augment, (tuple, list)) and all(a in AUGMENTATIONS for a in self.augment),
            "a subset of " + ", ".join(map(repr, AUGMENTATIONS)),
        )
        check("precision", self.precision in runtime.PRECISIONS, "one of " + ", ".join(map(repr, runtime.PRECISIONS)))
        check("channels_last", isinstance(self.channels_last, bool), "a bool")
        check("freeze_bn_stats", isinstance(self.freeze_bn_stats, bool), "a bool")
        check("device", isinstance(self.device, str), "'auto', 'cpu' or 'cuda[:N]'")
        check("num_workers", self.num_workers is None or is_int(self.num_workers, 0), "None or an int >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = list(self.augment)
        return d


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
    decode are left out of the loss rather than trained on as black squares.
    """
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    loss_sum, correct, seen = 0.0, 0, 0
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
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen, "seconds": seconds}


def evaluate(
    model: nn.Module, loader: Iterable[Any], device: torch.device, precision: str, *, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions in loader order: ``(y_true, y_pred)``; eval mode, no autograd."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.eval()
    y_true: list[np.ndarray] = []
    y_pred: list[np.ndarray] = []
    with torch.inference_mode():
        for images, labels, _, _ in loader:
            x = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with runtime.autocast(device, precision):
                logits = model(x)
            y_true.append(labels.numpy())
            y_pred.append(logits.argmax(1).cpu().numpy())
    return np.concatenate(y_true), np.concatenate(y_pred)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per iteration: linear warm-up to 1, then cosine decay towards 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    return factor


# --------------------------------------------------------------------------------------------------
# Linear probe (stage 1 of lp-ft)


def init_head_from_probe(
    linear: nn.Linear, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *, seed: int = 0
) -> dict[str, Any]:
    """Fit LogisticRegression (unscaled features, C chosen on val) and copy it into ``linear``.

    Binary problems give one margin ``z = w.x + b``; the rows ``[-w/2, w/2]`` reproduce its probabilities
    under softmax. Classes absent from ``y_train`` get zero weights and a bias 10 below the others.
    """
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=1000, warm_start=True, random_state=seed)  # warm start along the C path
    curve: list[float] = []
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    converged = True
    for c in LP_C_GRID:
        clf.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_train, y_train)
        converged &= bool(np.all(clf.n_iter_ < clf.max_iter))
        acc = float(np.mean(clf.predict(x_val) == y_val))
        curve.append(acc)
        if best is None or acc > best[0]:
            best = (acc, c, clf.coef_.copy(), clf.intercept_.copy())
    assert best is not None
    acc, c, coef, intercept = best
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((linear.out_features, coef.shape[1]), dtype=np.float32)
    bias = np.full(linear.out_features, intercept.min() - 10.0, dtype=np.float32)
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))
        head_pred = linear(torch.from_numpy(np.asarray(x_val, dtype=np.float32))).argmax(1).numpy()
    return {
        "C": c,
        "c_grid": list(LP_C_GRID),
        "val_accuracy_curve": curve,
        "val_accuracy": acc,
        "head_val_accuracy": float(np.mean(head_pred == y_val)),
        "converged": converged,
    }


def _linear_probe_stage(
    bb: Backbone,
    linear: nn.Linear,
    splits: dict[str, Split],
    config: FinetuneConfig,
    device: torch.device,
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    from featx.inference import compute_features

    t0 = time.perf_counter()
    feats = {}
    for name in ("train", "val"):
        s = splits[name]
        feats[name], _ = compute_features(
            bb, s.root, s.paths, device=device, num_workers=workers, precision=config.precision, progress=progress
        )
    info = init_head_from_probe(
        linear, feats["train"], splits["train"].labels, feats["val"], splits["val"].labels, seed=config.seed
    )
    info["seconds"] = time.perf_counter() - t0
    log.info("lp-ft stage 1: probe C=%g, val accuracy %.4f (%.1f s)", info["C"], info["val_accuracy"], info["seconds"])
    return info


# --------------------------------------------------------------------------------------------------
# Setup helpers


def _resolve_splits(ds: ImageDataset, plan: SplitPlan, train_rows: Sequence[int] | np.ndarray | None) -> dict[str, Split]:
    resolved = plan.resolve(ds)
    src, rows = resolved["train"]
    if train_rows is not None:
        pos = np.asarray(train_rows)
        if pos.ndim != 1 or pos.size == 0 or not np.issubdtype(pos.dtype, np.integer) or pos.min() < 0 or pos.max() >= len(rows):
            raise UsageError(
                f"train_rows must be a non-empty list of positions in [0, {len(rows)}) "
                f"into the plan's train rows (got {pos.size} values)"
            )
        rows = rows[pos]
    splits = {"train": ds.split(src).subset(rows, name="train")}
    for name in ("val", "test"):
        src, rows = resolved[name]
        splits[name] = ds.split(src).subset(rows, name=name)
    for name, s in splits.items():
        if len(s) == 0:
            raise DataError(f"the {name} rows of {ds.root} are empty: add images or change the split plan")
    if len(np.unique(splits["train"].labels)) < 2:
        raise DataError(f"the train rows of {ds.root} hold fewer than 2 classes")
    return splits


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


def _make_loaders(
    bb: Backbone, splits: dict[str, Split], config: FinetuneConfig, workers: int, device: torch.device
) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    size = bb.preprocessing.input_size
    augment = {a: a in config.augment for a in AUGMENTATIONS}
    loaders = {}
    for name, s in splits.items():
        train = name == "train"
        files = ImageFiles(
            s.root,
            s.paths,
            s.labels,
            bb.preprocessing.build_transform(train=train, augment=augment),
            failed_shape=(3, size, size),
        )
        loaders[name] = DataLoader(
            files,
            batch_size=config.batch_size,
            shuffle=train,
            num_workers=workers,
            generator=torch.Generator() if train else None,
            worker_init_fn=_seed_worker,
            drop_last=train and len(s) % config.batch_size == 1,  # a batch of one breaks BatchNorm in train mode
            persistent_workers=workers > 0 and not train,  # train workers restart per epoch: exact resume
            pin_memory=device.type == "cuda",
        )
    return loaders


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
    """Which images and labels the run uses (not their content: the dataset may move)."""
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
    return ckpt


def _save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary name, then rename: an interrupted write never replaces a good file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


@dataclass
class _TrainState:
    """What an epoch leaves behind; saved in the checkpoint next to model, optimizer and RNG states."""

    next_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0  # 1-based, like history[i]["epoch"]
    best_state: dict[str, Any] | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def update(self, epoch: int, stats: dict[str, float], val_accuracy: float, lr: float, model: nn.Module) -> None:
        self.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": stats["loss"],
                "train_accuracy": stats["accuracy"],
                "val_accuracy": val_accuracy,
                "lr": lr,
                "images": stats["images"],
                "seconds": stats["seconds"],
            }
        )
        if val_accuracy > self.best_val_accuracy:
            self.best_val_accuracy, self.best_epoch, self.epochs_without_improvement = val_accuracy, epoch + 1, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.epochs_without_improvement += 1
        self.next_epoch = epoch + 1


# --------------------------------------------------------------------------------------------------
# Entry point


def finetune(
    dataset: str | os.PathLike[str] | ImageDataset,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    image_size: int | None = None,
    config: FinetuneConfig = FinetuneConfig(),
    split_plan: SplitPlan = _DEFAULT_PLAN,
    train_rows: Sequence[int] | np.ndarray | None = None,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``backbone`` on ``dataset``; returns the result record, also written to ``out_dir/result.json``.

    ``out_dir/checkpoint.pt`` is rewritten after every epoch; ``resume=True`` continues from it at the
    next epoch (only ``epochs``, ``early_stopping_patience``, ``device`` and ``num_workers`` may change).
    ``train_rows`` selects positions within the plan's train rows (few-shot draws); val and test stay whole.
    Test images are scored once, with the weights of the best validation epoch.
    """
    import torch
    from torch import nn

    t_call = time.perf_counter()
    if not isinstance(config, FinetuneConfig):
        raise UsageError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    config.validate()
    device = runtime.resolve_device(config.device)
    runtime.check_precision(config.precision, device)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 16):
        raise UsageError(f"image_size must be an int >= 16, got {image_size!r}")
    out = Path(out_dir).expanduser()
    ckpt_path = out / CHECKPOINT_NAME
    if resume and not ckpt_path.is_file():
        raise UsageError(f"resume=True but there is no checkpoint at {ckpt_path}")
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    splits = _resolve_splits(ds, split_plan, train_rows)
    bb = build_backbone(backbone, weights, image_size=image_size)
    prefixes = _trainable_prefixes(config, bb.blocks)
    rows_key = _rows_key(splits)
    ckpt = _load_checkpoint(ckpt_path, config, bb, rows_key) if resume else None

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    workers = runtime.default_num_workers() if config.num_workers is None else config.num_workers
    runtime.configure_threads(workers, device)
    out.mkdir(parents=True, exist_ok=True)
    n_classes = len(ds.classes)
    cl = config.channels_last
    with runtime.ResourceMeter(device) as meter:
        head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(bb.feature_dim, n_classes))
        model = nn.Sequential(OrderedDict(backbone=bb.model, head=head))
        lp_stage = ckpt["lp_stage"] if ckpt else None
        if config.strategy == "lp-ft" and ckpt is None:
            lp_stage = _linear_probe_stage(bb, head[1], splits, config, device, workers, progress)
        for name, p in model.backbone.named_parameters():
            p.requires_grad_(_is_trainable(name, prefixes))
        model.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format)
        loaders = _make_loaders(bb, splits, config, workers, device)
        optimizer = _make_optimizer(model, config)
        steps = len(loaders["train"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(config.epochs * steps, round(config.warmup_epochs * steps))
        )
        scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        state = _TrainState()
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt["scaler"]:
                scaler.load_state_dict(ckpt["scaler"])
            state = _TrainState(
                ckpt["epoch"] + 1,
                ckpt["best_val_accuracy"],
                ckpt["best_epoch"],
                ckpt["best_state"],
                ckpt["epochs_without_improvement"],
                list(ckpt["history"]),
            )
            _set_rng_state(ckpt["rng"])
            log.info("resuming from %s after epoch %d", ckpt_path, state.next_epoch)
        resumed_from = state.next_epoch if ckpt is not None else None

        for epoch in range(state.next_epoch, config.epochs):
            if config.early_stopping_patience and state.epochs_without_improvement >= config.early_stopping_patience:
                log.info("early stopping: no val improvement for %d epochs", config.early_stopping_patience)
                break
            _set_train_mode(model, config.strategy, prefixes, config.freeze_bn_stats)
            loaders["train"].generator.manual_seed(config.seed * 100_003 + epoch)
            stats = train_one_epoch(
                model,
                criterion,
                optimizer,
                scheduler,
                loaders["train"],
                device,
                config.precision,
                scaler,
                progress,
                channels_last=cl,
                desc=f"epoch {epoch + 1}/{config.epochs}",
            )
            y_true, y_pred = evaluate(model, loaders["val"], device, config.precision, channels_last=cl)
            state.update(epoch, stats, float(np.mean(y_true == y_pred)), optimizer.param_groups[-1]["lr"], model)
            log.info("epoch %d/%d: %s", epoch + 1, config.epochs, state.history[-1])
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch,
                **{k: v for k, v in vars(state).items() if k != "next_epoch"},
                "config": config.to_dict(),
                "embedder": bb.spec.to_dict(),
                "rows_key": rows_key,
                "lp_stage": lp_stage,
                "rng": _rng_state(),
                "featx_version": __version__,
            }
            _save_atomic(ckpt_path, lambda p, c=checkpoint: torch.save(c, p))

        assert state.best_state is not None  # epochs >= 1 is validated, and a checkpoint holds >= 1 epoch
        model.load_state_dict(state.best_state)
        y_true, y_pred = evaluate(model, loaders["test"], device, config.precision, channels_last=cl)
    train_seconds = sum(h["seconds"] for h in state.history)
    result = {
        "strategy": config.strategy,
        "embedder": bb.spec.to_dict(),
        "config": config.to_dict(),
        "dataset": ds.name,
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "n_test": len(splits["test"]),
        "classes": list(ds.classes),
        "metrics": classification_metrics(y_true, y_pred, n_classes),
        "val_accuracy": state.best_val_accuracy,
        "epochs_run": len(state.history),
        "best_epoch": state.best_epoch,
        "stopped_early": len(state.history) < config.epochs,
        "resumed_from_epoch": resumed_from,
        "history": state.history,
        "wall_seconds": time.perf_counter() - t_call,
        "train_seconds": train_seconds,
        "train_images_per_s": sum(h["images"] for h in state.history) / max(train_seconds, 1e-9),
        "peak_memory_mb": meter.peak_memory_mb,
        "memory_kind": meter.memory_kind,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "precision": config.precision,
        "lp_stage": lp_stage,
        "featx_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _save_atomic(out / RESULT_NAME, lambda p: p.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8"))
    return result
