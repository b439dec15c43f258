"""Fingerprints: a finished cell is reused only while everything that determines its numbers is unchanged (the
settings its kind reads, the dataset's content, the embedder, featx's version and source, the library versions)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Any

from featx import __version__
from featx.bench.config import BenchConfig
from featx.bench.context import CellContext

log = logging.getLogger(__name__)


#: Libraries whose versions can change a cell's numbers (solvers, kernels, decoders, the HDF5 round trip).
FINGERPRINT_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "h5py", "pillow")

_COMMON_KEYS = ("backbone", "image_size", "device", "seed", "val_fraction", "test_fraction")
_ROW_KEYS = ("train_rows", "sources", "positions")  # the capped train rows and every split's positions
#: The settings (CellContext fields, read by :meth:`CellContext.setting`) that determine each kind of cell; the
#: dataset's content, the embedder, featx's code and the library versions count for every cell besides. Left out on
#: purpose: where things live (the dataset's path: its content counts instead; the weights' path: the embedder part
#: holds their sha256; cache_dir: a cache hit holds the same features; run_dir), how the run is watched (progress,
#: log_level), the cell's name, and settings a kind never reads (few-shot cells draw from the uncapped train rows, so
#: the cap is not theirs; heads' cells never read fine-tuning settings, nor the reverse).
_RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "features": (*_COMMON_KEYS, *_ROW_KEYS, "heads", "final_fit"),
    "finetune": (*_COMMON_KEYS, *_ROW_KEYS, "finetune", "strategy", "grid", "final_fit"),
    "fewshot_heads": (*_COMMON_KEYS, "heads", "fewshot"),
    "fewshot_finetune": (*_COMMON_KEYS, "finetune", "strategy", "shots", "draw"),
    "layerwise": (*_COMMON_KEYS, *_ROW_KEYS, "final_fit"),
}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def featx_source_sha256() -> str:
    """sha256 over featx's own ``*.py`` files as installed (each file's relative path and bytes, in path order)."""
    root = Path(__file__).resolve().parents[1]  # featx/
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel, data = f.relative_to(root).as_posix().encode(), f.read_bytes()
        h.update(b"%d:%s %d:" % (len(rel), rel, len(data)))
        h.update(data)
    return h.hexdigest()


def code_identity() -> dict[str, str]:
    """featx's version and a hash of its source: what ``results["meta"]["code"]`` and every cell record."""
    return {"featx_version": __version__, "source_sha256": featx_source_sha256()}


def fingerprint_libraries() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in FINGERPRINT_LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def stale_parts(old: Any, new: dict[str, Any]) -> list[str]:
    """Names of the fingerprint parts that differ (``["no fingerprint"]`` for a cell written before fingerprints)."""
    if not isinstance(old, dict) or not isinstance(old.get("parts"), dict):
        return ["no fingerprint"]
    if old.get("sha256") == new["sha256"]:
        return []
    a, b = old["parts"], new["parts"]
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["fingerprint"]


class Fingerprints:
    """Computes each cell's fingerprint; the costly parts (a stat of every image, the weights' sha256) once per
    dataset / embedder and run."""

    def __init__(self, config: BenchConfig) -> None:
        self.code = code_identity()
        self.libraries = fingerprint_libraries()
        self.device = _resolved_device(config.device)
        self._embedders: dict[tuple[Any, ...], str] = {}

    @staticmethod
    def dataset(ds: Any) -> str:
        """The dataset's content: classes and, per split, featx's content fingerprint (relative paths, labels, size
        and modification time of every file: the same one the feature caches are keyed by)."""
        splits = {name: split.fingerprint() for name, split in sorted(ds.splits.items())}
        return _digest({"source": ds.source, "classes": list(ds.classes), "splits": splits})

    def embedder(self, backbone: str, weights: str, image_size: int | None) -> str:
        key = (backbone, weights, image_size)
        if key not in self._embedders:
            from featx.backbones import resolve_embedder
            from featx.errors import FeatxError

            try:
                identity: dict[str, Any] = resolve_embedder(backbone, weights, image_size=image_size).identity()
            except FeatxError as exc:  # the cells fail with the same error, and say so
                identity = {"error": str(exc)}
            self._embedders[key] = _digest(identity)
        return self._embedders[key]

    def cell(self, kind: str, ctx: CellContext, dataset: str) -> dict[str, Any]:
        values = {k: ctx.setting(k) for k in _RESULT_KEYS[kind]}
        values["device"] = self.device
        if "finetune" in values:
            values["finetune"] = finetune_identity(ctx.finetune, ctx.strategy)
        parts = {f"config.{k}": _digest(v) for k, v in values.items()}
        parts["dataset"] = dataset
        parts["embedder"] = self.embedder(ctx.backbone, ctx.weights, ctx.image_size)
        parts["code"] = _digest(self.code)
        parts["libraries"] = _digest(self.libraries)
        return {"sha256": _digest(parts), "parts": parts, "code": self.code, "libraries": self.libraries}


def finetune_identity(finetune: dict[str, Any], strategy: str | None) -> dict[str, Any]:
    """The fine-tuning settings with every default filled in: writing a default out changes nothing."""
    from featx.finetuning import FinetuneConfig

    d = FinetuneConfig(**{**finetune, "strategy": strategy or "full"}).to_dict()
    return {k: v for k, v in d.items() if k not in ("strategy", "device", "seed")}  # separate parts of the fingerprint


def _resolved_device(device: str) -> str:
    from featx.errors import FeatxError
    from featx.runtime import resolve_device

    try:
        d = resolve_device(device)
    except FeatxError:  # cuda asked for, none present: the cells fail and say so
        return device
    if d.type == "cuda":
        import torch

        return f"{d} ({torch.cuda.get_device_name(d)})"
    return str(d)


_RUN_MARK = ".featx-cell.json"


def prepare_run_dir(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """A cell's run folder holds its checkpoints; the cell resumes them only when they are its own (same
    fingerprint). Checkpoints of another configuration, or of a folder without the mark, are cleared first."""
    mark = run_dir / _RUN_MARK
    if run_dir.exists():
        try:
            same = json.loads(mark.read_text()).get("sha256") == fingerprint["sha256"]
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            log.info("clearing %s: its checkpoints are from another configuration", run_dir)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"sha256": fingerprint["sha256"]}))
