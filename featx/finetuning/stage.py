"""One training run (a grid point, the rule's run, or the train + val refit), the epoch loop of torchvision's
``main``: start from the pretrained weights (or resume from the checkpoint), train epoch by epoch on ``cfg``'s LR
schedule, score val after each epoch when selecting (early stopping; lp-ft's probe-initialised network is epoch
0), and rewrite the checkpoint after every epoch. Under torchrun the same loop runs on every rank with the
differences listed in :mod:`featx.finetuning.ddp` (rank 0 reads and writes the checkpoint, scores are gathered).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featx.finetuning.checkpoints import restore, resume_checkpoint, rows_key, save_checkpoint
from featx.finetuning.config import FinetuneConfig
from featx.finetuning.ddp import batch_norm_mode, gather_train_stats, on_main, seed_rank, sync_state, wrap
from featx.finetuning.env import Env
from featx.finetuning.loop import (
    TrainState,
    format_epoch_line,
    make_optimizer,
    set_train_mode,
    train_one_epoch,
    warmup_cosine,
)
from featx.finetuning.probe import Probe

log = logging.getLogger("featx.finetuning")


@dataclass
class StageOutcome:
    state: TrainState
    model: nn.Module
    meta: dict[str, Any]
    resumed_from: int | None
    config: FinetuneConfig


def run_stage(
    env: Env,
    cfg: FinetuneConfig,
    *,
    stage: str,
    fit: str,
    use_val: bool,
    epochs: int,
    probe: Probe,
    ckpt_path: Path,
    resume: bool,
    label: str = "",
) -> StageOutcome:
    """Train ``epochs`` epochs (at most) on split ``fit`` from the pretrained start, on ``cfg``'s LR schedule.

    ``use_val``: score val after every epoch, keep the best (early stopping, lp-ft's epoch 0 a candidate).
    Otherwise the last weights are the result (final refit, rule). ``probe()`` gives the lp-ft head and a record
    stored in the checkpoint (``meta``); it is only called for a fresh start. A ``select``/``rule`` checkpoint
    that belongs to another run is refused (MismatchError); a stale ``final`` checkpoint is started over.
    """
    splits = {fit: env.split(fit), **({"val": env.split("val")} if use_val else {}), "test": env.split("test")}
    key = rows_key(splits)
    ckpt = None
    if resume:  # under DDP rank 0 reads (and checks) the checkpoint and every rank resumes from its copy
        ckpt = on_main(
            env.dist,
            lambda: resume_checkpoint(ckpt_path, cfg, env.bb, key, stage=stage, epochs=epochs) if ckpt_path.is_file() else None,
        )
    head_init, meta = on_main(env.dist, probe) if ckpt is None else (None, dict(ckpt.get("meta") or {}))
    model = env.build_model(cfg, head_init)
    world = env.dist.world_size if env.dist is not None else 1
    train_model = wrap(model, env.dist, batch_norm_mode(cfg.strategy, cfg.freeze_bn_stats, world, env.device))
    train_loader = env.loader(fit, train=True, config=cfg)
    optimizer = make_optimizer(model, cfg)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.epochs * steps, round(cfg.warmup_epochs * steps)))
    scaler = torch.amp.GradScaler(env.device.type) if cfg.precision == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    state = TrainState()
    resumed_from = None
    if ckpt is not None:
        state = restore(ckpt, model, optimizer, scheduler, scaler)
        resumed_from = state.next_epoch
        log.info("%sresuming from %s after epoch %d", label, ckpt_path, state.next_epoch)
    elif use_val and cfg.strategy == "lp-ft":  # epoch 0: the probe-initialised network is a candidate
        _score_probe_epoch(env, cfg, model, state, meta, epochs, label)

    for epoch in range(state.next_epoch, epochs):
        if use_val and cfg.early_stopping_patience and state.epochs_without_improvement >= cfg.early_stopping_patience:
            log.info("%searly stopping: no val improvement for %d epochs", label, cfg.early_stopping_patience)
            break
        t0 = time.perf_counter()
        set_train_mode(model, cfg.strategy, env.prefixes, cfg.freeze_bn_stats)
        if env.dist is None:
            train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        else:  # the same permutation on every rank, per-rank augmentation and dropout streams
            train_loader.sampler.set_epoch(epoch)
            seed_rank(cfg.seed, epoch, env.dist.rank)
            train_loader.generator.manual_seed(torch.initial_seed())
        stats = train_one_epoch(
            train_model,
            criterion,
            optimizer,
            scheduler,
            train_loader,
            env.device,
            cfg.precision,
            scaler,
            env.progress,
            channels_last=cfg.channels_last,
            desc=f"{label}epoch {epoch + 1}/{epochs}",
            step_every_batch=env.dist is not None,
        )
        if env.dist is not None:
            stats = gather_train_stats(env.dist, stats)
            sync_state(env.dist, model)  # the weights rank 0 saves are the ones every rank scores with
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
            entry["val_accuracy"], entry["val_log_loss"] = _score_val(env, cfg, model)
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
        if not env.is_main:
            continue
        save_checkpoint(
            ckpt_path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            state=state,
            stage=stage,
            target_epochs=epochs,
            config=cfg,
            embedder=env.bb.spec,
            rows_key=key,
            meta=meta,
        )

    if use_val:
        assert state.best_state is not None  # epochs >= 1 is validated, and a checkpoint holds >= 1 epoch
        model.load_state_dict(state.best_state)
    if train_model is not model:  # drop DDP's gradient hooks before the next run wraps the same modules
        del train_model
        gc.collect()
    return StageOutcome(state, model, meta, resumed_from, cfg)


def _score_val(env: Env, cfg: FinetuneConfig, model: nn.Module) -> tuple[float, float]:
    """Val accuracy and log-loss of ``model`` as it is now (every val row once, gathered under DDP)."""
    y_true, y_pred, val_loss = env.score("val", model, cfg, log_loss=True)
    return float(np.mean(y_true == y_pred)), val_loss


def _score_probe_epoch(
    env: Env, cfg: FinetuneConfig, model: nn.Module, state: TrainState, meta: dict[str, Any], epochs: int, label: str
) -> None:
    """lp-ft's epoch 0: the probe-initialised network, scored on val before any update, is the first candidate."""
    t0 = time.perf_counter()
    acc, val_loss = _score_val(env, cfg, model)
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
