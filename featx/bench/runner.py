"""``featx bench``: feature extraction + heads vs fine-tuning on a declared grid, cell by cell.

Each cell (features+heads, one fine-tuning strategy, few-shot draws, the layer-wise probe) writes
``<out>/cells/<id>.json`` when it finishes, with a fingerprint of what determines its numbers (its settings,
the dataset's content, the embedder, featx's version and source, the library versions); re-running reuses a
finished cell only while its fingerprint matches (``--reuse-stale`` keeps stale ones, and the report says so).
Cell ids hold the dataset's name and a hash of its resolved path, so datasets that share a folder name stay
apart. Cells whose costs are reported run in a fresh process each (peak memory is a per-process maximum), the
others in one shared helper process; all of them die with the bench process, and one bench at a time writes
into an out-dir (``<out>/.featx-bench.lock``). An out-dir or cache inside a dataset is refused.

The protocol (issue 12), the same for both families:

* **Same rows.** Heads and fine-tuning get identical train/val/test positions (recorded in every row as
  ``train_positions``/``val_positions``/``test_positions``, positions in the dataset split they come from).
  Both choose hyper-parameters on val (heads: their sweep; fine-tuning: an lr x weight-decay grid per
  strategy), then train the final model per ``final_fit``: ``train+val`` (default, Kornblith et al. 2019)
  or ``train``. Rows carry ``n_fit``, the number of labelled images the final model trained on.
* **Few-shot means few labels.** A k-shot draw is exactly k training images per class and no other label:
  heads choose by cross-validation inside the draw (or a fixed rule at k = 1), fine-tuning by its fixed rule;
  fine-tuning draw d of k shots is head draw d of k shots (same ``train_positions``).
* **Costs alike.** Each family's wall time runs from image files to a trained model: dataset scan, model
  build, the forward passes over the images it uses, fits or training. The build (importing torch and the
  model library, constructing the pretrained backbone) is charged in full, once per cell, timed the same way
  first thing in each family's fresh process (``build_seconds`` in both families' rows). Peak memory is that of
  the cell's whole process tree (joblib and DataLoader workers included); on GPU both also report device peak
  memory.
* Whatever shrinks the bench for a compute budget is written into the report: the train cap and the input size
  apply to both families alike; the fine-tuning grid, its epochs and the few-shot draws are fine-tuning's own
  (the heads sweep their own grids), and the report states what each family searched, from the rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featx import __version__
from featx.bench.cells import CELL_RECORDS, CellRecord, FeaturesCell, FewshotHeadsCell, FinetuneCell
from featx.bench.config import BenchConfig, dataset_name, unmatched_dataset_keys, validate_bench_config
from featx.bench.context import CellContext, CellRows
from featx.bench.fingerprint import Fingerprints, stale_parts
from featx.bench.processes import CellJob, CellProcesses, Failed, run_folder_lock, run_job
from featx.data import SplitPlan, load_dataset
from featx.errors import UsageError
from featx.records import FEATURES, FINETUNE, BenchMeta, BenchResults, DatasetResult, FewshotPoint, ResultRow

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Datasets of a run: unique cell ids and report names; where the run may write


@dataclass(frozen=True)
class _Dataset:
    path: str  # as written in the config
    real: str  # symlinks resolved
    name: str  # the folder's name (the CSV's stem)
    label: str  # the report's name: ``name``, or ``name (path)`` when another dataset of the run has the same name
    prefix: str  # of its cell ids and run folders: the name and 8 hex digits of the resolved path
    legacy: str | None  # the prefix before issue 20 (the bare name; None when shared): --reuse-stale finds old cells


def bench_datasets(config: BenchConfig) -> list[_Dataset]:
    paths = [os.fspath(d) for d in config.datasets]
    names = [dataset_name(d) for d in paths]
    out = []
    for path, name in zip(paths, names):
        real = os.path.realpath(os.path.expanduser(path))
        shared = names.count(name) > 1
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:48].strip("._") or "dataset"
        tag = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        out.append(_Dataset(path, real, name, f"{name} ({path})" if shared else name, f"{safe}-{tag}", None if shared else name))
    return out


def check_write_locations(config: BenchConfig, out_dir: str | os.PathLike[str], cache_dir: str | None) -> None:
    """Refuse (UsageError) an out-dir or cache inside an ImageFolder dataset of the run (a PNG written there becomes
    a training image, a folder a class), and a dataset inside the out-dir's ``cells``/``runs`` (featx writes there).
    An out-dir that holds a dataset elsewhere is fine: nothing is written into it. Symlinks are resolved."""
    from featx.cache import resolve_cache_dir
    from featx.data import is_within, refuse_inside_dataset

    out = Path(out_dir).expanduser()
    cache = resolve_cache_dir(cache_dir)
    for d in map(os.fspath, config.datasets):
        refuse_inside_dataset(out, d, "--out-dir")
        refuse_inside_dataset(cache, d, "--cache-dir")
        folder = d if Path(d).expanduser().is_dir() else os.path.dirname(os.path.realpath(os.path.expanduser(d)))
        for sub in ("cells", "runs"):
            if is_within(folder, out / sub):
                raise UsageError(f"bench dataset {d} is inside {out / sub}, where featx bench writes; choose another --out-dir")


# --------------------------------------------------------------------------------------------------


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores{gpu}; torch {torch.__version__}, featx {__version__}"


def protocol(config: BenchConfig) -> dict[str, Any]:
    """What the report states about how both families were trained, chosen and charged (flat: one line each)."""
    few = config.fewshot
    grids = {s: config.grid_for(s) for s in config.strategies}
    shared = next(iter(grids.values()), {}) if len({json.dumps(g, sort_keys=True) for g in grids.values()}) <= 1 else grids
    out: dict[str, Any] = {
        "final_fit": config.final_fit,
        "selection": "val",
        "fewshot_selection": "cv|rule",
        "fewshot_draws_heads": few.draws if few else 0,
        "fewshot_draws_finetune": few.finetune_draws if few and few.finetune_strategy else 0,
        "finetune_grid": shared,
        "finetune_epochs": config.finetune.get("epochs"),
        "fewshot_rule_steps": (few.finetune_rule_steps or "RULE_STEPS") if few and few.finetune_strategy else None,
        "same_rows": "heads and fine-tuning get identical train/val/test images (train_positions, val_positions, "
        "test_positions in every row) and identical few-shot draws (train_positions in every point)",
        "final_fit_text": (
            "both families choose hyper-parameters on val, then refit on train + val "
            "(fine-tuning with the epoch count chosen on val)"
            if config.final_fit == "train+val"
            else "both families choose hyper-parameters on val and keep the model trained on train only"
        ),
        "head_grids": "each head sweeps its own grid on val (ties go to the stronger regularisation)",
        "costs": "wall time from image files to a trained model, for both families: dataset scan; the backbone build "
        "(importing torch and the model library, constructing the pretrained model) charged in full, once per cell, timed "
        "the same way first thing in each family's fresh process (build_seconds; fine-tuning's own warm rebuild of the "
        "model is taken out, and the build inside the heads' extraction is not in their forward-pass time); forward "
        "passes over the images used (heads: the forward-pass seconds per image of each split, stored in its cache, "
        "times the images the heads use, so a capped train split and a cache hit are charged alike); sweep or grid, "
        "final fit or training, test predictions; peak memory of the cell's whole process tree (sum of per-process "
        "VmHWM: joblib and DataLoader workers included); on GPU peak_memory_mb is the CUDA peak and host_rss_mb the "
        "tree's peak RSS, for both families",
    }
    if few:
        out["fewshot_labels"] = (
            "a k-shot draw is exactly k training images per class and no other labels (no refit on val, no selection on val); "
            "heads choose by stratified CV inside the draw (folds = min(5, k)) when k >= 2, else by the fixed "
            "featx.heads.HEAD_DEFAULT_PARAMS; fine-tuning uses featx.finetuning's fixed rule (after BiT HyperRule); "
            "fine-tuning draw d of k shots is head draw d of k shots"
        )
    return out


_CellRef = tuple[str, "str | None", str]  # a cell's id, its id before issue 20, its dataset's fingerprint


_Failed = Failed  # a cell that raised (or whose process died): its one-line error


def run_bench(
    config: BenchConfig,
    *,
    out_dir: str | os.PathLike[str],
    cache_dir: str | None = None,
    progress: bool = True,
    command: str = "",
    log_level: int | None = None,
    reuse_stale: bool = False,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Run every cell without a current result, then write report.md, results.json and the plots into ``out_dir``.

    A finished cell (``<out>/cells/<id>.json``) is reused only while its fingerprint matches: the settings that
    determine it, the dataset's content, the embedder, featx's version and source, the library versions (stored
    in the cell under ``"fingerprint"``). Otherwise it runs again. ``reuse_stale`` keeps such cells, and those
    written before fingerprints, on purpose; ``results.meta.stale_cells`` lists them with what changed.

    Before anything is created: the settings are validated, and an ``out_dir`` or cache inside a dataset is
    refused. One run at a time writes into ``out_dir`` (``.featx-bench.lock``; a second is refused at once).
    ``log_level`` (default: the ``featx`` logger's effective level, so ``featx -q`` gives WARNING) is passed to
    every cell's process. Returns ``{"report": path, "failed": number of failed cells, "results": BenchResults}``.

    ``scheduler`` (``tcp://HOST:8786`` or ``local:N``; needs ``featx[dask]``): the cells without a current result run as
    Dask tasks on that cluster (:mod:`featx.bench.cluster`), each in a process of its own on a worker, writing its cell
    file into ``out_dir`` as here; ``out_dir`` (and the datasets, and ``cache_dir`` if given) must be on a filesystem
    every worker sees. The cell files, results.json and report.md are those of a run here (costs aside).
    """
    from featx.reporting import write_report

    validate_bench_config(config)
    level = logging.getLogger("featx").getEffectiveLevel() if log_level is None else log_level
    out = Path(out_dir).expanduser()
    check_write_locations(config, out, cache_dir)
    for setting, keys in unmatched_dataset_keys(config).items():
        log.warning("bench setting %s: no dataset of this run has the name or path %s", setting, ", ".join(keys))
    datasets = bench_datasets(config)
    if scheduler is not None:
        from featx.cluster import check_scheduler

        check_scheduler(scheduler)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} exists and is not a folder")
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(_client(scheduler))  # a scheduler that does not answer: nothing is created
        out.mkdir(parents=True, exist_ok=True)
        lock_fd = stack.enter_context(run_folder_lock(out))
        processes = stack.enter_context(CellProcesses(lock_fd))
        cells_dir = out / "cells"
        cells_dir.mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
        failed = 0
        t_start = time.perf_counter()
        prints = Fingerprints(config)
        meta = BenchMeta(
            featx_version=__version__,
            code=prints.code,
            created_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            command=command,
            machine=_machine(),
            quick=config.quick,
            budget_notes=list(config.budget_notes),
            protocol=protocol(config),
        )
        results = BenchResults(meta=meta)
        loaded = {}  # each dataset scanned and fingerprinted once
        for d in datasets:
            ds = load_dataset(d.path)
            loaded[d.path] = (ds, prints.dataset(ds))
        grid_args = {"loaded": loaded, "cache_dir": cache_dir, "progress": progress}

        def prepare(cell: _CellRef, kind: str, ctx: CellContext, fresh_process: bool) -> CellRecord | CellJob:
            """The cell's current record (a finished, reusable cell file), else the job that computes it.
            ``cell``: its id, its id before issue 20 (looked for with ``reuse_stale`` only), its dataset's fingerprint."""
            cell_id, legacy_id, dataset_print = cell
            ctx = dataclasses.replace(ctx, cell_id=cell_id, log_level=level)
            fingerprint = prints.cell(kind, ctx, dataset_print)
            path = cells_dir / f"{cell_id}.json"
            if not path.is_file() and reuse_stale and legacy_id and (cells_dir / f"{legacy_id}.json").is_file():
                path = cells_dir / f"{legacy_id}.json"
            old = _read_cell(path, kind) if path.is_file() else None
            if old is not None:
                changed = stale_parts(old.fingerprint, fingerprint)
                if not changed:
                    log.info("skip finished cell %s", cell_id)
                    return old
                if reuse_stale:
                    log.warning("cell %s is stale (changed: %s); kept as asked (--reuse-stale)", path.stem, ", ".join(changed))
                    meta.stale_cells.append({"cell": path.stem, "changed": changed})
                    return old
                log.info("run cell %s again: %s changed since it ran", cell_id, ", ".join(changed))
            else:
                log.info("run cell %s", cell_id)
            return CellJob(kind, ctx, fingerprint, str(cells_dir / f"{cell_id}.json"), fresh_process)

        def run_here(cell: _CellRef, kind: str, ctx: CellContext, fresh_process: bool, after: str | None = None) -> Any:
            nonlocal failed
            job = prepare(cell, kind, ctx, fresh_process)
            if not isinstance(job, CellJob):
                return job
            done = run_job(job, processes)
            failed += isinstance(done, Failed)
            return done

        if client is None:
            _grid(config, datasets, out, results, **grid_args, run=run_here)
        else:  # plan every cell, run the missing ones on the cluster, then assemble the same entries from their records
            from featx.bench.cluster import run_cells

            records: dict[str, Any] = {}
            jobs: list[tuple[CellJob, str | None]] = []

            def plan(cell: _CellRef, kind: str, ctx: CellContext, fresh_process: bool, after: str | None = None) -> Any:
                job = prepare(cell, kind, ctx, fresh_process)
                if isinstance(job, CellJob):
                    jobs.append((job, after))
                else:
                    records[cell[0]] = job
                return Failed("planned")

            _grid(config, datasets, out, results, **grid_args, run=plan)
            ran = run_cells(client, [(j, a) for j, a in jobs], out=out, code=prints.code, datasets=datasets, cache_dir=cache_dir)
            failed = sum(isinstance(r, Failed) for r in ran.values())
            records.update(ran)
            results.datasets.clear()
            _grid(config, datasets, out, results, **grid_args, run=lambda cell, *_, **__: records[cell[0]])
        meta.bench_seconds_this_run = time.perf_counter() - t_start
        files = write_report(results.to_dict(), out)
    return {"report": files["report"], "failed": failed, "results": results}


