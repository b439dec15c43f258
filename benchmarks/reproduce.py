"""Does a refactor keep every figure? Record what featx chooses and scores, before and after, and compare.

Two records, each a JSON of deterministic outcomes only (no timings):

* ``heads``: the head-sweep bench's featx side (``fit_head_arrays`` end to end, the same data and grids as
  ``benchmarks/bench_heads.py --part real/synthetic``) for every head kind on flowers17, clothing10 and
  synthetic-16k: chosen hyper-parameters, best val accuracy, test accuracy, and the committed
  ``bench_heads.json`` figures beside them.
* ``quick``: ``featx bench --quick`` (the README's first command) run from scratch into a temporary folder:
  for every result row, few-shot point and layer-wise point: the method, chosen hyper-parameters, val and
  test accuracy, the test predictions' digest and the rows each side saw.

Usage (each under the CPU lock)::

    flock /tmp/featx-cpu.lock python benchmarks/reproduce.py record --label before --cache-dir CACHE
    ... refactor ...
    flock /tmp/featx-cpu.lock python benchmarks/reproduce.py record --label after --cache-dir CACHE
    python benchmarks/reproduce.py compare before after     # writes benchmarks/results/refactor_reproduce.md

``CACHE`` holds the flowers17 and clothing10 pooled EfficientNet-Lite0 caches (``featx extract``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

OUT = Path(__file__).parent / "results"
WORK = OUT / "refactor_reproduce"


def _digest(values: Any) -> str | None:
    if values is None:
        return None
    return hashlib.sha256(json.dumps(values, default=str).encode()).hexdigest()[:16]


def record_heads(cache_dir: Path) -> list[dict[str, Any]]:
    import bench_heads as bh

    from featx.heads import HEADS

    committed = json.loads((OUT / "bench_heads.json").read_text())
    ref = {(r["dataset"], r["kind"]): r["featx"] for r in committed["real"] + committed["synthetic"] if "featx" in r}
    rows = []
    sets = [(n, bh.real_dataset(cache_dir, n)) for n in ("flowers17", "clothing10")] + [("synthetic-16k", bh.synthetic())]
    for name, data in sets:
        for kind in HEADS:
            fx = bh.featx_fit(kind, data, bh._grid(kind, data))
            c = ref.get((name, kind), {})
            rows.append(
                {
                    "dataset": name,
                    "kind": kind,
                    "best_params": fx["best_params"],
                    "val_accuracy": fx["val_accuracy"],
                    "test_accuracy": fx["test_accuracy"],
                    "committed_best_params": c.get("best_params"),
                    "committed_test_accuracy": c.get("test_accuracy"),
                }
            )
            print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def _outcome(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("family", "strategy", "method", "layer", "shots", "draw", "hyperparameters", "selection", "final_fit")
    out = {k: r[k] for k in keep if k in r}
    for k in ("val_accuracy", "accuracy", "macro_f1", "n_fit", "n_train", "n_val", "at_grid_edge", "val_log_loss"):
        if k in r:
            out[k] = round(r[k], 10) if isinstance(r[k], float) else r[k]
    for k in ("test_predictions", "train_positions", "val_positions", "test_positions"):
        if k in r:
            out[k + "_sha"] = _digest(r[k])
    return out


def record_quick() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = Path(tmp) / "quick", Path(tmp) / "cache"
        cmd = ["featx", "bench", "--quick", "--out-dir", str(out), "--cache-dir", str(cache)]
        subprocess.run(cmd, check=True)
        results = json.loads((out / "results.json").read_text())
        report = (out / "report.md").read_text()
    datasets = {}
    for name, ds in results["datasets"].items():
        datasets[name] = {part: [_outcome(r) for r in ds.get(part, [])] for part in ("rows", "fewshot", "layerwise")}
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if "Head chosen on val" in line)  # the summary table: no timings
    verdicts = [line for line in lines[start:] if line.startswith("|")][: 2 + len(results["datasets"])]
    return {"command": " ".join(cmd[:3]), "datasets": datasets, "verdict_lines": verdicts}


def _present(r: dict[str, Any]) -> dict[str, Any]:
    """The fields a row has: records (schema 2) write every field, an absent one as null; schema 1 left it out."""
    return {k: v for k, v in r.items() if v is not None}


def _entry_key(r: dict[str, Any]) -> str:
    return json.dumps({k: r.get(k) for k in ("family", "strategy", "method", "layer", "shots", "draw")}, default=str)


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], int]:
    lines, diffs = [], 0
    lines.append("## Head-sweep bench (featx side of `benchmarks/bench_heads.py --part real/synthetic`)\n")
    la, lb = a["label"], b["label"]
    lines.append(f"| dataset | head | choice ({la}) | choice ({lb}) | test ({la}) | test ({lb}) | committed test | same |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for ra, rb in zip(a["heads"], b["heads"], strict=True):
        same = ra["best_params"] == rb["best_params"] and ra["test_accuracy"] == rb["test_accuracy"]
        diffs += not same
        ct = ra.get("committed_test_accuracy")
        lines.append(
            f"| {ra['dataset']} | {ra['kind']} | {ra['best_params']} | {rb['best_params']} | {ra['test_accuracy']:.4f} | "
            f"{rb['test_accuracy']:.4f} | {'—' if ct is None else f'{ct:.4f}'} | {'yes' if same else '**no**'} |"
        )
    lines.append("\n## `featx bench --quick`\n")
    lines.append("| dataset | part | entries | identical outcomes (choice, val/test accuracy, predictions, rows) |")
    lines.append("|---|---|---|---|")
    for name in sorted(set(a["quick"]["datasets"]) | set(b["quick"]["datasets"])):
        for part in ("rows", "fewshot", "layerwise"):
            xa = a["quick"]["datasets"].get(name, {}).get(part, [])
            xb = b["quick"]["datasets"].get(name, {}).get(part, [])
            ma, mb = {_entry_key(r): _present(r) for r in xa}, {_entry_key(r): _present(r) for r in xb}
            bad = [k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k)]
            diffs += len(bad)
            same = "all" if not bad else f"**{len(bad)} differ**: {bad[:3]}"
            lines.append(f"| {name} | {part} | {len(xa)} / {len(xb)} | {same} |")
    same_verdicts = a["quick"]["verdict_lines"] == b["quick"]["verdict_lines"]
    diffs += not same_verdicts
    what = "choices, paired difference and interval, McNemar and Holm p, verdict"
    lines.append(f"\nThe report's summary table ({what}) identical: {'yes' if same_verdicts else '**no**'}.")
    return lines, diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--label", required=True)
    r.add_argument("--cache-dir", required=True)
    r.add_argument("--parts", default="heads,quick")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--out", default=str(OUT / "refactor_reproduce.md"), help="where the markdown goes")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.cmd == "record":
        import platform
        import subprocess as sp

        rec: dict[str, Any] = {
            "label": args.label,
            "commit": sp.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "machine": f"{platform.platform()}, {__import__('os').cpu_count()} CPU cores",
        }
        parts = args.parts.split(",")
        if "heads" in parts:
            rec["heads"] = record_heads(Path(args.cache_dir))
        if "quick" in parts:
            rec["quick"] = record_quick()
        (WORK / f"{args.label}.json").write_text(json.dumps(rec, indent=1, default=str))
        return
    a, b = (json.loads((WORK / f"{x}.json").read_text()) for x in (args.a, args.b))
    lines, diffs = compare(a, b)
    head = [
        f"# Refactor reproduction: {a['label']} ({a['commit'][:10]}) vs {b['label']} ({b['commit'][:10]})\n",
        f"Machine: {b['machine']}. Commands: `flock /tmp/featx-cpu.lock python benchmarks/reproduce.py record --label "
        f"LABEL --cache-dir runs/bench-cpu-cache-issue21` at each commit, then `python benchmarks/reproduce.py compare "
        f"{a['label']} {b['label']}`. Differences: **{diffs}**.\n",
    ]
    Path(args.out).write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    np.set_printoptions(precision=6)
    main()
