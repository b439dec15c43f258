"""featx.records: the typed rows bench writes and the report reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featx.errors import UsageError
from featx.records import SCHEMA_VERSION, BenchResults, DatasetResult, ResultRow, load_results

RESULTS = sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("*/results.json"))


def _results(**row: object) -> dict:
    return {
        "datasets": {
            "d": {
                "dataset": "d",
                "rows": [{"family": "features", "strategy": "logreg", "accuracy": 0.5, **row}],
                "fewshot": [{"method": "logreg", "family": "features", "shots": 2, "draw": 0, "accuracy": 0.4}],
                "layerwise": [{"layer": "blocks.5", "accuracy": 0.6}],
            }
        },
        "meta": {"quick": True},
    }


def test_round_trip_keeps_every_value_and_types_the_rows() -> None:
    res = BenchResults.from_dict(_results(val_log_loss=None, test_positions=[3, 1]))
    row = res.datasets["d"].rows[0]
    assert isinstance(res.datasets["d"], DatasetResult) and isinstance(row, ResultRow)
    assert row.test_positions == [3, 1] and row.val_log_loss is None and row.fine_tune_epochs is None
    assert res.schema == SCHEMA_VERSION
    again = BenchResults.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again == res


@pytest.mark.parametrize("path", RESULTS, ids=[p.parent.name for p in RESULTS])
def test_committed_schema_1_results_read_unchanged(path: Path) -> None:
    data = json.loads(path.read_text())
    assert "schema" not in data  # written before the schema version existed
    res = load_results(path)
    for name, ds in data["datasets"].items():
        for part in ("rows", "fewshot", "layerwise"):
            written = [r.to_dict() for r in getattr(res.datasets[name], part)]
            assert [{k: w[k] for k in r} for r, w in zip(ds[part], written, strict=True)] == ds[part]


def test_unknown_field_is_refused_with_its_location() -> None:
    with pytest.raises(UsageError, match=r"datasets\[d\]\.rows\[0\]: unknown field\(s\) acuracy"):
        BenchResults.from_dict(_results(acuracy=0.9))


def test_missing_required_field_and_wrong_container_are_refused() -> None:
    bad = _results()
    del bad["datasets"]["d"]["rows"][0]["strategy"]
    with pytest.raises(UsageError, match=r"missing field.*strategy"):
        BenchResults.from_dict(bad)
    bad = _results()
    bad["datasets"]["d"]["rows"] = {"x": 1}
    with pytest.raises(UsageError, match="rows: expected a list"):
        BenchResults.from_dict(bad)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "results.json"
    p.write_text(json.dumps({**_results(), "schema": SCHEMA_VERSION + 1}))
    with pytest.raises(UsageError, match="newer featx"):
        load_results(p)
    p.write_text("{not json")
    with pytest.raises(UsageError, match="cannot read bench results"):
        load_results(p)