def _client(scheduler: str | None) -> Any:
    if scheduler is None:
        return contextlib.nullcontext()
    from featx.cluster import dask_client

    return dask_client(scheduler)


def _grid(
    config: BenchConfig,
    datasets: list[_Dataset],
    out: Path,
    results: BenchResults,
    run: Any,
    *,
    loaded: dict[str, tuple[Any, str]],
    cache_dir: str | None,
    progress: bool,
) -> None:
    """Walk the grid in its order: ``run(cell, kind, ctx, fresh_process, after=None)`` gives each cell's record (or
    :class:`Failed`), and each dataset x backbone's :class:`DatasetResult` is assembled from them into ``results``.
    ``after``: the id of a cell whose output this one reads (the few-shot heads read the features cell's caches); run
    here, the grid's order sees to it, on a cluster it is a Dask task dependency."""
    for d in datasets:
        ds, dataset_print = loaded[d.path]
        for backbone in config.backbones:
            key = d.label if len(config.backbones) == 1 else f"{d.label} / {backbone}"
            b = backbone.replace(":", "_")
            slug, legacy = f"{d.prefix}-{b}", (f"{d.legacy}-{b}" if d.legacy else None)

            def ids(suffix: str, s: str = slug, old: str | None = legacy, data: str = dataset_print) -> _CellRef:
                return f"{s}-{suffix}", (f"{old}-{suffix}" if old else None), data

            plan = SplitPlan(config.val_fraction, config.test_fraction, config.seed)
            cap = config.cap_for(d.path)
            image_size = config.image_size_for(d.path)
            rows = CellRows.of(ds, plan, cap)
            ctx = CellContext(
                cell_id="",
                dataset=str(ds.root if ds.source == "imagefolder" else d.path),
                backbone=backbone,
                weights=config.weights,
                image_size=image_size,
                device=config.device,
                seed=config.seed,
                val_fraction=config.val_fraction,
                test_fraction=config.test_fraction,
                heads=tuple(config.heads),
                finetune=config.finetune_for(d.path),  # with this dataset's augmentation
                final_fit=config.final_fit,
                rows=rows,
                cache_dir=cache_dir,
                progress=progress,
            )
            n_train, n_val = len(rows.selections["train"]), len(rows.selections["val"])
            entry = DatasetResult(
                dataset=d.path,
                backbone=backbone,
                image_size=image_size,
                classes=list(ds.classes),
                splits=plan.describe(ds),
                final_fit=config.final_fit,
                position_sources=rows.sources,
                n_fit=n_train + n_val if config.final_fit == "train+val" else n_train,
            )
            if cap:
                entry.splits["train"] += f", capped at {cap} per class -> {n_train} images"
            feats = run(ids("features"), "features", ctx, fresh_process=True)
            if isinstance(feats, FeaturesCell):
                entry.rows += feats.rows
                entry.extraction = feats.extraction
                entry.images_per_class_all = feats.n_train / max(1, len(ds.classes))
            else:
                entry.rows += [ResultRow(FEATURES, h, status="failed", error=feats.error) for h in config.heads]
            for strategy in config.strategies:
                c = dataclasses.replace(
                    ctx, strategy=strategy, grid=config.grid_for(strategy), run_dir=str(out / "runs" / f"{slug}-{strategy}")
                )
                r = run(ids(f"finetune-{strategy}"), "finetune", c, fresh_process=True)
                entry.rows.append(
                    r.row if isinstance(r, FinetuneCell) else ResultRow(FINETUNE, strategy, status="failed", error=r.error)
                )
            if config.fewshot:
                few = config.fewshot
                fs = dataclasses.replace(ctx, fewshot=few)
                r = run(ids("fewshot-heads"), "fewshot_heads", fs, fresh_process=False, after=ids("features")[0])
                if isinstance(r, FewshotHeadsCell):
                    entry.fewshot += r.points
                    entry.fewshot_skipped = list(r.skipped)
                for row in entry.rows:
                    if row.accuracy is not None and (row.family == FEATURES or row.strategy == few.finetune_strategy):
                        entry.fewshot.append(
                            FewshotPoint(
                                method=row.strategy if row.family == FEATURES else f"finetune:{row.strategy}",
                                family=row.family,
                                shots="all",
                                draw=0,
                                accuracy=row.accuracy,
                                selection="val",
                                n_fit=row.n_fit,
                                train_positions=row.train_positions,
                            )
                        )
                if few.finetune_strategy:
                    ft = dict(ctx.finetune)
                    if few.finetune_rule_steps:
                        ft["rule_steps"] = few.finetune_rule_steps
                    for shots in few.finetune_shots:
                        try:
                            plan.fewshot(ds, shots, 0)
                        except UsageError as exc:
                            entry.fewshot_skipped.append(f"finetune {shots} shots: {exc}")
                            continue
                        for draw in range(few.finetune_draws):
                            c = dataclasses.replace(
                                ctx,
                                strategy=few.finetune_strategy,
                                shots=shots,
                                draw=draw,
                                finetune=ft,
                                run_dir=str(out / "runs" / f"{slug}-fewshot-{shots}-{draw}"),
                            )
                            r = run(ids(f"fewshot-ft-{shots}-{draw}"), "fewshot_finetune", c, fresh_process=False)
                            if not isinstance(r, _Failed):
                                entry.fewshot += r.points
            if config.layerwise:
                r = run(ids("layerwise"), "layerwise", ctx, fresh_process=False)
                if not isinstance(r, _Failed):
                    entry.layerwise = list(r.points)
            results.datasets[key] = entry


def _read_cell(path: Path, kind: str) -> CellRecord | None:
    """A finished cell's file as its kind's record; None (the cell runs again) when it cannot be read or is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("cell file %s cannot be read (%s); running the cell again", path, type(exc).__name__)
        return None
    try:
        return CELL_RECORDS[kind].from_dict(data, where=str(path))  # type: ignore[return-value]
    except UsageError as exc:
        log.warning("cell file %s is not a %s cell (%s); running the cell again", path, kind, exc)
        return None
