"""``featx bench``: feature extraction + heads vs fine-tuning on a declared grid, cell by cell.

Each cell (features+heads, one fine-tuning strategy, one few-shot draw, the layer-wise probe) writes
``<out>/cells/<id>.json`` when it finishes; re-running skips finished cells. Cells whose memory is
reported run in a fresh process each (peak RSS is a per-process maximum). Whatever shrinks the grid
for a compute budget (a cap on training images per class, epochs, draws) is applied to both
strategies alike, and is written into the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__
from featx.backbones import DEFAULT_BACKBONE, POOLED
from featx.data import SAMPLE_DATASET, SplitPlan, load_dataset, sample_per_class
from featx.errors import UsageError
from featx.heads import fit_head

log = logging.getLogger(__name__)


@dataclass
class FewShotConfig:
    shots: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    draws: int = 5  # random draws per shot count for heads (cheap)
    finetune_strategy: str | None = "lp-ft"  # None: heads only
    finetune_shots: list[int] = field(default_factory=lambda: [1, 5, 20])
    finetune_draws: int = 2
    finetune_epochs: int | None = None  # default: the main fine-tuning epochs


@dataclass
class BenchConfig:
    """A grid: datasets × backbones × (heads on cached features, fine-tuning strategies)."""

    datasets: list[str] = field(default_factory=lambda: [str(SAMPLE_DATASET)])
    backbones: list[str] = field(default_factory=lambda: [DEFAULT_BACKBONE])
    weights: str = "imagenet"
    image_size: int | None = None
    heads: list[str] = field(default_factory=lambda: ["logreg", "linear-svm", "rbf-svm", "knn"])
    strategies: list[str] = field(default_factory=lambda: ["head", "partial", "full", "lp-ft"])
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields
    max_train_per_class: int | dict[str, int | None] | None = None  # cap applied to heads and fine-tuning alike
    fewshot: FewShotConfig | None = field(default_factory=FewShotConfig)
    layerwise: bool = True
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    budget_notes: list[str] = field(default_factory=list)
    quick: bool = False

    def cap_for(self, dataset_name: str) -> int | None:
        if isinstance(self.max_train_per_class, dict):
            return self.max_train_per_class.get(dataset_name)
        return self.max_train_per_class


QUICK = {
    "quick": True,
    "datasets": [str(SAMPLE_DATASET)],
    "heads": ["logreg", "linear-svm", "knn"],
    "strategies": ["head", "lp-ft"],
    "image_size": 160,
    "finetune": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
    "fewshot": {
        "shots": [1, 2, 5, 10],
        "draws": 3,
        "finetune_strategy": "lp-ft",
        "finetune_shots": [2],
        "finetune_draws": 1,
        "finetune_epochs": 2,
    },
    "layerwise": True,
    "budget_notes": [
        "Quick mode: embedded 250-image sample (15 train / 4 val / 6 test images per class), 160 px input for "
        "extraction and fine-tuning alike, 2 fine-tuning epochs, strategies head and lp-ft only, one few-shot "
        "fine-tuning draw. A smoke test of the whole pipeline, not a benchmark: 60 test images give wide intervals.",
    ],
}


def load_bench_config(
    path: str | os.PathLike[str] | None = None,
    *,
    quick: bool = False,
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    device: str | None = None,
) -> BenchConfig:
    """Read a YAML/TOML grid (or the quick preset); flags override the file."""
    raw: dict[str, Any] = dict(QUICK) if quick else {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"bench config not found: {p}")
        text = p.read_text()
        try:
            if p.suffix == ".toml":
                import tomllib

                loaded = tomllib.loads(text)
            else:
                import yaml

                loaded = yaml.safe_load(text) or {}
        except Exception as exc:
            raise UsageError(f"cannot parse {p}: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{p} must hold a mapping of settings")
        raw.update(loaded)
    if datasets:
        raw["datasets"] = datasets
    if backbones:
        raw["backbones"] = backbones
    if device:
        raw["device"] = device
    known = {f.name for f in fields(BenchConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"unknown bench setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    few = raw.get("fewshot", {})
    if few is not None:
        bad = sorted(set(few) - {f.name for f in fields(FewShotConfig)})
        if bad:
            raise UsageError(f"unknown fewshot setting(s): {', '.join(bad)}")
        raw["fewshot"] = FewShotConfig(**few)
    config = BenchConfig(**raw)
    _validate(config)
    return config


def _validate(config: BenchConfig) -> None:
    from featx.backbones import canonical_name
    from featx.finetuning import STRATEGIES, FinetuneConfig
    from featx.heads import HEADS

    for d in config.datasets:
        if not Path(d).exists():
            raise UsageError(f"bench dataset not found: {d}")
    for b in config.backbones:
        canonical_name(b)
    bad = [h for h in config.heads if h not in HEADS]
    if bad:
        raise UsageError(f"unknown head(s) in bench config: {', '.join(bad)}")
    bad = [s for s in config.strategies if s not in STRATEGIES]
    if bad:
        raise UsageError(f"unknown strategy(ies) in bench config: {', '.join(bad)}")
    try:
        FinetuneConfig(**config.finetune).validate()
    except TypeError as exc:
        raise UsageError(f"bad finetune settings in bench config: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Cells (module-level functions: they run in fresh processes)


def _train_positions(ds: Any, plan: SplitPlan, cap: int | None, seed: int) -> np.ndarray | None:
    """Positions within the plan's train rows kept under a per-class cap (None = all)."""
    if not cap:
        return None
    source, rows = plan.resolve(ds)["train"]
    labels = ds.split(source).labels[rows]
    return sample_per_class(labels, cap, seed=seed)


