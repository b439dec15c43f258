"""Datasets: discover labelled images (ImageFolder trees or CSV manifests), decode them to RGB, split them.

Nothing here imports torch, so that cheap operations (cache look-ups, listing) stay fast. The
:class:`ImageFiles` reader is a plain map-style dataset that a ``torch.utils.data.DataLoader`` accepts.

Bad files never stop a run: a scan lists every path it finds (or a manifest names) without opening it,
and reading one image returns a failure *reason* instead of raising. Reasons start with one of
:data:`FAILURE_PREFIXES`; :func:`is_transient_failure` says which ones may go away by themselves.
Paths are ``str``; bytes that are not UTF-8 in a file name are kept as surrogate escapes
(``os.fsdecode``), and :func:`printable_path` turns such a path into UTF-8-safe text.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx.errors import DataError, UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
SPLIT_NAMES = ("train", "val", "test")
SAMPLE_DATASET = Path(__file__).parent / "sample_data" / "clothing10"

#: Largest image featx decodes, in pixels (width x height): Pillow's own hard limit for decompression
#: bombs (2 x ``PIL.Image.MAX_IMAGE_PIXELS`` = 178,956,970, about 13,400 x 13,400; ~540 MB as 8-bit RGB),
#: fixed here so that a changed Pillow default does not change what featx accepts. Larger images are
#: recorded as "too large: ...". The environment variable ``FEATX_MAX_IMAGE_PIXELS`` can lower it.
MAX_IMAGE_PIXELS = 178_956_970
#: Largest image *file* featx reads (1 GiB): each decode reads the whole file into memory first.
MAX_FILE_BYTES = 1 << 30
#: Longest side / shortest side beyond which an image is "too large": resizing the short side of a
#: 1 x 60,000 strip to 256 px would need gigabytes, in a decode worker that the OOM killer then takes.
MAX_ASPECT_RATIO = 100
#: Pillow formats featx decodes, whatever the extension says (a .jpg holding a PNG is fine; MPO camera
#: files open as JPEG). Other plugins (EPS runs Ghostscript, for one) are never tried on scanned files.
DECODE_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "WEBP", "TIFF", "GIF")

#: Every failure reason starts with one of these.
FAILURE_PREFIXES = (
    "missing: ",  # not there when read, and not there at the scan either (dangling symlink, manifest row)
    "vanished: ",  # listed by the scan, gone when read
    "permission denied: ",
    "not a file: ",  # a folder, FIFO, socket or device named like an image; a symlink loop
    "decode error: ",  # not an image, truncated, corrupt, an unsupported mode
    "too large: ",  # over MAX_IMAGE_PIXELS / MAX_FILE_BYTES, or out of memory decoding
    "i/o error: ",  # the operating system failed to read it (EIO, a stale network mount...)
)
# Failures that can change without the file's content changing; older caches wrote exception names.
_TRANSIENT_PREFIXES = ("missing:", "vanished:", "permission denied:", "i/o error:", "FileNotFoundError", "PermissionError")


def is_transient_failure(reason: str) -> bool:
    """True for a failure that may go away by itself (a permission, a missing or vanished file, an I/O
    error): a complete cache re-tries exactly those rows. Decode errors and too-large images are final."""
    return reason.startswith(_TRANSIENT_PREFIXES)


def printable_path(p: str | bytes | os.PathLike[Any]) -> str:
    """``p`` as valid UTF-8 text: bytes of a non-UTF-8 file name become ``\\xNN`` (backslashreplace).

    Use it wherever a path leaves Python (HDF5 strings, JSON, messages); keep the original ``str`` to
    open the file.
    """
    s = os.fspath(p)
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _key_bytes(s: str) -> bytes:
    """Bytes of ``s`` for hashing: the file name's own bytes for surrogate-escaped names, never an error."""
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass")


class AbsentPath(str):
    """A path that did not exist when the dataset was scanned (a manifest row naming nothing). Decoding it
    fails as "missing: ..." rather than "vanished: ..."; otherwise an ordinary ``str``."""

    __slots__ = ()


