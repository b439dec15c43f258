"""Feature extraction into HDF5 caches: one cache per split, found by key, written by dataset position.

The batched forward itself lives in :mod:`featx.inference`; this module decides what to compute
(cache hits, keys, locks) and where the rows go.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import runtime
from featx.backbones import (
    DEFAULT_BACKBONE,
    POOLED,
    Backbone,
    EmbedderSpec,
    build_embedder,
    resolve_embedder,
)
from featx.cache import CacheSpec, CacheWriter, base_attrs, cache_filename, find_cache, resolve_cache_dir
from featx.data import ImageDataset, Split, load_dataset
from featx.errors import DataError, UsageError
from featx.inference import compute_features, default_batch_size, iter_features  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractResult:
    split: str
    path: Path
    key: str
    hit: bool
    n_images: int
    n_failed: int
    seconds: float
    images_per_s: float
    failures: tuple[tuple[str, str], ...] = ()

    def summary(self) -> str:
        if self.hit:
            return f"{self.split}: cache hit {self.path.name} ({self.n_images} images, no model run)"
        return (
            f"{self.split}: {self.n_images} images, {self.n_failed} skipped, {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} img/s) -> {self.path.name}"
        )


def cache_spec(split: Split, embedder: EmbedderSpec) -> CacheSpec:
    """The key ingredients of one split's cache, computed without building the model."""
    return CacheSpec(dataset_fingerprint=split.fingerprint(), split=split.name, embedder=embedder)


def find_caches(
    dataset: str | Path | ImageDataset,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    layer: str = POOLED,
    image_size: int | None = None,
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
) -> dict[str, Path]:
    """The existing cache of every split of ``dataset`` for these options, found by key (no model is
    built). A split without a cache raises :class:`CacheError` saying which command makes it."""
    from featx.cache import find_cache
    from featx.errors import CacheError

    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    cdir = resolve_cache_dir(cache_dir)
    embedder = resolve_embedder(backbone, weights, layer=layer, image_size=image_size, precision=precision)
    found = {}
    for name, split in ds.splits.items():
        path = find_cache(cdir, cache_spec(split, embedder))
        if path is None:
            raise CacheError(
                f"no cache for split '{name}' of {ds.root} with these options in {cdir}: "
                f"run `featx extract {ds.root}` with the same options first (or add --extract)"
            )
        found[name] = path
    return found


def extract(
    dataset: str | Path | ImageDataset,
    *,
    splits: Sequence[str] | None = None,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    layer: str = POOLED,
    image_size: int | None = None,
    precision: str = "fp32",
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    channels_last: bool = True,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> list[ExtractResult]:
    """Extract features for each split of ``dataset`` into the cache folder; existing caches are hits.

    The model is built only when some split misses. Returns one result per split.
    """
    from filelock import FileLock

    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    names = list(splits) if splits else list(ds.splits)
    for n in names:
        ds.split(n)  # raises a clear error for a split the dataset does not have
    embedder = resolve_embedder(backbone, weights, layer=layer, image_size=image_size, precision=precision)
    cdir = resolve_cache_dir(cache_dir)
    results: list[ExtractResult] = []
    bb: Backbone | None = None
    for name in names:
        split = ds.split(name)
        spec = cache_spec(split, embedder)
        key = spec.key()
        final = cdir / cache_filename(ds.name, spec)
        cdir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):  # a second run for the same key waits, then sees a hit
            hit = find_cache(cdir, spec)
            if hit is not None and force:
                hit.unlink()
                hit = None
            if hit is not None:
                from featx.cache import read_cache_attrs

                a = read_cache_attrs(hit)
                results.append(ExtractResult(name, hit, key, True, int(a["n_images"]), int(a["n_failed"]), 0.0, 0.0))
                continue
            if bb is None:
                bb = build_embedder(embedder)
                if layer != POOLED and layer not in dict(bb.model.named_modules()):
                    raise UsageError(f"backbone {bb.name} has no layer '{layer}' (try: {', '.join(bb.layers)})")
            results.append(
                _extract_split(
                    ds,
                    split,
                    spec,
                    final,
                    bb,
                    layer=layer,
                    precision=precision,
                    device=device,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    channels_last=channels_last,
                    progress=progress,
                )
            )
    return results


def _extract_split(
    ds: ImageDataset,
    split: Split,
    spec: CacheSpec,
    final: Path,
    bb: Backbone,
    *,
    layer: str,
    precision: str,
    device: str,
    batch_size: int | None,
    num_workers: int | None,
    channels_last: bool,
    progress: bool,
) -> ExtractResult:
    dev = runtime.resolve_device(device)
    runtime.check_precision(precision, dev)
    workers = runtime.default_num_workers() if num_workers is None else num_workers
    runtime.configure_threads(workers, dev)
    bs = batch_size or default_batch_size(dev)
    model = bb.feature_model(layer)
    emb = bb.embedder(layer, precision)
    attrs = {
        **base_attrs(),
        "key": spec.key(),
        "embedder": emb.to_dict(),
        "dataset_name": ds.name,
        "dataset_root": str(ds.root),
        "dataset_fingerprint": spec.dataset_fingerprint,
        "split": split.name,
        "backbone": emb.backbone,  # the embedder's fields most often looked at, also flat for `cache ls` and h5 tools
        "layer": layer,
        "device": str(dev),
        "batch_size": bs,
    }
    t0 = time.perf_counter()
    with CacheWriter(final, n_rows=len(split), attrs=attrs) as writer:
        dim = 0
        for b in iter_features(
            model,
            bb.preprocessing,
            split.root,
            split.paths,
            split.labels,
            device=dev,
            batch_size=bs,
            num_workers=workers,
            precision=precision,
            channels_last=channels_last,
            progress=progress,
            desc=f"extract {split.name}",
        ):
            feats = b.features.astype(np.float16 if precision == "fp16" else np.float32)
            writer.write(b.positions, feats, b.errors)
            dim = feats.shape[1]
        n_failed = len(writer.failures)
        if n_failed == len(split):
            first = writer.failures[0][1] if writer.failures else "?"
            raise DataError(f"none of the {len(split)} images in split '{split.name}' could be decoded (first: {first})")
        seconds = time.perf_counter() - t0
        failures = tuple((split.paths[i], r) for i, r in writer.failures)
        path = writer.finish(
            labels=split.labels,
            paths=list(split.paths),
            indices=np.arange(len(split)),
            classes=list(split.classes),
            attrs={
                "extraction_seconds": seconds,
                "n_images": len(split),
                "feature_dim": dim,
                "images_per_s": len(split) / seconds,
            },
        )
    for p, r in failures[:5]:
        log.warning("skipped %s: %s", p, r)
    return ExtractResult(split.name, path, spec.key(), False, len(split), n_failed, seconds, len(split) / seconds, failures)
