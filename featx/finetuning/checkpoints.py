"""A run's files and how it resumes: the names in ``out_dir``, the checkpoint dict (torchvision's keys plus the
scaler, the config as JSON, the RNG states, the embedder and the rows it trained on), the checks that refuse a
checkpoint of another run, and atomic writes.

A checkpoint is a plain dict that loads with ``weights_only=True``. Only :data:`RESUMABLE_FIELDS` of the config
may differ on resume; the rows key (:func:`rows_key`) and the augmentation record must match.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featx import __version__, failpoints
from featx.backbones import Backbone, EmbedderSpec, load_torch_file
from featx.data import Split
from featx.errors import MismatchError, UsageError
from featx.finetuning.config import FinetuneConfig, augment_record
from featx.finetuning.loop import TrainState

log = logging.getLogger("featx.finetuning")

CHECKPOINT_NAME = "checkpoint.pt"  # the selection (or rule) stage
FINAL_CHECKPOINT_NAME = "final_checkpoint.pt"  # the train+val refit
RESULT_NAME = "result.json"
GRID_DIR = "grid"  # finetune_search: one sub-folder (with its checkpoint) per grid point
# Options that may change on resume: they do not alter the epochs already run.
RESUMABLE_FIELDS = frozenset({"epochs", "early_stopping_patience", "device", "num_workers"})


def point_name(cfg: FinetuneConfig) -> str:
    """finetune_search: the folder of one grid point, under :data:`GRID_DIR`."""
    return f"lr{cfg.lr:g}-wd{cfg.weight_decay:g}"


def _rng_state() -> dict[str, Any]:
    """RNG states as plain lists and tensors, so the checkpoint loads with ``weights_only=True``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def rows_key(splits: dict[str, Split]) -> str:
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


def save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary name, then rename: an interrupted write never replaces a good file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def resume_checkpoint(
    path: Path, config: FinetuneConfig, bb: Backbone, rows_key: str, *, stage: str, epochs: int
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` to resume ``stage`` from, or None to start it over.

    A ``select``/``rule`` checkpoint that belongs to another run is refused (MismatchError); a stale ``final``
    checkpoint (another run, epoch count or config) is started over.
    """
    try:
        ckpt = _load_checkpoint(path, config, bb, rows_key)
        if ckpt.get("stage", stage) != stage or (
            stage == "final" and (ckpt.get("target_epochs") != epochs or ckpt.get("config") != config.to_dict())
        ):
            raise MismatchError(f"checkpoint {path} belongs to another stage or epoch count")
    except MismatchError:
        if stage != "final":
            raise
        log.info("%s: stale final-fit checkpoint, starting the refit over", path)
        return None
    return ckpt


def restore(
    ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler | None
) -> TrainState:
    """Load a checkpoint's model, optimizer, scheduler, scaler and RNG states; the training state to go on from."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(
        next_epoch=ckpt["epoch"] + 1,
        best_val_accuracy=ckpt["best_val_accuracy"],
        best_epoch=ckpt["best_epoch"],
        best_state=ckpt["best_state"],
        epochs_without_improvement=ckpt["epochs_without_improvement"],
        history=list(ckpt["history"]),
        best_val_log_loss=ckpt.get("best_val_log_loss"),  # None from a checkpoint older than the log-loss
    )
    _set_rng_state(ckpt["rng"])
    return state


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    stage: str,
    target_epochs: int,
    config: FinetuneConfig,
    embedder: EmbedderSpec,
    rows_key: str,
    meta: dict[str, Any],
) -> None:
    """Write the checkpoint after the epoch ``state.next_epoch - 1`` (0-based), atomically."""
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": state.next_epoch - 1,
        **{k: v for k, v in vars(state).items() if k != "next_epoch"},
        "stage": stage,
        "target_epochs": target_epochs,
        "config": config.to_dict(),
        "augment": augment_record(config.augment),
        "embedder": embedder.to_dict(),
        "rows_key": rows_key,
        "meta": meta,
        "lp_stage": meta.get("lp_stage"),
        "rng": _rng_state(),
        "featx_version": __version__,
    }
    save_atomic(path, lambda p: torch.save(checkpoint, p))
    failpoints.hit("finetune.checkpoint_saved")
