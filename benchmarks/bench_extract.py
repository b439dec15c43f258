# ruff: noqa: E501
"""Extraction throughput: ``featx extract`` end to end vs the bare forward (the bound) vs the naive loop.

On the same images, interleaved in rounds inside one run (the machine drifts up to 1.5x within minutes, so
only ratios from the same round count; medians over the rounds):

- (a) **bound**: the bare forward of the same weights on pre-decoded images already in memory (on the device), best
  over runtime x batch size x layout: PyTorch eager (plain model, eval, inference mode; NCHW / channels_last),
  featx's frozen TorchScript model, and on the CPU ONNX Runtime (featx's checked export: uint8 input, normalised in the
  graph). Measured per round on ``--bound-images`` images, each setting for at least ``--bound-seconds``.
- (b) **featx extract** as a whole process: ``python -m featx -q extract DATA --cache-dir <fresh tmp>``, wall
  time including interpreter start, imports, model build, every split, the journal and the final HDF5 files.
  ``--b-variant NAME='ARGS'`` adds more (b) runs with extra CLI arguments (e.g. ``--optimize none``; an argument
  ``FEATX_X=V`` sets that environment variable instead; a first argument ``<os._exit>`` runs the same CLI entry
  point but ends the process with ``os._exit`` after flushing, to measure what interpreter teardown costs; a first
  argument ``<ready-onnx>`` starts from a cache folder that already holds the embedder's checked ``.onnx`` export,
  as every extraction after the first one does). ``--featx-args`` gives the main (b) run's arguments. The start-up of
  each (b) run (wall time minus the extraction seconds its caches record) is reported beside it.
- (c) **naive loop**: PIL open + the torchvision eval transform + forward, one image at a time (batch 1,
  NCHW), one process, the model built beforehand (its build is not timed: that favours the loop).

Parts (each under the CPU lock; each merges into benchmarks/results/bench_extract.json and rewrites the .md)::

    flock /tmp/featx-cpu.lock python benchmarks/bench_extract.py --part rounds            # (a) (b) (c)
    flock /tmp/featx-cpu.lock python benchmarks/bench_extract.py --part profile           # where the time goes
    flock /tmp/featx-cpu.lock python benchmarks/bench_extract.py --part storage --features 'runs/perf-cache/*.h5'
    flock /tmp/featx-cpu.lock python benchmarks/bench_extract.py --part features --data-root ../shared/data  # ORT vs torch
    python benchmarks/bench_extract.py --device cuda --part rounds                        # on a GPU machine

``--device cuda`` runs the same table on a GPU (bound on GPU tensors, (b) with ``--device cuda``, the naive loop
copying each image to the GPU); ``--precision bf16`` runs (a) under autocast and passes ``--precision`` to (b).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).parent / "results"
DEFAULT_DATA = "../shared/data/flowers17"


# --------------------------------------------------------------------------------------------------
# machine and data


def machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError):
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "none used"
    import timm
    import torchvision

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}; {m['platform']}; Python {m['python']}, "
        f"torch {m['torch']}, torchvision {m['torchvision']}, timm {m['timm']}"
    )


def image_list(root: Path) -> list[Path]:
    """Every image of every split of the dataset, in featx's order (split, then its paths)."""
    from featx.data import load_dataset

    ds = load_dataset(root)
    return [s.root / p for s in ds.splits.values() for p in s.paths]


