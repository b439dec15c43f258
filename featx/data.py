"""Datasets: discover labelled images (ImageFolder trees or CSV manifests), decode them to RGB, split them.

Nothing here imports torch, so that cheap operations (cache look-ups, listing) stay fast. The
:class:`ImageFiles` reader is a plain map-style dataset that a ``torch.utils.data.DataLoader`` accepts.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
SPLIT_NAMES = ("train", "val", "test")
SAMPLE_DATASET = Path(__file__).parent / "sample_data" / "clothing10"


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
        h.update("\x1f".join(self.classes).encode())
        for rel, label in zip(self.paths, self.labels.tolist()):
            st = os.stat(self.root / rel)
            h.update(f"\x1e{rel}\x1f{label}\x1f{st.st_size}\x1f{st.st_mtime_ns}".encode())
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


def load_dataset(path: str | os.PathLike[str]) -> ImageDataset:
    """Read an ImageFolder tree (``root/<class>/<img>``, optionally under ``train``/``val``/``test``)
    or a CSV manifest (``path,label[,split]``, paths relative to the CSV's folder).

    A tree without split folders becomes a single ``train`` split.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"dataset not found: {p}")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DataError(f"dataset must be a folder or a .csv manifest, got file {p}")
        return _load_csv(p)
    return _load_imagefolder(p)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _scan_class_folders(split_dir: Path) -> tuple[dict[str, list[str]], int]:
    """Map class name -> sorted relative image paths (relative to ``split_dir``'s parent's root later)."""
    classes: dict[str, list[str]] = {}
    ignored = 0
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            ignored += 1
            continue
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if _is_image(fn):
                    files.append(os.path.join(dirpath, fn))
                elif not fn.startswith("."):
                    ignored += 1
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
    for name, d in split_dirs.items():
        by_class, n_ignored = _scan_class_folders(d)
        ignored += n_ignored
        if not by_class:
            raise DataError(f"no class folders in {d} (expected {d}/<class>/<image>)")
        empty = [c for c, files in by_class.items() if not files]
        if empty:
            raise DataError(f"class folder(s) with no images in {d}: {', '.join(empty[:5])}")
        scanned[name] = by_class
    classes = tuple(sorted(scanned["train"]))
    splits: dict[str, Split] = {}
    for name, by_class in scanned.items():
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"split '{name}' has classes not in train: {', '.join(unknown[:5])}")
        paths: list[str] = []
        labels: list[int] = []
        for ci, c in enumerate(classes):
            for f in by_class.get(c, []):
                paths.append(Path(os.path.relpath(f, root)).as_posix())
                labels.append(ci)
        splits[name] = Split(name, root, tuple(paths), np.asarray(labels, dtype=np.int64), classes)
    return ImageDataset(root, root.name, classes, splits, "imagefolder", ignored)


def _load_csv(csv_path: Path) -> ImageDataset:
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "path" not in fields or "label" not in fields:
            raise DataError(f"{csv_path}: header must contain 'path' and 'label' (got {fields or 'nothing'})")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    per_split: dict[str, list[tuple[str, str]]] = {}
    missing: list[str] = []
    ignored = 0
    for line, r in enumerate(rows, start=2):
        rel, label, split = r.get("path", ""), r.get("label", ""), r.get("split", "") or "train"
        if not rel or not label:
            raise DataError(f"{csv_path}:{line}: empty path or label")
        if split not in SPLIT_NAMES:
            raise DataError(f"{csv_path}:{line}: split must be one of {', '.join(SPLIT_NAMES)}, got '{split}'")
        if not _is_image(Path(rel).name):
            ignored += 1
            continue
        if not (root / rel).is_file():
            missing.append(rel)
            continue
        per_split.setdefault(split, []).append((Path(rel).as_posix(), label))
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} listed file(s) not found, e.g. {', '.join(missing[:3])}")
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
    return ImageDataset(root, csv_path.stem, classes, splits, "csv", ignored)


def list_images(inputs: Sequence[str | os.PathLike[str]]) -> tuple[Path, list[str], int]:
    """Unlabelled images for prediction: files, folders (searched recursively) or a CSV with a ``path``
    column. Returns a common root, paths relative to it, and the number of non-image files ignored."""
    files: list[Path] = []
    ignored = 0
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise DataError(f"not found: {p}")
        if p.is_file() and p.suffix.lower() == ".csv":
            with open(p, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if "path" not in [f.strip().lower() for f in (reader.fieldnames or [])]:
                    raise DataError(f"{p}: header must contain a 'path' column")
                for r in reader:
                    rel = {k.strip().lower(): v for k, v in r.items() if k}["path"].strip()
                    files.append((p.parent / rel).resolve())
        elif p.is_file():
            if _is_image(p.name):
                files.append(p.resolve())
            else:
                ignored += 1
        else:
            for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if _is_image(fn):
                        files.append(Path(dirpath, fn).resolve())
                    elif not fn.startswith("."):
                        ignored += 1
    if not files:
        raise DataError("no images found in " + ", ".join(str(i) for i in inputs))
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return root, [f.relative_to(root).as_posix() for f in files], ignored


# --------------------------------------------------------------------------------------------------
# Decoding


def load_image(path: str | os.PathLike[str], draft_size: int | None = None) -> Any:
    """Open an image as 8-bit RGB: EXIF orientation applied, transparency composited on white,
    16-bit / float / CMYK / palette / grayscale converted. ``draft_size`` lets JPEG decode at a
    reduced scale when the image is much larger than needed (never below ``draft_size``)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


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
    the right shape and a non-empty ``error`` string instead of raising, so one bad file never stops
    a batched run; the caller records it. ``transform`` maps a PIL image to a tensor.
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
        try:
            image = self.transform(load_image(self.root / self.paths[i], self.draft_size))
            error = ""
        except Exception as exc:
            import torch

            image = torch.zeros(self.failed_shape or (3, 1, 1))
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
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


@dataclass(frozen=True)
class SplitPlan:
    """How train/val/test rows are chosen; heads and fine-tuning use the same plan so results compare
    row by row. Missing val (or test) splits are carved from train, stratified and seeded."""

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

    def resolve(self, dataset: ImageDataset) -> dict[str, tuple[str, np.ndarray]]:
        """Map ``train``/``val``/``test`` to (source split name, row indices into that split)."""
        carved = self.carve(dataset.split("train").labels, has_val="val" in dataset.splits, has_test="test" in dataset.splits)
        plan = {name: ("train", rows) for name, rows in carved.items()}
        for name in ("val", "test"):
            if name in dataset.splits:
                plan[name] = (name, np.arange(len(dataset.splits[name])))
        return plan

    def describe(self, dataset: ImageDataset) -> dict[str, str]:
        out = {}
        for name, (source, rows) in self.resolve(dataset).items():
            carved = "" if source == name else f" (carved from {source}, seed {self.seed})"
            out[name] = f"{len(rows)} images{carved}"
        return out
