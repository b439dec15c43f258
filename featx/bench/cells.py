"""The five kinds of bench cell, each a module-level function (it runs in a fresh or shared helper process):
``cell(ctx, meter)`` takes a :class:`~featx.bench.context.CellContext` and returns its cell record, whose
``to_dict()`` (with ``cell_seconds`` and the runner's ``fingerprint``) is the cell's file ``<out>/cells/<id>.json``.
Rows and points are :mod:`featx.records` records."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from featx.backbones import POOLED
from featx.bench.context import CellContext
from featx.bench.memory import TreeMemory, device_peak_mb
from featx.data import RowSelection, load_dataset
from featx.errors import UsageError
from featx.records import FEATURES, FINETUNE, FewshotPoint, LayerPoint, Record, ResultRow

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# What a cell returns (and its file holds): records, the cell's seconds, and the fingerprint the runner adds


@dataclass(kw_only=True)
class _Cell(Record):
    """What every cell file holds beside its records: the cell's seconds and the fingerprint the runner adds."""

    cell_seconds: float | None = None
    fingerprint: dict[str, Any] | None = None


@dataclass
class FeaturesCell(_Cell):
    """Extraction + every head: one row per head, the extraction's costs, the rows' sizes and classes."""

    _lists: ClassVar[dict[str, type[Record]]] = {"rows": ResultRow}

    rows: list[ResultRow]
    extraction: dict[str, Any]
    n_train: int
    classes: list[str]
    splits: dict[str, int]


@dataclass
class FinetuneCell(_Cell):
    """One fine-tuning strategy's row."""

    _records: ClassVar[dict[str, type[Record]]] = {"row": ResultRow}

    row: ResultRow


@dataclass
class FewshotHeadsCell(_Cell):
    """Every head on every few-shot draw; shot counts the dataset cannot draw are listed in ``skipped``."""

    _lists: ClassVar[dict[str, type[Record]]] = {"points": FewshotPoint}

    points: list[FewshotPoint]
    skipped: list[str] = field(default_factory=list)


@dataclass
class FewshotFinetuneCell(_Cell):
    """One fine-tuning few-shot draw (one point)."""

    _lists: ClassVar[dict[str, type[Record]]] = {"points": FewshotPoint}

    points: list[FewshotPoint]


@dataclass
class LayerwiseCell(_Cell):
    """The layer-wise probe: one point per tapped layer."""

    _lists: ClassVar[dict[str, type[Record]]] = {"points": LayerPoint}

    points: list[LayerPoint]


CellRecord = FeaturesCell | FinetuneCell | FewshotHeadsCell | FewshotFinetuneCell | LayerwiseCell


# --------------------------------------------------------------------------------------------------
# Helpers of the cells


def _feature_sets(ds: Any, ctx: CellContext, layer: str = POOLED) -> tuple[dict[str, Any], list[Any], float]:
    """Extract (or hit) every split's cache; returns the plan-resolved train/val/test FeatureSets, the extraction
    results and the seconds extract() took in this call."""
    from featx.cache import load_cache
    from featx.extraction import extract
    from featx.heads import split_features

    t0 = time.perf_counter()
    results = extract(
        ds,
        _embedder(ctx, layer),
        device=ctx.device,
        cache_dir=ctx.cache_dir,
        progress=ctx.progress,
    )
    seconds = time.perf_counter() - t0
    loaded = {r.split: load_cache(r.path) for r in results}
    sets = split_features(loaded["train"], loaded.get("val"), loaded.get("test"), ctx.plan)
    return sets, results, seconds


def _embedder(ctx: CellContext, layer: str = POOLED) -> Any:
    """The cell's EmbedderSpec (resolved in the cell's own process: it hashes the weights file)."""
    from featx.backbones import embedder_spec

    return embedder_spec(backbone=ctx.backbone, weights=ctx.weights, image_size=ctx.image_size, layer=layer)