def subsample(root: Path, n: int, work: Path) -> Path:
    """A copy of ``root`` with ``n`` evenly spaced images (keeping split/class folders), so that all three
    measurements and featx's own dataset scan see exactly the same files."""
    images = image_list(root)
    keep = [images[int(i)] for i in np.linspace(0, len(images) - 1, n).round().astype(int)]
    dest = work / f"{root.name}-{n}"
    for p in keep:
        target = dest / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    return dest


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its waited-for children).
    Their difference over a round is what other processes used meanwhile: a contaminated round shows there."""
    import resource

    busy = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return busy, own


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# (a) the bound


class Bound:
    """Plain models in both memory formats and pre-normalised inputs in both formats, built once.

    Layouts: ``intra`` = one forward at a time using every core (torch intra-op threads); ``streams`` = one
    Python thread per core, each running its own forwards with one intra-op thread (what featx does on the CPU).
    ``featx`` additionally times featx's own prepared model (``prepare_model``, default optimisation) in featx's
    layout: not part of the bound, it shows how much of featx's own compute speed the end-to-end run keeps."""

    def __init__(self, bb: Any, images: list[Path], device: Any, precision: str, batch_sizes: list[int]) -> None:
        import copy

        import torch
        from PIL import Image

        from featx.inference import normalize_batch, prepare_model, uint8_transform

        self.device, self.precision, self.batch_sizes = device, precision, batch_sizes
        tf = uint8_transform(bb.preprocessing)
        u8 = torch.from_numpy(np.stack([tf(Image.open(p).convert("RGB")) for p in images]))
        mean = torch.tensor(bb.preprocessing.mean).view(1, 3, 1, 1)
        std = torch.tensor(bb.preprocessing.std).view(1, 3, 1, 1)
        x = normalize_batch(u8, mean, std, channels_last=False)  # contiguous NCHW float32
        self.inputs = {
            "nchw": x.to(device),
            "channels_last": x.to(device).contiguous(memory_format=torch.channels_last),
        }
        plain = bb.model.eval()
        self.models = {
            "nchw": copy.deepcopy(plain).to(device).eval(),
            "channels_last": copy.deepcopy(plain).to(device).eval().to(memory_format=torch.channels_last),
        }
        self.layouts = ["intra"] if device.type == "cuda" else ["intra", "streams"]
        self.featx_model, self.featx_optimize = prepare_model(
            copy.deepcopy(plain), device=device, input_size=bb.preprocessing.input_size, precision=precision
        )
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.ort = None
        if device.type == "cpu" and precision == "fp32":
            from featx.onnx_export import OrtFeatures, export_checked

            data, manifest = export_checked(copy.deepcopy(plain).cpu().eval(), ["pooled"], bb.preprocessing, bb.spec)
            self.ort = OrtFeatures(data, manifest, None)
            self.ort_check = manifest["check"]["worst"]
            self.u8 = u8.numpy()

    def _time_ort(self, bs: int, layout: str, min_seconds: float) -> float:
        import threading

        workers = self.cores if layout == "streams" else 1
        threads = 1 if layout == "streams" else self.cores
        assert self.ort is not None
        sess = self.ort.session(threads)
        parts = [self.u8[i::workers] for i in range(workers)]
        counts = [0] * workers
        sess.run(None, {"images": parts[0][:bs]})
        sess.run(None, {"images": parts[0][:bs]})
        t0 = time.perf_counter()

        def run(k: int) -> None:
            xs = parts[k]
            while True:
                for i in range(0, len(xs) - bs + 1, bs):
                    sess.run(None, {"images": xs[i : i + bs]})
                    counts[k] += bs
                if time.perf_counter() - t0 >= min_seconds:
                    return

        ths = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    def _time(self, model: Any, x: Any, bs: int, layout: str, min_seconds: float) -> float:
        import threading

        import torch

        from featx import runtime

        threads = torch.get_num_threads()
        workers = self.cores if layout == "streams" else 1
        if layout == "streams":
            torch.set_num_threads(1)
        parts = [x[i::workers] for i in range(workers)]  # disjoint images per stream
        counts = [0] * workers
        try:
            with torch.inference_mode(), runtime.autocast(self.device, self.precision):
                model(parts[0][:bs]).float().cpu()  # warm-up (allocator, oneDNN primitives / JIT plans for this shape)
                model(parts[0][:bs]).float().cpu()
                _sync(self.device)
            t0 = time.perf_counter()

            def run(k: int) -> None:
                xs = parts[k]
                with torch.inference_mode(), runtime.autocast(self.device, self.precision):
                    while True:
                        for i in range(0, len(xs) - bs + 1, bs):
                            model(xs[i : i + bs]).float().cpu()
                            counts[k] += bs
                        _sync(self.device)
                        if time.perf_counter() - t0 >= min_seconds:
                            return

            if workers == 1:
                run(0)
            else:
                ths = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
                for t in ths:
                    t.start()
                for t in ths:
                    t.join()
            return sum(counts) / (time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)

    def run(self, min_seconds: float) -> tuple[dict[str, float], dict[str, float]]:
        """images/s of every (layout, memory format, batch size) of the plain model, and of featx's model."""
        out, fx = {}, {}
        n = len(self.inputs["nchw"])
        for layout in self.layouts:
            per = n // (self.cores if layout == "streams" else 1)
            for fmt, model in self.models.items():
                for bs in [b for b in self.batch_sizes if b <= per]:
                    out[f"{layout} {fmt} bs{bs}"] = self._time(model, self.inputs[fmt], bs, layout, min_seconds)
        layout = self.layouts[-1]
        from featx.inference import default_micro_batch

        micro = default_micro_batch(self.device) or max(self.batch_sizes)
        # featx's frozen TorchScript model is a runtime of the same weights: part of the bound, and (a') for torch
        key = f"{layout} channels_last bs{micro} ({self.featx_optimize})"
        out[key] = fx[f"torch {key}"] = self._time(self.featx_model, self.inputs["channels_last"], micro, layout, min_seconds)
        if self.ort is not None:
            n = len(self.u8)
            for lay in ("intra", "streams"):
                for bs in [b for b in self.batch_sizes if b <= n // (self.cores if lay == "streams" else 1)]:
                    out[f"ort {lay} bs{bs}"] = self._time_ort(bs, lay, min_seconds)
            fx[f"ort streams bs{micro}"] = out[f"ort streams bs{micro}"]
        return out, fx


# --------------------------------------------------------------------------------------------------
# (b) featx extract, a whole process


FAST_EXIT = "<os._exit>"
FAST_EXIT_CODE = "import os, sys; from featx.cli import main; rc = main(sys.argv[1:]); sys.stdout.flush(); sys.stderr.flush(); os._exit(rc or 0)"


READY_ONNX = "<ready-onnx>"


def featx_extract(data: Path, device: str, precision: str, extra: list[str], seed: Path | None = None) -> dict[str, Any]:
    import h5py

    with tempfile.TemporaryDirectory(prefix="featx-bench-extract-") as tmp:
        head = [sys.executable, "-m", "featx"]
        if extra[:1] == [READY_ONNX]:  # a cache folder that already holds the checked export (every run after the first)
            extra = extra[1:]
            for f in sorted((seed or Path(tmp)).glob("*.onnx")):
                shutil.copy2(f, Path(tmp) / f.name)
        if extra[:1] == [FAST_EXIT]:  # the same CLI entry point, ended with os._exit (a proposal, measured)
            head, extra = [sys.executable, "-c", FAST_EXIT_CODE], extra[1:]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEATX_")}
        for e in [x for x in extra if x.startswith("FEATX_") and "=" in x]:  # NAME=VALUE: environment for this variant
            env[e.split("=", 1)[0]] = e.split("=", 1)[1]
            extra = [x for x in extra if x != e]
        cmd = [*head, "-q", "extract", str(data), "--cache-dir", tmp, "--device", device]
        if precision != "fp32":
            cmd += ["--precision", precision]
        cmd += extra
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        n, steady, attrs = 0, 0.0, {}
        if seed is not None and not any(seed.glob("*.onnx")):
            for f in Path(tmp).glob("*.onnx"):
                shutil.copy2(f, seed / f.name)
        for f in sorted(Path(tmp).glob("*.h5")):
            with h5py.File(f, "r") as h:
                a = dict(h.attrs.items())
            n += int(a["n_images"])
            steady += float(a.get("extraction_seconds", 0.0))
            attrs = {
                k: (v if isinstance(v, (int, float, str)) else str(v))
                for k, v in a.items()
                if k in ("batch_size", "device", "dtype", "chunk_rows", "runtime")
            }
    return {
        "wall_s": wall,
        "images": n,
        "images_per_s": n / wall,
        "compute_s": steady,
        "startup_s": wall - steady,
        "attrs": attrs,
        "command": " ".join(cmd[1:]),
    }


# --------------------------------------------------------------------------------------------------
# (c) the naive loop


class Naive:
    def __init__(self, bb: Any, device: Any, precision: str) -> None:
        import copy

        self.model = copy.deepcopy(bb.model).to(device).eval()
        self.transform = bb.preprocessing.build_transform()
        self.device, self.precision = device, precision

    def run(self, images: list[Path]) -> dict[str, Any]:
        import torch
        from PIL import Image

        from featx import runtime

        t0 = time.perf_counter()
        with torch.inference_mode(), runtime.autocast(self.device, self.precision):
            for p in images:
                x = self.transform(Image.open(p).convert("RGB")).unsqueeze(0).to(self.device)
                self.model(x).float().cpu().numpy()
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "images": len(images), "images_per_s": len(images) / wall}


