"""featx never destroys what it did not make (issue 20): ``cache rm``, ``cache ls``, ``cache verify`` and extraction
beside files, folders and symbolic links that featx did not write.

Real caches from a real extraction of a tiny generated dataset (once per module, copied into each test's cache
folder), real HDF5 files from h5py, the real CLI through ``featx.cli.main``. Every foreign thing is snapshotted
(every file's bytes) before and compared after: "intact" means byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.cache import CacheJournal, Chunk, KeyLock, NotFeatxError, journal_dir, lock_path, resolve_cache_path
from featx.cache import tmp_path as assembly_path
from featx.cli import main
from featx.errors import CacheError

from .conftest import make_imagefolder

OPTS = ["--image-size", "64", "--batch-size", "8", "--num-workers", "0"]


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) by relative name, with its bytes; symbolic links not followed."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink()}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featx: error: "), err
    assert "Traceback" not in err
    return lines[0]


class Made:
    """The tiny dataset and its two real caches (train, test), extracted once."""

    def __init__(self, root: Path) -> None:
        self.data = make_imagefolder(root / "data", {"train": 4, "test": 3})
        self.src = root / "made-cache"
        code = main(["-q", "extract", str(self.data), *OPTS, "--cache-dir", str(self.src)])
        assert code == 0
        self.files = {a["split"]: Path(a["path"]) for a in (_attrs(p) for p in sorted(self.src.glob("*.h5")))}
        assert sorted(self.files) == ["test", "train"]

    def cache_dir(self, d: Path) -> dict[str, Path]:
        """Copies of both caches in ``d``; split -> path."""
        d.mkdir(parents=True, exist_ok=True)
        for p in self.files.values():
            shutil.copy2(p, d / p.name)
        return {s: d / p.name for s, p in self.files.items()}


def _attrs(p: Path) -> dict[str, str]:
    with h5py.File(p, "r") as f:
        return {"split": str(f.attrs["split"]), "path": str(p)}


def key_of(p: Path) -> str:
    return p.name.removesuffix(".h5").rsplit("-", 1)[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    return Made(tmp_path_factory.mktemp("safety"))


def foreign_things(c: Path) -> dict[str, Path]:
    """Things a user may keep in (or beside) a cache folder: featx wrote none of them."""
    (c / "thesis.partial").mkdir()
    (c / "thesis.partial" / "chapter1.tex").write_text("\\chapter{Introduction}\n")
    with h5py.File(c / "my_keras_model_weights.h5", "w") as f:
        f["dense/kernel"] = np.arange(12, dtype=np.float32).reshape(3, 4)
        f.attrs["keras_version"] = "2.15.0"
    (c / "photos").mkdir()
    (c / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(200)))
    (c / "photos" / "notes.txt").write_text("keep me\n")
    return {n: c / n for n in ("thesis.partial", "my_keras_model_weights.h5", "photos")}


# --------------------------------------------------------------------------------------------------
# cache rm PATH / --all


def test_rm_of_paths_outside_the_cache_folder_is_refused_and_deletes_nothing(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    caches = made.cache_dir(tmp_path / "c1")
    victim = tmp_path / "victim"
    shutil.copytree(made.data, victim)
    (tmp_path / "notes.txt").write_text("my notes\n")
    outside_cache = tmp_path / "elsewhere" / caches["train"].name  # a real featx cache, but not in --cache-dir
    outside_cache.parent.mkdir()
    shutil.copy2(caches["train"], outside_cache)
    before = {p: snapshot(p) for p in (victim, tmp_path / "notes.txt", outside_cache, tmp_path / "c1")}
    for ref, what in (
        ("./victim", "victim is not in the cache folder c1"),
        ("./notes.txt", "notes.txt is not in the cache folder c1"),
        (str(victim), "is not in the cache folder"),
        ("./c1", "is not in the cache folder"),  # the folder itself ("c1" alone would be a key prefix)
        (str(outside_cache), "is not in the cache folder"),
    ):
        code, out, err = cli(["cache", "rm", ref, "--cache-dir", "c1"], capsys)
        assert code == 2 and out == "", (ref, out)
        assert what in one_error_line(err), (ref, err)
    assert {p: snapshot(p) for p in before} == before
    # the same refs together with a good key: all or nothing
    code, _, err = cli(["cache", "rm", key_of(caches["test"]), "./victim", "--cache-dir", "c1"], capsys)
    assert code == 2 and "not in the cache folder" in err and caches["test"].exists()


def test_rm_all_removes_featx_caches_and_leaves_everything_else(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    c = tmp_path / "c1"
    caches = made.cache_dir(c)
    foreign = foreign_things(c)
    before = {n: snapshot(p) for n, p in foreign.items()}

    code, out, _ = cli(["cache", "ls", "--cache-dir", "c1"], capsys)
    assert code == 0
    lines = {line.split()[1] if line.startswith("-") else line.split()[0]: line for line in out.splitlines()[2:]}
    assert "not featx's (left alone)" in lines["thesis.partial"] and "not featx's" in lines["my_keras_model_weights.h5"]
    assert "photos" not in out  # not named like a cache: not featx's business at all
    assert all(lines[key_of(p)].split()[1] == "data" for p in caches.values())
    code, out, _ = cli(["cache", "ls", "--json", "--cache-dir", "c1"], capsys)
    rows = {r["file"]: r for r in json.loads(out)}
    assert {n for n, r in rows.items() if not r["featx"]} == {"thesis.partial", "my_keras_model_weights.h5"}
    assert rows["my_keras_model_weights.h5"]["why"] == "not a featx cache name"

    for ref in ("c1/thesis.partial", "c1/my_keras_model_weights.h5", "my_keras_model_weights.h5", "c1/photos"):
        code, out, err = cli(["cache", "rm", ref, "--cache-dir", "c1"], capsys)
        assert code == 2 and out == "", ref
        line = one_error_line(err)
        assert "featx cannot prove it wrote" in line and "delete it by hand" in line, line

    code, out, err = cli(["cache", "rm", "--all", "--cache-dir", "c1"], capsys)
    assert code == 0, err
    removed = [line.removeprefix("removed ") for line in out.splitlines() if line.startswith("removed ")]
    assert sorted(removed) == sorted(str(Path("c1") / p.name) for p in caches.values())
    left = [line for line in out.splitlines() if line.startswith("left alone ")]
    assert len(left) == 2 and "c1/thesis.partial:" in left[1] and "rm -r -- c1/thesis.partial" in left[1], left
    assert "c1/my_keras_model_weights.h5:" in left[0] and "rm -- c1/my_keras_model_weights.h5" in left[0], left
    assert {n: snapshot(p) for n, p in foreign.items()} == before
    assert not any(p.exists() for p in caches.values())
    assert sorted(os.listdir(c)) == [".locks", "my_keras_model_weights.h5", "photos", "thesis.partial"]
    assert os.listdir(c / ".locks") == []  # the removed caches' lock files went with them


def test_symlinks_named_like_featx_files_are_never_followed(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link named like a cache, a journal or an assembly file, to a file or folder outside: rm (by key, path,
    --all), ls and extraction leave the link and never touch its target."""
    monkeypatch.chdir(tmp_path)
    c = tmp_path / "c1"
    caches = made.cache_dir(c)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(caches["test"], outside / "real-cache.h5")  # a real featx cache, linked from the cache folder
    (outside / "journal").mkdir()
    (outside / "journal" / "journal.json").write_text('{"format": "featx-journal-1"}')
    (outside / "journal" / "thesis.tex").write_text("mine\n")
    (outside / "file.txt").write_text("precious\n")
    links = {
        c / "a-aaaaaaaaaaaaaaaaaaaa.h5": outside / "real-cache.h5",
        c / "b-bbbbbbbbbbbbbbbbbbbb.partial": outside / "journal",
        c / "d-dddddddddddddddddddd.h5.tmp": outside / "file.txt",
    }
    for link, target in links.items():
        link.symlink_to(target)
    before = snapshot(outside)
    for ref in ("aaaa", "bbbb", "dddd", "c1/a-aaaaaaaaaaaaaaaaaaaa.h5", "c1/b-bbbbbbbbbbbbbbbbbbbb.partial"):
        code, _, err = cli(["cache", "rm", ref, "--cache-dir", "c1"], capsys)
        assert code == 2 and "it is a symbolic link" in one_error_line(err), (ref, err)
    code, out, _ = cli(["cache", "rm", "--all", "--cache-dir", "c1"], capsys)
    assert code == 0 and out.count("removed ") == 2 and out.count("left alone ") == 3, out
    assert all(link.is_symlink() for link in links) and snapshot(outside) == before
    # extraction of the train split, with its journal and assembly names taken by links to things outside
    final = c / made.files["train"].name
    journal_dir(final).symlink_to(outside / "journal")
    code, _, err = cli(["-q", "extract", str(made.data), *OPTS, "--cache-dir", "c1"], capsys)
    assert code == 2 and f"wrote c1/{journal_dir(final).name} (it is a symbolic link)" in one_error_line(err)
    journal_dir(final).unlink()
    assembly_path(final).symlink_to(outside / "file.txt")
    code, _, err = cli(["-q", "extract", str(made.data), *OPTS, "--cache-dir", "c1"], capsys)
    assert code == 2 and f"wrote c1/{assembly_path(final).name} (it is a symbolic link)" in one_error_line(err)
    assert snapshot(outside) == before and not final.exists()


