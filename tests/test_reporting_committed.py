"""The committed bench results (``benchmarks/results/*/results.json``, schema 1: written before ``featx.records``)
render exactly as they did before the report read typed records: byte-identical ``report.md`` text, captured with
the dict-reading report at the refactor's start. No timings are involved: the numbers are the committed ones.

A deliberate change to the report's wording regenerates these files with ``FEATX_UPDATE_GOLDEN=1 pytest``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from featx.records import load_results
from featx.reporting import render_report

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "data" / "reporting" / "committed"
COMMITTED = ("bench_cpu", "bench_cpu_issue21", "bench_cpu_digits_longer")


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_results_render_byte_identical(name: str) -> None:
    path = ROOT / "benchmarks" / "results" / name / "results.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    text = render_report(data)
    golden = GOLDEN / f"{name}.md"
    if os.environ.get("FEATX_UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")
    assert render_report(load_results(path)) == text  # the typed records render the same as their dict form


def _tiny() -> dict:
    """One dataset whose rows draw no plot (a failed cell, a head without wall time): write_report is fast."""
    row = {"family": "features", "strategy": "logreg", "accuracy": 0.5, "val_accuracy": 0.5, "val_log_loss": None}
    failed = {"family": "finetune", "strategy": "full", "status": "failed", "error": "boom"}
    return {"meta": {"quick": True}, "datasets": {"d": {"classes": ["a", "b"], "rows": [row, failed]}}}


def test_write_report_stamps_the_schema_and_reads_back_the_same_records(tmp_path: Path) -> None:
    from featx.records import SCHEMA_VERSION, BenchResults
    from featx.reporting import write_report

    data = _tiny()
    written = write_report(data, tmp_path / "from_dict")
    on_disk = json.loads(written["results"].read_text(encoding="utf-8"))
    assert on_disk == {**data, "schema": SCHEMA_VERSION}  # a dict is written as given (explicit nulls kept), stamped
    records = BenchResults.from_dict(data)
    again = write_report(records, tmp_path / "from_records")
    assert load_results(again["results"]) == records == load_results(written["results"])
    assert json.loads(again["results"].read_text(encoding="utf-8"))["schema"] == SCHEMA_VERSION
    assert again["report"].read_text(encoding="utf-8") == written["report"].read_text(encoding="utf-8")


def test_an_unknown_row_field_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from featx.errors import UsageError
    from featx.reporting import write_report

    data = _tiny()
    data["datasets"]["d"]["rows"][0]["val_acc"] = 0.5  # a renamed field fails loudly instead of reading as missing
    with pytest.raises(UsageError, match=r"datasets\[d\]\.rows\[0\]: unknown field\(s\) val_acc"):
        write_report(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
