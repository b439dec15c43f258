"""The cache journal under fault injection (issue 13, items 1 and 3).

``featx extract`` runs in a fresh process and is killed (SIGKILL, SIGINT, SIGTERM) at seeded points after it
has started its journal; the same command then has to finish with a cache bit-identical to an uninterrupted
run (features, labels, indices, valid mask, paths, failures), computing only the rows the journal lacks.
Partials that do not fit (other settings, damaged or truncated chunks, a broken journal.json) are discarded
with a warning and rebuilt; ``--force`` never harms the old cache; damaged complete caches are refused by
``fit-head`` and ``cache verify`` with one line that names the file and the fix (exit 2).

How "only the remaining rows" is shown (no timing): after the kill, every image whose row is in a finished
chunk is overwritten with zeros of the same size and modification time (the dataset fingerprint, made from
sizes and mtimes, does not change). A resumed run that read any of them again would record it as a failure
and its cache would differ from the uninterrupted one. The images are restored afterwards.

The kill points are seeded: "after k chunk files exist, plus d seconds", with d drawn up to about one chunk's
compute time (measured in the uninterrupted run, used only to place the kills). Where a kill lands (before
the journal, after k chunks, during assembly, after completion) is recorded; each is a valid case. What is
killed is always a fresh ``python -m featx extract`` process; the uninterrupted run and most reruns call
``featx.cli.main`` in this process instead (the same command; a fresh process costs ~8 s of imports on 2 cores),
the slow tests rerun in fresh processes too. ``benchmarks/reliability.py`` repeats the kill campaign on real
images with fresh processes throughout and times it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.cli import main

from .conftest import make_imagefolder

# 3 classes x 60 generated images + 2 that cannot be decoded = 182 rows; batch 4 -> journal chunks of 32 rows
# (CHUNK_MIN_ROWS), so 6 chunks, the last one of 22 rows. The failures fall in chunks 1 and 5.
N_PER_CLASS = 60
BATCH = 4
CHUNK_ROWS = 32
OPTS = ["--image-size", "48", "--batch-size", str(BATCH), "--num-workers", "0"]
CHUNK_RE = re.compile(r"^chunk-(\d{9})-[0-9a-f]{16}\.npz$")
COMPARED_ATTRS = (
    "key",
    "n_images",
    "n_failed",
    "feature_dim",
    "batch_size",
    "chunk_rows",
    "dtype",
    "layer",
    "dataset_fingerprint",
    "embedder",
    "channels_last",
)


# --------------------------------------------------------------------------------------------------
# Helpers


def featx_cmd(data: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "featx", "extract", str(data), *OPTS, "--cache-dir", str(cache), *extra]


def run_featx(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "featx", *args], capture_output=True, text=True, timeout=timeout, check=False)


def cache_arrays(path: Path) -> dict[str, bytes | list[str]]:
    """Every dataset of a cache file, as raw bytes (bit-for-bit comparison) or strings, plus the attrs that
    must agree between an interrupted and an uninterrupted run (times and dates are left out)."""
    out: dict[str, bytes | list[str]] = {}
    with h5py.File(path, "r") as f:
        for name in ("features", "labels", "indices", "valid", "failures/index"):
            ds = f[name]
            out[name] = f"{ds.dtype}{ds.shape}".encode() + ds[()].tobytes()
        for name in ("paths", "classes", "failures/reason"):
            out[name] = [str(s) for s in f[name].asstr()[()]]
        for k in COMPARED_ATTRS:
            v = f.attrs[k]
            out[f"attr:{k}"] = [str(v.decode() if isinstance(v, bytes) else v)]
    return out


def assert_same_cache(got: Path, want: dict[str, bytes | list[str]], context: str = "") -> None:
    have = cache_arrays(got)
    diff = [k for k in want if have.get(k) != want[k]]
    detail = ""
    if "features" in diff and len(have["features"]) == len(want["features"]):
        head = len(b"float32(182, 1280)")
        a = np.frombuffer(have["features"][head:], np.float32).reshape(182, -1)
        b = np.frombuffer(want["features"][head:], np.float32).reshape(182, -1)
        rows = np.flatnonzero((a != b).any(axis=1))
        chunks = sorted({int(r) // CHUNK_ROWS for r in rows})
        detail = f": rows {rows.tolist()} (chunks {chunks}), max |diff| {np.abs(a - b).max():.3g}"
    assert not diff, f"{context}{got.name} differs from the uninterrupted run in {diff}{detail}"


def chunk_files(partial: Path) -> dict[int, str]:
    try:
        names = os.listdir(partial)
    except OSError:
        return {}
    return {int(m.group(1)): n for n in names if (m := CHUNK_RE.match(n))}


def chunk_rows(index: int, n_rows: int) -> range:
    return range(index * CHUNK_ROWS, min((index + 1) * CHUNK_ROWS, n_rows))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Reference:
    """One uninterrupted run: where it wrote, what it wrote, how long its chunks took (to place kills)."""

    data: Path
    paths: list[str]  # dataset rows, relative to data
    cache_name: str
    arrays: dict[str, bytes | list[str]]
    file: Path
    n_rows: int
    n_chunks: int
    chunk_seconds: float

    @property
    def partial_name(self) -> str:
        return self.cache_name.removesuffix(".h5") + ".partial"


def make_dataset(root: Path) -> Path:
    data = make_imagefolder(root, {"train": N_PER_CLASS}, n_classes=3)
    (data / "train" / "class_0" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "train" / "class_2" / "zz_empty.jpg").write_bytes(b"")
    return data


def spawn(cmd: list[str], log_dir: Path, failpoint: str = "") -> tuple[subprocess.Popen[str], Path, Path]:
    """Start ``cmd``; ``failpoint`` (``FEATX_FAILPOINTS`` syntax) makes the run signal itself at an exact step."""
    out, err = log_dir / "stdout", log_dir / "stderr"
    env = {**os.environ, "FEATX_FAILPOINTS": failpoint}
    proc = subprocess.Popen(cmd, stdout=out.open("w"), stderr=err.open("w"), text=True, env=env)
    return proc, out, err


def signal_after_chunks(cmd: list[str], log_dir: Path, n_chunks: int, signum: int) -> tuple[int, Path]:
    """Run ``cmd`` and have it send itself ``signum`` as soon as its ``n_chunks``-th journal chunk is durable (a
    failpoint inside the run: no race with a run that finishes first). Returns the exit code and the stderr file."""
    proc, _out, err = spawn(cmd, log_dir, f"journal.chunk_written={n_chunks}:{signal.Signals(signum).name}")
    return proc.wait(timeout=300), err


def kill_at(
    proc: subprocess.Popen[str],
    partial: Path,
    after_chunks: int,
    delay: float,
    signum: int,
    *,
    chunk_unit: float | None = None,
) -> int:
    """Wait until the journal exists and holds ``after_chunks`` chunk files (or the process ends), wait ``delay``
    seconds more, send ``signum``. Returns the exit code. With ``chunk_unit``, ``delay`` counts chunks of this run:
    it is multiplied by the gap between this run's last two chunk files, or by ``chunk_unit`` (seconds) before
    two exist (a reference run's mean includes its model preparation, so later chunks come faster than it)."""
    seen: list[float] = []  # when each chunk file was first seen
    while proc.poll() is None:
        n = len(chunk_files(partial)) if (partial / "journal.json").exists() else -1
        while len(seen) < n:
            seen.append(time.perf_counter())
        if n >= after_chunks:
            break
        time.sleep(0.005)
    if chunk_unit is not None:
        delay *= seen[-1] - seen[-2] if len(seen) >= 2 else chunk_unit
    if proc.poll() is None:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signum)
    return proc.wait(timeout=120)


