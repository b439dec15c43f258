"""HDF5 feature caches: keyed by content, written atomically, addressed by dataset index.

One file per (dataset split, backbone, weights, layer, preprocessing, precision). Layout::

    /features   float32|float16 (N, D), chunked by rows; row i is dataset index indices[i]
    /labels     int64 (N)            label into /classes (-1 when unlabelled)
    /paths      str (N)              relative to the dataset root
    /indices    int64 (N)            position in the dataset split (shards are merged by it)
    /valid      bool (N)             False for images that could not be decoded (row is zeros)
    /classes    str (C)
    /failures/index, /failures/reason   one row per image that could not be decoded
    attrs: complete, format_version, key, spec (JSON), featx_version, backbone, weights, weights_id,
           weights_sha256, layer, preprocessing (JSON), precision, dataset_name, dataset_fingerprint,
           split, created_at, extraction_seconds, n_images, n_failed, device, feature_dim, ...

A file is written as ``<name>.partial`` and renamed to ``<name>.h5`` only after ``complete`` is set,
so a reader never sees a half-written cache under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__
from featx.errors import CacheError

FORMAT_VERSION = 1
CACHE_ENV = "FEATX_CACHE_DIR"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``--cache-dir``, else ``$FEATX_CACHE_DIR``, else ``./cache``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "cache").expanduser()


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines a cache's content; its hash is the cache key.

    Preprocessing is a function of (backbone, weights, image_size, timm/torchvision versions), all of
    which are here, so the key can be computed without building the model; the resolved
    preprocessing itself is stored in the file's attributes.
    """

    dataset_fingerprint: str
    split: str
    backbone: str
    weights_id: str
    layer: str
    image_size: int | None
    precision: str
    libraries: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_")[:40] or "x"


def cache_filename(dataset_name: str, spec: CacheSpec) -> str:
    return f"{_slug(dataset_name)}-{spec.split}-{_slug(spec.backbone)}-{_slug(spec.layer)}-{spec.key()}.h5"


def find_cache(cache_dir: Path, key: str) -> Path | None:
    """The complete cache file with this key, if any (``.partial`` files never match)."""
    if not cache_dir.is_dir():
        return None
    hits = sorted(cache_dir.glob(f"*-{key}.h5"))
    return hits[0] if hits else None


class CacheWriter:
    """Writes one cache: rows addressed by dataset position, then metadata, then the atomic rename.

    Use as a context manager; leaving it with an exception deletes the partial file.
    """

    def __init__(self, final_path: Path, *, n_rows: int, attrs: dict[str, Any]) -> None:
        self.final_path = Path(final_path)
        self.partial_path = self.final_path.with_suffix(".partial")
        self.n_rows = n_rows
        self.attrs = attrs
        self._file: Any = None
        self._features: Any = None
        self._valid = np.zeros(n_rows, dtype=bool)
        self._failures: list[tuple[int, str]] = []

    def __enter__(self) -> CacheWriter:
        import h5py

        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = h5py.File(self.partial_path, "w")
        except OSError as exc:
            raise CacheError(f"cannot write cache in {self.final_path.parent}: {exc}") from None
        return self

    @property
    def failures(self) -> list[tuple[int, str]]:
        """(dataset position, reason) for every image that could not be decoded so far."""
        return list(self._failures)

    def write(self, positions: np.ndarray, features: np.ndarray, errors: list[str] | None = None) -> None:
        """Store features for dataset positions ``positions`` (a batch; increasing order)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._features is None:
            dim = features.shape[1]
            rows = max(1, min(self.n_rows, (1 << 20) // max(1, dim * features.dtype.itemsize)))  # ~1 MiB chunks
            self._features = self._file.create_dataset(
                "features", shape=(self.n_rows, dim), dtype=features.dtype, chunks=(rows, dim), fillvalue=0
            )
        ok = np.ones(len(positions), dtype=bool)
        for j, err in enumerate(errors or []):
            if err:
                ok[j] = False
                self._failures.append((int(positions[j]), err))
        feats = np.where(ok[:, None], features, 0).astype(self._features.dtype, copy=False)
        if len(positions) and np.all(np.diff(positions) == 1):
            self._features[positions[0] : positions[-1] + 1] = feats
        else:
            for p, row in zip(positions, feats):
                self._features[p] = row
        self._valid[positions] = ok

    def finish(
        self, *, labels: np.ndarray, paths: list[str], indices: np.ndarray, classes: list[str], attrs: dict[str, Any]
    ) -> Path:
        """Write the per-row tables and attributes, mark complete, flush and rename into place."""
        import h5py

        f = self._file
        if self._features is None:
            raise CacheError("no features were written")
        str_dt = h5py.string_dtype()
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=str_dt)
        f.create_dataset("indices", data=np.asarray(indices, dtype=np.int64))
        f.create_dataset("valid", data=self._valid)
        f.create_dataset("classes", data=np.asarray(classes, dtype=object), dtype=str_dt)
        g = f.create_group("failures")
        g.create_dataset("index", data=np.asarray([i for i, _ in self._failures], dtype=np.int64))
        g.create_dataset("reason", data=np.asarray([r for _, r in self._failures], dtype=object), dtype=str_dt)
        for k, v in {**self.attrs, **attrs}.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
        f.attrs["n_failed"] = len(self._failures)
        f.attrs["complete"] = True  # last: a file without it is never read as a cache
        f.flush()
        f.close()
        self._file = None
        os.replace(self.partial_path, self.final_path)
        return self.final_path

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
        if exc_type is not None:
            self.partial_path.unlink(missing_ok=True)


@dataclass
class FeatureSet:
    """A cache read into memory: only rows whose image decoded (``valid``)."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    indices: np.ndarray
    classes: list[str]
    attrs: dict[str, Any]
    path: Path
    split_labels: np.ndarray | None = None  # labels of every row of the split, decoded or not

    @property
    def embedder(self) -> dict[str, Any]:
        """What must match between a head and the features it is applied to."""
        return embedder_signature(self.attrs)

    def subset(self, rows: np.ndarray) -> FeatureSet:
        rows = np.asarray(rows, dtype=np.int64)
        return FeatureSet(
            self.features[rows],
            self.labels[rows],
            [self.paths[i] for i in rows],
            self.indices[rows],
            self.classes,
            self.attrs,
            self.path,
            self.split_labels,
        )