# --------------------------------------------------------------------------------------------------
# part: rounds


def part_rounds(args: argparse.Namespace, data: Path, images: list[Path]) -> dict[str, Any]:
    import torch

    from featx.backbones import build_backbone

    dev = torch.device(args.device)
    bb = build_backbone(args.backbone)
    bound_imgs = images[: args.bound_images]
    bound = Bound(bb, bound_imgs, dev, args.precision, args.batch_sizes)
    naive = Naive(bb, dev, args.precision)
    variants = [("featx", args.featx_args.split())] + [(v.split("=", 1)[0], v.split("=", 1)[1].split()) for v in args.b_variant]
    seed = Path(tempfile.mkdtemp(prefix="featx-bench-onnx-"))
    # warm the page cache and every code path once (not recorded); the first run leaves the .onnx for <ready-onnx>
    print("warm-up", flush=True)
    naive.run(images[:8])
    featx_extract(data, args.device, args.precision, [a for a in variants[0][1] if a != READY_ONNX], seed)
    steps = ["a"] + [f"b:{name}" for name, _ in variants] + ([] if args.skip_naive else ["c"])
    rounds = []
    for r in range(args.rounds):
        order = steps[r % len(steps) :] + steps[: r % len(steps)]  # rotate so that no measurement always goes first
        rec: dict[str, Any] = {"round": r, "order": order, "b": {}}
        busy0, own0, t_round = *cpu_seconds(), time.perf_counter()
        for step in order:
            if step == "a":
                per, fx = bound.run(args.bound_seconds)
                best = max(per, key=per.get)
                rec["a"] = {"images_per_s": per[best], "best": best, "all": per, "featx_model": fx}
            elif step == "c":
                rec["c"] = naive.run(images)
            else:
                name = step[2:]
                rec["b"][name] = featx_extract(data, args.device, args.precision, dict(variants)[name], seed)
            print(f"round {r} {step}: done", flush=True)
        busy1, own1 = cpu_seconds()
        rec["wall_s"] = time.perf_counter() - t_round
        rec["others_cpu_s"] = (busy1 - busy0) - (own1 - own0)
        a, c = rec["a"]["images_per_s"], rec["c"]["images_per_s"] if "c" in rec else float("nan")
        rec["ratios"] = {
            name: {"b_over_a": b["images_per_s"] / a, "b_over_c": b["images_per_s"] / c} for name, b in rec["b"].items()
        }
        print(
            json.dumps(
                {
                    "round": r,
                    "a": round(a, 1),
                    "a_best": rec["a"]["best"],
                    "c": round(c, 1),
                    **{k: round(v["images_per_s"], 1) for k, v in rec["b"].items()},
                    "ratios": rec["ratios"],
                    "others_cpu_s": round(rec["others_cpu_s"], 1),
                }
            ),
            flush=True,
        )
        rounds.append(rec)
    shutil.rmtree(seed, ignore_errors=True)
    med = {
        "a_images_per_s": statistics.median(r["a"]["images_per_s"] for r in rounds),
        "c_images_per_s": statistics.median(r["c"]["images_per_s"] for r in rounds) if not args.skip_naive else float("nan"),
        "b": {
            name: {
                "images_per_s": statistics.median(r["b"][name]["images_per_s"] for r in rounds),
                "wall_s": statistics.median(r["b"][name]["wall_s"] for r in rounds),
                "startup_s": statistics.median(r["b"][name]["startup_s"] for r in rounds),
                "b_over_a": statistics.median(r["ratios"][name]["b_over_a"] for r in rounds),
                "b_over_c": statistics.median(r["ratios"][name]["b_over_c"] for r in rounds),
            }
            for name, _ in variants
        },
    }
    return {
        "rounds": rounds,
        "medians": med,
        "settings": {
            "data": str(args.data),
            "images": len(images),
            "backbone": args.backbone,
            "device": args.device,
            "precision": args.precision,
            "bound_images": len(bound_imgs),
            "bound_seconds": args.bound_seconds,
            "batch_sizes": args.batch_sizes,
            "variants": {name: " ".join(extra) for name, extra in variants},
            "ort_export_check": getattr(bound, "ort_check", None),
        },
    }


