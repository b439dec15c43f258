"""Issue 20 evidence: what a hostile (or careless) user can make featx do -> reliability_hostile.json.

Every case runs the real ``featx`` command line in a fresh process inside a scratch folder, with real files that
featx did not write beside its own (a dataset copy, a notes file, an unrelated HDF5 file, a thesis folder, a
symlink out of the cache folder), and checks from outside what survived. ``before`` is what the same input did
on the code before issue 20 (reproduced in the issue); ``now`` is what this run observed. Run it alone under the
CPU lock (about 3 minutes on 2 cores); ``python benchmarks/reliability.py report`` puts the table into
``reliability.md``::

    flock /tmp/featx-cpu.lock python benchmarks/hostile.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FEATX = [sys.executable, "-m", "featx"]
sys.path.insert(0, str(ROOT))

from featx.bench.memory import descendants  # noqa: E402  (the bench's own /proc walk)
from tests.conftest import make_imagefolder  # noqa: E402  (the suite's generated images: real PNG files)

CASES: list[tuple[str, str, Callable[[Path], dict[str, Any]]]] = []


def case(name: str, before: str) -> Callable[[Callable[[Path], dict[str, Any]]], Callable[[Path], dict[str, Any]]]:
    def add(fn: Callable[[Path], dict[str, Any]]) -> Callable[[Path], dict[str, Any]]:
        CASES.append((name, before, fn))
        return fn

    return add


def featx(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEATX, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def first_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else (p.stdout or "").strip().splitlines()[-1] if (p.stdout or "").strip() else ""


def one_line_error(p: subprocess.CompletedProcess[str]) -> bool:
    err = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
    return p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr


def tree_digest(path: Path) -> dict[str, int]:
    if path.is_file():
        return {path.name: path.stat().st_size}
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def outcome(p: subprocess.CompletedProcess[str], ok: bool, check: str) -> dict[str, Any]:
    return {"exit": p.returncode, "message": first_line(p)[:300], "check": check, "ok": bool(ok)}


def dataset(root: Path, n_classes: int = 2, train: int = 6, seed: int = 0) -> Path:
    return make_imagefolder(root, {"train": train, "val": 2, "test": 3}, n_classes=n_classes, seed=seed)


def cached(work: Path) -> tuple[Path, Path]:
    data = dataset(work / "ds")
    cache = work / "c1"
    p = featx("-q", "extract", str(data), "--cache-dir", str(cache), "--image-size", "64", cwd=work)
    assert p.returncode == 0, p.stderr
    return data, cache


def featx_files(cache: Path) -> list[str]:
    return sorted(f.name for f in cache.iterdir() if f.name.endswith((".h5", ".partial")))


# ---------------------------------------------------------------------------------------------- data loss


@case("`cache rm ./victim` (a dataset copy outside the cache folder)", "exit 0, 'removed victim', the 251-image folder gone")
def rm_folder(work: Path) -> dict[str, Any]:
    data, cache = cached(work)
    shutil.copytree(data, work / "victim")
    before = tree_digest(work / "victim")
    p = featx("cache", "rm", "./victim", "--cache-dir", str(cache), cwd=work)
    intact = tree_digest(work / "victim") == before
    return outcome(p, one_line_error(p) and intact, f"victim folder intact: {intact}")


@case("`cache rm ./notes.txt`", "exit 0, the file deleted")
def rm_file(work: Path) -> dict[str, Any]:
    _, cache = cached(work)
    (work / "notes.txt").write_text("my notes\n")
    p = featx("cache", "rm", "./notes.txt", "--cache-dir", str(cache), cwd=work)
    intact = (work / "notes.txt").read_text() == "my notes\n"
    return outcome(p, one_line_error(p) and intact, f"notes.txt intact: {intact}")


@case(
    "`cache rm --all` with `my_keras_model_weights.h5` and `thesis.partial/chapter1.tex` in the cache folder",
    "both listed as 'unusable' by `cache ls`, both deleted",
)
def rm_all_foreign(work: Path) -> dict[str, Any]:
    import h5py

    _, cache = cached(work)
    with h5py.File(cache / "my_keras_model_weights.h5", "w") as f:
        f["dense/kernel"] = np.ones((4, 4), np.float32)
    (cache / "thesis.partial").mkdir()
    (cache / "thesis.partial" / "chapter1.tex").write_text("\\chapter{One}\n")
    ours = featx_files(cache)
    ls = featx("cache", "ls", "--cache-dir", str(cache), cwd=work)
    p = featx("cache", "rm", "--all", "--cache-dir", str(cache), cwd=work)
    kept = (cache / "my_keras_model_weights.h5").is_file() and (cache / "thesis.partial" / "chapter1.tex").is_file()
    gone = not any((cache / n).exists() for n in ours if n not in ("my_keras_model_weights.h5", "thesis.partial"))
    ls_line = next((ln for ln in ls.stdout.splitlines() if "keras" in ln), "")
    check = f"foreign file and folder kept: {kept}; featx's {len(ours) - 2} caches removed: {gone}; ls: {ls_line.strip()[:120]}"
    return outcome(p, p.returncode == 0 and kept and gone, check)


@case("a symlink named like a featx cache, pointing at a file outside, then `cache rm --all` and `cache rm KEY`", "(not tried)")
def rm_symlink(work: Path) -> dict[str, Any]:
    _, cache = cached(work)
    victim = work / "precious.h5"
    victim.write_bytes(b"not featx's\n")
    link = cache / "ds-train-efficientnet_lite0-pooled-0123456789abcdef0123.h5"
    link.symlink_to(victim)
    p1 = featx("cache", "rm", "0123456789abcdef0123", "--cache-dir", str(cache), cwd=work)
    p2 = featx("cache", "rm", "--all", "--cache-dir", str(cache), cwd=work)
    intact = victim.read_bytes() == b"not featx's\n"
    return outcome(p2, p1.returncode == 2 and intact, f"`rm KEY` exit {p1.returncode}; the link's target intact: {intact}")


@case("`cache rm test` (no key starts with 'test'; every test-split cache's name contains it)", "the test cache removed")
def rm_name_substring(work: Path) -> dict[str, Any]:
    _, cache = cached(work)
    ours = featx_files(cache)
    p = featx("cache", "rm", "test", "--cache-dir", str(cache), cwd=work)
    intact = featx_files(cache) == ours
    return outcome(p, one_line_error(p) and intact, f"all {len(ours)} caches kept: {intact}")


@case(
    "`cache rm X` where X is the first hex digit of one cache's key and not the others'",
    "'matches 2 caches' for a letter no key began with",
)
def rm_key_prefix(work: Path) -> dict[str, Any]:
    _, cache = cached(work)
    keys = {n: n.rsplit("-", 1)[-1].removesuffix(".h5") for n in featx_files(cache)}
    firsts = [k[0] for k in keys.values()]
    letter = next((c for c in firsts if firsts.count(c) == 1), None)
    if letter is None:
        return {"exit": None, "message": "", "check": "no key with a unique first digit here", "ok": True}
    target = next(n for n, k in keys.items() if k[0] == letter)
    p = featx("cache", "rm", letter, "--cache-dir", str(cache), cwd=work)
    left = featx_files(cache)
    ok = p.returncode == 0 and target not in left and len(left) == len(keys) - 1
    return outcome(p, ok, f"removed exactly the cache whose key starts with '{letter}': {ok}")


@case("`cache verify KEY` of a cache copied over another cache's name", "'ok' (fit-head and predict refused it)")
def verify_swapped(work: Path) -> dict[str, Any]:
    _, cache = cached(work)
    names = [n for n in featx_files(cache) if n.endswith(".h5")]
    a, b = cache / names[0], cache / names[1]
    shutil.copyfile(a, b)
    key = b.name.rsplit("-", 1)[-1].removesuffix(".h5")
    p = featx("cache", "verify", key, "--cache-dir", str(cache), cwd=work)
    return outcome(p, one_line_error(p), "refused with one line")


@case(
    "`cache rm --all` while an extraction of the same cache folder runs",
    "the extraction failed with 'free space and run the same command again' (false)",
)
def rm_during_extract(work: Path) -> dict[str, Any]:
    data = dataset(work / "big", n_classes=2, train=150)
    cache = work / "c1"
    ext = subprocess.Popen(
        [*FEATX, "-q", "extract", str(data), "--cache-dir", str(cache), "--image-size", "224"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while time.time() - t0 < 120 and not (cache.is_dir() and any(cache.glob("*.partial/chunk-*"))):
        time.sleep(0.2)
    p = featx("cache", "rm", "--all", "--cache-dir", str(cache), cwd=work)
    _out, err = ext.communicate(timeout=600)
    caches = sorted(cache.glob("*.h5"))
    verify = featx("cache", "verify", "--cache-dir", str(cache), cwd=work)
    check = (
        f"rm exit {p.returncode}; the extraction exit {ext.returncode} "
        f"({(err.strip().splitlines() or [''])[-1][:140]}); "
        f"{len(caches)} complete cache(s) after it, verify exit {verify.returncode}"
    )
    # the lock: rm is refused while the extraction holds it (or waits and removes a finished cache); never a broken run
    ok = ext.returncode == 0 and verify.returncode == 0 and (one_line_error(p) or p.returncode == 0)
    return outcome(p, ok, check)


# ---------------------------------------------------------------------------------------------- bench

BENCH = {
    "heads": ["logreg"],
    "strategies": [],
    "fewshot": None,
    "layerwise": False,
    "image_size": 64,
    "device": "cpu",
}


def bench_config(work: Path, name: str, **over: Any) -> Path:
    import yaml

    path = work / name
    path.write_text(yaml.safe_dump({**BENCH, **over}))
    return path


@case(
    "`bench` with datasets [a/ds, b/ds] (same folder name, 2 and 3 classes)",
    "one 'Dataset: ds' section: b's classes over a's numbers; a gone",
)
def bench_same_name(work: Path) -> dict[str, Any]:
    dataset(work / "a" / "ds", n_classes=2)
    dataset(work / "b" / "ds", n_classes=3, seed=1)
    cfg = bench_config(work, "same.yaml", datasets=["a/ds", "b/ds"])
    p = featx("-q", "bench", "--config", str(cfg), "--out-dir", "out", "--cache-dir", "c", cwd=work)
    res = json.loads((work / "out" / "results.json").read_text()) if (work / "out" / "results.json").is_file() else {}
    sets = {k: len(v.get("classes", [])) for k, v in res.get("datasets", {}).items()}
    ok = p.returncode == 0 and sorted(sets.values()) == [2, 3] and len(sets) == 2
    return outcome(p, ok, f"report sections (classes): {sets}")


@case(
    "change `heads` between two runs into one --out-dir; then overwrite a training image",
    "every cell skipped: the new protocol printed over old numbers",
)
def bench_stale(work: Path) -> dict[str, Any]:
    data = dataset(work / "ds")
    cfg = bench_config(work, "b1.yaml", datasets=["ds"])
    p1 = featx("bench", "--config", str(cfg), "--out-dir", "out", "--cache-dir", "c", cwd=work)
    cfg2 = bench_config(work, "b2.yaml", datasets=["ds"], heads=["logreg", "knn"])
    p2 = featx("bench", "--config", str(cfg2), "--out-dir", "out", "--cache-dir", "c", cwd=work)
    res2 = json.loads((work / "out" / "results.json").read_text())
    heads2 = sorted({r.get("strategy") for ds in res2["datasets"].values() for r in ds["rows"] if r.get("family") == "features"})
    cells = work / "out" / "cells"
    before = {f.name: f.stat().st_mtime_ns for f in cells.glob("*.json")}
    img = next((data / "train").rglob("*.png"))
    other = next(p for p in (data / "train").rglob("*.png") if p.parent != img.parent)
    shutil.copyfile(other, img)  # another class's picture under this name
    p3 = featx("bench", "--config", str(cfg2), "--out-dir", "out", "--cache-dir", "c", cwd=work)
    after = {f.name: f.stat().st_mtime_ns for f in cells.glob("*.json")}
    rerun = sorted(n for n in after if before.get(n) != after[n])
    res3 = json.loads((work / "out" / "results.json").read_text())
    stale = res3["meta"].get("stale_cells")
    ok = p1.returncode == p2.returncode == p3.returncode == 0 and heads2 == ["knn", "logreg"] and rerun == sorted(before)
    check = (
        f"after the heads change the report has {heads2}; after the image overwrite {len(rerun)} of {len(before)} "
        f"cell(s) re-ran, stale_cells={stale}"
    )
    return outcome(p3, ok, check)


@case(
    "`bench --out-dir ds/train/dress` (inside the dataset being read)",
    "a PNG written there, counted as a 'dress' training image by the next extract",
)
def bench_out_inside(work: Path) -> dict[str, Any]:
    data = dataset(work / "ds")
    before = tree_digest(data)
    cfg = bench_config(work, "b.yaml", datasets=["ds"])
    p = featx("bench", "--config", str(cfg), "--out-dir", "ds/train/dress", "--cache-dir", "c", cwd=work)
    p2 = featx("bench", "--config", str(cfg), "--out-dir", "out", "--cache-dir", "ds/cache", cwd=work)
    intact = tree_digest(data) == before
    return outcome(
        p,
        one_line_error(p) and one_line_error(p2) and intact,
        f"cache dir inside too: exit {p2.returncode}; dataset untouched: {intact}",
    )


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@case(
    "SIGKILL of `featx bench` while a fine-tuning cell trains; a second bench into the same --out-dir",
    "the worker kept training (~870 MB), wrote into the run folder, then hung; a rerun trained beside it",
)
def bench_kill(work: Path) -> dict[str, Any]:
    dataset(work / "ds", train=20)
    cfg = bench_config(
        work, "b.yaml", datasets=["ds"], heads=["logreg"], strategies=["full"], finetune={"epochs": 30, "batch_size": 4}
    )
    parent = subprocess.Popen(
        [*FEATX, "-q", "bench", "--config", str(cfg), "--out-dir", "out", "--cache-dir", "c"],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    t0, tree = time.time(), []
    while time.time() - t0 < 180:
        time.sleep(0.5)
        tree = descendants(parent.pid)
        if tree and (work / "out" / "runs").is_dir():
            break
    time.sleep(3)
    tree = descendants(parent.pid)
    second = featx("bench", "--config", str(cfg), "--out-dir", "out", "--cache-dir", "c", cwd=work, timeout=120)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    t_kill = time.time()
    while time.time() - t_kill < 15 and any(_alive(p) for p in tree):
        time.sleep(0.25)
    survivors = [p for p in tree if _alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    ok = bool(tree) and not survivors and one_line_error(second)
    check = (
        f"{len(tree)} descendant process(es) before the kill, {len(survivors)} alive 15 s after it "
        f"(gone after {time.time() - t_kill:.1f} s); the second bench: exit {second.returncode}, '{first_line(second)[:120]}'"
    )
    return outcome(second, ok, check)


BAD_YAML = [
    ("max_train_per_class: -5", "used as a slice: 'capped at -5 per class -> 100 images', exit 0"),
    ('max_train_per_class: "ten"', "internal error, exit 1"),
    ('budget_notes: "one note"', "one bullet per character"),
    ("device: quantum", "passed silently"),
    ('seed: "x"', "passed silently"),
    ("val_fraction: 1.5", "passed silently"),
    ("image_size: 100000", "(not tried)"),
    ("fewshot: {shots: [0]}", "(not tried)"),
]


def _bad_yaml(line: str) -> Callable[[Path], dict[str, Any]]:
    def run(work: Path) -> dict[str, Any]:
        dataset(work / "ds")
        import yaml

        cfg = work / "bad.yaml"
        cfg.write_text(yaml.safe_dump({**BENCH, "datasets": ["ds"]}) + line + "\n")
        p = featx("bench", "--config", str(cfg), "--out-dir", "out", "--cache-dir", "c", cwd=work)
        return outcome(p, one_line_error(p) and not (work / "out" / "cells").exists(), "refused before any cell ran")

    return run


for _line, _before in BAD_YAML:
    case(f"bench YAML `{_line}`", _before)(_bad_yaml(_line))


@case(
    "`extract --image-size 100000` and `--image-size 99999999999999999999`",
    "OOM-killed (20 GB, exit 137); overflow traceback summary (exit 1)",
)
def huge_image(work: Path) -> dict[str, Any]:
    data = dataset(work / "ds")
    p1 = featx("extract", str(data), "--cache-dir", "c", "--image-size", "100000", cwd=work)
    p2 = featx("extract", str(data), "--cache-dir", "c", "--image-size", "99999999999999999999", cwd=work)
    p3 = featx(
        "extract", str(data), "--cache-dir", "c", "--image-size", "4096", "--batch-size", "4096", "--num-workers", "1", cwd=work
    )
    ok = one_line_error(p1) and one_line_error(p2) and one_line_error(p3)
    return outcome(p3, ok, f"exits {p1.returncode}, {p2.returncode}; 4096 px x batch 4096: '{first_line(p3)[:110]}'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="substring of the case names to run")
    args = ap.parse_args()
    rows = []
    for name, before, fn in CASES:
        if args.only and args.only not in name:
            continue
        with tempfile.TemporaryDirectory(prefix="featx-hostile-") as tmp:
            t0 = time.perf_counter()
            try:
                row = fn(Path(tmp))
            except Exception as exc:  # the case itself broke: recorded, not hidden
                row = {"exit": None, "message": f"{type(exc).__name__}: {exc}"[:300], "check": "case failed to run", "ok": False}
            for k in ("message", "check"):  # the scratch folder's random name says nothing
                row[k] = str(row[k]).replace(str(Path(tmp).resolve()), "<scratch>").replace(tmp, "<scratch>")
            row.update(case=name, before=before, seconds=round(time.perf_counter() - t0, 1))
        print(f"{'ok ' if row['ok'] else 'BAD'} {name}: {row['check']}", flush=True)
        rows.append(row)
    out = RESULTS / "reliability_hostile.json"
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": "python benchmarks/hostile.py", "cases": rows}
    if args.only and out.is_file():  # a partial run updates its cases only
        old = {r["case"]: r for r in json.loads(out.read_text())["cases"]}
        old.update({r["case"]: r for r in rows})
        data["cases"] = list(old.values())
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{sum(r['ok'] for r in data['cases'])} of {len(data['cases'])} cases as intended -> {out}")


def render(data: dict[str, Any]) -> list[str]:
    """The reliability.md section (called by benchmarks/reliability.py report)."""
    rows = data.get("cases", [])
    md = [
        "## Hostile user: deletions, stale or mixed-up reports, limits (issue 20)",
        "",
        f"`flock /tmp/featx-cpu.lock python benchmarks/hostile.py` ({data.get('date', '?')}; see its docstring). "
        "Each case runs in a "
        "fresh scratch folder with real files featx did not write beside its own; *before* is what the same input did before "
        "issue 20 (as reproduced in the issue), *now* what this run observed.",
        "",
        f"{sum(r['ok'] for r in rows)} of {len(rows)} cases behave as intended.",
        "",
        "| input | before | now: exit | now: message | checked from outside | as intended |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        msg = (r.get("message") or "").replace("|", "\\|")
        md.append(
            f"| {r['case']} | {r['before']} | {r.get('exit')} | {msg} | {r['check'].replace('|', '/')} "
            f"| {'yes' if r['ok'] else '**no**'} |"
        )
    return [*md, ""]


if __name__ == "__main__":
    main()