def _timed_build(ctx: CellContext) -> float:
    """Seconds to build the cell's backbone: importing torch and the model library, then constructing the pretrained
    model. Both families' cells call this first thing in their fresh process, so it is the cold build, timed the same
    way on both sides; the model is dropped at once (each family then builds its own, warm)."""
    from featx.backbones import build_backbone

    t0 = time.perf_counter()
    bb = build_backbone(ctx.backbone, ctx.weights, image_size=ctx.image_size)
    seconds = time.perf_counter() - t0
    del bb
    return seconds


def _val_log_loss(kind: str, head: Any, tr: Any, va: Any, final_fit: str, seed: int) -> float | None:
    """Mean log-loss (natural log) on val of the model val chose: the chosen hyper-parameters trained on train only,
    like fine-tuning's ``val_log_loss`` at its chosen epoch (after a train + val refit the final model has seen val,
    so it is refit on train here). None for heads without ``predict_proba`` (the SVMs). The report uses it only to
    break val-accuracy ties; its refit is not part of the head's costs."""
    if not len(va.labels) or not hasattr(head.estimator, "predict_proba"):
        return None
    estimator = head.estimator
    if final_fit != "train":
        from featx.heads import fit_head_arrays

        estimator = fit_head_arrays(
            kind,
            tr.features,
            tr.labels,
            X_val=va.features,
            y_val=va.labels,
            grid=[head.best_params],
            final_fit="train",
            seed=seed,
        ).estimator
    proba = np.asarray(estimator.predict_proba(va.features), dtype=np.float64)
    column = {int(c): i for i, c in enumerate(estimator.classes_)}
    p = np.array([proba[i, column[int(y)]] if int(y) in column else 0.0 for i, y in enumerate(va.labels)])
    return float(np.mean(-np.log(np.clip(p, np.finfo(np.float64).eps, 1.0))))


def _cache_seconds(path: Path) -> float:
    from featx.cache import read_cache_attrs

    return float(read_cache_attrs(path).get("extraction_seconds", 0.0))


def _recorded_positions(result: dict[str, Any], name: str, source: str) -> list[int] | None:
    """Fine-tuning's ``<name>_rows`` record ([split, position] pairs) as the bench rows' bare positions."""
    rows = RowSelection.from_record(result.get(f"{name}_rows"), source)
    return None if rows is None else list(rows.positions)


