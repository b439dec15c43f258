# ruff: noqa: E501
"""Distributed extraction: ``featx extract`` in one process vs ``torchrun --nproc_per_node=N`` on the same machine.

Each run is a whole command in a fresh cache folder (seeded with the embedder's checked ``.onnx`` export, as every
extraction after the first one finds it), wall time from launch to exit; runs alternate in rounds (this machine
drifts by up to 1.5x within minutes, so compare within a round). Where the time goes is read from featx's own info
lines, stamped on arrival:

- ``<split>: N rows in X s: decode D s, forward F s, waiting for batches W s, journal writes J s`` (one per rank and
  split: the rank's compute; decode and forward are summed over its decode streams, the journal writes run in a
  background thread and overlap the next batches);
- ``<split>: cache assembled from C journal chunks in A s`` (rank 0).

Derived per run: start-up = launch -> the first split's compute starts (interpreter, imports, torchrun's rendezvous,
the dataset scan on rank 0 and its broadcast, the model build, the journal header); compute = per split, first start
to last end over the ranks; assembly; other = the rest (the second split's journal, the ranks' gather, exit). The
two caches are compared row by row (features max |diff|; rows, paths, labels, failures equal).

    flock /tmp/featx-cpu.lock python benchmarks/bench_scaling.py --data ../shared/data/flowers17 --rounds 2

writes benchmarks/results/scaling.json and prints the table that benchmarks/results/scaling.md quotes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).parent / "results"
ROOT = Path(__file__).parents[1]

COMPUTE_RE = re.compile(
    r"(?:rank (?P<rank>\d+) )?(?P<split>[\w.-]+): (?P<rows>\d+) rows in (?P<s>[\d.]+) s \([\d.]+ img/s\): decode (?P<decode>[\d.]+) s, "
    r"forward (?P<forward>[\d.]+) s, waiting for batches (?P<wait>[\d.]+) s, journal writes (?P<journal>[\d.]+) s"
)
ASSEMBLE_RE = re.compile(r"(?P<split>[\w.-]+): cache assembled from (?P<chunks>\d+) journal chunks in (?P<s>[\d.]+) s")


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}, no GPU"


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, list[tuple[float, str]], str]:
    """Run ``cmd``; (wall seconds, exit code, stderr lines stamped with seconds since launch, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert p.stderr is not None
        for line in p.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    out = p.stdout.read() if p.stdout else ""
    rc = p.wait()
    t.join()
    return time.perf_counter() - t0, rc, lines, out


def _breakdown(wall: float, lines: list[tuple[float, str]]) -> dict[str, Any]:
    spans: dict[str, list[float]] = {}
    ranks: list[dict[str, Any]] = []
    assembly = 0.0
    for t, line in lines:
        if m := COMPUTE_RE.search(line):
            s = float(m["s"])
            start, end = t - s, t
            sp = spans.setdefault(m["split"], [start, end])
            sp[0], sp[1] = min(sp[0], start), max(sp[1], end)
            ranks.append(
                {
                    "rank": int(m["rank"] or 0),
                    "split": m["split"],
                    "rows": int(m["rows"]),
                    **{k: float(m[k]) for k in ("s", "decode", "forward", "wait", "journal")},
                }
            )
        elif m := ASSEMBLE_RE.search(line):
            assembly += float(m["s"])
    if not spans:
        raise RuntimeError("no compute lines in the output (run without -q; featx logs at info)")
    startup = min(sp[0] for sp in spans.values())
    compute = sum(sp[1] - sp[0] for sp in spans.values())
    return {
        "startup_s": startup,
        "compute_s": compute,
        "assembly_s": assembly,
        "other_s": wall - startup - compute - assembly,
        "per_rank": ranks,
    }


def _compare(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from featx.cache import load_cache, read_failures

    out: dict[str, Any] = {"max_abs_diff": 0.0, "same_rows": True}
    for fa in sorted(a_dir.glob("*.h5")):
        fb = b_dir / fa.name  # same key, same name
        if not fb.exists():
            out["same_rows"] = False
            continue
        x, y = load_cache(fa), load_cache(fb)
        same = x.paths == y.paths and np.array_equal(x.labels, y.labels) and read_failures(fa) == read_failures(fb)
        out["same_rows"] = out["same_rows"] and same
        out["max_abs_diff"] = max(out["max_abs_diff"], float(np.max(np.abs(x.features - y.features))) if len(x.features) else 0.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flowers17")
    ap.add_argument("--procs", default="1,2", help="process counts to compare (1 = plain featx extract)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra featx extract arguments, e.g. '--runtime torch'")
    ap.add_argument("--out", default=str(OUT / "scaling.json"))
    args = ap.parse_args()
    data = Path(args.data).resolve()
    procs = [int(x) for x in args.procs.split(",")]
    extra = args.extra.split()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATX_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="featx-bench-scaling-") as tmp:
        seed = Path(tmp) / "seed"
        # warm-up (not recorded): page cache, the checked ONNX export every later run starts with
        wall, rc, lines, _ = _run([sys.executable, "-m", "featx", "extract", str(data), "--cache-dir", str(seed), *extra], env)
        if rc != 0:
            raise SystemExit("warm-up failed:\n" + "\n".join(x for _, x in lines[-20:]))
        print(f"warm-up (makes the ONNX export): {wall:.1f} s", flush=True)
        for rnd in range(args.rounds):
            for n in procs:
                cdir = Path(tmp) / f"r{rnd}-p{n}"
                cdir.mkdir()
                for f in seed.glob("*.onnx"):
                    shutil.copy2(f, cdir / f.name)
                head = [sys.executable, "-m", "featx"]
                if n > 1:
                    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "featx"]
                cmd = [*head, "extract", str(data), "--cache-dir", str(cdir), *extra]
                wall, rc, lines, out = _run(cmd, env)
                if rc != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n" + "\n".join(x for _, x in lines[-30:]))
                n_images = sum(int(m.group(1)) for m in re.finditer(r"done: (\d+) images", out))
                row = {"round": rnd, "procs": n, "wall_s": wall, "images": n_images, "img_per_s": n_images / wall}
                row.update(_breakdown(wall, lines))
                row["vs_seed"] = _compare(seed, cdir)
                runs.append(row)
                print(
                    f"round {rnd} procs {n}: {wall:.1f} s, {row['img_per_s']:.1f} img/s (start-up {row['startup_s']:.1f}, "
                    f"compute {row['compute_s']:.1f}, assembly {row['assembly_s']:.2f}, other {row['other_s']:.1f}); "
                    f"vs 1-process cache: max |diff| {row['vs_seed']['max_abs_diff']:.3g}, rows equal {row['vs_seed']['same_rows']}",
                    flush=True,
                )
    summary = {}
    for n in procs:
        mine = [r for r in runs if r["procs"] == n]
        summary[str(n)] = {
            k: statistics.median(r[k] for r in mine)
            for k in ("wall_s", "img_per_s", "startup_s", "compute_s", "assembly_s", "other_s")
        }
        summary[str(n)]["compute_img_per_s"] = statistics.median(r["images"] / r["compute_s"] for r in mine)
        per = [x for r in mine for x in r["per_rank"]]
        for k in ("decode", "forward", "wait", "journal"):
            summary[str(n)][f"{k}_s_per_rank"] = statistics.median(
                sum(x[k] for x in per if x["rank"] == rk and x is not None) / len(mine) for rk in range(n)
            )
    result = {
        "command": "flock /tmp/featx-cpu.lock python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": str(data),
        "extra": extra,
        "runs": runs,
        "median": summary,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        "\n| processes | wall s | img/s (wall) | start-up s | compute s | img/s (compute) | assembly s | other s | per rank: decode / forward / journal writes s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, s in summary.items():
        print(
            f"| {n} | {s['wall_s']:.1f} | {s['img_per_s']:.1f} | {s['startup_s']:.1f} | {s['compute_s']:.1f} | {s['compute_img_per_s']:.1f} | "
            f"{s['assembly_s']:.2f} | {s['other_s']:.1f} | {s['decode_s_per_rank']:.1f} / {s['forward_s_per_rank']:.1f} / {s['journal_s_per_rank']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
