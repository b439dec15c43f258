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
import errno
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__
from featx.backbones import DEFAULT_BACKBONE, POOLED
from featx.data import FINAL_FITS, SAMPLE_DATASET, RowSelection, SplitPlan, load_dataset
from featx.errors import UsageError

log = logging.getLogger(__name__)


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
    """A grid: datasets × backbones × (heads on cached features, fine-tuning strategies).

    ``image_size``, ``max_train_per_class`` and ``augment`` take one value for every dataset or a mapping per dataset. A key
    of that mapping is a dataset's path as written in ``datasets`` (or any path to the same folder or CSV), or its
    name (the folder name, or the CSV's stem). A path key wins over a name key; a name key applies to the one
    dataset of that name without a path key, and is refused when two datasets share the name (key them by path).
    A dataset no key names gets None (the weights' own size; no cap).
    """

    datasets: list[str] = field(default_factory=lambda: [str(SAMPLE_DATASET)])
    backbones: list[str] = field(default_factory=lambda: [DEFAULT_BACKBONE])
    weights: str = "imagenet"
    image_size: int | dict[str, int | None] | None = None  # or {dataset: px}: both families alike
    heads: list[str] = field(default_factory=lambda: ["logreg", "linear-svm", "rbf-svm", "knn"])
    strategies: list[str] = field(default_factory=lambda: ["head", "partial", "full", "lp-ft"])
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields
    finetune_grid: dict[str, Any] | None = None  # {lr: [...], weight_decay: [...]} or {strategy: {...}}; None: default
    final_fit: str = "train+val"  # both families: "train+val" (refit after selection on val) or "train"
    max_train_per_class: int | dict[str, int | None] | None = None  # cap applied to heads and fine-tuning alike
    # fine-tuning's training augmentation (names from featx.finetuning.AUGMENT_REGISTRY, or "none"), for every
    # dataset or {dataset: [names]}; None (or a dataset no key names): finetune's own augment, else its default list
    augment: list[str] | str | dict[str, list[str] | str | None] | None = None
    fewshot: FewShotConfig | None = field(default_factory=FewShotConfig)
    layerwise: bool = True
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    budget_notes: list[str] = field(default_factory=list)
    quick: bool = False

    def cap_for(self, dataset: str) -> int | None:
        """The training-image cap per class of ``dataset`` (a path as written in ``datasets``, or a name)."""
        return self._per_dataset(self.max_train_per_class, dataset)

    def image_size_for(self, dataset: str) -> int | None:
        """The input size of ``dataset`` (a path as written in ``datasets``, or a name); None: the weights' own."""
        return self._per_dataset(self.image_size, dataset)

    def augment_for(self, dataset: str) -> list[str] | None:
        """Fine-tuning's augmentation names for ``dataset`` (``["none"]`` for none); None: not set for it here."""
        value = self._per_dataset(self.augment, dataset)
        if value is None:
            return None
        return [value] if isinstance(value, str) else list(value)

    def finetune_for(self, dataset: str) -> dict[str, Any]:
        """The FinetuneConfig settings of ``dataset``'s fine-tuning cells: ``finetune`` with its ``augment``."""
        settings = dict(self.finetune)
        augment = self.augment_for(dataset)
        if augment is not None:
            settings["augment"] = augment
        return settings

    def _per_dataset(self, value: Any, dataset: str) -> Any:
        if not isinstance(value, dict):
            return value
        key = _key_for(value, os.fspath(dataset))
        return None if key is None else value[key]

    def grid_for(self, strategy: str) -> dict[str, list[float]]:
        from featx.finetuning import STRATEGIES

        grid = self.finetune_grid
        if grid is None:
            from featx import finetuning

            optimizer = self.finetune.get("optimizer", finetuning.FinetuneConfig.optimizer)
            grid = finetuning.default_search_grid(optimizer)  # the GPU grid; the CPU bench's config names its own
        if grid and set(grid) <= set(STRATEGIES):
            grid = grid.get(strategy) or {}
        return {k: list(v) for k, v in grid.items()}


def dataset_name(dataset: str | os.PathLike[str]) -> str:
    """What :func:`load_dataset` names a dataset, without scanning it: the folder's name, or the CSV's stem."""
    p = Path(dataset).expanduser()
    if p.is_file():
        return p.stem
    return p.name or Path(os.path.realpath(p)).name


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _key_for(mapping: dict[str, Any], dataset: str) -> str | None:
    """The key of a per-dataset mapping that applies to ``dataset``: a path to it, else its name (or ``dataset``
    itself when it is a name, not a path)."""
    for key in mapping:
        if isinstance(key, str) and _same_path(key, dataset):
            return key
    name = dataset_name(dataset) if os.path.exists(os.path.expanduser(dataset)) else dataset
    return name if name in mapping else None


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
    """Read a YAML/TOML grid (or the quick preset); flags override the file. Every value is checked (type and
    range) before anything runs: a bad one is a :class:`UsageError` naming the setting and the value."""
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
    unknown = sorted(set(map(str, raw)) - known)
    if unknown:
        raise UsageError(f"unknown bench setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    few = raw.get("fewshot", {})
    if few is not None:
        if not isinstance(few, dict):
            raise _bad("fewshot", "a mapping of settings or null", few)
        bad = sorted(set(map(str, few)) - {f.name for f in fields(FewShotConfig)})
        if bad:
            raise UsageError(
                f"unknown fewshot setting(s): {', '.join(bad)} (known: {', '.join(f.name for f in fields(FewShotConfig))})"
            )
        raw["fewshot"] = FewShotConfig(**few)
    config = BenchConfig(**raw)
    validate_bench_config(config)
    return config


# --------------------------------------------------------------------------------------------------
# Every setting's type and range: one line per mistake, like the command line's flags (exit 2)

#: Largest bench seed: a few-shot draw's seed is 1,000,000 x seed + 1000 x draw + shots, and scikit-learn's
#: splitters take 32-bit seeds (< 2**32).
MAX_SEED = 4293
#: Largest shot count and draw count: the draw seed keeps (shots, draw) pairs apart below 1000.
MAX_SHOTS = MAX_DRAWS = 999
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_SET_BY_BENCH = {"strategy": "strategies", "device": "device", "seed": "seed"}  # finetune keys the bench sets itself
#: Settings that take one value for every dataset or a mapping {dataset name or path: value}.
PER_DATASET_SETTINGS = ("image_size", "max_train_per_class", "augment")


def _max_image_size() -> int:
    import featx.data
    from featx.backbones import MAX_IMAGE_SIZE

    return int(getattr(featx.data, "MAX_IMAGE_SIZE", MAX_IMAGE_SIZE))


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return text
        if "e" in value.lower():
            return text + " (text, not a number: YAML reads 1e-3 as text; write 0.001 or 1.0e-3)"
        return text + " (text, not a number: drop the quotes)"
    return text


def _bad(key: str, must: str, value: Any) -> UsageError:
    return UsageError(f"bench setting {key} must be {must}, got {_shown(value)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(key: str, v: Any, low: int, high: int | None = None, *, null: bool = False) -> None:
    if v is None and null:
        return
    if not _is_int(v) or v < low or (high is not None and v > high):
        must = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise _bad(key, must + (" or null" if null else ""), v)


def _int_list(key: str, v: Any, low: int, high: int, *, empty: bool = False) -> None:
    must = f"a list of distinct integers from {low} to {high}" + ("" if empty else " (at least one)")
    if not isinstance(v, list) or (not v and not empty) or any(not _is_int(x) or not low <= x <= high for x in v):
        raise _bad(key, must, v)
    if len(set(v)) != len(v):
        raise _bad(key, must, v)


def _numbers(key: str, v: Any, *, positive: bool) -> None:
    must = f"a non-empty list of numbers {'> 0' if positive else '>= 0'}"
    if not isinstance(v, list) or not v:
        raise _bad(key, must, v)
    for x in v:
        if not _is_number(x) or x < 0 or (positive and x == 0):
            raise _bad(key, must, x if _is_number(x) or isinstance(x, str) else v)


def _strings(key: str, v: Any, *, empty: bool, what: str = "names") -> None:
    must = f"a list of distinct {what}" + ("" if empty else " (at least one)")
    if not isinstance(v, list) or (not v and not empty):
        raise _bad(key, must, v)
    for x in v:
        if not isinstance(x, (str, os.PathLike)) or not os.fspath(x).strip():
            raise _bad(key, must, x)
    if len({os.fspath(x) for x in v}) != len(v):
        twice = sorted({os.fspath(x) for x in v if [os.fspath(y) for y in v].count(os.fspath(x)) > 1})
        raise UsageError(f"bench setting {key} lists {', '.join(twice)} twice")


def _per_dataset(key: str, v: Any, check: Callable[[str, Any], None], must: str) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str) or not k:
                raise _bad(key, f"{must}, or a mapping {{dataset name or path: value}}", v)
            check(f"{key}.{k}", x)
    elif v is not None and not _is_int(v):
        raise _bad(key, f"{must}, null, or a mapping {{dataset name or path: value}}", v)
    else:
        check(key, v)


def _check_grid(grid: Any, strategies: tuple[str, ...]) -> None:
    must = "a mapping {lr: [...], weight_decay: [...]}, one such mapping per strategy, or null (the default grid)"
    if grid is None:
        return
    if not isinstance(grid, dict):
        raise _bad("finetune_grid", must, grid)
    per = {f"finetune_grid.{s}": g for s, g in grid.items()} if grid and set(grid) <= set(strategies) else {"finetune_grid": grid}
    for key, g in per.items():
        if g is None:
            continue
        if not isinstance(g, dict):
            raise _bad(key, "a mapping {lr: [...], weight_decay: [...]}", g)
        unknown = sorted(set(map(str, g)) - {"lr", "weight_decay"})
        if unknown:
            raise UsageError(
                f"bench setting {key} may hold lr and weight_decay (or one such mapping per strategy), got {', '.join(unknown)}"
            )
        if "lr" in g:
            _numbers(f"{key}.lr", g["lr"], positive=True)
        if "weight_decay" in g:
            _numbers(f"{key}.weight_decay", g["weight_decay"], positive=False)


def _check_augment(value: Any, finetune: dict[str, Any]) -> None:
    """``augment``: a list of names from featx.finetuning's registry (or ``none`` alone), null, or a mapping
    {dataset name or path: such a list or null}; not together with ``finetune.augment``."""
    from featx.finetuning import AUGMENT_REGISTRY, NO_AUGMENT

    names = [*AUGMENT_REGISTRY, NO_AUGMENT]
    must = f"a list of names from {', '.join(names)} ({NO_AUGMENT} alone: no augmentation)"

    def check(key: str, v: Any) -> None:
        if v is None or v == NO_AUGMENT:
            return
        if not isinstance(v, list) or not v:
            raise _bad(key, must, v)
        for x in v:
            if not isinstance(x, str) or x not in names:
                raise _bad(key, must, x)
        if NO_AUGMENT in v and len(v) > 1:
            raise _bad(key, must, v)
        if len(set(v)) != len(v):
            raise UsageError(f"bench setting {key} lists {', '.join(sorted({x for x in v if v.count(x) > 1}))} twice")

    if isinstance(value, dict):
        for k, x in value.items():
            if not isinstance(k, str) or not k:
                raise _bad("augment", f"{must}, or a mapping {{dataset name or path: list}}", value)
            check(f"augment.{k}", x)
    elif value is None or isinstance(value, (list, str)):
        check("augment", value)
    else:
        raise _bad("augment", f"{must}, null, or a mapping {{dataset name or path: list}}", value)
    if value is not None and isinstance(finetune, dict) and "augment" in finetune:
        raise UsageError(
            "bench settings augment and finetune.augment both set fine-tuning's augmentation: keep one "
            "(augment, which may also be set per dataset)"
        )


def _check_values(config: BenchConfig) -> None:
    """Types and ranges of every setting (the names behind them are checked in :func:`validate_bench_config`)."""
    from featx.finetuning import STRATEGIES, FinetuneConfig

    c = config
    _strings("datasets", c.datasets, empty=False, what="dataset paths")
    _strings("backbones", c.backbones, empty=False)
    if not isinstance(c.weights, str) or not c.weights.strip():
        raise _bad("weights", "'imagenet', 'none' or the path of a weights file", c.weights)
    top = _max_image_size()
    size_must = f"an integer from 16 to {top}"
    _per_dataset("image_size", c.image_size, lambda k, v: _int(k, v, 16, top, null=True), size_must)
    _strings("heads", c.heads, empty=True)
    _strings("strategies", c.strategies, empty=True)
    if not isinstance(c.finetune, dict):
        raise _bad("finetune", "a mapping of fine-tuning settings (featx.finetuning.FinetuneConfig fields)", c.finetune)
    known = [f.name for f in fields(FinetuneConfig)]
    bad = sorted(set(map(str, c.finetune)) - set(known))
    if bad:
        settable = ", ".join(k for k in known if k not in _SET_BY_BENCH)
        raise UsageError(f"unknown finetune setting(s): {', '.join(bad)} (known: {settable})")
    owned = sorted(k for k in c.finetune if k in _SET_BY_BENCH)
    if owned:
        raise UsageError(
            f"finetune setting(s) {', '.join(owned)} are set by the bench: use the bench settings "
            f"{', '.join(_SET_BY_BENCH[k] for k in owned)} instead"
        )
    try:
        FinetuneConfig(**c.finetune).validate()
    except UsageError as exc:
        raise UsageError(f"bench setting finetune: {exc}") from None
    _check_grid(c.finetune_grid, STRATEGIES)
    _check_augment(c.augment, c.finetune)
    if not isinstance(c.final_fit, str) or c.final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {_shown(c.final_fit)}")
    cap_must = "an integer >= 1 (images per class)"
    _per_dataset("max_train_per_class", c.max_train_per_class, lambda k, v: _int(k, v, 1, null=True), cap_must)
    few = c.fewshot
    if few is not None:
        if not isinstance(few, FewShotConfig):
            raise _bad("fewshot", "a FewShotConfig (in a file: a mapping of settings) or null", few)
        _int_list("fewshot.shots", few.shots, 1, MAX_SHOTS)
        _int("fewshot.draws", few.draws, 1, MAX_DRAWS)
        if few.finetune_strategy is not None and not isinstance(few.finetune_strategy, str):
            raise _bad("fewshot.finetune_strategy", "a strategy name or null (heads only)", few.finetune_strategy)
        _int_list("fewshot.finetune_shots", few.finetune_shots, 1, MAX_SHOTS, empty=True)
        _int("fewshot.finetune_draws", few.finetune_draws, 1, MAX_DRAWS)
        _int("fewshot.finetune_rule_steps", few.finetune_rule_steps, 1, null=True)
    for key in ("layerwise", "quick"):
        if not isinstance(getattr(c, key), bool):
            raise _bad(key, "true or false", getattr(c, key))
    if not isinstance(c.device, str) or not _DEVICE_PATTERN.fullmatch(c.device):
        raise _bad("device", "auto, cpu or cuda[:N]", c.device)
    _int("seed", c.seed, 0, MAX_SEED)
    for key in ("val_fraction", "test_fraction"):
        v = getattr(c, key)
        if not _is_number(v) or not 0 < v < 1:
            raise _bad(key, "a number between 0 and 1 (exclusive)", v)
    if not isinstance(c.budget_notes, list) or any(not isinstance(n, str) for n in c.budget_notes):
        raise _bad("budget_notes", "a list of strings (one bullet each)", c.budget_notes)


def validate_bench_config(config: BenchConfig) -> None:
    """Raise :class:`UsageError` (one line: the setting and the bad value) for the first invalid setting: types and
    ranges, unknown names, datasets that do not exist or are listed twice, per-dataset keys that are ambiguous."""
    from featx.backbones import WEIGHT_SOURCES, canonical_name
    from featx.finetuning import STRATEGIES
    from featx.heads import HEADS

    _check_values(config)
    real: dict[str, str] = {}
    for d in map(os.fspath, config.datasets):
        if not Path(d).expanduser().exists():
            hint = " (write it with: python benchmarks/make_digits.py)" if Path(d).name == "digits" else ""
            raise UsageError(f"bench dataset not found: {d}{hint}")
        r = os.path.realpath(os.path.expanduser(d))
        if r in real:
            raise UsageError(f"bench dataset listed twice: {real[r]} and {d} are the same dataset ({r})")
        real[r] = d
    for b in config.backbones:
        canonical_name(b)
    if config.weights not in WEIGHT_SOURCES and not Path(config.weights).expanduser().is_file():
        raise UsageError(f"bench setting weights must be 'imagenet', 'none' or a weights file; not found: {config.weights}")
    bad = [h for h in config.heads if h not in HEADS]
    if bad:
        raise UsageError(f"unknown head(s) in bench config: {', '.join(bad)} (known: {', '.join(HEADS)})")
    bad = [s for s in config.strategies if s not in STRATEGIES]
    if bad:
        raise UsageError(f"unknown strategy(ies) in bench config: {', '.join(bad)} (known: {', '.join(STRATEGIES)})")
    few = config.fewshot
    if few is not None and few.finetune_strategy is not None:
        if few.finetune_strategy not in STRATEGIES:
            raise UsageError(f"unknown fewshot finetune_strategy: {few.finetune_strategy} (known: {', '.join(STRATEGIES)})")
        missing = sorted(set(few.finetune_shots) - set(few.shots))
        if missing:
            raise UsageError(f"fewshot finetune_shots {missing} are not in shots: fine-tuning draws must be head draws too")
        if not 1 <= few.finetune_draws <= few.draws:
            raise UsageError("fewshot finetune_draws must be between 1 and draws (its draws are the heads' first draws)")
    datasets = [os.fspath(d) for d in config.datasets]
    for setting in PER_DATASET_SETTINGS:
        mapping = getattr(config, setting)
        if not isinstance(mapping, dict):
            continue
        path_keys = {k for k in mapping if any(_same_path(k, d) for d in datasets)}
        for key in set(mapping) - path_keys:
            users = [d for d in datasets if dataset_name(d) == key and not any(_same_path(k, d) for k in path_keys)]
            if len(users) > 1:
                raise UsageError(
                    f"bench setting {setting}.{key} names {len(users)} datasets ({', '.join(users)}): "
                    "key them by their paths as written in datasets"
                )


def unmatched_dataset_keys(config: BenchConfig) -> dict[str, list[str]]:
    """Per-dataset keys of ``image_size`` / ``max_train_per_class`` / ``augment`` that apply to no dataset of
    ``config`` (a typo, or a dataset left out of this run)."""
    out: dict[str, list[str]] = {}
    for setting in PER_DATASET_SETTINGS:
        mapping = getattr(config, setting)
        if isinstance(mapping, dict):
            used = {_key_for(mapping, os.fspath(d)) for d in config.datasets}
            if set(mapping) - used:
                out[setting] = sorted(set(mapping) - used)
    return out


# --------------------------------------------------------------------------------------------------
# Rows: which images each family gets


_SPLIT_ROLES = ("train", "val", "test")


def _ctx_rows(ds: Any, plan: SplitPlan, cap: int | None) -> dict[str, Any]:
    """The main grid's rows as the cells' ctx carries them (plain JSON, part of their fingerprints): ``train_rows``
    (the plan's cap: indices into its train rows, what ``finetune`` takes; None = all), and for train/val/test
    the source split (``sources``) and the dataset positions in it (``positions``)."""
    train_rows = plan.cap(ds, cap)
    rows = plan.resolve(ds, train_rows)
    return {
        "train_rows": None if train_rows is None else train_rows.tolist(),
        "sources": {name: rows[name].split for name in _SPLIT_ROLES},
        "positions": {name: list(rows[name].positions) for name in _SPLIT_ROLES},
    }


def _ctx_selections(ctx: dict[str, Any]) -> dict[str, RowSelection]:
    """The rows a cell's ctx carries (:func:`_ctx_rows`), as selections."""
    return {name: RowSelection(ctx["sources"][name], ctx["positions"][name]) for name in _SPLIT_ROLES}


def _recorded_positions(result: dict[str, Any], name: str, source: str) -> list[int] | None:
    """Fine-tuning's ``<name>_rows`` record ([split, position] pairs) as the bench rows' bare positions."""
    rows = RowSelection.from_record(result.get(f"{name}_rows"), source)
    return None if rows is None else list(rows.positions)


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
        _embedder(ctx, layer),
        device=ctx["device"],
        cache_dir=ctx["cache_dir"],
        progress=ctx["progress"],
    )
    seconds = time.perf_counter() - t0
    loaded = {r.split: load_cache(r.path) for r in results}
    sets = split_features(loaded["train"], loaded.get("val"), loaded.get("test"), _plan(ctx))
    return sets, results, seconds


def _embedder(ctx: dict[str, Any], layer: str = POOLED) -> Any:
    """The cell's EmbedderSpec (resolved in the cell's own process: it hashes the weights file)."""
    from featx.backbones import embedder_spec

    return embedder_spec(backbone=ctx["backbone"], weights=ctx["weights"], image_size=ctx["image_size"], layer=layer)


def _timed_build(ctx: dict[str, Any]) -> float:
    """Seconds to build the cell's backbone: importing torch and the model library, then constructing the pretrained
    model. Both families' cells call this first thing in their fresh process, so it is the cold build, timed the same
    way on both sides; the model is dropped at once (each family then builds its own, warm)."""
    from featx.backbones import build_backbone

    t0 = time.perf_counter()
    bb = build_backbone(ctx["backbone"], ctx["weights"], image_size=ctx["image_size"])
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


def cell_features(ctx: dict[str, Any]) -> dict[str, Any]:
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

    meter = ctx["_meter"]
    t0 = time.perf_counter()
    ds = load_dataset(ctx["dataset"])
    scan_seconds = time.perf_counter() - t0
    sets, results, extract_call = _feature_sets(ds, ctx)
    per_image = {r.split: _cache_seconds(r.path) / max(1, r.n_images) for r in results}
    selected = _ctx_selections(ctx)
    tr = sets["train"].select(selected["train"])
    va, te = sets["val"], sets["test"]
    used = {name: len(rows) for name, rows in selected.items()}
    extract_used = sum(per_image[selected[name].split] * n for name, n in used.items())
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
        val_log_loss = _val_log_loss(kind, head, tr, va, md.get("final_fit", ctx["final_fit"]), ctx["seed"])
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
                "val_log_loss": val_log_loss,
                "selection": md.get("selection", "val"),
                "hyperparameters": head.best_params,
                "at_grid_edge": bool(md["at_grid_edge"]),
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
                "trainable_params": head_kind(kind).count_params(head.estimator),
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
            "accounting": "forward-pass seconds per image of each split (stored in its cache) x images the heads use; "
            "the backbone build counted once, in full (build_seconds)",
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
        "embedder": _embedder(ctx),
        "config": config,
        "split_plan": _plan(ctx),
        "out_dir": run_dir,
        "progress": ctx["progress"],
    }


def cell_finetune(ctx: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning strategy: lr x weight-decay grid on val, then the final fit per ``final_fit``.

    Wall time = the build (:func:`_timed_build`, first thing in this fresh process, as in the features cell) + the
    fine-tuning call (dataset scan, training, test predictions) less its own build of the model, which runs warm
    by then and takes what a second :func:`_timed_build` took just before it: the build counts once, in full."""
    build_seconds = _timed_build(ctx)  # cold: before anything else imports torch
    rebuild_seconds = _timed_build(ctx)  # warm, like finetune()'s own build below

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
    call_seconds = time.perf_counter() - t0
    wall = build_seconds + max(0.0, call_seconds - rebuild_seconds)
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
            "val_log_loss": result.get("val_log_loss"),
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
            "backbone_updated": result.get("backbone_updated"),
            "fine_tune_epochs": result.get("fine_tune_epochs"),
            "augment": result.get("augment"),
            "final_fit": result.get("final_fit", ctx["final_fit"]),
            "n_fit": result.get("n_fit"),
            "n_train": result.get("n_train"),
            "n_val": result.get("n_val"),
            "build_seconds": build_seconds,
            "wall_seconds": wall,
            "finetune_call_seconds": call_seconds,
            "rebuild_seconds": rebuild_seconds,
            "reported_wall_seconds": result.get("wall_seconds"),
            "train_seconds": result.get("train_seconds"),
            "peak_memory_mb": result["peak_memory_mb"] if cuda else host,
            "memory_kind": "cuda" if cuda else "rss",
            "host_rss_mb": host,
            "trainable_params": result.get("trainable_params"),
            "images_per_s": result.get("train_images_per_s"),
            "train_positions": _recorded_positions(result, "train", ctx["sources"]["train"]),
            "val_positions": _recorded_positions(result, "val", ctx["sources"]["val"]),
            "test_positions": _recorded_positions(result, "test", ctx["sources"]["test"]),
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
                drawn = plan.fewshot(ds, shots, draw)
            except UsageError as exc:
                skipped.append(f"{shots} shots: {exc}")
                break
            tr = sets["train"].select(plan.resolve(ds, drawn)["train"])
            for kind in ctx["heads"]:
                hf = fit_head_arrays(kind, tr.features, tr.labels, cv_folds=5, seed=plan.draw_seed(shots, draw))
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
    plan = _plan(ctx)
    drawn = plan.fewshot(ds, ctx["shots"], ctx["draw"])
    positions = plan.resolve(ds, drawn)["train"]
    run_dir = Path(ctx["run_dir"])
    result = finetune(
        ctx["dataset"],
        train_rows=drawn,
        selection="rule",
        final_fit="train",
        resume=(run_dir / "checkpoint.pt").is_file(),
        **_finetune_kwargs(ctx, run_dir),
    )
    used = _recorded_positions(result, "train", positions.split)
    point = {
        "method": f"finetune:{ctx['strategy']}",
        "family": "finetune",
        "shots": ctx["shots"],
        "draw": ctx["draw"],
        "accuracy": result["metrics"]["accuracy"],
        "selection": "rule",
        "hyperparameters": {"epochs": result.get("epochs_run"), "lr": (result.get("config") or {}).get("lr")},
        "backbone_updated": result.get("backbone_updated"),
        "fine_tune_epochs": result.get("fine_tune_epochs"),
        "augment": result.get("augment"),
        "n_fit": result.get("n_fit", result.get("n_train")),
        "train_positions": used if used is not None else list(positions.positions),
    }
    return {"points": [point]}


def cell_layerwise(ctx: dict[str, Any]) -> dict[str, Any]:
    """Logistic-regression probe on each stage's pooled features (one forward pass for all layers), on the rows
    the other cells get; the best layer is picked on val by the report. Each point carries the probe's per-image
    test predictions with their ``test_positions`` (the rows' format and order) and labels, so the report can pair
    the chosen layer with fine-tuning, and its ``val_log_loss`` (the val tie-break)."""
    from featx.backbones import build_backbone
    from featx.cache import FeatureSet
    from featx.heads import fit_head
    from featx.inference import compute_features

    ds = load_dataset(ctx["dataset"])
    resolved = _plan(ctx).resolve(ds, ctx.get("train_rows"))
    bb = build_backbone(ctx["backbone"], ctx["weights"], image_size=ctx["image_size"])
    model, dims = bb.multi_layer_model(bb.layers)
    bounds = np.cumsum([0, *dims])
    per_split = {}
    tap = dataclasses.replace(bb, model=model)  # same backbone and preprocessing, multi-layer output
    for name, rows in resolved.items():
        split = rows.split_of(ds)
        feats, errors = compute_features(tap, split.root, split.paths, device=ctx["device"], progress=ctx["progress"])
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
        head = fit_head(sets["train"], sets["val"], sets["test"], kind="logreg", final_fit=ctx["final_fit"])
        m = head.test_metrics or {}
        points.append(
            {
                "layer": layer,
                "depth": depth,
                "dim": dims[depth],
                "val_accuracy": head.val_accuracy,
                "val_log_loss": _val_log_loss("logreg", head, sets["train"], sets["val"], ctx["final_fit"], ctx["seed"]),
                "accuracy": m.get("accuracy"),
                "macro_f1": m.get("macro_f1"),
                "accuracy_ci95": m.get("accuracy_ci95"),
                "hyperparameters": head.best_params,
                "test_predictions": [int(p) for p in head.predict(sets["test"].features)],
                "test_positions": test_positions,
                "test_labels": test_labels,
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
# Fingerprints: a finished cell is reused only while everything that determines its numbers is unchanged

#: Libraries whose versions can change a cell's numbers (solvers, kernels, decoders, the HDF5 round trip).
FINGERPRINT_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "h5py", "pillow")

_COMMON_KEYS = ("backbone", "image_size", "device", "seed", "val_fraction", "test_fraction")
_ROW_KEYS = ("train_rows", "sources", "positions")  # the capped train rows and every split's positions
#: The settings (ctx keys) that determine each kind of cell; the dataset's content, the embedder, featx's code and
#: the library versions count for every cell besides. Left out on purpose: where things live (the dataset's path:
#: its content counts instead; the weights' path: the embedder part holds their sha256; cache_dir: a cache hit holds
#: the same features; run_dir), how the run is watched
#: (progress, log_level), the cell's name, and settings a kind never reads (few-shot cells draw from the uncapped
#: train rows, so the cap is not theirs; heads' cells never read fine-tuning settings, nor the reverse).
_RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "features": (*_COMMON_KEYS, *_ROW_KEYS, "heads", "final_fit"),
    "finetune": (*_COMMON_KEYS, *_ROW_KEYS, "finetune", "strategy", "grid", "final_fit"),
    "fewshot_heads": (*_COMMON_KEYS, "heads", "fewshot"),
    "fewshot_finetune": (*_COMMON_KEYS, "finetune", "strategy", "shots", "draw"),
    "layerwise": (*_COMMON_KEYS, *_ROW_KEYS, "final_fit"),
}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def featx_source_sha256() -> str:
    """sha256 over featx's own ``*.py`` files as installed (each file's relative path and bytes, in path order)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel, data = f.relative_to(root).as_posix().encode(), f.read_bytes()
        h.update(b"%d:%s %d:" % (len(rel), rel, len(data)))
        h.update(data)
    return h.hexdigest()


def code_identity() -> dict[str, str]:
    """featx's version and a hash of its source: what ``results["meta"]["code"]`` and every cell record."""
    return {"featx_version": __version__, "source_sha256": featx_source_sha256()}


def fingerprint_libraries() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in FINGERPRINT_LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def stale_parts(old: Any, new: dict[str, Any]) -> list[str]:
    """Names of the fingerprint parts that differ (``["no fingerprint"]`` for a cell written before fingerprints)."""
    if not isinstance(old, dict) or not isinstance(old.get("parts"), dict):
        return ["no fingerprint"]
    if old.get("sha256") == new["sha256"]:
        return []
    a, b = old["parts"], new["parts"]
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["fingerprint"]


class _Fingerprints:
    """Computes each cell's fingerprint; the costly parts (a stat of every image, the weights' sha256) once per
    dataset / embedder and run."""

    def __init__(self, config: BenchConfig) -> None:
        self.code = code_identity()
        self.libraries = fingerprint_libraries()
        self.device = _resolved_device(config.device)
        self._embedders: dict[tuple[Any, ...], str] = {}

    @staticmethod
    def dataset(ds: Any) -> str:
        """The dataset's content: classes and, per split, featx's content fingerprint (relative paths, labels, size
        and modification time of every file: the same one the feature caches are keyed by)."""
        splits = {name: split.fingerprint() for name, split in sorted(ds.splits.items())}
        return _digest({"source": ds.source, "classes": list(ds.classes), "splits": splits})

    def embedder(self, backbone: str, weights: str, image_size: int | None) -> str:
        key = (backbone, weights, image_size)
        if key not in self._embedders:
            from featx.backbones import resolve_embedder
            from featx.errors import FeatxError

            try:
                identity: dict[str, Any] = resolve_embedder(backbone, weights, image_size=image_size).identity()
            except FeatxError as exc:  # the cells fail with the same error, and say so
                identity = {"error": str(exc)}
            self._embedders[key] = _digest(identity)
        return self._embedders[key]

    def cell(self, kind: str, ctx: dict[str, Any], dataset: str) -> dict[str, Any]:
        values = {k: ctx.get(k) for k in _RESULT_KEYS[kind]}
        values["device"] = self.device
        if "finetune" in values:
            values["finetune"] = _finetune_identity(ctx)
        if "fewshot" in values:
            values["fewshot"] = {k: ctx["fewshot"][k] for k in ("shots", "draws")}
        parts = {f"config.{k}": _digest(v) for k, v in values.items()}
        parts["dataset"] = dataset
        parts["embedder"] = self.embedder(ctx["backbone"], ctx["weights"], ctx["image_size"])
        parts["code"] = _digest(self.code)
        parts["libraries"] = _digest(self.libraries)
        return {"sha256": _digest(parts), "parts": parts, "code": self.code, "libraries": self.libraries}


def _finetune_identity(ctx: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning settings with every default filled in: writing a default out changes nothing."""
    from featx.finetuning import FinetuneConfig

    d = FinetuneConfig(**{**ctx["finetune"], "strategy": ctx.get("strategy") or "full"}).to_dict()
    return {k: v for k, v in d.items() if k not in ("strategy", "device", "seed")}  # separate parts of the fingerprint


def _resolved_device(device: str) -> str:
    from featx.errors import FeatxError
    from featx.runtime import resolve_device

    try:
        d = resolve_device(device)
    except FeatxError:  # cuda asked for, none present: the cells fail and say so
        return device
    if d.type == "cuda":
        import torch

        return f"{d} ({torch.cuda.get_device_name(d)})"
    return str(d)


_RUN_MARK = ".featx-cell.json"


def _prepare_run_dir(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """A cell's run folder holds its checkpoints; the cell resumes them only when they are its own (same
    fingerprint). Checkpoints of another configuration, or of a folder without the mark, are cleared first."""
    mark = run_dir / _RUN_MARK
    if run_dir.exists():
        try:
            same = json.loads(mark.read_text()).get("sha256") == fingerprint["sha256"]
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            log.info("clearing %s: its checkpoints are from another configuration", run_dir)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"sha256": fingerprint["sha256"]}))


# --------------------------------------------------------------------------------------------------
# Cell processes die with the bench; one bench at a time writes into a run folder

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOCK_NAME = ".featx-bench.lock"
_HELD_LOCK_FD: int | None = None  # in a cell's process: its copy of the run folder's lock, held while it lives


def _kill_own_tree_and_exit(*_: Any) -> None:
    """Stop every descendant of this process (so that none starts another), kill them all, then this process."""
    me = os.getpid()
    stopped: set[int] = set()
    for _round in range(50):
        new = [p for p in _descendants(me) if p not in stopped]
        if not new:
            break
        for p in new:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGSTOP)
        stopped.update(new)
    for p in stopped:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.25)
    _kill_own_tree_and_exit()


def _worker_init(parent_pid: int, lock_fd: int | None) -> None:
    """First thing in every cell process: it and all it starts (DataLoader workers, joblib's loky workers, their
    resource trackers) die with the bench process, however that one ends.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, whose handler kills this process's whole tree (a plain SIGKILL
    would orphan the tree: loky workers outlive their parent indefinitely). The death signal fires when the
    *thread* that spawned this process exits: with the spawn context, ``ProcessPoolExecutor.submit`` spawns from
    the calling thread (CPython 3.9-3.13), the thread that runs :func:`run_bench` and outlives the pool. Everywhere
    (and in case the handler cannot run): a thread that sees the parent pid change does the same within 0.25 s.
    """
    global _HELD_LOCK_FD
    _HELD_LOCK_FD = lock_fd
    signal.signal(signal.SIGTERM, _kill_own_tree_and_exit)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="featx-watch-parent", daemon=True).start()


def _received_fd(dup: Any) -> int:
    return int(dup.detach())


class _SharedFd:
    """A file descriptor that a spawned process receives a copy of (multiprocessing passes it at spawn time)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_received_fd, (reduction.DupFd(self.fd),))


class _CellProcesses:
    """Where cells run. Cells whose costs are reported get a fresh process each (peak memory is a per-process
    maximum); the others share one helper process, so that the bench process itself starts no DataLoader or joblib
    workers (it could not take them down if it were killed). Every process gets :func:`_worker_init` and a copy of
    the run folder's lock: a second bench is refused until the last of them is gone."""

    def __init__(self, lock_fd: int | None) -> None:
        self.lock_fd = lock_fd
        self._shared: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        lock = None if self.lock_fd is None or os.name != "posix" else _SharedFd(self.lock_fd)
        return ProcessPoolExecutor(
            max_workers=1, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(), lock)
        )

    def run(self, kind: str, ctx: dict[str, Any], *, fresh: bool) -> dict[str, Any]:
        if fresh:
            pool = self._pool()
        else:
            pool = self._shared = self._shared or self._pool()
        healthy = True
        future = pool.submit(_run_cell, kind, ctx)
        try:
            return future.result()
        except BrokenProcessPool:  # the process died (out of memory, killed): the next shared cell gets a new one
            healthy = False
            raise
        except Exception:  # the cell raised; its process is fine
            raise
        except BaseException:  # Ctrl-C or the like, here: the cell's process and its tree go too
            healthy = False
            _stop(pool, future)
            raise
        finally:
            if not healthy and not fresh:
                self._shared = None
            if fresh or not healthy:
                pool.shutdown(wait=healthy, cancel_futures=True)

    def __enter__(self) -> _CellProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shared is not None:
            if exc[0] is not None and not isinstance(exc[1], Exception):
                _stop(self._shared)
            self._shared.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._shared = None


def _stop(pool: ProcessPoolExecutor, future: Future[Any] | None = None) -> None:
    """End the pool's processes after an interrupt. Ctrl-C in a terminal reaches the whole process group, so the cell
    usually ends by itself at once: then its process exits cleanly. Otherwise (the signal was this process's alone)
    each process is asked to kill its tree (SIGTERM, see :func:`_worker_init`), and killed after 5 s. Should this be
    cut short, the processes still die with this one."""
    procs = list(getattr(pool, "_processes", {}).values())
    if future is not None:
        with contextlib.suppress(FutureTimeout, CancelledError):
            future.exception(timeout=3)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(3)
        if p.is_alive():
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()


@contextlib.contextmanager
def _run_folder_lock(out: Path) -> Iterator[int | None]:
    """Hold ``out/.featx-bench.lock`` while the run writes into ``out``; refuse at once when another run holds it.
    ``flock``: the kernel drops the lock with its last holder, so a lock file left by a killed run never blocks."""
    path = out / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # not POSIX
        from filelock import FileLock, Timeout

        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise _busy(out, "") from None
        try:
            yield None
        finally:
            lock.release()
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise _busy(out, os.pread(fd, 32, 0).decode("ascii", "replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def _busy(out: Path, holder: str) -> UsageError:
    by = f" (started by pid {holder})" if holder.isdigit() else ""
    return UsageError(f"another featx bench is writing to {out}{by}: wait for it to finish, or use another --out-dir")


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


def run_bench(
    config: BenchConfig,
    *,
    out_dir: str | os.PathLike[str],
    cache_dir: str | None = None,
    progress: bool = True,
    command: str = "",
    log_level: int | None = None,
    reuse_stale: bool = False,
) -> dict[str, Any]:
    """Run every cell without a current result, then write report.md, results.json and the plots into ``out_dir``.

    A finished cell (``<out>/cells/<id>.json``) is reused only while its fingerprint matches: the settings that
    determine it, the dataset's content, the embedder, featx's version and source, the library versions (stored
    in the cell under ``"fingerprint"``). Otherwise it runs again. ``reuse_stale`` keeps such cells, and those
    written before fingerprints, on purpose; ``results["meta"]["stale_cells"]`` lists them with what changed.

    Before anything is created: the settings are validated, and an ``out_dir`` or cache inside a dataset is
    refused. One run at a time writes into ``out_dir`` (``.featx-bench.lock``; a second is refused at once).
    ``log_level`` (default: the ``featx`` logger's effective level, so ``featx -q`` gives WARNING) is passed to
    every cell's process.
    """
    from featx.reporting import write_report

    validate_bench_config(config)
    level = logging.getLogger("featx").getEffectiveLevel() if log_level is None else log_level
    out = Path(out_dir).expanduser()
    check_write_locations(config, out, cache_dir)
    for setting, keys in unmatched_dataset_keys(config).items():
        log.warning("bench setting %s: no dataset of this run has the name or path %s", setting, ", ".join(keys))
    datasets = bench_datasets(config)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with _run_folder_lock(out) as lock_fd, _CellProcesses(lock_fd) as processes:
        cells_dir = out / "cells"
        cells_dir.mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
        failed = 0
        t_start = time.perf_counter()
        prints = _Fingerprints(config)
        stale: list[dict[str, Any]] = []
        results: dict[str, Any] = {
            "meta": {
                "featx_version": __version__,
                "code": prints.code,
                "created_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": command,
                "machine": _machine(),
                "quick": config.quick,
                "budget_notes": list(config.budget_notes),
                "protocol": protocol(config),
                "stale_cells": stale,
            },
            "datasets": {},
        }

        def run(cell: _CellRef, kind: str, ctx: dict[str, Any], fresh_process: bool) -> dict[str, Any] | None:
            """``cell``: its id, its id before issue 20 (looked for with ``reuse_stale`` only), its dataset's fingerprint."""
            nonlocal failed
            cell_id, legacy_id, dataset_print = cell
            ctx = {**ctx, "cell_id": cell_id, "log_level": level}
            fingerprint = prints.cell(kind, ctx, dataset_print)
            path = cells_dir / f"{cell_id}.json"
            if not path.is_file() and reuse_stale and legacy_id and (cells_dir / f"{legacy_id}.json").is_file():
                path = cells_dir / f"{legacy_id}.json"
            old = _read_cell(path) if path.is_file() else None
            if old is not None:
                changed = stale_parts(old.get("fingerprint"), fingerprint)
                if not changed:
                    log.info("skip finished cell %s", cell_id)
                    return old
                if reuse_stale:
                    log.warning("cell %s is stale (changed: %s); kept as asked (--reuse-stale)", path.stem, ", ".join(changed))
                    stale.append({"cell": path.stem, "changed": changed})
                    return old
                log.info("run cell %s again: %s changed since it ran", cell_id, ", ".join(changed))
            else:
                log.info("run cell %s", cell_id)
            try:
                if ctx.get("run_dir"):
                    _prepare_run_dir(Path(ctx["run_dir"]), fingerprint)
                data = processes.run(kind, ctx, fresh=fresh_process)
            except Exception as exc:
                failed += 1
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.error("cell %s failed: %s", cell_id, msg)
                log.debug("%s", traceback.format_exc())
                return {"error": msg}
            data = {**data, "fingerprint": fingerprint}
            path = cells_dir / f"{cell_id}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, default=float))
            os.replace(tmp, path)
            return data

        for d in datasets:
            ds = load_dataset(d.path)
            dataset_print = prints.dataset(ds)
            for backbone in config.backbones:
                key = d.label if len(config.backbones) == 1 else f"{d.label} / {backbone}"
                b = backbone.replace(":", "_")
                slug, legacy = f"{d.prefix}-{b}", (f"{d.legacy}-{b}" if d.legacy else None)

                def ids(suffix: str, s: str = slug, old: str | None = legacy, data: str = dataset_print) -> _CellRef:
                    return f"{s}-{suffix}", (f"{old}-{suffix}" if old else None), data

                plan = SplitPlan(config.val_fraction, config.test_fraction, config.seed)
                cap = config.cap_for(d.path)
                image_size = config.image_size_for(d.path)
                rows = _ctx_rows(ds, plan, cap)
                ctx = {
                    "dataset": str(ds.root if ds.source == "imagefolder" else d.path),
                    "backbone": backbone,
                    "weights": config.weights,
                    "image_size": image_size,
                    "device": config.device,
                    "cache_dir": cache_dir,
                    "progress": progress,
                    "val_fraction": config.val_fraction,
                    "test_fraction": config.test_fraction,
                    "seed": config.seed,
                    "heads": config.heads,
                    "finetune": config.finetune_for(d.path),  # with this dataset's augmentation
                    "final_fit": config.final_fit,
                    **rows,
                }
                entry: dict[str, Any] = {
                    "dataset": d.path,
                    "backbone": backbone,
                    "image_size": image_size,
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
                feats = run(ids("features"), "features", ctx, fresh_process=True)
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
                    r = run(ids(f"finetune-{strategy}"), "finetune", c, fresh_process=True)
                    entry["rows"].append(
                        r["row"]
                        if r and "row" in r
                        else {"family": "finetune", "strategy": strategy, "status": "failed", "error": (r or {}).get("error")}
                    )
                if config.fewshot:
                    few = asdict(config.fewshot)
                    r = run(ids("fewshot-heads"), "fewshot_heads", {**ctx, "fewshot": few}, fresh_process=False)
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
                        ft = dict(ctx["finetune"])
                        if few["finetune_rule_steps"]:
                            ft["rule_steps"] = few["finetune_rule_steps"]
                        for shots in few["finetune_shots"]:
                            try:
                                plan.fewshot(ds, shots, 0)
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
                                r = run(ids(f"fewshot-ft-{shots}-{draw}"), "fewshot_finetune", c, fresh_process=False)
                                if r and "points" in r:
                                    entry["fewshot"] += r["points"]
                if config.layerwise:
                    r = run(ids("layerwise"), "layerwise", ctx, fresh_process=False)
                    if r and "points" in r:
                        entry["layerwise"] = r["points"]
                results["datasets"][key] = entry
        results["meta"]["bench_seconds_this_run"] = time.perf_counter() - t_start
        files = write_report(results, out)
    return {"report": files["report"], "failed": failed, "results": results}


def _read_cell(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("cell file %s cannot be read (%s); running the cell again", path, type(exc).__name__)
        return None
    return data if isinstance(data, dict) else None
