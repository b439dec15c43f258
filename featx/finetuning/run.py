"""The entry points, :func:`finetune` and :func:`finetune_search`, as four steps: resolve (checks, rows, network,
environment) -> select (the epoch on val, over a grid, or the few-shot rule) -> final fit (the train + val refit)
-> record (test scored once, the result JSON). Under ``torchrun`` every rank runs these steps
(:mod:`featx.finetuning.ddp`); rank 0 writes the files and every rank returns rank 0's result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featx import __version__, distributed, runtime
from featx.backbones import POOLED, EmbedderSpec, build_embedder, embedder_spec
from featx.data import FINAL_FITS, ImageDataset, RowSelection, Split, SplitPlan, load_dataset, refuse_inside_dataset
from featx.errors import DataError, UsageError
from featx.finetuning.checkpoints import CHECKPOINT_NAME, FINAL_CHECKPOINT_NAME, GRID_DIR, RESULT_NAME, point_name, save_atomic
from featx.finetuning.config import SELECTIONS, FinetuneConfig, augment_record, check_grid, default_search_grid, hyper_rule
from featx.finetuning.ddp import batch_norm_mode, distributed_failure, on_main, per_rank_batch
from featx.finetuning.env import Env
from featx.finetuning.loop import TrainState, best_grid_index, trainable_prefixes
from featx.finetuning.probe import Probe, final_probe, no_probe, selection_probe
from featx.finetuning.stage import StageOutcome, run_stage
from featx.heads import grid_edges
from featx.inference import FORWARD_MEMORY_FACTOR, TRAINING_MEMORY_FACTOR, check_forward_memory
from featx.metrics import classification_metrics

log = logging.getLogger("featx.finetuning")

_DEFAULT_PLAN = SplitPlan()  # frozen singletons: safe as default arguments
_DEFAULT_CONFIG = FinetuneConfig()


def finetune(
    dataset: str | os.PathLike[str] | ImageDataset,
    embedder: EmbedderSpec | None = None,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    config: FinetuneConfig = _DEFAULT_CONFIG,
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
    config: FinetuneConfig = _DEFAULT_CONFIG,
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
        grid=check_grid(grid),
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


@dataclass
class _Selected:
    """What the selection (or rule) step leaves: the run whose epoch was chosen, one row per grid point, the rule."""

    chosen: StageOutcome
    grid_rows: list[dict[str, Any]]
    rule: dict[str, Any] | None


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
    """Resolve -> select -> final fit -> record; test is scored once, on the final model.

    Under torchrun this call joins the process group (and leaves it at the end if it joined it)."""
    t_call = time.perf_counter()
    final_fit = _check_options(config, selection, final_fit)
    joined = not torch.distributed.is_initialized()
    dist = distributed.from_environment(config.device)
    try:
        with _quiet_unless_main(dist):
            return _run_ranks(
                dataset,
                dist,
                t_call,
                embedder,
                config,
                split_plan,
                train_rows,
                out_dir,
                resume,
                progress,
                final_fit,
                selection,
                grid,
            )
    except RuntimeError as exc:
        if dist is not None and _collective_failure(exc):
            raise distributed_failure(dist, exc) from exc
        raise
    finally:
        if dist is not None and joined:
            dist.close()


def _run_ranks(
    dataset: str | os.PathLike[str] | ImageDataset,
    dist: distributed.DistContext | None,
    t_call: float,
    embedder: EmbedderSpec,
    config: FinetuneConfig,
    split_plan: SplitPlan,
    train_rows: Sequence[int] | np.ndarray | None,
    out_dir: str | os.PathLike[str],
    resume: bool,
    progress: bool,
    final_fit: str,
    selection: str,
    grid: dict[str, list[float]] | None,
) -> dict[str, Any]:
    progress = progress and (dist is None or dist.is_main)
    env, out = _resolve(dataset, embedder, config, split_plan, train_rows, out_dir, resume, progress, selection, grid, dist)
    with runtime.ResourceMeter(env.device) as meter, _logs_above_bars(progress):
        selected = _select(env, config, out, selection=selection, grid=grid, resume=resume)
        final = _final_fit(env, config, selected.chosen, out, resume=resume) if final_fit == "train+val" else None
        model = final.model if final is not None else selected.chosen.model
        cfg = selected.chosen.config
        wall_seconds = time.perf_counter() - t_call
        host_rss_mb = runtime.peak_rss_mb()
        y_true, y_pred, _ = env.score("test", model, cfg, log_loss=False)
    measured = {
        "wall_seconds": wall_seconds,
        "peak_memory_mb": meter.peak_memory_mb,
        "memory_kind": meter.memory_kind,
        "host_rss_mb": host_rss_mb,
    }
    result = _record(env, config, selection, final_fit, grid, selected, final, model, y_true, y_pred, measured)
    if env.is_main:
        save_atomic(out / RESULT_NAME, lambda p: p.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8"))
    return result if dist is None else dist.broadcast(result)  # rank 0's record on every rank


def _collective_failure(exc: RuntimeError) -> bool:
    """A collective that failed because a peer went away (gloo/NCCL errors, timeouts), not a bug in this rank."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Broken pipe"))