def cell_features(ctx: CellContext, meter: TreeMemory) -> FeaturesCell:
    """Extraction + every head, on exactly the rows fine-tuning gets, with the costs counted like fine-tuning's.

    Wall time = dataset scan + model build + forward passes over the images the heads use + the head's sweep
    and final fit. The build is :func:`_timed_build`, first thing in this fresh process, as in the fine-tuning
    cell: charged in full, once, whether the caches hit or not. The forward passes are the seconds the extraction
    of each split spent in them (stored in its cache, so a cache hit is charged what its extraction took; the
    model build inside ``extract()`` is not in them); when the train split is capped they are pro-rated by the
    measured seconds per image of each split (``extract_seconds``), so images the heads never see are not charged.
    """
    build_seconds = _timed_build(ctx)  # before anything else imports torch

    from featx.heads import fit_head, head_kind

    t0 = time.perf_counter()
    ds = load_dataset(ctx.dataset)
    scan_seconds = time.perf_counter() - t0
    sets, results, extract_call = _feature_sets(ds, ctx)
    per_image = {r.split: _cache_seconds(r.path) / max(1, r.n_images) for r in results}
    selected = ctx.rows.selections
    tr = sets["train"].select(selected["train"])
    va, te = sets["val"], sets["test"]
    used = {name: len(rows) for name, rows in selected.items()}
    extract_used = sum(per_image[selected[name].split] * n for name, n in used.items())
    extract_all = sum(per_image[r.split] * r.n_images for r in results)
    n_images = sum(r.n_images for r in results)
    device_peak = device_peak_mb(ctx.device)
    rows = []
    for kind in ctx.heads:
        t1 = time.perf_counter()
        head = fit_head(tr, va, te, kind=kind, plan=ctx.plan, final_fit=ctx.final_fit)
        predictions = head.predict(te.features)
        fit_seconds = time.perf_counter() - t1
        m = head.test_metrics or {}
        host = meter.peak_mb
        md = head.metadata
        val_log_loss = _val_log_loss(kind, head, tr, va, md.get("final_fit", ctx.final_fit), ctx.seed)
        rows.append(
            ResultRow(
                family=FEATURES,
                strategy=kind,
                accuracy=m.get("accuracy"),
                accuracy_ci95=m.get("accuracy_ci95"),
                macro_f1=m.get("macro_f1"),
                macro_recall=m.get("macro_recall"),
                mean_per_class_accuracy=m.get("mean_per_class_accuracy"),
                val_accuracy=head.val_accuracy,
                val_log_loss=val_log_loss,
                selection=md.get("selection", "val"),
                hyperparameters=head.best_params,
                at_grid_edge=bool(md["at_grid_edge"]),
                sweep=[{**c["params"], "val_accuracy": c["val_accuracy"]} for c in head.sweep],
                final_fit=md.get("final_fit", ctx.final_fit),
                n_fit=md.get("n_fit"),
                n_train=len(tr.labels),
                n_val=len(va.labels),
                scan_seconds=scan_seconds,
                build_seconds=build_seconds,
                extract_seconds=extract_used,
                fit_seconds=fit_seconds,
                wall_seconds=scan_seconds + build_seconds + extract_used + fit_seconds,
                peak_memory_mb=device_peak if device_peak is not None else host,
                memory_kind="cuda" if device_peak is not None else "rss",
                host_rss_mb=host,
                trainable_params=head_kind(kind).count_params(head.estimator),
                images_per_s=n_images / extract_all if extract_all else None,
                train_positions=[int(p) for p in tr.indices],
                val_positions=[int(p) for p in va.indices],
                test_positions=[int(p) for p in te.indices],
                test_predictions=[int(p) for p in predictions],
                test_labels=[int(y) for y in te.labels],
                confusion_matrix=m.get("confusion_matrix"),
            )
        )
    return FeaturesCell(
        rows=rows,
        extraction={
            "seconds": extract_used,
            "seconds_all_splits": extract_all,
            "accounting": "forward-pass seconds per image of each split (stored in its cache) x images the heads use; "
            "the backbone build counted once, in full (build_seconds)",
            "scan_seconds": scan_seconds,
            "build_seconds": build_seconds,
            "images_per_s": n_images / extract_all if extract_all else None,
            "n_images": n_images,
            "n_images_used": sum(used.values()),
            "peak_memory_mb": rows[0].host_rss_mb if rows else meter.peak_mb,
            "wall_this_run": extract_call,
            "cache_hits": sum(r.hit for r in results),
        },
        n_train=len(tr.labels),
        classes=list(tr.classes),
        splits={"train": len(tr.labels), "val": len(va.labels), "test": len(te.labels)},
    )


def _finetune_kwargs(ctx: CellContext, run_dir: Path) -> dict[str, Any]:
    from featx.finetuning import FinetuneConfig

    config = FinetuneConfig(**{**ctx.finetune, "strategy": ctx.strategy, "device": ctx.device, "seed": ctx.seed})
    return {
        "embedder": _embedder(ctx),
        "config": config,
        "split_plan": ctx.plan,
        "out_dir": run_dir,
        "progress": ctx.progress,
    }