@dataclass(frozen=True)
class Split:
    """One split of a dataset: image paths relative to ``root`` and integer labels into ``classes``."""

    name: str
    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """A content key: class names, relative paths, labels, file sizes and modification times.

        Renaming or moving the dataset folder keeps the key; touching, adding or relabelling a file
        changes it. Cheap (one ``stat`` per file), so it can run on every command.
        """
        h = hashlib.sha256()
        h.update(_key_bytes("\x1f".join(self.classes)))
        for rel, label in zip(self.paths, self.labels.tolist()):
            try:
                st = os.stat(self.root / rel)
                state = f"{st.st_size}\x1f{st.st_mtime_ns}"
            except (OSError, ValueError) as exc:  # missing, dangling, unreadable folder: a failure later, not here
                state = "!" + errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
            h.update(_key_bytes(f"\x1e{rel}\x1f{label}\x1f{state}"))
        return h.hexdigest()

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> Split:
        """Rows ``indices`` of this split (for carved validation splits and few-shot draws)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split(
            name=name or self.name,
            root=self.root,
            paths=tuple(self.paths[i] for i in idx),
            labels=self.labels[idx],
            classes=self.classes,
        )


@dataclass(frozen=True)
class ImageDataset:
    """A labelled dataset: its splits share one class list (taken from ``train``)."""

    root: Path
    name: str
    classes: tuple[str, ...]
    splits: dict[str, Split]
    source: str  # "imagefolder" or "csv"
    ignored_files: int = 0  # non-image files seen while scanning
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise DataError(f"dataset {self.root} has no '{name}' split (it has: {have})")
        return self.splits[name]


def load_dataset(path: str | os.PathLike[str], *, allow_outside_root: bool = False) -> ImageDataset:
    """Read an ImageFolder tree (``root/<class>/<img>``, optionally under ``train``/``val``/``test``)
    or a CSV manifest (``path,label[,split]``, paths relative to the CSV's folder).

    A tree without split folders becomes a single ``train`` split. A CSV path that resolves outside the
    CSV's folder (``../x.jpg``, an absolute path elsewhere, a symlink out) is refused unless
    ``allow_outside_root``: a manifest from someone else must not make featx read arbitrary files.
    No single bad path raises: it becomes a position whose decode reports why it failed.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"dataset not found: {p}")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DataError(f"dataset must be a folder or a .csv manifest, got file {p}")
        return _load_csv(p, allow_outside_root=allow_outside_root)
    return _load_imagefolder(p)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _walk_images(top: str, notes: list[str]) -> tuple[list[str], int]:
    """Image paths under ``top`` (recursive, symlinks followed, each real folder once) and the number of
    non-image files. Nothing is opened: dangling symlinks, FIFOs and folders named like images are listed
    and fail later with a reason. Folders that cannot be listed are noted, not fatal."""
    files: list[str] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()

    def unlistable(err: OSError) -> None:
        notes.append(f"could not list {printable_path(err.filename or top)}: {err.strerror or err}")

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=unlistable):
        try:
            st = os.stat(dirpath)
            ident = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        if ident is not None:
            if ident in seen:  # a symlink loop or a second link to the same folder: its files are listed once
                dirnames[:] = []
                continue
            seen.add(ident)
        subdirs: list[str] = []
        named_like_images: list[str] = []
        for d in dirnames:
            if d.startswith("."):
                continue
            (named_like_images if _is_image(d) else subdirs).append(d)
        dirnames[:] = sorted(subdirs)
        for fn in sorted([*filenames, *named_like_images]):
            if _is_image(fn):
                files.append(os.path.join(dirpath, fn))
            elif not fn.startswith("."):
                ignored += 1
    return files, ignored


def _scan_class_folders(split_dir: Path, notes: list[str]) -> tuple[dict[str, list[str]], int]:
    """Map class name -> sorted image paths under ``split_dir/<class>``."""
    classes: dict[str, list[str]] = {}
    ignored = 0
    try:
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {printable_path(split_dir)}: {exc.strerror or exc}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            ignored += 1
            continue
        try:
            os.listdir(entry.path)
        except OSError as exc:
            raise DataError(f"cannot list class folder {printable_path(entry.path)}: {exc.strerror or exc}") from None
        files, n_ignored = _walk_images(entry.path, notes)
        ignored += n_ignored
        classes[entry.name] = files
    return classes, ignored