def _feature_sets(ds: Any, ctx: dict[str, Any], cache_dir: str | None, layer: str = POOLED) -> tuple[dict[str, Any], list[Any]]:
    """Extract (or hit) every split's cache; returns the plan-resolved train/val/test FeatureSets."""
    from featx.cache import load_cache
    from featx.extraction import extract
    from featx.heads import split_features

    results = extract(
        ds,
        backbone=ctx["backbone"],
        weights=ctx["weights"],
        image_size=ctx["image_size"],
        layer=layer,
        device=ctx["device"],
        cache_dir=cache_dir,
        progress=ctx["progress"],
    )
    loaded = {r.split: load_cache(r.path) for r in results}
    plan = SplitPlan(ctx["val_fraction"], ctx["test_fraction"], ctx["seed"])
    sets = split_features(loaded["train"], loaded.get("val"), loaded.get("test"), plan)
    return sets, results


def cell_features(ctx: dict[str, Any]) -> dict[str, Any]:
    """Extraction (all splits) + every head, on the same training rows as fine-tuning."""
    from featx.runtime import peak_rss_mb

    t0 = time.perf_counter()
    ds = load_dataset(ctx["dataset"])
    sets, results = _feature_sets(ds, ctx, ctx["cache_dir"])
    extract_wall = time.perf_counter() - t0
    # what a first extraction cost, even when this run hit the cache (recorded in the file)
    extract_seconds = sum(float(r.seconds if not r.hit else _cache_seconds(r.path)) for r in results)
    n_images = sum(r.n_images for r in results)
    extract_peak = peak_rss_mb()
    tr = sets["train"]
    positions = ctx.get("train_positions")
    if positions is not None:
        tr = tr.subset(np.asarray(positions))
    rows = []
    for kind in ctx["heads"]:
        t1 = time.perf_counter()
        head = fit_head(tr, sets["val"], sets["test"], kind=kind)
        fit_seconds = time.perf_counter() - t1
        m = head.test_metrics or {}
        n_params = _head_params(head.estimator)
        rows.append(
            {
                "family": "features",
                "strategy": kind,
                "accuracy": m.get("accuracy"),
                "accuracy_ci95": m.get("accuracy_ci95"),
                "macro_f1": m.get("macro_f1"),
                "macro_recall": m.get("macro_recall"),
                "mean_per_class_accuracy": m.get("mean_per_class_accuracy"),
                "extract_seconds": extract_seconds,
                "fit_seconds": fit_seconds,
                "wall_seconds": extract_seconds + fit_seconds,
                "peak_memory_mb": peak_rss_mb(),
                "memory_kind": "rss",
                "trainable_params": n_params,
                "hyperparameters": head.best_params,
                "val_accuracy": head.val_accuracy,
                "images_per_s": n_images / extract_seconds if extract_seconds else None,
                "n_train": len(tr.labels),
                "confusion_matrix": m.get("confusion_matrix"),
            }
        )
    return {
        "rows": rows,
        "extraction": {
            "seconds": extract_seconds,
            "images_per_s": n_images / extract_seconds if extract_seconds else None,
            "n_images": n_images,
            "peak_memory_mb": extract_peak,
            "wall_this_run": extract_wall,
            "cache_hits": sum(r.hit for r in results),
        },
        "n_train": len(tr.labels),
        "classes": list(tr.classes),
        "splits": {"train": len(tr.labels), "val": len(sets["val"].labels), "test": len(sets["test"].labels)},
    }