def cell_finetune(ctx: CellContext, meter: TreeMemory) -> FinetuneCell:
    """One fine-tuning strategy: lr x weight-decay grid on val, then the final fit per ``final_fit``.

    Wall time = the build (:func:`_timed_build`, first thing in this fresh process, as in the features cell) + the
    fine-tuning call (dataset scan, training, test predictions) less its own build of the model, which runs warm
    by then and takes what a second :func:`_timed_build` took just before it: the build counts once, in full."""
    build_seconds = _timed_build(ctx)  # cold: before anything else imports torch
    rebuild_seconds = _timed_build(ctx)  # warm, like finetune()'s own build below

    from featx.finetuning import finetune, finetune_search

    run_dir = Path(ctx.run_dir)
    kwargs = _finetune_kwargs(ctx, run_dir)
    t0 = time.perf_counter()
    if ctx.grid:
        result = finetune_search(
            ctx.dataset, grid=ctx.grid, train_rows=ctx.rows.train_rows_list, final_fit=ctx.final_fit, resume=False, **kwargs
        )
    else:
        result = finetune(
            ctx.dataset,
            train_rows=ctx.rows.train_rows_list,
            final_fit=ctx.final_fit,
            selection="val",
            resume=(run_dir / "checkpoint.pt").is_file(),
            **kwargs,
        )
    call_seconds = time.perf_counter() - t0
    wall = build_seconds + max(0.0, call_seconds - rebuild_seconds)
    m = result["metrics"]
    host = meter.peak_mb
    cuda = result.get("memory_kind") == "cuda"
    chosen = result.get("chosen") or {}
    config = result.get("config") or {}
    return FinetuneCell(
        ResultRow(
            family=FINETUNE,
            strategy=ctx.strategy,
            accuracy=m["accuracy"],
            accuracy_ci95=m["accuracy_ci95"],
            macro_f1=m["macro_f1"],
            macro_recall=m["macro_recall"],
            mean_per_class_accuracy=m.get("mean_per_class_accuracy"),
            val_accuracy=result.get("val_accuracy"),
            val_log_loss=result.get("val_log_loss"),
            selection="val",
            hyperparameters={
                "lr": chosen.get("lr", config.get("lr")),
                "weight_decay": chosen.get("weight_decay", config.get("weight_decay")),
                "epochs": chosen.get("epochs", result.get("best_epoch")),
                "optimizer": config.get("optimizer"),
            },
            grid=result.get("grid"),
            best_epoch=result.get("best_epoch"),
            epochs_run=result.get("epochs_run"),
            epochs_budget=result.get("epochs_budget", config.get("epochs")),
            still_improving=result.get("still_improving"),
            backbone_updated=result.get("backbone_updated"),
            fine_tune_epochs=result.get("fine_tune_epochs"),
            augment=result.get("augment"),
            final_fit=result.get("final_fit", ctx.final_fit),
            n_fit=result.get("n_fit"),
            n_train=result.get("n_train"),
            n_val=result.get("n_val"),
            build_seconds=build_seconds,
            wall_seconds=wall,
            finetune_call_seconds=call_seconds,
            rebuild_seconds=rebuild_seconds,
            reported_wall_seconds=result.get("wall_seconds"),
            train_seconds=result.get("train_seconds"),
            peak_memory_mb=result["peak_memory_mb"] if cuda else host,
            memory_kind="cuda" if cuda else "rss",
            host_rss_mb=host,
            trainable_params=result.get("trainable_params"),
            images_per_s=result.get("train_images_per_s"),
            train_positions=_recorded_positions(result, "train", ctx.rows.sources["train"]),
            val_positions=_recorded_positions(result, "val", ctx.rows.sources["val"]),
            test_positions=_recorded_positions(result, "test", ctx.rows.sources["test"]),
            test_predictions=[int(p) for p in result["test_predictions"]],
            test_labels=[int(y) for y in result["test_labels"]],
            confusion_matrix=m.get("confusion_matrix"),
        )
    )