def _load_imagefolder(root: Path) -> ImageDataset:
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if not split_dirs:
        split_dirs = {"train": root}
    elif "train" not in split_dirs:
        raise DataError(f"{root} has {', '.join(split_dirs)} folders but no 'train' folder")
    scanned: dict[str, dict[str, list[str]]] = {}
    ignored = 0
    notes: list[str] = []
    for name, d in split_dirs.items():
        by_class, n_ignored = _scan_class_folders(d, notes)
        ignored += n_ignored
        if not by_class:
            raise DataError(f"no class folders in {d} (expected {d}/<class>/<image>)")
        empty = [printable_path(c) for c, files in by_class.items() if not files]
        if empty:
            raise DataError(f"class folder(s) with no images in {d}: {', '.join(empty[:5])}")
        scanned[name] = by_class
    classes = tuple(sorted(scanned["train"]))
    splits: dict[str, Split] = {}
    for name, by_class in scanned.items():
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"split '{name}' has classes not in train: {', '.join(printable_path(u) for u in unknown[:5])}")
        paths: list[str] = []
        labels: list[int] = []
        for ci, c in enumerate(classes):
            for f in by_class.get(c, []):
                paths.append(Path(os.path.relpath(f, root)).as_posix())
                labels.append(ci)
        splits[name] = Split(name, root, tuple(paths), np.asarray(labels, dtype=np.int64), classes)
    return ImageDataset(root, root.name, classes, splits, "imagefolder", ignored, notes)


def _read_csv_rows(csv_path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with lower-cased keys) for each data row. The file must be UTF-8 (a BOM is
    fine); anything else is a one-line error that says how to fix it."""
    try:
        data = csv_path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {printable_path(csv_path)}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"CSV {printable_path(csv_path)} is not UTF-8 (line {line}): save it as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        missing = [c for c in required if c not in fields]
        if missing:
            need = " and ".join(f"'{c}'" for c in required)
            raise DataError(f"{csv_path}: header must contain {need} (got {fields or 'nothing'})")
        for r in reader:
            row = {k.strip().lower(): (v if isinstance(v, str) else "").strip() for k, v in r.items() if k}
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise DataError(f"{csv_path}:{reader.line_num}: not a valid CSV row: {exc}") from None
    return rows


def _outside_root(root_real: str, path: str) -> bool:
    """Whether ``path`` (already joined to the CSV's folder) resolves, symlinks included, outside ``root_real``."""
    try:
        target = os.path.realpath(path)
    except (OSError, ValueError):
        return True
    return os.path.commonpath([root_real, target]) != root_real


def _confine(csv_path: Path, outside: list[tuple[int, str]]) -> None:
    if outside:
        line, rel = outside[0]
        raise DataError(
            f"{csv_path}: {len(outside)} path(s) resolve outside the CSV's folder {csv_path.parent}, e.g. line {line} "
            f"'{printable_path(rel)}'; refusing to read them (--allow-outside-root, or allow_outside_root=True, permits it)"
        )


def _load_csv(csv_path: Path, *, allow_outside_root: bool = False) -> ImageDataset:
    root = csv_path.parent
    root_real = os.path.realpath(root)
    rows = _read_csv_rows(csv_path, ("path", "label"))
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    per_split: dict[str, list[tuple[str, str]]] = {}
    outside: list[tuple[int, str]] = []
    absent = 0
    ignored = 0
    for line, r in rows:
        rel, label, split = r.get("path", ""), r.get("label", ""), r.get("split", "") or "train"
        if not rel or not label:
            raise DataError(f"{csv_path}:{line}: empty path or label")
        if split not in SPLIT_NAMES:
            raise DataError(f"{csv_path}:{line}: split must be one of {', '.join(SPLIT_NAMES)}, got '{split}'")
        if not _is_image(Path(rel).name):
            ignored += 1
            continue
        full = os.path.join(root, rel)
        if not allow_outside_root and _outside_root(root_real, full):
            outside.append((line, rel))
            continue
        rel = Path(rel).as_posix()
        try:
            exists = os.path.lexists(full)
        except ValueError:  # a NUL byte: it cannot exist
            exists = False
        if not exists:
            rel, absent = AbsentPath(rel), absent + 1
        per_split.setdefault(split, []).append((rel, label))
    _confine(csv_path, outside)
    if "train" not in per_split:
        raise DataError(f"{csv_path}: no images in the 'train' split")
    classes = tuple(sorted({lab for _, lab in per_split["train"]}))
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, Split] = {}
    for name in SPLIT_NAMES:
        if name not in per_split:
            continue
        unknown = sorted({lab for _, lab in per_split[name]} - set(classes))
        if unknown:
            raise DataError(f"{csv_path}: split '{name}' has labels not in train: {', '.join(unknown[:5])}")
        items = per_split[name]
        splits[name] = Split(name, root, tuple(p for p, _ in items), np.asarray([index[lab] for _, lab in items]), classes)
    notes = [f"{absent} listed file(s) not found; they are recorded as failures"] if absent else []
    return ImageDataset(root, csv_path.stem, classes, splits, "csv", ignored, notes)