def _cache_seconds(path: Path) -> float:
    from featx.cache import read_cache_attrs

    return float(read_cache_attrs(path).get("extraction_seconds", 0.0))


def _head_params(estimator: Any) -> int | None:
    last = estimator[-1] if hasattr(estimator, "__getitem__") else estimator
    if hasattr(last, "coef_"):
        return int(last.coef_.size + np.size(getattr(last, "intercept_", 0)))
    if hasattr(last, "dual_coef_"):
        return int(last.dual_coef_.size + last.support_vectors_.size)
    if hasattr(last, "_fit_X"):
        return int(last._fit_X.size)  # k-NN stores the training set
    return None


def _finetune(ctx: dict[str, Any], train_positions: Any) -> dict[str, Any]:
    """One fine-tuning run of a cell; resumes from the run folder's checkpoint after an interruption."""
    from featx.finetuning import FinetuneConfig, finetune

    config = FinetuneConfig(**{**ctx["finetune"], "strategy": ctx["strategy"], "device": ctx["device"], "seed": ctx["seed"]})
    run_dir = Path(ctx["run_dir"])
    return finetune(
        ctx["dataset"],
        backbone=ctx["backbone"],
        weights=ctx["weights"],
        image_size=ctx["image_size"],
        config=config,
        split_plan=SplitPlan(ctx["val_fraction"], ctx["test_fraction"], ctx["seed"]),
        train_rows=train_positions,
        out_dir=run_dir,
        resume=(run_dir / "checkpoint.pt").is_file(),
        progress=ctx["progress"],
    )


def cell_finetune(ctx: dict[str, Any]) -> dict[str, Any]:
    result = _finetune(ctx, ctx.get("train_positions"))
    m = result["metrics"]
    return {
        "row": {
            "family": "finetune",
            "strategy": ctx["strategy"],
            "accuracy": m["accuracy"],
            "accuracy_ci95": m["accuracy_ci95"],
            "macro_f1": m["macro_f1"],
            "macro_recall": m["macro_recall"],
            "mean_per_class_accuracy": m["mean_per_class_accuracy"],
            "wall_seconds": result["wall_seconds"],
            "train_seconds": result.get("train_seconds"),
            "peak_memory_mb": result["peak_memory_mb"],
            "memory_kind": result["memory_kind"],
            "trainable_params": result["trainable_params"],
            "epochs_run": result["epochs_run"],
            "images_per_s": result.get("train_images_per_s"),
            "val_accuracy": result.get("val_accuracy"),
            "n_train": result.get("n_train"),
            "confusion_matrix": m.get("confusion_matrix"),
        }
    }


def cell_fewshot_heads(ctx: dict[str, Any]) -> dict[str, Any]:
    ds = load_dataset(ctx["dataset"])
    sets, _ = _feature_sets(ds, ctx, ctx["cache_dir"])
    few = ctx["fewshot"]
    points = []
    for shots in few["shots"]:
        for draw in range(few["draws"]):
            idx = sample_per_class(sets["train"].labels, shots, seed=1000 * draw + shots)
            tr = sets["train"].subset(idx)
            for kind in ctx["heads"]:
                head = fit_head(tr, sets["val"], sets["test"], kind=kind)
                points.append({"method": kind, "shots": shots, "draw": draw, "accuracy": (head.test_metrics or {})["accuracy"]})
    return {"points": points}


