"""Issue 13 evidence: kill/resume campaign, damaged-cache campaign, bad-file counts -> reliability.{md,json}.

Everything runs the real ``featx`` command line in fresh processes, timed from outside (process start-up
included), on a 2-core CPU. The parts can be run one at a time (each a few minutes; on a shared machine
run each under the CPU lock), their results accumulate in ``benchmarks/results/reliability_*.json``:

    flock /tmp/featx-cpu.lock python benchmarks/reliability.py kill --points 0:7
    flock /tmp/featx-cpu.lock python benchmarks/reliability.py kill --points 7:14
    flock /tmp/featx-cpu.lock python benchmarks/reliability.py kill --points 14:20
    flock /tmp/featx-cpu.lock python benchmarks/reliability.py damage
    flock /tmp/featx-cpu.lock python benchmarks/reliability.py badfiles
    python benchmarks/reliability.py report

``all`` runs the five parts and the report in one go.

**Kill campaign.** The dataset is the first ``--per-class`` images of each class of flowers17's train split
(``--data``; a generated ImageFolder of 256-px JPEGs when that folder is missing) plus three files that
cannot be decoded. The command is ``featx -q extract DATA --cache-dir C`` with every default. Each part runs
it uninterrupted once to warm up, once timed before its kill points and once timed after them (cold cache
folder each time; the machine drifts, so each rerun is divided by the mean of its own part's two timed runs).
Kill point ``i`` is SIGKILL at start-up + ``u_i`` x (the rest of a full run), start-up being the time until
the journal appeared in the timed run and ``u`` stratified uniform (one in each [k/20, (k+1)/20), seeded, in a
seeded order): kills during the start-up (imports, model build) cannot test the journal. The same command then
runs again (timed) and its cache is compared with the uninterrupted one bit for bit (every dataset; the
attributes that do not record times). Where each kill landed is read from what it left on disk.

**Damage campaign.** Complete caches (the kill campaign's, and three of a generated dataset at 64 px, one
of another layer) are copied and damaged in each of the ways in ``DAMAGES`` (seeded); each copy is checked by
``featx cache verify FILE`` and by loading it in a fresh process (``featx.cache.load_cache``), and the
kill-campaign cache's copies also by ``featx fit-head --train FILE``. A copy is *detected* when every command
refuses it with exit 2 and one line naming the file and the fix; *harmless* when the damage hit bytes that
no reader uses (everything reads back equal to the original); *silent* (wrong numbers) or *crash* otherwise.

**Bad files.** ``tests/test_bad_files.py`` with ``FEATX_BADFILES_COUNTS`` set (see that file's docstring):
the hostile corpus through ``featx extract``, the image-bytes fuzzers, the full-disk test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "reliability"
SEED = 13
N_POINTS = 20
FEATX = [sys.executable, "-m", "featx"]
CHUNK_RE = re.compile(r"^chunk-(\d{9})-[0-9a-f]{16}\.npz$")
COMPARED_ATTRS = ("key", "n_images", "n_failed", "feature_dim", "batch_size", "chunk_rows", "dtype", "layer", "embedder")


# --------------------------------------------------------------------------------------------------
# Shared


def machine() -> dict[str, Any]:
    import torch

    cpu, vm = "unknown CPU", ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
        vm = " VM" if " hypervisor" in info else ""
    mem = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.0f} GiB"
    gpu = "CUDA available" if torch.cuda.is_available() else "no GPU"
    return {
        "line": f"{platform.system()} {platform.machine()}{vm}, {os.cpu_count()} cores ({cpu}){mem}, {gpu}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}",
        "cores": os.cpu_count(),
        "gpu": torch.cuda.is_available(),
        "torch": torch.__version__,
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"reliability_{name}.json"
    p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return p


def load(name: str) -> dict[str, Any]:
    p = RESULTS / f"reliability_{name}.json"
    return json.loads(p.read_text()) if p.exists() else {}


def cache_digest(path: Path) -> dict[str, str]:
    """sha256 of every dataset's bytes (dtype and shape included) and of the compared attributes."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        for name in ("features", "labels", "indices", "valid", "failures/index"):
            ds = f[name]
            out[name] = hashlib.sha256(f"{ds.dtype}{ds.shape}".encode() + ds[()].tobytes()).hexdigest()
        for name in ("paths", "classes", "failures/reason"):
            out[name] = hashlib.sha256("\x1e".join(str(s) for s in f[name].asstr()[()]).encode()).hexdigest()
        for k in COMPARED_ATTRS:
            v = f.attrs[k]
            out[f"attr:{k}"] = str(v.decode() if isinstance(v, bytes) else v)
    return out


# --------------------------------------------------------------------------------------------------
# The dataset