def plain_file_problem(p: Path) -> str | None:
    """The proof every featx delete starts with: None for a regular file (never a symbolic link, folder, FIFO,
    ...); else what it is."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return "it does not exist"
    except OSError as exc:
        return f"it cannot be examined: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "it is a folder"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    return None


def keyed_file_problem(
    p: Path, key: str | None, name_help: str, read_key: Callable[[Path], tuple[str | None, str]], holds: str
) -> str | None:
    """The proof that ``p`` is the featx file its name says: ``key`` is the key its name carries (None: not a featx
    name, ``name_help`` says the pattern), then a regular file, then ``read_key(p)`` finds that same key inside
    (``holds`` names what it holds: "the cache", "the export"). None when proven, else why not."""
    if key is None:
        return f"not a featx {name_help}"
    why = plain_file_problem(p)
    if why:
        return why
    stored, why = read_key(p)
    if stored is None:
        return why
    if stored != key:
        return f"it holds {holds} of key {stored}, not the {key} of its name: copied or renamed"
    return None


def is_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, symlinks resolved on both sides (the part of ``path`` that
    does not exist yet is taken as written). Also true when an existing ancestor of ``path`` *is* ``folder``
    under another name (a bind mount, a case-insensitive file system)."""
    target = os.path.realpath(os.path.expanduser(os.fspath(path)))
    top = os.path.realpath(os.path.expanduser(os.fspath(folder)))
    if os.path.commonpath([target, top]) == top:
        return True
    try:
        top_stat = os.stat(top)
    except (OSError, ValueError):
        return False
    probe = target
    while True:
        try:
            if os.path.samestat(os.stat(probe), top_stat):
                return True
        except (OSError, ValueError):
            pass
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent


def refuse_unusable_folder(path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`UsageError` when ``path``, a folder featx is about to write into (``what``: the option that
    named it), cannot be one: it, or the nearest part of it that exists, is a file, or that part is not writable.
    Checked up front, so a run does not do its work and then fail on its first write; nothing is created."""
    p = Path(path).expanduser()
    probe = p
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    label = "cache folder" if what == "--cache-dir" else f"{what} folder"
    if not probe.is_dir():
        where = "not a directory" if probe == p else f"{printable_path(probe)} is not a directory"
        raise UsageError(f"cannot use {label} {printable_path(p)}: {where}; choose a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot use {label} {printable_path(p)}: Permission denied ({printable_path(probe)} is not writable)")


def refuse_inside_dataset(path: str | os.PathLike[str], dataset: str | os.PathLike[str] | ImageDataset, what: str) -> None:
    """Raise :class:`UsageError` when ``path``, a folder featx is about to write into (``what``: the option that
    named it, e.g. ``"--cache-dir"``), cannot be a folder (:func:`refuse_unusable_folder`), or is an ImageFolder
    dataset's folder or lies inside it: a scan counts every new image file there as a training image, and a new
    sub-folder of a split becomes a class (an empty one breaks every later run). ``dataset`` is an
    :class:`ImageDataset` or a path as given to :func:`load_dataset`. A CSV manifest names its files, so writing
    beside them changes nothing: never refused. Call it before anything is created."""
    refuse_unusable_folder(path, what)
    if isinstance(dataset, ImageDataset):
        if dataset.source != "imagefolder":
            return
        root: str | os.PathLike[str] = dataset.root
    else:
        root = Path(dataset).expanduser()
        if not root.is_dir():  # a CSV manifest (or nothing: load_dataset says so)
            return
    if is_within(path, root):
        raise UsageError(
            f"{what} {printable_path(path)} is inside the dataset {printable_path(root)}: featx would write into the "
            "folder it reads images and classes from; choose a folder outside the dataset"
        )


def list_images(inputs: Sequence[str | os.PathLike[str]], *, allow_outside_root: bool = False) -> tuple[Path, list[str], int]:
    """Unlabelled images for prediction: files, folders (searched recursively) or a CSV with a ``path``
    column. Returns a common root, paths relative to it, and the number of non-image files ignored.

    An input named on the command line must exist; what a folder or CSV lists is never checked here
    (a bad entry fails at decode with a reason). CSV paths outside the CSV's folder are refused unless
    ``allow_outside_root``.
    """
    files: list[str] = []  # absolute, normalised, symlinks not followed (a dangling one stays recognisable)
    absent: set[str] = set()
    ignored = 0
    for item in inputs:
        p = Path(item).expanduser()
        if not os.path.lexists(p):
            raise DataError(f"not found: {p}")
        if p.is_file() and p.suffix.lower() == ".csv":
            base = os.path.abspath(p.parent)
            base_real = os.path.realpath(base)
            outside: list[tuple[int, str]] = []
            for line, r in _read_csv_rows(p, ("path",)):
                rel = r.get("path", "")
                if not rel:
                    raise DataError(f"{p}:{line}: empty path")
                full = os.path.normpath(os.path.join(base, rel))
                if not allow_outside_root and _outside_root(base_real, full):
                    outside.append((line, rel))
                    continue
                try:
                    exists = os.path.lexists(full)
                except ValueError:
                    exists = False
                if not exists:
                    absent.add(full)
                files.append(full)
            _confine(p, outside)
        elif p.is_dir():
            found, n_ignored = _walk_images(str(p), [])
            files.extend(os.path.abspath(f) for f in found)
            ignored += n_ignored
        elif _is_image(p.name):  # a file, or something that fails at decode with its reason
            files.append(os.path.abspath(p))
        else:
            ignored += 1
    if not files:
        raise DataError("no images found in " + ", ".join(str(i) for i in inputs))
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    rel = [Path(os.path.relpath(f, root)).as_posix() for f in files]
    return Path(root), [AbsentPath(r) if f in absent else r for r, f in zip(rel, files)], ignored


# --------------------------------------------------------------------------------------------------
# Decoding


class _Failure(Exception):
    """Internal: reading an image failed; ``str(exc)`` is the reason (starts with a FAILURE_PREFIXES entry)."""


def max_image_pixels() -> int:
    """The decode limit in pixels: ``FEATX_MAX_IMAGE_PIXELS`` when set to a positive integer below
    MAX_IMAGE_PIXELS (it can only lower the limit: Pillow refuses larger images anyway), else MAX_IMAGE_PIXELS."""
    raw = os.environ.get("FEATX_MAX_IMAGE_PIXELS", "")
    try:
        value = int(raw)
    except ValueError:
        return MAX_IMAGE_PIXELS
    return min(value, MAX_IMAGE_PIXELS) if value > 0 else MAX_IMAGE_PIXELS


_KIND_NAMES = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _os_failure(exc: OSError | ValueError, path: str, absent_at_scan: bool) -> _Failure:
    """The reason for an ``open``/``read`` that failed at the operating-system level."""
    if isinstance(exc, ValueError):  # "embedded null byte"
        return _Failure("not a file: the path contains a NUL byte")
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            try:
                target = printable_path(os.readlink(path))
            except OSError:
                target = "?"
            return _Failure(f"missing: dangling symlink to {target}")
        if absent_at_scan:
            return _Failure("missing: no such file (it was not there when the dataset was scanned either)")
        return _Failure("vanished: no such file any more (deleted or moved after the scan)")
    if code in (errno.EACCES, errno.EPERM):
        return _Failure("permission denied: cannot open it for reading (check the file's and its folders' permissions)")
    if code == errno.ELOOP:
        return _Failure("not a file: a symlink loop")
    if code == errno.EISDIR:
        return _Failure("not a file: a folder")
    if code == errno.ENXIO:
        return _Failure("not a file: a socket or device without a reader")
    if code == errno.ENAMETOOLONG:
        return _Failure("not a file: the name is too long for the file system")
    if code == errno.ESTALE:
        return _Failure(f"vanished: {exc.strerror or 'stale file handle'}")
    return _Failure(f"i/o error: {exc.strerror or _describe(exc)} (errno {errno.errorcode.get(code or 0, code)})")


def _read_file(path: str, absent_at_scan: bool = False) -> bytes:
    """The file's bytes, or a _Failure. Opened non-blocking and checked with ``fstat`` before any read,
    so a FIFO or device named like an image never blocks, and a file swapped after the check is harmless."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as exc:
        raise _os_failure(exc, path, absent_at_scan) from None
    try:
        try:
            st = os.fstat(fd)
            kind = stat.S_IFMT(st.st_mode)
            if kind != stat.S_IFREG:
                raise _Failure(f"not a file: {_KIND_NAMES.get(kind, 'not a regular file')}")
            if st.st_size > MAX_FILE_BYTES:
                raise _Failure(f"too large: the file has {st.st_size:,} bytes (featx reads at most {MAX_FILE_BYTES:,})")
            chunks: list[bytes] = []
            total = 0
            want = max(st.st_size, 1 << 16) + 1
            while True:
                block = os.read(fd, want)
                if not block:
                    break
                chunks.append(block)
                total += len(block)
                if total > MAX_FILE_BYTES:
                    raise _Failure(f"too large: the file has more than {MAX_FILE_BYTES:,} bytes")
                want = 1 << 20
            return b"".join(chunks)
        except OSError as exc:
            raise _os_failure(exc, path, absent_at_scan) from None
    finally:
        os.close(fd)


def _decode(data: bytes, draft_size: int | None) -> Any:
    from PIL import Image, ImageOps

    if not data:
        raise _Failure("decode error: the file is empty (0 bytes)")
    limit = max_image_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's per-file warnings (bomb threshold, odd EXIF, palettes) are noise here
        try:
            im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise _Failure(f"too large: {exc}") from None
        except Image.UnidentifiedImageError:  # its message holds a memory address; reasons must be reproducible
            raise _Failure(f"decode error: not a {', '.join(DECODE_FORMATS)} image") from None
        width, height = im.size
        if width * height > limit:
            raise _Failure(f"too large: {width}x{height} pixels (featx decodes at most {limit:,} pixels)")
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            ratio = f"more than {MAX_ASPECT_RATIO}:1"
            raise _Failure(f"too large: {width}x{height} pixels is {ratio} (resizing its short side would need gigabytes)")
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        try:
            im.load()
        except Image.DecompressionBombError as exc:
            raise _Failure(f"too large: {exc}") from None
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # corrupt EXIF: the pixels are fine, keep them as stored
            pass
        return to_rgb(im)


def read_image(path: str | os.PathLike[str], draft_size: int | None = None, *, absent_at_scan: bool = False) -> tuple[Any, str]:
    """``(RGB PIL image, "")``, or ``(None, reason)`` when ``path`` cannot become an image. Never raises
    (short of KeyboardInterrupt): hostile bytes, odd files and vanished paths all become a reason."""
    p = os.fspath(path)
    try:
        return _decode(_read_file(p, absent_at_scan), draft_size), ""
    except _Failure as f:
        reason = str(f)
    except MemoryError:
        reason = "too large: out of memory while decoding"
    except Exception as exc:  # any decoder error on hostile bytes is a decode error
        reason = f"decode error: {_describe(exc)}"
    return None, printable_path(" ".join(reason.split()))


def load_image(path: str | os.PathLike[str], draft_size: int | None = None) -> Any:
    """Open an image as 8-bit RGB: EXIF orientation applied, transparency composited on white,
    16-bit / float / CMYK / palette / grayscale converted. ``draft_size`` lets JPEG decode at a
    reduced scale when the image is much larger than needed (never below ``draft_size``).

    Raises :class:`DataError` ("<path>: <reason>") when it cannot; :func:`read_image` returns the reason instead.
    """
    image, reason = read_image(path, draft_size)
    if image is None:
        raise DataError(f"{printable_path(path)}: {reason}")
    return image


def to_rgb(im: Any) -> Any:
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        elif im.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


class ImageFiles:
    """Map-style dataset over image files, for a ``DataLoader``.

    Items are ``(image, label, index, error)``: a file that cannot be decoded yields a zero image of
    the right shape and a non-empty ``error`` string (a reason from :data:`FAILURE_PREFIXES`) instead of
    raising, so one bad file never stops a batched run; the caller records it. ``transform`` maps a PIL
    image to a tensor; if it fails on an image, that is a decode error too.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray | None,
        transform: Callable[[Any], Any],
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        draft_size: int | None = None,
        failed_shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = np.full(len(self.paths), -1, np.int64) if labels is None else np.asarray(labels)
        self.indices = np.arange(len(self.paths)) if indices is None else np.asarray(indices)
        self.transform = transform
        self.draft_size = draft_size
        self.failed_shape = failed_shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int, int, str]:
        rel = self.paths[i]
        image, error = read_image(self.root / rel, self.draft_size, absent_at_scan=isinstance(rel, AbsentPath))
        if image is not None:
            try:
                image = self.transform(image)
            except MemoryError:
                error = "too large: out of memory while preprocessing"
            except Exception as exc:  # a transform that chokes on one image must not stop the run
                error = printable_path(f"decode error: {_describe(exc)}")
        if error:
            import torch

            image = torch.zeros(self.failed_shape or (3, 1, 1))
        return image, int(self.labels[i]), int(self.indices[i]), error


# --------------------------------------------------------------------------------------------------
# Splitting and sampling (deterministic, seeded; used identically by heads and fine-tuning)


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (kept, held_out) with ``fraction`` of each class held out.

    Every class keeps at least one row; a class with a single row is never held out.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_held = min(int(round(len(rows) * fraction)), len(rows) - 1)
        if n_held > 0:
            held.append(rng.permutation(rows)[:n_held])
    held_idx = np.sort(np.concatenate(held)) if held else np.empty(0, np.int64)
    kept_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    return kept_idx, held_idx


def sample_per_class(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Indices of ``k`` random rows per class (all rows of a class that has fewer), sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _recorded_position(value: Any) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"not a dataset position: {value!r}")


@dataclass(frozen=True)
class RowSelection:
    """Which images one part of a plan uses (its train, val or test rows): the dataset split that ``positions``
    index (``train`` for rows carved out of it) and the positions, in order.

    Heads and fine-tuning select with it alike, one way each: ``FeatureSet.select`` (a cache in memory; images that
    failed to decode have no row there), ``CacheReader.rows_of`` (a streamed cache's file rows) and :meth:`split_of`
    (the images themselves). On disk it keeps two forms, both read back by :meth:`from_record`: bench rows record
    bare positions (``train_positions``...), fine-tuning results ``[split, position]`` pairs (``train_rows``...,
    :meth:`pairs`).
    """

    split: str
    positions: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def array(self) -> np.ndarray:
        """The positions as an int64 array."""
        return np.asarray(self.positions, dtype=np.int64)

    def take(self, rows: Sequence[int] | np.ndarray) -> RowSelection:
        """The selection's own rows ``rows`` (indices into it, in that order)."""
        return RowSelection(self.split, self.array[np.asarray(rows, dtype=np.int64)])

    def pairs(self) -> list[list[Any]]:
        """Fine-tuning's recorded form: ``[[split, position], ...]``."""
        return [[self.split, p] for p in self.positions]

    def split_of(self, dataset: ImageDataset, name: str | None = None) -> Split:
        """These images of ``dataset`` as a :class:`Split` (named ``name``, default the source split's name)."""
        return dataset.split(self.split).subset(self.array, name=name)

    @classmethod
    def from_record(cls, value: Any, split: str) -> RowSelection | None:
        """Read recorded rows: bare positions (of ``split``) or ``[split, position]`` pairs of one split; None stays
        None. Raises ValueError for anything else (pairs naming two splits, a position that is not an integer)."""
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            raise ValueError(f"recorded rows must be a list, got {type(value).__name__}")
        pairs = [v for v in value if isinstance(v, (list, tuple))]
        if not pairs:
            return cls(split, tuple(_recorded_position(v) for v in value))
        names = {v[0] if len(v) == 2 and isinstance(v[0], str) else None for v in pairs}
        if len(pairs) != len(value) or len(names) != 1 or None in names:
            raise ValueError("recorded rows must be bare positions or [split, position] pairs of one split")
        return cls(names.pop(), tuple(_recorded_position(v[1]) for v in pairs))


# Which rows the final fit uses, once the choice is made: train + val (Kornblith et al. 2019), or train alone (the
# model val chose). Heads, fine-tuning and the bench all take one of these.
FINAL_FITS = ("train+val", "train")


@dataclass(frozen=True)
class SplitPlan:
    """How train/val/test rows are chosen; heads and fine-tuning use the same plan so results compare
    row by row. Missing val (or test) splits are carved from train, stratified and seeded. The plan also owns
    the bench's train cap (:meth:`cap`) and few-shot draws (:meth:`fewshot`), both seeded by its seed; either
    gives ``train_rows`` (indices into the plan's train rows), which :meth:`resolve` turns into the rows used."""

    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0

    def carve(self, train_labels: np.ndarray, *, has_val: bool, has_test: bool) -> dict[str, np.ndarray]:
        """Row indices into the train split for ``train`` and for each split carved out of it."""
        rows = np.arange(len(train_labels))
        out: dict[str, np.ndarray] = {}
        if not has_test:
            keep, held = stratified_split(train_labels, self.test_fraction, self.seed + 1)
            out["test"], rows = held, keep
        if not has_val:
            keep, held = stratified_split(np.asarray(train_labels)[rows], self.val_fraction, self.seed)
            out["val"], rows = rows[held], rows[keep]
        out["train"] = rows
        return out

    def resolve(self, dataset: ImageDataset, train_rows: Sequence[int] | np.ndarray | None = None) -> dict[str, RowSelection]:
        """The rows of ``train``/``val``/``test``. ``train_rows`` (indices into the plan's train rows: a cap, a
        few-shot draw) narrows train; val and test stay whole."""
        carved = self.carve(dataset.split("train").labels, has_val="val" in dataset.splits, has_test="test" in dataset.splits)
        plan = {name: RowSelection("train", rows) for name, rows in carved.items()}
        for name in ("val", "test"):
            if name in dataset.splits:
                plan[name] = RowSelection(name, range(len(dataset.splits[name])))
        if train_rows is not None:
            n = len(plan["train"])
            pos = np.asarray(train_rows)
            if pos.ndim != 1 or pos.size == 0 or not np.issubdtype(pos.dtype, np.integer) or pos.min() < 0 or pos.max() >= n:
                raise UsageError(
                    f"train_rows must be a non-empty list of positions in [0, {n}) "
                    f"into the plan's train rows (got {pos.size} values)"
                )
            plan["train"] = plan["train"].take(pos)
        return plan

    def _train_labels(self, dataset: ImageDataset) -> np.ndarray:
        train = self.resolve(dataset)["train"]
        return dataset.split(train.split).labels[train.array]

    def cap(self, dataset: ImageDataset, per_class: int | None) -> np.ndarray | None:
        """``train_rows`` keeping at most ``per_class`` images of each class of the plan's train rows (the bench's
        train cap, seeded by the plan's seed); None (every row) without a cap."""
        if not per_class:
            return None
        return sample_per_class(self._train_labels(dataset), per_class, seed=self.seed)

    def draw_seed(self, shots: int, draw: int) -> int:
        """The seed of few-shot draw ``draw`` of ``shots`` images per class (also the seed of the heads' CV in it)."""
        return 1_000_000 * self.seed + 1000 * draw + shots

    def fewshot(self, dataset: ImageDataset, shots: int, draw: int) -> np.ndarray:
        """``train_rows`` of few-shot draw ``draw``: exactly ``shots`` images per class from the plan's (uncapped)
        train rows. Heads and fine-tuning ask with the same arguments, so they get the same images."""
        labels = self._train_labels(dataset)
        counts = np.bincount(labels, minlength=len(dataset.classes))
        if counts.min() < shots:
            raise UsageError(
                f"{shots}-shot draws need {shots} training images in every class; the smallest class has {counts.min()}"
            )
        return sample_per_class(labels, shots, seed=self.draw_seed(shots, draw))

    def describe(self, dataset: ImageDataset) -> dict[str, str]:
        out = {}
        for name, rows in self.resolve(dataset).items():
            carved = "" if rows.split == name else f" (carved from {rows.split}, seed {self.seed})"
            out[name] = f"{len(rows)} images{carved}"
        return out