# --------------------------------------------------------------------------------------------------
# part: features (ONNX Runtime vs PyTorch numbers, and the heads fitted on each)


def part_features(args: argparse.Namespace, data: Path, images: list[Path]) -> dict[str, Any]:
    import dataclasses

    from featx.backbones import build_backbone
    from featx.cache import load_cache
    from featx.data import load_dataset
    from featx.extraction import extract
    from featx.heads import fit_head
    from featx.inference import compute_features
    from featx.runtime import InferenceSettings

    out = []
    bb = build_backbone(args.backbone)
    model, dims = bb.multi_layer_model(bb.layers)
    tap = dataclasses.replace(bb, model=model)
    for root in sorted(p for p in Path(args.data_root).resolve().iterdir() if p.is_dir()):
        ds = load_dataset(root)
        heads, feats = {}, {}
        with tempfile.TemporaryDirectory(prefix="featx-bench-feat-") as tmp:
            for rt in ("torch", "onnxruntime"):
                res = extract(ds, settings=InferenceSettings(runtime=rt), cache_dir=Path(tmp) / rt, progress=False)
                paths = {r.split: r.path for r in res}
                feats[rt] = {k: load_cache(v) for k, v in paths.items()}
                fs = feats[rt]
                heads[rt] = fit_head(fs["train"], fs.get("val"), fs.get("test"))
                print(f"{root.name} {rt}: {heads[rt].best_params} {heads[rt].test_metrics}", flush=True)
        diff = max(float(np.abs(feats["torch"][k].features - feats["onnxruntime"][k].features).max()) for k in feats["torch"])
        mean_abs = float(np.mean([np.abs(f.features).mean() for f in feats["torch"].values()]))
        test = ds.splits.get("test") or next(iter(ds.splits.values()))
        a, _ = compute_features(tap, test.root, test.paths, settings=InferenceSettings(runtime="torch"))
        b, _ = compute_features(tap, test.root, test.paths, settings=InferenceSettings(runtime="onnxruntime"))
        bounds = np.cumsum([0, *dims])
        per_layer = {
            layer: float(np.abs(a[:, bounds[i] : bounds[i + 1]] - b[:, bounds[i] : bounds[i + 1]]).max())
            for i, layer in enumerate(bb.layers)
        }
        ht, ho = heads["torch"], heads["onnxruntime"]
        te_t, te_o = feats["torch"].get("test"), feats["onnxruntime"].get("test")
        pred_diff = int((ht.predict(te_t.features) != ho.predict(te_o.features)).sum()) if te_t is not None else -1
        out.append(
            {
                "dataset": root.name,
                "max_abs_diff": diff,
                "mean_abs": mean_abs,
                "per_layer": per_layer,
                "params_torch": ht.best_params,
                "params_ort": ho.best_params,
                "acc_torch": float((ht.test_metrics or {}).get("accuracy", float("nan"))),
                "acc_ort": float((ho.test_metrics or {}).get("accuracy", float("nan"))),
                "test_pred_diff": pred_diff,
                "n_test": len(te_t.labels) if te_t is not None else 0,
            }
        )
        print(json.dumps(out[-1], default=str), flush=True)
    return {"datasets": out, "settings": {"data_root": args.data_root, "backbone": args.backbone}}


# --------------------------------------------------------------------------------------------------
# part: profile (where the time of (b) goes), in a fresh child process

