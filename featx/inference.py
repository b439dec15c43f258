"""The batched frozen forward: decode in worker processes, batch, run the model, yield features by position.

Everything between image files and a float32 feature matrix lives here (thread and worker allocation,
batch size, memory format, autocast, device copies), so extraction into caches, prediction and the
sklearn transformer share one hot loop. Writing the features anywhere is the caller's job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featx import runtime
from featx.backbones import POOLED, Backbone, Preprocessing
from featx.data import ImageFiles


@dataclass(frozen=True)
class Batch:
    positions: np.ndarray  # positions in the iterated list
    features: np.ndarray  # float32 (B, D); rows of failed images are undefined
    labels: np.ndarray
    errors: list[str]  # "" for images that decoded


def default_batch_size(device: Any) -> int:
    # On small CPUs large batches are slower per image (cache effects; ../shared/notes/cpu-reference.md).
    return 128 if device.type == "cuda" else 16


def iter_features(
    model: Any,
    preprocessing: Preprocessing,
    root: str | Path,
    paths: Sequence[str],
    labels: Sequence[int] | np.ndarray | None = None,
    *,
    device: Any,
    batch_size: int,
    num_workers: int,
    precision: str = "fp32",
    channels_last: bool = True,
    progress: bool = True,
    desc: str = "extract",
) -> Iterator[Batch]:
    """Yield features for ``paths`` batch by batch, in order. ``model`` maps images to (N, D)."""
    import torch
    from torch.utils.data import DataLoader

    size = preprocessing.input_size
    files = ImageFiles(root, paths, labels, preprocessing.build_transform(), failed_shape=(3, size, size))
    loader = DataLoader(
        files,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    model = model.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=memory_format)
    bar = runtime.progress_bar(None, total=len(files), desc=desc, enabled=progress)
    try:
        with torch.inference_mode():
            for images, labs, pos, errors in loader:
                x = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                with runtime.autocast(device, precision):
                    feats = model(x)
                yield Batch(pos.numpy(), feats.float().cpu().numpy(), labs.numpy(), list(errors))
                bar.update(len(pos))
    finally:
        bar.close()


def compute_features(
    backbone: Backbone,
    root: str | Path,
    paths: Sequence[str],
    *,
    layer: str = POOLED,
    device: str | Any = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """Features of images in memory (no cache): ``(features (N, D) float32, errors)``.

    ``errors[i]`` is "" when image i decoded, else the reason (its feature row is zeros).
    """
    dev = device if not isinstance(device, str) else runtime.resolve_device(device)
    runtime.check_precision(precision, dev)
    workers = runtime.default_num_workers() if num_workers is None else num_workers
    runtime.configure_threads(workers, dev)
    out: np.ndarray | None = None
    errors: list[str] = [""] * len(paths)
    for b in iter_features(
        backbone.feature_model(layer),
        backbone.preprocessing,
        root,
        paths,
        device=dev,
        batch_size=batch_size or default_batch_size(dev),
        num_workers=workers,
        precision=precision,
        progress=progress,
        desc="features",
    ):
        if out is None:
            out = np.zeros((len(paths), b.features.shape[1]), dtype=np.float32)
        ok = np.array([not e for e in b.errors])
        out[b.positions[ok]] = b.features[ok]
        for p, e in zip(b.positions, b.errors):
            errors[int(p)] = e
    assert out is not None
    return out, errors