def embedder_signature(attrs: dict[str, Any]) -> dict[str, Any]:
    prep = attrs["preprocessing"]
    return {
        "backbone": attrs["backbone"],
        "weights_id": attrs["weights_id"],
        "layer": attrs["layer"],
        "preprocessing": json.loads(prep) if isinstance(prep, str) else prep,
        "precision": attrs["precision"],
    }


def embedder_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The fields in which two embedder signatures differ (empty when features are interchangeable)."""
    return [k for k in a if a[k] != b.get(k)]


def _read_attrs(f: Any) -> dict[str, Any]:
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    for k in ("preprocessing", "spec", "libraries"):
        if isinstance(out.get(k), str):
            out[k] = json.loads(out[k])
    return out


def read_cache_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Attributes of a complete cache file; incomplete or unreadable files raise :class:`CacheError`."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise CacheError(f"cache not found: {p}")
    try:
        with h5py.File(p, "r") as f:
            attrs = _read_attrs(f)
    except OSError as exc:
        raise CacheError(f"cannot read cache {p}: {str(exc).splitlines()[0]}") from None
    if not attrs.get("complete"):
        raise CacheError(f"cache {p} is incomplete (interrupted write?); delete it or re-run featx extract --force")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"cache {p} has format {attrs.get('format_version')}, this featx reads {FORMAT_VERSION}")
    return attrs


def load_cache(path: str | os.PathLike[str]) -> FeatureSet:
    """Open a cache file as in-memory arrays (valid rows only)."""
    import h5py

    attrs = read_cache_attrs(path)
    try:
        with h5py.File(path, "r") as f:
            valid = f["valid"][:]
            features = f["features"][:]
            labels = f["labels"][:]
            paths = f["paths"].asstr()[:]
            indices = f["indices"][:]
            classes = list(f["classes"].asstr()[:])
    except (OSError, KeyError) as exc:
        raise CacheError(f"cache {path} is damaged: {str(exc).splitlines()[0]}") from None
    if features.shape[0] != len(labels):
        raise CacheError(f"cache {path} is damaged: {features.shape[0]} feature rows but {len(labels)} labels")
    rows = np.flatnonzero(valid)
    return FeatureSet(
        features[rows],
        labels[rows],
        [str(paths[i]) for i in rows],
        indices[rows],
        classes,
        attrs,
        Path(path),
        split_labels=labels,
    )


def list_caches(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One summary per cache file (complete or not) in the cache folder, newest first."""
    d = resolve_cache_dir(cache_dir)
    rows = []
    for p in sorted(d.glob("*.h5")) + sorted(d.glob("*.partial")):
        row: dict[str, Any] = {"path": str(p), "file": p.name, "size_mb": p.stat().st_size / 2**20}
        try:
            a = read_cache_attrs(p)
            row.update(
                key=a["key"],
                dataset=a.get("dataset_name"),
                split=a.get("split"),
                backbone=a.get("backbone"),
                layer=a.get("layer"),
                shape=[int(a.get("n_images", 0)), int(a.get("feature_dim", 0))],
                created=a.get("created_at"),
                status="complete",
            )
        except CacheError as exc:
            row.update(key=p.stem.rsplit("-", 1)[-1], status=f"unusable: {exc}")
        rows.append(row)
    rows.sort(key=lambda r: r.get("created") or "", reverse=True)
    return rows


def resolve_cache_path(ref: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A cache given as a file path, a key, or a unique key prefix."""
    p = Path(ref).expanduser()
    if p.suffix == ".h5" or os.sep in ref:
        if not p.is_file():
            raise CacheError(f"cache not found: {p}")
        return p
    d = resolve_cache_dir(cache_dir)
    hits = sorted(d.glob(f"*-{ref}*.h5")) if d.is_dir() else []
    if not hits:
        raise CacheError(f"no cache with key '{ref}' in {d} (see: featx cache ls)")
    if len(hits) > 1:
        raise CacheError(f"key prefix '{ref}' matches {len(hits)} caches in {d}; give more characters")
    return hits[0]


def remove_caches(refs: list[str], cache_dir: str | os.PathLike[str] | None = None, *, all_: bool = False) -> list[Path]:
    d = resolve_cache_dir(cache_dir)
    if all_:
        targets = sorted(d.glob("*.h5")) + sorted(d.glob("*.partial")) if d.is_dir() else []
    else:
        targets = [resolve_cache_path(r, d) for r in refs]
    for p in targets:
        p.unlink(missing_ok=True)
        Path(str(p) + ".lock").unlink(missing_ok=True)
    return targets


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def base_attrs() -> dict[str, Any]:
    return {"featx_version": __version__, "format_version": FORMAT_VERSION, "created_at": now_iso()}
