"""Distributed extraction: real ``torchrun --nproc_per_node=2`` jobs (gloo on the CPU) and ``--shard`` jobs merged by
``featx cache merge`` write the very cache a single process writes (same key, rows, paths, labels, failures; the
features bit-identical: on the CPU each image runs alone (micro-batch 1) through a one-thread forward in both
layouts, so nothing changes the summation order; the suite runs PyTorch (conftest), the ONNX Runtime default was
checked the same way on flowers17: benchmarks/results/scaling.md). A rank SIGKILLed at an exact step
(failpoint ``@rank1``) fails the job with one line naming it, keeps the chunks written, and the same command resumes.

Each torchrun start costs several seconds (two Python processes, the gloo rendezvous, a model each): the module runs
four (one stops at the scan), on a 136-image dataset at 48 px with batches of 4 (journal chunks of 32 rows: four
train chunks, two a rank)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featx.cache import list_caches, load_cache, read_cache_attrs, read_failures
from featx.cli import main
from featx.extraction import extract

from .conftest import make_imagefolder

ROOT = Path(__file__).parents[1]
SIZE = ["--image-size", "48", "--batch-size", "4"]
API = {"image_size": 48, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_imagefolder(tmp_path_factory.mktemp("dist") / "ds", {"train": 64, "val": 4})
    (root / "train" / "class_1" / "007.png").write_bytes(b"not a png")  # one failure (row 71: chunk 2, rank 1's)
    return root


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-process caches (the API, in this process)."""
    cdir = tmp_path_factory.mktemp("single")
    return {r.split: r.path for r in extract(dataset, cache_dir=cdir, **API)}


