"""The bench's records: one typed shape per row, shared by the cells that write them and the report that reads them.

``results.json`` (and every cell file) holds these records as plain JSON. Reading goes through
:meth:`BenchResults.from_dict` / :func:`load_results`, which refuse an unknown key or a newer schema with one line,
so a renamed field fails loudly instead of reading as missing. Fields a row may lack (a failed cell, a result written
before the field existed) are ``None``; a reader tests ``is None`` where the old code had ``.get()`` fallbacks.

Schema versions: 1 = results written before this module (no ``schema`` key; same fields), 2 = this module.
No torch, no numpy: the report imports this.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from featx.errors import UsageError

SCHEMA_VERSION = 2
FEATURES = "features"  # the two families a row belongs to
FINETUNE = "finetune"

R = TypeVar("R", bound="Record")


class Record:
    """from_dict/to_dict for a dataclass whose nested records are named in ``_records`` / ``_lists`` / ``_maps``
    (field -> class)."""

    _records: ClassVar[dict[str, type[Record]]] = {}  # one record
    _lists: ClassVar[dict[str, type[Record]]] = {}  # a list of records
    _maps: ClassVar[dict[str, type[Record]]] = {}  # a name -> record mapping

    @classmethod
    def from_dict(cls: type[R], data: Any, *, where: str = "") -> R:
        if isinstance(data, cls):
            return data
        return _build(cls, data, where or cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Record):
                v = v.to_dict()
            elif isinstance(v, list):
                v = [x.to_dict() if isinstance(x, Record) else x for x in v]
            elif isinstance(v, dict):
                v = {k: x.to_dict() if isinstance(x, Record) else x for k, x in v.items()}
            out[f.name] = v
        return out


def _build(cls: type[R], data: Any, where: str) -> R:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)} (not in featx's {cls.__name__} schema)")
    missing = [f.name for f in fields if f.name not in data and _required(f)]
    if missing:
        raise UsageError(f"{where}: missing field(s) {', '.join(missing)}")
    values = dict(data)
    for name, sub in cls._records.items():
        if name in values:
            values[name] = sub.from_dict(values[name], where=f"{where}.{name}")
    for name, sub in cls._lists.items():
        if name in values:
            if not isinstance(values[name], list):
                raise UsageError(f"{where}.{name}: expected a list, got {type(values[name]).__name__}")
            values[name] = [sub.from_dict(x, where=f"{where}.{name}[{i}]") for i, x in enumerate(values[name])]
    for name, sub in cls._maps.items():
        if name in values:
            if not isinstance(values[name], dict):
                raise UsageError(f"{where}.{name}: expected an object, got {type(values[name]).__name__}")
            values[name] = {k: sub.from_dict(x, where=f"{where}.{name}[{k}]") for k, x in values[name].items()}
    return cls(**values)


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@dataclass
class ResultRow(Record):
    """One method's result on one dataset: a head on the features, or a fine-tuning strategy.

    Fields of one family only are ``None`` on the other's rows. A failed cell has ``status="failed"`` and ``error``.
    Positions are dataset positions of the rows each side saw (train/val/test), in the order scored."""

    family: str
    strategy: str
    status: str | None = None
    error: str | None = None
    # test metrics of the chosen model
    accuracy: float | None = None
    accuracy_ci95: list[float] | None = None
    macro_f1: float | None = None
    macro_recall: float | None = None
    mean_per_class_accuracy: float | None = None
    confusion_matrix: list[list[int]] | None = None
    # selection
    val_accuracy: float | None = None
    val_log_loss: float | None = None
    selection: str | None = None
    hyperparameters: dict[str, Any] | None = None
    final_fit: str | None = None
    n_fit: int | None = None
    n_train: int | None = None
    n_val: int | None = None
    # costs
    build_seconds: float | None = None
    wall_seconds: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str | None = None
    host_rss_mb: float | None = None
    trainable_params: int | None = None
    images_per_s: float | None = None
    # which rows, and what was predicted on test
    train_positions: list[Any] | None = None
    val_positions: list[Any] | None = None
    test_positions: list[Any] | None = None
    test_predictions: list[int] | None = None
    test_labels: list[int] | None = None
    # features family: the sweep and its timing parts
    at_grid_edge: bool | None = None
    sweep: list[dict[str, Any]] | None = None
    scan_seconds: float | None = None
    extract_seconds: float | None = None
    fit_seconds: float | None = None
    # fine-tuning family: the grid, epochs and timing parts
    grid: list[dict[str, Any]] | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    epochs_budget: int | None = None
    still_improving: bool | None = None
    backbone_updated: bool | None = None
    fine_tune_epochs: int | None = None
    augment: list[Any] | None = None
    finetune_call_seconds: float | None = None
    rebuild_seconds: float | None = None
    reported_wall_seconds: float | None = None
    train_seconds: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass
class FewshotPoint(Record):
    """One method on one few-shot draw: ``shots`` labelled images per class (or ``"all"``). ``method`` is a head
    strategy or ``finetune:<strategy>``, so it names the family too (``family`` may be left out)."""

    method: str
    shots: int | str
    draw: int
    family: str | None = None
    accuracy: float | None = None
    selection: str | None = None
    hyperparameters: dict[str, Any] | None = None
    n_fit: int | None = None
    train_positions: list[Any] | None = None
    augment: list[Any] | None = None
    backbone_updated: bool | None = None
    fine_tune_epochs: int | None = None
    status: str | None = None
    error: str | None = None


@dataclass
class LayerPoint(Record):
    """The layer-wise probe on one tapped layer."""

    layer: str
    depth: int | None = None
    dim: int | None = None
    accuracy: float | None = None
    accuracy_ci95: list[float] | None = None
    macro_f1: float | None = None
    val_accuracy: float | None = None
    val_log_loss: float | None = None
    hyperparameters: dict[str, Any] | None = None
    test_positions: list[Any] | None = None
    test_predictions: list[int] | None = None
    test_labels: list[int] | None = None
    status: str | None = None
    error: str | None = None
    # transferability scores of this layer on the probe's train rows (featx.ranking: name -> value, higher is better);
    # None in results written before featx rank (the report then shows the layer section as it did)
    scores: dict[str, float] | None = None


@dataclass
class DatasetResult(Record):
    """Everything the bench measured on one dataset."""

    _lists: ClassVar[dict[str, type[Record]]] = {"rows": ResultRow, "fewshot": FewshotPoint, "layerwise": LayerPoint}

    dataset: str | None = None
    backbone: str | None = None
    image_size: int | None = None
    classes: list[str] | None = None
    splits: dict[str, int] | None = None
    n_fit: int | None = None
    final_fit: str | None = None
    images_per_class_all: float | None = None
    position_sources: dict[str, Any] | None = None
    extraction: dict[str, Any] | None = None
    rows: list[ResultRow] = field(default_factory=list)
    fewshot: list[FewshotPoint] = field(default_factory=list)
    fewshot_skipped: list[str] = field(default_factory=list)
    layerwise: list[LayerPoint] = field(default_factory=list)


@dataclass
class BenchMeta(Record):
    """How and where the results were made."""

    command: str | None = None
    created_at: str | None = None
    featx_version: str | None = None
    machine: str | None = None
    quick: bool | None = None
    protocol: dict[str, Any] | None = None
    budget_notes: list[str] = field(default_factory=list)
    bench_seconds_this_run: float | None = None
    code: dict[str, Any] | None = None
    stale_cells: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BenchResults(Record):
    """``results.json``: the schema version, the run's meta, and one :class:`DatasetResult` per dataset name."""

    _maps: ClassVar[dict[str, type[Record]]] = {"datasets": DatasetResult}

    datasets: dict[str, DatasetResult] = field(default_factory=dict)
    meta: BenchMeta = field(default_factory=BenchMeta)
    schema: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "results") -> BenchResults:  # type: ignore[override]
        if isinstance(data, BenchResults):
            return data
        if not isinstance(data, dict):
            raise UsageError(f"{where}: expected a JSON object with 'datasets' and 'meta', got {type(data).__name__}")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or schema < 1:
            raise UsageError(f"{where}: schema must be a positive integer, got {schema!r}")
        if schema > SCHEMA_VERSION:
            raise UsageError(f"{where}: written by a newer featx (schema {schema}; this featx reads up to {SCHEMA_VERSION})")
        body = {**data, "schema": SCHEMA_VERSION}  # version 1 has the same fields
        body["meta"] = BenchMeta.from_dict(data.get("meta") or {}, where=f"{where}.meta")
        return _build(cls, body, where)


def load_results(path: str | os.PathLike[str]) -> BenchResults:
    """Read a bench's ``results.json`` (any schema up to :data:`SCHEMA_VERSION`)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read bench results {p}: {exc}") from None
    return BenchResults.from_dict(data, where=str(p))
