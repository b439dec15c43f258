"""``featx bench``: feature extraction + heads vs fine-tuning on a declared grid, cell by cell.

The package, in dependency order (nothing imports upward):

* :mod:`~featx.bench.config`: :class:`BenchConfig` (the grid), :data:`QUICK`, :func:`load_bench_config` and the check
  of every setting; per-dataset settings (``image_size``, ``max_train_per_class``, ``augment``) and their keys.
* :mod:`~featx.bench.memory`: :class:`TreeMemory` (a process tree's peak resident memory) and the device's peak.
* :mod:`~featx.bench.context`: :class:`CellContext`, what a cell is given (settings, dataset, rows, its own fields).
* :mod:`~featx.bench.cells`: the five cell kinds; each returns its record (rows and points from :mod:`featx.records`).
* :mod:`~featx.bench.fingerprint`: what a finished cell is reused by (stale-cell detection).
* :mod:`~featx.bench.processes`: the cells' worker processes (they die with the bench) and the run folder's lock.
* :mod:`~featx.bench.runner`: :func:`run_bench`, the protocol, the run's datasets; writes ``results.json``
  (:class:`featx.records.BenchResults`) through the report.
"""

from featx.bench.config import (
    MAX_DRAWS,
    MAX_SEED,
    MAX_SHOTS,
    PER_DATASET_SETTINGS,
    QUICK,
    BenchConfig,
    FewShotConfig,
    dataset_name,
    load_bench_config,
    unmatched_dataset_keys,
    validate_bench_config,
)
from featx.bench.context import CellContext, CellRows
from featx.bench.fingerprint import FINGERPRINT_LIBRARIES, code_identity, featx_source_sha256, fingerprint_libraries, stale_parts
from featx.bench.memory import TreeMemory
from featx.bench.processes import LOCK_NAME
from featx.bench.runner import bench_datasets, check_write_locations, protocol, run_bench

__all__ = [
    "FINGERPRINT_LIBRARIES",
    "LOCK_NAME",
    "MAX_DRAWS",
    "MAX_SEED",
    "MAX_SHOTS",
    "PER_DATASET_SETTINGS",
    "QUICK",
    "BenchConfig",
    "CellContext",
    "CellRows",
    "FewShotConfig",
    "TreeMemory",
    "bench_datasets",
    "check_write_locations",
    "code_identity",
    "dataset_name",
    "featx_source_sha256",
    "fingerprint_libraries",
    "load_bench_config",
    "protocol",
    "run_bench",
    "stale_parts",
    "unmatched_dataset_keys",
    "validate_bench_config",
]