def cell_fewshot_heads(ctx: CellContext, meter: TreeMemory) -> FewshotHeadsCell:
    """Every head on every draw: exactly k labelled images per class, no val labels (CV inside the draw, or
    the heads' fixed rule when k is too small)."""
    from featx.heads import fit_head_arrays

    ds = load_dataset(ctx.dataset)
    sets, _, _ = _feature_sets(ds, ctx)
    te = sets["test"]
    few = ctx.fewshot
    plan = ctx.plan
    points, skipped = [], []
    for shots in few.shots:
        for draw in range(few.draws):
            try:
                drawn = plan.fewshot(ds, shots, draw)
            except UsageError as exc:
                skipped.append(f"{shots} shots: {exc}")
                break
            tr = sets["train"].select(plan.resolve(ds, drawn)["train"])
            for kind in ctx.heads:
                hf = fit_head_arrays(kind, tr.features, tr.labels, cv_folds=5, seed=plan.draw_seed(shots, draw))
                acc = float(np.mean(hf.estimator.predict(te.features) == te.labels))
                points.append(
                    FewshotPoint(
                        method=kind,
                        family=FEATURES,
                        shots=shots,
                        draw=draw,
                        accuracy=acc,
                        selection=hf.selection,
                        hyperparameters=hf.best_params,
                        n_fit=int(hf.n_fit),
                        train_positions=[int(p) for p in tr.indices],
                    )
                )
    return FewshotHeadsCell(points, skipped)


def cell_fewshot_finetune(ctx: CellContext, meter: TreeMemory) -> FewshotFinetuneCell:
    """One fine-tuning draw: the heads' draw of the same (shots, draw), hyper-parameters from the fixed rule."""
    from featx.finetuning import finetune

    ds = load_dataset(ctx.dataset)
    plan = ctx.plan
    drawn = plan.fewshot(ds, ctx.shots, ctx.draw)
    positions = plan.resolve(ds, drawn)["train"]
    run_dir = Path(ctx.run_dir)
    result = finetune(
        ctx.dataset,
        train_rows=drawn,
        selection="rule",
        final_fit="train",
        resume=(run_dir / "checkpoint.pt").is_file(),
        **_finetune_kwargs(ctx, run_dir),
    )
    used = _recorded_positions(result, "train", positions.split)
    point = FewshotPoint(
        method=f"finetune:{ctx.strategy}",
        family=FINETUNE,
        shots=ctx.shots,
        draw=ctx.draw,
        accuracy=result["metrics"]["accuracy"],
        selection="rule",
        hyperparameters={"epochs": result.get("epochs_run"), "lr": (result.get("config") or {}).get("lr")},
        backbone_updated=result.get("backbone_updated"),
        fine_tune_epochs=result.get("fine_tune_epochs"),
        augment=result.get("augment"),
        n_fit=result.get("n_fit", result.get("n_train")),
        train_positions=used if used is not None else list(positions.positions),
    )
    return FewshotFinetuneCell([point])


