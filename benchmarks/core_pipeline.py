"""Issue 3 acceptance: extract -> cache hit -> every head, through the CLI, on real datasets.

Runs the exact shell commands a user would (timed from outside, process start-up included) and
writes benchmarks/results/core_pipeline.{json,md}.

    python benchmarks/core_pipeline.py --data ../shared/data --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASETS = ("hymenoptera", "flowers17", "clothing10")


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"command failed ({res.returncode}): {shlex.join(cmd)}\n{res.stderr[-2000:]}")
    return seconds, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/data", help="folder holding the datasets")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
    args = ap.parse_args()
    featx = [sys.executable, "-m", "featx", "-q"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="featx-core-"))
    rows = []
    for name in args.datasets:
        data = (Path(args.data) / name).resolve()
        first_cmd = [*featx, "extract", str(data)]
        t_first, out_first = run(first_cmd, work)
        t_hit, out_hit = run(first_cmd, work)
        fit_cmd = [*featx, "fit-head", str(data), "--head", "all", "--out-dir", "heads"]
        t_fit, _out_fit = run(fit_cmd, work)
        metrics = json.loads((work / "heads" / f"{name}-efficientnet_lite0-pooled-metrics.json").read_text())
        n_images = sum(
            int(line.split(": ")[1].split(" ")[0])
            for line in out_first.splitlines()
            if " images, " in line and not line.startswith("done")
        )
        rows.append(
            {
                "dataset": name,
                "images": n_images,
                "extract_seconds": t_first,
                "images_per_s": n_images / t_first,
                "cache_hit_seconds": t_hit,
                "hit_fraction": t_hit / t_first,
                "hit_reported": "3/3 cache hits" in out_hit or "2/2 cache hits" in out_hit,
                "fit_head_seconds": t_fit,
                "extract_output": out_first.strip(),
                "hit_output": out_hit.strip().splitlines()[-1],
                "heads": {
                    k: {
                        "best_params": v["best_params"],
                        "val_accuracy": v["val_accuracy"],
                        "test_accuracy": v["test_metrics"]["accuracy"],
                        "test_ci95": v["test_metrics"]["accuracy_ci95"],
                        "macro_f1": v["test_metrics"]["macro_f1"],
                        "macro_recall": v["test_metrics"]["macro_recall"],
                        "n_train": v["n_train"],
                        "n_val": v["n_val"],
                        "n_test": v["n_test"],
                        "fit_seconds": v["fit_seconds"],
                    }
                    for k, v in metrics.items()
                },
                "commands": [
                    shlex.join(first_cmd[2:]).replace(sys.executable, "python"),
                    "(same command again)",
                    shlex.join(fit_cmd[2:]),
                ],
            }
        )
    shutil.rmtree(work, ignore_errors=True)
    import torch

    machine = f"{platform.platform()}, {__import__('os').cpu_count()} CPU cores, no GPU, torch {torch.__version__}"
    (out / "core_pipeline.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    md = [
        "# Core pipeline on real datasets (issue 3 acceptance)",
        "",
        f"Machine: {machine}. Backbone `efficientnet_lite0` (offline ImageNet weights), defaults everywhere "
        "(224 px, fp32, batch 16, 1 decode worker). Times are wall-clock seconds of the whole `featx` process, "
        "measured from outside (Python and torch start-up included), with nothing else running.",
        "",
        "Command per dataset (run in an empty folder, so the first extract is a cold cache):",
        "",
        "```",
        "featx extract ../shared/data/<dataset>          # first run",
        "featx extract ../shared/data/<dataset>          # again: cache hit",
        "featx fit-head ../shared/data/<dataset> --head all",
        "```",
        "",
        "## Extraction and cache hits",
        "",
        "| dataset | images | first extract (s) | images/s (end to end) | second extract (s) | second / first | hit reported |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['dataset']} | {r['images']} | {r['extract_seconds']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['cache_hit_seconds']:.2f} | {100 * r['hit_fraction']:.1f}% | {'yes' if r['hit_reported'] else 'NO'} |"
        )
    md += [
        "",
        "## Heads (linear-evaluation protocol: sweep on val, refit on train+val, test once)",
        "",
        "| dataset | head | train / val / test | best params | val acc | test acc [95% CI] | macro-F1 | macro recall | fit (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for k, h in r["heads"].items():
            params = ", ".join(f"{p}={v:.3g}" if isinstance(v, float) else f"{p}={v}" for p, v in h["best_params"].items())
            lo, hi = h["test_ci95"]
            md.append(
                f"| {r['dataset']} | {k} | {h['n_train']} / {h['n_val']} / {h['n_test']} | {params} | {h['val_accuracy']:.3f} | "
                f"{h['test_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {h['macro_f1']:.3f} "
                f"| {h['macro_recall']:.3f} | {h['fit_seconds']:.1f} |"
            )
    md += [
        "",
        "hymenoptera and flowers17 have no val folder: val is carved from train (20%, stratified, seed 0). "
        "clothing10 has its own val split. Macro recall equals mean per-class accuracy by definition.",
        "",
        "Reproduce: `python benchmarks/core_pipeline.py --data ../shared/data --out benchmarks/results`",
        "",
    ]
    (out / "core_pipeline.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
