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

from featx.backbones import EmbedderSpec
from featx.errors import DataError
from featx.runtime import InferenceSettings


class ImageFeatureExtractor(TransformerMixin, BaseEstimator):
    """Image paths (absolute, or relative to ``root``) -> (N, D) float32 features of a frozen backbone.

    ``embedder`` (an :class:`~featx.backbones.EmbedderSpec`) says which features, ``settings`` (an
    :class:`~featx.runtime.InferenceSettings`) how the forward runs. The loose parameters mirror ``featx extract``
    and are a convenience that builds them (None: the default; given with the object, they must agree with it):
    ``backbone`` (efficientnet_lite0), ``weights``, ``layer``, ``image_size``, ``precision``; ``device``,
    ``batch_size``, ``num_workers`` (None: 0 when no settings are given, i.e. decode in this process). Without
    ``settings`` the documented ``FEATX_*`` environment defaults apply when features are computed.
    An image that cannot be decoded raises :class:`DataError` (a pipeline cannot drop rows silently).
    """

    def __init__(
        self,
        backbone: str | None = None,
        *,
        weights: str | None = None,
        layer: str | None = None,
        image_size: int | None = None,
        precision: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        root: str | None = None,
        embedder: EmbedderSpec | None = None,
        settings: InferenceSettings | None = None,
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
        self.embedder = embedder
        self.settings = settings

    def _settings(self) -> InferenceSettings:
        from featx import runtime

        workers = self.num_workers
        if self.settings is None and workers is None:
            workers = 0
        return runtime.inference_settings(self.settings, device=self.device, batch_size=self.batch_size, num_workers=workers)

    def fit(self, X: Sequence[str], y: Any = None) -> ImageFeatureExtractor:
        """Build the backbone (the features need no fitting); records ``embedder_`` and ``n_features_out_``."""
        from featx.backbones import build_embedder, embedder_spec

        spec = embedder_spec(
            self.embedder,
            backbone=self.backbone,
            weights=self.weights,
            layer=self.layer,
            image_size=self.image_size,
            precision=self.precision,
        )
        self.backbone_ = build_embedder(spec)
        self.embedder_ = spec
        self.preprocessing_ = self.backbone_.preprocessing.to_dict()
        self.n_features_out_ = self.backbone_.layer_dim(spec.layer)
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
            layer=self.embedder_.layer,
            precision=self.embedder_.precision,
            settings=self._settings(),
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
