"""HDF5 feature caches: keyed by content, built from a crash-safe journal, checked on every read.

One file per (dataset split, backbone, weights, layer, preprocessing, precision). Layout::

    /features   float32|float16 (N, D), chunked by rows, fletcher32; row i is dataset index indices[i]
    /labels     int64 (N), fletcher32   label into /classes (-1 when unlabelled)
    /paths      str (N)                 relative to the dataset root (UTF-8-safe, see data.printable_path)
    /indices    int64 (N), fletcher32   position in the dataset split (shards are merged by it)
    /valid      bool (N), fletcher32    False for images that could not be decoded (row is zeros)
    /features_crc32  uint32 (N)         zlib.crc32 of each stored feature row (see Damage)
    /classes    str (C)
    /failures/index, /failures/reason   one row per image that could not be decoded
    attrs: complete, format_version, key, embedder (JSON), featx_version, backbone, layer, dataset_name,
           dataset_fingerprint, split, created_at, extraction_seconds, n_images, n_failed, device, batch_size,
           chunk_rows, feature_dim, resumed_at, ..., arrays_sha256, attrs_sha256 and tables_sha256 (digests, see below)

**Journal.** Extraction never writes the HDF5 file directly. It writes ``<name>.partial/``: ``journal.json``
(what is being computed, with every setting that changes the numbers) and one ``chunk-NNNNNNNNN-<sha>.npz``
per finished block of rows (features, valid mask, failure reasons), each written to a temporary name,
fsync'd and renamed, its sha256 in its name. A killed run loses at most the chunks in flight; the next run
checks the journal and every chunk and computes only what is missing. When every chunk is there the cache
is assembled into ``<name>.h5.tmp``, fsync'd and renamed to ``<name>.h5``; then the journal is removed.

**Damage.** The numeric datasets carry HDF5's fletcher32 checksum per chunk; ``attrs_sha256`` covers every
attribute and ``tables_sha256`` the string tables (paths, classes, failures). Fletcher32 cannot tell a 16-bit
word 0x0000 from 0xFFFF, and zeros are common here (ReLU features, the rows of failed images, small labels), so
each feature row also has its crc32 in ``/features_crc32``, checked on every read, and ``arrays_sha256`` covers
labels, indices, valid and those crcs (files written before these existed are read with fletcher32 alone).
Readers turn any mismatch, truncation or unreadable structure into a one-line :class:`CacheError` naming the
file and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__
from featx.backbones import EmbedderSpec
from featx.errors import CacheError

FORMAT_VERSION = 3  # 3: fletcher32 + digests, built from a journal; 2: one EmbedderSpec; 1: featx 0.1.0
JOURNAL_FORMAT = "featx-journal-1"
CACHE_ENV = "FEATX_CACHE_DIR"
LOCK_DIR = ".locks"
_DIGEST_ATTRS = ("attrs_sha256", "tables_sha256")
_CHUNK_RE = re.compile(r"^chunk-(\d{9})-([0-9a-f]{16})\.npz$")
_KEY_RE = re.compile(r"^[0-9a-f]{20}$")


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


def journal_dir(final: Path) -> Path:
    """``<name>.partial``: the journal of the extraction that will produce ``final``."""
    return final.with_suffix(".partial")


def tmp_path(final: Path) -> Path:
    """``<name>.h5.tmp``: where a cache is assembled before the atomic rename."""
    return final.with_name(final.name + ".tmp")


def lock_path(final: Path) -> Path:
    """One lock file per key, out of sight in ``<cache_dir>/.locks/``."""
    return final.parent / LOCK_DIR / (final.stem + ".lock")


def _key_of(path: Path) -> str:
    name = path.name
    for suffix in (".tmp", ".h5", ".partial", ".lock"):
        name = name.removesuffix(suffix)
    key = name.rsplit("-", 1)[-1]
    return key if _KEY_RE.match(key) else str(path)


def fix_hint(path: Path) -> str:
    return f"delete it with `featx cache rm {_key_of(path)}` and extract again"


def _damaged(path: Path, what: str) -> CacheError:
    return CacheError(f"cache {path} is damaged ({what}): {fix_hint(path)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc))


def write_error(exc: BaseException, target: Path, resume_hint: str = "") -> CacheError:
    """A one-line CacheError for a failed write (no space, permissions, ...)."""
    if is_no_space(exc):
        return CacheError(f"no space left on device writing {target}{resume_hint}")
    reason = getattr(exc, "strerror", None) or _first_line(exc)
    return CacheError(f"cannot write {target}: {reason}{resume_hint}")


def find_cache(cache_dir: Path, spec: CacheSpec) -> Path | None:
    """The complete cache for ``spec``, if any (journals and temporary files never match). The file is found
    by its key and must also hold that key and the same embedder and rows: a renamed or edited file is refused."""
    if not cache_dir.is_dir():
        return None
    key = spec.key()
    hits = sorted(cache_dir.glob(f"*-{key}.h5"))
    if not hits:
        return None
    check_cache_spec(hits[0], read_cache_attrs(hits[0], check_digest=False), spec)  # the specific message first
    read_cache_attrs(hits[0])
    return hits[0]


def check_cache_spec(path: Path, attrs: dict[str, Any], spec: CacheSpec) -> None:
    """Refuse a cache whose stored key or spec is not the requested one."""
    try:
        embedder = EmbedderSpec.from_dict(attrs["embedder"]).identity() if "embedder" in attrs else None
    except Exception as exc:  # an edited or damaged attribute (the digest is checked after this)
        raise _damaged(path, f"embedder attribute unreadable: {_first_line(exc)}") from None
    stored = {
        "key": attrs.get("key"),
        "dataset_fingerprint": attrs.get("dataset_fingerprint"),
        "split": attrs.get("split"),
        "embedder": embedder,
    }
    wanted = {
        "key": spec.key(),
        "dataset_fingerprint": spec.dataset_fingerprint,
        "split": spec.split,
        "embedder": spec.embedder.identity(),
    }
    diff = [k for k in wanted if stored[k] != wanted[k]]
    if diff:
        raise CacheError(f"cache {path} does not hold what its name says (stored {', '.join(diff)} differ): {fix_hint(path)}")


# --------------------------------------------------------------------------------------------------
# Durable small writes


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_file_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path``: temporary name, fsync, rename, fsync of the folder. Raises OSError."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------------
# The journal


@dataclass(frozen=True)
class Chunk:
    """One finished block of rows ``[start, stop)`` as stored in a journal."""

    index: int
    start: int
    features: np.ndarray  # (rows, D); rows of failed images are zeros
    valid: np.ndarray  # bool (rows,)
    reasons: list[str]  # "" for rows that decoded
    seconds: float = 0.0


@dataclass
class JournalState:
    """What a journal holds after :meth:`CacheJournal.verify` (updated as new chunks are written)."""

    chunks: dict[int, Path] = field(default_factory=dict)  # chunk index -> file
    failures: dict[int, str] = field(default_factory=dict)  # row -> reason, for rows in those chunks
    seconds: float = 0.0  # compute time recorded in the chunks
    dim: int | None = None
    problems: list[str] = field(default_factory=list)


class CacheJournal:
    """The durable record of one extraction in progress, in ``<name>.partial/``.

    ``journal.json`` holds the header (key, spec, embedder, rows, chunk size, batch size and every setting
    that changes the numbers); each chunk file holds ``chunk_rows`` consecutive rows. Chunk ``i`` covers rows
    ``[i * chunk_rows, min((i + 1) * chunk_rows, n_rows))``; chunk boundaries are multiples of the batch size,
    so a resumed run batches its rows exactly as an uninterrupted one.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.dir = journal_dir(self.final)
        self.header: dict[str, Any] = {}

    @property
    def n_rows(self) -> int:
        return int(self.header["n_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.header["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def chunk_range(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def exists(self) -> bool:
        return self.dir.exists()

    def discard(self) -> None:
        if self.dir.is_dir() and not self.dir.is_symlink():
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.dir.exists() or self.dir.is_symlink():
            self.dir.unlink(missing_ok=True)  # an old featx's .partial file
        fsync_dir(self.final.parent)

    def create(self, header: dict[str, Any]) -> None:
        """Start a fresh journal (an existing one is discarded). Raises CacheError when it cannot be written."""
        self.discard()
        self.header = {"format": JOURNAL_FORMAT, **header}
        try:
            self.dir.mkdir(parents=True)
            write_file_atomic(self.dir / "journal.json", json.dumps(self.header, indent=1, sort_keys=True).encode())
        except OSError as exc:
            raise write_error(exc, self.dir / "journal.json") from None

    def read_header(self) -> dict[str, Any]:
        """The stored header; raises ValueError (with a reason) when it is missing or not a journal."""
        p = self.dir / "journal.json"
        if not self.dir.is_dir():
            raise ValueError("not a journal folder")
        try:
            header = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError("journal.json is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"journal.json is unreadable ({_first_line(exc)})") from None
        if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
            raise ValueError("journal.json is not a featx journal")
        for k in ("key", "n_rows", "chunk_rows", "batch_size"):
            if k not in header:
                raise ValueError(f"journal.json has no '{k}'")
        try:
            n, c, b = int(header["n_rows"]), int(header["chunk_rows"]), int(header["batch_size"])
        except (TypeError, ValueError):
            raise ValueError("journal.json has non-integer sizes") from None
        if n < 1 or b < 1 or c < 1 or c % b:
            raise ValueError("journal.json has inconsistent sizes")
        return header

    def open(self) -> None:
        self.header = self.read_header()

    def chunk_files(self) -> dict[int, Path]:
        """Chunk index -> file, by name only (see :meth:`verify` for the content)."""
        out: dict[int, Path] = {}
        if not self.dir.is_dir():
            return out
        for p in self.dir.iterdir():
            m = _CHUNK_RE.match(p.name)
            if m:
                out.setdefault(int(m.group(1)), p)
        return out

    def verify(self) -> JournalState:
        """Check every chunk (name, checksum, shapes); delete what is not whole. Leftover temporary files
        (a kill mid-write) are removed silently; every discarded chunk gets one line in ``problems``."""
        state = JournalState()
        for p in sorted(self.dir.iterdir()):
            if p.name == "journal.json":
                continue
            if not _CHUNK_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                continue
            try:
                chunk = self.read_chunk(p)
                if state.dim is not None and chunk.features.shape[1] != state.dim:
                    raise ValueError(f"{chunk.features.shape[1]} features, other chunks have {state.dim}")
                if chunk.index in state.chunks:
                    raise ValueError("duplicate chunk")
            except ValueError as exc:
                state.problems.append(f"{p.name}: {exc}")
                p.unlink(missing_ok=True)
                continue
            state.dim = chunk.features.shape[1]
            state.chunks[chunk.index] = p
            state.seconds += chunk.seconds
            state.failures.update({chunk.start + j: r for j, r in enumerate(chunk.reasons) if r and not chunk.valid[j]})
        return state

    def read_chunk(self, path: Path, index: int | None = None) -> Chunk:
        """A chunk file, checked: its sha256 prefix (in its name), its arrays and their shapes. ValueError if not."""
        m = _CHUNK_RE.match(path.name)
        if not m:
            raise ValueError("not a chunk file name")
        i = int(m.group(1))
        if index is not None and i != index:
            raise ValueError(f"chunk {i} where {index} was expected")
        if i >= self.n_chunks:
            raise ValueError(f"chunk {i} beyond the {self.n_chunks} chunks of the journal")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"unreadable ({_first_line(exc)})") from None
        if hashlib.sha256(data).hexdigest()[:16] != m.group(2):
            raise ValueError("checksum mismatch (truncated or damaged)")
        start, stop = self.chunk_range(i)
        rows = stop - start
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                feats, valid, reasons_raw = z["features"], z["valid"], z["reasons"]
                seconds = float(z["seconds"]) if "seconds" in z.files else 0.0
                stored_start = int(z["start"])
            reasons = json.loads(bytes(reasons_raw).decode("ascii"))
        except Exception as exc:  # any parse error means: not a whole chunk
            raise ValueError(f"unreadable ({_first_line(exc)})") from None
        if stored_start != start or feats.ndim != 2 or feats.shape[0] != rows or valid.shape != (rows,):
            raise ValueError(f"wrong shape for rows {start}-{stop}")
        if valid.dtype != np.bool_ or not isinstance(reasons, list) or len(reasons) != rows:
            raise ValueError("wrong valid mask or failure list")
        return Chunk(i, start, feats, valid, [str(r) for r in reasons], seconds)

    def write_chunk(self, chunk: Chunk) -> Path:
        """Store one chunk durably: temporary name, fsync, rename (sha256 prefix in the final name), fsync dir."""
        buf = io.BytesIO()
        reasons = np.frombuffer(json.dumps(chunk.reasons, ensure_ascii=True).encode("ascii"), dtype=np.uint8)
        np.savez(
            buf,
            start=np.int64(chunk.start),
            features=np.ascontiguousarray(chunk.features),
            valid=np.asarray(chunk.valid, dtype=bool),
            reasons=reasons,
            seconds=np.float64(chunk.seconds),
        )
        data = buf.getvalue()
        path = self.dir / f"chunk-{chunk.index:09d}-{hashlib.sha256(data).hexdigest()[:16]}.npz"
        write_file_atomic(path, data)
        return path

    def done_rows(self, chunks: Iterable[int]) -> int:
        return sum(self.chunk_range(i)[1] - self.chunk_range(i)[0] for i in chunks)


# --------------------------------------------------------------------------------------------------
# Writing the HDF5 file


class _GuardedFile(io.RawIOBase):
    """A file object for h5py's ``fileobj`` driver that never reports a failed write to HDF5.

    HDF5 cannot recover from a failed write (ENOSPC): closing the file then fails and the interpreter may
    crash at exit. This object records the first error, pretends the write succeeded, and the caller raises
    a clean :class:`CacheError` after closing and deletes the file.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def readinto(self, b: Any) -> int:
        return os.readv(self.fd, [b])

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self.error is None:
            try:
                _write_all(self.fd, view)
                return len(view)
            except OSError as exc:
                self.error = exc
        os.lseek(self.fd, len(view), os.SEEK_CUR)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        if self.error is None:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def _norm(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _attrs_digest(raw: dict[str, Any]) -> str:
    body = {k: _norm(v) for k, v in raw.items() if k not in _DIGEST_ATTRS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _arrays_digest(*arrays: np.ndarray) -> str:
    """sha256 of small numeric datasets (labels, indices, valid, features_crc32): dtype, shape and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"\x1d{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _row_crcs(rows: np.ndarray) -> np.ndarray:
    """zlib.crc32 of each row's bytes, as stored."""
    rows = np.ascontiguousarray(rows)
    return np.fromiter((zlib.crc32(r) for r in rows), dtype=np.uint32, count=len(rows))


def _tables_digest(paths: Iterable[str], classes: Iterable[str], fail_index: Iterable[int], fail_reason: Iterable[str]) -> str:
    h = hashlib.sha256()
    for name, items in (("paths", paths), ("classes", classes), ("fail_index", fail_index), ("fail_reason", fail_reason)):
        h.update(f"\x1d{name}".encode())
        for s in items:
            h.update(b"\x1e" + str(s).encode("utf-8", "backslashreplace"))
    return h.hexdigest()


Block = tuple[int, np.ndarray, np.ndarray, list[str]]  # (start row, features, valid, reasons)


def write_cache_file(
    final: Path,
    *,
    n_rows: int,
    blocks: Iterable[Block],
    labels: np.ndarray,
    paths: list[str],
    classes: list[str],
    attrs: dict[str, Any],
    dtype: Any = np.float32,
    resume_hint: str = "",
) -> Path:
    """Write a complete cache from row blocks (in order) to ``<name>.h5.tmp``, fsync it and rename it to
    ``final`` (replacing an older cache only now). Returns ``final``; on any failure nothing changes at
    ``final`` and the temporary file is removed. A full disk is a one-line CacheError, never a crash."""
    import h5py

    tmp = tmp_path(final)
    try:
        guard = _GuardedFile(tmp)
    except OSError as exc:
        raise write_error(exc, tmp, resume_hint) from None
    failures: list[tuple[int, str]] = []
    ok = False
    try:
        valid = np.zeros(n_rows, dtype=bool)
        crcs = np.zeros(n_rows, dtype=np.uint32)
        with h5py.File(guard, "w") as f:
            feats_ds = None
            filled = 0
            for start, feats, ok_rows, reasons in blocks:
                if feats_ds is None:
                    dim = int(feats.shape[1])
                    rows = max(1, min(n_rows, (1 << 20) // max(1, dim * np.dtype(dtype).itemsize)))  # ~1 MiB chunks
                    feats_ds = f.create_dataset(
                        "features", (n_rows, dim), dtype=dtype, chunks=(rows, dim), fletcher32=True, fillvalue=0
                    )
                if start != filled:
                    raise CacheError(f"internal: block at row {start}, expected {filled}")
                stop = start + len(feats)
                stored = np.ascontiguousarray(np.where(ok_rows[:, None], feats, 0).astype(dtype, copy=False))
                feats_ds[start:stop] = stored
                crcs[start:stop] = _row_crcs(stored)
                valid[start:stop] = ok_rows
                failures += [(start + j, r) for j, r in enumerate(reasons) if r and not ok_rows[j]]
                filled = stop
                if guard.error is not None:
                    break
            if guard.error is None:
                if feats_ds is None or filled != n_rows:
                    raise CacheError(f"internal: {filled} of {n_rows} rows to write")
                str_dt = h5py.string_dtype()
                n_chunk = (min(n_rows, 1 << 16),)
                labels_arr, indices = np.asarray(labels, dtype=np.int64), np.arange(n_rows, dtype=np.int64)
                f.create_dataset("labels", data=labels_arr, chunks=n_chunk, fletcher32=True)
                f.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=str_dt)
                f.create_dataset("indices", data=indices, chunks=n_chunk, fletcher32=True)
                f.create_dataset("valid", data=valid, chunks=n_chunk, fletcher32=True)
                f.create_dataset("features_crc32", data=crcs, chunks=n_chunk, fletcher32=True)
                f.create_dataset("classes", data=np.asarray(classes, dtype=object), dtype=str_dt)
                g = f.create_group("failures")
                fail_index = np.asarray([i for i, _ in failures], dtype=np.int64)
                g.create_dataset("index", data=fail_index, **({"chunks": True, "fletcher32": True} if failures else {}))
                g.create_dataset("reason", data=np.asarray([r for _, r in failures], dtype=object), dtype=str_dt)
                all_attrs = {
                    **attrs,
                    "n_failed": len(failures),
                    "complete": True,
                    "arrays_sha256": _arrays_digest(labels_arr, indices, valid, crcs),
                }
                for k, v in all_attrs.items():
                    f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
                f.attrs["tables_sha256"] = _tables_digest(paths, classes, fail_index.tolist(), [r for _, r in failures])
                f.attrs["attrs_sha256"] = _attrs_digest(dict(f.attrs.items()))
        guard.sync()
        if guard.error is not None:
            raise guard.error
        ok = True
    except OSError as exc:
        raise write_error(exc, tmp, resume_hint) from None
    finally:
        guard.close()
        if not ok:
            tmp.unlink(missing_ok=True)
    try:
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(exc, final) from None
    fsync_dir(final.parent)
    return final


# --------------------------------------------------------------------------------------------------
# Reading


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


def _read_attrs(f: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(decoded attributes, raw attributes as stored)."""
    raw = dict(f.attrs.items())
    out = {k: _norm(v) for k, v in raw.items()}
    for k in ("embedder", "spec"):
        if isinstance(out.get(k), str):
            out[k] = json.loads(out[k])
    return out, raw


def _open_h5(p: Path) -> Any:
    import h5py

    try:
        return h5py.File(p, "r")
    except OSError as exc:
        text = str(exc)
        if "truncated" in text:
            raise _damaged(p, "truncated") from None
        if "signature" in text or "superblock" in text:
            raise _damaged(p, "not an HDF5 file") from None
        raise CacheError(f"cannot read cache {p}: {_first_line(exc)}") from None


def _checked_attrs(p: Path, f: Any, check_digest: bool = True) -> dict[str, Any]:
    try:
        attrs, raw = _read_attrs(f)
    except Exception as exc:  # a damaged attribute heap raises anything
        raise _damaged(p, f"attributes unreadable: {_first_line(exc)}") from None
    if not attrs.get("complete"):
        raise CacheError(f"cache {p} is incomplete (copied mid-write?): {fix_hint(p)}")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"cache {p} has format {attrs.get('format_version')}, this featx reads {FORMAT_VERSION}: {fix_hint(p)}")
    if check_digest and attrs.get("attrs_sha256") != _attrs_digest(raw):
        raise _damaged(p, "attributes do not match their digest")
    return attrs


def read_cache_attrs(path: str | os.PathLike[str], *, check_digest: bool = True) -> dict[str, Any]:
    """Attributes of a complete cache file, checked against their digest; incomplete, damaged or unreadable
    files raise :class:`CacheError`."""
    p = Path(path)
    if not p.is_file():
        raise CacheError(f"cache not found: {p}")
    f = _open_h5(p)
    try:
        return _checked_attrs(p, f, check_digest)
    finally:
        f.close()


def read_failures(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(dataset position, reason) of every image that could not be decoded, from a complete cache."""
    p = Path(path)
    f = _open_h5(p)
    try:
        index = f["failures/index"][:]
        reason = f["failures/reason"].asstr()[:]
    except Exception as exc:
        raise _damaged(p, f"failures table unreadable: {_first_line(exc)}") from None
    finally:
        f.close()
    return [(int(i), str(r)) for i, r in zip(index, reason)]


class CacheReader:
    """Lazy access to a complete cache: attributes and the small per-row tables are read (and checked) at
    open, features only when asked, in row chunks (the file is chunked by rows), so a cache larger than
    memory can be streamed. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"cache not found: {self.path}")
        self._file = _open_h5(self.path)
        try:
            self.attrs = _checked_attrs(self.path, self._file)
            self._open_tables()
        except BaseException:
            self._file.close()
            raise

    def _open_tables(self) -> None:
        p, f = self.path, self._file
        try:
            self._features = f["features"]
            self.valid = f["valid"][:]
            self.labels = f["labels"][:]
            self.indices = f["indices"][:]
            self.classes = [str(c) for c in f["classes"].asstr()[:]]
            self._paths = [str(s) for s in f["paths"].asstr()[:]]
            fail_index = f["failures/index"][:]
            fail_reason = [str(r) for r in f["failures/reason"].asstr()[:]]
            self.n_rows, self.feature_dim = (int(n) for n in self._features.shape)
            chunks = self._features.chunks
            self._row_crc = f["features_crc32"][:] if "features_crc32" in f else None
        except Exception as exc:  # checksum errors are OSError; broken structure raises anything
            raise _damaged(p, _first_line(exc)) from None
        if any(len(a) != self.n_rows for a in (self.labels, self.valid, self.indices, self._paths)):
            raise _damaged(p, f"{self.n_rows} feature rows but {len(self.labels)} labels")
        if self._row_crc is not None and len(self._row_crc) != self.n_rows:
            raise _damaged(p, f"{self.n_rows} feature rows but {len(self._row_crc)} row checksums")
        if "arrays_sha256" in self.attrs:  # featx writes both or neither
            if self._row_crc is None:
                raise _damaged(p, "features_crc32 is missing")
            if _arrays_digest(self.labels, self.indices, self.valid, self._row_crc) != self.attrs["arrays_sha256"]:
                raise _damaged(p, "labels, indices or valid mask do not match their digest")
        if _tables_digest(self._paths, self.classes, fail_index.tolist(), fail_reason) != self.attrs.get("tables_sha256"):
            raise _damaged(p, "paths, classes or failures do not match their digest")
        self.chunk_rows = int((chunks or (self.n_rows,))[0])

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
        return list(self._paths)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Feature rows ``[start, stop)`` as stored (fletcher32 checked by HDF5, each row's crc32 here)."""
        try:
            block = self._features[start:stop]
        except Exception as exc:
            what = "features fail their checksum" if "filter" in str(exc) else f"features unreadable: {_first_line(exc)}"
            raise _damaged(self.path, what) from None
        if self._row_crc is not None:
            bad = np.flatnonzero(_row_crcs(block) != self._row_crc[start : start + len(block)])
            if len(bad):
                raise _damaged(self.path, f"features fail their checksum (row {start + int(bad[0])})")
        return block

    def valid_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The rows among ``rows`` (default: all) that hold features, sorted: the rows and order of iter_chunks."""
        if rows is None:
            return np.flatnonzero(self.valid)
        wanted = np.sort(np.asarray(rows, dtype=np.int64))
        return wanted[self.valid[wanted]]

    def iter_chunks(
        self, rows: np.ndarray | None = None, *, chunk_rows: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(rows, features float32, labels)`` for the valid rows among ``rows`` (default: all), in file
        order, reading at most ``chunk_rows`` file rows at a time (default: the file's own chunk)."""
        step = max(1, chunk_rows or self.chunk_rows)
        wanted = self.valid_rows(rows)
        for start in range(0, self.n_rows, step):
            sel = wanted[(wanted >= start) & (wanted < start + step)]
            if len(sel) == 0:
                continue
            block = self.read_rows(start, min(start + step, self.n_rows))
            yield sel, np.asarray(block[sel - start], dtype=np.float32), self.labels[sel]

    def load(self) -> FeatureSet:
        """Every valid row in memory."""
        parts = list(self.iter_chunks())
        rows = np.concatenate([r for r, _, _ in parts]) if parts else np.empty(0, np.int64)
        features = np.concatenate([x for _, x, _ in parts]) if parts else np.empty((0, self.feature_dim), np.float32)
        return FeatureSet(
            features,
            self.labels[rows],
            [self._paths[i] for i in rows],
            self.indices[rows],
            self.classes,
            self.attrs,
            self.path,
            split_labels=self.labels,
        )

    def verify(self) -> str:
        """Read every feature row (checksums); return a one-line description. Raises CacheError when damaged."""
        step = max(self.chunk_rows, 1)
        for start in range(0, self.n_rows, step):
            self.read_rows(start, min(start + step, self.n_rows))
        return f"{self.n_rows}x{self.feature_dim}, {int((~self.valid).sum())} failed"


def load_cache(path: str | os.PathLike[str]) -> FeatureSet:
    """Open a cache file as in-memory arrays (valid rows only)."""
    with CacheReader(path) as reader:
        return reader.load()


def verify_caches(refs: list[str] | None = None, cache_dir: str | os.PathLike[str] | None = None) -> list[tuple[Path, bool, str]]:
    """Read every dataset of the given caches (default: all in the folder) in full, checking every checksum
    and digest. One ``(path, ok, message)`` per cache; never raises for a damaged file."""
    d = resolve_cache_dir(cache_dir)
    targets = [resolve_cache_path(r, d) for r in refs] if refs else (sorted(d.glob("*.h5")) if d.is_dir() else [])
    out = []
    for p in targets:
        try:
            with CacheReader(p) as reader:
                out.append((p, True, reader.verify()))
        except CacheError as exc:
            out.append((p, False, str(exc)))
    return out


def _journal_row(p: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"path": str(p), "file": p.name, "key": _key_of(p)}
    if not p.is_dir():
        row.update(size_mb=p.stat().st_size / 2**20, status="unusable: a partial file from an older featx")
        return row
    j = CacheJournal(p.with_suffix(".h5"))
    files = j.chunk_files()
    row["size_mb"] = sum(f.stat().st_size for f in files.values() if f.exists()) / 2**20
    try:
        j.open()
    except ValueError as exc:
        row["status"] = f"unusable journal: {exc}"
        return row
    done = j.done_rows(i for i in files if i < j.n_chunks)
    h = j.header
    row.update(
        key=h.get("key", row["key"]),
        dataset=h.get("dataset_name"),
        split=h.get("split"),
        backbone=(h.get("embedder") or {}).get("backbone"),
        layer=(h.get("embedder") or {}).get("layer"),
        shape=[j.n_rows, 0],
        created=h.get("created_at"),
        status=f"partial {done}/{j.n_rows}",
        done_rows=done,
    )
    return row


def list_caches(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One summary per cache file (complete, damaged or still a journal) in the cache folder, newest first."""
    d = resolve_cache_dir(cache_dir)
    if not d.is_dir():
        return []
    rows = []
    for p in sorted(d.glob("*.h5")):
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
            row.update(key=_key_of(p), status=f"unusable: {exc}")
        rows.append(row)
    rows += [_journal_row(p) for p in sorted(d.glob("*.partial"))]
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


def _remove_lock(final: Path) -> None:
    """Delete the key's lock file when nobody holds it (a waiting extraction keeps it)."""
    lp = lock_path(final)
    if not lp.exists():
        return
    try:
        import fcntl

        fd = os.open(lp, os.O_RDWR)
    except (ImportError, OSError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lp.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_caches(refs: list[str], cache_dir: str | os.PathLike[str] | None = None, *, all_: bool = False) -> list[Path]:
    """Remove caches (and their journals, temporary files and lock files) by file, key or key prefix."""
    d = resolve_cache_dir(cache_dir)
    targets: list[Path] = []
    if all_:
        if d.is_dir():
            targets = sorted(d.glob("*.h5")) + sorted(d.glob("*.partial")) + sorted(d.glob("*.h5.tmp"))
    else:
        for r in refs:
            p = Path(r).expanduser()
            if p.suffix in (".h5", ".partial") or os.sep in r:
                found = [p] if p.exists() else []
            else:
                found = sorted(d.glob(f"*-{r}*.h5")) + sorted(d.glob(f"*-{r}*.partial")) if d.is_dir() else []
            keys = {_key_of(f) for f in found}
            if not found:
                raise CacheError(f"no cache with key '{r}' in {d} (see: featx cache ls)")
            if len(keys) > 1:
                raise CacheError(f"key prefix '{r}' matches {len(keys)} caches in {d}; give more characters")
            targets += [f for f in found if f not in targets]
    for p in targets:
        final = p.with_suffix(".h5") if p.suffix == ".partial" else Path(str(p).removesuffix(".tmp"))
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if p.suffix == ".h5":
            tmp_path(p).unlink(missing_ok=True)
            if journal_dir(p).is_dir():
                shutil.rmtree(journal_dir(p), ignore_errors=True)
        _remove_lock(final)
    return targets


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def base_attrs() -> dict[str, Any]:
    return {"featx_version": __version__, "format_version": FORMAT_VERSION, "created_at": now_iso()}
