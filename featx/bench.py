"""``featx bench``: feature extraction + heads vs fine-tuning on a declared grid, cell by cell.

Each cell (features+heads, one fine-tuning strategy, few-shot draws, the layer-wise probe) writes
``<out>/cells/<id>.json`` when it finishes; re-running skips finished cells. Cells whose costs are
reported run in a fresh process each (peak memory is a per-process maximum).

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
  build, the forward passes over the images it uses, fits or training. Peak memory is that of the cell's
  whole process tree (joblib and DataLoader workers included); on GPU both also report device peak memory.
* Whatever shrinks the grid for a compute budget (train cap, epochs, grid, draws) applies to both alike
  and is written into the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import threading
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

log = logging.getLogger(__name__)

FINAL_FITS = ("train+val", "train")
# lr x weight decay searched on val per fine-tuning strategy when the config names no grid. Sized for a GPU
# (the CPU bench shrinks it and says so); lr is the head LR, the backbone gets its configured fraction.
DEFAULT_FINETUNE_GRID: dict[str, list[float]] = {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "weight_decay": [0.0, 0.05]}


@dataclass
class FewShotConfig:
    shots: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    draws: int = 5  # draws per shot count for heads (>= 5 by default: cheap)
    finetune_strategy: str | None = "lp-ft"  # None: heads only
    finetune_shots: list[int] = field(default_factory=lambda: [2, 10])  # a subset of ``shots``
    finetune_draws: int = 3  # draws 0..finetune_draws-1, the same images as the heads' draws
    finetune_rule_steps: int | None = None  # optimizer steps of the few-shot rule (None: featx.finetuning.RULE_STEPS)


@dataclass
class BenchConfig:
    """A grid: datasets × backbones × (heads on cached features, fine-tuning strategies)."""

    datasets: list[str] = field(default_factory=lambda: [str(SAMPLE_DATASET)])
    backbones: list[str] = field(default_factory=lambda: [DEFAULT_BACKBONE])
    weights: str = "imagenet"
    image_size: int | dict[str, int | None] | None = None  # or {dataset_name: px}: both families alike
    heads: list[str] = field(default_factory=lambda: ["logreg", "linear-svm", "rbf-svm", "knn"])
    strategies: list[str] = field(default_factory=lambda: ["head", "partial", "full", "lp-ft"])
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields
    finetune_grid: dict[str, Any] | None = None  # {lr: [...], weight_decay: [...]} or {strategy: {...}}; None: default
    final_fit: str = "train+val"  # both families: "train+val" (refit after selection on val) or "train"
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

    def image_size_for(self, dataset_name: str) -> int | None:
        if isinstance(self.image_size, dict):
            return self.image_size.get(dataset_name)
        return self.image_size

    def grid_for(self, strategy: str) -> dict[str, list[float]]:
        from featx.finetuning import STRATEGIES

        grid = self.finetune_grid
        if grid is None:
            from featx import finetuning

            optimizer = self.finetune.get("optimizer", finetuning.FinetuneConfig.optimizer)
            grid = getattr(finetuning, "SEARCH_GRIDS", {}).get("gpu", {}).get(optimizer, DEFAULT_FINETUNE_GRID)
        if grid and set(grid) <= set(STRATEGIES):
            grid = grid.get(strategy) or {}
        return {k: list(v) for k, v in grid.items()}


QUICK = {
    "quick": True,
    "datasets": [str(SAMPLE_DATASET)],
    "heads": ["logreg", "linear-svm", "knn"],
    "strategies": ["head", "lp-ft"],
    "image_size": 160,
    "finetune": {"epochs": 2, "batch_size": 16, "optimizer": "adamw"},
    "finetune_grid": {"lr": [1e-3, 3e-3], "weight_decay": [0.05]},
    "fewshot": {
        "shots": [1, 2, 5, 10],
        "draws": 5,
        "finetune_strategy": "lp-ft",
        "finetune_shots": [2],
        "finetune_draws": 3,
        "finetune_rule_steps": 20,
    },
    "layerwise": True,
    "budget_notes": [
        "Quick mode: embedded 250-image sample (15 train / 4 val / 6 test images per class), 160 px input for "
        "extraction and fine-tuning alike, strategies head and lp-ft only, each tuned on a 2-point lr grid with "
        "at most 2 epochs; few-shot fine-tuning at 2 shots only. A smoke test of the whole pipeline, not a "
        "benchmark: 60 test images give wide intervals.",
    ],
}


def load_bench_config(
    path: str | os.PathLike[str] | None = None,
    *,
    quick: bool = False,
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    device: str | None = None,
    final_fit: str | None = None,
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
    if final_fit:
        raw["final_fit"] = final_fit
    known = {f.name for f in fields(BenchConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"unknown bench setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    few = raw.get("fewshot", {})
    if few is not None:
        if not isinstance(few, dict):
            raise UsageError("fewshot must be a mapping of settings (or null)")
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
            hint = " (write it with: python benchmarks/make_digits.py)" if Path(d).name == "digits" else ""
            raise UsageError(f"bench dataset not found: {d}{hint}")
    for b in config.backbones:
        canonical_name(b)
    bad = [h for h in config.heads if h not in HEADS]
    if bad:
        raise UsageError(f"unknown head(s) in bench config: {', '.join(bad)}")
    bad = [s for s in config.strategies if s not in STRATEGIES]
    if bad:
        raise UsageError(f"unknown strategy(ies) in bench config: {', '.join(bad)}")
    if config.final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {config.final_fit!r}")
    try:
        FinetuneConfig(**config.finetune).validate()
    except TypeError as exc:
        raise UsageError(f"bad finetune settings in bench config: {exc}") from None
    for s in config.strategies:
        grid = config.grid_for(s)
        bad = sorted(set(grid) - {"lr", "weight_decay"})
        if bad or any(not isinstance(v, list) or not v for v in grid.values()):
            raise UsageError(f"finetune_grid for {s} must map lr and/or weight_decay to non-empty lists (got {grid})")
    few = config.fewshot
    if few is not None:
        if not few.shots or any(not isinstance(k, int) or k < 1 for k in few.shots) or few.draws < 1:
            raise UsageError("fewshot needs shots (ints >= 1) and draws >= 1")
        if few.finetune_strategy is not None:
            if few.finetune_strategy not in STRATEGIES:
                raise UsageError(f"unknown fewshot finetune_strategy: {few.finetune_strategy}")
            missing = sorted(set(few.finetune_shots) - set(few.shots))
            if missing:
                raise UsageError(f"fewshot finetune_shots {missing} are not in shots: fine-tuning draws must be head draws too")
            if not 1 <= few.finetune_draws <= few.draws:
                raise UsageError("fewshot finetune_draws must be between 1 and draws (its draws are the heads' first draws)")


# --------------------------------------------------------------------------------------------------
# Rows: which images each family gets


def _draw_seed(seed: int, shots: int, draw: int) -> int:
    return 1_000_000 * seed + 1000 * draw + shots


def plan_positions(ds: Any, plan: SplitPlan, cap: int | None, seed: int) -> dict[str, Any]:
    """The main grid's rows: ``train_rows`` (indices into the plan's train rows, what ``finetune`` takes;
    None = all), and for train/val/test the source split and the positions in it."""
    resolved = plan.resolve(ds)
    src, rows = resolved["train"]
    train_rows = None
    if cap:
        train_rows = sample_per_class(ds.split(src).labels[rows], cap, seed=seed)
        rows = rows[train_rows]
    out = {"train_rows": None if train_rows is None else train_rows.tolist(), "sources": {}, "positions": {}}
    for name, (source, r) in (("train", (src, rows)), ("val", resolved["val"]), ("test", resolved["test"])):
        out["sources"][name] = source
        out["positions"][name] = [int(p) for p in r]
    return out


def fewshot_draw(ds: Any, plan: SplitPlan, shots: int, draw: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``draw`` of ``shots`` images per class from the plan's (uncapped) train rows: exactly k per class.

    Returns (indices into the plan's train rows, positions in the source split). Heads and fine-tuning call
    this with the same arguments, so they get the same images.
    """
    src, rows = plan.resolve(ds)["train"]
    labels = ds.split(src).labels[rows]
    counts = np.bincount(labels, minlength=len(ds.classes))
    if counts.min() < shots:
        raise UsageError(f"{shots}-shot draws need {shots} training images in every class; the smallest class has {counts.min()}")
    idx = sample_per_class(labels, shots, seed=_draw_seed(seed, shots, draw))
    return idx, rows[idx]


def _as_positions(value: Any) -> list[int] | None:
    """Fine-tuning's row record -> positions: it may be [[split, position], ...] or [position, ...]."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("positions", value.get("rows"))
    out = []
    for v in value:
        out.append(int(v[1]) if isinstance(v, (list, tuple)) else int(v))
    return out


# --------------------------------------------------------------------------------------------------
# Memory of a whole process tree


def _proc_status_kb(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


class TreeMemory:
    """Peak resident memory of this process and every descendant (joblib/loky sweep workers, DataLoader
    decode workers), MiB: the sum over the tree of each process's own peak (``VmHWM`` from /proc), polled every
    ``interval`` seconds by a thread and once more on :meth:`peak_mb`. The sum of per-process peaks bounds
    the simultaneous peak from above; a worker living shorter than one poll can be missed. Linux only: elsewhere
    it falls back to this process's own peak.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def sample(self) -> float:
        from featx.runtime import peak_rss_mb

        if not Path("/proc/self/status").exists():
            total = peak_rss_mb()
        else:
            pid = os.getpid()
            total = sum(_proc_status_kb(p, "VmHWM") for p in [pid, *_descendants(pid)]) / 1024
        with self._lock:
            self.peak = max(self.peak, total)
            return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.sample()


def _device_peak_mb(device: str) -> float | None:
    """CUDA peak allocation of this process, when it used CUDA (None on the CPU)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or device == "cpu" or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# --------------------------------------------------------------------------------------------------
# Cells (module-level functions: they run in fresh processes)


def _plan(ctx: dict[str, Any]) -> SplitPlan:
    return SplitPlan(ctx["val_fraction"], ctx["test_fraction"], ctx["seed"])


def _feature_sets(ds: Any, ctx: dict[str, Any], layer: str = POOLED) -> tuple[dict[str, Any], list[Any], float]:
    """Extract (or hit) every split's cache; returns the plan-resolved train/val/test FeatureSets, the extraction
    results and the seconds extract() took in this call."""
    from featx.cache import load_cache
    from featx.extraction import extract
    from featx.heads import split_features

    t0 = time.perf_counter()
    results = extract(
        ds,
        backbone=ctx["backbone"],
        weights=ctx["weights"],
        image_size=ctx["image_size"],
        layer=layer,
        device=ctx["device"],
        cache_dir=ctx["cache_dir"],
        progress=ctx["progress"],
    )
    seconds = time.perf_counter() - t0
    loaded = {r.split: load_cache(r.path) for r in results}
    sets = split_features(loaded["train"], loaded.get("val"), loaded.get("test"), _plan(ctx))
    return sets, results, seconds


def _rows_at(fs: Any, positions: list[int] | np.ndarray) -> Any:
    """The FeatureSet rows holding these source positions (images that failed to decode have none)."""
    where = {int(p): r for r, p in enumerate(fs.indices)}
    return fs.subset(np.asarray([where[int(p)] for p in positions if int(p) in where], dtype=np.int64))


def _cache_seconds(path: Path) -> float:
    from featx.cache import read_cache_attrs

    return float(read_cache_attrs(path).get("extraction_seconds", 0.0))


def _at_grid_edge(best: dict[str, Any], curve: list[dict[str, Any]]) -> bool:
    """Whether a chosen value sits at the smallest or largest value the sweep tried (for some parameter)."""
    for key, value in best.items():
        values = sorted({c["params"][key] for c in curve if key in c.get("params", {})})
        if len(values) > 1 and value in (values[0], values[-1]):
            return True
    return False


def _head_params(estimator: Any) -> int | None:
    last = estimator[-1] if hasattr(estimator, "__getitem__") else estimator
    if hasattr(last, "coef_"):
        return int(last.coef_.size + np.size(getattr(last, "intercept_", 0)))
    if hasattr(last, "dual_coef_"):
        return int(last.dual_coef_.size + last.support_vectors_.size)
    if hasattr(last, "_fit_X"):
        return int(last._fit_X.size)  # k-NN stores the training set
    return None


def cell_features(ctx: dict[str, Any]) -> dict[str, Any]:
    """Extraction + every head, on exactly the rows fine-tuning gets, with the costs counted like fine-tuning's.

    Wall time = dataset scan + model build + forward passes over the images the heads use + the head's sweep
    and final fit. Caches hold whole splits; when the train split is capped, the forward-pass time is
    pro-rated by the measured seconds per image of each split (``extract_seconds_used``), so images the
    heads never see are not charged. A cache hit is charged what its first extraction took (stored in the cache).
    """
    from featx.backbones import build_backbone
    from featx.heads import fit_head

    meter = ctx["_meter"]
    t0 = time.perf_counter()
    ds = load_dataset(ctx["dataset"])
    scan_seconds = time.perf_counter() - t0
    sets, results, extract_call = _feature_sets(ds, ctx)
    misses = [r for r in results if not r.hit]
    if misses:  # extract() built the model once, then ran the splits; the rest of its time is the build
        build_seconds = max(0.0, extract_call - sum(r.seconds for r in misses))
    else:  # every split was a cache hit: build the model once here, to charge what it costs
        t1 = time.perf_counter()
        build_backbone(ctx["backbone"], ctx["weights"], image_size=ctx["image_size"])
        build_seconds = time.perf_counter() - t1
    per_image = {r.split: (r.seconds if not r.hit else _cache_seconds(r.path)) / max(1, r.n_images) for r in results}
    pos, sources = ctx["positions"], ctx["sources"]
    tr = _rows_at(sets["train"], pos["train"])
    va, te = sets["val"], sets["test"]
    used = {"train": len(pos["train"]), "val": len(pos["val"]), "test": len(pos["test"])}
    extract_used = sum(per_image[sources[name]] * n for name, n in used.items())
    extract_all = sum(per_image[r.split] * r.n_images for r in results)
    n_images = sum(r.n_images for r in results)
    device_peak = _device_peak_mb(ctx["device"])
    rows = []
    for kind in ctx["heads"]:
        t1 = time.perf_counter()
        head = fit_head(tr, va, te, kind=kind, plan=_plan(ctx), final_fit=ctx["final_fit"])
        predictions = head.predict(te.features)
        fit_seconds = time.perf_counter() - t1
        m = head.test_metrics or {}
        host = meter.peak_mb
        md = head.metadata
        edge = md.get("at_grid_edge")
        rows.append(
            {
                "family": "features",
                "strategy": kind,
                "accuracy": m.get("accuracy"),
                "accuracy_ci95": m.get("accuracy_ci95"),
                "macro_f1": m.get("macro_f1"),
                "macro_recall": m.get("macro_recall"),
                "mean_per_class_accuracy": m.get("mean_per_class_accuracy"),
                "val_accuracy": head.val_accuracy,
                "selection": md.get("selection", "val"),
                "hyperparameters": head.best_params,
                "at_grid_edge": bool(_at_grid_edge(head.best_params, head.sweep) if edge is None else edge),
                "sweep": [{**c["params"], "val_accuracy": c["val_accuracy"]} for c in head.sweep],
                "final_fit": md.get("final_fit", ctx["final_fit"]),
                "n_fit": md.get("n_fit"),
                "n_train": len(tr.labels),
                "n_val": len(va.labels),
                "scan_seconds": scan_seconds,
                "build_seconds": build_seconds,
                "extract_seconds": extract_used,
                "fit_seconds": fit_seconds,
                "wall_seconds": scan_seconds + build_seconds + extract_used + fit_seconds,
                "peak_memory_mb": device_peak if device_peak is not None else host,
                "memory_kind": "cuda" if device_peak is not None else "rss",
                "host_rss_mb": host,
                "trainable_params": _head_params(head.estimator),
                "images_per_s": n_images / extract_all if extract_all else None,
                "train_positions": [int(p) for p in tr.indices],
                "val_positions": [int(p) for p in va.indices],
                "test_positions": [int(p) for p in te.indices],
                "test_predictions": [int(p) for p in predictions],
                "test_labels": [int(y) for y in te.labels],
                "confusion_matrix": m.get("confusion_matrix"),
            }
        )
    return {
        "rows": rows,
        "extraction": {
            "seconds": extract_used,
            "seconds_all_splits": extract_all,
            "accounting": "pro-rated: measured seconds per image of each split x images the heads use",
            "scan_seconds": scan_seconds,
            "build_seconds": build_seconds,
            "images_per_s": n_images / extract_all if extract_all else None,
            "n_images": n_images,
            "n_images_used": sum(used.values()),
            "peak_memory_mb": rows[0]["host_rss_mb"] if rows else meter.peak_mb,
            "wall_this_run": extract_call,
            "cache_hits": sum(r.hit for r in results),
        },
        "n_train": len(tr.labels),
        "classes": list(tr.classes),
        "splits": {"train": len(tr.labels), "val": len(va.labels), "test": len(te.labels)},
    }


def _finetune_kwargs(ctx: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from featx.finetuning import FinetuneConfig

    config = FinetuneConfig(**{**ctx["finetune"], "strategy": ctx["strategy"], "device": ctx["device"], "seed": ctx["seed"]})
    return {
        "backbone": ctx["backbone"],
        "weights": ctx["weights"],
        "image_size": ctx["image_size"],
        "config": config,
        "split_plan": _plan(ctx),
        "out_dir": run_dir,
        "progress": ctx["progress"],
    }


def cell_finetune(ctx: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning strategy: lr x weight-decay grid on val, then the final fit per ``final_fit``."""
    from featx.finetuning import finetune, finetune_search

    meter = ctx["_meter"]
    run_dir = Path(ctx["run_dir"])
    kwargs = _finetune_kwargs(ctx, run_dir)
    t0 = time.perf_counter()
    if ctx["grid"]:
        result = finetune_search(
            ctx["dataset"], grid=ctx["grid"], train_rows=ctx["train_rows"], final_fit=ctx["final_fit"], resume=False, **kwargs
        )
    else:
        result = finetune(
            ctx["dataset"],
            train_rows=ctx["train_rows"],
            final_fit=ctx["final_fit"],
            selection="val",
            resume=(run_dir / "checkpoint.pt").is_file(),
            **kwargs,
        )
    wall = time.perf_counter() - t0
    m = result["metrics"]
    host = meter.peak_mb
    cuda = result.get("memory_kind") == "cuda"
    chosen = result.get("chosen") or {}
    config = result.get("config") or {}
    return {
        "row": {
            "family": "finetune",
            "strategy": ctx["strategy"],
            "accuracy": m["accuracy"],
            "accuracy_ci95": m["accuracy_ci95"],
            "macro_f1": m["macro_f1"],
            "macro_recall": m["macro_recall"],
            "mean_per_class_accuracy": m.get("mean_per_class_accuracy"),
            "val_accuracy": result.get("val_accuracy"),
            "selection": "val",
            "hyperparameters": {
                "lr": chosen.get("lr", config.get("lr")),
                "weight_decay": chosen.get("weight_decay", config.get("weight_decay")),
                "epochs": chosen.get("epochs", result.get("best_epoch")),
                "optimizer": config.get("optimizer"),
            },
            "grid": result.get("grid"),
            "best_epoch": result.get("best_epoch"),
            "epochs_run": result.get("epochs_run"),
            "epochs_budget": result.get("epochs_budget", config.get("epochs")),
            "still_improving": result.get("still_improving"),
            "final_fit": result.get("final_fit", ctx["final_fit"]),
            "n_fit": result.get("n_fit"),
            "n_train": result.get("n_train"),
            "n_val": result.get("n_val"),
            "wall_seconds": wall,
            "reported_wall_seconds": result.get("wall_seconds"),
            "train_seconds": result.get("train_seconds"),
            "peak_memory_mb": result["peak_memory_mb"] if cuda else host,
            "memory_kind": "cuda" if cuda else "rss",
            "host_rss_mb": host,
            "trainable_params": result.get("trainable_params"),
            "images_per_s": result.get("train_images_per_s"),
            "train_positions": _as_positions(result.get("train_rows")),
            "val_positions": _as_positions(result.get("val_rows")),
            "test_positions": _as_positions(result.get("test_rows")),
            "test_predictions": [int(p) for p in result["test_predictions"]],
            "test_labels": [int(y) for y in result["test_labels"]],
            "confusion_matrix": m.get("confusion_matrix"),
        }
    }


def cell_fewshot_heads(ctx: dict[str, Any]) -> dict[str, Any]:
    """Every head on every draw: exactly k labelled images per class, no val labels (CV inside the draw, or
    the heads' fixed rule when k is too small)."""
    from featx.heads import fit_head_arrays

    ds = load_dataset(ctx["dataset"])
    sets, _, _ = _feature_sets(ds, ctx)
    te = sets["test"]
    few = ctx["fewshot"]
    plan = _plan(ctx)
    points, skipped = [], []
    for shots in few["shots"]:
        for draw in range(few["draws"]):
            try:
                _, positions = fewshot_draw(ds, plan, shots, draw, ctx["seed"])
            except UsageError as exc:
                skipped.append(f"{shots} shots: {exc}")
                break
            tr = _rows_at(sets["train"], positions)
            for kind in ctx["heads"]:
                hf = fit_head_arrays(kind, tr.features, tr.labels, cv_folds=5, seed=_draw_seed(ctx["seed"], shots, draw))
                acc = float(np.mean(hf.estimator.predict(te.features) == te.labels))
                points.append(
                    {
                        "method": kind,
                        "family": "features",
                        "shots": shots,
                        "draw": draw,
                        "accuracy": acc,
                        "selection": hf.selection,
                        "hyperparameters": hf.best_params,
                        "n_fit": int(hf.n_fit),
                        "train_positions": [int(p) for p in tr.indices],
                    }
                )
    return {"points": points, "skipped": skipped}


