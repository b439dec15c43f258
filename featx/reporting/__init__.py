"""Benchmark results -> a report folder: ``results.json``, ``report.md`` and PNG plots.

Pure rendering: the report reads the bench's records (:mod:`featx.records`; a ``results.json`` dict is read once at
the entry with :meth:`~featx.records.BenchResults.from_dict`) and never runs a model, so a report can be rebuilt
from ``results.json`` alone (and tests need no torch). Every sentence in the report is computed from the numbers;
where the numbers cannot support a conclusion the text says so.

The package, in the order its modules import each other (nothing imports upward):

* ``_format``   numbers, Markdown cells, shot counts, a row's accuracy with its interval
* ``grid``      what a row searched: grid points, values per parameter, the grid-edge rule (registry-derived,
  ``_grid_edges``, ``_beyond_edge``)
* ``selection`` choosing on val (``select_on_val``, ``choice_detail``, ``family_choices``, ``selections``) and the
  facts a choice depends on (``backbone_updated``, a row's result, the layer probes as candidates)
* ``budget``    where the compute budget may decide the verdict (``budget_sentences``, ``budget_flags``)
* ``paired``    two rows aligned on the same test images
* ``fewshot``   the few-shot curve's statistics and the crossing point (``fewshot_crossing``)
* ``verdict``   ``compare_chosen``, ``verdict``, ``verdict_word``, ``report_summary`` (Holm across datasets)
* ``markdown``  ``render_report`` and its sections and tables
* ``plots``     matplotlib figures (imported lazily)
* here          ``write_report``: the folder

The protocol the report enforces (issues 12 and 21):

* **Selection never sees test.** The best head, the best fine-tuning strategy and the best layer are the
  rows with the highest ``val_accuracy``; ties go to the lower ``val_log_loss`` where every tied row has one,
  else to the first in the rows' order (the grid's order). Test accuracy is shown for every row but chooses
  nothing; a row without ``val_accuracy`` cannot be chosen. When the layer-wise probe ran, the features
  family's choice includes its layers. A choice decided by one val image or less is said next to the verdict,
  with what the runner-up would have given.
* **A paired verdict.** The chosen head and the chosen fine-tuning run predicted the same test images
  (``test_positions``), so they are compared with ``featx.metrics.paired_comparison``: the accuracy
  difference with an interval computed from the counts (no seed: the printed ends never move) that never
  disagrees with McNemar's exact test, and the smallest difference this test set could detect. With several
  datasets the p-values are also Holm-adjusted across the report.
* **A probe is not fine-tuning.** A fine-tuning run whose chosen model never updated the backbone (LP-FT
  keeping its epoch-0 probe, the ``head`` strategy) is said to have added nothing at this budget; the run that
  did train and came closest is shown with its paired result, for reference.
* **The budget is named.** A fine-tuning run (or grid point) whose best epoch was its last with the epoch
  budget spent (``still_improving``), or a chosen hyper-parameter on the edge of its grid (any grid of two
  values or more), is said next to the verdict with what to run to settle it; the summary applies one
  follow-up rule to every dataset where that happens.

The input is :class:`featx.records.BenchResults` (fields a row may lack are ``None``; a row with
``status == "failed"`` carries only ``error``), or its dict form as ``results.json`` holds it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featx.records import SCHEMA_VERSION, BenchResults, DatasetResult

from ._format import ALPHA, LEVEL
from .budget import budget_flags, budget_sentences
from .fewshot import _all_per_class, _fewshot_stats, _probe_methods, fewshot_crossing
from .markdown import (
    _read_results,
    render_crossing_table,
    render_fewshot_table,
    render_protocol,
    render_report,
    render_results_table,
    render_summary,
)
from .plots import DPI, _plottable_rows, plot_accuracy_vs_time, plot_fewshot, plot_layerwise
from .selection import _layer_points, backbone_updated, choice_detail, family_choices, rank_on_val, select_on_val, selections
from .verdict import compare_chosen, report_summary, verdict, verdict_word

__all__ = [
    "ALPHA",
    "DPI",
    "LEVEL",
    "backbone_updated",
    "budget_flags",
    "budget_sentences",
    "choice_detail",
    "compare_chosen",
    "family_choices",
    "fewshot_crossing",
    "plot_accuracy_vs_time",
    "plot_fewshot",
    "plot_layerwise",
    "rank_on_val",
    "render_crossing_table",
    "render_fewshot_table",
    "render_protocol",
    "render_report",
    "render_results_table",
    "render_summary",
    "report_summary",
    "select_on_val",
    "selections",
    "verdict",
    "verdict_word",
    "write_report",
]


def write_report(results: BenchResults | Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the plots into ``out_dir``; return every path written.

    ``results``: a :class:`~featx.records.BenchResults`, or its dict form (read with ``BenchResults.from_dict``:
    an unknown field or a newer schema is refused). ``results.json`` holds the records with ``"schema"`` set to
    :data:`~featx.records.SCHEMA_VERSION` (a dict is written as given, keys and explicit nulls kept).

    Keys of the returned dict: ``"report"``, ``"results"`` and one key per plot, equal to the PNG's file
    stem (``<dataset>_accuracy_vs_time``, ``<dataset>_fewshot``, ``<dataset>_layerwise``). A plot is
    written only when its section has data, so the report never links to an empty figure. The report is
    rendered before anything is written, so results that cannot be compared (``MismatchError``) leave
    the folder untouched.
    """
    res = _read_results(results)
    out = Path(out_dir)
    slugs = _unique_slugs(list(res.datasets))
    plot_names = {name: _plot_jobs(ds) for name, ds in res.datasets.items()}
    planned = {name: {kind: f"{slugs[name]}_{kind}.png" for kind, *_ in jobs} for name, jobs in plot_names.items()}
    report_text = render_report(res, planned)  # raises before any file is written

    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    results_path = out / "results.json"
    payload = res.to_dict() if isinstance(results, BenchResults) else {**results, "schema": SCHEMA_VERSION}
    _write_text(results_path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")
    written["results"] = results_path
    for name, ds in res.datasets.items():
        title = f"{name} ({ds.backbone})" if ds.backbone else name
        for kind, plot, data, extra in plot_names[name]:
            path = plot(data, out / planned[name][kind], title, **extra)
            written[path.stem] = path
    report_path = out / "report.md"
    _write_text(report_path, report_text)
    written["report"] = report_path
    return written


def _plot_jobs(ds: DatasetResult) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    n_classes = len(ds.classes or [])
    chance = 1.0 / n_classes if n_classes >= 2 else None
    jobs: list[tuple[str, Any, Any, dict[str, Any]]] = []
    if _plottable_rows(ds.rows):
        extraction = (ds.extraction or {}).get("seconds")
        jobs.append(("accuracy_vs_time", plot_accuracy_vs_time, ds.rows, {"extraction_seconds": extraction}))
    if _fewshot_stats(ds.fewshot):
        extra = {
            "images_per_class_all": ds.images_per_class_all,
            "chance": chance,
            "all_per_class": _all_per_class(ds),
            "probe_at_all": _probe_methods(ds),
        }
        jobs.append(("fewshot", plot_fewshot, ds.fewshot, extra))
    if _layer_points(ds.layerwise):
        jobs.append(("layerwise", plot_layerwise, ds.layerwise, {"chance": chance}))
    return jobs


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays and paths are written as plain JSON; anything else is an error, not a repr."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"results contain a {type(obj).__name__} that cannot be written as JSON: {obj!r}")


def _write_text(path: Path, text: str) -> None:
    """Atomic write: a crash leaves the old file or none, never half a report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unique_slugs(names: Sequence[str]) -> dict[str, str]:
    slugs: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "dataset"
        slug, k = base, 2
        while slug in used:
            slug, k = f"{base}-{k}", k + 1
        used.add(slug)
        slugs[name] = slug
    return slugs
