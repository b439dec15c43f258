"""``featx`` command line: parse, call the Python API, print a summary, map errors to exit codes.

Results go to files (or stdout where asked); progress and logs go to stderr. Exit codes are listed in
:mod:`featx.errors`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from featx import __version__
from featx.errors import FeatxError

log = logging.getLogger("featx")

EPILOG = "exit codes: 0 ok, 1 internal error, 2 usage or data error, 5 some bench cells failed, 130 interrupted"


# --------------------------------------------------------------------------------------------------
# Argument types: a bad number is an argparse error (one line, exit 2) before anything is built


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``featx extract: error: ...``) with exit code 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number_type(kind: type, what: str, ok: Callable[[Any], bool], doc: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``kind(text)``, finite, and ``ok(value)``; else "must be <what>, got '<text>'"."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'")
        return value

    parse.__doc__ = doc
    return parse


positive_int = _number_type(int, "a positive integer", lambda v: v >= 1, "An integer >= 1 (batch size, image size, epochs...).")
nonneg_int = _number_type(int, "an integer >= 0", lambda v: v >= 0, "An integer >= 0 (worker count, seed, patience).")
n_jobs_int = _number_type(
    int, "a positive integer or -1 (all cores)", lambda v: v >= 1 or v == -1, "Parallel jobs, or -1 for all cores (joblib's)."
)
fraction = _number_type(
    float, "a number between 0 and 1 (exclusive)", lambda v: 0.0 < v < 1.0, "A share of the images, strictly in (0, 1)."
)
unit_float = _number_type(float, "a number >= 0 and < 1", lambda v: 0.0 <= v < 1.0, "In [0, 1): dropout, label smoothing.")
positive_float = _number_type(float, "a number > 0", lambda v: v > 0, "A finite number > 0 (learning rate).")
nonneg_float = _number_type(float, "a number >= 0", lambda v: v >= 0, "A finite number >= 0 (weight decay, warm-up epochs).")


def nonneg_float_list(text: str) -> list[float]:
    """Comma-separated finite numbers >= 0 (fine-tuning search grids: --lr-grid, --wd-grid)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers >= 0, got '{text}'")
    return [nonneg_float(t) for t in parts]


# --------------------------------------------------------------------------------------------------
# Shared option groups


def _add_backbone_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="registry name (see `featx backbones`) or timm:<model> (default: %(default)s)",
    )
    g.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a state_dict (default: %(default)s)")
    g.add_argument("--layer", default="pooled", help="pooled penultimate features, or a block name (default: %(default)s)")
    g.add_argument("--image-size", type=positive_int, default=None, help="input resolution (default: the weights' own)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="compute precision (default: fp32)")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default: 16 on CPU, 256 on CUDA)")
    g.add_argument(
        "--num-workers",
        type=nonneg_int,
        default=None,
        help="decode worker processes (default: 0 on CPU = decode in threads between forwards; CUDA: cores - 1, at most 8)",
    )


def _add_runtime_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        default=None,
        choices=["auto", "torch", "onnxruntime"],
        help="what runs the frozen forward (default: auto = ONNX Runtime on the CPU in fp32 when installed and its "
        "export passes the check against PyTorch, else PyTorch; env FEATX_RUNTIME)",
    )


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference (benchmarks/results/bench_extract.md)")
    g.add_argument(
        "--optimize",
        default=None,
        choices=["auto", "none", "fold", "freeze", "compile"],
        help="model preparation: fold BatchNorm into convs (auto), TorchScript freeze, torch.compile, or none",
    )
    g.add_argument(
        "--decode",
        default=None,
        choices=["auto", "streams", "threads", "processes", "gpu"],
        help="where images decode (auto: one decode + forward stream per core on CPU, worker processes with "
        "--num-workers, threads on CUDA; gpu: nvJPEG)",
    )
    g.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode large JPEGs at a reduced DCT scale (faster on big photos; features change slightly)",
    )


