"""The training loop, in the shape of torchvision's reference script: plain functions, no trainer class.

:func:`train_one_epoch` (forward and loss under autocast, a GradScaler only for fp16, exactly one optimizer and
scheduler step per batch), :func:`evaluate` / :func:`evaluate_log_loss`, the LR schedule (:func:`warmup_cosine`),
the epoch line (:func:`format_epoch_line`), which parameters train and at which LR (:func:`trainable_prefixes`,
:func:`make_optimizer`, :func:`set_train_mode`), and the choice of epoch and grid point (:class:`TrainState`,
:func:`best_grid_index`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from featx import runtime
from featx.errors import UsageError
from featx.finetuning.config import FinetuneConfig

log = logging.getLogger("featx.finetuning")  # one logger for the package: the epoch lines users filter on


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
    step_every_batch: bool = False,
) -> dict[str, float]:
    """One pass over ``loader`` (batches of ``ImageFiles`` items) with one optimizer and scheduler step per batch.

    The caller sets train/eval modes (frozen BatchNorm layers must stay in eval). Images that failed to
    decode are left out of the loss rather than trained on as black squares; a batch with no image left is skipped,
    except with ``step_every_batch`` (DDP: every rank must take every step, so such a batch runs with its loss
    times 0 and counts no image). Returns the mean loss and
    accuracy, ``images``, ``steps`` (optimizer steps taken) and ``seconds``.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    loss_sum, correct, seen, step = 0.0, 0, 0, 1
    debug = log.isEnabledFor(logging.DEBUG)
    t0 = time.perf_counter()
    bar = runtime.progress_bar(None, total=total, desc=desc, enabled=progress)
    try:
        for images, labels, _, errors in loader:
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            void = step_every_batch and not ok.any()
            if not ok.all() and not void:
                images, labels = images[ok], labels[ok]
                if len(labels) == 0:
                    continue
            x = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = labels.to(device, non_blocking=True)
            with runtime.autocast(device, precision):
                logits = model(x)
                loss = criterion(logits, y)
                if void:
                    loss = loss * 0.0
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            step += 1
            if void:
                continue
            n = len(y)
            loss_sum += loss.item() * n
            correct += int((logits.argmax(1) == y).sum().item())
            seen += n
            bar.update(n)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
            if debug:
                log.debug("%s step %d: loss %.4f, lr %.2e", desc, step - 1, loss.item(), optimizer.param_groups[-1]["lr"])
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
    y_all, y_pred, nll_sum = predict_rows(model, loader, device, precision, channels_last=channels_last, log_loss=log_loss)
    return y_all, y_pred, nll_sum / max(len(y_all), 1)


def predict_rows(
    model: nn.Module, loader: Iterable[Any], device: torch.device, precision: str, *, channels_last: bool, log_loss: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, predictions and the *summed* cross-entropy over ``loader`` (empty arrays for an empty loader)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.eval()
    y_true: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    y_pred: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
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
    return np.concatenate(y_true), np.concatenate(y_pred), nll_sum


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


def trainable_prefixes(config: FinetuneConfig, blocks: list[list[str]]) -> tuple[str, ...] | None:
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


def is_trainable(name: str, prefixes: tuple[str, ...] | None) -> bool:
    return prefixes is None or name.startswith(prefixes)


def set_train_mode(model: nn.Module, strategy: str, prefixes: tuple[str, ...] | None, freeze_bn_stats: bool = False) -> None:
    """Train mode, except a frozen backbone (``head``) and BatchNorm layers whose statistics must not move:
    those in frozen blocks always, all of them with ``freeze_bn_stats``."""
    model.train()
    if strategy == "head":
        model.backbone.eval()
        return
    for name, module in model.backbone.named_modules():
        if isinstance(module, _BatchNorm) and (freeze_bn_stats or not is_trainable(name + ".", prefixes)):
            module.eval()


def make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
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


def _loss_rank(loss: float | None) -> float:
    """A log-loss for comparisons: lower is better; missing, NaN and infinite ones are the worst (and equal)."""
    return loss if loss is not None and math.isfinite(loss) else math.inf


@dataclass
class TrainState:
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


def best_grid_index(rows: Sequence[dict[str, Any]]) -> int:
    """The grid point to keep: highest ``val_accuracy``; ties: lower ``val_log_loss`` (a missing, NaN or infinite
    one counts as worst), then the first in grid order."""

    def key(i: int) -> tuple[float, float, int]:
        return (rows[i]["val_accuracy"], -_loss_rank(rows[i].get("val_log_loss")), -i)

    return max(range(len(rows)), key=key)
