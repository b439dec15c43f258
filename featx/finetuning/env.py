"""What every training run of one call shares (:class:`Env`): the dataset rows, the backbone (reset to its
pretrained weights for each run), the device, the data loaders and the frozen features of lp-ft's probe.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from featx import runtime
from featx.backbones import Backbone
from featx.data import ImageDataset, ImageFiles, RowSelection, Split
from featx.finetuning.config import FinetuneConfig, train_transform
from featx.finetuning.ddp import eval_slice, gather_scores, per_rank_batch
from featx.finetuning.loop import evaluate, evaluate_log_loss, is_trainable, predict_rows
from featx.finetuning.probe import Head, init_head_from_probe
from featx.inference import compute_features


def _concat_splits(a: Split, b: Split, name: str) -> Split:
    """Two splits of one dataset as one (train + val for the final fit); paths are relative to the same root."""
    return Split(name, a.root, a.paths + b.paths, np.concatenate([a.labels, b.labels]), a.classes)


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: torch is seeded per worker already; seed numpy and random from it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    bb: Backbone, split: Split, *, train: bool, config: FinetuneConfig, workers: int, device: torch.device, dist: Any = None
) -> Any:
    """A split's loader. One process: every row (train: shuffled by the loader's generator). Under DDP (``dist``):
    train rows through a :class:`DistributedSampler` (global batch split over the ranks, see
    :mod:`featx.finetuning.ddp`), eval rows as this rank's contiguous slice (no padding)."""
    size = bb.preprocessing.input_size
    transform = train_transform(bb.preprocessing, config.augment) if train else bb.preprocessing.build_transform()
    files: Any = ImageFiles(split.root, split.paths, split.labels, transform, failed_shape=(3, size, size))
    batch, sampler, n = config.batch_size, None, len(split)
    if dist is not None:
        if train:
            batch = per_rank_batch(config.batch_size, dist.world_size)
            sampler = DistributedSampler(files, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=config.seed)
            n = sampler.num_samples  # the same on every rank: every rank takes the same number of steps
        else:
            files = Subset(files, eval_slice(len(split), dist.rank, dist.world_size))
    return DataLoader(
        files,
        batch_size=batch,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator() if train else None,
        worker_init_fn=_seed_worker,
        drop_last=train and n % batch == 1,  # a batch of one breaks BatchNorm in train mode
        persistent_workers=workers > 0 and not train,  # train workers restart per epoch: exact resume
        pin_memory=device.type == "cuda",
    )


@dataclass
class Env:
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
    dist: Any = None  # featx.distributed.DistContext under torchrun, else None (the single-process path)
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
            self.loaders[key] = make_loader(
                self.bb, self.split(name), train=train, config=config, workers=self.workers, device=self.device, dist=self.dist
            )
        return self.loaders[key]

    @property
    def is_main(self) -> bool:
        """Rank 0, or the only process: the one that writes checkpoints and results."""
        return self.dist is None or self.dist.is_main

    def score(
        self, name: str, model: nn.Module, config: FinetuneConfig, *, log_loss: bool
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """``(y_true, y_pred, log-loss)`` of ``model`` (unwrapped) on every row of split ``name``, in dataset order.

        Under DDP each rank scores its slice and the scores are gathered on every rank; the log-loss is NaN
        when ``log_loss`` is False."""
        loader = self.loader(name, train=False, config=config)
        kw = {"channels_last": config.channels_last}
        if self.dist is None:
            if log_loss:
                return evaluate_log_loss(model, loader, self.device, config.precision, **kw)
            return (*evaluate(model, loader, self.device, config.precision, **kw), float("nan"))
        y, p, nll = predict_rows(model, loader, self.device, config.precision, log_loss=log_loss, **kw)
        y_all, p_all, loss = gather_scores(self.dist, y, p, nll)
        return y_all, p_all, loss if log_loss else float("nan")

    def probe_features(self, name: str, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
        """Pretrained (frozen) pooled features and labels of a split; images that failed to decode are left out."""
        if name not in self.features:
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

    def build_model(self, config: FinetuneConfig, probe: Head | None) -> nn.Module:
        """The pretrained backbone and a new head (seeded), or the probe copied into it."""
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.bb.model.load_state_dict(self.pretrained)
        head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(self.bb.feature_dim, self.n_classes))
        if probe is not None:
            init_head_from_probe(head[1], *probe)
        model = nn.Sequential(OrderedDict(backbone=self.bb.model, head=head))
        for name, p in model.backbone.named_parameters():
            p.requires_grad_(is_trainable(name, self.prefixes))
        fmt = torch.channels_last if config.channels_last else torch.contiguous_format
        return model.to(self.device, memory_format=fmt)