def make_generated(root: Path, n_classes: int, per_class: int, size: int = 256, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.uniform(40, 220, 3)
        for i in range(per_class):
            yy, xx = np.mgrid[0:size, 0:size]
            img = np.tile(base, (size, size, 1)) + 40 * np.sin((xx * (c + 1) + yy * (i % 7)) / 17.0)[..., None]
            img += rng.normal(0, 12, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(d / f"{i:04d}.jpg", quality=90)


def prepare_dataset(data: Path, per_class: int) -> tuple[Path, str]:
    """``WORK/data-<n>``: a flat ImageFolder (one split, ``train``) with three undecodable files."""
    src = data / "train"
    if src.is_dir():
        source = f"{data.name} train, the first {per_class} images of each class (by name)"
    else:
        source = f"generated (no {data} here): 17 classes x {per_class} JPEGs of 256 px, seed 0"
    dst = WORK / f"data-{per_class}"
    stamp = WORK / f"data-{per_class}.source"
    if dst.is_dir() and stamp.exists() and stamp.read_text() == source:
        return dst, source
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    if src.is_dir():
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            (dst / cls.name).mkdir()
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copy2(f, dst / cls.name / f.name)
    else:
        make_generated(dst, 17, per_class)
    classes = sorted(p for p in dst.iterdir() if p.is_dir())
    (classes[0] / "zz_truncated.jpg").write_bytes((next(classes[0].glob("*.jpg"))).read_bytes()[:300])
    (classes[len(classes) // 2] / "zz_empty.jpg").write_bytes(b"")
    (classes[-1] / "zz_random.png").write_bytes(np.random.default_rng(1).bytes(2000))
    stamp.write_text(source)
    return dst, source


# --------------------------------------------------------------------------------------------------
# Kill campaign


def extract_cmd(data: Path, cache: Path) -> list[str]:
    return [*FEATX, "-q", "extract", str(data), "--cache-dir", str(cache)]


def display_cmd(data: Path) -> str:
    return f"featx -q extract {data.relative_to(ROOT) if data.is_relative_to(ROOT) else data} --cache-dir CACHE"


class OtherLoad:
    """How much of the machine other processes used while a block ran: (all busy CPU time from /proc/stat minus
    what our children used) / (wall x cores). The CPU lock keeps cooperating jobs away; this catches the rest."""

    def __enter__(self) -> OtherLoad:
        self.t0, self.busy0, self.ours0 = time.perf_counter(), _busy_seconds(), _children_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        others = (_busy_seconds() - self.busy0) - (_children_cpu() - self.ours0)
        self.share = max(0.0, others) / max(wall * (os.cpu_count() or 1), 1e-9)


def _busy_seconds() -> float:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + s.ru_utime + s.ru_stime


#: A measured run during which other processes used more than this share of the machine is flagged "contended"
#: and left out of the timing means (its cache is still compared).
CONTENDED = 0.10


def timed_run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str], float]:
    """(wall seconds, result, share of the machine other processes used meanwhile)."""
    with OtherLoad() as load:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
    return seconds, res, load.share


def full_run(data: Path, cache: Path) -> tuple[float, float, Path, float]:
    """An uninterrupted run in a cold cache folder: (wall seconds, seconds until its journal existed, cache,
    share of the machine other processes used meanwhile)."""
    shutil.rmtree(cache, ignore_errors=True)
    with OtherLoad() as load:
        t0 = time.perf_counter()
        proc = subprocess.Popen(extract_cmd(data, cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t_journal = None
        while proc.poll() is None:
            if t_journal is None and any((p / "journal.json").exists() for p in cache.glob("*.partial")):
                t_journal = time.perf_counter() - t0
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"uninterrupted run failed ({proc.returncode}): {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    [final] = cache.glob("*.h5")
    return seconds, t_journal or seconds, final, load.share


def what_is_left(cache: Path, stem: str, n_chunks: int) -> tuple[str, int]:
    """(where the kill landed, chunk files in the journal)."""
    final, partial, tmp = cache / f"{stem}.h5", cache / f"{stem}.partial", cache / f"{stem}.h5.tmp"
    chunks = sum(1 for n in os.listdir(partial) if CHUNK_RE.match(n)) if partial.is_dir() else 0
    if final.exists():
        return ("after the rename, before the clean-up" if partial.exists() else "after completion"), chunks
    if tmp.exists():
        return "during assembly", chunks
    if not partial.exists():
        return "before the journal (start-up, model build)", 0
    if not (partial / "journal.json").exists():
        return "while creating the journal", chunks
    return ("during extraction" if chunks < n_chunks else "after the last chunk, before assembly"), chunks


def differing_rows(a: Path, b: Path) -> list[int]:
    import h5py

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        x, y = fa["features"][()], fb["features"][()]
    return np.flatnonzero((x != y).any(axis=1)).tolist() if x.shape == y.shape else [-1]


def kill_fractions() -> list[float]:
    """Stratified uniform kill times: one in each [k/N, (k+1)/N), in a seeded random order (so that every part
    gets early and late kills alike)."""
    rng = np.random.default_rng(SEED)
    u = (np.arange(N_POINTS) + rng.uniform(0.0, 1.0, N_POINTS)) / N_POINTS
    return [float(x) for x in u[rng.permutation(N_POINTS)]]


def cmd_kill(args: argparse.Namespace) -> None:
    data, source = prepare_dataset(Path(args.data), args.per_class)
    lo, hi = (int(x) for x in args.points.split(":"))
    fractions = kill_fractions()
    work = WORK / "kill"
    work.mkdir(parents=True, exist_ok=True)
    stored = load("kill")
    if stored and stored.get("dataset", {}).get("path") != str(data):
        stored = {}  # another dataset: start over
    fulls, startups, loads = [], [], []
    _, _, final, _ = full_run(data, work / "full")  # warm-up: page cache, .pyc files; its time is not used
    digest = cache_digest(final)

    def timed_full_run() -> None:
        """One timed uninterrupted run, recorded; its cache must equal the warm-up's."""
        seconds, startup, cache_file, other = full_run(data, work / "full")
        fulls.append(seconds)
        startups.append(startup)
        loads.append(other)
        if cache_digest(cache_file) != digest:
            sys.exit("two uninterrupted runs differ: extraction is not deterministic here")

    timed_full_run()
    import h5py

    with h5py.File(final, "r") as f:
        n_rows, chunk = int(f.attrs["n_images"]), int(f.attrs["chunk_rows"])
        n_failed = int(f.attrs["n_failed"])
    n_chunks = -(-n_rows // chunk)
    stem = final.stem
    points = dict(stored.get("points", {}))
    for i in range(lo, min(hi, N_POINTS)):
        cache = work / f"point-{i}"
        shutil.rmtree(cache, ignore_errors=True)
        at = startups[0] + fractions[i] * (fulls[0] - startups[0])  # during the extraction proper
        proc = subprocess.Popen(extract_cmd(data, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        where, chunks = what_is_left(cache, stem, n_chunks)
        rerun_s, res, other = timed_run(extract_cmd(data, cache))
        summary = res.stdout.splitlines()[0] if res.stdout else ""
        m = re.search(r"resumed at (\d+) of (\d+) images", summary)
        resumed_at = int(m.group(1)) if m else (n_rows if "cache hit" in summary else 0)
        identical = res.returncode == 0 and (cache / final.name).exists() and cache_digest(cache / final.name) == digest
        leftovers = sorted(n for n in os.listdir(cache) if n not in (".locks", final.name)) if cache.is_dir() else []
        points[str(i)] = {
            "u": round(fractions[i], 4),
            "kill_after_s": round(at, 2),
            "killed": rc == -signal.SIGKILL,
            "landed": where,
            "chunks_on_disk": chunks,
            "rerun_exit": res.returncode,
            "rerun_summary": summary,
            "resumed_at": resumed_at,
            "rerun_s": round(rerun_s, 2),
            "other_load": round(other, 3),
            "identical": bool(identical),
            "leftovers": leftovers,
            "part": args.points,
            "stderr": res.stderr.strip()[-300:],
        }
        if not identical and (cache / final.name).exists():  # keep it, and say which rows differ
            points[str(i)]["differing_rows"] = differing_rows(cache / final.name, final)
            shutil.copytree(cache, work / f"mismatch-{i}", dirs_exist_ok=True)
        print(
            f"point {i:2d}: u={fractions[i]:.2f} {where:32s} resumed_at={resumed_at:4d} rerun {rerun_s:5.1f} s "
            f"others {other:.0%} same={identical}"
        )
        shutil.rmtree(cache, ignore_errors=True)
    timed_full_run()
    parts = dict(stored.get("parts", {}))
    parts[args.points] = {
        "full_runs_s": [round(s, 2) for s in fulls],
        "startup_s": [round(s, 2) for s in startups],  # process start until the journal exists (imports, model build)
        "other_load": [round(x, 3) for x in loads],
        "date": now(),
        "reference_digest": digest,
    }
    out = {
        "command": display_cmd(data),
        "dataset": {"path": str(data), "source": source, "n_images": n_rows, "n_failed": n_failed},
        "chunk_rows": chunk,
        "n_chunks": n_chunks,
        "seed": SEED,
        "points": points,
        "parts": parts,
        "machine": machine(),
    }
    print(f"full runs {fulls} s (others {loads}) -> {save('kill', out)}")


# --------------------------------------------------------------------------------------------------
# Damage campaign


def _h5_extent(path: Path, name: str, chunk: str = "middle") -> tuple[int, int]:
    import h5py

    with h5py.File(path, "r") as f:
        dsid = f[name].id
        n = dsid.get_num_chunks()
        info = dsid.get_chunk_info(n // 2 if chunk == "middle" else 0)
        return int(info.byte_offset), int(info.size)


def _xor(path: Path, offset: int, n: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _h5_edit(fn: Any) -> Any:
    def damage(p: Path, rng: np.random.Generator) -> None:
        import h5py

        with h5py.File(p, "r+") as f:
            fn(f)

    return damage


def _in_dataset(name: str, n: int = 16) -> Any:
    def damage(p: Path, rng: np.random.Generator) -> None:
        off, size = _h5_extent(p, name)
        at = off + int(rng.integers(0, max(1, size - n)))
        _xor(p, at, min(n, size))

    return damage


def _mid_features(p: Path, rng: np.random.Generator) -> None:
    off, size = _h5_extent(p, "features")
    _xor(p, off + size // 2 - 8, 16)


class NotApplicable(Exception):
    """This kind of damage has nothing to hit in this cache (e.g. no zeros in its features)."""


def _zeros(name: str, n_bytes: int) -> Any:
    """Invert ``n_bytes`` (2-aligned) that are all zero in dataset ``name``: HDF5's fletcher32 sums 16-bit words
    modulo 65535, where 0x0000 and 0xFFFF are equal, so this is the damage it cannot see."""

    def damage(p: Path, rng: np.random.Generator) -> None:
        import h5py

        with h5py.File(p, "r") as f:
            ds = f[name]
            raw = np.ascontiguousarray(ds[()]).view(np.uint8).reshape(ds.shape[0], -1)
            row_bytes = raw.shape[1]
            chunk_rows = ds.chunks[0]
            flat = raw.reshape(-1)
            words = flat[: len(flat) // 2 * 2].reshape(-1, 2).any(axis=1)  # True where a 16-bit word is not zero
            k = n_bytes // 2
            runs = np.flatnonzero(np.convolve(~words, np.ones(k, dtype=int), "valid") == k)  # first word of k zero words
            if len(runs) == 0:
                raise NotApplicable(f"no {n_bytes} zero bytes in {name}")
            at = int(runs[rng.integers(0, len(runs))]) * 2
            row, col = divmod(at, row_bytes)
            info = ds.id.get_chunk_info_by_coord((row // chunk_rows * chunk_rows,) + (0,) * (ds.ndim - 1))
            offset = info.byte_offset + (row % chunk_rows) * row_bytes + col
        _xor(p, offset, n_bytes)

    return damage


#: kind -> (what it does, damage(path, rng), repeats per cache)
DAMAGES: dict[str, tuple[str, Any, int]] = {
    "features-mid-16": ("16 bytes inverted in the middle of the features data", _mid_features, 1),
    "features-random-16": ("16 bytes inverted at a random place in a features chunk", _in_dataset("features"), 3),
    "features-zeros-16": ("16 zero bytes inverted in the features data (fletcher32's blind spot)", _zeros("features", 16), 2),
    "labels-16": ("16 bytes inverted in the labels data", _in_dataset("labels"), 1),
    "labels-zeros-6": ("6 zero bytes (3 words) of the labels inverted", _zeros("labels", 6), 1),
    "indices-16": ("16 bytes inverted in the indices data", _in_dataset("indices"), 1),
    "valid-8": ("8 bytes inverted in the valid mask", _in_dataset("valid", 8), 1),
    "random-64-anywhere": (
        "64 random bytes written at a random offset of the file",
        lambda p, rng: _overwrite(p, int(rng.integers(0, p.stat().st_size - 64)), rng.bytes(64)),
        4,
    ),
    "bit-anywhere": (
        "one random bit flipped anywhere in the file",
        lambda p, rng: _xor_bit(p, int(rng.integers(0, p.stat().st_size)), int(rng.integers(0, 8))),
        4,
    ),
    "all-random": ("the whole file replaced by random bytes", lambda p, rng: p.write_bytes(rng.bytes(p.stat().st_size)), 1),
    "truncated-random": (
        "truncated at a random length",
        lambda p, rng: os.truncate(p, int(rng.integers(0, p.stat().st_size))),
        3,
    ),
    "truncated-1": ("last byte cut off", lambda p, rng: os.truncate(p, p.stat().st_size - 1), 1),
    "empty": ("emptied (0 bytes)", lambda p, rng: os.truncate(p, 0), 1),
    "attr-n_images": ("attribute n_images changed with h5py", _h5_edit(lambda f: f.attrs.__setitem__("n_images", 3)), 1),
    "attr-embedder": (
        "attribute embedder (JSON) edited with h5py: another image size",
        _h5_edit(lambda f: f.attrs.__setitem__("embedder", f.attrs["embedder"].replace('"image_size": ', '"image_size": 1'))),
        1,
    ),
    "attr-deleted": (
        "attribute dataset_fingerprint deleted with h5py",
        _h5_edit(lambda f: f.attrs.__delitem__("dataset_fingerprint")),
        1,
    ),
    "path-edited": ("one path changed with h5py", _h5_edit(lambda f: f["paths"].__setitem__(0, "elsewhere/x.jpg")), 1),
    "class-edited": ("one class name changed with h5py", _h5_edit(lambda f: f["classes"].__setitem__(0, "renamed")), 1),
}
#: Edits through HDF5 itself rewrite the fletcher32 checksum; nothing but a content digest of the numbers could
#: see them. Measured and reported apart from damage.
EDITS: dict[str, tuple[str, Any, int]] = {
    "features-edited": ("one feature value changed with h5py", _h5_edit(lambda f: f["features"].__setitem__((0, 0), 123.0)), 1),
    "labels-edited": ("one label changed with h5py", _h5_edit(lambda f: f["labels"].__setitem__(0, (f["labels"][0] + 1) % 2)), 1),
}


def _xor_bit(path: Path, offset: int, bit: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ (1 << bit)]))


LOAD_PROBE = r"""
import hashlib, json, sys
from featx.cache import load_cache
from featx.errors import CacheError
try:
    fs = load_cache(sys.argv[1])
except CacheError as exc:
    print(json.dumps({"error": str(exc)})); sys.exit(2)
h = hashlib.sha256()
for a in (fs.features, fs.labels, fs.indices, fs.split_labels):
    h.update(a.tobytes())
h.update("\x1e".join(fs.paths + fs.classes).encode())
attrs = {k: v for k, v in fs.attrs.items()}
print(json.dumps({"sha": h.hexdigest(), "attrs": json.dumps(attrs, sort_keys=True, default=str)}))
"""


def _one_line(text: str, path: Path) -> bool:
    lines = text.strip().splitlines()
    return len(lines) == 1 and str(path) in lines[0] and "featx cache rm" in lines[0]


def check_damaged(path: Path, original: dict[str, Any], fit_head: bool) -> dict[str, Any]:
    """Run the readers on one damaged copy; classify the outcome."""
    res_v = subprocess.run([*FEATX, "cache", "verify", str(path)], capture_output=True, text=True, check=False)
    res_l = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(path)], capture_output=True, text=True, check=False)
    runs = {"verify": res_v, "load": res_l}
    if fit_head:
        out = path.parent / "heads"
        runs["fit-head"] = subprocess.run(
            [*FEATX, "-q", "fit-head", "--train", str(path), "--n-jobs", "1", "--out-dir", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
    codes = {k: r.returncode for k, r in runs.items()}
    row: dict[str, Any] = {"exit": codes}
    if any(c not in (0, 2) for c in codes.values()) or any("Traceback" in r.stderr for r in runs.values()):
        row["outcome"] = "crash"
        row["detail"] = {k: r.stderr.strip()[-300:] for k, r in runs.items() if r.returncode not in (0, 2)}
        return row
    if all(c == 2 for c in codes.values()):
        verify_ok = res_v.stdout.startswith("DAMAGED  ") and _one_line(res_v.stdout, path) and res_v.stderr.count("\n") == 1
        load_ok = _one_line(json.loads(res_l.stdout)["error"], path)
        fit_ok = "fit-head" not in runs or (_one_line(runs["fit-head"].stderr, path) and not (path.parent / "heads").exists())
        row["outcome"] = "detected" if verify_ok and load_ok and fit_ok else "detected, message not one line"
        row["message"] = res_v.stdout.strip().split(": ", 1)[-1][:200]
        return row
    same = res_l.returncode == 0 and json.loads(res_l.stdout) == original
    if all(c == 0 for c in codes.values()) and same:
        row["outcome"] = "harmless"
    elif res_l.returncode == 0 and not same:
        row["outcome"] = "silent"  # wrong numbers or attributes read back without an error
    else:
        row["outcome"] = "inconsistent"  # one reader refused, another accepted
        row["detail"] = {k: (r.stdout + r.stderr).strip()[-300:] for k, r in runs.items()}
    return row


def damage_caches(kill_cache: Path | None) -> list[tuple[str, Path, bool]]:
    """(label, complete cache, run fit-head on it) for the campaign."""
    caches: list[tuple[str, Path, bool]] = []
    if kill_cache is not None:
        caches.append(("kill-campaign cache (default options)", kill_cache, True))
    gen = WORK / "damage-data"
    if not gen.is_dir():
        for split, per_class in (("train", 150), ("val", 20), ("test", 3)):
            make_generated(gen / split, 2, per_class, size=96, seed=len(split))
    cdir = WORK / "damage-caches"
    for extra in ([], ["--layer", "blocks.3", "--splits", "val"]):
        cmd = [*FEATX, "-q", "extract", str(gen), "--image-size", "64", "--cache-dir", str(cdir), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.exit(f"extract for the damage campaign failed: {res.stderr[-1000:]}")
    for p in sorted(cdir.glob("*.h5")):
        caches.append((p.name.split("-")[1] + ("" if "-pooled-" in p.name else " (layer blocks.3)"), p, False))
    return caches


def cmd_damage(args: argparse.Namespace) -> None:
    kill = load("kill")
    kill_cache = next((WORK / "kill" / "full").glob("*.h5"), None) if kill else None
    if kill_cache is None:
        data, _ = prepare_dataset(Path(args.data), args.per_class)
        _, _, kill_cache, _ = full_run(data, WORK / "kill" / "full")
    rng = np.random.default_rng(SEED)
    rows = []
    skipped = []
    work = WORK / "damage"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # The kill-campaign cache once more as the code before this fix wrote it: without /features_crc32 and
    # arrays_sha256 (fletcher32 and the attribute/table digests only), to count what that code would have missed.
    old_format = work / "old-format" / kill_cache.name
    old_format.parent.mkdir()
    shutil.copy2(kill_cache, old_format)
    strip_row_checksums(old_format)
    targets = [(label, cache, fit, ("damage", "edit")) for label, cache, fit in damage_caches(kill_cache)]
    targets.append(("kill-campaign cache without row checksums (the code before the fix)", old_format, False, ("old-format",)))
    for label, cache, fit, groups in targets:
        probe = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(cache)], capture_output=True, text=True, check=True)
        original = json.loads(probe.stdout)
        for group in groups:
            for kind, (what, fn, repeats) in (EDITS if group == "edit" else DAMAGES).items():
                for r in range(repeats):
                    d = work / f"{len(rows) + len(skipped):04d}"
                    d.mkdir(parents=True)
                    copy = d / cache.name
                    shutil.copy2(cache, copy)
                    try:
                        fn(copy, rng)
                    except NotApplicable as exc:
                        skipped.append({"group": group, "kind": kind, "cache": label, "why": str(exc)})
                        shutil.rmtree(d)
                        continue
                    row = {"group": group, "kind": kind, "what": what, "cache": label, "repeat": r}
                    row.update(check_damaged(copy, original, fit and r == 0))
                    rows.append(row)
                    print(f"{label[:30]:30s} {group:10s} {kind:20s} {row['outcome']}")
                    shutil.rmtree(d)
    save("damage", {"rows": rows, "not_applicable": skipped, "date": now(), "machine": machine(), "seed": SEED})


def strip_row_checksums(path: Path) -> None:
    """Make ``path`` look like a cache written before /features_crc32 and arrays_sha256 existed."""
    import h5py

    from featx.cache import _attrs_digest

    with h5py.File(path, "r+") as f:
        del f["features_crc32"]
        del f.attrs["arrays_sha256"]
        f.attrs["attrs_sha256"] = _attrs_digest(dict(f.attrs.items()))


# --------------------------------------------------------------------------------------------------
# Bad files


def cmd_badfiles(args: argparse.Namespace) -> None:
    target = WORK / "badfiles_counts.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    tests = [
        "tests/test_bad_files.py::test_extract_records_every_bad_file_once_and_strict_fails",
        "tests/test_bad_files.py::test_fuzzed_image_bytes_never_raise_and_always_give_a_reason",
        "tests/test_bad_files.py::test_fuzzed_image_bytes_long_run",
        "tests/test_bad_files.py::test_full_disk_is_one_line_error_and_the_next_run_resumes",
    ]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *tests]
    t0 = time.perf_counter()
    res = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, check=False, env={**os.environ, "FEATX_BADFILES_COUNTS": str(target)}
    )
    seconds = time.perf_counter() - t0
    tail = res.stdout.strip().splitlines()
    counts = json.loads(target.read_text()) if target.exists() else {}
    save(
        "badfiles",
        {
            "command": "FEATX_BADFILES_COUNTS=counts.json pytest -q " + " ".join(t.split("::")[-1] for t in tests),
            "pytest_exit": res.returncode,
            "pytest_summary": tail[-1] if tail else "",
            "skipped": [line for line in tail if line.startswith("SKIPPED")],
            "seconds": round(seconds, 1),
            "counts": counts,
            "date": now(),
        },
    )
    print(tail[-1] if tail else res.stderr[-1000:])


# --------------------------------------------------------------------------------------------------
# Report


def _table(rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(str(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def cmd_report(args: argparse.Namespace) -> None:
    kill, damage, bad = load("kill"), load("damage"), load("badfiles")
    summary: dict[str, Any] = {"date": now()}
    md = [
        "# Reliability: interrupted runs, damaged caches, bad files (issue 13), hostile users (issue 20)",
        "",
        "Produced by `benchmarks/reliability.py` (see its docstring); every command is the real `featx` CLI in a",
        "fresh process, timed from outside. Raw numbers: [reliability.json](reliability.json) and",
        "`reliability_{kill,damage,badfiles}.json`.",
        "",
    ]
    if kill:
        md += ["Machine: " + kill["machine"]["line"] + ".", ""]
    md += [
        "```bash",
        "flock /tmp/featx-cpu.lock python benchmarks/reliability.py kill --points 0:7   # and 7:14, 14:20",
        "flock /tmp/featx-cpu.lock python benchmarks/reliability.py damage",
        "flock /tmp/featx-cpu.lock python benchmarks/reliability.py badfiles",
        "python benchmarks/reliability.py report",
        "```",
        "",
    ]
    if kill:
        pts = [kill["points"][k] for k in sorted(kill["points"], key=int)]
        full, start = {}, {}
        for part, v in kill["parts"].items():  # the part's timed uninterrupted runs that nobody else disturbed
            ok = [j for j, x in enumerate(v.get("other_load", [1.0] * len(v["full_runs_s"]))) if x <= CONTENDED]
            ok = ok or list(range(len(v["full_runs_s"])))
            full[part] = float(np.mean([v["full_runs_s"][j] for j in ok]))
            start[part] = float(np.mean([v["startup_s"][j] for j in ok]))
        n = kill["dataset"]["n_images"]
        every = pts
        pts = [p for p in every if p.get("other_load", 1.0) <= CONTENDED]  # timing means: undisturbed reruns only
        for p in pts:
            p["fraction"] = p["rerun_s"] / full[p["part"]]
            p["left"] = (n - p["resumed_at"]) / n
            # the rerun's time after start-up, as a share of a full run's time after start-up
            p["work"] = (p["rerun_s"] - start[p["part"]]) / (full[p["part"]] - start[p["part"]])
        ident = sum(p["identical"] for p in every)
        for p in every:  # rows the rerun computed, from its summary ("..., 11.3 s (28.3 img/s)": img/s = computed / s)
            m = re.search(r", ([0-9.]+) s \(([0-9.]+) img/s\)", p["rerun_summary"])
            p["computed"] = round(float(m.group(1)) * float(m.group(2))) if m else 0
        # computed == rows left, to the summary's rounding (0.1 s, 0.1 img/s)
        consistent = sum(abs(p["computed"] - (n - p["resumed_at"])) <= max(2, 0.01 * n) for p in every)
        mean_frac = float(np.mean([p["fraction"] for p in pts]))
        mean_left = float(np.mean([p["left"] for p in pts]))
        mid = [p for p in pts if p["landed"] == "during extraction"]
        mean_work_mid = float(np.mean([p["work"] for p in mid])) if mid else float("nan")
        mean_left_mid = float(np.mean([p["left"] for p in mid])) if mid else float("nan")
        all_full = [s for v in kill["parts"].values() for s in v["full_runs_s"]]
        share = float(np.mean([start[k] / full[k] for k in full]))  # start-up share of a full run
        uniform = share + (1 - share) * mean_frac  # a kill uniform over the whole run: in start-up the rerun is a full run
        refs = {json.dumps(v.get("reference_digest"), sort_keys=True) for v in kill["parts"].values()}
        landed: dict[str, int] = {}
        for p in every:
            landed[p["landed"]] = landed.get(p["landed"], 0) + 1
        summary["kill"] = {
            "points_tried": len(every),
            "points_timed": len(pts),
            "identical": ident,
            "mean_rerun_fraction": round(mean_frac, 3),
            "mean_rows_left_fraction": round(mean_left, 3),
            "mid_extraction_points": len(mid),
            "mean_rerun_work_fraction_mid_extraction": round(mean_work_mid, 3),
            "mean_rows_left_fraction_mid_extraction": round(mean_left_mid, 3),
            "startup_share_of_full_run": round(share, 3),
            "derived_mean_rerun_fraction_if_kills_uniform_over_whole_run": round(uniform, 3),
            "full_run_s": [min(all_full), max(all_full)],
            "landed": landed,
            "leftover_files": sum(bool(p["leftovers"]) for p in every),
            "reruns_computing_exactly_the_rows_left": consistent,
            "uninterrupted_runs_identical_across_parts": len(refs) == 1,
        }
        all_start = [s for v in kill["parts"].values() for s in v["startup_s"]]
        md += [
            "## Kill and resume",
            "",
            f"Dataset: {kill['dataset']['source']}, plus 3 files that cannot be decoded: {n} images, "
            f"{kill['dataset']['n_failed']} failures, journal chunks of {kill['chunk_rows']} rows ({kill['n_chunks']} chunks). "
            f"Command: `{kill['command']}` (all defaults: 224 px, batch 16, EfficientNet-Lite0). An uninterrupted run took "
            f"{min(all_full):.1f}-{max(all_full):.1f} s, of which {min(all_start):.1f}-{max(all_start):.1f} s before its "
            "journal existed (Python and library imports, most of it torch and timm, see bench_extract.md, and the model build). "
            "Each part timed two uninterrupted runs (cold cache folder) and divides its reruns by their mean. Kill point "
            "*i* is SIGKILL at start-up + u_i x (the rest of a full run), u stratified uniform (one in each "
            f"1/{len(every)}, seed {kill['seed']}, seeded order); then the same command runs again. Timing means use only "
            f"runs during which other processes used at most {CONTENDED:.0%} of the machine (measured from /proc/stat; the "
            "machine is shared); every point's cache is compared.",
            "",
            _table(
                [
                    ["kill points tried", "resumed caches bit-identical", "mean rerun time / full run", "mean rows left"],
                    [len(every), f"{ident} / {len(every)}", f"{mean_frac:.2f} ({len(pts)} timed)", f"{mean_left:.2f}"],
                ]
            ),
            "",
            "Where the kills landed: " + ", ".join(f"{k} {v}" for k, v in sorted(landed.items(), key=lambda kv: -kv[1])) + ".",
            f"For the {len(mid)} kills during extraction, the rerun's time after start-up was {mean_work_mid:.2f} of a full "
            f"run's (mean), with {mean_left_mid:.2f} of the rows left to compute (its summary: `resumed at N of {n} images`): "
            "a rerun does the remaining work and the fixed start-up, nothing else. The start-up is "
            f"{share:.0%} of a full run here, and a kill during it leaves nothing to resume; for kills spread uniformly "
            f"over the whole run the mean rerun fraction would be {share:.2f} + {1 - share:.2f} x {mean_frac:.2f} = "
            f"{uniform:.2f} (derived, not measured). The old code measured 0.9. In {consistent} of {len(every)} reruns "
            "the rows computed (img/s x s in the summary) equal the rows left. Reruns left no stray files in "
            f"{len(every) - summary['kill']['leftover_files']} of {len(every)} cases. The {len(all_full)} timed uninterrupted "
            "runs were "
            + ("all bit-identical." if len(refs) == 1 else "**not** all identical across parts (code changed between them?)."),
            "",
            _table(
                [["i", "u", "kill at s", "landed", "chunks", "rerun summary", "computed", "rerun s", "/ full", "others", "same"]]
                + [
                    [
                        k,
                        f"{p['u']:.2f}",
                        f"{p['kill_after_s']:.1f}",
                        p["landed"],
                        p["chunks_on_disk"],
                        p["rerun_summary"].split(" -> ")[0].replace("|", "/"),
                        p["computed"],
                        f"{p['rerun_s']:.1f}",
                        f"{p['rerun_s'] / full[p['part']]:.2f}",
                        f"{p['other_load']:.0%}" if "other_load" in p else "?",
                        "yes" if p["identical"] else "**no**",
                    ]
                    for k, p in zip(sorted(kill["points"], key=int), every)
                ]
            ),
            "",
        ]
    if damage:
        rows = damage["rows"]
        dmg = [r for r in rows if r["group"] == "damage"]
        edits = [r for r in rows if r["group"] == "edit"]
        old = [r for r in rows if r["group"] == "old-format"]
        kinds = ("detected", "harmless", "silent", "crash")

        def count(rs: list[dict[str, Any]]) -> dict[str, int]:
            c = {o: sum(r["outcome"] == o for r in rs) for o in kinds}
            return {**c, "other": len(rs) - sum(c.values())}

        outcome, before = count(dmg), count(old)
        n_caches = len({r["cache"] for r in dmg})
        summary["damage"] = {
            "tried": len(dmg),
            **outcome,
            "caches": n_caches,
            "kinds": len({r["kind"] for r in dmg}),
            "not_applicable": len(damage.get("not_applicable", [])),
            "edits_tried": len(edits),
            "edits_detected": sum(r["outcome"] == "detected" for r in edits),
            "without_row_checksums": {"tried": len(old), **before},
        }

        def by_kind(kind: str, rs: list[dict[str, Any]], o: str) -> int:
            return sum(r["kind"] == kind and r["outcome"] == o for r in rs)

        md += [
            "## Damaged caches",
            "",
            f"{len({r['kind'] for r in dmg})} kinds of damage x {n_caches} complete caches (the kill campaign's, and a "
            "generated dataset's train/val/test caches at 64 px plus one of layer blocks.3), seeded (seed "
            f"{damage['seed']}), some kinds repeated at other random places; {summary['damage']['not_applicable']} "
            "combinations had nothing to hit (no zeros in that cache) and are not counted. Each copy: `featx cache verify "
            "FILE`, `load_cache` in a fresh process, and for the kill-campaign cache `featx fit-head --train FILE`. "
            "Detected = every command exits 2 with one line naming the file and `featx cache rm KEY`; harmless = the bytes "
            "hit were unused (e.g. the padding of the last HDF5 chunk) and everything reads back equal to the original; "
            "silent = other numbers read back without an error.",
            "",
            _table(
                [
                    ["caches", "damaged copies tried", "detected", "harmless (unused bytes)", "silent", "crashes", "other"],
                    ["as written now", len(dmg), *(outcome[k] for k in (*kinds, "other"))],
                    ["the kill cache without row checksums (before the fix)", len(old), *(before[k] for k in (*kinds, "other"))],
                ]
            ),
            "",
            "HDF5's fletcher32 adds 16-bit words modulo 65535, where 0x0000 and 0xFFFF are the same number: inverted "
            "zero bytes pass it and read back as NaN (features) or as a huge label. Zeros are common in these files (ReLU "
            "features, the rows of undecodable images, the high bytes of small labels). The fix (featx/cache.py) stores "
            "each feature row's crc32 in `/features_crc32`, checked on every read, and `arrays_sha256` over labels, "
            "indices, valid and those crcs; the second row above is the same damage on a copy stripped of both, i.e. "
            "what the code before the fix saw.",
            "",
            _table(
                [["kind", "what", "tried", "detected", "harmless", "silent", "before the fix: silent", "example message"]]
                + [
                    [
                        kind,
                        what,
                        sum(r["kind"] == kind for r in dmg),
                        by_kind(kind, dmg, "detected"),
                        by_kind(kind, dmg, "harmless"),
                        by_kind(kind, dmg, "silent"),
                        f"{by_kind(kind, old, 'silent')} of {sum(r['kind'] == kind for r in old)}",
                        re.sub(
                            r"\S*/damage/\d{4}/",
                            "",
                            next((r.get("message", "") for r in dmg if r["kind"] == kind and r.get("message")), ""),
                        ).replace("|", "/")[:170],
                    ]
                    for kind, (what, _, _) in DAMAGES.items()
                ]
            ),
            "",
            f"Deliberate edits with h5py (HDF5 recomputes fletcher32 on write; {', '.join(EDITS)}): {len(edits)} tried, "
            f"{summary['damage']['edits_detected']} detected, by the row crc32 and `arrays_sha256` (someone who also "
            "rewrites those is not stopped: these are checksums against damage, not signatures).",
            "",
        ]
    if bad:
        c = bad["counts"]
        corpus = c.get("corpus", {})
        fuzz = [c.get(k, {}) for k in ("fuzz", "fuzz_long")]
        n_fuzz = sum(int(f.get("examples", 0)) for f in fuzz)
        summary["bad_files"] = {
            "bad_inputs": corpus.get("bad_inputs"),
            "records_lost": corpus.get("records_lost"),
            "good_files_without_features": corpus.get("good_files_without_features"),
            "fuzzed_inputs": n_fuzz,
            "crashes": 0 if bad["pytest_exit"] == 0 else "see pytest",
            "pytest": bad["pytest_summary"],
        }
        md += [
            "## Bad input files",
            "",
            f"`{bad['command']}` ({bad['seconds']:.0f} s): {bad['pytest_summary']}"
            + (f"; skipped: {'; '.join(bad['skipped'])}" if bad["skipped"] else "")
            + ". The corpus (tests/test_bad_files.py `build_corpus`) holds dangling symlinks, non-UTF-8 names, folders and "
            "FIFOs named like images, unreadable files, truncations, random bytes, empty files, a decompression bomb, an "
            "image over the pixel cap, next to valid images in odd modes; the fuzzers feed random and mutated image bytes "
            "through the DataLoader's reader. A crash would fail the test run.",
            "",
            _table(
                [
                    [
                        "bad inputs tried",
                        "crashes",
                        "records lost",
                        "good files without features",
                        "fuzzed image inputs",
                        "fuzz crashes",
                    ],
                    [
                        corpus.get("bad_inputs", "-"),
                        0 if bad["pytest_exit"] == 0 else "see pytest",
                        corpus.get("records_lost", "-"),
                        corpus.get("good_files_without_features", "-"),
                        n_fuzz,
                        0 if bad["pytest_exit"] == 0 else "see pytest",
                    ],
                ]
            ),
            "",
            "Full disk (48 KiB tmpfs in a private mount namespace): "
            + ("passed" if "passed" in bad["pytest_summary"] and not bad["skipped"] else "see the summary above")
            + " — `featx: error: no space left on device writing <file> (the finished chunks are kept ...)`, exit 2, "
            "and the same command resumes once there is space.",
            "",
        ]
    hostile = load("hostile")
    if hostile:  # benchmarks/hostile.py (issue 20)
        sys.path.insert(0, str(Path(__file__).parent))
        from hostile import render

        md += render(hostile)
        summary["hostile"] = {"cases": len(hostile["cases"]), "as_intended": sum(r["ok"] for r in hostile["cases"])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.md").write_text("\n".join(md))
    (RESULTS / "reliability.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    for name in ("kill", "damage", "badfiles", "report", "all"):
        p = sub.add_parser(name)
        p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flowers17"), help="ImageFolder with train/")
        p.add_argument("--per-class", type=int, default=60, help="images per class taken from it (default 60: all 1020)")
        p.add_argument("--points", default=f"0:{N_POINTS}", help=f"kill points to run, lo:hi of 0..{N_POINTS - 1}")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(['python', 'benchmarks/reliability.py', *sys.argv[1:]])}")
    if args.part in ("kill", "all"):
        cmd_kill(args)
    if args.part in ("damage", "all"):
        cmd_damage(args)
    if args.part in ("badfiles", "all"):
        cmd_badfiles(args)
    if args.part in ("report", "all"):
        cmd_report(args)


if __name__ == "__main__":
    main()
