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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__
from featx.backbones import EmbedderSpec
from featx.errors import CacheError

FORMAT_VERSION = 2  # 2: the embedder is one EmbedderSpec (attribute 'embedder'); 1 was featx 0.1.0
CACHE_ENV = "FEATX_CACHE_DIR"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``--cache-dir``, else ``$FEATX_CACHE_DIR``, else ``./cache``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "cache").expanduser()


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines a cache's content: which rows (the split's content fingerprint) and which
    embedder (:class:`~featx.backbones.EmbedderSpec`). Its hash is the cache key, computed without building
    the model; the embedder's resolved preprocessing is stored in the file."""

    dataset_fingerprint: str
    split: str
    embedder: EmbedderSpec
    format_version: int = FORMAT_VERSION

    def identity(self) -> dict[str, Any]:
        return {
            "dataset_fingerprint": self.dataset_fingerprint,
            "split": self.split,
            "embedder": self.embedder.identity(),
            "format_version": self.format_version,
        }

    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_")[:40] or "x"


def cache_filename(dataset_name: str, spec: CacheSpec) -> str:
    emb = spec.embedder
    return f"{_slug(dataset_name)}-{spec.split}-{_slug(emb.backbone)}-{_slug(emb.layer)}-{spec.key()}.h5"


def find_cache(cache_dir: Path, spec: CacheSpec) -> Path | None:
    """The complete cache for ``spec``, if any (``.partial`` files never match). The file is found by its key
    and must also hold that key and the same embedder and rows: a renamed or edited file is refused."""
    if not cache_dir.is_dir():
        return None
    key = spec.key()
    hits = sorted(cache_dir.glob(f"*-{key}.h5"))
    if not hits:
        return None
    check_cache_spec(hits[0], read_cache_attrs(hits[0]), spec)
    return hits[0]


def check_cache_spec(path: Path, attrs: dict[str, Any], spec: CacheSpec) -> None:
    """Refuse a cache whose stored key or spec is not the requested one."""
    stored = {
        "key": attrs.get("key"),
        "dataset_fingerprint": attrs.get("dataset_fingerprint"),
        "split": attrs.get("split"),
        "embedder": EmbedderSpec.from_dict(attrs["embedder"]).identity() if "embedder" in attrs else None,
    }
    wanted = {
        "key": spec.key(),
        "dataset_fingerprint": spec.dataset_fingerprint,
        "split": spec.split,
        "embedder": spec.embedder.identity(),
    }
    diff = [k for k in wanted if stored[k] != wanted[k]]
    if diff:
        raise CacheError(
            f"cache {path} does not hold what its name says (stored {', '.join(diff)} differ): "
            "delete it (featx cache rm) and run featx extract again"
        )


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
    def embedder(self) -> EmbedderSpec:
        """The embedder that made these features (what a head trained on them expects)."""
        return EmbedderSpec.from_dict(self.attrs["embedder"])

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


def _read_attrs(f: Any) -> dict[str, Any]:
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    for k in ("embedder", "spec"):
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


class CacheReader:
    """Lazy access to a complete cache: attributes and the small per-row tables are read at open, features
    only when asked, in row chunks (the file is chunked by rows), so a cache larger than memory can be
    streamed. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import h5py

        self.path = Path(path)
        self.attrs = read_cache_attrs(self.path)
        try:
            self._file = h5py.File(self.path, "r")
            f = self._file
            self._features = f["features"]
            self.valid = f["valid"][:]
            self.labels = f["labels"][:]
            self.indices = f["indices"][:]
            self.classes = list(f["classes"].asstr()[:])
        except (OSError, KeyError) as exc:
            raise CacheError(f"cache {self.path} is damaged: {str(exc).splitlines()[0]}") from None
        self.n_rows, self.feature_dim = (int(n) for n in self._features.shape)
        if len(self.labels) != self.n_rows or len(self.valid) != self.n_rows:
            raise CacheError(f"cache {self.path} is damaged: {self.n_rows} feature rows but {len(self.labels)} labels")
        self.chunk_rows = int((self._features.chunks or (self.n_rows,))[0])

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def embedder(self) -> EmbedderSpec:
        return EmbedderSpec.from_dict(self.attrs["embedder"])

    def paths(self) -> list[str]:
        return [str(p) for p in self._file["paths"].asstr()[:]]

    def iter_chunks(
        self, rows: np.ndarray | None = None, *, chunk_rows: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(rows, features float32, labels)`` for the valid rows among ``rows`` (default: all), in file
        order, reading at most ``chunk_rows`` file rows at a time (default: the file's own chunk)."""
        step = max(1, chunk_rows or self.chunk_rows)
        wanted = np.flatnonzero(self.valid) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        if rows is not None:
            wanted = wanted[self.valid[wanted]]
        for start in range(0, self.n_rows, step):
            sel = wanted[(wanted >= start) & (wanted < start + step)]
            if len(sel) == 0:
                continue
            try:
                block = self._features[start : min(start + step, self.n_rows)]
            except OSError as exc:
                raise CacheError(f"cache {self.path} is damaged: {str(exc).splitlines()[0]}") from None
            yield sel, np.asarray(block[sel - start], dtype=np.float32), self.labels[sel]

    def load(self) -> FeatureSet:
        """Every valid row in memory."""
        parts = list(self.iter_chunks())
        rows = np.concatenate([r for r, _, _ in parts]) if parts else np.empty(0, np.int64)
        features = np.concatenate([x for _, x, _ in parts]) if parts else np.empty((0, self.feature_dim), np.float32)
        paths = self.paths()
        return FeatureSet(
            features,
            self.labels[rows],
            [paths[i] for i in rows],
            self.indices[rows],
            self.classes,
            self.attrs,
            self.path,
            split_labels=self.labels,
        )


def load_cache(path: str | os.PathLike[str]) -> FeatureSet:
    """Open a cache file as in-memory arrays (valid rows only)."""
    with CacheReader(path) as reader:
        return reader.load()


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
