"""Fine-tuning under ``torchrun`` (DistributedDataParallel): what each rank does differently from one process.

``torchrun --nproc_per_node=N -m featx finetune ...`` starts N ranks; :func:`featx.distributed.from_environment`
joins them (gloo on the CPU, NCCL with one GPU per rank). A plain process gets ``dist=None`` everywhere below and
runs exactly the single-process code. Under DDP:

* **Batch**: ``config.batch_size`` is the *global* batch (the images behind one optimizer step, as in one
  process); each rank loads ``batch_size / world_size`` of them (:func:`per_rank_batch`, which must divide), so
  the LR, the schedule's steps per epoch and the recipe mean the same on 1 or N GPUs. DDP averages the ranks'
  gradients, i.e. the gradient of the mean loss over the global batch.
* **Training rows**: a :class:`~torch.utils.data.DistributedSampler` (seed ``config.seed``, ``set_epoch(epoch)``
  every epoch, the same permutation on every rank, each rank a strided share). It pads the permutation with its
  first rows up to a multiple of ``world_size`` (at most ``world_size - 1`` repeated training images per epoch)
  so that every rank takes the same number of steps.
* **Seeds**: the model (the new head) is built from ``config.seed`` on every rank, and DDP broadcasts rank 0's
  weights anyway. Before each epoch every rank reseeds torch, numpy and ``random`` from
  :func:`rank_seed` = ``SeedSequence([seed, epoch, rank])`` (augmentation draws and Dropout masks differ between
  ranks, and a resumed run repeats them without per-rank RNG states in the checkpoint).
* **Scoring** (val after each epoch, test once): each rank scores the contiguous slice
  :func:`eval_slice` of the split -- disjoint, no padding -- with the unwrapped model, and the predictions, labels
  and summed cross-entropies are gathered in dataset order on every rank: the metrics are those of one process
  scoring every row once with the same weights, and every rank takes the same early-stopping and best-epoch
  decisions.
* **State**: after each epoch, parameters and buffers are broadcast from rank 0 (:func:`sync_state`) so that the
  weights rank 0 checkpoints are the weights every rank scores with. Only rank 0 writes checkpoints and the
  result; on resume rank 0 reads the checkpoint and broadcasts it (:func:`on_main`), so the ranks need not share
  a filesystem for reading and resume from the same state.
* **BatchNorm**: frozen statistics (``freeze_bn_stats``, the default) stay frozen. When statistics train and
  world_size > 1, GPU ranks use :class:`torch.nn.SyncBatchNorm` (statistics over the global batch). PyTorch's
  SyncBatchNorm refuses CPU tensors, so on gloo/CPU each rank normalises with its own per-rank batch and the
  running statistics are rank 0's (DDP broadcasts rank 0's buffers before every forward, :func:`sync_state`
  after every epoch); the result records ``batch_norm``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from featx.errors import FeatxError, UsageError

log = logging.getLogger("featx.finetuning")

T = TypeVar("T")


class RankFailedError(FeatxError):
    """Another rank of a torchrun job stopped: this rank cannot go on (exit 1, like an internal failure)."""

    exit_code = 1


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """The images each rank loads per step: the global ``batch_size`` split evenly over the ranks."""
    if batch_size % world_size:
        err = UsageError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the {world_size} ranks "
            f"(each rank loads batch-size / world-size images per step); use e.g. {-(-batch_size // world_size) * world_size}"
        )
        err.on_every_rank = True  # type: ignore[attr-defined]  # every rank raises it: the CLI prints it once (rank 0)
        raise err
    return batch_size // world_size


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of ``rank``'s torch/numpy/random streams in ``epoch`` (0-based): ``SeedSequence([seed, epoch, rank])``."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_rank(seed: int, epoch: int, rank: int) -> None:
    import random

    s = rank_seed(seed, epoch, rank)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def eval_slice(n: int, rank: int, world_size: int) -> range:
    """The rows ``rank`` scores: contiguous, disjoint, together every row once (sizes differ by at most one)."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def on_main(dist: Any, fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 and its value (or its FeatxError) on every rank; plain ``fn()`` without ``dist``."""
    if dist is None:
        return fn()
    box: tuple[str, Any] = ("ok", None)
    if dist.is_main:
        try:
            box = ("ok", fn())
        except FeatxError as exc:
            box = ("error", exc)
            dist.broadcast(box)
            raise
    box = dist.broadcast(box)
    if box[0] == "error":
        raise box[1]
    return box[1]


def gather_scores(dist: Any, y_true: np.ndarray, y_pred: np.ndarray, nll_sum: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Every rank's slice scores, concatenated in rank order (= dataset order), and the mean cross-entropy."""
    parts = dist.gather((y_true, y_pred, nll_sum))
    y_all = np.concatenate([p[0] for p in parts])
    return y_all, np.concatenate([p[1] for p in parts]), sum(p[2] for p in parts) / max(len(y_all), 1)


def gather_train_stats(dist: Any, stats: dict[str, float]) -> dict[str, float]:
    """One epoch's training numbers over all ranks: loss and accuracy over every image trained on, images summed,
    seconds the slowest rank's (the epoch ends when it does)."""
    parts = dist.gather(stats)
    seen = sum(p["images"] for p in parts)
    return {
        "loss": sum(p["loss"] * p["images"] for p in parts) / max(seen, 1),
        "accuracy": sum(p["accuracy"] * p["images"] for p in parts) / max(seen, 1),
        "images": seen,
        "steps": parts[0]["steps"],
        "seconds": max(p["seconds"] for p in parts),
    }


def sync_state(dist: Any, model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (DDP keeps parameters equal; per-rank BatchNorm buffers on
    the CPU are not, until this)."""
    import torch.distributed as tdist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            tdist.broadcast(t.data, src=0)


def batch_norm_mode(strategy: str, freeze_bn_stats: bool, world_size: int, device: torch.device) -> str:
    """How BatchNorm statistics behave in this run: ``frozen``, ``train`` (one process), ``sync`` (SyncBatchNorm
    over the global batch) or ``per-rank`` (gloo/CPU: local batches, rank 0's running statistics)."""
    if strategy == "head" or freeze_bn_stats:
        return "frozen"
    if world_size == 1:
        return "train"
    return "sync" if device.type == "cuda" else "per-rank"


def wrap(model: nn.Module, dist: Any, bn_mode: str) -> nn.Module:
    """The module the training step runs: ``model`` itself in one process, else DDP around it (SyncBatchNorm
    first when ``bn_mode == "sync"``; ``model`` is changed in place, its state-dict keys stay)."""
    if dist is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if bn_mode == "sync":
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    device_ids = [dist.local_rank] if dist.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=bn_mode != "frozen")


def distributed_failure(dist: Any, exc: BaseException) -> RankFailedError:
    """The one line a surviving rank prints when a collective failed because another rank stopped."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RankFailedError(
        f"rank {dist.rank} of {dist.world_size}: a collective failed ({first[:160]}); another rank stopped "
        "(torchrun's summary names it); the last finished epoch's checkpoint stays: rerun the same command with --resume"
    )
