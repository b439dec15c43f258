"""featx: transfer learning on images — frozen-backbone features, cheap heads, and an honest comparison
with fine-tuning.

Importing ``featx`` is cheap (no torch); the public API is loaded on first use::

    import featx
    featx.extract("data/", backbone="efficientnet_lite0")
    fs = featx.load_cache("cache/....h5")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_dataset": "featx.data",
    "ImageDataset": "featx.data",
    "SplitPlan": "featx.data",
    "SAMPLE_DATASET": "featx.data",
    "build_backbone": "featx.backbones",
    "list_backbones": "featx.backbones",
    "Preprocessing": "featx.backbones",
    "EmbedderSpec": "featx.backbones",
    "resolve_embedder": "featx.backbones",
    "InferenceSettings": "featx.runtime",
    "extract": "featx.extraction",
    "compute_features": "featx.inference",
    "find_caches": "featx.extraction",
    "load_cache": "featx.cache",
    "list_caches": "featx.cache",
    "FeatureSet": "featx.cache",
    "fit_head": "featx.heads",
    "make_head": "featx.heads",
    "save_head": "featx.heads",
    "load_head": "featx.heads",
    "rank": "featx.ranking",
    "predict": "featx.prediction",
    "ImageFeatureExtractor": "featx.estimators",
    "finetune": "featx.finetuning",
    "FinetuneConfig": "featx.finetuning",
    "run_bench": "featx.bench",
    "FeatxError": "featx.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