def cell_layerwise(ctx: CellContext, meter: TreeMemory) -> LayerwiseCell:
    """Logistic-regression probe on each stage's pooled features (one forward pass for all layers), on the rows
    the other cells get; the best layer is picked on val by the report. Each point carries the probe's per-image
    test predictions with their ``test_positions`` (the rows' format and order) and labels, so the report can pair
    the chosen layer with fine-tuning, and its ``val_log_loss`` (the val tie-break)."""
    from featx.backbones import build_backbone
    from featx.cache import FeatureSet
    from featx.heads import fit_head
    from featx.inference import compute_features

    ds = load_dataset(ctx.dataset)
    resolved = ctx.plan.resolve(ds, ctx.rows.train_rows_list)
    bb = build_backbone(ctx.backbone, ctx.weights, image_size=ctx.image_size)
    model, dims = bb.multi_layer_model(bb.layers)
    bounds = np.cumsum([0, *dims])
    per_split = {}
    tap = dataclasses.replace(bb, model=model)  # same backbone and preprocessing, multi-layer output
    for name, rows in resolved.items():
        split = rows.split_of(ds)
        feats, errors = compute_features(tap, split.root, split.paths, device=ctx.device, progress=ctx.progress)
        ok = np.array([not e for e in errors], dtype=bool)
        per_split[name] = (
            feats[ok],
            split.labels[ok],
            [p for p, good in zip(split.paths, ok) if good],
            split.classes,
            [p for p, good in zip(rows.positions, ok) if good],  # positions in the source split, like the rows' *_positions
        )
    test_positions, test_labels = per_split["test"][4], [int(y) for y in per_split["test"][1]]
    points = []
    for depth, layer in enumerate(bb.layers):
        sets = {}
        for name, (feats, labels, paths, classes, _) in per_split.items():
            sets[name] = FeatureSet(
                feats[:, bounds[depth] : bounds[depth + 1]],
                labels,
                paths,
                np.arange(len(labels)),
                list(classes),
                {"embedder": bb.embedder(layer).to_dict()},
                Path("."),
            )
        head = fit_head(sets["train"], sets["val"], sets["test"], kind="logreg", final_fit=ctx.final_fit)
        m = head.test_metrics or {}
        scores = _layer_scores(sets["train"].features, sets["train"].labels, layer)
        points.append(
            LayerPoint(
                layer=layer,
                depth=depth,
                dim=dims[depth],
                val_accuracy=head.val_accuracy,
                val_log_loss=_val_log_loss("logreg", head, sets["train"], sets["val"], ctx.final_fit, ctx.seed),
                accuracy=m.get("accuracy"),
                macro_f1=m.get("macro_f1"),
                accuracy_ci95=m.get("accuracy_ci95"),
                hyperparameters=head.best_params,
                test_predictions=[int(p) for p in head.predict(sets["test"].features)],
                test_positions=test_positions,
                test_labels=test_labels,
                scores=scores,
            )
        )
    return LayerwiseCell(points)


def _layer_scores(features: np.ndarray, labels: np.ndarray, layer: str) -> dict[str, float] | None:
    """LogME of one layer on the probe's train rows (featx.ranking), or None when the rows cannot be scored."""
    from featx.ranking import logme

    try:
        return {"logme": logme(features, labels)}
    except UsageError as exc:
        log.warning("layer %s: no LogME (%s)", layer, exc)
        return None


#: The cell kinds: the function that runs each (by the name the runner and the fingerprints use).
CELLS: dict[str, Callable[[CellContext, TreeMemory], CellRecord]] = {
    "features": cell_features,
    "finetune": cell_finetune,
    "fewshot_heads": cell_fewshot_heads,
    "fewshot_finetune": cell_fewshot_finetune,
    "layerwise": cell_layerwise,
}
#: Each kind's record: what its cell file is read back with.
CELL_RECORDS: dict[str, type[Record]] = {
    "features": FeaturesCell,
    "finetune": FinetuneCell,
    "fewshot_heads": FewshotHeadsCell,
    "fewshot_finetune": FewshotFinetuneCell,
    "layerwise": LayerwiseCell,
}


def run_cell(kind: str, ctx: CellContext, child: bool = True) -> CellRecord:
    """Run one cell; in a fresh process (``child``) first set up logging at the bench's level, so ``-q``
    quiets the children too."""
    from joblib.externals.loky import get_reusable_executor

    if child:
        logging.basicConfig(level=ctx.log_level, format="%(levelname)s %(name)s: %(message)s", force=True)
        logging.getLogger("featx").setLevel(ctx.log_level)
        logging.captureWarnings(True)
        log.info("cell %s runs in process %d", ctx.cell_id, os.getpid())
    t0 = time.perf_counter()
    with TreeMemory() as meter:
        try:
            out = CELLS[kind](ctx, meter)
        finally:
            # joblib keeps its sweep workers alive for 300 s; a cell's process must not wait for them at exit
            get_reusable_executor().shutdown(wait=True)
    return dataclasses.replace(out, cell_seconds=time.perf_counter() - t0)