def landed(cache: Path, ref: Reference) -> str:
    """Where the kill landed, from what it left on disk."""
    final, partial, tmp = cache / ref.cache_name, cache / ref.partial_name, cache / (ref.cache_name + ".tmp")
    if final.exists():
        return "after the rename, before the clean-up" if partial.exists() else "after completion"
    if tmp.exists():
        return "during assembly"
    if not partial.exists():
        return "before the journal"
    if not (partial / "journal.json").exists():
        return "while creating the journal"
    k = len(chunk_files(partial))
    return f"after {k} of {ref.n_chunks} chunks" if k < ref.n_chunks else "after the last chunk, before assembly"


class Poisoned:
    """Overwrite the images of the given rows with zeros (same size and mtime: the fingerprint is unchanged);
    restore them on exit. A run that reads one of them records a failure for it."""

    def __init__(self, ref: Reference, rows: list[int]) -> None:
        self.files = [ref.data / ref.paths[r] for r in rows]
        self.saved: list[tuple[Path, bytes, int, int]] = []

    def __enter__(self) -> Poisoned:
        for p in self.files:
            st = p.stat()
            data = p.read_bytes()
            self.saved.append((p, data, st.st_atime_ns, st.st_mtime_ns))
            p.write_bytes(b"\0" * len(data))
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        return self

    def __exit__(self, *exc: object) -> None:
        for p, data, atime, mtime in self.saved:
            p.write_bytes(data)
            os.utime(p, ns=(atime, mtime))


