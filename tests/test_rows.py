"""Which rows: the split plan owns carving, the bench's train cap and few-shot draws, and yields one RowSelection that
heads (in memory and streamed) and fine-tuning select with. The pinned positions below were computed with the code
before the plan owned the cap and draws (bench.plan_positions / fewshot_draw, finetuning._resolve_splits, heads'
split_features, bench._rows_at): every committed bench figure selects the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featx.bench import CellRows
from featx.cache import CacheReader, FeatureSet, base_attrs, write_cache_file
from featx.data import ImageDataset, RowSelection, Split, SplitPlan
from featx.errors import UsageError
from featx.finetuning.run import _resolve_splits
from featx.heads import split_features

CLASSES = ("a", "b", "c")


def _dataset(counts: dict[str, list[int]]) -> ImageDataset:
    """A dataset of labels only (nothing is decoded): ``counts[split]`` images per class, class by class."""
    splits = {}
    for name, per_class in counts.items():
        labels = np.repeat(np.arange(len(CLASSES)), per_class).astype(np.int64)
        paths = tuple(f"{name}/{CLASSES[c]}/{i:03d}.png" for i, c in enumerate(labels))
        splits[name] = Split(name, Path("/nowhere"), paths, labels, CLASSES)
    return ImageDataset(Path("/nowhere"), "pins", CLASSES, splits, "imagefolder")


CARVED = _dataset({"train": [13, 9, 17]})  # val and test carved from train
WHOLE = _dataset({"train": [6, 8, 5], "val": [2, 3, 2], "test": [3, 2, 4]})

# the bench cells' ctx rows (train cap 4 per class; part of each cell's fingerprint), from the code before
PINNED_CTX = {
    ("carved", 7, 4): {
        "train_rows": [0, 2, 6, 7, 8, 10, 11, 12, 17, 18, 20, 22],
        "sources": {"train": "train", "val": "train", "test": "train"},
        "positions": {
            "train": [2, 5, 9, 12, 13, 16, 19, 20, 26, 28, 31, 37],
            "val": [1, 11, 17, 27, 30, 32],
            "test": [0, 3, 10, 15, 18, 24, 34, 35, 36],
        },
    },
    ("carved", 0, None): {
        "train_rows": None,
        "sources": {"train": "train", "val": "train", "test": "train"},
        "positions": {
            "train": [0, 2, 3, 4, 6, 9, 11, 12, 13, 15, 17, 19, 20, 21, 23, 24, 25, 26, 30, 31, 32, 33, 34, 36],
            "val": [5, 8, 18, 27, 29, 35],
            "test": [1, 7, 10, 14, 16, 22, 28, 37, 38],
        },
    },
    ("whole", 7, 4): {
        "train_rows": [0, 2, 4, 5, 6, 10, 11, 12, 14, 16, 17, 18],
        "sources": {"train": "train", "val": "val", "test": "test"},
        "positions": {
            "train": [0, 2, 4, 5, 6, 10, 11, 12, 14, 16, 17, 18],
            "val": [0, 1, 2, 3, 4, 5, 6],
            "test": [0, 1, 2, 3, 4, 5, 6, 7, 8],
        },
    },
}
# few-shot draws: (train_rows into the plan's train rows, dataset positions), from the code before
PINNED_DRAWS = {
    ("carved", 7, 1, 0): ([3, 11, 23], [6, 19, 38]),
    ("carved", 7, 1, 2): ([7, 11, 21], [12, 19, 33]),
    ("carved", 7, 3, 0): ([0, 2, 3, 8, 10, 13, 16, 17, 21], [2, 5, 6, 13, 16, 21, 25, 26, 33]),
    ("carved", 7, 3, 2): ([1, 4, 5, 9, 10, 13, 14, 16, 23], [4, 7, 8, 14, 16, 21, 22, 25, 38]),
    ("carved", 0, 3, 0): ([2, 6, 7, 8, 9, 13, 15, 20, 23], [3, 11, 12, 13, 15, 21, 24, 32, 36]),
    ("whole", 0, 3, 2): ([1, 3, 4, 7, 11, 12, 14, 15, 18], [1, 3, 4, 7, 11, 12, 14, 15, 18]),
}
DATASETS = {"carved": CARVED, "whole": WHOLE}


@pytest.mark.parametrize("key", list(PINNED_CTX))
def test_cap_and_plan_select_the_pinned_rows_for_bench_and_finetuning(key: tuple[str, int, int | None]) -> None:
    name, seed, cap = key
    ds, plan = DATASETS[name], SplitPlan(0.2, 0.25, seed)
    cell_rows = CellRows.of(ds, plan, cap)
    rows = cell_rows.to_dict()
    assert rows == PINNED_CTX[key]
    selected = cell_rows.selections
    assert {n: (s.split, list(s.positions)) for n, s in selected.items()} == {
        n: (rows["sources"][n], rows["positions"][n]) for n in ("train", "val", "test")
    }
    # fine-tuning gets the same rows from the same train_rows, recorded as [split, position] pairs
    splits, positions = _resolve_splits(ds, plan, rows["train_rows"])
    for n in ("train", "val", "test"):
        assert positions[n].pairs() == [[rows["sources"][n], p] for p in rows["positions"][n]]
        assert list(splits[n].paths) == [ds.split(rows["sources"][n]).paths[p] for p in rows["positions"][n]]
        assert splits[n].name == n


@pytest.mark.parametrize("key", list(PINNED_DRAWS))
def test_fewshot_draws_select_the_pinned_rows(key: tuple[str, int, int, int]) -> None:
    name, seed, shots, draw = key
    ds, plan = DATASETS[name], SplitPlan(0.2, 0.25, seed)
    drawn = plan.fewshot(ds, shots, draw)
    train_rows, positions = PINNED_DRAWS[key]
    assert drawn.tolist() == train_rows
    assert list(plan.resolve(ds, drawn)["train"].positions) == positions
    _, finetune_rows = _resolve_splits(ds, plan, drawn)  # what the few-shot fine-tuning cell passes
    assert list(finetune_rows["train"].positions) == positions


def test_draw_seed_and_fewshot_errors() -> None:
    assert SplitPlan(seed=7).draw_seed(3, 2) == 7_002_003  # also the heads' CV seed in that draw
    with pytest.raises(UsageError, match="6-shot draws need 6 training images in every class"):
        SplitPlan().fewshot(WHOLE, 6, 0)
    with pytest.raises(UsageError, match=r"train_rows must be a non-empty list of positions in \[0, 19\)"):
        SplitPlan().resolve(WHOLE, [19])
    assert SplitPlan().cap(WHOLE, None) is None and SplitPlan().cap(WHOLE, 0) is None


def _feature_set(labels: np.ndarray, failed: set[int]) -> FeatureSet:
    """A train cache in memory whose features are their own dataset positions; ``failed`` positions did not decode."""
    idx = np.array([p for p in range(len(labels)) if p not in failed], dtype=np.int64)
    paths = [f"p{p}" for p in idx]
    return FeatureSet(idx[:, None].astype(np.float32), labels[idx], paths, idx, list(CLASSES), {}, Path("."), labels)


def test_feature_set_select_skips_failed_images_as_before() -> None:
    labels = CARVED.split("train").labels
    fs = _feature_set(labels, {3, 11, 27})
    sets = split_features(fs, None, None, SplitPlan(0.2, 0.25, 7))
    assert {n: s.indices.tolist() for n, s in sets.items()} == {  # pinned from the code before
        "test": [0, 10, 15, 18, 24, 34, 35, 36],
        "val": [1, 17, 30, 32],
        "train": [2, 4, 5, 6, 7, 8, 9, 12, 13, 14, 16, 19, 20, 21, 22, 23, 25, 26, 28, 29, 31, 33, 37, 38],
    }
    picked = sets["train"].select(RowSelection("train", [13, 3, 2, 9, 5, 12]))  # in the selection's order
    assert picked.indices.tolist() == [13, 2, 9, 5, 12] and picked.features[:, 0].tolist() == [13, 2, 9, 5, 12]
    assert fs.select(RowSelection("train", ())).indices.size == 0


def test_cache_reader_rows_of_matches_the_feature_set(tmp_path: Path) -> None:
    labels = CARVED.split("train").labels
    n, failed = len(labels), {3, 11, 27}
    X = np.arange(n, dtype=np.float32)[:, None].repeat(4, axis=1)
    valid = np.array([p not in failed for p in range(n)])
    blocks = ((s, X[s : s + 8], valid[s : s + 8], ["decode error: x"] * int((~valid[s : s + 8]).sum())) for s in range(0, n, 8))
    path = write_cache_file(
        tmp_path / "c.h5",
        n_rows=n,
        blocks=blocks,
        labels=labels,
        paths=[f"p{p}" for p in range(n)],
        classes=list(CLASSES),
        attrs=base_attrs(),
    )
    with CacheReader(path) as reader:
        fs = reader.load()
        for rows in SplitPlan(0.2, 0.25, 7).resolve(CARVED).values():
            file_rows = reader.rows_of(rows)
            assert file_rows.tolist() == list(rows.positions)  # the file's row i holds position i: every row, failed too
            streamed = np.concatenate([x[:, 0] for _, x, _ in reader.iter_chunks(file_rows)] or [np.empty(0)])
            assert sorted(streamed.tolist()) == sorted(fs.select(rows).features[:, 0].tolist())


def test_recorded_rows_read_back_in_both_forms() -> None:
    rows = RowSelection("train", np.array([4, 1, 9]))
    assert rows.positions == (4, 1, 9) and rows.pairs() == [["train", 4], ["train", 1], ["train", 9]]
    assert RowSelection.from_record(rows.pairs(), "test") == rows  # fine-tuning's pairs name their split
    assert RowSelection.from_record([4, 1, 9], "train") == rows  # the bench rows' bare positions
    assert RowSelection.from_record([4.0, np.int64(1), 9], "train") == rows
    assert RowSelection.from_record(None, "train") is None and RowSelection.from_record([], "val") == RowSelection("val", ())
    for bad in ([["train", 1], ["val", 2]], [["train", 1], 2], ["x"], [1.5], "12", [True]):
        with pytest.raises(ValueError):
            RowSelection.from_record(bad, "train")
    assert rows.take([2, 0]) == RowSelection("train", (9, 4))
    assert rows.split_of(WHOLE, "fit").paths == tuple(WHOLE.split("train").paths[p] for p in (4, 1, 9))


def test_report_pairs_bench_positions_with_finetuning_pairs() -> None:
    from featx.errors import MismatchError
    from featx.records import DatasetResult, ResultRow
    from featx.reporting.paired import _paired_inputs

    head = {"strategy": "logreg", "test_positions": [2, 0, 1], "test_predictions": [1, 0, 0], "test_labels": [1, 0, 1]}
    tune = {
        "strategy": "full",
        "test_positions": [["train", 0], ["train", 1], ["train", 2]],  # test rows carved from train
        "test_predictions": [0, 1, 1],
        "test_labels": [0, 1, 1],
    }
    entry = DatasetResult(position_sources={"test": "train"})

    def paired(h: dict, t: dict) -> object:
        return _paired_inputs(ResultRow(family="features", **h), ResultRow(family="finetune", **t), entry)

    y, ft, hd = paired(head, tune)
    assert y.tolist() == [1, 0, 1] and ft.tolist() == [1, 0, 1] and hd.tolist() == [1, 0, 0]  # aligned on the head's order
    with pytest.raises(MismatchError, match="different test images"):  # the same numbers in another split are other images
        paired(head, {**tune, "test_positions": [["test", 0], ["test", 1], ["test", 2]]})
    assert "not dataset positions" in paired({**head, "test_positions": ["a", "b", "c"]}, tune)
