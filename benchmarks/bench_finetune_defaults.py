"""`featx finetune`'s default recipe vs the old one, on the case where fine-tuning must win.

The dataset is scikit-learn's bundled ``load_digits`` written out as an ImageFolder (``make_digits.py``); both runs
are the plain CLI with only ``--optimizer`` differing, so each gets its optimizer's default lr and weight decay
(AdamW: 3e-3 / 0.05, the default since this change; SGD: 0.01 / 1e-4, the old default). Full fine-tuning,
112 px, 4 epochs, the best epoch on val, scored on test (``--final-fit train``: one training run each)::

    python benchmarks/make_digits.py --out runs/data/digits
    flock /tmp/featx-cpu.lock python benchmarks/bench_finetune_defaults.py

Writes benchmarks/results/finetune_defaults.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

OUT = Path(__file__).parent / "results"


def run(data: str, optimizer: str, out_dir: Path, epochs: int, size: int) -> dict:
    cmd = [sys.executable, "-m", "featx", "-q", "finetune", data, "--strategy", "full", "--epochs", str(epochs)]
    cmd += ["--image-size", str(size), "--final-fit", "train", "--out-dir", str(out_dir), "--optimizer", optimizer]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    r = json.loads((out_dir / "result.json").read_text())
    cfg = r["config"]
    return {
        "command": "featx " + " ".join(cmd[3:]),
        "optimizer": cfg["optimizer"],
        "lr": cfg["lr"],
        "weight_decay": cfg["weight_decay"],
        "val_per_epoch": [h.get("val_accuracy") for h in r["history"]],
        "best_epoch": r["best_epoch"],
        "test_accuracy": r["metrics"]["accuracy"],
        "test_ci": r["metrics"]["accuracy_ci95"],
        "macro_f1": r["metrics"].get("macro_f1"),
        "n_train": r["n_train"],
        "n_val": r["n_val"],
        "n_test": r["n_test"],
        "wall_s": wall,
    }


def paired(a_dir: Path, b_dir: Path) -> str:
    """AdamW − SGD on the same test images: bootstrap interval and McNemar's exact test."""
    import numpy as np
    from scipy.stats import binomtest

    a, b = (json.loads((d / "result.json").read_text()) for d in (a_dir, b_dir))
    assert a["test_rows"] == b["test_rows"], "the two runs saw different test images"
    y = np.asarray(a["test_labels"])
    ra, rb = np.asarray(a["test_predictions"]) == y, np.asarray(b["test_predictions"]) == y
    only_a, only_b = int((ra & ~rb).sum()), int((~ra & rb).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    idx = np.random.default_rng(0).integers(0, len(y), (10000, len(y)))
    lo, hi = np.percentile((ra[idx].mean(1) - rb[idx].mean(1)) * 100, [2.5, 97.5])
    return (
        f"Paired on the same {len(y)} test images: AdamW − SGD = {100 * (ra.mean() - rb.mean()):+.1f} points "
        f"[{lo:+.1f}, {hi:+.1f}] (bootstrap), McNemar exact p = {p:.3f} ({only_a} images only AdamW gets right, "
        f"{only_b} only SGD). Wall times depend on what else ran on the machine (see the stop notes)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/data/digits")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--work", default="runs/finetune-defaults")
    args = ap.parse_args()
    rows = [run(args.data, o, Path(args.work) / o, args.epochs, args.image_size) for o in ("adamw", "sgd")]
    import torch

    machine = f"{platform.platform()}, {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}"
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine, "runs": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "finetune_defaults.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        "# `featx finetune` defaults: AdamW (new) vs SGD (old) on digits",
        "",
        f"Machine: {machine}. Date: {res['date']}. Script: `benchmarks/bench_finetune_defaults.py` (docstring: set-up).",
        "",
        "| recipe | command | lr / wd | val acc per epoch | best epoch | test acc [95% CI] | train/val/test | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, name in zip(rows, ("default since issue 14's follow-up (AdamW)", "old default (SGD)"), strict=True):
        ci = r["test_ci"]
        ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        vals = ", ".join(f"{v:.3f}" for v in r["val_per_epoch"] if v is not None)
        lines.append(
            f"| {name} | `{r['command']}` | {r['lr']:g} / {r['weight_decay']:g} | {vals} | {r['best_epoch']} | "
            f"{r['test_accuracy']:.3f}{ci_s} | {r['n_train']}/{r['n_val']}/{r['n_test']} | {r['wall_s']:.0f} |"
        )
    lines += ["", paired(Path(args.work) / "adamw", Path(args.work) / "sgd")]
    (OUT / "finetune_defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