def run_cli_in_process(argv: list[str]) -> tuple[int, str, str]:
    """``featx.cli.main`` in this process (torch is imported once for the whole file): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def resume_and_check(cache: Path, ref: Reference, *extra: str, fresh_process: bool = True) -> tuple[str, str]:
    """Run the same command again on what a kill left, in a fresh process or (fast suite) in this one; check
    the result against the uninterrupted run. Returns (where the kill landed, the rerun's stdout)."""
    where = landed(cache, ref)
    partial = cache / ref.partial_name
    final_before = (cache / ref.cache_name).exists() and "--force" not in extra
    done = chunk_files(partial) if (partial / "journal.json").exists() else {}
    rows = sorted(r for i in done for r in chunk_rows(i, ref.n_rows))
    cmd = featx_cmd(ref.data, cache, *extra)
    with Poisoned(ref, [] if final_before else rows):
        if fresh_process:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            code, stdout, stderr = res.returncode, res.stdout, res.stderr
        else:
            code, stdout, stderr = run_cli_in_process(cmd[3:])
    assert code == 0, f"{where}: {stderr[-2000:]}"
    summary = stdout.splitlines()[0]
    if final_before:
        assert "cache hit" in summary, (where, summary)
    elif rows:
        assert f"resumed at {len(rows)} of {ref.n_rows} images" in summary, (where, summary)
    else:
        assert f"train: {ref.n_rows} images, 2 skipped" in summary, (where, summary)
    assert "Traceback" not in stderr
    assert sorted(os.listdir(cache)) == sorted([".locks", ref.cache_name]), (where, os.listdir(cache))
    assert_same_cache(cache / ref.cache_name, ref.arrays, f"{where}, resumed from chunks {sorted(done)}: ")
    return where, stdout


# --------------------------------------------------------------------------------------------------
# Fixtures: one dataset, one uninterrupted run, one interrupted run (shared by the tests of this file)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted run (the real CLI, in this process: the kills below are what need fresh processes)."""
    root = tmp_path_factory.mktemp("journal")
    data = make_dataset(root / "data")
    cache = root / "ref-cache"
    code, out, err = run_cli_in_process(featx_cmd(data, cache)[3:])
    assert code == 0, err
    [final] = cache.glob("*.h5")
    from featx.data import load_dataset

    paths = list(load_dataset(data).split("train").paths)
    n = len(paths)
    assert n == 3 * N_PER_CLASS + 2 and f"train: {n} images, 2 skipped" in out, out
    n_chunks = -(-n // CHUNK_ROWS)
    with h5py.File(final, "r") as f:  # the chunks' compute time (in a fresh process there is start-up before it)
        compute = float(f.attrs["extraction_seconds"])
    return Reference(data, paths, final.name, cache_arrays(final), final, n, n_chunks, max(compute / n_chunks, 0.01))


@dataclass
class Interrupted:
    rc: int
    stderr: str
    snapshot: Path  # a copy of the partial right after the interrupt
    done_chunks: dict[int, str]


@pytest.fixture(scope="module")
def interrupted(ref: Reference, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    """SIGINT once two chunks are on disk; keep a copy of the partial it leaves."""
    root = tmp_path_factory.mktemp("sigint")
    cache = root / "cache"
    rc, err = signal_after_chunks(featx_cmd(ref.data, cache), root, 2, signal.SIGINT)
    partial = cache / ref.partial_name
    assert partial.is_dir() and not (cache / ref.cache_name).exists(), f"SIGINT came too late: {landed(cache, ref)}"
    snapshot = root / "snapshot.partial"
    shutil.copytree(partial, snapshot)
    return Interrupted(rc, err.read_text(), snapshot, chunk_files(snapshot))


def partial_from(snapshot: Path, ref: Reference, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / ref.partial_name
    shutil.copytree(snapshot, partial)
    return partial


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------
# SIGKILL at seeded points


def kill_points(n: int, seed: int, n_chunks: int) -> list[tuple[int, float]]:
    """``n`` kill points: (chunk files to wait for, extra delay in units of one chunk's compute time)."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, n_chunks + 1)), float(rng.uniform(0.0, 1.2))) for _ in range(n)]


def sigkill_campaign(ref: Reference, root: Path, points: list[tuple[int, float]], fresh_every: int = 0) -> Counter[str]:
    """SIGKILL each point in a fresh process, rerun the same command and check it. The rerun runs in a fresh
    process for every ``fresh_every``-th point and in this one otherwise (torch is already imported here: each
    fresh process costs about 8 s of start-up on 2 cores)."""
    phases: Counter[str] = Counter()
    for j, (after, delay) in enumerate(points):
        cache = root / f"kill-{j}"
        logs = root / f"logs-{j}"
        logs.mkdir(parents=True)
        proc, _, _ = spawn(featx_cmd(ref.data, cache), logs)
        rc = kill_at(proc, cache / ref.partial_name, after, delay, signal.SIGKILL, chunk_unit=ref.chunk_seconds)
        assert rc in (0, -signal.SIGKILL), (j, rc, (logs / "stderr").read_text()[-2000:])
        fresh = bool(fresh_every) and j % fresh_every == 0
        try:
            where, _ = resume_and_check(cache, ref, fresh_process=fresh)
        except AssertionError as exc:
            raise AssertionError(f"kill point {j} {(after, delay)} (rerun in a fresh process: {fresh}): {exc}") from None
        phases[where] += 1
        shutil.rmtree(cache)
    return phases


@pytest.mark.parametrize(
    ("after_chunks", "delay"),
    [
        (3, 0.5),  # the fast suite's SIGKILL (with the SIGINT and the forced run's SIGKILL below: three kills)
        pytest.param(0, 0.3, marks=pytest.mark.slow),  # just after the journal was created
        pytest.param(5, 0.2, marks=pytest.mark.slow),  # in the last chunk
    ],
)
def test_sigkill_then_the_same_command_finishes_bit_identical(
    ref: Reference, tmp_path: Path, after_chunks: int, delay: float
) -> None:
    """SIGKILL in a fresh process; the rerun in this one (the slow campaign below reruns in fresh processes)."""
    phases = sigkill_campaign(ref, tmp_path, [(after_chunks, delay)])
    print(f"\nSIGKILL landed {dict(phases)}")
    assert sum(phases.values()) == 1


@pytest.mark.slow  # ~4 min on 2 cores
def test_sigkill_at_20_seeded_random_points(ref: Reference, tmp_path: Path) -> None:
    """20 kill points "after k chunk files, plus u x one chunk's compute time" (k in 0..6, u in [0, 1.2), seed 13);
    every 4th rerun in a fresh process. Where they land is printed (pytest -s) and must include mid-extraction."""
    points = kill_points(20, seed=13, n_chunks=ref.n_chunks)
    phases = sigkill_campaign(ref, tmp_path, points, fresh_every=4)
    print(f"\nSIGKILL points: {dict(phases)}")
    mid = sum(n for p, n in phases.items() if p.startswith("after ") and " of " in p)
    assert sum(phases.values()) == 20 and mid >= 10, phases


# --------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM keep the journal; the rerun resumes


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(ref: Reference, tmp_path: Path) -> None:
    """``nohup featx extract ... &`` (SIGINT ignored from the start): a Ctrl-C meant for the shell does not stop it."""
    cache = tmp_path / "cache"
    env = {**os.environ, "FEATX_FAILPOINTS": "journal.chunk_written=2:SIGINT"}

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    res = subprocess.run(
        featx_cmd(ref.data, cache), capture_output=True, text=True, timeout=300, env=env, preexec_fn=ignore_sigint, check=False
    )
    assert res.returncode == 0, res.stderr
    assert_same_cache(cache / ref.cache_name, ref.arrays)


def test_sigint_keeps_the_partial_and_the_rerun_resumes(ref: Reference, interrupted: Interrupted, tmp_path: Path) -> None:
    assert interrupted.rc == 130
    lines = interrupted.stderr.strip().splitlines()
    assert lines[-1].startswith("featx: error: interrupted by SIGINT while extracting split 'train'")
    assert "run the same command again to resume" in lines[-1] and "Traceback" not in interrupted.stderr
    assert len(interrupted.done_chunks) >= 2  # the chunks written before the interrupt are kept
    cache = tmp_path / "cache"
    partial_from(interrupted.snapshot, ref, cache)
    res = run_featx(["cache", "ls", "--cache-dir", str(cache)])
    done = sum(len(chunk_rows(i, ref.n_rows)) for i in interrupted.done_chunks)
    assert res.returncode == 0 and f"partial {done}/{ref.n_rows}" in res.stdout, res.stdout
    _where, stdout = resume_and_check(cache, ref, fresh_process=False)
    assert f"resumed at {done} of {ref.n_rows} images" in stdout


@pytest.mark.slow
def test_sigterm_keeps_the_partial_and_the_rerun_resumes(ref: Reference, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    rc, err = signal_after_chunks(featx_cmd(ref.data, cache), tmp_path, 1, signal.SIGTERM)
    assert rc == 143 and "interrupted by SIGTERM" in err.read_text()
    assert chunk_files(cache / ref.partial_name)
    resume_and_check(cache, ref)


# --------------------------------------------------------------------------------------------------
# Partials that must not be resumed, and states a kill can leave


def edit_header(partial: Path, **changes: object) -> None:
    p = partial / "journal.json"
    h = json.loads(p.read_text())
    for k, v in changes.items():
        node = h
        *parents, leaf = k.split("__")
        for q in parents:
            node = node[q]
        node[leaf] = v
    p.write_text(json.dumps(h))


def _flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    p.write_bytes(bytes(data))


def _first_chunk(partial: Path) -> Path:
    return partial / chunk_files(partial)[min(chunk_files(partial))]


DAMAGED_PARTIALS = {
    # name: (what to do to the partial, text of the warning, 0: nothing survives, -1: all but the first chunk)
    "device differs": (lambda p: edit_header(p, device="cuda"), "other settings (device)", 0),
    "spec differs": (lambda p: edit_header(p, spec__split="test"), "other settings (spec)", 0),
    "rows differ": (lambda p: edit_header(p, n_rows=181), "other settings (n_rows)", 0),
    "model resolves differently": (
        lambda p: edit_header(p, cache_attrs__embedder__preprocessing__interpolation="bilinear"),
        "the model resolves differently now",
        0,
    ),
    "inconsistent sizes": (lambda p: edit_header(p, chunk_rows=30), "inconsistent sizes", 0),
    "chunk bytes flipped": (lambda p: _flip_middle(_first_chunk(p)), "checksum mismatch", -1),
    "chunk truncated": (lambda p: os.truncate(_first_chunk(p), 100), "checksum mismatch", -1),
    "chunk renamed to another index": (
        lambda p: _first_chunk(p).rename(p / ("chunk-000000005-" + _first_chunk(p).name.split("-")[2])),
        "discarded damaged chunk",
        -1,
    ),
}


FAST_PARTIAL_CASES = ("device differs", "chunk bytes flipped", "chunk truncated")


@pytest.mark.parametrize(
    "case", [c if c in FAST_PARTIAL_CASES else pytest.param(c, marks=pytest.mark.slow) for c in DAMAGED_PARTIALS]
)
def test_a_partial_that_does_not_fit_is_discarded_with_a_warning_and_rebuilt(
    ref: Reference, interrupted: Interrupted, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], caplog
) -> None:
    damage, warning, survivors = DAMAGED_PARTIALS[case]
    cache = tmp_path / "cache"
    partial = partial_from(interrupted.snapshot, ref, cache)
    damage(partial)
    kept = sorted(interrupted.done_chunks)[1:] if survivors else []
    caplog.set_level("WARNING", logger="featx")
    code, out, _ = cli(["extract", str(ref.data), *OPTS, "--cache-dir", str(cache)], capsys)
    assert code == 0
    assert warning in caplog.text and "discard" in caplog.text, caplog.text
    if kept:
        rows = sum(len(chunk_rows(i, ref.n_rows)) for i in kept)
        assert f"resumed at {rows} of {ref.n_rows} images" in out, out
    else:
        assert "resumed" not in out and f"train: {ref.n_rows} images, 2 skipped" in out, out
    assert sorted(os.listdir(cache)) == [".locks", ref.cache_name]
    assert_same_cache(cache / ref.cache_name, ref.arrays)


UNPROVABLE_PARTIALS = {
    # name: (what to do to the partial, why featx cannot prove it wrote it)
    "journal.json garbage": (lambda p: (p / "journal.json").write_bytes(b"\x00{not json"), "journal.json is unreadable"),
    "journal.json missing": (lambda p: (p / "journal.json").unlink(), "it holds chunks but no journal.json"),
    "a foreign file inside": (lambda p: (p / "notes.txt").write_text("mine"), "it holds notes.txt, which featx did not write"),
}


@pytest.mark.parametrize("case", list(UNPROVABLE_PARTIALS))
def test_a_partial_featx_cannot_prove_it_wrote_is_refused_not_discarded(
    ref: Reference, interrupted: Interrupted, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20: without featx's journal.json (or with a file featx did not write) the folder is not provably
    featx's: the rerun neither resumes over it nor deletes it; one line says why and how to delete it by hand."""
    damage, why = UNPROVABLE_PARTIALS[case]
    cache = tmp_path / "cache"
    partial = partial_from(interrupted.snapshot, ref, cache)
    damage(partial)
    before = {p.name: p.read_bytes() for p in partial.iterdir()}
    code, out, err = cli(["extract", str(ref.data), *OPTS, "--cache-dir", str(cache)], capsys)
    assert code == 2 and out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"featx: error: featx cannot prove it wrote {partial} ({why}"), err
    assert f"rm -r -- {partial}" in lines[0]
    assert {p.name: p.read_bytes() for p in partial.iterdir()} == before and not (cache / ref.cache_name).exists()


def test_resume_keeps_the_journals_batch_size_and_memory_format(
    ref: Reference, interrupted: Interrupted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batch size and memory format change the float32 rounding: a resumed run uses what the journal was started
    with, whatever the rerun asks for, or the cache would mix two kinds of rows."""
    cache = tmp_path / "cache"
    partial_from(interrupted.snapshot, ref, cache)
    argv = ["extract", str(ref.data), *OPTS, "--cache-dir", str(cache), "--batch-size", "7", "--no-channels-last"]
    code, out, _ = cli(argv, capsys)
    assert code == 0 and "resumed at" in out, out
    assert_same_cache(cache / ref.cache_name, ref.arrays)


def test_a_rerun_with_other_inference_settings_starts_over(
    ref: Reference, interrupted: Interrupted, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog
) -> None:
    """``--optimize`` (like ``--decode``, ``--jpeg-draft``) is not in the cache key but changes the rounding: the
    journal's rows were made without it, so the rerun discards them (warning) instead of mixing."""
    cache = tmp_path / "cache"
    partial_from(interrupted.snapshot, ref, cache)
    caplog.set_level("WARNING", logger="featx")
    code, out, _ = cli(["extract", str(ref.data), *OPTS, "--cache-dir", str(cache), "--optimize", "none"], capsys)
    assert code == 0 and "resumed" not in out and f"train: {ref.n_rows} images, 2 skipped" in out, out
    assert "other settings (optimize)" in caplog.text, caplog.text
    assert sorted(os.listdir(cache)) == [".locks", ref.cache_name]
    assert "FEATX_OPTIMIZE" not in os.environ  # the CLI passes its flags as a value, never through the environment


def test_a_kill_during_assembly_resumes_without_the_model(ref: Reference, interrupted: Interrupted, tmp_path: Path) -> None:
    """Every chunk on disk and a half-written ``.h5.tmp`` (a kill while assembling): the rerun assembles
    the cache from the journal alone. Every image is overwritten first, so any model run would show."""
    from featx.cache import CacheJournal, Chunk

    cache = tmp_path / "cache"
    partial_from(interrupted.snapshot, ref, cache)
    journal = CacheJournal(cache / ref.cache_name)
    journal.open()
    with h5py.File(ref.file, "r") as f:  # the missing chunks, written by the journal's own writer
        features, valid = f["features"][()], f["valid"][()]
        failures = dict(zip(f["failures/index"][()].tolist(), f["failures/reason"].asstr()[()]))
    for i in range(ref.n_chunks):
        if i not in chunk_files(journal.dir):
            rows = chunk_rows(i, ref.n_rows)
            journal.write_chunk(
                Chunk(
                    i,
                    rows.start,
                    features[rows.start : rows.stop],
                    valid[rows.start : rows.stop],
                    [failures.get(j, "") for j in rows],
                )
            )
    (cache / (ref.cache_name + ".tmp")).write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(5000))
    with Poisoned(ref, list(range(ref.n_rows))):
        code, out, err = run_cli_in_process(featx_cmd(ref.data, cache)[3:])
    assert code == 0, err
    assert f"resumed at {ref.n_rows} of {ref.n_rows} images" in out
    assert sorted(os.listdir(cache)) == [".locks", ref.cache_name]
    assert_same_cache(cache / ref.cache_name, ref.arrays)


def test_a_kill_after_the_rename_leaves_a_hit_and_the_journal_is_cleaned_up(
    ref: Reference, interrupted: Interrupted, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    partial_from(interrupted.snapshot, ref, cache)
    shutil.copy2(ref.file, cache / ref.cache_name)
    res = subprocess.run(featx_cmd(ref.data, cache), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0 and "cache hit" in res.stdout, res.stdout + res.stderr
    assert sorted(os.listdir(cache)) == [".locks", ref.cache_name]
    assert sha256(cache / ref.cache_name) == sha256(ref.file)


# --------------------------------------------------------------------------------------------------
# --force: the old cache survives a failing forced run


@pytest.mark.parametrize("signum", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_forced_run_that_dies_leaves_the_old_cache_intact(ref: Reference, tmp_path: Path, signum: int) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    old = cache / ref.cache_name
    shutil.copy2(ref.file, old)
    before = sha256(old)
    rc, err = signal_after_chunks(featx_cmd(ref.data, cache, "--force"), tmp_path, 2, signum)
    assert rc == (-signal.SIGKILL if signum == signal.SIGKILL else 130), err.read_text()
    assert (cache / ref.partial_name).is_dir()  # the forced run was under way
    assert sha256(old) == before
    res = run_featx(["cache", "verify", "--cache-dir", str(cache)])
    assert res.returncode == 0 and res.stdout.startswith(f"ok       {ref.cache_name}"), res.stdout + res.stderr
    assert_same_cache(old, ref.arrays)
    if signum == signal.SIGKILL:  # a plain rerun: the old cache is a hit, the forced run's journal is cleaned up
        res = subprocess.run(featx_cmd(ref.data, cache), capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == 0 and "cache hit" in res.stdout, res.stdout + res.stderr
        assert sorted(os.listdir(cache)) == [".locks", ref.cache_name] and sha256(old) == before
    else:  # the forced rerun resumes its own journal and replaces the cache only when complete
        _where, stdout = resume_and_check(cache, ref, "--force")
        assert "resumed at" in stdout, stdout


# --------------------------------------------------------------------------------------------------
# Damaged complete caches: one line naming the file and the fix, exit 2, never numbers


def _features_chunk_offset(path: Path) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        info = f["features"].id.get_chunk_info(f["features"].id.get_num_chunks() // 2)
        return info.byte_offset, info.size


def _dataset_offset(path: Path, name: str) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        ds = f[name]
        info = ds.id.get_chunk_info(0)
        return info.byte_offset, info.size


def _flip(path: Path, offset: int, n: int = 16) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def _flip_in(name: str):
    def damage(p: Path) -> None:
        off, size = _features_chunk_offset(p) if name == "features" else _dataset_offset(p, name)
        _flip(p, off + size // 2 - 8, 16 if size >= 16 else size)

    return damage


def _set_attr(name: str, value: object):
    def damage(p: Path) -> None:
        with h5py.File(p, "r+") as f:
            f.attrs[name] = value

    return damage


def _edit_path(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        f["paths"][0] = "class_0/elsewhere.png"


def _flip_zeros_of_failed_row(p: Path) -> None:
    """Row 60 is the undecodable class_0/zz_broken.png: all zeros. HDF5's fletcher32 sums 16-bit words modulo
    65535, where 0x0000 and 0xFFFF are the same number: inverted zeros pass it (they read back as NaN)."""
    with h5py.File(p, "r") as f:
        assert not f["valid"][60] and not f["features"][60].any()
        row_bytes = f["features"].shape[1] * 4
    off, _ = _features_chunk_offset(p)  # one chunk of 182 rows, stored row by row
    _flip(p, off + 60 * row_bytes + 1024, 16)


def _flip_zero_bytes_of_a_label(p: Path) -> None:
    """The six high bytes of a small int64 label are zeros: the same blind spot."""
    off, _ = _dataset_offset(p, "labels")
    _flip(p, off + 8 * 100 + 2, 6)


DAMAGED_CACHES = {
    "16 bytes flipped mid features": (_flip_in("features"), "features fail their checksum"),
    "zeros of a failed row flipped": (_flip_zeros_of_failed_row, "features fail their checksum (row 60)"),
    "zero bytes of a label flipped": (_flip_zero_bytes_of_a_label, "labels, indices or valid mask do not match their digest"),
    "bytes flipped in labels": (_flip_in("labels"), "damaged"),
    "bytes flipped in indices": (_flip_in("indices"), "damaged"),
    "bytes flipped in valid": (_flip_in("valid"), "damaged"),
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(3).bytes(p.stat().st_size)), "not an HDF5 file"),
    "truncated to half": (lambda p: os.truncate(p, p.stat().st_size // 2), "truncated"),
    "truncated by 100 bytes": (lambda p: os.truncate(p, p.stat().st_size - 100), "damaged"),
    "empty file": (lambda p: os.truncate(p, 0), "damaged"),
    "n_images attr changed": (_set_attr("n_images", 10), "attributes do not match their digest"),
    "layer attr changed": (_set_attr("layer", "blocks.3"), "attributes do not match their digest"),
    "embedder attr emptied": (_set_attr("embedder", "{}"), "damaged"),
    "a path changed": (_edit_path, "paths, classes or failures do not match their digest"),
}


@pytest.fixture(scope="module")
def damaged_caches(ref: Reference, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for j, (case, (damage, _)) in enumerate(DAMAGED_CACHES.items()):
        d = root / f"c{j}"
        d.mkdir()
        shutil.copy2(ref.file, d / ref.cache_name)
        damage(d / ref.cache_name)
        out[case] = d / ref.cache_name
    return out


#: Damage after which the file no longer opens as HDF5 with featx's attributes: featx cannot prove it wrote it, so
#: the fix is to delete it by hand (issue 20: `featx cache rm` removes only what featx can prove it wrote).
UNPROVABLE_CACHES = ("random bytes", "truncated to half", "truncated by 100 bytes", "empty file")


def _fix(case: str, path: Path) -> str:
    return f"delete it by hand (rm -- {path})" if case in UNPROVABLE_CACHES else "featx cache rm "


def _one_error_line(err: str, path: Path, what: str, fix: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("featx: error: ") and str(path) in line, line
    assert what in line and fix in line and "extract again" in line, line


def test_verify_and_fit_head_accept_a_good_cache(ref: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control for the damaged cases below: the same commands on the untouched file succeed."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy2(ref.file, cache / ref.cache_name)
    res = run_featx(["cache", "verify", "--cache-dir", str(cache)])
    assert res.returncode == 0 and res.stdout == f"ok       {ref.cache_name}: 182x1280, 2 failed\n", res.stdout + res.stderr
    out = tmp_path / "heads"
    for args in (
        ["fit-head", "--train", str(cache / ref.cache_name)],
        ["fit-head", str(ref.data), "--cache-dir", str(cache), "--image-size", "48"],
    ):
        shutil.rmtree(out, ignore_errors=True)
        code, _, err = cli(["-q", *args, "--head", "knn", "--n-jobs", "1", "--out-dir", str(out)], capsys)
        assert code == 0 and list(out.glob("*.skops")), err


@pytest.mark.parametrize("case", list(DAMAGED_CACHES))
def test_a_damaged_cache_is_refused_by_verify_and_fit_head(
    ref: Reference, damaged_caches: dict[str, Path], tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = damaged_caches[case]
    what = DAMAGED_CACHES[case][1]
    res = run_featx(["cache", "verify", "--cache-dir", str(path.parent)])  # a fresh process: no torch, fast
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout.startswith(f"DAMAGED  {ref.cache_name}: cache {path} is damaged"), res.stdout
    assert what in res.stdout and _fix(case, path) in res.stdout and res.stdout.count("\n") == 1, res.stdout
    assert res.stderr.startswith("featx: error: 1 of 1 cache(s) damaged") and res.stderr.count("\n") == 1, res.stderr
    # fit-head on the file, and on the dataset (found by key): one line, exit 2, no head written
    out = tmp_path / "heads"
    for args in (
        ["fit-head", "--train", str(path)],
        ["fit-head", str(ref.data), "--cache-dir", str(path.parent), "--image-size", "48"],
    ):
        code, _, err = cli(["-q", *args, "--head", "knn", "--n-jobs", "1", "--out-dir", str(out)], capsys)
        assert code == 2, (args, err)
        _one_error_line(err, path, what, _fix(case, path))
        assert not out.exists() or not list(out.iterdir())


def test_a_cache_written_before_row_checksums_is_still_read(ref: Reference, tmp_path: Path) -> None:
    """Caches of format 3 written before /features_crc32 and arrays_sha256 existed: read with fletcher32 and the
    attribute and table digests alone, not refused (the format version did not change)."""
    from featx.cache import _attrs_digest, load_cache

    old = tmp_path / ref.cache_name
    shutil.copy2(ref.file, old)
    with h5py.File(old, "r+") as f:
        del f["features_crc32"]
        del f.attrs["arrays_sha256"]
        f.attrs["attrs_sha256"] = _attrs_digest(dict(f.attrs.items()))
    res = run_featx(["cache", "verify", str(old)])
    assert res.returncode == 0 and res.stdout.startswith(f"ok       {ref.cache_name}"), res.stdout + res.stderr
    with h5py.File(ref.file, "r") as f:
        valid = f["valid"][()]
        assert np.array_equal(load_cache(old).features, f["features"][()][valid])