@contextlib.contextmanager
def _quiet_unless_main(dist: distributed.DistContext | None) -> Iterator[None]:
    """Under torchrun only rank 0 logs the epoch lines (the others would repeat them); warnings still show."""
    if dist is None or dist.is_main:
        yield
        return
    old = log.level
    log.setLevel(max(logging.WARNING, old))
    try:
        yield
    finally:
        log.setLevel(old)


# --------------------------------------------------------------------------------------------------
# Resolve: every check before any work, then the rows, the network and what the runs share


def _check_options(config: FinetuneConfig, selection: str, final_fit: str | None) -> str:
    """Validate the call's options; the final fit (``"train"`` under the rule, else ``"train+val"`` by default)."""
    if not isinstance(config, FinetuneConfig):
        raise UsageError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    config.validate()
    if selection not in SELECTIONS:
        raise UsageError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if final_fit is not None and final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {final_fit!r}")
    if selection == "rule" and final_fit == "train+val":
        raise UsageError("selection='rule' uses no val labels, so the final fit is on train only (final_fit='train')")
    return final_fit or ("train" if selection == "rule" else "train+val")


def _resolve(
    dataset: str | os.PathLike[str] | ImageDataset,
    embedder: EmbedderSpec,
    config: FinetuneConfig,
    split_plan: SplitPlan,
    train_rows: Sequence[int] | np.ndarray | None,
    out_dir: str | os.PathLike[str],
    resume: bool,
    progress: bool,
    selection: str,
    grid: dict[str, list[float]] | None,
    dist: distributed.DistContext | None = None,
) -> tuple[Env, Path]:
    """Device, out_dir, rows and network, checked in this order before anything is written; then the shared Env.
    Under DDP: this rank's device, the per-rank batch, the checkpoint checks on rank 0 (it is the one that wrote it)."""
    device = runtime.resolve_device(config.device) if dist is None else torch.device(dist.device)
    runtime.check_precision(config.precision, device)
    world = 1 if dist is None else dist.world_size
    rank_batch = per_rank_batch(config.batch_size, world)
    out = Path(out_dir).expanduser()

    def check_resume() -> None:
        if resume and grid is None and not (out / CHECKPOINT_NAME).is_file():
            raise UsageError(f"resume=True but there is no checkpoint at {out / CHECKPOINT_NAME}")
        if resume and grid is not None and not (out / GRID_DIR).is_dir():
            raise UsageError(f"resume=True but there is no grid search to resume in {out / GRID_DIR}")

    on_main(dist, check_resume)
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    refuse_inside_dataset(out, ds, "--out-dir")
    splits, positions = _resolve_splits(ds, split_plan, train_rows)
    if selection == "rule":  # no val rows at all: not loaded, not hashed, not scored
        splits.pop("val")
        positions.pop("val")
    bb = build_embedder(embedder)
    factor = FORWARD_MEMORY_FACTOR if config.strategy == "head" else TRAINING_MEMORY_FACTOR  # head: frozen features
    check_forward_memory(rank_batch, bb.preprocessing.input_size, device, "--batch-size", factor=factor)
    prefixes = trainable_prefixes(config, bb.blocks)
    workers = runtime.default_num_workers() if config.num_workers is None else config.num_workers
    if dist is not None:  # the ranks on this machine share its cores: each gets its share for threads and workers
        cores = max(1, runtime.usable_cores() // dist.local_world_size)
        if config.num_workers is None:  # CPU: decode in-process; GPU: up to 8 decode workers per rank, one core left
            workers = 0 if device.type == "cpu" else max(1, min(8, cores - 1))
        if device.type == "cpu":
            torch.set_num_threads(max(1, cores - workers))
    else:
        runtime.configure_threads(workers, device)
    if dist is None or dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if batch_norm_mode(config.strategy, config.freeze_bn_stats, world, device) == "per-rank" and (dist is None or dist.is_main):
        log.warning(
            "BatchNorm statistics train but SyncBatchNorm needs GPUs: on gloo/CPU each rank normalises its own %d images "
            "per step and the running statistics are rank 0's",
            rank_batch,
        )
    pretrained = {k: v.detach().clone() for k, v in bb.model.state_dict().items()}
    return Env(ds, splits, positions, bb, pretrained, device, workers, prefixes, progress, dist), out


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


# --------------------------------------------------------------------------------------------------
# Select: the epoch (and grid point) on val, or the few-shot rule's schedule


def _select(
    env: Env, config: FinetuneConfig, out: Path, *, selection: str, grid: dict[str, list[float]] | None, resume: bool
) -> _Selected:
    probe = no_probe
    if config.strategy == "lp-ft":
        features = lambda name: env.probe_features(name, config)  # noqa: E731
        probe = selection_probe(features, n_classes=env.n_classes, use_val=selection == "val")
    if selection == "rule":
        return _select_by_rule(env, config, out, probe, resume)
    return _select_on_val(env, config, out, grid, probe, resume)


def _select_by_rule(env: Env, config: FinetuneConfig, out: Path, probe: Probe, resume: bool) -> _Selected:
    """No val labels: :func:`hyper_rule`'s schedule on the train rows, the last epoch's weights."""
    n_train = len(env.splits["train"])
    cfg, rule = hyper_rule(n_train, config)
    log.info("few-shot rule: %d images, %d epochs (%d steps), lr %.1e", n_train, cfg.epochs, rule["steps"], cfg.lr)
    chosen = run_stage(
        env,
        cfg,
        stage="rule",
        fit="train",
        use_val=False,
        epochs=cfg.epochs,
        probe=probe,
        ckpt_path=out / CHECKPOINT_NAME,
        resume=resume,
    )
    return _Selected(chosen, [], rule)


def _select_on_val(
    env: Env, config: FinetuneConfig, out: Path, grid: dict[str, list[float]] | None, probe: Probe, resume: bool
) -> _Selected:
    """Train each point on train with early stopping on val; keep the best point (:func:`best_grid_index`)."""
    points = _grid_points(config, out, grid)
    grid_rows: list[dict[str, Any]] = []
    chosen = None
    for i, (cfg, folder) in enumerate(points):
        if env.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        label = "" if grid is None else f"[{i + 1}/{len(points)} lr {cfg.lr:.0e} wd {cfg.weight_decay:g}] "
        t0 = time.perf_counter()
        o = run_stage(
            env,
            cfg,
            stage="select",
            fit="train",
            use_val=True,
            epochs=cfg.epochs,
            probe=probe,
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
    if len(points) > 1:
        chosen.model.load_state_dict(chosen.state.best_state)  # later grid points reused the same modules
    return _Selected(chosen, grid_rows, None)


def _grid_points(config: FinetuneConfig, out: Path, grid: dict[str, list[float]] | None) -> list[tuple[FinetuneConfig, Path]]:
    """The runs to choose among: ``config`` alone in ``out``, or each grid point (lr-major) in its own folder."""
    if grid is None:
        return [(config, out)]
    wds = grid["weight_decay"] or [config.weight_decay]
    configs = [replace(config, lr=float(lr), weight_decay=float(wd)) for lr in grid["lr"] for wd in wds]
    return [(c, out / GRID_DIR / point_name(c)) for c in configs]


# --------------------------------------------------------------------------------------------------
# Final fit: retrain from the pretrained weights on train + val for the chosen number of epochs


def _final_fit(env: Env, config: FinetuneConfig, chosen: StageOutcome, out: Path, *, resume: bool) -> StageOutcome:
    """Same seed and LR schedule as the chosen run, stopped at its chosen epoch; no val score is looked at."""
    probe = no_probe
    if config.strategy == "lp-ft":
        features = lambda name: env.probe_features(name, config)  # noqa: E731
        probe = final_probe(features, chosen.meta.get("lp_stage") or {}, n_classes=env.n_classes)
    return run_stage(
        env,
        chosen.config,
        stage="final",
        fit="fit",
        use_val=False,
        epochs=chosen.state.best_epoch,
        probe=probe,
        ckpt_path=out / FINAL_CHECKPOINT_NAME,
        resume=resume,
        label="final fit: ",
    )


# --------------------------------------------------------------------------------------------------
# Record: the result JSON


def _record(
    env: Env,
    config: FinetuneConfig,
    selection: str,
    final_fit: str,
    grid: dict[str, list[float]] | None,
    selected: _Selected,
    final: StageOutcome | None,
    model: torch.nn.Module,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    measured: dict[str, Any],
) -> dict[str, Any]:
    chosen = selected.chosen
    state, cfg = chosen.state, chosen.config
    positions, splits = env.positions, env.splits
    use_val = selection == "val"
    histories = [state.history] + ([final.state.history] if final is not None else [])
    train_seconds = sum(h["seconds"] for hist in histories for h in hist)
    train_images = sum(h["images"] for hist in histories for h in hist)
    fit_rows = positions["train"].pairs() + (positions["val"].pairs() if final is not None else [])
    backbone_updated, fine_tune_epochs = _what_trained(env, model, state, final, use_val)
    world = 1 if env.dist is None else env.dist.world_size
    result: dict[str, Any] = {
        "strategy": config.strategy,
        "embedder": env.bb.spec.to_dict(),
        "config": cfg.to_dict(),
        "dataset": env.ds.name,
        "classes": list(env.ds.classes),
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
        "metrics": classification_metrics(y_true, y_pred, env.n_classes),
        "test_predictions": [int(v) for v in y_pred],
        "test_labels": [int(v) for v in y_true],
        "val_accuracy": state.best_val_accuracy if use_val else None,
        "val_log_loss": state.best_val_log_loss if use_val else None,
        "backbone_updated": backbone_updated,
        "fine_tune_epochs": fine_tune_epochs,
        "augment": augment_record(cfg.augment),
        "best_epoch": state.best_epoch if use_val else state.epochs_run,
        "epochs_run": state.epochs_run,
        "epochs_budget": cfg.epochs,
        "still_improving": (state.best_epoch == state.epochs_run == cfg.epochs) if use_val else None,
        "stopped_early": state.epochs_run < cfg.epochs,
        "final_epochs": final.state.epochs_run if final is not None else None,
        "resumed_from_epoch": chosen.resumed_from,
        "history": state.history,
        "final_history": final.state.history if final is not None else None,
        "wall_seconds": measured["wall_seconds"],
        "train_seconds": train_seconds,
        "train_images_per_s": train_images / max(train_seconds, 1e-9),
        "peak_memory_mb": measured["peak_memory_mb"],
        "memory_kind": measured["memory_kind"],
        "host_rss_mb": measured["host_rss_mb"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "device": str(env.device),
        "world_size": world,
        "backend": None if env.dist is None else env.dist.backend,
        "per_rank_batch_size": cfg.batch_size // world,
        "batch_norm": batch_norm_mode(cfg.strategy, cfg.freeze_bn_stats, world, env.device),
        "precision": config.precision,
        "lp_stage": (final.meta if final is not None else chosen.meta).get("lp_stage"),
        "rule": selected.rule,
        "featx_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if grid is not None:
        result.update(_search_record(config, grid, selected, final))
    return result


def _what_trained(
    env: Env, model: torch.nn.Module, state: TrainState, final: StageOutcome | None, use_val: bool
) -> tuple[bool, int]:
    """``backbone_updated`` and ``fine_tune_epochs`` of the final model, from what ran.

    The epochs behind it: the refit's, or the selection run's up to the chosen one (lp-ft's epoch 0 = the probe
    alone), or the rule's. The backbone trained in those epochs that took an optimizer step while it had trainable
    parameters; it is "updated" when its weights or BatchNorm statistics differ from the pretrained ones.
    """
    if final is not None:
        history = final.state.history
    else:
        last = state.best_epoch if use_val else state.epochs_run
        history = [h for h in state.history if 1 <= h["epoch"] <= last]
    backbone_trainable = any(p.requires_grad for p in model.backbone.parameters())
    fine_tune_epochs = sum(1 for h in history if h.get("steps", h["images"]) > 0) if backbone_trainable else 0
    return _backbone_changed(model.backbone.state_dict(), env.pretrained), fine_tune_epochs


def _search_record(
    config: FinetuneConfig, grid: dict[str, list[float]], selected: _Selected, final: StageOutcome | None
) -> dict[str, Any]:
    """finetune_search's additions: the grid rows and spec, the chosen point, whether its lr is at the grid's edge
    (the lr axis; the report reads the whole grid), and ``train_seconds`` over every grid point and the refit."""
    state, cfg = selected.chosen.state, selected.chosen.config
    return {
        "grid": selected.grid_rows,
        "grid_spec": {"lr": list(grid["lr"]), "weight_decay": grid["weight_decay"] or [config.weight_decay]},
        "chosen": {
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "epochs": state.best_epoch,
            "val_accuracy": state.best_val_accuracy,
            "val_log_loss": state.best_val_log_loss,
        },
        "at_grid_edge": bool(grid_edges({"lr": sorted(set(grid["lr"]))}, {"lr": cfg.lr})),
        "train_seconds": sum(r["seconds"] for r in selected.grid_rows)
        + sum(h["seconds"] for h in (final.state.history if final is not None else [])),
    }


def _backbone_changed(state: dict[str, Any], pretrained: dict[str, Any], *, prefix: str = "") -> bool:
    """Whether any backbone weight or buffer (BatchNorm statistics included) in ``state`` differs from the
    pretrained one. ``prefix``: how ``state`` names the backbone's entries (``"backbone."`` in a model state)."""
    for name, value in pretrained.items():
        now = state.get(prefix + name)
        if now is None or not torch.equal(now.detach().to("cpu"), value.to("cpu")):
            return True
    return False


@contextlib.contextmanager
def _logs_above_bars(enabled: bool) -> Iterator[None]:
    """Route log lines through ``tqdm.write`` while bars are shown, so the epoch lines do not tear them."""
    if not enabled:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield
