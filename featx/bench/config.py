"""The bench's settings: :class:`BenchConfig` (the grid), the quick preset, reading a YAML/TOML file, and the
check of every setting's type and range before anything runs; per-dataset settings and their keys."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from featx.backbones import DEFAULT_BACKBONE, MAX_IMAGE_SIZE
from featx.data import FINAL_FITS, SAMPLE_DATASET
from featx.errors import UsageError


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
    top = MAX_IMAGE_SIZE
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