def _torchrun(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FEATX_FAILPOINTS"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "featx", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def _assert_same_cache(got: Path, want: Path) -> None:
    assert got.name == want.name  # same key, same name
    a, b = read_cache_attrs(got), read_cache_attrs(want)
    assert a["key"] == b["key"] and a["n_images"] == b["n_images"] and a["runtime"] == b["runtime"]
    fa, fb = load_cache(got), load_cache(want)
    assert fa.paths == fb.paths and fa.classes == fb.classes
    np.testing.assert_array_equal(fa.labels, fb.labels)
    np.testing.assert_array_equal(fa.indices, fb.indices)
    np.testing.assert_array_equal(fa.features, fb.features)  # bit-identical (module docstring)
    assert read_failures(got) == read_failures(want)


@pytest.fixture(scope="module")
def two_ranks(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    cdir = tmp_path_factory.mktemp("two-ranks")
    return cdir, _torchrun(["extract", str(dataset), *SIZE, "--cache-dir", str(cdir)])


def test_two_ranks_write_the_single_process_cache(
    two_ranks: tuple[Path, subprocess.CompletedProcess[str]], reference: dict[str, Path]
) -> None:
    cdir, proc = two_ranks
    assert proc.returncode == 0, proc.stderr[-3000:]
    for want in reference.values():
        _assert_same_cache(cdir / want.name, want)
    assert read_failures(cdir / reference["train"].name) == [(71, read_failures(reference["train"])[0][1])]
    # each rank computed its own half of the train chunks (no chunk twice, no padding); the val split's one chunk: rank 0
    assert "rank 0 computes chunks 0-1 of 4 (64 rows)" in proc.stderr
    assert "rank 1 computes chunks 2-3 of 4 (64 rows)" in proc.stderr
    assert proc.stdout.count("done:") == 1  # the summary comes from rank 0 only
    assert not list(cdir.glob("*.partial"))


def test_a_killed_rank_fails_the_job_in_one_line_and_the_same_command_resumes(
    dataset: Path, reference: dict[str, Path], tmp_path: Path
) -> None:
    cdir = tmp_path / "cache"
    args = ["-q", "extract", str(dataset), *SIZE, "--cache-dir", str(cdir)]
    first = _torchrun(args, {"FEATX_FAILPOINTS": "journal.chunk_written=1:SIGKILL@rank1"})
    assert first.returncode != 0
    assert "featx: failpoint journal.chunk_written=1 fired on rank 1: sending SIGKILL" in first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("featx: error:")]
    assert len(errors) == 1, first.stderr[-3000:]  # rank 0's line (rank 1 was SIGKILLed: torchrun's summary follows)
    assert re.search(r"rank 1 stopped before writing all its chunks", errors[0]), errors[0]
    assert "run the same command again to resume" in errors[0]
    [journal] = cdir.glob("*-train-*.partial")
    kept = sorted(p.name[:15] for p in journal.glob("chunk-*.npz"))
    assert "chunk-000000002" in kept and "chunk-000000003" not in kept  # rank 1's first chunk stayed, its second never came
    assert not list(cdir.glob("*.h5"))
    second = _torchrun(args[1:])
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"train: resumed at {32 * len(kept)} of 128 images" in second.stdout
    for want in reference.values():
        _assert_same_cache(cdir / want.name, want)
    assert not list(cdir.glob("*.partial"))


def test_an_error_on_rank_0_is_one_line_for_the_whole_job(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    proc = _torchrun(["extract", str(missing), *SIZE, "--cache-dir", str(tmp_path / "cache")])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("featx: error:")]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr[-3000:]  # rank 0's scan failed; rank 1 stays quiet
    assert "internal error" not in proc.stderr
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def shard_dirs(dataset: Path, reference: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two separate ``--shard i/2`` jobs, each with its own cache folder (no shared filesystem)."""
    dirs = []
    for i in range(2):
        d = tmp_path_factory.mktemp(f"shard{i}")
        results = extract(dataset, cache_dir=d, shard=f"{i}/2", **API)
        assert [r.shard for r in results] == [f"{i}/2", f"{i}/2"]
        assert [r.n_images for r in results] == ([64, 8] if i == 0 else [64, 0])  # val has one chunk: shard 0's
        dirs.append(d)
    return dirs


def _journals(dirs: list[Path], split: str = "") -> list[str]:
    pattern = f"*{split}*.shard-*.partial" if split else "*.shard-*.partial"
    return [str(p) for d in dirs for p in sorted(d.glob(pattern))]


def test_cache_merge_of_two_shard_jobs_is_the_single_process_cache(
    shard_dirs: list[Path], reference: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache", "ls", "--cache-dir", str(shard_dirs[1])]) == 0
    listing = capsys.readouterr().out
    assert "partial shard 1/2 64/64" in listing and "partial shard 1/2 0/0" in listing
    row = next(r for r in list_caches(shard_dirs[0]) if r.get("shard") and r["split"] == "train")
    assert row["shard"] == [0, 2] and row["done_rows"] == 64 and row["featx"]
    before = {p: p.stat().st_mtime_ns for d in shard_dirs for p in d.rglob("*")}
    out = tmp_path / "merged"
    assert main(["cache", "merge", *_journals(shard_dirs), "--cache-dir", str(out)]) == 0
    assert capsys.readouterr().out.count("merged 2 shard journal(s)") == 2
    for want in reference.values():
        _assert_same_cache(out / want.name, want)
    assert {p: p.stat().st_mtime_ns for d in shard_dirs for p in d.rglob("*")} == before  # the shards are only read
    assert main(["cache", "merge", *_journals(shard_dirs), "--cache-dir", str(out)]) == 0  # again: already complete
    assert "already complete" in capsys.readouterr().out


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featx: error:"), err
    return err[0]


def test_a_missing_shard_is_named_and_nothing_is_written(
    shard_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    line = _refused(["cache", "merge", *_journals(shard_dirs[:1], "-train-"), "--cache-dir", str(out)], capsys)
    assert "2 of 4 chunks missing: chunk(s) 2-3 of shard 1/2 (not given)" in line and "nothing was written" in line
    assert not out.exists() or not list(out.iterdir())


def test_mismatched_shards_are_refused_naming_what_differs(
    dataset: Path, shard_dirs: list[Path], reference: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other-batch"  # shard 1/2 with another batch size (same chunk rows, same key)
    extract(dataset, cache_dir=other, shard="1/2", splits=["train"], **{**API, "batch_size": 8})
    out = tmp_path / "merged"
    line = _refused(
        ["cache", "merge", *_journals(shard_dirs[:1], "-train-"), *_journals([other]), "--cache-dir", str(out)], capsys
    )
    assert "does not match" in line and "batch_size" in line
    copy = tmp_path / "copy" / dataset.name  # shard 1/2 of a copy whose one file changed: another dataset fingerprint
    shutil.copytree(dataset, copy)
    os.utime(copy / "train" / "class_0" / "000.png", ns=(1, 1))
    changed = tmp_path / "changed"
    extract(copy, cache_dir=changed, shard="1/2", splits=["train"], **API)
    line = _refused(
        ["cache", "merge", *_journals(shard_dirs[:1], "-train-"), *_journals([changed]), "--cache-dir", str(out)], capsys
    )
    assert "different caches" in line and "dataset fingerprint" in line
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("value", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_a_bad_shard_is_a_usage_error(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    line = _refused(["extract", str(dataset), f"--shard={value}", "--cache-dir", str(tmp_path / "c")], capsys)
    assert "--shard must be i/n with 0 <= i < n" in line
    assert not (tmp_path / "c").exists()
