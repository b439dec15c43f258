"""What a cell is given: :class:`CellContext` (its settings, dataset, rows and own fields), sent to the cell's process.

The settings that determine a cell's numbers are read from here by name (:meth:`CellContext.setting`) for its
fingerprint, in the plain JSON form the fingerprints have always hashed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featx.bench.config import FewShotConfig
from featx.data import RowSelection, SplitPlan

SPLIT_ROLES = ("train", "val", "test")


@dataclass(frozen=True)
class CellRows:
    """The main grid's rows, the same for every cell of a dataset: ``train_rows`` (the plan's cap: indices into its
    train rows, what ``finetune`` takes; None = all) and each role's :class:`RowSelection` (source split, positions)."""

    train_rows: tuple[int, ...] | None
    selections: dict[str, RowSelection]

    @classmethod
    def of(cls, ds: Any, plan: SplitPlan, cap: int | None) -> CellRows:
        train_rows = plan.cap(ds, cap)
        rows = plan.resolve(ds, train_rows)
        return cls(None if train_rows is None else tuple(int(i) for i in train_rows), {n: rows[n] for n in SPLIT_ROLES})

    @property
    def train_rows_list(self) -> list[int] | None:
        return None if self.train_rows is None else list(self.train_rows)

    @property
    def sources(self) -> dict[str, str]:
        """Each role's source split (what ``position_sources`` records)."""
        return {name: self.selections[name].split for name in SPLIT_ROLES}

    @property
    def positions(self) -> dict[str, list[int]]:
        return {name: list(self.selections[name].positions) for name in SPLIT_ROLES}

    def to_dict(self) -> dict[str, Any]:
        """The plain JSON form (part of the cells' fingerprints): ``train_rows``, ``sources``, ``positions``."""
        return {"train_rows": self.train_rows_list, "sources": self.sources, "positions": self.positions}


@dataclass(frozen=True)
class CellContext:
    """One cell's input: the bench settings it reads, its dataset and rows, and its own fields (None where its kind has
    none). Frozen and picklable: it crosses to the cell's process as is."""

    cell_id: str
    dataset: str  # the path the cell loads
    backbone: str
    weights: str
    image_size: int | None
    device: str
    seed: int
    val_fraction: float
    test_fraction: float
    heads: tuple[str, ...]
    finetune: dict[str, Any]  # FinetuneConfig settings (with this dataset's augmentation; few-shot: the rule's steps)
    final_fit: str
    rows: CellRows
    cache_dir: str | None = None
    progress: bool = True
    log_level: int = 20
    # a cell's own fields
    strategy: str | None = None
    grid: dict[str, list[float]] | None = None
    run_dir: str | None = None
    fewshot: FewShotConfig | None = None
    shots: int | None = None
    draw: int | None = None

    @property
    def plan(self) -> SplitPlan:
        return SplitPlan(self.val_fraction, self.test_fraction, self.seed)

    def setting(self, key: str) -> Any:
        """The setting ``key`` as the fingerprint hashes it (plain JSON values: rows as lists, names as lists)."""
        if key in ("train_rows", "sources", "positions"):
            return self.rows.to_dict()[key]
        value = getattr(self, key)
        if key == "heads":
            return list(value)
        if key == "fewshot":
            return None if value is None else {"shots": list(value.shots), "draws": value.draws}
        return value
