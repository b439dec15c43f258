"""A scikit-learn transformer that turns image paths into backbone features.

Lets a frozen backbone sit in a ``sklearn.pipeline.Pipeline`` in front of any head::

    Pipeline([("features", ImageFeatureExtractor()), ("head", LogisticRegression(max_iter=1000))])

It is a thin layer over :func:`featx.extraction.compute_features`: parameters are stored unchanged in
``__init__`` (sklearn's contract), the backbone is built in ``fit``, and pickling keeps the
configuration, not the weights (the backbone is rebuilt on first use after loading).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx.backbones import DEFAULT_BACKBONE, POOLED
from featx.errors import DataError


class ImageFeatureExtractor(TransformerMixin, BaseEstimator):
    """Image paths (absolute, or relative to ``root``) -> (N, D) float32 features of a frozen backbone.

    Parameters mirror ``featx extract``. An image that cannot be decoded raises :class:`DataError`
    (a pipeline cannot drop rows silently).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        *,
        weights: str = "imagenet",
        layer: str = POOLED,
        image_size: int | None = None,
        precision: str = "fp32",
        device: str = "auto",
        batch_size: int | None = None,
        num_workers: int | None = 0,
        root: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.image_size = image_size
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.root = root

    def fit(self, X: Sequence[str], y: Any = None) -> ImageFeatureExtractor:
        """Build the backbone (the features need no fitting); records ``n_features_out_``."""
        from featx.backbones import build_backbone

        self.backbone_ = build_backbone(self.backbone, self.weights, image_size=self.image_size)
        self.preprocessing_ = self.backbone_.preprocessing.to_dict()
        self.n_features_out_ = self.backbone_.layer_dim(self.layer)
        return self

    def transform(self, X: Sequence[str]) -> np.ndarray:
        from featx.inference import compute_features

        check_is_fitted(self, "n_features_out_")
        if getattr(self, "backbone_", None) is None:  # unpickled: rebuild from the stored configuration
            self.fit(X)
        paths = [str(p) for p in np.asarray(X, dtype=object).ravel()]
        # Path("") / "a.jpg" is relative to the working directory; an absolute path ignores the root.
        feats, errors = compute_features(
            self.backbone_,
            Path(self.root or ""),
            paths,
            layer=self.layer,
            device=self.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            precision=self.precision,
        )
        bad = [(p, e) for p, e in zip(paths, errors) if e]
        if bad:
            raise DataError(f"{len(bad)} image(s) could not be decoded, e.g. {bad[0][0]}: {bad[0][1]}")
        return feats

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        check_is_fitted(self, "n_features_out_")
        return np.asarray([f"imagefeatureextractor{i}" for i in range(self.n_features_out_)], dtype=object)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["backbone_"] = None  # configuration only: weights are rebuilt, not pickled
        return state

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags
