"""Prediction: rebuild exactly the backbone, layer and preprocessing a head was trained on, then
label new images (or the rows of a cache) with class probabilities."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featx.backbones import Backbone, EmbedderSpec, build_embedder
from featx.cache import FeatureSet, load_cache, resolve_cache_dir
from featx.data import list_images
from featx.errors import DataError, MismatchError
from featx.heads import FittedHead, load_head
from featx.runtime import InferenceSettings, inference_settings

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    paths: list[str]
    labels: list[str]
    probabilities: np.ndarray  # (N, C)
    classes: list[str]
    failures: list[tuple[str, str]]  # images that could not be decoded (no prediction)

    def to_rows(self) -> list[dict[str, Any]]:
        return [
            {"path": p, "label": lab, **{f"p_{c}": float(v) for c, v in zip(self.classes, probs)}}
            for p, lab, probs in zip(self.paths, self.labels, self.probabilities)
        ]

    def write(self, output: str | os.PathLike[str] | None) -> str | None:
        """CSV or JSON by extension; ``-`` or None returns the CSV text instead (for stdout)."""
        rows = self.to_rows()
        if output is not None and str(output) != "-" and str(output).endswith(".json"):
            Path(output).write_text(
                json.dumps(
                    {
                        "classes": self.classes,
                        "predictions": rows,
                        "failures": [{"path": p, "reason": r} for p, r in self.failures],
                    },
                    indent=2,
                )
            )
            return None
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["path", "label", *[f"p_{c}" for c in self.classes]])
        writer.writeheader()
        writer.writerows(rows)
        if output is None or str(output) == "-":
            return buf.getvalue()
        Path(output).write_text(buf.getvalue())
        return None


def backbone_for_head(head: FittedHead, *, weights_path: str | os.PathLike[str] | None = None) -> Backbone:
    """Rebuild the head's embedder; refuse if the weights file or the preprocessing is no longer the same.
    ``weights_path`` locates a weights file that has moved since the head was trained (its sha256 must match)."""
    spec = head.embedder
    bb = build_embedder(spec, weights_path=weights_path)
    _warn_versions(spec, bb.spec, "the head was trained")
    return bb


def _warn_versions(recorded: EmbedderSpec, now: EmbedderSpec, when: str) -> None:
    changed = recorded.version_changes(now)
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        log.warning("%s with other library versions (%s): features may differ slightly", when, what)


def check_cache_matches_head(head: FittedHead, fs: FeatureSet) -> None:
    diff = head.embedder.differences(fs.embedder)
    if diff:
        raise MismatchError(f"cache {fs.path.name} does not match the head: different {', '.join(diff)}")
    if list(fs.classes) != list(head.classes) and (fs.labels >= 0).any():
        raise MismatchError(f"cache {fs.path.name} has other classes than the head")
    _warn_versions(head.embedder, fs.embedder, f"cache {fs.path.name} was made")


def predict(
    head: str | os.PathLike[str] | FittedHead,
    inputs: Sequence[str | os.PathLike[str]] = (),
    *,
    cache: str | os.PathLike[str] | None = None,
    settings: InferenceSettings | None = None,
    weights: str | os.PathLike[str] | None = None,
    progress: bool = False,
    device: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Predictions:
    """Label images (files, folders, CSV with a ``path`` column) or the rows of a cache file.

    The images go through the head's own embedder; ``settings`` say how the forward runs (default:
    :meth:`InferenceSettings.from_env`; ``device``, ``batch_size``, ``num_workers`` are a convenience that builds
    them). ``weights`` points at the head's weights file when it has moved (checked against the recorded sha256).
    With ONNX Runtime (``settings.runtime``) the embedder's checked export is taken from, or kept in, the cache folder
    (``cache_dir``, else ``$FEATX_CACHE_DIR`` or ``./cache``) when that folder exists; prediction never creates it."""
    from featx.inference import compute_features

    h = head if isinstance(head, FittedHead) else load_head(head)
    failures: list[tuple[str, str]] = []
    if cache is not None:
        fs = load_cache(cache)
        check_cache_matches_head(h, fs)
        feats, paths = fs.features, fs.paths
    else:
        settings = inference_settings(settings, device=device, batch_size=batch_size, num_workers=num_workers)
        root, rel, _ignored = list_images(inputs)
        bb = backbone_for_head(h, weights_path=weights)
        emb = h.embedder
        feats, errors = compute_features(
            bb,
            root,
            rel,
            layer=emb.layer,
            precision=emb.precision,
            settings=settings,
            progress=progress,
            onnx_dir=resolve_cache_dir(cache_dir),
        )
        ok = np.array([not e for e in errors])
        failures = [(str(root / p), e) for p, e in zip(rel, errors) if e]
        if not ok.any():
            raise DataError(f"none of the {len(rel)} images could be decoded (first: {failures[0][1]})")
        feats, paths = feats[ok], [str(root / p) for p, good in zip(rel, ok) if good]
    probs = h.predict_proba(feats)
    pred = h.estimator.predict(feats)
    return Predictions(paths, [h.classes[int(i)] for i in pred], probs, list(h.classes), failures)
