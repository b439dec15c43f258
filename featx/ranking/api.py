"""``featx.rank``: score every (backbone, layer, weights) candidate on a dataset's train rows from featx caches
(extracting what is missing through the ordinary cache), rank them, and optionally check the pick with the real
val-tuned probe (``verify``).

Rows: exactly the rows fit-head's probe fits on: the dataset's ``train`` split as the :class:`~featx.data.SplitPlan`
leaves it (where the dataset has no val or test folder, the plan carves them out of train first; those rows are
never scored). Val and test features are never read by a score.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from featx.backbones import POOLED, WEIGHT_SOURCES, EmbedderSpec, embedder_spec
from featx.data import ImageDataset, RowSelection, SplitPlan, load_dataset
from featx.errors import CacheError, UsageError
from featx.ranking.scores import SCORES, GramStats, check_inputs
from featx.records import Record

log = logging.getLogger(__name__)

RANK_JSON = "rank.json"
RANK_PLOT = "rank.png"


@dataclass(frozen=True)
class Candidate:
    """One thing to rank: a backbone with weights (``imagenet``, ``none`` or a weights/checkpoint file) at a layer."""

    backbone: str
    weights: str = "imagenet"
    layer: str = POOLED

    def label(self) -> str:
        w = self.weights if self.weights in WEIGHT_SOURCES else Path(self.weights).name
        return f"{self.backbone.replace('efficientnet_', '')}/{w}/{self.layer}"


@dataclass
class RankRow(Record):
    """One candidate's scores (on the train rows) and, when verified, its probe's accuracies."""

    backbone: str
    weights: str
    layer: str
    dim: int | None = None
    n_rows: int | None = None
    scores: dict[str, float] = field(default_factory=dict)
    score_seconds: dict[str, float] = field(default_factory=dict)
    extract_seconds: float | None = None
    cache: str | None = None
    probe_val_accuracy: float | None = None
    probe_accuracy: float | None = None
    probe_seconds: float | None = None
    probe_params: dict[str, Any] | None = None

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.backbone, self.weights, self.layer)


@dataclass
class RankResult(Record):
    """What :func:`rank` returns and ``rank.json`` holds: rows best first by ``scores[0]``."""

    _lists: ClassVar[dict[str, type[Record]]] = {"rows": RankRow}

    dataset: str
    scores: list[str]
    rows_scored: str
    rows: list[RankRow]
    verify: dict[str, Any] | None = None
    score_seconds: float | None = None
    extract_seconds: float | None = None

    def table(self) -> str:
        """The ranked table (plain text, as the CLI prints it)."""
        heads = ["#", "candidate", "dim", *self.scores]
        verified = any(r.probe_accuracy is not None for r in self.rows)
        if verified:
            heads += ["probe val", "probe test"]
        lines = []
        for i, r in enumerate(self.rows, 1):
            cells = [str(i), r.candidate.label(), str(r.dim)] + [f"{r.scores[s]:.4f}" for s in self.scores]
            if verified:
                cells += [_pct(r.probe_val_accuracy), _pct(r.probe_accuracy)]
            lines.append(cells)
        widths = [max(len(h), *(len(c[j]) for c in lines)) if lines else len(h) for j, h in enumerate(heads)]
        fmt = [f"{h:<{w}}" if j == 1 else f"{h:>{w}}" for j, (h, w) in enumerate(zip(heads, widths))]
        out = ["  ".join(fmt)]
        for cells in lines:
            out.append("  ".join(f"{c:<{w}}" if j == 1 else f"{c:>{w}}" for j, (c, w) in enumerate(zip(cells, widths))))
        return "\n".join(out)

    def summary(self) -> str:
        """The sentences under the table: rows scored, cost, and the verify outcome."""
        lines = [f"scored {len(self.rows)} candidate(s) by {self.scores[0]} on {self.rows_scored}"]
        if self.score_seconds is not None:
            lines.append(f"scoring took {self.score_seconds:.2f} s in all (extraction {self.extract_seconds or 0:.1f} s)")
        v = self.verify
        if v:
            lines.append(
                f"verify: probes on the top {v['k']} took {v['probe_seconds']:.1f} s "
                f"({v['probe_seconds_per_candidate']:.2f} s each vs {v['score_seconds_per_candidate']:.3f} s to score one: "
                f"{v['cost_ratio']:.0f}x)"
            )
            holds = "holds" if v["holds"] else "does NOT hold"
            lines.append(
                f"verify: {self.scores[0]}'s pick {v['pick']} {holds}: probe val {_pct(v['pick_val_accuracy'])} "
                f"(best of the top {v['k']}: {v['best_by_val']} at {_pct(v['best_val_accuracy'])}); "
                f"test {_pct(v['pick_test_accuracy'])}, regret {100 * v['test_regret']:.1f} points"
            )
        return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


# --------------------------------------------------------------------------------------------------
# Scoring one cache


def score_cache(
    path: str | os.PathLike[str],
    rows: RowSelection | None = None,
    scores: Sequence[str] = ("logme",),
    *,
    chunk_rows: int | None = None,
) -> tuple[dict[str, float], dict[str, float], int, int]:
    """Scores of one cache's rows (``rows``: a RowSelection of its split; None = every valid row):
    ``(scores, seconds per score, n_rows, dim)``. When there are more rows than features, LogME streams over
    :meth:`CacheReader.iter_chunks` (it needs only F^T F and F^T Y, D x D); otherwise (N <= D, e.g. a 1280-d pooled
    layer on a few hundred images) the rows are small (N x D <= D x D), so they are read once and LogME works on
    the N x N Gram matrix, as do the other scores, which always read the rows into memory."""
    from featx.cache import CacheReader
    from featx.ranking.scores import logme_from_gram

    names = _check_scores(scores)
    out, secs = {}, {}
    with CacheReader(path) as reader:
        file_rows = reader.valid_rows(reader.rows_of(rows) if rows is not None else None)
        n, n_classes, dim = len(file_rows), len(reader.classes), int(reader.feature_dim)
        x = y = None
        for name in names:
            t0 = time.perf_counter()
            if name == "logme" and n > dim:
                stats = GramStats.of_chunks(
                    ((f, lab.astype(np.int64)) for _, f, lab in reader.iter_chunks(file_rows, chunk_rows=chunk_rows)),
                    dim,
                    n_classes,
                )
                out[name] = logme_from_gram(stats)
            else:
                if x is None:
                    parts = list(reader.iter_chunks(file_rows, chunk_rows=chunk_rows))
                    x = np.concatenate([f for _, f, _ in parts]) if parts else np.empty((0, dim), np.float32)
                    y = np.concatenate([lab for _, _, lab in parts]) if parts else np.empty(0, np.int64)
                    check_inputs(x, y)
                out[name] = float(SCORES[name](x, y))
            secs[name] = time.perf_counter() - t0
    return out, secs, n, dim


def _check_scores(scores: Sequence[str] | str) -> list[str]:
    names = [s.strip() for s in (scores.split(",") if isinstance(scores, str) else scores) if s.strip()]
    unknown = [s for s in names if s not in SCORES]
    if not names or unknown:
        raise UsageError(f"unknown score(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(SCORES)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------
# Candidates and caches


def _layers_of(backbone: str, weights: str, layers: str | Sequence[str], image_size: int | None) -> list[str]:
    if isinstance(layers, str):
        if layers == "all":
            from featx.backbones import build_backbone

            return list(build_backbone(backbone, weights, image_size=image_size).layers)
        layers = [x.strip() for x in layers.split(",") if x.strip()]
    if not layers:
        raise UsageError("--layers: give pooled, all, or comma-separated layer names")
    return list(dict.fromkeys(layers))


def _train_cache(
    ds: ImageDataset, embedder: EmbedderSpec, splits: list[str], cache_dir: Any, settings: Any, progress: bool
) -> tuple[dict[str, Path], float]:
    """The caches of ``splits`` for ``embedder``: found by key, else extracted (the ordinary featx.extraction path)."""
    from featx.cache import find_cache, resolve_cache_dir
    from featx.extraction import cache_spec, extract

    cdir = resolve_cache_dir(cache_dir)
    found = {s: find_cache(cdir, cache_spec(ds.splits[s], embedder)) for s in splits}
    missing = [s for s, p in found.items() if p is None]
    seconds = 0.0
    if missing:
        t0 = time.perf_counter()
        results = extract(ds, embedder, splits=missing, settings=settings, cache_dir=cache_dir, progress=progress)
        seconds = time.perf_counter() - t0
        found.update({r.split: r.path for r in results})
    if any(p is None for p in found.values()):
        raise CacheError(f"no cache for {embedder.describe()} after extraction")
    return {k: Path(v) for k, v in found.items()}, seconds  # type: ignore[arg-type]


def _rows_description(ds: ImageDataset, plan: SplitPlan, train: RowSelection) -> str:
    n_split = len(ds.splits["train"])
    carved = [s for s in ("val", "test") if s not in ds.splits]
    if not carved:
        return f"split 'train' (all {n_split} rows; val and test are their own splits and never scored)"
    return (
        f"split 'train': {len(train)} of its {n_split} rows (the SplitPlan, seed {plan.seed}, carved "
        f"{' and '.join(carved)} out of train first; those rows are never scored)"
    )


def rank(
    dataset: str | os.PathLike[str] | ImageDataset,
    backbones: Sequence[str] | str | None = None,
    *,
    weights: Sequence[str] | str = "imagenet",
    layers: str | Sequence[str] = POOLED,
    scores: Sequence[str] | str = ("logme",),
    candidates: Sequence[Candidate] | None = None,
    verify: int = 0,
    image_size: int | None = None,
    split_plan: SplitPlan | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    settings: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    chunk_rows: int | None = None,
    progress: bool = False,
) -> RankResult:
    """Rank every (backbone, weights, layer) candidate of ``dataset`` by ``scores[0]`` (ties: the next score).

    ``backbones`` x ``weights`` x ``layers`` (``pooled``, ``all`` = every tappable layer, or names) make the
    candidates, unless ``candidates`` lists them. Features come from the featx cache (``cache_dir``); a missing
    train cache is extracted through :func:`featx.extraction.extract` with ``settings``. Scores see only the rows
    the probe fits on (see the module doc). ``verify=K`` fits fit-head's val-tuned logistic-regression probe for
    the top K and records whether the score's pick is the probe's best on val (the probe's own selection rule),
    its test accuracy and regret, and the cost ratio. ``out_dir``: writes ``rank.json`` and ``rank.png``.
    """
    names = _check_scores(scores)
    if not isinstance(verify, int) or isinstance(verify, bool) or verify < 0:
        raise UsageError(f"--verify must be a whole number >= 0, got {verify!r}")
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    if "train" not in ds.splits:
        raise UsageError(f"{ds.root} has no train split: featx rank scores the train rows")
    plan = split_plan or SplitPlan()
    if out_dir is not None:
        from featx.data import refuse_inside_dataset

        refuse_inside_dataset(out_dir, ds, what="--out")
    if candidates is None:
        bbs = [backbones] if isinstance(backbones, str) else list(backbones or ["efficientnet_lite0"])
        ws = [weights] if isinstance(weights, str) else list(weights)
        candidates = [Candidate(b, w, layer) for b in bbs for w in ws for layer in _layers_of(b, w, layers, image_size)]
    if not candidates:
        raise UsageError("no candidates to rank")
    train = plan.resolve(ds)["train"]
    fit_labels = np.asarray(ds.split("train").labels)[train.array]
    if len(np.unique(fit_labels)) < 2:  # refuse before extracting anything
        raise UsageError(
            f"{ds.root}: the {len(train)} train rows a probe would fit on hold one class: a score needs at least 2 classes"
        )
    rows: list[RankRow] = []
    extract_total = 0.0
    for c in candidates:
        emb = embedder_spec(backbone=c.backbone, weights=c.weights, layer=c.layer, image_size=image_size)
        paths, ex = _train_cache(ds, emb, ["train"], cache_dir, settings, progress)
        extract_total += ex
        sc, secs, n, dim = score_cache(paths["train"], train, names, chunk_rows=chunk_rows)
        rows.append(RankRow(c.backbone, c.weights, c.layer, dim, n, sc, secs, ex, str(paths["train"])))
        log.info("%s: %s", c.label(), ", ".join(f"{k} {v:.4f}" for k, v in sc.items()))
    rows.sort(key=lambda r: tuple(-r.scores[s] for s in names))
    result = RankResult(
        dataset=str(ds.root),
        scores=names,
        rows_scored=_rows_description(ds, plan, train),
        rows=rows,
        score_seconds=sum(sum(r.score_seconds.values()) for r in rows),
        extract_seconds=extract_total,
    )
    if verify:
        result.verify = _verify(ds, result, verify, plan, image_size, cache_dir, settings, progress)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def _verify(
    ds: ImageDataset,
    result: RankResult,
    k: int,
    plan: SplitPlan,
    image_size: int | None,
    cache_dir: Any,
    settings: Any,
    progress: bool,
) -> dict[str, Any]:
    """fit-head's val-tuned logistic-regression probe on the top ``k`` candidates."""
    from featx.cache import load_cache
    from featx.heads import fit_head

    top = result.rows[: min(k, len(result.rows))]
    t_all = 0.0
    for r in top:
        emb = embedder_spec(backbone=r.backbone, weights=r.weights, layer=r.layer, image_size=image_size)
        paths, _ = _train_cache(ds, emb, sorted(ds.splits), cache_dir, settings, progress)
        t0 = time.perf_counter()
        sets = {name: load_cache(p) for name, p in paths.items()}
        head = fit_head(sets["train"], sets.get("val"), sets.get("test"), kind="logreg", plan=plan)
        r.probe_seconds = time.perf_counter() - t0
        t_all += r.probe_seconds
        r.probe_val_accuracy = float(head.val_accuracy)
        r.probe_accuracy = float((head.test_metrics or {}).get("accuracy", float("nan")))
        r.probe_params = head.best_params
    pick = top[0]
    best_val = max(top, key=lambda r: r.probe_val_accuracy or 0.0)
    best_test = max(r.probe_accuracy or 0.0 for r in top)
    per_score = (result.score_seconds or 0.0) / len(result.rows)
    per_probe = t_all / len(top)
    return {
        "k": len(top),
        "score": result.scores[0],
        "pick": pick.candidate.label(),
        "pick_val_accuracy": pick.probe_val_accuracy,
        "pick_test_accuracy": pick.probe_accuracy,
        "best_by_val": best_val.candidate.label(),
        "best_val_accuracy": best_val.probe_val_accuracy,
        "holds": (pick.probe_val_accuracy or 0.0) >= (best_val.probe_val_accuracy or 0.0),
        "test_regret": best_test - (pick.probe_accuracy or 0.0),
        "probe_seconds": t_all,
        "probe_seconds_per_candidate": per_probe,
        "score_seconds_per_candidate": per_score,
        "cost_ratio": per_probe / per_score if per_score > 0 else float("inf"),
    }


def write_outputs(result: RankResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``rank.json`` (the RankResult) and ``rank.png`` (scores per candidate; score vs probe where verified)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / RANK_JSON
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    os.replace(tmp, js)
    png = out / RANK_PLOT
    plot_ranking(result, png)
    return {"json": js, "plot": png}


def plot_ranking(result: RankResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = result.scores[0]
    verified = [r for r in result.rows if r.probe_accuracy is not None]
    ncols = 2 if verified else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 0.3 * len(result.rows) + 1.5), squeeze=False)
    ax = axes[0][0]
    labels = [r.candidate.label() for r in result.rows][::-1]
    ax.barh(range(len(labels)), [r.scores[score] for r in result.rows][::-1], color="#4C72B0")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel(f"{score} (train rows; higher is better)")
    ax.set_title(f"{Path(result.dataset).name}: {len(result.rows)} candidates")
    if verified:
        ax2 = axes[0][1]
        ax2.scatter([r.scores[score] for r in verified], [100 * (r.probe_accuracy or 0) for r in verified])
        for r in verified:
            ax2.annotate(r.candidate.label(), (r.scores[score], 100 * (r.probe_accuracy or 0)), fontsize=6)
        ax2.set_xlabel(score)
        ax2.set_ylabel("val-tuned probe test accuracy (%)")
        ax2.set_title(f"verify: top {len(verified)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