PROFILE_CHILD = r"""
import json, os, sys, time
t_start = time.perf_counter()
data, device, modes = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
out = {}
def stamp(name, t0):
    out[name] = time.perf_counter() - t0
    return time.perf_counter()
t = time.perf_counter()
import torch
t = stamp("import_torch_s", t)
import torchvision, timm  # noqa
t = stamp("import_timm_torchvision_s", t)
import featx.extraction, featx.cli  # noqa
t = stamp("import_featx_s", t)
from featx.data import load_dataset
ds = load_dataset(data)
for s in ds.splits.values():
    s.fingerprint()
t = stamp("scan_and_fingerprint_s", t)
from featx.backbones import build_backbone
bb = build_backbone("efficientnet_lite0")
t = stamp("build_backbone_s", t)
bb.embedder("pooled", "fp32").to_dict()
t = stamp("embedder_spec_s", t)
from featx import runtime
from featx.inference import prepare_model, StageTimes, iter_features, normalize_batch
from featx.runtime import InferenceSettings
dev = torch.device(device)
runtime.configure_threads(0, dev)
fn, applied = prepare_model(bb.model, device=dev, input_size=224)
t = stamp("prepare_model_s", t)
out["startup_total_s"] = time.perf_counter() - t_start
out["optimize_applied"] = applied
paths = [(s.root, p) for s in ds.splits.values() for p in s.paths]
root = paths[0][0]
rel = [os.path.relpath(r / p, root) for r, p in paths]
out["loop"] = {}
feats = []
for mode in modes:  # "streams" (the CPU default) or "threads:BS"
    decode, _, bs = mode.partition(":")
    prof = StageTimes()
    t0 = time.perf_counter()
    feats = []
    settings = InferenceSettings(device=str(dev), batch_size=int(bs or 16), num_workers=0, decode=decode)
    for b in iter_features(bb.model, bb.preprocessing, root, rel, settings=settings, progress=False, profile=prof):
        feats.append(b.features)
    wall = time.perf_counter() - t0
    out["loop"][mode] = {**prof.to_dict(), "wall_s": wall, "images_per_s": len(rel) / wall}
# decode pieces on one thread: read bytes, PIL decode, resize + crop (uint8), normalise
from PIL import Image
import io, numpy as np
from featx.inference import uint8_transform
pre = bb.preprocessing
tf = uint8_transform(pre)
k = min(400, len(paths))
t0 = time.perf_counter(); raws = [open(r / p, "rb").read() for r, p in paths[:k]]; t_read = time.perf_counter() - t0
t0 = time.perf_counter(); ims = [Image.open(io.BytesIO(b)).convert("RGB") for b in raws]; t_dec = time.perf_counter() - t0
t0 = time.perf_counter(); ims2 = [Image.open(io.BytesIO(b)) for b in raws]
for im in ims2: im.draft("RGB", (pre.resize_size, pre.resize_size)); im.load()
t_draft = time.perf_counter() - t0
t0 = time.perf_counter(); crops = [tf(im) for im in ims]; t_rs = time.perf_counter() - t0
torch.set_num_threads(1)
u8 = torch.from_numpy(np.stack(crops[:64]))
mean = torch.tensor(pre.mean).view(1, 3, 1, 1); std = torch.tensor(pre.std).view(1, 3, 1, 1)
t0 = time.perf_counter()
for _ in range(5): x = normalize_batch(u8, mean, std, channels_last=True)
t_norm = (time.perf_counter() - t0) / 5 / 64
out["per_image_ms_one_thread"] = {"read": 1e3 * t_read / k, "pil_decode": 1e3 * t_dec / k, "pil_decode_with_draft": 1e3 * t_draft / k, "resize_crop": 1e3 * t_rs / k, "normalise": 1e3 * t_norm}
out["image_size_example"] = list(ims[0].size)
# cache writes: one journal chunk (npz, as CacheJournal writes them) + the final HDF5 of these features
import tempfile, pathlib
from featx.cache import write_cache_file
F = np.concatenate(feats)
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    np.savez(os.path.join(tmp, "chunk.npz"), features=F)
    out["journal_npz_write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_cache_file(pathlib.Path(tmp) / "x.h5", n_rows=len(F), blocks=[(0, F, np.ones(len(F), bool), [])], labels=np.zeros(len(F), np.int64), paths=[str(i) for i in range(len(F))], classes=["a"], attrs={})
    out["hdf5_write_s"] = time.perf_counter() - t0
out["images"] = len(rel)
print("RESULT " + json.dumps(out), flush=True)
"""


def part_profile(args: argparse.Namespace, data: Path, images: list[Path]) -> dict[str, Any]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    python_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featx", "--version"], check=True, capture_output=True)
    featx_cli_start = time.perf_counter() - t0
    p = subprocess.run(
        [sys.executable, "-c", PROFILE_CHILD, str(data), args.device, args.profile_modes], capture_output=True, text=True
    )
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    res = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    res["python_start_s"] = python_start
    res["featx_cli_version_s"] = featx_cli_start
    print(json.dumps(res, indent=1), flush=True)
    return res


# --------------------------------------------------------------------------------------------------
# part: storage (float16 and compression of the features dataset)