def cell_fewshot_finetune(ctx: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning draw: the heads' draw of the same (shots, draw), hyper-parameters from the fixed rule."""
    from featx.finetuning import finetune

    ds = load_dataset(ctx["dataset"])
    idx, positions = fewshot_draw(ds, _plan(ctx), ctx["shots"], ctx["draw"], ctx["seed"])
    run_dir = Path(ctx["run_dir"])
    result = finetune(
        ctx["dataset"],
        train_rows=idx,
        selection="rule",
        final_fit="train",
        resume=(run_dir / "checkpoint.pt").is_file(),
        **_finetune_kwargs(ctx, run_dir),
    )
    used = _as_positions(result.get("train_rows"))
    point = {
        "method": f"finetune:{ctx['strategy']}",
        "family": "finetune",
        "shots": ctx["shots"],
        "draw": ctx["draw"],
        "accuracy": result["metrics"]["accuracy"],
        "selection": "rule",
        "hyperparameters": {"epochs": result.get("epochs_run"), "lr": (result.get("config") or {}).get("lr")},
        "n_fit": result.get("n_fit", result.get("n_train")),
        "train_positions": used if used is not None else [int(p) for p in positions],
    }
    return {"points": [point]}


def cell_layerwise(ctx: dict[str, Any]) -> dict[str, Any]:
    """Logistic-regression probe on each stage's pooled features (one forward pass for all layers); the best
    layer is picked on val by the report."""
    from featx.backbones import build_backbone
    from featx.cache import FeatureSet
    from featx.heads import fit_head
    from featx.inference import compute_features

    ds = load_dataset(ctx["dataset"])
    resolved = _plan(ctx).resolve(ds)
    train_src, train_rows = resolved["train"]
    if ctx.get("train_rows") is not None:
        train_rows = train_rows[np.asarray(ctx["train_rows"])]
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
        head = fit_head(sets["train"], sets["val"], sets["test"], kind="logreg", final_fit=ctx["final_fit"])
        m = head.test_metrics or {}
        points.append(
            {
                "layer": layer,
                "depth": depth,
                "dim": dims[depth],
                "val_accuracy": head.val_accuracy,
                "accuracy": m.get("accuracy"),
                "macro_f1": m.get("macro_f1"),
                "accuracy_ci95": m.get("accuracy_ci95"),
                "hyperparameters": head.best_params,
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


def _run_cell(kind: str, ctx: dict[str, Any], child: bool = True) -> dict[str, Any]:
    """Run one cell; in a fresh process (``child``) first set up logging at the bench's level, so ``-q``
    quiets the children too."""
    from joblib.externals.loky import get_reusable_executor

    if child:
        logging.basicConfig(level=ctx["log_level"], format="%(levelname)s %(name)s: %(message)s", force=True)
        logging.getLogger("featx").setLevel(ctx["log_level"])
        logging.captureWarnings(True)
        log.info("cell %s runs in process %d", ctx["cell_id"], os.getpid())
    t0 = time.perf_counter()
    with TreeMemory() as meter:
        try:
            out = _CELLS[kind]({**ctx, "_meter": meter})
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
        "costs": "wall time from image files to a trained model, for both families: dataset scan, model build, forward "
        "passes over the images used (heads: extraction time pro-rated per image when the train split is capped), sweep "
        "or grid, final fit or training, test predictions; peak memory of the cell's whole process tree (sum of "
        "per-process VmHWM: joblib and DataLoader workers included); on GPU peak_memory_mb is the CUDA peak and "
        "host_rss_mb the tree's peak RSS, for both families",
    }
    if few:
        out["fewshot_labels"] = (
            "a k-shot draw is exactly k training images per class and no other labels (no refit on val, no selection on val); "
            "heads choose by stratified CV inside the draw (folds = min(5, k)) when k >= 2, else by the fixed "
            "featx.heads.HEAD_DEFAULT_PARAMS; fine-tuning uses featx.finetuning's fixed rule (after BiT HyperRule); "
            "fine-tuning draw d of k shots is head draw d of k shots"
        )
    return out


def run_bench(
    config: BenchConfig,
    *,
    out_dir: str | os.PathLike[str],
    cache_dir: str | None = None,
    progress: bool = True,
    command: str = "",
    log_level: int | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell, then write report.md, results.json and the plots into ``out_dir``.

    ``log_level`` (default: the ``featx`` logger's effective level, so ``featx -q`` gives WARNING) is passed to
    every cell's process.
    """
    from featx.reporting import write_report

    level = logging.getLogger("featx").getEffectiveLevel() if log_level is None else log_level
    out = Path(out_dir)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    failed = 0
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "featx_version": __version__,
            "created_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command,
            "machine": _machine(),
            "quick": config.quick,
            "budget_notes": list(config.budget_notes),
            "protocol": protocol(config),
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
        ctx = {**ctx, "cell_id": cell_id, "log_level": level}
        try:
            if fresh_process:
                with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                    data = pool.submit(_run_cell, kind, ctx).result()
            else:
                data = _run_cell(kind, ctx, child=False)
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
            rows = plan_positions(ds, plan, cap, config.seed)
            ctx = {
                "dataset": str(ds.root if ds.source == "imagefolder" else dataset),
                "backbone": backbone,
                "weights": config.weights,
                "image_size": config.image_size_for(ds.name),
                "device": config.device,
                "cache_dir": cache_dir,
                "progress": progress,
                "val_fraction": config.val_fraction,
                "test_fraction": config.test_fraction,
                "seed": config.seed,
                "heads": config.heads,
                "finetune": config.finetune,
                "final_fit": config.final_fit,
                **rows,
            }
            entry: dict[str, Any] = {
                "backbone": backbone,
                "image_size": config.image_size_for(ds.name),
                "classes": list(ds.classes),
                "rows": [],
                "fewshot": [],
                "layerwise": [],
                "splits": plan.describe(ds),
                "final_fit": config.final_fit,
                "position_sources": rows["sources"],
            }
            n_train, n_val = len(rows["positions"]["train"]), len(rows["positions"]["val"])
            if cap:
                entry["splits"]["train"] += f", capped at {cap} per class -> {n_train} images"
            entry["n_fit"] = n_train + n_val if config.final_fit == "train+val" else n_train
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
                c = {
                    **ctx,
                    "strategy": strategy,
                    "grid": config.grid_for(strategy),
                    "run_dir": str(out / "runs" / f"{slug}-{strategy}"),
                }
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
                    entry["fewshot_skipped"] = r.get("skipped", [])
                for row in entry["rows"]:
                    if row.get("accuracy") is not None and (
                        row["family"] == "features" or row["strategy"] == few["finetune_strategy"]
                    ):
                        method = row["strategy"] if row["family"] == "features" else f"finetune:{row['strategy']}"
                        entry["fewshot"].append(
                            {
                                "method": method,
                                "family": row["family"],
                                "shots": "all",
                                "draw": 0,
                                "accuracy": row["accuracy"],
                                "selection": "val",
                                "n_fit": row.get("n_fit"),
                                "train_positions": row.get("train_positions"),
                            }
                        )
                if few["finetune_strategy"]:
                    ft = dict(config.finetune)
                    if few["finetune_rule_steps"]:
                        ft["rule_steps"] = few["finetune_rule_steps"]
                    for shots in few["finetune_shots"]:
                        try:
                            fewshot_draw(ds, plan, shots, 0, config.seed)
                        except UsageError as exc:
                            entry.setdefault("fewshot_skipped", []).append(f"finetune {shots} shots: {exc}")
                            continue
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
    results["meta"]["bench_seconds_this_run"] = time.perf_counter() - t_start
    files = write_report(results, out)
    return {"report": files["report"], "failed": failed, "results": results}