def _settings(args: argparse.Namespace) -> Any:
    """The InferenceSettings of a command: its runtime and inference flags over the documented FEATX_* defaults
    (flags a command does not have are left to those defaults)."""
    from featx.runtime import InferenceSettings

    return InferenceSettings.from_env(
        device=getattr(args, "device", None),
        batch_size=getattr(args, "batch_size", None),
        num_workers=getattr(args, "num_workers", None),
        channels_last=False if getattr(args, "no_channels_last", False) else None,
        optimize=getattr(args, "optimize", None),
        decode=getattr(args, "decode", None),
        jpeg_draft=True if getattr(args, "jpeg_draft", False) else None,
        runtime=getattr(args, "runtime", None),
    )


def _add_outside_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="let a CSV manifest name files outside its own folder (refused by default)",
    )


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $FEATX_CACHE_DIR or ./cache)")


def _add_split_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("splits (used when the dataset has no val/test folder)")
    g.add_argument("--val-fraction", type=fraction, default=0.2, help="share of train carved out as val (default: 0.2)")
    g.add_argument("--test-fraction", type=fraction, default=0.2, help="share of train carved out as test (default: 0.2)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed of the carving (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featx",
        description="Transfer learning on images: cached backbone features, cheap heads, fine-tuning baselines.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="extract backbone features into HDF5 caches", epilog=EPILOG)
    p.add_argument("dataset", help="ImageFolder root (optionally with train/val/test) or a CSV manifest")
    p.add_argument("--splits", default=None, help="comma-separated splits to extract (default: all the dataset has)")
    _add_backbone_options(p)
    _add_runtime_options(p)
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    _add_runtime_choice(p)
    _add_inference_options(p)
    _add_cache_dir(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="re-extract even if a cache exists (the old cache is replaced only once the new one is complete)",
    )
    p.add_argument("--strict", action="store_true", help="any image that cannot be read is an error (exit 2; the cache is kept)")
    p.add_argument(
        "--shard",
        metavar="I/N",
        default=None,
        help="a separate job (no torchrun, no shared folder) computing the I-th of N parts (0-based) into its own journal; "
        "`featx cache merge` assembles the cache from all N",
    )
    _add_outside_root(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("cache", help="list, inspect or remove caches", epilog=EPILOG)
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    q = csub.add_parser("ls", help="list caches")
    _add_cache_dir(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_cache_ls)
    q = csub.add_parser("info", help="show one cache's attributes")
    q.add_argument("ref", help="cache file, key or key prefix")
    _add_cache_dir(q)
    q.set_defaults(func=cmd_cache_info)
    q = csub.add_parser("verify", help="read every cache in full and check its checksums (exit 2 if any is damaged)")
    q.add_argument("refs", nargs="*", help="cache files, keys or key prefixes (default: every cache in the folder)")
    _add_cache_dir(q)
    q.set_defaults(func=cmd_cache_verify)
    q = csub.add_parser(
        "rm",
        help="remove caches and interrupted extractions' journals (only what featx can prove it wrote; not while extracting)",
    )
    q.add_argument("refs", nargs="*", help="cache keys, key prefixes or files in the cache folder")
    q.add_argument("--all", action="store_true", help="remove every cache featx wrote in the folder (the rest is left alone)")
    _add_cache_dir(q)
    q.set_defaults(func=cmd_cache_rm)
    q = csub.add_parser("merge", help="assemble caches from the shard journals of `featx extract --shard I/N` jobs")
    q.add_argument(
        "refs",
        nargs="*",
        help="shard journal folders (*.shard-I-of-N.partial) or folders holding them (default: the cache folder)",
    )
    q.add_argument("--cache-dir", default=None, help="where to write the cache (default: beside the first shard journal)")
    q.set_defaults(func=cmd_cache_merge)

    p = sub.add_parser("fit-head", help="train sklearn heads on cached features", epilog=EPILOG)
    p.add_argument("dataset", nargs="?", help="dataset whose caches to use (same backbone options as extract)")
    p.add_argument("--train", dest="train_cache", help="train cache (file or key) instead of a dataset")
    p.add_argument("--val", dest="val_cache", help="val cache (optional)")
    p.add_argument("--test", dest="test_cache", help="test cache (optional)")
    from featx.heads import HEADS  # the registered kinds (torch-free)

    p.add_argument("--head", default="logreg", help=f"{', '.join(HEADS)}, comma-separated, or all (default: logreg)")
    p.add_argument("--extract", action="store_true", help="extract missing caches first")
    _add_outside_root(p)
    _add_backbone_options(p)
    _add_runtime_options(p)
    _add_runtime_choice(p)
    _add_cache_dir(p)
    _add_split_options(p)
    p.add_argument("--n-jobs", type=n_jobs_int, default=None, help="parallel sweep workers (default: all cores)")
    p.add_argument(
        "--solver",
        choices=["sklearn", "torch"],
        default="sklearn",
        help="logreg solver: scikit-learn, or torch L-BFGS (uses --device; exported as a plain LogisticRegression)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="read the caches in row chunks instead of loading them (caches larger than memory; logreg, torch L-BFGS)",
    )
    p.add_argument(
        "--sweep-rows",
        type=positive_int,
        default=None,
        help="--stream: training rows of the in-memory subsample the C sweep runs on (default: 64 MiB of features)",
    )
    p.add_argument(
        "--max-passes",
        type=positive_int,
        default=None,
        help="--stream: passes over the rows the final L-BFGS fit may take before it stops and warns (default: 200)",
    )
    p.add_argument("--out-dir", default="heads", help="where heads (.skops) and metrics (.json) go (default: heads)")
    _add_scheduler(p, "the head kinds as Dask tasks, the features scattered to every worker once")
    p.set_defaults(func=cmd_fit_head)

    p = sub.add_parser("predict", help="label images with a saved head", epilog=EPILOG)
    p.add_argument("head", help="head file written by fit-head (.skops)")
    p.add_argument("inputs", nargs="*", help="image files, folders or a CSV with a 'path' column")
    p.add_argument("--cache", default=None, help="predict the rows of a cache instead of images")
    p.add_argument("-o", "--output", default="-", help="output .csv or .json, or - for CSV on stdout (default: -)")
    p.add_argument("--weights", default=None, help="where the head's weights file is now, if it has moved (sha256 is checked)")
    _add_runtime_options(p)
    _add_runtime_choice(p)
    _add_cache_dir(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("backbones", help="list backbones and which weights are available offline", epilog=EPILOG)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("finetune", help="fine-tuning baseline on the same splits", epilog=EPILOG)
    p.add_argument("dataset", help="ImageFolder root or CSV manifest")
    p.add_argument("--strategy", default="full", help="full | partial | head | lp-ft (default: full)")
    p.add_argument("--trainable-blocks", type=positive_int, default=2, help="partial: train the last N blocks (default: 2)")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="adamw | sgd (momentum) (default: adamw)")
    p.add_argument("--lr", type=positive_float, default=None, help="head learning rate (default: 3e-3 for adamw, 0.01 for sgd)")
    p.add_argument("--backbone-lr-scale", type=nonneg_float, default=0.1, help="backbone LR = lr * this (default: 0.1)")
    p.add_argument("--momentum", type=unit_float, default=0.9)
    p.add_argument(
        "--weight-decay", type=nonneg_float, default=None, help="default: 0.05 for adamw (decoupled), 1e-4 for sgd (L2)"
    )
    p.add_argument("--dropout", type=unit_float, default=0.2)
    p.add_argument("--label-smoothing", type=unit_float, default=0.0)
    p.add_argument("--warmup-epochs", type=nonneg_float, default=1.0)
    p.add_argument(
        "--augment",
        default="random_resized_crop,hflip,affine",
        help="training augmentations, comma-separated: random_resized_crop (scale 0.35-1), hflip, affine (shear 10 deg, "
        "zoom 0.9-1.1); none = off (default: %(default)s)",
    )
    p.add_argument("--patience", type=nonneg_int, default=3, help="early-stopping patience in epochs, 0 = off (default: 3)")
    p.add_argument("--out-dir", default=None, help="checkpoint and result folder (default: runs/finetune/<dataset>-<strategy>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out-dir")
    p.add_argument(
        "--final-fit",
        default=None,
        choices=["train+val", "train"],
        help="retrain on train+val for the epochs chosen on val, or keep the best model trained on train "
        "(default: train+val; train with --selection rule)",
    )
    p.add_argument(
        "--selection",
        default="val",
        choices=["val", "rule"],
        help="choose epochs on val, or use the fixed few-shot rule without val labels (default: val)",
    )
    p.add_argument(
        "--lr-grid",
        type=nonneg_float_list,
        default=None,
        help="comma-separated LRs: search lr x weight decay on val (e.g. 1e-3,3e-3,1e-2,3e-2)",
    )
    p.add_argument("--wd-grid", type=nonneg_float_list, default=None, help="comma-separated weight decays for the search")
    p.add_argument(
        "--search", action="store_true", help="search the default lr x weight-decay grid for --optimizer (smaller on CPU)"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="per-step losses, grid details, tracebacks"
    )
    _add_outside_root(p)
    _add_backbone_options(p)
    _add_runtime_options(p)
    _add_split_options(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("bench", help="run a feature-extraction vs fine-tuning grid and write the report", epilog=EPILOG)
    p.add_argument("--config", default=None, help="grid file (YAML or TOML); flags below override it")
    p.add_argument("--quick", action="store_true", help="small grid on the embedded sample (a few minutes on 2 CPU cores)")
    p.add_argument("--dataset", action="append", default=None, help="dataset path (repeatable)")
    p.add_argument("--backbone", action="append", default=None, help="backbone (repeatable)")
    p.add_argument("--out-dir", default=None, help="report folder (default: runs/bench or runs/bench-quick)")
    _add_cache_dir(p)
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: from the config, else auto)")
    p.add_argument(
        "--final-fit",
        default=None,
        choices=["train+val", "train"],
        help="what both families train their final model on after choosing on val (default: from the config, else train+val)",
    )
    p.add_argument(
        "--reuse-stale",
        action="store_true",
        help="keep finished cells whose settings, data, code or libraries changed since they ran (and cells from before "
        "fingerprints) instead of running them again; the report lists them as stale",
    )
    _add_scheduler(p, "the cells as Dask tasks (--out-dir on a filesystem the workers share; fine-tuning cells on GPU workers)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "rank", help="rank backbones x layers x weights by transferability scores on the train rows", epilog=EPILOG
    )
    p.add_argument("dataset", help="ImageFolder root (optionally with train/val/test) or a CSV manifest")
    p.add_argument("--backbone", action="append", default=None, help="backbone (repeatable; default: efficientnet_lite0)")
    p.add_argument("--weights", action="append", default=None, help="imagenet | none | PATH (repeatable; default: imagenet)")
    p.add_argument("--layers", default="pooled", help="pooled | all | comma-separated layer names (default: %(default)s)")
    p.add_argument("--score", default="logme", help="comma-separated: logme, hscore, knn; ranked by the first (default: logme)")
    p.add_argument(
        "--verify",
        type=nonneg_int,
        nargs="?",
        const=3,
        default=0,
        metavar="K",
        help="fit fit-head's val-tuned probe on the top K (default K: 3) and report whether the score's pick holds",
    )
    p.add_argument("--out", default=None, help="folder for rank.json and rank.png (default: print only)")
    p.add_argument("--image-size", type=positive_int, default=None, help="input resolution (default: the weights' own)")
    _add_cache_dir(p)
    _add_runtime_options(p)
    _add_runtime_choice(p)
    _add_split_options(p)
    _add_outside_root(p)
    p.set_defaults(func=cmd_rank)
    return parser


# --------------------------------------------------------------------------------------------------
# Commands


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_extract(args: argparse.Namespace) -> int:
    from featx.data import load_dataset
    from featx.distributed import is_main_process, launched
    from featx.extraction import extract, parse_shard

    parse_shard(args.shard)  # a bad --shard is a usage error before the dataset is read
    main = is_main_process()
    if launched():  # under torchrun rank 0 scans the dataset once, inside extract()
        ds = args.dataset
    else:
        ds = load_dataset(args.dataset, allow_outside_root=args.allow_outside_root)
        for note in ds.notes:
            _err(f"  note: {note}")
    results = extract(
        ds,
        splits=args.splits.split(",") if args.splits else None,
        backbone=args.backbone,
        weights=args.weights,
        layer=args.layer,
        image_size=args.image_size,
        precision=args.precision,
        settings=_settings(args),
        cache_dir=args.cache_dir,
        force=args.force,
        progress=_progress(args),
        strict=args.strict,
        allow_outside_root=args.allow_outside_root,
        shard=args.shard,
    )
    if not main:  # every rank returns the same results: rank 0 prints them
        return 0
    for r in results:
        for path, reason in r.failures[:5]:
            _err(f"  skipped {path}: {reason}")
        print(r.summary())
    total = sum(r.n_images for r in results)
    skipped = sum(r.n_failed for r in results)
    seconds = sum(r.seconds for r in results)
    hits = sum(r.hit for r in results)
    ignored = getattr(ds, "ignored_files", 0)
    extra = f", {ignored} non-image files ignored" if ignored else ""
    print(f"done: {total} images, {skipped} skipped, {hits}/{len(results)} cache hits, {seconds:.1f} s{extra}")
    return 0


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from featx.cache import list_caches, resolve_cache_dir

    rows = list_caches(args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no caches in {resolve_cache_dir(args.cache_dir)}")
        return 0
    table = [["key", "dataset", "split", "backbone", "layer", "shape", "size", "created"]]
    for r in rows:
        if r["status"].startswith("partial"):  # an interrupted extraction: the same command resumes it
            row = [r["key"], r["dataset"], r["split"], r["backbone"], r["layer"], r["status"], f"{r['size_mb']:.1f} MB"]
            table.append([str(c) for c in row] + [r["created"] or "-"])
            continue
        if r["status"] != "complete":
            size = "-" if r["size_mb"] is None else f"{r['size_mb']:.1f} MB"
            table.append([r["key"] or "-", r["file"], "-", "-", "-", "-", size, r["status"][:40]])
            continue
        table.append(
            [
                r["key"],
                r["dataset"],
                r["split"],
                r["backbone"],
                r["layer"],
                "x".join(map(str, r["shape"])),
                f"{r['size_mb']:.1f} MB",
                r["created"],
            ]
        )
    print(format_table(table))
    foreign = sum(not r["featx"] for r in rows)
    if foreign:
        what = "entry is" if foreign == 1 else "entries are"
        print(f"{foreign} {what} not featx's: `featx cache rm` leaves them alone (--json says why)")
    return 0


def cmd_cache_merge(args: argparse.Namespace) -> int:
    from featx.cache import merge_shards

    for r in merge_shards(args.refs, args.cache_dir):
        print(r.summary())
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    from featx.cache import read_cache_attrs, resolve_cache_path

    path = resolve_cache_path(args.ref, args.cache_dir)
    attrs = read_cache_attrs(path)
    print(json.dumps({"path": str(path), **attrs}, indent=2, default=str))
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from featx.cache import resolve_cache_dir, verify_caches
    from featx.errors import CacheError

    results = verify_caches(args.refs or None, args.cache_dir)
    if not results:
        print(f"no caches in {resolve_cache_dir(args.cache_dir)}")
        return 0
    for path, ok, message in results:
        print(f"ok       {path.name}: {message}" if ok else f"DAMAGED  {path.name}: {message}")
    bad = sum(not ok for _, ok, _ in results)
    if bad:
        raise CacheError(f"{bad} of {len(results)} cache(s) damaged or not what their name says: remove each as its line says")
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    import shlex

    from featx.cache import clean_caches
    from featx.errors import CacheError, UsageError

    if not args.refs and not args.all:
        raise UsageError("give cache keys/files to remove, or --all")
    if args.refs and args.all:
        raise UsageError("give cache keys/files to remove or --all, not both")
    done = clean_caches(args.refs, args.cache_dir, all_=args.all)
    for p in done.removed:
        print(f"removed {p}")
    for p, why in done.left:
        how = f"rm {'-r ' if p.is_dir() and not p.is_symlink() else ''}-- {shlex.quote(str(p))}"
        print(f"left alone {p}: featx cannot prove it wrote it ({why}); delete it by hand if you do not need it: {how}")
    if done.busy:
        raise CacheError(f"{len(done.busy)} of featx's entries kept: {done.busy[0][1]}, then run featx cache rm again")
    return 0


def _resolve_head_caches(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Caches for fit-head: explicit --train/--val/--test, or looked up by key for a dataset."""
    from featx.cache import load_cache, resolve_cache_path
    from featx.data import load_dataset, refuse_inside_dataset
    from featx.errors import UsageError
    from featx.extraction import extract, find_caches

    if args.train_cache:
        if args.dataset:
            raise UsageError("give either a dataset or --train/--val/--test caches, not both")
        refs = {"train": args.train_cache, "val": args.val_cache, "test": args.test_cache}
        open_ = (lambda p: p) if getattr(args, "stream", False) else load_cache  # --stream: files, read in chunks later
        sets = {name: open_(resolve_cache_path(ref, args.cache_dir)) for name, ref in refs.items() if ref}
        return sets, str(_head_cache_attrs(sets["train"]).get("dataset_name", "dataset"))
    if not args.dataset:
        raise UsageError("give a dataset, or --train CACHE [--val CACHE] [--test CACHE]")
    ds = load_dataset(args.dataset, allow_outside_root=args.allow_outside_root)
    refuse_inside_dataset(args.out_dir, ds, "--out-dir")
    options = {
        "backbone": args.backbone,
        "weights": args.weights,
        "layer": args.layer,
        "image_size": args.image_size,
        "precision": args.precision,
        "cache_dir": args.cache_dir,
    }
    if args.extract:
        extract(ds, settings=_settings(args), progress=_progress(args), **options)
    if getattr(args, "stream", False):
        return dict(find_caches(ds, **options)), ds.name
    return {name: load_cache(path) for name, path in find_caches(ds, **options).items()}, ds.name


def _head_cache_attrs(cache: Any) -> dict[str, Any]:
    """Attributes of a loaded cache, or of a cache file (fit-head --stream does not load it)."""
    from featx.cache import read_cache_attrs

    return cache.attrs if hasattr(cache, "attrs") else read_cache_attrs(cache)


def cmd_fit_head(args: argparse.Namespace) -> int:
    from featx.data import SplitPlan, refuse_unusable_folder
    from featx.errors import UsageError
    from featx.heads import HEADS, fit_heads, head_summary, save_head

    refuse_unusable_folder(args.out_dir, "--out-dir")
    kinds = list(HEADS) if args.head == "all" else [h.strip() for h in args.head.split(",") if h.strip()]
    unknown = [k for k in kinds if k not in HEADS]
    if unknown or not kinds:
        raise UsageError(f"unknown head '{', '.join(unknown)}' (choose from {', '.join(HEADS)}, or all)")
    if not args.stream and (args.sweep_rows is not None or args.max_passes is not None):
        raise UsageError("--sweep-rows and --max-passes go with --stream")
    if args.scheduler is not None:
        from featx.cluster import check_scheduler

        check_scheduler(args.scheduler)
    sets, ds_name = _resolve_head_caches(args)
    plan = SplitPlan(args.val_fraction, args.test_fraction, args.seed)
    out_dir = Path(args.out_dir)
    rows = [["head", "best params", "val acc", "test acc", "macro-F1", "macro recall", "per-class acc", "fit s"]]
    summaries = {}
    attrs = _head_cache_attrs(sets["train"])
    device = None if args.device in (None, "auto") else args.device
    heads = fit_heads(
        sets["train"],
        sets.get("val"),
        sets.get("test"),
        kinds=kinds,
        scheduler=args.scheduler,
        plan=plan,
        n_jobs=args.n_jobs,
        solver=args.solver,
        stream=args.stream,
        sweep_rows=args.sweep_rows,
        **({"max_passes": args.max_passes} if args.max_passes else {}),
        device=device,
    )
    for kind in kinds:
        head = heads[kind]
        stem = f"{ds_name}-{attrs['backbone'].replace(':', '_')}-{attrs['layer']}-{kind}"
        path = save_head(head, out_dir / f"{stem}.skops")
        summaries[kind] = {"path": str(path), **head_summary(head)}
        m = head.test_metrics or {}
        rows.append(
            [
                kind,
                ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in head.best_params.items()),
                f"{head.val_accuracy:.3f}",
                f"{m.get('accuracy', float('nan')):.3f}",
                f"{m.get('macro_f1', float('nan')):.3f}",
                f"{m.get('macro_recall', float('nan')):.3f}",
                f"{m.get('mean_per_class_accuracy', float('nan')):.3f}",
                f"{head.metadata['fit_seconds']:.1f}",
            ]
        )
    print(format_table(rows))
    classes = head.classes  # the caches may be files (--stream); every head has the training classes
    for kind, s in summaries.items():
        cm = (s.get("test_metrics") or {}).get("confusion_matrix")
        if cm:
            print(f"\nconfusion matrix, {kind} (rows: true, columns: predicted)")
            print(format_table([["", *[c[:8] for c in classes]], *[[c[:12], *map(str, r)] for c, r in zip(classes, cm)]]))
    metrics_path = out_dir / f"{ds_name}-{attrs['backbone'].replace(':', '_')}-{attrs['layer']}-metrics.json"
    metrics_path.write_text(json.dumps(summaries, indent=2))
    print(f"\nheads and metrics written to {out_dir}/ ({metrics_path.name})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from featx.data import refuse_unusable_folder
    from featx.errors import UsageError
    from featx.prediction import predict

    if not args.inputs and not args.cache:
        raise UsageError("give images, folders or a CSV to predict, or --cache")
    if args.output not in (None, "-"):  # checked before predicting, not on the first write afterwards
        if Path(args.output).expanduser().is_dir():
            raise UsageError(f"--output {args.output} is a folder; name a .csv or .json file")
        refuse_unusable_folder(Path(args.output).expanduser().parent, "--output's folder")
    cache = None
    if args.cache:
        from featx.cache import resolve_cache_path

        cache = resolve_cache_path(args.cache, args.cache_dir)
    preds = predict(
        args.head,
        args.inputs,
        cache=cache,
        settings=_settings(args),
        weights=args.weights,
        progress=_progress(args),
        cache_dir=args.cache_dir,
    )
    for path, reason in preds.failures[:5]:
        _err(f"  skipped {path}: {reason}")
    text = preds.write(args.output)
    if text is not None:
        sys.stdout.write(text)
    else:
        _err(f"{len(preds.paths)} predictions written to {args.output}")
    if preds.failures:
        _err(f"{len(preds.failures)} image(s) could not be decoded and have no prediction")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from featx.backbones import list_backbones

    rows = list_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [["name", "source", "imagenet weights offline", "note"]]
    table += [[r["name"], r["source"], "yes" if r["offline"] else "no", r["note"]] for r in rows]
    print(format_table(table))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from featx.data import SplitPlan, load_dataset
    from featx.distributed import is_main_process
    from featx.errors import UsageError
    from featx.finetuning import FinetuneConfig, finetune, finetune_search

    ds = load_dataset(args.dataset, allow_outside_root=args.allow_outside_root)
    config = FinetuneConfig(
        strategy=args.strategy,
        trainable_blocks=args.trainable_blocks,
        epochs=args.epochs,
        batch_size=args.batch_size or 32,
        optimizer=args.optimizer,
        lr=args.lr,
        backbone_lr_scale=args.backbone_lr_scale,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs,
        augment=args.augment,
        early_stopping_patience=args.patience,
        precision=args.precision,
        device=args.device,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    out_dir = Path(args.out_dir or f"runs/finetune/{ds.name}-{args.backbone.replace(':', '_')}-{args.strategy}")
    if args.layer != "pooled":
        raise UsageError("finetune trains on pooled features; --layer applies to extract and fit-head only")
    search = args.search or args.lr_grid is not None or args.wd_grid is not None
    if search and args.selection == "rule":
        raise UsageError("--selection rule uses no val labels, so it cannot search a grid (drop --lr-grid/--wd-grid/--search)")
    if args.lr_grid is not None and 0 in args.lr_grid:
        raise UsageError("--lr-grid values must be > 0")
    common = {
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "config": config,
        "split_plan": SplitPlan(args.val_fraction, args.test_fraction, args.seed),
        "out_dir": out_dir,
        "resume": args.resume,
        "progress": _progress(args),
        "final_fit": args.final_fit,
    }
    if search:
        grid = None
        if args.lr_grid is not None or args.wd_grid is not None:
            grid = {"lr": args.lr_grid or [config.lr], "weight_decay": args.wd_grid or [config.weight_decay]}
        result = finetune_search(ds, grid=grid, **common)
        if not is_main_process():  # under torchrun every rank returns the same result; rank 0 prints it
            return 0
        rows = [["lr", "weight decay", "val acc", "best epoch", "epochs run", "s"]]
        for r in result["grid"]:
            rows.append(
                [
                    f"{r['lr']:g}",
                    f"{r['weight_decay']:g}",
                    f"{r['val_accuracy']:.3f}",
                    str(r["best_epoch"]),
                    str(r["epochs_run"]),
                    f"{r['seconds']:.0f}",
                ]
            )
        print(format_table(rows))
        c = result["chosen"]
        edge = " (at the edge of the lr grid)" if result["at_grid_edge"] else ""
        print(f"chosen on val: lr {c['lr']:g}, weight decay {c['weight_decay']:g}, {c['epochs']} epochs{edge}\n")
    else:
        result = finetune(ds, selection=args.selection, **common)
    if not is_main_process():  # under torchrun every rank returns the same result; rank 0 prints it
        return 0
    m = result["metrics"]
    val = "-" if result["val_accuracy"] is None else f"{result['val_accuracy']:.3f}"
    print(
        format_table(
            [
                [
                    "strategy",
                    "val acc",
                    "test acc",
                    "macro-F1",
                    "macro recall",
                    "epochs",
                    "final fit",
                    "wall s",
                    "img/s",
                    "peak MB",
                    "trainable",
                ],
                [
                    result["strategy"],
                    val,
                    f"{m['accuracy']:.3f}",
                    f"{m['macro_f1']:.3f}",
                    f"{m['macro_recall']:.3f}",
                    f"best {result['best_epoch']} of {result['epochs_run']}/{result['epochs_budget']}",
                    f"{result['final_fit']} ({result['n_fit']} images)",
                    f"{result['wall_seconds']:.0f}",
                    f"{result['train_images_per_s']:.1f}",
                    f"{result['peak_memory_mb']:.0f} ({result['memory_kind']})",
                    f"{result['trainable_params']:,}",
                ],
            ]
        )
    )
    if result["still_improving"]:
        print(f"val accuracy was still improving at the last epoch: try more than {result['epochs_budget']} epochs")
    print(f"result and checkpoint in {out_dir}/")
    return 0


def _add_scheduler(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS|local:N",
        help=f"run on a Dask cluster (pip install 'featx[dask]'): tcp://HOST:8786, or local:N workers started here; {what}",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from featx.bench import load_bench_config, run_bench

    config = load_bench_config(
        args.config,
        quick=args.quick,
        datasets=args.dataset,
        backbones=args.backbone,
        device=args.device,
        final_fit=args.final_fit,
    )
    out_dir = Path(args.out_dir or ("runs/bench-quick" if args.quick else "runs/bench"))
    outcome = run_bench(
        config,
        out_dir=out_dir,
        cache_dir=args.cache_dir,
        progress=_progress(args),
        command="featx " + " ".join(sys.argv[1:]),
        log_level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,  # cells' processes too
        reuse_stale=args.reuse_stale,
        scheduler=args.scheduler,
    )
    print(f"report: {outcome['report']}")
    if outcome["failed"]:
        from featx.errors import BenchError

        raise BenchError(f"{outcome['failed']} bench cell(s) failed; see {outcome['report']}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from featx.data import SplitPlan, load_dataset
    from featx.ranking import rank

    ds = load_dataset(args.dataset, allow_outside_root=args.allow_outside_root)
    result = rank(
        ds,
        args.backbone or ["efficientnet_lite0"],
        weights=args.weights or ["imagenet"],
        layers=args.layers,
        scores=args.score,
        verify=args.verify,
        image_size=args.image_size,
        split_plan=SplitPlan(val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed),
        cache_dir=args.cache_dir,
        settings=_settings(args),
        out_dir=args.out,
        progress=_progress(args),
    )
    print(result.table())
    print(result.summary())
    if args.out:
        print(f"rank.json and rank.png in {args.out}/")
    return 0


# --------------------------------------------------------------------------------------------------


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error (exit 2): return the code, do not exit
        return exc.code if isinstance(exc.code, int) else 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except FeatxError as exc:
        if getattr(exc, "on_every_rank", False):  # under torchrun: the same error on every rank, printed by rank 0
            from featx.distributed import is_main_process

            if not is_main_process():
                return exc.exit_code
        _err(f"featx: error: {exc}")
        if args.verbose:
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        _err("featx: interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        _err(
            f"featx: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            + ("" if args.verbose else " (run with --verbose for the traceback)")
        )
        if args.verbose:
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