def _drop_file_cache(path: Path) -> None:
    """Evict one file's pages from the page cache (that file only; nothing else on the machine is touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _comp_label(comp: Any) -> str:
    return "none" if comp is None else (f"{comp[0]}-{comp[1]}" if isinstance(comp, tuple) else str(comp))


def part_storage(args: argparse.Namespace, data: Path, images: list[Path]) -> dict[str, Any]:
    import h5py

    files = sorted(f for pat in args.features for f in glob.glob(pat))
    if not files:
        raise SystemExit(f"--features {args.features}: no cache files")
    X = np.concatenate([np.asarray(h5py.File(f, "r")["features"][:], np.float32) for f in files])
    n, d = X.shape
    raw_mb = X.nbytes / 2**20
    options = [
        ("float32", None, False),
        ("float32", "lzf", False),
        ("float32", "lzf", True),
        ("float32", ("gzip", 1), True),
        ("float16", None, False),
        ("float16", "lzf", False),
        ("float16", "lzf", True),
        ("float16", ("gzip", 1), True),
        ("float16", ("gzip", 4), True),
    ]
    err16 = float(np.abs(X.astype(np.float16).astype(np.float32) - X).max() / np.abs(X).max())
    rows_block = 512  # extraction hands the writer blocks of chunk_rows (16 x 32 = 512 at batch 16)
    out = []
    with tempfile.TemporaryDirectory(prefix="featx-bench-storage-", dir=args.storage_dir) as tmp:
        for rep in range(args.storage_repeats):
            for dtype, comp, shuffle in options:
                path = Path(tmp) / f"s-{dtype}-{comp}-{shuffle}.h5"
                path.unlink(missing_ok=True)
                kw: dict[str, Any] = {}
                if comp is not None:
                    kw["compression"] = comp[0] if isinstance(comp, tuple) else comp
                    if isinstance(comp, tuple):
                        kw["compression_opts"] = comp[1]
                itemsize = np.dtype(dtype).itemsize
                rows = max(1, min(n, (1 << 20) // (d * itemsize)))  # write_cache_file's ~1 MiB chunks
                t0 = time.perf_counter()
                with h5py.File(path, "w") as f:
                    ds = f.create_dataset(
                        "features", (n, d), dtype=dtype, chunks=(rows, d), fletcher32=True, shuffle=shuffle, **kw
                    )
                    for s in range(0, n, rows_block):
                        ds[s : s + rows_block] = X[s : s + rows_block].astype(dtype, copy=False)
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                write_s = time.perf_counter() - t0
                size_mb = path.stat().st_size / 2**20
                t0 = time.perf_counter()
                with h5py.File(path, "r") as f:
                    Y = f["features"][:].astype(np.float32)
                read_warm_s = time.perf_counter() - t0
                _drop_file_cache(path)
                t0 = time.perf_counter()
                with h5py.File(path, "r") as f:
                    ds = f["features"]
                    for s in range(0, n, 8192):
                        ds[s : s + 8192].astype(np.float32)
                read_cold_s = time.perf_counter() - t0
                assert Y.shape == X.shape
                out.append(
                    {
                        "rep": rep,
                        "dtype": dtype,
                        "compression": _comp_label(comp),
                        "shuffle": shuffle,
                        "size_mb": size_mb,
                        "size_vs_float32": size_mb / raw_mb,
                        "write_rows_per_s": n / write_s,
                        "read_warm_rows_per_s": n / read_warm_s,
                        "read_cold_rows_per_s": n / read_cold_s,
                    }
                )
                print(json.dumps(out[-1]), flush=True)
                path.unlink()
    keys = [(dt, _comp_label(comp), sh) for dt, comp, sh in options]
    med = []
    for k in keys:
        rs = [r for r in out if (r["dtype"], r["compression"], r["shuffle"]) == k]
        med.append(
            {
                "dtype": k[0],
                "compression": k[1],
                "shuffle": k[2],
                **{
                    m: statistics.median(r[m] for r in rs)
                    for m in ("size_mb", "size_vs_float32", "write_rows_per_s", "read_warm_rows_per_s", "read_cold_rows_per_s")
                },
            }
        )
    return {
        "rows": n,
        "dim": d,
        "files": files,
        "raw_float32_mb": raw_mb,
        "fp16_max_relative_error": err16,
        "repeats": args.storage_repeats,
        "medians": med,
        "all": out,
    }


# --------------------------------------------------------------------------------------------------
# report


def write_report(res: dict[str, Any], out: Path) -> None:
    lines = ["# Extraction throughput: featx extract vs the bare forward vs the naive loop", ""]
    for key in sorted(k for k in res if k.startswith("rounds")):
        r = res[key]
        s, med = r["settings"], r["medians"]
        lines += [
            f"## {s['device']} {s['precision']}: {s['images']} images of `{s['data']}`, {s['backbone']}, {len(r['rounds'])} interleaved rounds",
            "",
            f"Machine: {machine_line(r['machine'])}. Date: {r['date']}.",
            "",
            f"Command: `{r['command']}`",
            "",
            "(a) bound: the bare forward of the same weights on pre-decoded images in memory, best over runtime (PyTorch eager: eval, inference mode, "
            "pre-normalised tensors; featx's frozen TorchScript model; on the CPU ONNX Runtime: featx's checked export, uint8 input normalised in the graph, "
            "`ort intra` = one session run at a time on all cores, `ort streams` = one single-threaded session loop per core) x "
            f"{', '.join(f'bs {b}' for b in s['batch_sizes'])} x NCHW / channels_last x layout (`intra`: one forward at a time on all cores; "
            f"`streams`: one single-threaded forward loop per core, featx's CPU layout) ({s['bound_images']} images, >= {s['bound_seconds']} s per setting, every round). "
            "(a') the same bare measurement of featx's own prepared model in featx's layout (not a bound; (b)/(a') is the share of its own compute speed featx keeps end to end). "
            "(b) `python -m featx -q extract DATA --cache-dir <fresh tmp>` as a whole process (interpreter start, imports, model build, "
            "all splits, journal, HDF5), images / wall seconds. (c) naive loop: PIL open + torchvision eval transform + forward, batch 1, NCHW, "
            "one process, model built beforehand (not timed). Ratios are per round, then the median.",
            "",
            "| round | order | (a) bound img/s (best setting) | (a') featx model bare | "
            + " | ".join(f"(b) {n} img/s (wall s)" for n in s["variants"])
            + " | (c) naive img/s | "
            + " | ".join(f"{n}: b/a, b/c" for n in s["variants"])
            + " | other processes' CPU s / round s |",
            "|---|---|---|---|" + "---|" * len(s["variants"]) + "---|" + "---|" * len(s["variants"]) + "---|",
        ]
        for rd in r["rounds"]:
            lines.append(
                f"| {rd['round']} | {' '.join(rd['order'])} | {rd['a']['images_per_s']:.1f} ({rd['a']['best']}) | "
                + " ".join(f"{v:.1f} ({k})" for k, v in rd["a"].get("featx_model", {}).items())
                + " | "
                + " | ".join(f"{rd['b'][n]['images_per_s']:.1f} ({rd['b'][n]['wall_s']:.1f})" for n in s["variants"])
                + f" | {rd['c']['images_per_s'] if 'c' in rd else float('nan'):.1f} | "
                + " | ".join(f"{rd['ratios'][n]['b_over_a']:.2f}, {rd['ratios'][n]['b_over_c']:.2f}" for n in s["variants"])
                + f" | {rd.get('others_cpu_s', float('nan')):.1f} / {rd.get('wall_s', float('nan')):.0f} |"
            )
        lines.append(
            f"| **median** | | **{med['a_images_per_s']:.1f}** | "
            + " ".join(
                f"{statistics.median(rd['a']['featx_model'][k] for rd in r['rounds']):.1f}"
                for k in r["rounds"][0]["a"].get("featx_model", {})
            )
            + " | "
            + " | ".join(f"**{med['b'][n]['images_per_s']:.1f}** ({med['b'][n]['wall_s']:.1f})" for n in s["variants"])
            + f" | **{med['c_images_per_s']:.1f}** | "
            + " | ".join(f"**{med['b'][n]['b_over_a']:.2f}, {med['b'][n]['b_over_c']:.2f}**" for n in s["variants"])
            + " | |"
        )
        lines += [
            "",
            "Variants: " + "; ".join(f"`{n}` = featx extract {a or '(defaults)'}" for n, a in s["variants"].items()),
            "",
            "Start-up of each (b) run (wall s minus the extraction seconds its caches record: interpreter, imports, dataset scan, "
            "model build or `.onnx` load/export, HDF5 assembly), median: "
            + "; ".join(f"`{n}` {med['b'][n]['startup_s']:.2f} s" for n in s["variants"] if "startup_s" in med["b"][n])
            + ".",
            "",
        ]
        if s.get("ort_export_check"):
            w = s["ort_export_check"]
            lines += [
                f"ONNX Runtime export check (probe batch): max |ort - torch| {w['max_abs_diff']:.2g} at layer {w['layer']} "
                f"({w['relative']:.2g} of the largest feature; tolerance 1e-4).",
                "",
            ]
        lines += ["Bound per setting, median over rounds (img/s):", ""]
        settings = list(r["rounds"][0]["a"]["all"])
        lines += ["| " + " | ".join(settings) + " |", "|" + "---|" * len(settings)]
        lines += [
            "| " + " | ".join(f"{statistics.median(rd['a']['all'][k] for rd in r['rounds']):.1f}" for k in settings) + " |",
            "",
        ]
    if "profile" in res:
        p = res["profile"]
        lines += [
            "## Where the time of `featx extract` goes (one fresh process, the same images)",
            "",
            f"Machine: {machine_line(p['machine'])}. Date: {p['date']}. Command: `{p['command']}`",
            "",
            "| start-up step | seconds |",
            "|---|---|",
            f"| python interpreter alone (`python -c pass`) | {p['python_start_s']:.2f} |",
            f"| `python -m featx --version` (no torch) | {p['featx_cli_version_s']:.2f} |",
        ]
        for k in (
            "import_torch_s",
            "import_timm_torchvision_s",
            "import_featx_s",
            "scan_and_fingerprint_s",
            "build_backbone_s",
            "embedder_spec_s",
            "prepare_model_s",
            "startup_total_s",
        ):
            lines.append(f"| {k.removesuffix('_s').replace('_', ' ')} | {p[k]:.2f} |")
        lines += [
            "",
            f"Steady loop (`featx.inference.iter_features` on all {p['images']} images, model prepared: {p['optimize_applied']}). "
            "decode / forward are thread-seconds (summed over the streams in streams mode); wait = what the loop waited for.",
            "",
            "| loop | img/s | decode s | forward s (incl. normalise) | wait s | streams x micro-batch / torch threads |",
            "|---|---|---|---|---|---|",
        ]
        for mode, lp in p["loop"].items():
            lay = f"{lp['streams']} x {lp['micro_batch']}" if lp["streams"] else f"batch {lp['batch_size']}"
            lines.append(
                f"| {mode} | {lp['images_per_s']:.1f} | {lp['decode_s']:.2f} | {lp['forward_s']:.2f} | {lp['wait_s']:.2f} | {lay} / {lp['torch_threads']} |"
            )
        pi = p["per_image_ms_one_thread"]
        lines += [
            "",
            f"Per image on one thread (ms; {p['image_size_example'][0]}x{p['image_size_example'][1]} JPEGs): read {pi['read']:.2f}, PIL decode {pi['pil_decode']:.2f} "
            f"(with `draft`: {pi['pil_decode_with_draft']:.2f}), resize + crop {pi['resize_crop']:.2f}, normalise {pi['normalise']:.3f}. "
            f"Writes for all {p['images']} feature rows: journal npz {p['journal_npz_write_s']:.3f} s, final HDF5 {p['hdf5_write_s']:.3f} s.",
            "",
        ]
    if "features" in res:
        fr = res["features"]
        lines += [
            "## ONNX Runtime vs PyTorch features, and heads fitted on each",
            "",
            f"Machine: {machine_line(fr['machine'])}. Date: {fr['date']}. Command: `{fr['command']}`",
            "",
            "Each dataset extracted twice (`--runtime torch`, `--runtime onnxruntime`), pooled features; per layer, the layer-wise "
            "probe's multi-layer model on the test split (one ONNX Runtime pass gives every layer). `featx fit-head` (logreg, "
            "its default sweep) on each set of caches.",
            "",
            "| dataset | max abs diff pooled (all splits) | mean abs feature | head C torch / ORT | test acc torch / ORT | test images differing |",
            "|---|---|---|---|---|---|",
        ]
        for d in fr["datasets"]:
            lines.append(
                f"| {d['dataset']} | {d['max_abs_diff']:.2g} | {d['mean_abs']:.3f} | {d['params_torch']} / {d['params_ort']} | "
                f"{d['acc_torch']:.4f} / {d['acc_ort']:.4f} | {d['test_pred_diff']} of {d['n_test']} |"
            )
        lines += ["", "Max |ORT - PyTorch| per layer (test split of each dataset):", ""]
        layers = list(fr["datasets"][0]["per_layer"])
        lines += ["| dataset | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
        for d in fr["datasets"]:
            lines.append(f"| {d['dataset']} | " + " | ".join(f"{d['per_layer'][k]:.2g}" for k in layers) + " |")
        lines.append("")
    if "storage" in res:
        st = res["storage"]
        lines += [
            "## Feature storage: float16 and compression",
            "",
            f"Machine: {machine_line(st['machine'])}. Date: {st['date']}. Command: `{st['command']}`",
            "",
            f"{st['rows']} real feature rows x {st['dim']} ({st['raw_float32_mb']:.1f} MiB as float32) from {len(st['files'])} cache files, written with featx's layout "
            "(~1 MiB row chunks, fletcher32) in blocks of 512 rows, fsync'd; read whole from the page cache (warm) and in 8192-row slices after "
            f"evicting the file's pages (cold). Median of {st['repeats']} repeats. float16 rounding: max relative error {st['fp16_max_relative_error']:.1e} "
            "(accuracy effect: bench_heads.md, fp16 section).",
            "",
            "| dtype | compression | shuffle | MiB | size vs float32 | write rows/s | read warm rows/s | read cold rows/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in st["medians"]:
            lines.append(
                f"| {m['dtype']} | {m['compression']} | {m['shuffle']} | {m['size_mb']:.1f} | {m['size_vs_float32']:.2f} | {m['write_rows_per_s']:,.0f} | {m['read_warm_rows_per_s']:,.0f} | {m['read_cold_rows_per_s']:,.0f} |"
            )
        lines.append("")
    if res.get("notes"):
        lines += ["## Notes", "", *res["notes"], ""]
    (out / "bench_extract.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="rounds", choices=["rounds", "profile", "storage", "features", "report"])
    ap.add_argument("--featx-args", default="", help="the main (b) run's extra arguments (e.g. '<ready-onnx>')")
    ap.add_argument("--skip-naive", action="store_true", help="rounds: leave out (c) (large datasets)")
    ap.add_argument("--data-root", default="../shared/data", help="features: every dataset in this folder")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--images", type=int, default=None, help="subsample to N images (a copy of the dataset, evenly spaced)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--batch-sizes", default=None, help="bound: batch sizes (default 1,8,16,32,64 on CPU; 64,128,256,512 on CUDA)"
    )
    ap.add_argument("--bound-images", type=int, default=None, help="bound: images per setting (default 128 on CPU, 1024 on CUDA)")
    ap.add_argument(
        "--bound-seconds", type=float, default=None, help="bound: minimum seconds per setting (default 2 on CPU, 1 on CUDA)"
    )
    ap.add_argument("--b-variant", action="append", default=[], help="NAME='featx extract args': another (b) run per round")
    ap.add_argument("--profile-modes", default="streams,threads:16,threads:8", help="profile: loops to time (DECODE[:BATCH])")
    ap.add_argument("--features", action="append", default=[], help="storage: glob(s) of cache .h5 files whose features to use")
    ap.add_argument("--storage-dir", default=None, help="storage: where the temporary files go (default: $TMPDIR)")
    ap.add_argument("--storage-repeats", type=int, default=3)
    ap.add_argument("--tag", default="", help="rounds: stored under rounds-<device>-<precision>[-tag]")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("64,128,256,512" if cuda else "1,8,16,32")).split(",")]
    args.bound_images = args.bound_images or (1024 if cuda else 128)
    args.bound_seconds = args.bound_seconds or (1.0 if cuda else 1.5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "bench_extract.json"
    res = json.loads(jpath.read_text()) if jpath.exists() else {}
    if args.part != "report":
        work = Path(tempfile.mkdtemp(prefix="featx-bench-data-"))
        try:
            data = Path(args.data).resolve()
            if args.images:
                data = subsample(data, args.images, work)
            images = image_list(data)
            fn = {"rounds": part_rounds, "profile": part_profile, "storage": part_storage, "features": part_features}[args.part]
            part = fn(args, data, images)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        part["machine"] = machine(args.device)
        part["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lock = "" if cuda else "flock /tmp/featx-cpu.lock "
        part["command"] = lock + "python benchmarks/bench_extract.py " + " ".join(sys.argv[1:])
        key = args.part
        if args.part == "rounds":
            key = f"rounds-{args.device.split(':')[0]}-{args.precision}" + (f"-{args.tag}" if args.tag else "")
        res[key] = part
        jpath.write_text(json.dumps(res, indent=1, default=str))
    write_report(res, out)
    print(f"wrote {out / 'bench_extract.md'}", flush=True)


if __name__ == "__main__":
    main()