def cell_fewshot_finetune(ctx: dict[str, Any]) -> dict[str, Any]:
    ds = load_dataset(ctx["dataset"])
    source, rows = SplitPlan(ctx["val_fraction"], ctx["test_fraction"], ctx["seed"]).resolve(ds)["train"]
    labels = ds.split(source).labels[rows]
    positions = sample_per_class(labels, ctx["shots"], seed=1000 * ctx["draw"] + ctx["shots"])  # same draw as the heads
    result = _finetune(ctx, positions)
    point = {"method": f"finetune:{ctx['strategy']}", "shots": ctx["shots"], "draw": ctx["draw"]}
    return {"points": [{**point, "accuracy": result["metrics"]["accuracy"]}]}


def cell_layerwise(ctx: dict[str, Any]) -> dict[str, Any]:
    """Logistic-regression probe on each stage's pooled features (one forward pass for all layers)."""
    from featx.backbones import build_backbone
    from featx.cache import FeatureSet
    from featx.inference import compute_features

    ds = load_dataset(ctx["dataset"])
    plan = SplitPlan(ctx["val_fraction"], ctx["test_fraction"], ctx["seed"])
    resolved = plan.resolve(ds)
    train_src, train_rows = resolved["train"]
    if ctx.get("train_positions") is not None:
        train_rows = train_rows[np.asarray(ctx["train_positions"])]
    resolved["train"] = (train_src, train_rows)
    bb = build_backbone(ctx["backbone"], ctx["weights"], image_size=ctx["image_size"])
    model, dims = bb.multi_layer_model(bb.layers)
    bounds = np.cumsum([0, *dims])
    per_split = {}
    tap = dataclasses.replace(bb, model=model)  # same backbone and preprocessing, multi-layer output
    for name, (src, rows) in resolved.items():
        split = ds.split(src).subset(rows)
        feats, errors = compute_features(tap, split.root, split.paths, device=ctx["device"], progress=ctx["progress"])
        ok = np.array([not e for e in errors])
        per_split[name] = (feats[ok], split.labels[ok], [p for p, good in zip(split.paths, ok) if good], split.classes)
    points = []
    for depth, layer in enumerate(bb.layers):
        sets = {}
        for name, (feats, labels, paths, classes) in per_split.items():
            sets[name] = FeatureSet(
                feats[:, bounds[depth] : bounds[depth + 1]],
                labels,
                paths,
                np.arange(len(labels)),
                list(classes),
                {"embedder": bb.embedder(layer).to_dict()},
                Path("."),
            )
        head = fit_head(sets["train"], sets["val"], sets["test"], kind="logreg")
        m = head.test_metrics or {}
        points.append(
            {
                "layer": layer,
                "depth": depth,
                "dim": dims[depth],
                "accuracy": m.get("accuracy"),
                "macro_f1": m.get("macro_f1"),
                "accuracy_ci95": m.get("accuracy_ci95"),
            }
        )
    return {"points": points}


_CELLS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "features": cell_features,
    "finetune": cell_finetune,
    "fewshot_heads": cell_fewshot_heads,
    "fewshot_finetune": cell_fewshot_finetune,
    "layerwise": cell_layerwise,
}


