"""The bench's typed seams (issue 22): a cell's input (CellContext) crosses to its process, its settings hash to the
same fingerprints as before it was typed, and a cell file that is not its kind's record runs again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

import featx.reporting
from featx.bench import CellContext, CellRows, load_bench_config, run_bench
from featx.bench.cells import CELL_RECORDS, FeaturesCell, FinetuneCell
from featx.bench.fingerprint import Fingerprints
from featx.bench.processes import CellProcesses
from featx.bench.runner import _read_cell
from featx.data import SAMPLE_DATASET, SplitPlan, load_dataset
from featx.records import ResultRow

# sha256 over [kind, config.* parts but config.device] of the 8 cells of `featx bench --quick`, in run order, computed
# with the untyped ctx dicts before issue 22 (featx/bench.py at 9ba0bf6): every committed cell keeps matching
QUICK_CONFIG_PARTS = "84fa3ad635f45088e533a4e5415dbc397ec8136eb83784744c44e32500d9f8ad"
QUICK_KINDS = [
    "features",
    "finetune",
    "finetune",
    "fewshot_heads",
    "fewshot_finetune",
    "fewshot_finetune",
    "fewshot_finetune",
    "layerwise",
]


def _context() -> CellContext:
    ds = load_dataset(SAMPLE_DATASET)
    return CellContext(
        cell_id="x",
        dataset=str(SAMPLE_DATASET),
        backbone="timm:resnet10t",
        weights="none",
        image_size=32,
        device="cpu",
        seed=0,
        val_fraction=0.2,
        test_fraction=0.2,
        heads=("logreg",),
        finetune={"epochs": 1},
        final_fit="train+val",
        rows=CellRows.of(ds, SplitPlan(), 5),
    )


def test_cell_context_pickles_and_reads_settings_as_plain_json() -> None:
    ctx = dataclasses.replace(_context(), strategy="head", grid={"lr": [0.01]})
    again = pickle.loads(pickle.dumps(ctx))
    assert again == ctx and again.rows.selections["train"] == ctx.rows.selections["train"]
    assert ctx.setting("heads") == ["logreg"] and ctx.setting("train_rows") == list(ctx.rows.train_rows or ())
    assert json.loads(json.dumps(ctx.setting("positions"))) == ctx.setting("positions")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.seed = 1  # type: ignore[misc]


def test_quick_fingerprints_are_those_of_the_untyped_ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    cell = Fingerprints.cell

    def record(self: Fingerprints, kind: str, ctx: CellContext, dataset: str) -> dict[str, Any]:
        fp = cell(self, kind, ctx, dataset)
        seen.append((kind, fp))
        return fp

    def refuse(*_: Any, **__: Any) -> Any:
        raise RuntimeError("fingerprints only")

    monkeypatch.setattr(Fingerprints, "cell", record)
    monkeypatch.setattr(CellProcesses, "run", refuse)
    monkeypatch.setattr(featx.reporting, "write_report", lambda results, out: {"report": out / "report.md"})
    outcome = run_bench(load_bench_config(quick=True), out_dir=tmp_path / "out", cache_dir=str(tmp_path / "c"), progress=False)
    assert outcome["failed"] == 8 and [k for k, _ in seen] == QUICK_KINDS
    pins = [[k, {p: v for p, v in fp["parts"].items() if p.startswith("config.") and p != "config.device"}] for k, fp in seen]
    assert hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest() == QUICK_CONFIG_PARTS
    rows = outcome["results"].datasets["clothing10"].rows
    assert [(r.family, r.strategy, r.status) for r in rows] == [
        ("features", "logreg", "failed"),
        ("features", "linear-svm", "failed"),
        ("features", "knn", "failed"),
        ("finetune", "head", "failed"),
        ("finetune", "lp-ft", "failed"),
    ]
    assert rows[0].error == "RuntimeError: fingerprints only"


def test_cell_files_read_as_their_kind_or_run_again(tmp_path: Path) -> None:
    row = ResultRow("finetune", "head", accuracy=0.5)
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(FinetuneCell(row, cell_seconds=1.0, fingerprint={"sha256": "a"}).to_dict()))
    cell = _read_cell(path, "finetune")
    assert isinstance(cell, FinetuneCell) and cell.row == row and cell.fingerprint == {"sha256": "a"}
    assert _read_cell(path, "features") is None  # another kind's file
    path.write_text(json.dumps({"row": {**row.to_dict(), "acuracy": 1}}))
    assert _read_cell(path, "finetune") is None  # a field featx does not know
    path.write_text("{broken")
    assert _read_cell(path, "finetune") is None
    assert set(CELL_RECORDS) == {"features", "finetune", "fewshot_heads", "fewshot_finetune", "layerwise"}
    assert FeaturesCell.from_dict({"rows": [], "extraction": {}, "n_train": 0, "classes": [], "splits": {}}).rows == []