# --------------------------------------------------------------------------------------------------
# Key prefixes, copied caches, damaged caches


def test_refs_match_key_prefixes_not_names(made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every one-character prefix resolves to the caches whose *key* starts with it (the names hold "-efficientnet",
    "-test", "-train": a name match would find those); non-hex refs are not keys."""
    c = tmp_path / "c1"
    caches = made.cache_dir(c)
    keys = {s: key_of(p) for s, p in caches.items()}
    for ch in "0123456789abcdef":
        hits = [s for s, k in keys.items() if k.startswith(ch)]
        if len(hits) == 1:
            assert resolve_cache_path(ch, c) == caches[hits[0]]
        else:
            with pytest.raises(CacheError, match=f"no cache with key '{ch}'" if not hits else "matches 2 caches"):
                resolve_cache_path(ch, c)
    inner = keys["test"][3:9]  # part of a key, not its start
    if not any(k.startswith(inner) for k in keys.values()):
        with pytest.raises(CacheError, match="no cache with key"):
            resolve_cache_path(inner, c)
    before = snapshot(c)
    for ref, what in (("test", "'test' is not a cache key or key prefix"), ("efficientnet", "is not a cache key")):
        code, _, err = cli(["cache", "rm", ref, "--cache-dir", str(c)], capsys)
        assert code == 2 and what in one_error_line(err)
        code, _, err = cli(["cache", "verify", ref, "--cache-dir", str(c)], capsys)
        assert code == 2 and what in one_error_line(err)
    code, out, err = cli(["cache", "rm", "e", "--cache-dir", str(c)], capsys)
    e_hits = [s for s, k in keys.items() if k.startswith("e")]
    if len(e_hits) == 1:
        assert code == 0 and out == f"removed {caches[e_hits[0]]}\n"
    else:
        assert code == 2 and snapshot(c) == before, err
    assert all(p.exists() for s, p in caches.items() if s not in e_hits or len(e_hits) != 1)


def test_verify_and_rm_refuse_a_cache_copied_over_another_caches_name(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = tmp_path / "c1"
    caches = made.cache_dir(c)
    shutil.copy2(caches["train"], caches["test"])  # the test cache's name now holds the train cache
    code, out, err = cli(["cache", "verify", "--cache-dir", str(c)], capsys)
    assert code == 2 and err.startswith("featx: error: 1 of 2 cache(s) damaged")
    lines = sorted(out.splitlines())
    assert lines[0].startswith(f"DAMAGED  {caches['test'].name}: cache {caches['test']} does not hold what its name says")
    assert f"it holds the cache of key {key_of(caches['train'])}" in lines[0] and "delete it by hand" in lines[0]
    assert lines[1].startswith(f"ok       {caches['train'].name}")
    code, out, _ = cli(["cache", "verify", key_of(caches["test"]), "--cache-dir", str(c)], capsys)
    assert code == 2 and out.startswith("DAMAGED")
    before = snapshot(caches["test"])
    code, _, err = cli(["cache", "rm", key_of(caches["test"]), "--cache-dir", str(c)], capsys)
    assert code == 2 and "copied or renamed" in one_error_line(err) and snapshot(caches["test"]) == before
    code, out, _ = cli(["cache", "ls", "--json", "--cache-dir", str(c)], capsys)
    assert {r["file"]: r["featx"] for r in json.loads(out)} == {caches["test"].name: False, caches["train"].name: True}


def _flip_features(p: Path) -> None:
    with h5py.File(p, "r") as f:
        info = f["features"].id.get_chunk_info(0)
    with p.open("r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        data = fh.read(16)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))


def test_damaged_featx_caches_are_removable_and_unprovable_ones_are_left(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Damaged data under intact featx attributes: featx's, so `cache rm` removes it (and says so when reading
    fails). A file that no longer opens as HDF5 cannot be proven featx's: every message says to delete it by hand."""
    for case, damage, ours in (
        ("features flipped", _flip_features, True),
        ("an attribute edited", lambda p: h5py.File(p, "r+").attrs.__setitem__("n_images", 3), True),
        ("truncated", lambda p: os.truncate(p, p.stat().st_size // 2), False),
        ("random bytes", lambda p: p.write_bytes(np.random.default_rng(1).bytes(4000)), False),
    ):
        c = tmp_path / case.replace(" ", "_")
        path = made.cache_dir(c)["train"]
        damage(path)
        code, out, _ = cli(["cache", "verify", key_of(path), "--cache-dir", str(c)], capsys)
        assert code == 2 and out.startswith(f"DAMAGED  {path.name}: cache {path} is damaged"), (case, out)
        hint = f"`featx cache rm {key_of(path)}" if ours else f"delete it by hand (rm -- {path})"
        assert hint in out, (case, out)
        before = path.read_bytes()
        code, out, err = cli(["cache", "rm", "--all", "--cache-dir", str(c)], capsys)
        assert code == 0 and out.count("removed ") == 1 + ours, (case, out, err)
        assert path.exists() is not ours, case
        if not ours:
            assert f"left alone {path}: featx cannot prove it wrote it (it does not open as HDF5" in out, out
            assert path.read_bytes() == before
            code, _, err = cli(["cache", "rm", key_of(path), "--cache-dir", str(c)], capsys)
            assert code == 2 and "featx cannot prove it wrote" in one_error_line(err) and path.read_bytes() == before


# --------------------------------------------------------------------------------------------------
# Journals


def _journal(final: Path, *, foreign: str | None = None) -> CacheJournal:
    """A journal written by featx's own journal writer: header, one chunk, a temporary file a kill left."""
    j = CacheJournal(final)
    j.create({"key": key_of(final), "n_rows": 8, "chunk_rows": 8, "batch_size": 8})
    j.write_chunk(Chunk(0, 0, np.ones((8, 4), np.float32), np.ones(8, bool), [""] * 8))
    (j.dir / f".tmp-{os.getpid()}-chunk-000000000-0123456789abcdef.npz").write_bytes(b"half")
    if foreign:
        (j.dir / foreign).write_text("mine, not featx's\n")
    return j


def test_a_journal_of_featx_files_is_removed_and_one_holding_a_foreign_file_is_left(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = tmp_path / "c1"
    caches = made.cache_dir(c)
    ours = _journal(caches["train"])
    theirs = _journal(caches["test"], foreign="draft.tex")
    caches["test"].unlink()  # only the foreign journal is left of that key
    (c / (caches["train"].name + ".tmp")).write_bytes(b"\0" * 64)  # an assembly killed before the HDF5 signature
    (c / (caches["test"].name + ".tmp")).write_bytes(b"\0" * 64)  # same, beside the foreign journal: not provable
    before = snapshot(c)
    code, out, _ = cli(["cache", "ls", "--json", "--cache-dir", str(c)], capsys)
    rows = {r["file"]: r for r in json.loads(out)}
    assert rows[ours.dir.name]["status"] == "partial 8/8" and rows[ours.dir.name]["featx"]
    assert rows[theirs.dir.name]["why"] == "it holds draft.tex, which featx did not write"
    code, _, err = cli(["cache", "rm", key_of(caches["test"]), "--cache-dir", str(c)], capsys)
    assert code == 2 and "it holds draft.tex, which featx did not write" in one_error_line(err)
    assert snapshot(c) == before
    before = snapshot(theirs.dir)
    code, out, _ = cli(["cache", "rm", "--all", "--cache-dir", str(c)], capsys)
    assert code == 0
    assert {line.removeprefix("removed ") for line in out.splitlines() if line.startswith("removed ")} == {
        str(caches["train"]),
        str(ours.dir),
        str(c / (caches["train"].name + ".tmp")),
    }
    assert out.count("left alone ") == 2 and snapshot(theirs.dir) == before
    assert sorted(os.listdir(c)) == sorted([".locks", theirs.dir.name, caches["test"].name + ".tmp"])
    with pytest.raises(NotFeatxError, match=r"draft\.tex"):  # the journal's own clean-up deletes nothing either
        theirs.discard()
    theirs.open()
    with pytest.raises(NotFeatxError, match=r"draft\.tex"):
        theirs.verify()
    assert snapshot(theirs.dir) == before


def test_extraction_never_resumes_over_or_replaces_what_featx_did_not_write(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign file in the split's journal, a folder at its assembly name, another cache copied to its name with
    --force: one line, exit 2, before any model is built; all of it intact. Beside a cache hit a foreign journal
    is only warned about."""
    c = tmp_path / "c1"
    caches = made.cache_dir(c)
    final = caches["train"]
    argv = ["-q", "extract", str(made.data), *OPTS, "--cache-dir", str(c)]
    # a hit with a foreign journal beside it: the hit stands, the journal stays
    theirs = _journal(final, foreign="draft.tex")
    before = snapshot(theirs.dir)
    caplog.set_level("WARNING", logger="featx")
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    assert "draft.tex" in caplog.text and snapshot(theirs.dir) == before
    # no cache: the journal is in the way
    final.unlink()
    code, _, err = cli(argv, capsys)
    assert code == 2 and f"featx cannot prove it wrote {theirs.dir} (it holds draft.tex" in one_error_line(err)
    assert snapshot(theirs.dir) == before and not final.exists()
    shutil.rmtree(theirs.dir)
    # a folder at the assembly file's name (the old code crashed on it: IsADirectoryError)
    assembly_path(final).mkdir()
    (assembly_path(final) / "keep.txt").write_text("x")
    code, _, err = cli(argv, capsys)
    assert code == 2 and f"featx cannot prove it wrote {assembly_path(final)} (it is a folder)" in one_error_line(err)
    assert (assembly_path(final) / "keep.txt").read_text() == "x"
    shutil.rmtree(assembly_path(final))
    # --force over another cache copied to this name
    shutil.copy2(caches["test"], final)
    before = final.read_bytes()
    code, _, err = cli([*argv, "--force"], capsys)
    assert code == 2 and "copied or renamed" in one_error_line(err) and final.read_bytes() == before


def test_rm_is_refused_while_an_extraction_holds_the_key_lock(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = tmp_path / "c1"
    caches = made.cache_dir(c)
    held = caches["train"]
    journal = _journal(held)
    with KeyLock(lock_path(held)):  # what a running extraction holds (a separate open file: flock conflicts)
        before = snapshot(c)
        code, out, err = cli(["cache", "rm", key_of(held), "--cache-dir", str(c)], capsys)
        assert code == 2 and out == ""
        line = one_error_line(err)
        assert f"an extraction of {key_of(held)} is running (pid {os.getpid()})" in line and "wait for it" in line
        assert snapshot(c) == before
        code, out, err = cli(["cache", "rm", "--all", "--cache-dir", str(c)], capsys)
        assert code == 2 and out == f"removed {caches['test']}\n"
        assert f"2 of featx's entries kept: an extraction of {key_of(held)} is running" in one_error_line(err)
        assert held.exists() and journal.problem() is None and lock_path(held).read_text() == f"{os.getpid()}\n"
    code, out, _ = cli(["cache", "rm", key_of(held), "--cache-dir", str(c)], capsys)
    assert code == 0 and out == f"removed {held}\nremoved {journal.dir}\n"
    assert sorted(os.listdir(c)) == [".locks"] and os.listdir(c / ".locks") == []


# --------------------------------------------------------------------------------------------------
# A running extraction whose journal is removed under it (a fresh process, stopped while the test acts)


def test_a_running_extraction_keeps_its_journal_from_rm_and_says_what_happened_when_it_vanishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 40}, n_classes=3)  # 120 rows: 4 journal chunks of 32
    c = tmp_path / "c1"
    cmd = [sys.executable, "-m", "featx", "extract", str(data), "--image-size", "48", "--batch-size", "4"]
    proc = subprocess.Popen([*cmd, "--num-workers", "0", "--cache-dir", str(c)], stderr=subprocess.PIPE, text=True)
    try:
        partial = None
        while proc.poll() is None:
            partial = next(c.glob("*.partial"), None) if c.is_dir() else None
            if partial is not None and any(n.startswith("chunk-") for n in os.listdir(partial)):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)  # frozen while this test acts: nothing below races it
        assert partial is not None and not list(c.glob("*.h5")), "the extraction finished before it could be stopped"
        chunks = sorted(os.listdir(partial))
        code, out, err = cli(["cache", "rm", "--all", "--cache-dir", str(c)], capsys)
        assert code == 2 and out == "", out
        assert f"is running (pid {proc.pid})" in one_error_line(err)
        assert sorted(os.listdir(partial)) == chunks
        shutil.rmtree(partial)  # another program does what featx cache rm refused to do
        proc.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    assert proc.returncode == 2, stderr
    line = one_error_line(stderr)
    assert f"the journal {partial} was removed while this extraction ran" in line and "run the same command again" in line
    assert "free space" not in line
