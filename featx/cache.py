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

**Ownership.** featx deletes, replaces or resumes over only what it can prove it wrote, never following a
symbolic link: a cache file named ``<...>-<key>.h5`` whose HDF5 attributes carry featx's markers and that key
(damaged data does not matter; a file that does not open as HDF5 is not provably featx's), a journal folder
whose ``journal.json`` featx wrote for that key and that holds only featx's own files, an ``.h5.tmp`` beside
such a cache or journal, and empty or pid-holding lock files in ``.locks/`` (:func:`cache_file_problem`,
:func:`journal_problem`). ``cache rm`` takes the key's lock without waiting, so a running extraction is never
pulled from under; everything else is left alone and named, with how to delete it by hand.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shlex
import stat
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__, failpoints
from featx.backbones import EmbedderSpec
from featx.data import RowSelection, keyed_file_problem, plain_file_problem
from featx.errors import CacheError
from featx.onnx_export import onnx_damage, onnx_file_problem, onnx_manifest

FORMAT_VERSION = 3  # 3: fletcher32 + digests, built from a journal; 2: one EmbedderSpec; 1: featx 0.1.0
JOURNAL_FORMAT = "featx-journal-1"
CACHE_ENV = "FEATX_CACHE_DIR"
LOCK_DIR = ".locks"
_DIGEST_ATTRS = ("attrs_sha256", "tables_sha256")
_CHUNK_RE = re.compile(r"^chunk-(\d{9})-([0-9a-f]{16})\.npz$")
_KEY_RE = re.compile(r"^[0-9a-f]{20}$")
#: What featx names in a cache folder: ``<stem>-<key>.h5`` (a cache), ``.partial`` (its journal), ``.h5.tmp`` (its assembly),
#: ``.onnx`` (an embedder's checked ONNX export, its own key: :mod:`featx.onnx_export`).
#: ``<stem>-<key>.shard-<i>-of-<n>.partial`` is the journal of one ``--shard i/n`` job (merged by :func:`merge_shards`).
_NAME_RE = re.compile(
    r"^(?P<stem>.+-(?P<key>[0-9a-f]{20}))(?:\.shard-(?P<si>\d{1,6})-of-(?P<sn>\d{1,6})(?=\.partial$))?"
    r"(?P<ext>\.h5|\.partial|\.h5\.tmp|\.onnx)$"
)
#: The temporary files of :func:`write_file_atomic` inside a journal (a kill mid-write leaves one).
_JOURNAL_TMP_RE = re.compile(r"^\.tmp-\d+-(journal\.json|chunk-\d{9}-[0-9a-f]{16}\.npz)$")
_LOCK_RE = re.compile(r"^.+-[0-9a-f]{20}\.lock$")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
log = logging.getLogger(__name__)


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


def cache_path(cache_dir: str | os.PathLike[str], dataset_name: str, spec: CacheSpec) -> Path:
    """Where the cache for ``spec`` lives: ``<cache_dir>/<dataset>-<split>-<backbone>-<layer>-<key>.h5``. The one
    place a key becomes a name: its journal, assembly file and lock are named from this path (:func:`journal_dir`,
    :func:`tmp_path`, :func:`lock_path`; back with :func:`final_path`), and a key or key prefix finds its entries
    again through :func:`key_entries`."""
    emb = spec.embedder
    return Path(cache_dir) / f"{_slug(dataset_name)}-{spec.split}-{_slug(emb.backbone)}-{_slug(emb.layer)}-{spec.key()}.h5"


def final_path(entry: Path) -> Path:
    """The cache file an entry of the cache folder belongs to (``<name>.partial`` or ``<name>.h5.tmp`` -> ``<name>.h5``)."""
    m = _NAME_RE.match(entry.name)
    return entry.with_name(m["stem"] + ".h5") if m else entry.with_suffix(".h5")


def key_entries(cache_dir: Path, ref: str, exts: tuple[str, ...] = (".h5",)) -> dict[str, list[Path]]:
    """The entries of the cache folder with these extensions whose key (in featx's names) starts with ``ref``, a
    whole key or a key prefix, grouped by key. Hidden entries and ``.locks`` are never looked at."""
    groups: dict[str, list[Path]] = {}
    for p in _cache_entries(cache_dir):
        m = _NAME_RE.match(p.name)
        if m and m["ext"] in exts and m["key"].startswith(ref):
            groups.setdefault(m["key"], []).append(p)
    return groups


Shard = tuple[int, int]  # (i, n): the i-th of n separate jobs (0 <= i < n), see :func:`shard_chunks`


def journal_dir(final: Path, shard: Shard | None = None) -> Path:
    """``<name>.partial``: the journal of the extraction that will produce ``final``; with ``shard`` (i, n)
    ``<name>.shard-<i>-of-<n>.partial``, the partial journal of one ``--shard i/n`` job."""
    if shard is None:
        return final.with_suffix(".partial")
    return final.with_name(f"{final.stem}.shard-{shard[0]}-of-{shard[1]}.partial")


def shard_of(entry: Path) -> Shard | None:
    """(i, n) for a shard journal's name, None for anything else."""
    m = _NAME_RE.match(entry.name)
    return (int(m["si"]), int(m["sn"])) if m and m["si"] is not None else None


def shard_chunks(n_chunks: int, shard: Shard) -> list[int]:
    """The chunks job ``i`` of ``n`` computes: the i-th of n contiguous, balanced ranges (sizes differ by at most
    one chunk, the first ones the larger, as ``numpy.array_split`` and the torchrun ranks split), a function of the
    journal's chunk count only, so separate jobs agree without talking."""
    i, n = shard
    q, r = divmod(n_chunks, n)
    lo = i * q + min(i, r)
    return list(range(lo, lo + q + (i < r)))


def tmp_path(final: Path) -> Path:
    """``<name>.h5.tmp``: where a cache is assembled before the atomic rename."""
    return final.with_name(final.name + ".tmp")


def lock_path(final: Path) -> Path:
    """One lock file per key, out of sight in ``<cache_dir>/.locks/``."""
    return final.parent / LOCK_DIR / (final.stem + ".lock")


def _key_of(path: Path) -> str:
    m = _NAME_RE.match(path.name)
    if m:
        return m["key"]
    name = path.name
    for suffix in (".tmp", ".h5", ".partial", ".lock", ".onnx"):
        name = name.removesuffix(suffix)
    key = name.rsplit("-", 1)[-1]
    return key if _KEY_RE.match(key) else str(path)


# --------------------------------------------------------------------------------------------------
# Ownership: featx removes only what it can prove it wrote


class NotFeatxError(CacheError):
    """A path featx cannot prove it wrote: featx never deletes, replaces or resumes over it."""

    def __init__(self, path: Path, why: str) -> None:
        self.path, self.why = Path(path), why
        super().__init__(
            f"featx cannot prove it wrote {path} ({why}), so it leaves it alone: "
            f"delete it by hand if you do not need it ({_rm_command(Path(path))})"
        )


def _rm_command(path: Path) -> str:
    is_dir = path.is_dir() and not path.is_symlink()
    return f"rm {'-r ' if is_dir else ''}-- {shlex.quote(str(path))}"


def _stored_key(p: Path) -> tuple[str | None, str]:
    """(the key in the featx attributes of HDF5 file ``p``, "") or (None, why there is none). Never raises."""
    try:
        import h5py

        with h5py.File(p, "r") as f:
            attrs = f.attrs
            key, fmt, version = (_norm(attrs.get(k)) for k in ("key", "format_version", "featx_version"))
    except Exception as exc:  # not HDF5, truncated, a damaged attribute heap: nothing to prove it with
        text = str(exc)
        what = "truncated" if "truncated" in text else "not HDF5" if "signature" in text else _first_line(exc)
        return None, f"it does not open as HDF5: {what}"
    if not isinstance(key, str) or not isinstance(fmt, int) or version is None:
        return None, "an HDF5 file without featx's attributes"
    return key, ""


def cache_file_problem(path: str | os.PathLike[str]) -> str | None:
    """None when ``path`` is provably the featx cache its name says: a regular file (not a symbolic link) named
    ``<...>-<key>.h5`` whose HDF5 attributes carry featx's markers (``key``, ``format_version``, ``featx_version``)
    and that same key. Otherwise why not. Damaged data does not matter here (see :func:`verify_caches`)."""
    p = Path(path)
    m = _NAME_RE.match(p.name)
    key = m["key"] if m and m["ext"] == ".h5" else None
    name_help = "cache name (<dataset>-<split>-<backbone>-<layer>-<20-hex key>.h5)"
    return keyed_file_problem(p, key, name_help, _stored_key, "the cache")


def prove_cache_file(path: str | os.PathLike[str]) -> str:
    """The key of ``path`` when it is provably the featx cache its name says; :class:`NotFeatxError` otherwise."""
    why = cache_file_problem(path)
    if why:
        raise NotFeatxError(Path(path), why)
    return _NAME_RE.match(Path(path).name)["key"]  # type: ignore[index]


def _journal_header_problem(p: Path, key: str) -> str | None:
    why = plain_file_problem(p)
    if why:
        return f"journal.json: {why}"
    try:
        with p.open("rb") as fh:
            data = fh.read(1 << 20)
        header = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"journal.json is unreadable: {_first_line(exc)}"
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        return "journal.json is not a featx journal"
    if header.get("key") != key:
        return f"journal.json is the journal of key {header.get('key')}, not the {key} of its name"
    return None


def journal_problem(path: str | os.PathLike[str]) -> str | None:
    """None when ``path`` is provably a featx journal (``<...>-<key>.partial``, see :class:`CacheJournal`): a real
    folder (not a symbolic link) whose ``journal.json`` featx wrote (its format, the key of the name) and that holds
    only featx's files (journal.json, chunk files, featx's temporary files; a journal whose creation was killed
    holds no journal.json and no chunk). Also an old featx's ``.partial`` HDF5 file with featx's attributes."""
    p = Path(path)
    m = _NAME_RE.match(p.name)
    if not m or m["ext"] != ".partial":
        return "not a featx journal name (<dataset>-<split>-<backbone>-<layer>-<20-hex key>.partial)"
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return "it does not exist"
    if stat.S_ISREG(st.st_mode):  # an old featx wrote the cache itself as <name>.partial
        stored, why = _stored_key(p)
        if stored is None:
            return f"a file, not a journal folder ({why})"
        return None if stored == m["key"] else f"a file holding the cache of key {stored}, not {m['key']}"
    if not stat.S_ISDIR(st.st_mode):
        return plain_file_problem(p) or "not a folder"
    names = []
    try:
        entries = list(os.scandir(p))
    except OSError as exc:
        return f"it cannot be listed: {exc.strerror or exc}"
    for e in entries:
        if not (e.name == "journal.json" or _CHUNK_RE.match(e.name) or _JOURNAL_TMP_RE.match(e.name)):
            return f"it holds {e.name}, which featx did not write"
        if not e.is_file(follow_symlinks=False):
            return f"its {e.name} is not a regular file"
        names.append(e.name)
    if "journal.json" in names:
        return _journal_header_problem(p / "journal.json", m["key"])
    if any(_CHUNK_RE.match(n) for n in names):
        return "it holds chunks but no journal.json"
    return None


def _assembly_problem(p: Path, companion_ours: bool) -> str | None:
    """None when ``<name>.h5.tmp`` is provably featx's: a regular file beside a cache or journal of the same name that
    featx wrote (an assembly killed before its rename; HDF5 writes its signature only at the end), or alone but
    holding featx's attributes and that key."""
    m = _NAME_RE.match(p.name)
    if not m or m["ext"] != ".h5.tmp":
        return "not a featx assembly file name (<...>-<key>.h5.tmp)"
    why = plain_file_problem(p)
    if why or companion_ours:
        return why
    stored, why = _stored_key(p)
    if stored is None:
        return f"{why}, and no cache or journal of featx's beside it"
    return None if stored == m["key"] else f"it holds the cache of key {stored}, not {m['key']}"


def assembly_problem(final: Path) -> str | None:
    """:func:`_assembly_problem` for the assembly file of ``final``, its companions looked up."""
    ours = (final.exists() and cache_file_problem(final) is None) or (
        journal_dir(final).exists() and journal_problem(journal_dir(final)) is None
    )
    return _assembly_problem(tmp_path(final), ours)


def remove_assembly_file(final: Path, *, strict: bool = True) -> None:
    """Delete ``<name>.h5.tmp`` (an assembly killed before its rename) when featx can prove it is its own; a foreign
    thing there raises :class:`NotFeatxError` (``strict``) or is left alone with a warning."""
    tmp = tmp_path(final)
    if not (tmp.exists() or tmp.is_symlink()):
        return
    why = assembly_problem(final)
    if why:
        if strict:
            raise NotFeatxError(tmp, why)
        log.warning("%s", NotFeatxError(tmp, why))
        return
    tmp.unlink(missing_ok=True)


def _lock_file_problem(p: Path) -> str | None:
    """None for featx's lock file: a regular file in a real ``.locks`` folder holding nothing or a pid."""
    if not _LOCK_RE.match(p.name) or p.parent.name != LOCK_DIR or p.parent.is_symlink():
        return "not a featx lock file"
    why = plain_file_problem(p)
    if why:
        return why
    try:
        data = p.read_bytes()[:64]
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    return None if re.fullmatch(rb"(\d+\n)?", data) else "it holds something other than a pid"


def fix_hint(path: Path) -> str:
    """How to get rid of a broken cache: ``featx cache rm`` when featx can prove the file is its own, else by hand."""
    why = onnx_file_problem(path) if path.name.endswith(".onnx") else cache_file_problem(path)
    if why:
        return (
            f"featx cannot prove it wrote this file ({why}), so `featx cache rm` leaves it: "
            f"delete it by hand ({_rm_command(path)}) and extract again"
        )
    opt = ""
    with contextlib.suppress(OSError):
        if path.parent.resolve() != resolve_cache_dir().resolve():
            opt = f" --cache-dir {shlex.quote(str(path.parent))}"
    return f"delete it with `featx cache rm {_key_of(path)}{opt}` and extract again"


def _damaged(path: Path, what: str) -> CacheError:
    return CacheError(f"cache {path} is damaged ({what}): {fix_hint(path)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc))


def write_error(exc: BaseException, target: Path, resume_hint: str = "", *, journal: Path | None = None) -> CacheError:
    """A one-line CacheError for a failed write (no space, permissions, ...). With ``journal``: where the finished
    chunks are kept and what to fix before the same command resumes them."""
    if journal is not None:
        fix = "free space" if is_no_space(exc) else "fix that"
        resume_hint = f" (the finished chunks are kept in {journal}: {fix} and run the same command again to resume)"
    if is_no_space(exc):
        return CacheError(f"no space left on device writing {target}{resume_hint}")
    reason = getattr(exc, "strerror", None) or _first_line(exc)
    return CacheError(f"cannot write {target}: {reason}{resume_hint}")


def find_cache(cache_dir: Path, spec: CacheSpec) -> Path | None:
    """The complete cache for ``spec``, if any (journals and temporary files never match). The file is found
    by its key and must also hold that key and the same embedder and rows: a renamed or edited file is refused."""
    if not cache_dir.is_dir():
        return None
    hits = key_entries(cache_dir, spec.key()).get(spec.key(), [])
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
# Key locks


_HELD_LOCK_FDS: set[int] = set()


def _close_held_locks_in_child() -> None:
    """A forked DataLoader worker must not keep the parent's key lock (a worker orphaned by a kill would hold it
    for seconds)."""
    for fd in list(_HELD_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class CacheBusyError(CacheError):
    """Another process holds the key lock: an extraction of that key is running."""


class KeyLock:
    """An exclusive lock per cache key in ``<cache_dir>/.locks/`` (flock; released by the kernel when the process
    dies, never inherited by forked workers). The holder writes its pid into the file. ``blocking=False`` raises
    :class:`CacheBusyError` instead of waiting. Falls back to filelock where flock is missing.

    The lock file may be deleted while nobody holds it (``featx cache rm``): a process that locked a file that is
    no longer at its path locks the new one instead."""

    def __init__(self, path: Path, *, blocking: bool = True) -> None:
        self.path = Path(path)
        self.blocking = blocking
        self._fd: int | None = None
        self._fallback: Any = None

    def _open(self) -> int:
        try:
            if self.path.parent.is_symlink():
                raise OSError(errno.ELOOP, f"{self.path.parent} is a symbolic link")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise CacheError(f"cannot use cache folder {self.path.parent.parent}: {exc.strerror or exc} ({self.path})") from None

    def holder(self) -> str:
        """The pid written by the process holding the lock, or "?"."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return "?"
        return text if text.isdigit() else "?"

    def busy_error(self) -> CacheBusyError:
        return CacheBusyError(
            f"an extraction of {_key_of(self.path)} is running (pid {self.holder()}) in {self.path.parent.parent}: "
            "wait for it to finish or stop it first"
        )

    def __enter__(self) -> KeyLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (Windows)
            os.close(self._open())
            from filelock import FileLock, Timeout

            self._fallback = FileLock(str(self.path))
            try:
                self._fallback.acquire(timeout=-1 if self.blocking else 0)
            except Timeout:
                self._fallback = None
                raise self.busy_error() from None
            return self
        while True:
            fd = self._open()
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not self.blocking:
                        raise self.busy_error() from None
                    log.info("waiting for another featx run on the same cache (%s)", self.path.name)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path, follow_symlinks=False)
                    same = (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)  # removed (featx cache rm) while we waited: lock the file that is there now
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def release(self, *, remove: bool = False) -> None:
        """Release the lock; ``remove`` first deletes the lock file (it is held, so nobody else uses it now)."""
        if remove and self._fd is not None and _lock_file_problem(self.path) is None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._fallback is not None:  # pragma: no cover
            self._fallback.release()
            self._fallback = None
        if self._fd is not None:
            _HELD_LOCK_FDS.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc: object) -> None:
        self.release()


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
    # A shard journal's chunks also carry their rows' paths and labels, so that `featx cache merge` needs no dataset.
    paths: list[str] | None = None
    labels: np.ndarray | None = None


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

    def __init__(self, final: Path, shard: Shard | None = None) -> None:
        self.final = Path(final)
        self.shard = shard
        self.dir = journal_dir(self.final, shard)
        self.header: dict[str, Any] = {}

    @classmethod
    def at(cls, folder: Path) -> CacheJournal:
        """The journal in ``folder`` (``<name>.partial`` or a shard's ``<name>.shard-<i>-of-<n>.partial``)."""
        return cls(final_path(Path(folder)), shard_of(Path(folder)))

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
        return self.dir.exists() or self.dir.is_symlink()

    def problem(self) -> str | None:
        """None when the journal folder is provably featx's (see :func:`journal_problem`); else why not."""
        return journal_problem(self.dir)

    def check_ours(self) -> None:
        """Raise :class:`NotFeatxError` when something is at the journal's place that featx cannot prove it wrote."""
        if self.exists():
            why = self.problem()
            if why:
                raise NotFeatxError(self.dir, why)

    def discard(self) -> None:
        """Delete the journal: only when it is provably featx's (:class:`NotFeatxError` otherwise, nothing deleted),
        and only the files that were checked; ``journal.json`` last, so that a kill part-way leaves a journal
        that is still provably featx's."""
        if not self.exists():
            return
        self.check_ours()
        try:
            if not self.dir.is_dir():  # an old featx's .partial file (checked above)
                self.dir.unlink(missing_ok=True)
            else:
                names = sorted(os.listdir(self.dir), key=lambda n: n == "journal.json")
                for name in names:  # what appeared since the check is not featx's: never deleted
                    if not (name == "journal.json" or _CHUNK_RE.match(name) or _JOURNAL_TMP_RE.match(name)):
                        raise NotFeatxError(self.dir, f"it holds {name}, which featx did not write")
                for name in names:
                    (self.dir / name).unlink(missing_ok=True)
                self.dir.rmdir()
        except OSError as exc:
            raise CacheError(f"cannot remove the journal {self.dir}: {exc.strerror or exc}") from None
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
        (a kill mid-write) are removed silently; every discarded chunk gets one line in ``problems``. Anything
        else in the folder raises :class:`NotFeatxError` (featx deletes only its own files)."""
        self.check_ours()  # before deleting anything
        state = JournalState()
        for p in sorted(self.dir.iterdir()):
            if p.name == "journal.json":
                continue
            own = bool(_CHUNK_RE.match(p.name) or _JOURNAL_TMP_RE.match(p.name)) and plain_file_problem(p) is None
            if not own:  # never deleted: the folder is not provably featx's any more
                raise NotFeatxError(self.dir, f"it holds {p.name}, which featx did not write")
            if not _CHUNK_RE.match(p.name):  # a temporary file left by a kill mid-write
                p.unlink(missing_ok=True)
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
                paths_raw, labels = (z["paths"], np.asarray(z["labels"], dtype=np.int64)) if "paths" in z.files else (None, None)
            reasons = json.loads(bytes(reasons_raw).decode("ascii"))
            paths = None if paths_raw is None else [str(x) for x in json.loads(bytes(paths_raw).decode("ascii"))]
        except Exception as exc:  # any parse error means: not a whole chunk
            raise ValueError(f"unreadable ({_first_line(exc)})") from None
        if paths is not None and (len(paths) != rows or labels is None or labels.shape != (rows,)):
            raise ValueError(f"wrong paths or labels for rows {start}-{stop}")
        if stored_start != start or feats.ndim != 2 or feats.shape[0] != rows or valid.shape != (rows,):
            raise ValueError(f"wrong shape for rows {start}-{stop}")
        if valid.dtype != np.bool_ or not isinstance(reasons, list) or len(reasons) != rows:
            raise ValueError("wrong valid mask or failure list")
        return Chunk(i, start, feats, valid, [str(r) for r in reasons], seconds, paths, labels)

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
            **(
                {}
                if chunk.paths is None
                else {
                    "paths": np.frombuffer(json.dumps(chunk.paths, ensure_ascii=True).encode("ascii"), dtype=np.uint8),
                    "labels": np.asarray(chunk.labels, dtype=np.int64),
                }
            ),
        )
        data = buf.getvalue()
        path = self.dir / f"chunk-{chunk.index:09d}-{hashlib.sha256(data).hexdigest()[:16]}.npz"
        write_file_atomic(path, data)
        failpoints.hit("journal.chunk_written")
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
        # O_EXCL: never write through a symbolic link or into a file someone else made
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
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
    journal: Path | None = None,
) -> Path:
    """Write a complete cache from row blocks (in order) to ``<name>.h5.tmp``, fsync it and rename it to
    ``final`` (replacing an older cache only now). Returns ``final``; on any failure nothing changes at
    ``final`` and the temporary file is removed. A full disk is a one-line CacheError, never a crash.
    ``journal``: the journal the blocks come from (named in the error). A leftover ``.h5.tmp`` is deleted
    only when featx can prove it is its own (:func:`remove_assembly_file`)."""
    import h5py

    tmp = tmp_path(final)
    remove_assembly_file(final)
    try:
        guard = _GuardedFile(tmp)
    except OSError as exc:
        raise write_error(exc, tmp, journal=journal) from None
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
        raise write_error(exc, tmp, journal=journal) from None
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


def _rows_at_positions(indices: np.ndarray, positions: tuple[int, ...]) -> np.ndarray:
    """The rows whose dataset position (``indices``) is in ``positions``, in the positions' order; a position with
    no row (an image that failed to decode, in a FeatureSet) is skipped."""
    if len(indices) == 0:
        return np.empty(0, np.int64)
    pos = np.asarray(positions, dtype=indices.dtype)
    by_pos = np.argsort(indices, kind="stable")
    at = np.minimum(np.searchsorted(indices, pos, sorter=by_pos), len(by_pos) - 1)
    return by_pos[at][indices[by_pos[at]] == pos].astype(np.int64)


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

    def select(self, rows: RowSelection) -> FeatureSet:
        """The rows holding ``rows``' dataset positions, in their order (failed images have none)."""
        return self.subset(_rows_at_positions(self.indices, rows.positions))


def _read_attrs(f: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(decoded attributes, raw attributes as stored)."""
    raw = dict(f.attrs.items())
    out = {k: _norm(v) for k, v in raw.items()}
    for k in ("embedder", "spec", "onnx"):
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

    def rows_of(self, rows: RowSelection) -> np.ndarray:
        """The file rows holding ``rows``' dataset positions, in their order (valid or not: :meth:`iter_chunks`
        yields the valid ones)."""
        return _rows_at_positions(self.indices, rows.positions)

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
    """Read every dataset of the given caches (default: every file in the folder named like a featx cache) in
    full, checking every checksum and digest, and that the file holds the key its name says. One
    ``(path, ok, message)`` per cache; never raises for a damaged file."""
    d = resolve_cache_dir(cache_dir)
    if refs:
        targets = [resolve_cache_path(r, d) for r in refs]
    else:
        targets = [p for p in _cache_entries(d) if (m := _NAME_RE.match(p.name)) and m["ext"] in (".h5", ".onnx")]
    out = []
    for p in targets:
        if p.name.endswith(".onnx"):
            why = onnx_file_problem(p) or onnx_damage(p)
            ok_text = f"ONNX export {p.name}: featx's, sha256 matches"
            out.append((p, False, f"{p}: {why} (it is never used; {fix_hint(p)})") if why else (p, True, ok_text))
            continue
        try:
            with CacheReader(p) as reader:
                message, stored = reader.verify(), reader.attrs.get("key")
        except CacheError as exc:
            out.append((p, False, str(exc)))
            continue
        m = _NAME_RE.match(p.name)
        if m and m["ext"] == ".h5" and stored != m["key"]:
            out.append((p, False, f"cache {p} does not hold what its name says: {fix_hint(p)}"))
        else:
            out.append((p, True, message))
    return out


def _cache_entries(d: Path) -> list[Path]:
    """What ``cache ls`` and ``cache rm --all`` look at: the entries of the cache folder named like featx's files
    (``*.h5``, ``*.partial``, ``*.h5.tmp``; hidden entries and ``.locks`` aside). Whether featx wrote them is
    another question (:func:`cache_file_problem`, :func:`journal_problem`)."""
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    return [d / n for n in names if not n.startswith(".") and n.endswith((".h5", ".partial", ".h5.tmp", ".onnx"))]


def _entry_problem(p: Path) -> str | None:
    """None when featx can prove it wrote the cache-folder entry ``p``; else why not."""
    m = _NAME_RE.match(p.name)
    if m is None:
        return "not a featx cache name"
    if m["ext"] == ".h5":
        return cache_file_problem(p)
    if m["ext"] == ".partial":
        return journal_problem(p)
    if m["ext"] == ".onnx":
        return onnx_file_problem(p)
    return assembly_problem(final_path(p))


def _size_mb(p: Path) -> float | None:
    try:
        st = os.lstat(p)
    except OSError:
        return None
    return st.st_size / 2**20 if stat.S_ISREG(st.st_mode) else None


def _journal_row(p: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"path": str(p), "file": p.name, "key": _key_of(p), "featx": True}
    if not p.is_dir():
        row.update(size_mb=p.stat().st_size / 2**20, status="unusable: a partial file from an older featx")
        return row
    j = CacheJournal.at(p)
    files = j.chunk_files()
    row["size_mb"] = sum(f.stat().st_size for f in files.values() if f.exists()) / 2**20
    try:
        j.open()
    except ValueError as exc:
        row["status"] = f"unusable journal: {exc}"
        return row
    done = j.done_rows(i for i in files if i < j.n_chunks)
    status, rows = f"partial {done}/{j.n_rows}", j.n_rows
    if j.shard is not None:  # a --shard job's own journal: its share of the chunks, merged by `featx cache merge`
        rows = j.done_rows(shard_chunks(j.n_chunks, j.shard))
        status = f"partial shard {j.shard[0]}/{j.shard[1]} {done}/{rows} (featx cache merge)"
    h = j.header
    row.update(
        key=h.get("key", row["key"]),
        dataset=h.get("dataset_name"),
        split=h.get("split"),
        backbone=(h.get("embedder") or {}).get("backbone"),
        layer=(h.get("embedder") or {}).get("layer"),
        shape=[j.n_rows, 0],
        created=h.get("created_at"),
        status=status,
        done_rows=done,
        **({"shard": list(j.shard), "shard_rows": rows} if j.shard is not None else {}),
    )
    return row


NOT_FEATX = "not featx's (left alone)"


def list_caches(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One summary per entry of the cache folder named like featx's files (complete, damaged, still a journal, an
    assembly leftover, or not featx's at all: status ``NOT_FEATX`` with the reason in ``why``), newest first.
    ``featx`` says whether featx can prove it wrote the entry (and ``featx cache rm`` removes it)."""
    d = resolve_cache_dir(cache_dir)
    rows = []
    for p in _cache_entries(d):
        why = _entry_problem(p)
        if why:
            foreign = {"path": str(p), "file": p.name, "key": None, "size_mb": _size_mb(p), "status": NOT_FEATX, "why": why}
            rows.append({**foreign, "featx": False})
            continue
        ext = _NAME_RE.match(p.name)["ext"]  # type: ignore[index]
        if ext == ".partial":
            rows.append(_journal_row(p))
            continue
        row: dict[str, Any] = {"path": str(p), "file": p.name, "size_mb": _size_mb(p), "featx": True}
        if ext == ".h5.tmp":
            row.update(key=_key_of(p), status="unusable: an interrupted assembly")
            rows.append(row)
            continue
        if ext == ".onnx":
            man = onnx_manifest(p) or {}
            emb = man.get("embedder") or {}
            row.update(
                key=_key_of(p),
                backbone=emb.get("backbone"),
                layer="+".join(man.get("taps") or []),
                shape=[0, sum(man.get("dims") or [])],
                created=man.get("created_at"),
                status="onnx export (checked against PyTorch; `featx cache verify` checks its sha256)",
            )
            rows.append(row)
            continue
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
    rows.sort(key=lambda r: r.get("created") or "", reverse=True)
    return rows


def _is_path_ref(ref: str) -> bool:
    return Path(ref).suffix in (".h5", ".partial", ".tmp", ".onnx") or os.sep in ref or bool(os.altsep and os.altsep in ref)


def _lookup_key(ref: str, d: Path, exts: tuple[str, ...]) -> tuple[str, list[Path]]:
    """The one key of the cache folder that starts with ``ref`` (a key or key prefix: hex digits, matched against
    the key part of featx's file names only), and its entries with these extensions."""
    prefix = ref.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,20}", prefix):
        raise CacheError(f"'{ref}' is not a cache key or key prefix (keys are 20 hex digits: see featx cache ls)")
    groups = key_entries(d, prefix, exts)
    if not groups:
        raise CacheError(f"no cache with key '{ref}' in {d} (see: featx cache ls)")
    if len(groups) > 1:
        keys = ", ".join(sorted(groups))
        raise CacheError(f"key prefix '{ref}' matches {len(groups)} caches in {d} ({keys}); give more characters")
    [(key, paths)] = groups.items()
    return key, paths


def resolve_cache_path(ref: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A cache given as a file path, a key, or a unique key prefix (of the key in featx's file names)."""
    d = resolve_cache_dir(cache_dir)
    if _is_path_ref(ref):
        p = Path(ref).expanduser()
        if not p.is_file() and os.sep not in ref and (d / ref).is_file():
            p = d / ref
        if not p.is_file():
            raise CacheError(f"cache not found: {p}")
        return p
    key, paths = _lookup_key(ref, d, (".h5",))
    if len(paths) > 1:
        raise CacheError(f"key {key} names {len(paths)} files in {d} ({', '.join(p.name for p in paths)}); give the file")
    return paths[0]


@dataclass
class Removal:
    """What :func:`clean_caches` did: entries removed, entries left alone because featx cannot prove it wrote
    them (with why), and featx's entries left because an extraction holds their key's lock."""

    removed: list[Path] = field(default_factory=list)
    left: list[tuple[Path, str]] = field(default_factory=list)
    busy: list[tuple[Path, str]] = field(default_factory=list)


_EXT_ORDER = (".h5", ".partial", ".h5.tmp", ".onnx")


def _stem_entries(d: Path, stem: str, exts: Iterable[str]) -> dict[str, Path]:
    """The entries ``stem + ext`` that exist, keyed by their suffix; with ``.partial`` also the shard journals of
    ``stem`` (``stem.shard-<i>-of-<n>.partial``, suffix ``.shard-<i>-of-<n>.partial``)."""
    exts = list(exts)
    out = {ext: d / (stem + ext) for ext in exts if (d / (stem + ext)).exists() or (d / (stem + ext)).is_symlink()}
    if ".partial" in exts:
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(d)):
                if name.startswith(stem + ".shard-") and (m := _NAME_RE.match(name)) and m["stem"] == stem:
                    out[name[len(stem) :]] = d / name
    return out


def _delete_entry(p: Path) -> None:
    """Delete a cache-folder entry that was just proven featx's (under its key lock)."""
    m = _NAME_RE.match(p.name)
    if m and m["ext"] == ".partial":
        CacheJournal.at(p).discard()  # checks again, deletes only the files it checked
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CacheError(f"cannot remove {p}: {exc.strerror or exc}") from None


def _rm_path(ref: str, d: Path) -> Path:
    """A path given to ``cache rm``: it must be in the cache folder and carry one of featx's names."""
    p = Path(ref).expanduser()
    if os.sep not in ref and not (p.exists() or p.is_symlink()):
        p = d / ref
    if not (p.exists() or p.is_symlink()):
        raise CacheError(f"no such cache: {p} (see: featx cache ls)")
    try:
        inside = p.parent.resolve() == d.resolve()
    except OSError:
        inside = False
    if not inside:
        raise CacheError(
            f"{p} is not in the cache folder {d}: featx cache rm removes only what featx wrote there, nothing else "
            f"(give --cache-dir for a cache in another folder)"
        )
    if not _NAME_RE.match(p.name):
        raise NotFeatxError(p, "not a featx cache name")
    return p


def clean_caches(refs: Iterable[str] = (), cache_dir: str | os.PathLike[str] | None = None, *, all_: bool = False) -> Removal:
    """Remove caches with their journals, assembly files and lock files: by key, unique key prefix or path in the
    cache folder, or every one (``all_``). Removes only what featx can prove it wrote (:func:`cache_file_problem`,
    :func:`journal_problem`), never follows a symbolic link, and takes each key's lock without waiting.

    Named refs are all or nothing: a ref outside the cache folder, not featx's, or whose key an extraction holds
    raises :class:`CacheError` before anything is deleted. ``all_`` removes what is featx's and reports the rest
    in :attr:`Removal.left` (not featx's) and :attr:`Removal.busy` (an extraction is running)."""
    d = resolve_cache_dir(cache_dir)
    out = Removal()
    plans: dict[str, set[str]] = {}  # stem -> extensions to remove
    if all_:
        for p in _cache_entries(d):
            m = _NAME_RE.match(p.name)
            if m is None:
                out.left.append((p, "not a featx cache name"))
            else:
                plans.setdefault(m["stem"], set()).add(m["ext"])
    else:
        for r in refs:
            if _is_path_ref(r):
                m = _NAME_RE.match(_rm_path(r, d).name)
                exts = {
                    ".h5": {".h5", ".partial", ".h5.tmp"},
                    ".partial": {".partial", ".h5.tmp"},
                    ".h5.tmp": {".h5.tmp"},
                    ".onnx": {".onnx"},
                }[m["ext"]]  # type: ignore[index]
                plans.setdefault(m["stem"], set()).update(exts)  # type: ignore[index]
            else:
                _key, paths = _lookup_key(r, d, _EXT_ORDER)
                for p in paths:
                    plans.setdefault(_NAME_RE.match(p.name)["stem"], set()).update(_EXT_ORDER)  # type: ignore[index]
    locks: dict[str, KeyLock] = {}
    try:
        for stem in sorted(plans):
            lock = KeyLock(lock_path(d / (stem + ".h5")), blocking=False)
            try:
                lock.__enter__()
            except CacheBusyError as exc:
                if not all_:
                    raise
                out.busy += [(p, str(exc)) for p in _stem_entries(d, stem, _EXT_ORDER).values()]
                continue
            locks[stem] = lock
        doomed: list[Path] = []
        for stem in sorted(locks):
            for p in _stem_entries(d, stem, _EXT_ORDER).values():
                if _NAME_RE.match(p.name)["ext"] not in plans[stem]:  # type: ignore[index]
                    continue
                why = _entry_problem(p)
                if why and not all_:
                    raise NotFeatxError(p, why)
                if why:
                    out.left.append((p, why))
                else:
                    doomed.append(p)
        for p in sorted(doomed, key=lambda q: _EXT_ORDER.index(_NAME_RE.match(q.name)["ext"])):  # type: ignore[index]
            _delete_entry(p)
            out.removed.append(p)
        if doomed:
            fsync_dir(d)
    finally:
        for lock in locks.values():
            lock.release(remove=True)  # safe: a waiting extraction locks the file that is there after this
    if all_:
        _remove_stale_locks(d)
    out.left.sort()
    return out


def _remove_stale_locks(d: Path) -> None:
    """Lock files of keys with nothing left in the folder (nobody holds them; featx's own files only)."""
    locks = d / LOCK_DIR
    if locks.is_symlink() or not locks.is_dir():
        return
    for lp in sorted(locks.iterdir()):
        if _lock_file_problem(lp) is not None or _stem_entries(d, lp.stem, _EXT_ORDER):
            continue
        lock = KeyLock(lp, blocking=False)
        try:
            lock.__enter__()
        except CacheError:
            continue
        lock.release(remove=True)


def remove_caches(refs: list[str], cache_dir: str | os.PathLike[str] | None = None, *, all_: bool = False) -> list[Path]:
    """:func:`clean_caches`, returning the removed entries."""
    return clean_caches(refs, cache_dir, all_=all_).removed


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def base_attrs() -> dict[str, Any]:
    return {"featx_version": __version__, "format_version": FORMAT_VERSION, "created_at": now_iso()}


# --------------------------------------------------------------------------------------------------
# Merging the partial journals of --shard jobs

#: Journal header fields that differ between the shards of one job by design (everything else must be equal).
_SHARD_OWN = ("created_at", "shard")


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_shards` made of one cache's shard journals."""

    path: Path
    key: str
    n_images: int
    n_failed: int
    shards: int
    hit: bool = False

    def summary(self) -> str:
        if self.hit:
            return f"{self.path.name}: already complete ({self.n_images} images), nothing written"
        return f"merged {self.shards} shard journal(s): {self.n_images} images, {self.n_failed} skipped -> {self.path}"


def _header_differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Which of two journal headers' fields differ, in words (the dataset fingerprint named on its own)."""
    keys = sorted((set(a) | set(b)) - set(_SHARD_OWN))
    diff = [k for k in keys if a.get(k) != b.get(k)]
    spec_a, spec_b = a.get("spec") or {}, b.get("spec") or {}
    words = []
    if spec_a.get("dataset_fingerprint") != spec_b.get("dataset_fingerprint"):
        words.append("the dataset fingerprint (the images differ: another copy, or files changed between the jobs)")
    other = sorted((set(spec_a) | set(spec_b)) - {"dataset_fingerprint"})
    words += [f"spec.{k}" for k in other if spec_a.get(k) != spec_b.get(k)]
    derived = {"key", "spec", "cache_attrs"} if "spec" in diff else set()  # follow from the spec
    words += [k for k in diff if k not in derived]
    if not words and diff:
        words = diff
    return ", ".join(words)


def _shard_folders(refs: Iterable[str | os.PathLike[str]], cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The shard journals named by ``refs`` (shard journal folders, or folders holding them; none: the cache folder)."""
    folders: list[Path] = []
    refs = list(refs) or [resolve_cache_dir(cache_dir)]
    for r in refs:
        p = Path(r).expanduser()
        if shard_of(p) is not None:
            if not p.exists():
                raise CacheError(f"shard journal not found: {p}")
            folders.append(p)
        elif p.is_dir() and not p.is_symlink() and _NAME_RE.match(p.name) is None:
            found = [e for e in _cache_entries(p) if shard_of(e) is not None]
            if not found:
                raise CacheError(f"no shard journals (<name>.shard-<i>-of-<n>.partial, made by `featx extract --shard`) in {p}")
            folders += found
        else:
            from featx.errors import UsageError

            raise UsageError(f"{p} is neither a shard journal (<name>.shard-<i>-of-<n>.partial) nor a folder holding them")
    return folders


def _open_shard(folder: Path) -> CacheJournal:
    why = journal_problem(folder)
    if why:
        raise NotFeatxError(folder, why)
    j = CacheJournal.at(folder)
    try:
        j.open()
    except ValueError as exc:
        raise CacheError(f"shard journal {folder} is unusable ({exc}): run that shard's `featx extract --shard` again") from None
    if j.header.get("shard") != list(j.shard or ()):
        raise CacheError(f"shard journal {folder} says it is shard {j.header.get('shard')}, not its name's {j.shard}")
    return j


def _ranges(idx: list[int]) -> str:
    out: list[str] = []
    for i in idx:
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def merge_shards(
    refs: Iterable[str | os.PathLike[str]] = (), cache_dir: str | os.PathLike[str] | None = None
) -> list[MergeResult]:
    """Assemble the ordinary cache of each key from the partial journals of ``featx extract --shard i/n`` jobs.

    ``refs``: shard journal folders (``<name>.shard-<i>-of-<n>.partial``, gathered from the machines that made them),
    or folders holding them (default: the cache folder); the cache is written to ``cache_dir`` when given, else beside
    the first shard journal. Refused with one line, before anything is written: a journal featx cannot prove it wrote,
    journals of two different caches of one split (the jobs disagreed), journals whose headers differ (which fields,
    the dataset fingerprint named), and missing or damaged chunks (which, and whose shard). The shard journals are
    only read, never changed or deleted (``featx cache rm`` removes them). The cache is the one a single ``featx
    extract`` writes (same key, rows, paths, labels, failures; features computed with the same batching)."""
    folders = _shard_folders(refs, cache_dir)
    groups: dict[str, list[CacheJournal]] = {}
    for f in folders:
        j = _open_shard(f)
        groups.setdefault(_NAME_RE.match(f.name)["stem"], []).append(j)  # type: ignore[index]
    # Several caches at once are fine (a dataset's splits); two keys for the same split mean the jobs disagreed.
    by_split: dict[str, list[str]] = {}
    for stem in sorted(groups):
        by_split.setdefault(stem[: -len(groups[stem][0].header["key"]) - 1], []).append(stem)
    for stems in by_split.values():
        if len(stems) > 1:
            ja, jb = groups[stems[0]][0], groups[stems[1]][0]
            raise CacheError(
                f"the shard journals are of different caches ({ja.dir.name} and {jb.dir.name}): "
                f"{_header_differences(ja.header, jb.header)} differ; merge the shards of one extraction "
                "(name its journals one by one); nothing was written"
            )
    plans = [_plan_merge(stem, journals) for stem, journals in sorted(groups.items())]  # every check first
    out = []
    for plan in plans:
        out_dir = Path(cache_dir).expanduser() if cache_dir is not None else plan.journals[0].dir.parent
        out.append(_write_merge(plan, out_dir))
    return out


@dataclass
class _MergePlan:
    """One cache's checked shard chunks, ready to be written (:func:`_plan_merge`, :func:`_write_merge`)."""

    stem: str
    journals: list[CacheJournal]
    chunks: dict[int, tuple[CacheJournal, Path]]
    paths: list[str]
    labels: np.ndarray
    failures: dict[int, str]
    seconds: float
    dim: int | None


def _plan_merge(stem: str, journals: list[CacheJournal]) -> _MergePlan:
    """Check one cache's shard journals (headers agree, every chunk present and whole); read their rows' paths."""
    base = journals[0]
    for j in journals[1:]:
        diff = _header_differences(base.header, j.header)
        if diff:
            raise CacheError(
                f"shard journal {j.dir} does not match {base.dir.name}: {diff} differ(s); run every shard with the "
                "same options on the same dataset; nothing was written"
            )
    n_shards = int(base.header["shard"][1])
    if any(int(j.header["shard"][1]) != n_shards for j in journals):
        raise CacheError(f"the shard journals of {stem} split the work in different numbers of shards; nothing was written")
    n_chunks, n = base.n_chunks, base.n_rows
    labels = np.zeros(n, dtype=np.int64)
    paths: list[str] = [""] * n
    failures: dict[int, str] = {}
    chunks: dict[int, tuple[CacheJournal, Path]] = {}
    damaged: list[str] = []
    seconds, dim = 0.0, None
    for j in journals:
        for i, p in sorted(j.chunk_files().items()):
            if i in chunks:
                continue
            try:
                c = j.read_chunk(p, i)
                if c.paths is None or c.labels is None:
                    raise ValueError("no paths and labels (not a shard journal's chunk)")
                if dim is not None and c.features.shape[1] != dim:
                    raise ValueError(f"{c.features.shape[1]} features, other chunks have {dim}")
            except ValueError as exc:
                damaged.append(f"{p.name}: {exc}")
                continue
            dim = int(c.features.shape[1])
            stop = c.start + len(c.paths)
            paths[c.start : stop] = c.paths
            labels[c.start : stop] = c.labels
            failures.update({c.start + k: r for k, r in enumerate(c.reasons) if r and not c.valid[k]})
            seconds += c.seconds
            chunks[i] = (j, p)
    missing = [i for i in range(n_chunks) if i not in chunks]
    if missing:
        given = {j.shard[0] for j in journals if j.shard}
        owners = []
        for s in range(n_shards):
            mine = [i for i in shard_chunks(n_chunks, (s, n_shards)) if i in set(missing)]
            if mine:
                owners.append(f"chunk(s) {_ranges(mine)} of shard {s}/{n_shards}" + ("" if s in given else " (not given)"))
        bad = f" ({len(damaged)} damaged: {damaged[0]})" if damaged else ""
        raise CacheError(
            f"cannot merge {stem}: {len(missing)} of {n_chunks} chunks missing{bad}: {'; '.join(owners)}; run those "
            "shards' `featx extract --shard i/n` again (they resume) and merge again; nothing was written"
        )
    return _MergePlan(stem, journals, chunks, paths, labels, failures, seconds, dim)


def _write_merge(plan: _MergePlan, out_dir: Path) -> MergeResult:
    """Write one planned merge as the ordinary cache (under its key lock; an existing cache is a hit)."""
    stem, journals, chunks, base = plan.stem, plan.journals, plan.chunks, plan.journals[0]
    n_chunks, n, n_shards = base.n_chunks, base.n_rows, int(base.header["shard"][1])
    final = out_dir / f"{stem}.h5"
    key = base.header["key"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot use cache folder {out_dir}: {exc.strerror or exc}") from None
    with KeyLock(lock_path(final)):
        if final.exists() or final.is_symlink():
            why = cache_file_problem(final)
            if why:
                raise NotFeatxError(final, why)
            a = read_cache_attrs(final)
            return MergeResult(final, key, int(a["n_images"]), int(a["n_failed"]), len(journals), hit=True)
        cache_attrs = dict(base.header["cache_attrs"])
        dtype = np.float16 if cache_attrs.get("dtype") == "float16" else np.float32
        attrs = {
            **base_attrs(),
            **cache_attrs,
            "extraction_seconds": plan.seconds,
            "n_images": n,
            "feature_dim": int(plan.dim or 0),
            "images_per_s": 0.0,
            "resumed_at": 0,
            "merged_shards": n_shards,
        }

        def blocks() -> Iterator[tuple[int, np.ndarray, np.ndarray, list[str]]]:
            for i in range(n_chunks):
                j, p = chunks[i]
                try:
                    c = j.read_chunk(p, i)
                except ValueError as exc:
                    raise CacheError(f"shard chunk {p} changed while merging ({exc}); nothing was written") from None
                yield c.start, c.features, c.valid, c.reasons

        write_cache_file(
            final,
            n_rows=n,
            blocks=blocks(),
            labels=plan.labels,
            paths=plan.paths,
            classes=list(base.header.get("classes") or []),
            attrs=attrs,
            dtype=dtype,
        )
    return MergeResult(final, key, n, len(plan.failures), len(journals))
