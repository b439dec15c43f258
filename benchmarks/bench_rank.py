"""Evidence for `featx rank`: do transferability scores computed on the train rows order (backbone, layer, weights)
candidates the way the val-tuned linear probe's test accuracy does?

Candidates per dataset: EfficientNet-Lite0/-Lite1/-Lite2 (ImageNet weights) x every tappable layer (7 blocks + the
pooled output), Lite0 with ``--weights none`` (random init, a floor) at three layers, and Lite0 fine-tuned by
``featx finetune`` on *another* dataset (its checkpoint used as ``--weights``) at four layers: 31 per dataset.

For each candidate: the val-tuned logistic-regression probe (``featx.heads.fit_head``, fit-head's sweep and
train+val refit, test scored once) and every score of ``featx.ranking`` on the probe's train rows (SplitPlan's
rows: val is carved out of train where the dataset has none). Per dataset: Kendall tau, Spearman rho, top-1 regret.

CPU budget (2 shared cores): work is done in pieces, each piece saved at once, so a rerun skips finished work:
  * features: one forward pass per (dataset, source) for all layers at once (the bench's layer-wise tap,
    ``Backbone.multi_layer_model``), every split, kept as ``.npz`` in ``--work`` (not committed);
  * probes and scores: one record per candidate in ``benchmarks/results/ranking/candidates.json``.
``run --budget-s S`` does pieces until S seconds have passed and exits 3 while work remains:

    while true; do flock /tmp/featx-cpu.lock python benchmarks/bench_rank.py run --budget-s 280; [ $? = 3 ] || break; done
    python benchmarks/bench_rank.py report          # ranking.md, ranking.json, ranking.png (cheap; rescoring included)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ranking"
WORK = ROOT / "runs" / "bench_rank"
SHARED = Path(os.environ.get("FEATX_SHARED_DATA", "/work/shared/data"))
IMAGE_SIZE = None  # the weights' own input size (224 / 240 / 260 px)
DATASETS = ["hymenoptera", "flowers17", "clothing10", "digits"]
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
LAYERS = [f"blocks.{i}" for i in range(7)] + ["pooled"]
NONE_LAYERS = ["blocks.2", "blocks.4", "pooled"]
FT_LAYERS = ["blocks.4", "blocks.5", "blocks.6", "pooled"]
# the fine-tuned checkpoint each dataset gets: from another dataset (never itself)
FT_FROM = {"hymenoptera": "flowers17", "flowers17": "hymenoptera", "clothing10": "flowers17", "digits": "flowers17"}
FT_EPOCHS = 3


def dataset_path(name: str) -> Path:
    return WORK / "data" / "digits" if name == "digits" else SHARED / name


def sources(ds: str) -> list[dict[str, Any]]:
    out = [
        {"source": bb.replace("efficientnet_", ""), "backbone": bb, "weights": "imagenet", "layers": LAYERS} for bb in BACKBONES
    ]
    out.append({"source": "lite0-none", "backbone": BACKBONES[0], "weights": "none", "layers": NONE_LAYERS})
    ckpt = WORK / "finetune" / FT_FROM[ds] / "checkpoint.pt"
    out.append({"source": f"lite0-ft-{FT_FROM[ds]}", "backbone": BACKBONES[0], "weights": str(ckpt), "layers": FT_LAYERS})
    return out


def candidates(ds: str) -> list[dict[str, Any]]:
    return [{**s, "layer": layer, "id": f"{ds}/{s['source']}/{layer}"} for s in sources(ds) for layer in s["layers"]]


# --------------------------------------------------------------------------------------------------
# Pieces


def make_digits_piece() -> bool:
    out = dataset_path("digits")
    if (out / "test").is_dir():
        return False
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_digits import make_digits

    make_digits(out, size=64, force=True)
    return True


def finetune_piece(src: str) -> bool:
    out = WORK / "finetune" / src
    if (out / "result.json").is_file():
        return False
    from featx.finetuning import FinetuneConfig, finetune

    cfg = FinetuneConfig(strategy="full", epochs=FT_EPOCHS, early_stopping_patience=0, num_workers=0)
    t0 = time.perf_counter()
    res = finetune(
        str(dataset_path(src)),
        backbone=BACKBONES[0],
        image_size=IMAGE_SIZE,
        config=cfg,
        out_dir=out,
        final_fit="train",
        progress=False,
    )
    print(f"finetuned lite0 on {src}: test accuracy {res.get('accuracy')} in {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def features_file(ds: str, source: str) -> Path:
    return WORK / "features" / ds / f"{source}.npz"


def features_piece(ds: str, s: dict[str, Any]) -> bool:
    """One forward pass over every split for all of the source's layers."""
    path = features_file(ds, s["source"])
    if path.is_file():
        return False
    import dataclasses

    from featx.backbones import build_backbone
    from featx.data import load_dataset
    from featx.inference import compute_features

    data = load_dataset(str(dataset_path(ds)))
    bb = build_backbone(s["backbone"], s["weights"], image_size=IMAGE_SIZE)
    model, dims = bb.multi_layer_model(s["layers"])
    tap = dataclasses.replace(bb, model=model)
    arrays: dict[str, Any] = {"layers": np.array(s["layers"]), "dims": np.array(dims)}
    t0 = time.perf_counter()
    for name, split in data.splits.items():
        feats, errors = compute_features(tap, split.root, split.paths, progress=False)
        if any(errors):
            raise SystemExit(f"{ds}/{name}: {sum(bool(e) for e in errors)} images failed")
        arrays[f"{name}_x"] = feats.astype(np.float32)
        arrays[f"{name}_y"] = np.asarray(split.labels)
    arrays["forward_seconds"] = np.array(time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    print(f"features {ds}/{s['source']}: {sum(dims)} dims, {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def load_layer(ds: str, source: str, layer: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The plan's train/val/test (features, labels) of one layer: val (and test) carved from train as fit-head does."""
    from featx.data import SplitPlan

    z = np.load(features_file(ds, source))
    layers = [str(x) for x in z["layers"]]
    bounds = np.cumsum([0, *[int(d) for d in z["dims"]]])
    i = layers.index(layer)
    cut = slice(bounds[i], bounds[i + 1])
    train_x, train_y = z["train_x"][:, cut], z["train_y"]
    carved = SplitPlan().carve(train_y, has_val="val_x" in z, has_test="test_x" in z)
    out = {name: (train_x[rows], train_y[rows]) for name, rows in carved.items()}
    for name in ("val", "test"):
        if f"{name}_x" in z:
            out[name] = (z[f"{name}_x"][:, cut], z[f"{name}_y"])
    out["_rows"] = carved["train"]  # type: ignore[assignment]
    return out


def probe_piece(c: dict[str, Any], done: dict[str, Any]) -> bool:
    if c["id"] in done and "probe_accuracy" in done[c["id"]]:
        return False
    from featx.cache import FeatureSet
    from featx.heads import fit_head

    ds = c["id"].split("/")[0]
    parts = load_layer(ds, c["source"], c["layer"])
    from featx.backbones import resolve_embedder

    attrs = {"embedder": resolve_embedder(c["backbone"], c["weights"], layer=c["layer"], image_size=IMAGE_SIZE).to_dict()}
    sets = {}
    for name in ("train", "val", "test"):
        x, y = parts[name]
        classes = [str(k) for k in range(int(y.max()) + 1)]
        sets[name] = FeatureSet(x, y, [str(i) for i in range(len(y))], np.arange(len(y)), classes, attrs, Path("."))
    t0 = time.perf_counter()
    head = fit_head(sets["train"], sets["val"], sets["test"], kind="logreg")
    secs = time.perf_counter() - t0
    rec = done.setdefault(c["id"], {})
    rec.update(
        {
            "dataset": ds,
            "source": c["source"],
            "backbone": c["backbone"],
            "weights": c["weights"]
            if c["weights"] in ("imagenet", "none")
            else f"featx checkpoint (lite0 fine-tuned on {FT_FROM[ds]})",
            "layer": c["layer"],
            "dim": int(parts["train"][0].shape[1]),
            "n_train": int(len(parts["train"][1])),
            "probe_accuracy": float((head.test_metrics or {})["accuracy"]),
            "probe_val_accuracy": float(head.val_accuracy),
            "probe_params": head.best_params,
            "probe_seconds": secs,
        }
    )
    print(f"probe {c['id']}: test {rec['probe_accuracy']:.4f} ({secs:.1f} s)", flush=True)
    return True


def score_candidate(c: dict[str, Any], rec: dict[str, Any], names: list[str]) -> None:
    """Every score on the probe's train rows (never val or test), timed."""
    from featx.ranking import SCORES

    ds = c["id"].split("/")[0]
    x, y = load_layer(ds, c["source"], c["layer"])["train"]
    scores, seconds = {}, {}
    for name in names:
        t0 = time.perf_counter()
        scores[name] = float(SCORES[name](x, y))
        seconds[name] = time.perf_counter() - t0
    rec["scores"], rec["score_seconds"] = scores, seconds


def load_done() -> dict[str, Any]:
    f = RESULTS / "candidates.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def save_done(done: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    f = RESULTS / "candidates.json"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(done.items())), indent=1) + "\n")
    os.replace(tmp, f)


def run(budget_s: float, datasets: list[str]) -> int:
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()

    def over() -> bool:
        return time.perf_counter() - t0 > budget_s

    done = load_done()
    steps: list[Any] = [make_digits_piece]
    steps += [lambda s=s: finetune_piece(s) for s in sorted(set(FT_FROM[d] for d in datasets))]
    for ds in datasets:
        steps += [lambda ds=ds, s=s: features_piece(ds, s) for s in sources(ds)]
    for ds in datasets:
        steps += [lambda c=c: probe_piece(c, done) for c in candidates(ds)]
    for step in steps:
        if over():
            save_done(done)
            print(f"budget of {budget_s:.0f} s spent; run again for the rest", flush=True)
            return 3
        if step():
            save_done(done)
    save_done(done)
    print("all pieces done", flush=True)
    return 0


SCORE_NAMES = ["logme", "hscore", "knn"]
TARGET_TAU, TARGET_REGRET = 0.7, 1.0  # the target: tau >= 0.7 on every dataset, top-1 regret <= 1 point
CLI_RUN = RESULTS / "featx_rank_hymenoptera"  # `featx rank ... --verify` on hymenoptera (see CLI_COMMAND)
CLI_COMMAND = (
    "featx -q rank /work/shared/data/hymenoptera --backbone efficientnet_lite0 --backbone efficientnet_lite1 "
    "--backbone efficientnet_lite2 --layers all --score logme,hscore,knn --cache-dir runs/rank-cache --device cpu "
    "--verify 24 --out benchmarks/results/ranking/featx_rank_hymenoptera"
)


def machine() -> str:
    """The CPU model and core count of this machine (from /proc/cpuinfo), no GPU assumed: featx rank runs on CPU."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model} VM, no GPU (shared with other jobs, each piece under flock /tmp/featx-cpu.lock)"


MACHINE = machine()


def score_all(datasets: list[str], done: dict[str, Any]) -> None:
    """Score every probed candidate that lacks a score (cheap: train rows only, from the saved features)."""
    for ds in datasets:
        for c in candidates(ds):
            rec = done.get(c["id"])
            if rec and "probe_accuracy" in rec and set(rec.get("scores", {})) != set(SCORE_NAMES):
                score_candidate(c, rec, SCORE_NAMES)
                save_done(done)


def dataset_stats(recs: list[dict[str, Any]], score: str) -> dict[str, Any]:
    from scipy import stats

    acc = np.array([r["probe_accuracy"] for r in recs])
    val = np.array([r[score] if score in r else r["scores"][score] for r in recs])
    tau = stats.kendalltau(val, acc)
    rho = stats.spearmanr(val, acc)
    wtau = stats.weightedtau(val, acc)
    pick = int(np.argmax(val))
    best = int(np.argmax(acc))
    # featx rank --verify K: the probe (val accuracy, the probe's own rule) decides among the score's top K
    pval = np.array([r["probe_val_accuracy"] for r in recs])
    verify = {}
    for k in (3, 5):
        top = np.argsort(-val, kind="stable")[:k]
        chosen = int(top[np.argmax(pval[top])])
        verify[f"top{k}_regret_points"] = float(100 * (acc[best] - acc[chosen]))
        verify[f"top{k}_pick"] = recs[chosen]["id"]
    return {
        **verify,
        "kendall_tau": float(tau.statistic),
        "kendall_p": float(tau.pvalue),
        "spearman_rho": float(rho.statistic),
        "weighted_tau": float(wtau.statistic),
        "pick": recs[pick]["id"],
        "pick_accuracy": float(acc[pick]),
        "best": recs[best]["id"],
        "best_accuracy": float(acc[best]),
        "regret_points": float(100 * (acc[best] - acc[pick])),
    }


def report(datasets: list[str]) -> int:
    done = load_done()
    score_all(datasets, done)
    per: dict[str, Any] = {}
    for ds in datasets:
        recs = [{**done[c["id"]], "id": c["id"]} for c in candidates(ds) if c["id"] in done and "scores" in done[c["id"]]]
        if not recs:
            continue
        n_test = len(np.load(features_file(ds, "lite0"))["test_y"])  # every dataset here has a test folder
        entry: dict[str, Any] = {"n_candidates": len(recs), "n_train": recs[0]["n_train"], "scores": {}}
        best_acc = max(r["probe_accuracy"] for r in recs)
        entry["n_test"] = n_test
        entry["test_se_points"] = float(100 * np.sqrt(best_acc * (1 - best_acc) / n_test))
        for score in SCORE_NAMES:
            entry["scores"][score] = dataset_stats(recs, score)
            # the same on the ImageNet-weight candidates alone (the backbone x layer question without the floor)
            inet = [r for r in recs if r["weights"] == "imagenet"]
            entry["scores"][score]["imagenet_only"] = dataset_stats(inet, score)
        # the probe's own val accuracy as a "score": what picking by the probe (the expensive way) gives
        entry["scores"]["probe_val"] = dataset_stats([{**r, "probe_val": r["probe_val_accuracy"]} for r in recs], "probe_val")
        score_s = sum(sum(r["score_seconds"].values()) for r in recs)
        logme_s = sum(r["score_seconds"]["logme"] for r in recs)
        probe_s = sum(r["probe_seconds"] for r in recs)
        entry["seconds"] = {"all_scores": score_s, "logme": logme_s, "probes": probe_s, "probe_over_logme": probe_s / logme_s}
        entry["candidates"] = recs
        per[ds] = entry
    out = {"machine": MACHINE, "image_size": "the weights' own (224/240/260 px)", "datasets": per}
    (RESULTS / "ranking.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(per)
    return render()


def render() -> int:
    """ranking.md from ranking.json (and the featx rank CLI run's rank.json): no features needed."""
    out = json.loads((RESULTS / "ranking.json").read_text())
    text = markdown(out["datasets"], out["machine"])
    (ROOT / "benchmarks" / "results" / "ranking.md").write_text(text)
    print(text)
    return 0


def plot(per: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per), figsize=(4.2 * len(per), 4), squeeze=False)
    colours = {"lite0": "C0", "lite1": "C1", "lite2": "C2", "lite0-none": "C7"}
    for ax, (ds, e) in zip(axes[0], per.items()):
        for r in e["candidates"]:
            col = colours.get(r["source"], "C3")
            ax.scatter(r["scores"]["logme"], 100 * r["probe_accuracy"], c=col, s=14)
        for src, col in [*colours.items(), ("lite0-ft (other dataset)", "C3")]:
            ax.scatter([], [], c=col, s=14, label=src)
        st = e["scores"]["logme"]
        ax.set_title(f"{ds}: tau {st['kendall_tau']:.2f}, regret {st['regret_points']:.1f} pt", fontsize=9)
        ax.set_xlabel("LogME (train rows)")
        ax.set_ylabel("val-tuned probe test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "ranking.png", dpi=110)
    plt.close(fig)


def markdown(per: dict[str, Any], machine_text: str = MACHINE) -> str:
    names = {
        "logme": "LogME",
        "hscore": "H-score (shrinkage)",
        "knn": "LOO 10-NN acc.",
        "probe_val": "probe val acc. (reference)",
    }
    lines = [
        "# `featx rank`: transferability scores vs the val-tuned linear probe",
        "",
        "Command (pieces of <= ~5 min under the CPU lock; each piece saved, reruns skip finished work):",
        "",
        "```",
        "while true; do flock /tmp/featx-cpu.lock python benchmarks/bench_rank.py run --budget-s 270; [ $? = 3 ] || break; done",
        "python benchmarks/bench_rank.py report",
        "```",
        "",
        f"Machine as the run recorded it: {machine_text}. (That run wrote a fixed label; the script now reads",
        "/proc/cpuinfo, and this project's machine after its restart reports a 2-core AMD EPYC: the only timings that",
        "matter here are ratios on one machine.) Image size: each backbone's own (Lite0 224, Lite1 240, Lite2 260 px).",
        "The per-candidate features of this run were lost with the machine restart (never committed);",
        "`python benchmarks/bench_rank.py render` rebuilds this page from `ranking/ranking.json`.",
        "",
        "Candidates per dataset (31): EfficientNet-Lite0/1/2 with ImageNet weights x 8 layers (`blocks.0`..`blocks.6`,",
        "`pooled`); Lite0 with `--weights none` (random init: the floor) at `blocks.2`, `blocks.4`, `pooled`; Lite0",
        f"fine-tuned by `featx finetune` ({FT_EPOCHS} epochs, full, final fit on train) on *another* dataset, its",
        "checkpoint used as `--weights` (flowers17's for hymenoptera, clothing10 and digits; hymenoptera's for flowers17)",
        "at `blocks.4`..`blocks.6`, `pooled`. Ground truth: fit-head's val-tuned logistic-regression probe",
        "(`featx.heads.fit_head`, C swept on val, refit on train+val), test accuracy. Scores see only the probe's train",
        "rows (SplitPlan: val and test carved out of train where the dataset has none; clothing10 has its own val).",
        "Features: one forward pass per (dataset, backbone, weights) for all layers (the bench's multi-layer tap), kept",
        "in `runs/bench_rank/` (not committed); per-candidate results in `ranking/candidates.json`.",
        "",
        "## Summary (all 31 candidates per dataset)",
        "",
        "Regret: the best candidate's probe test accuracy minus that of the score's pick, in points; `--verify 3`: the",
        "probe's val accuracy picks among the score's top 3 (what `featx rank --verify 3` shows a user). The last rows",
        "per dataset rank by the probe's own val accuracy (the expensive way, every probe fitted): the noise floor of",
        "choosing on the train side. SE: the binomial standard error of the best candidate's test accuracy.",
        "",
        "| dataset | train / test rows (SE, points) | score | Kendall tau | Spearman rho | weighted tau "
        "| score's pick | its probe acc. | best candidate | best acc. | regret | regret, --verify 3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ds, e in per.items():
        for s, st in e["scores"].items():
            size = f"{e['n_train']} / {e['n_test']} ({e['test_se_points']:.1f})"
            lines.append(
                f"| {ds} | {size} | {names[s]} | {st['kendall_tau']:.3f} | {st['spearman_rho']:.3f} "
                f"| {st['weighted_tau']:.3f} | `{st['pick'].split('/', 1)[1]}` | {100 * st['pick_accuracy']:.1f}% "
                f"| `{st['best'].split('/', 1)[1]}` | {100 * st['best_accuracy']:.1f}% | {st['regret_points']:.1f} "
                f"| {st['top3_regret_points']:.1f} |"
            )
    lines += [
        "",
        "## The same on the 24 ImageNet-weight candidates (backbone x layer only, no floor, no fine-tuned weights)",
        "",
        "| dataset | score | Kendall tau | Spearman rho | score's pick | its probe acc. | best acc. | regret (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ds, e in per.items():
        for s in SCORE_NAMES:
            st = e["scores"][s]["imagenet_only"]
            lines.append(
                f"| {ds} | {names[s]} | {st['kendall_tau']:.3f} | {st['spearman_rho']:.3f} | `{st['pick'].split('/', 1)[1]}` "
                f"| {100 * st['pick_accuracy']:.1f}% | {100 * st['best_accuracy']:.1f}% | {st['regret_points']:.1f} |"
            )
    lines += [
        "",
        "## Cost (sum over the 31 candidates, from features in memory)",
        "",
        "| dataset | LogME s | all three scores s | probes s | probes / LogME |",
        "|---|---|---|---|---|",
    ]
    for ds, e in per.items():
        t = e["seconds"]
        lines.append(f"| {ds} | {t['logme']:.2f} | {t['all_scores']:.2f} | {t['probes']:.1f} | {t['probe_over_logme']:.0f}x |")
    lines += target_section(per)
    lines += finetune_section()
    lines += cli_section()
    lines += ["", "## Every candidate", ""]
    for ds, e in per.items():
        lines += [
            f"### {ds}",
            "",
            "| candidate | dim | LogME | H-score | kNN | probe val | probe test |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(e["candidates"], key=lambda r: -r["scores"]["logme"]):
            sc = r["scores"]
            lines.append(
                f"| `{r['id'].split('/', 1)[1]}` | {r['dim']} | {sc['logme']:.4f} | {sc['hscore']:.3f} | {sc['knn']:.3f} "
                f"| {100 * r['probe_val_accuracy']:.1f}% | {100 * r['probe_accuracy']:.1f}% |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def target_section(per: dict[str, Any]) -> list[str]:
    """Where the issue's target (tau >= 0.7 on every dataset, top-1 regret <= 1 point) holds and fails, and why."""
    names = {"logme": "LogME", "hscore": "H-score", "knn": "kNN"}
    lines = [
        "",
        f"## The target: Kendall tau >= {TARGET_TAU} on every dataset and top-1 regret <= {TARGET_REGRET:.0f} point",
        "",
        "| score | tau >= 0.7 (31 candidates) | regret <= 1 point (31 candidates) | regret <= 1 with `--verify 3` "
        "| regret <= 1 (24 ImageNet candidates) |",
        "|---|---|---|---|---|",
    ]

    for s in SCORE_NAMES:
        cells = []
        for field, limit, sub in [
            ("kendall_tau", TARGET_TAU, None),
            ("regret_points", TARGET_REGRET, None),
            ("top3_regret_points", TARGET_REGRET, None),
            ("regret_points", TARGET_REGRET, "imagenet_only"),
        ]:
            bad = []
            for ds, e in per.items():
                st = e["scores"][s] if sub is None else e["scores"][s][sub]
                v = st[field]
                if (field == "kendall_tau" and v < limit) or (field != "kendall_tau" and v > limit):
                    bad.append(f"{ds} ({v:.2f})" if field == "kendall_tau" else f"{ds} ({v:.1f})")
            cells.append("holds on all 4" if not bad else "**fails**: " + ", ".join(bad))
        lines.append(f"| {names[s]} | " + " | ".join(cells) + " |")
    floor = ", ".join(f"{ds} {e['scores']['probe_val']['regret_points']:.1f}" for ds, e in per.items())
    ses = ", ".join(f"{ds} {e['test_se_points']:.1f}" for ds, e in per.items())
    lines += [
        "",
        "Plainly: the rank correlation target holds for every score on every dataset (LogME's tau 0.82-0.93), but the",
        "regret target does not. LogME's top-1 pick misses by more than a point on three of the four datasets",
        "(flowers17 7.4, clothing10 2.2, digits 1.4 points); `--verify 3` (probes on LogME's top 3, the probe's val",
        "accuracy decides) repairs clothing10 and digits but not flowers17. Why:",
        "",
        "- **flowers17 (7.4 points):** the pick is Lite0 fine-tuned on hymenoptera (`lite0-ft-hymenoptera/pooled`,",
        "  LogME 0.6560) against the best, `lite2/pooled` (0.6556): a tie to the third decimal. Nothing on the train",
        "  side separates them either: the probe's val accuracy ties them too (97.5% each), yet on test the fine-tuned",
        "  checkpoint is 7.4 points behind. The candidate fits the train distribution as well as the best one and",
        "  transfers worse to the test images; a score computed on train rows cannot see that, and neither can val",
        "  carved from the same train folder. Without the fine-tuned candidates (the 24 ImageNet ones) LogME's and the",
        "  H-score's flowers17 regret is 0.",
        "- **clothing10 (2.2) and digits (1.4):** the pick and the best are neighbours (pooled output of another",
        "  Lite size, or of the checkpoint fine-tuned on flowers17), 1.5 and 2 standard errors of the test accuracy",
        f"  apart (binomial SE of the best candidate's test accuracy, points: {ses}).",
        "- **The noise floor:** choosing by the probe's own val accuracy, i.e. fitting every probe, regrets",
        f"  {floor} points: a 1-point regret target is at or below the resolution of these test sets for any",
        "  selection made before looking at test, expensive or cheap. LogME with `--verify 3` (regret 0 on three",
        "  datasets) does at least as well as fitting all 31 probes and choosing on val, for 3 probes.",
        "- The H-score (shrinkage) has the lowest tau (0.73-0.88): its trace grows with width even for random",
        "  features (`lite0-none/pooled`, 1280-d, scores near the top ImageNet layers on hymenoptera and flowers17),",
        "  which is why LogME is the default and the CLI ranks by the first `--score`.",
        "",
        "LogME here is the exact evidence of the paper's equation. The authors' published fixed-point code drops",
        "(D - N) log(alpha) from log|A| when a layer is wider than its rows (N < D: every 1280-d pooled layer on",
        "hymenoptera's 195 train rows), which inflates wide layers by (D - N)/(2N) log(alpha); featx does not",
        "(`tests/test_ranking.py` checks equality at full column rank and that exact difference otherwise).",
    ]
    return lines


def finetune_section() -> list[str]:
    return [
        "",
        "## Against fine-tuning accuracy",
        "",
        "Not measured across candidates. featx's bench fine-tunes one backbone, Lite0, per dataset",
        "(`benchmarks/results/bench_cpu_issue21/`, on its own capped rows, four strategies): one candidate per",
        "dataset, so no rank correlation against fine-tuning accuracy is defined from it. Fine-tuning each of the 31",
        "candidates (a fine-tune per backbone, and layers are not fine-tuning choices) on 2 shared CPU cores is out of",
        "reach in this session's time. What this study does include: Lite0 checkpoints fine-tuned by `featx finetune`",
        "(3 epochs, full) on another dataset, used as candidates (`--weights CHECKPOINT`), scored and probed like the",
        "others; they are where the regret target fails worst (flowers17 above).",
    ]


def cli_section() -> list[str]:
    """The `featx rank --verify` run on hymenoptera: what a user sees, and the cost ratio from a warm cache."""
    f = CLI_RUN / "rank.json"
    if not f.is_file():
        return []
    r = json.loads(f.read_text())
    v = r.get("verify") or {}
    rows = r["rows"]
    secs = {s: sum(x["score_seconds"][s] for x in rows) for s in r["scores"]}
    lines = [
        "",
        "## `featx rank` itself (hymenoptera, warm cache)",
        "",
        f"Command (the caches extracted by a first, cold run of the same command without `--verify`): `{CLI_COMMAND}`.",
        f"Machine: {r.get('machine') or MACHINE}.",
        "",
        f"Rows scored: {r['rows_scored']}.",
    ]
    cold = CLI_RUN / "cold.json"  # rank.json of the first run (cold cache, no --verify), kept for its timings
    if cold.is_file():
        c = json.loads(cold.read_text())
        by_candidate = lambda rs: {(x["backbone"], x["layer"]): x["scores"] for x in rs}  # noqa: E731
        same = by_candidate(c["rows"]) == by_candidate(rows)
        lines += [
            "",
            f"The cold run: {len(c['rows'])} train caches extracted in {c['extract_seconds']:.0f} s, scored in "
            f"{c['score_seconds']:.2f} s; its scores equal the warm run's: {'yes' if same else 'no'}.",
        ]
    if v:
        probe = v["probe_seconds"]
        probed = [x for x in rows if x.get("probe_seconds") is not None]
        med_score = float(np.median([sum(x["score_seconds"].values()) for x in rows]))
        med_logme = float(np.median([x["score_seconds"].get("logme", np.nan) for x in rows]))
        med_probe = float(np.median([x["probe_seconds"] for x in probed]))
        first_probe = probed[0]["probe_seconds"]  # verify fits in rank order
        lines += [
            "",
            f"Cost from the warm cache, {len(rows)} candidates: scoring all of them took {r['score_seconds']:.2f} s "
            f"(LogME {secs.get('logme', 0):.2f} s, H-score {secs.get('hscore', 0):.2f} s, kNN {secs.get('knn', 0):.2f} s); "
            f"fitting fit-head's val-tuned probe on {v['k']} of them took {probe:.2f} s (cache read included): "
            f"probes / all three scores **{v['cost_ratio']:.1f}x**, probes / LogME alone "
            f"**{probe * len(rows) / v['k'] / max(secs.get('logme', 0), 1e-9):.1f}x**. Medians per candidate: score "
            f"(all three) {med_score:.3f} s, LogME {med_logme:.4f} s, probe {med_probe:.3f} s (the first probe also pays "
            f"scikit-learn's import and warm-up: {first_probe:.2f} s).",
            "",
            "Both are small next to extraction on a dataset this size (the cold run above); the larger saving of ranking",
            "first is that `featx rank` extracts only the train split of every candidate, and val/test (what a probe",
            "needs) only for the K candidates `--verify` probes. Probes grow with rows and with the C sweep; LogME",
            "with min(N, D)^3 (one eigendecomposition per candidate, every class and iteration in its eigenbasis).",
            "",
            f"Verify: LogME's pick `{v['pick']}` {'holds' if v['holds'] else 'does NOT hold'}: probe val "
            f"{100 * (v['pick_val_accuracy'] or 0):.1f}% (best of the {v['k']} verified by val: `{v['best_by_val']}`, "
            f"{100 * (v['best_val_accuracy'] or 0):.1f}%), probe test {100 * (v['pick_test_accuracy'] or 0):.1f}%, "
            f"test regret {100 * v['test_regret']:.1f} points.",
        ]
        verified = [x for x in rows if x.get("probe_accuracy") is not None]
        if len(verified) >= 3:
            from scipy import stats

            acc = [x["probe_accuracy"] for x in verified]
            for s in r["scores"]:
                sc = [x["scores"][s] for x in verified]
                lines.append(
                    f"- {s} over the {len(verified)} verified candidates: Kendall tau "
                    f"{stats.kendalltau(sc, acc).statistic:.3f}, Spearman rho {stats.spearmanr(sc, acc).statistic:.3f}"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--budget-s", type=float, default=280.0)
    r.add_argument("--datasets", nargs="+", default=DATASETS)
    rep = sub.add_parser("report")
    rep.add_argument("--datasets", nargs="+", default=DATASETS)
    sub.add_parser("render", help="ranking.md from ranking.json (no features needed)")
    a = p.parse_args(argv)
    if a.cmd == "run":
        return run(a.budget_s, a.datasets)
    if a.cmd == "render":
        return render()
    return report(a.datasets)


if __name__ == "__main__":
    sys.exit(main())