def _run_cell(kind: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from joblib.externals.loky import get_reusable_executor

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        out = _CELLS[kind](ctx)
    finally:
        # joblib keeps its sweep workers alive for 300 s; a cell's process must not wait for them at exit
        get_reusable_executor().shutdown(wait=True)
    return {**out, "cell_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores{gpu}; torch {torch.__version__}, featx {__version__}"


def run_bench(
    config: BenchConfig,
    *,
    out_dir: str | os.PathLike[str],
    cache_dir: str | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run every unfinished cell, then write report.md, results.json and the plots into ``out_dir``."""
    from featx.reporting import write_report

    out = Path(out_dir)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    failed = 0
    results: dict[str, Any] = {
        "meta": {
            "featx_version": __version__,
            "created_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command,
            "machine": _machine(),
            "quick": config.quick,
            "budget_notes": list(config.budget_notes),
        },
        "datasets": {},
    }

    def run(cell_id: str, kind: str, ctx: dict[str, Any], fresh_process: bool) -> dict[str, Any] | None:
        nonlocal failed
        path = cells_dir / f"{cell_id}.json"
        if path.is_file():
            log.info("skip finished cell %s", cell_id)
            return json.loads(path.read_text())
        log.info("run cell %s", cell_id)
        try:
            if fresh_process:
                with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                    data = pool.submit(_run_cell, kind, ctx).result()
            else:
                data = _run_cell(kind, ctx)
        except Exception as exc:
            failed += 1
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.error("cell %s failed: %s", cell_id, msg)
            log.debug("%s", traceback.format_exc())
            return {"error": msg}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float))
        os.replace(tmp, path)
        return data

    for dataset in config.datasets:
        ds = load_dataset(dataset)
        for backbone in config.backbones:
            key = ds.name if len(config.backbones) == 1 else f"{ds.name} / {backbone}"
            slug = f"{ds.name}-{backbone.replace(':', '_')}"
            plan = SplitPlan(config.val_fraction, config.test_fraction, config.seed)
            cap = config.cap_for(ds.name)
            positions = _train_positions(ds, plan, cap, config.seed)
            ctx = {
                "dataset": str(ds.root if ds.source == "imagefolder" else dataset),
                "backbone": backbone,
                "weights": config.weights,
                "image_size": config.image_size,
                "device": config.device,
                "cache_dir": cache_dir,
                "progress": progress,
                "val_fraction": config.val_fraction,
                "test_fraction": config.test_fraction,
                "seed": config.seed,
                "heads": config.heads,
                "finetune": config.finetune,
                "train_positions": positions.tolist() if positions is not None else None,
            }
            entry: dict[str, Any] = {
                "backbone": backbone,
                "classes": list(ds.classes),
                "rows": [],
                "fewshot": [],
                "layerwise": [],
                "splits": plan.describe(ds),
            }
            if cap:
                entry["splits"]["train"] += f", capped at {cap} per class -> {len(positions)} images"
            feats = run(f"{slug}-features", "features", ctx, fresh_process=True)
            if feats and "error" not in feats:
                entry["rows"] += feats["rows"]
                entry["extraction"] = feats["extraction"]
                entry["images_per_class_all"] = feats["n_train"] / max(1, len(ds.classes))
            else:
                entry["rows"] += [
                    {"family": "features", "strategy": h, "status": "failed", "error": (feats or {}).get("error", "?")}
                    for h in config.heads
                ]
            for strategy in config.strategies:
                c = {**ctx, "strategy": strategy, "run_dir": str(out / "runs" / f"{slug}-{strategy}")}
                r = run(f"{slug}-finetune-{strategy}", "finetune", c, fresh_process=True)
                entry["rows"].append(
                    r["row"]
                    if r and "row" in r
                    else {"family": "finetune", "strategy": strategy, "status": "failed", "error": (r or {}).get("error")}
                )
            if config.fewshot:
                few = asdict(config.fewshot)
                r = run(f"{slug}-fewshot-heads", "fewshot_heads", {**ctx, "fewshot": few}, fresh_process=False)
                if r and "points" in r:
                    entry["fewshot"] += r["points"]
                for row in entry["rows"]:
                    if row.get("accuracy") is not None and (
                        row["family"] == "features" or row["strategy"] == few["finetune_strategy"]
                    ):
                        method = row["strategy"] if row["family"] == "features" else f"finetune:{row['strategy']}"
                        entry["fewshot"].append({"method": method, "shots": "all", "draw": 0, "accuracy": row["accuracy"]})
                if few["finetune_strategy"]:
                    ft = dict(config.finetune)
                    if few["finetune_epochs"]:
                        ft["epochs"] = few["finetune_epochs"]
                    for shots in few["finetune_shots"]:
                        for draw in range(few["finetune_draws"]):
                            c = {
                                **ctx,
                                "strategy": few["finetune_strategy"],
                                "shots": shots,
                                "draw": draw,
                                "finetune": ft,
                                "run_dir": str(out / "runs" / f"{slug}-fewshot-{shots}-{draw}"),
                            }
                            r = run(f"{slug}-fewshot-ft-{shots}-{draw}", "fewshot_finetune", c, fresh_process=False)
                            if r and "points" in r:
                                entry["fewshot"] += r["points"]
            if config.layerwise:
                r = run(f"{slug}-layerwise", "layerwise", ctx, fresh_process=False)
                if r and "points" in r:
                    entry["layerwise"] = r["points"]
            results["datasets"][key] = entry
    files = write_report(results, out)
    return {"report": files["report"], "failed": failed, "results": results}
