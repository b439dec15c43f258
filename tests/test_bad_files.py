"""Bad files never stop a run; user errors are one line and exit 2 (issue 13, items 4 and 5).

A hostile corpus is generated in the test (dangling symlinks, non-UTF-8 names, folders and FIFOs named
like images, unreadable files, truncations, random bytes, empty files, a decompression bomb, an image
over the pixel cap, odd but valid modes) and run through ``featx extract`` end to end; image bytes are
fuzzed with hypothesis through the reader the DataLoader uses. Set ``FEATX_BADFILES_COUNTS=<file.json>``
to have the tests write the counts quoted in benchmarks/results/reliability_bad_files.md.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featx.backbones import Preprocessing
from featx.cli import main
from featx.data import (
    FAILURE_PREFIXES,
    ImageFiles,
    is_transient_failure,
    list_images,
    load_dataset,
    load_image,
    printable_path,
    read_image,
)
from featx.errors import DataError

from .conftest import make_image, make_imagefolder

PREPROCESSING = Preprocessing(32, 37, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SETPRIV = shutil.which("setpriv")
# Root reads chmod-000 files anyway (CAP_DAC_OVERRIDE). To get a real "permission denied", the CLI runs
# with those two capabilities dropped (setpriv, util-linux); without setpriv the case is left out.
CAN_DENY = not IS_ROOT or SETPRIV is not None
DROP_DAC = [
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


def _record_counts(section: str, counts: dict[str, int]) -> None:
    """Append ``counts`` under ``section`` to $FEATX_BADFILES_COUNTS (for the reliability report)."""
    target = os.environ.get("FEATX_BADFILES_COUNTS")
    if not target:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = counts
    path.write_text(json.dumps(data, indent=2))


def _encoded(im: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking 8-bit RGB PNG header declaring ``width`` x ``height`` with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """A baseline JPEG with its frame header (SOF0) patched to declare ``width`` x ``height``."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def odd_mode_images() -> dict[str, bytes]:
    """Valid images in modes that need converting: they must decode (no failure)."""
    rgb = make_image(np.random.default_rng(1), 0)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    gray16 = Image.fromarray((np.arange(72 * 72, dtype=np.uint16).reshape(72, 72) * 9).astype(np.uint16))
    return {
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": _encoded(gray16, "PNG"),
        "palette_transparent.png": _encoded(pal, "PNG", transparency=0),
        "la.png": _encoded(rgb.convert("LA"), "PNG"),
        "bilevel.bmp": _encoded(rgb.convert("1"), "BMP"),
        "float.tif": _encoded(Image.fromarray(np.linspace(0, 1, 72 * 72, dtype=np.float32).reshape(72, 72), "F"), "TIFF"),
        "png_named.jpg": _encoded(rgb, "PNG"),  # wrong extension, fine content
    }


def build_corpus(root: Path, *, deny: bool) -> tuple[dict[str, str], set[str]]:
    """An ImageFolder ``root/<class>/...`` full of bad files. Returns (expected failure prefix by path
    relative to root, paths of files that must decode)."""
    rng = np.random.default_rng(0)
    a, b = root / "class_a", root / "class_b"
    a.mkdir(parents=True)
    b.mkdir()
    good: set[str] = set()
    bad: dict[str, str] = {}

    def put(rel: str, data: bytes, expect: str | None) -> None:
        (root / rel).write_bytes(data)
        if expect is None:
            good.add(rel)
        else:
            bad[rel] = expect

    for i in range(4):
        put(f"class_a/good_{i}.png", _encoded(make_image(rng, 0), "PNG"), None)
        put(f"class_b/good_{i}.jpg", _encoded(make_image(rng, 1), "JPEG"), None)
    for name, data in odd_mode_images().items():
        put(f"class_a/{name}", data, None)
    # a file name that is not UTF-8 (bytes 0xff 0xfe): a good image and a bad one
    for data, expect, tail in [(_encoded(make_image(rng, 1), "PNG"), None, b"ok"), (b"junk" * 10, "decode error: ", b"bad")]:
        raw = os.fsencode(b) + b"/latin1_\xe9\xff" + tail + b".png"
        with open(raw, "wb") as fh:
            fh.write(data)
        rel = "class_b/" + os.fsdecode(raw.rsplit(b"/", 1)[1])
        (good.add(rel) if expect is None else bad.__setitem__(rel, expect))

    jpeg = _encoded(make_image(rng, 0), "JPEG", quality=90)
    png = _encoded(make_image(rng, 1), "PNG")
    for frac in (0.01, 0.1, 0.5, 0.9):
        put(f"class_a/trunc_{int(frac * 100):02d}.jpg", jpeg[: max(3, int(len(jpeg) * frac))], "decode error: ")
        put(f"class_b/trunc_{int(frac * 100):02d}.png", png[: max(20, int(len(png) * frac))], "decode error: ")
    put("class_a/trunc_header.png", png[:8], "decode error: ")
    for ext in (".jpg", ".png", ".webp", ".tif", ".bmp", ".jpeg"):
        put(f"class_b/random{ext}", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "decode error: ")
        put(f"class_a/empty{ext}", b"", "decode error: ")
    put("class_a/bomb.png", bomb_png(), "too large: ")
    put("class_b/jpeg_bomb.jpg", jpeg_declaring(jpeg, 65000, 65000), "too large: ")
    put("class_b/huge.png", _encoded(Image.new("RGB", (300, 300), (9, 9, 9)), "PNG"), "too large: ")  # over the cap set below
    put("class_a/strip.png", _encoded(Image.new("L", (2000, 4), 50), "PNG"), "too large: ")  # 500:1
    put("class_a/script.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "decode error: ")

    os.symlink("does_not_exist.png", a / "dangling.png")
    bad["class_a/dangling.png"] = "missing: "
    os.symlink(b / "gone_dir" / "x.jpg", b / "dangling_abs.jpg")
    bad["class_b/dangling_abs.jpg"] = "missing: "
    os.symlink("loop.jpg", a / "loop.jpg")
    bad["class_a/loop.jpg"] = "not a file: "
    (a / "folder.jpg").mkdir()
    bad["class_a/folder.jpg"] = "not a file: "
    (b / "nested.png" / "deeper").mkdir(parents=True)
    bad["class_b/nested.png"] = "not a file: "
    os.mkfifo(b / "pipe.jpg")
    bad["class_b/pipe.jpg"] = "not a file: "
    os.symlink("/dev/zero", a / "device.png")
    bad["class_a/device.png"] = "not a file: "
    os.symlink(str(a), a / "loopdir")  # a folder symlink loop: its files must be listed once
    if deny:
        put("class_b/unreadable.png", _encoded(make_image(rng, 1), "PNG"), "permission denied: ")
        os.chmod(b / "unreadable.png", 0)
    (a / "notes.txt").write_text("not an image")
    return bad, good


def _cli(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``featx`` in a fresh process; as root, without the capabilities that bypass file permissions."""
    prefix = [SETPRIV, *DROP_DAC] if IS_ROOT and SETPRIV else []
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "featx", *args], capture_output=True, text=True, env=env, cwd=cwd, check=False
    )


def test_scan_lists_every_bad_path_once_and_fingerprints_it(tmp_path: Path) -> None:
    bad, good = build_corpus(tmp_path / "ds", deny=True)
    ds = load_dataset(tmp_path / "ds")
    paths = ds.split("train").paths
    assert sorted(paths) == sorted([*bad, *good])  # the folder loop added nothing, notes.txt ignored
    assert ds.ignored_files == 1
    fp = ds.split("train").fingerprint()
    assert fp == load_dataset(tmp_path / "ds").split("train").fingerprint()
    os.unlink(tmp_path / "ds" / "class_a" / "good_0.png")  # a file gone: the key changes, nothing raises
    assert load_dataset(tmp_path / "ds").split("train").fingerprint() != fp
    assert {printable_path(p) for p in paths if "latin1_" in p} == {
        "class_b/latin1_\\xe9\\xffok.png",
        "class_b/latin1_\\xe9\\xffbad.png",
    }


@pytest.mark.skipif(not CAN_DENY, reason="running as root without setpriv: chmod 000 cannot deny root")
def test_extract_records_every_bad_file_once_and_strict_fails(tmp_path: Path) -> None:
    """The corpus through ``featx extract``: exit 0, each bad file is one failure row with its reason,
    every good file has features; ``--strict`` exits 2 with one line and keeps the cache."""
    root = tmp_path / "ds"
    bad, good = build_corpus(root, deny=True)
    cache = tmp_path / "cache"
    opts = ["--image-size", "64", "--num-workers", "0", "--cache-dir", str(cache)]
    env = {"FEATX_MAX_IMAGE_PIXELS": "20000"}  # the 300x300 image is over it, the 72x72 ones are not
    res = _cli(["-q", "extract", str(root), *opts], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"{len(bad) + len(good)} images, {len(bad)} skipped" in res.stdout
    assert "Traceback" not in res.stderr

    paths = load_dataset(root).split("train").paths
    [h5] = cache.glob("*.h5")
    with h5py.File(h5, "r") as f:
        index = f["failures/index"][:].tolist()
        reasons = [r.decode() if isinstance(r, bytes) else str(r) for r in f["failures/reason"][:]]
        valid = f["valid"][:]
        features = f["features"][:]
        stored_paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][:]]
    assert len(index) == len(set(index)) == len(bad)  # once each, nothing else
    by_path = {paths[i]: r for i, r in zip(index, reasons)}
    wrong = {p: by_path.get(p) for p, prefix in bad.items() if not (by_path.get(p) or "").startswith(prefix)}
    assert not wrong
    assert all(r.startswith(FAILURE_PREFIXES) and "\n" not in r for r in reasons)
    for i, p in enumerate(paths):
        assert bool(valid[i]) == (p in good), p
    good_rows = [i for i, p in enumerate(paths) if p in good]
    assert np.isfinite(features[good_rows]).all() and (np.abs(features[good_rows]).sum(axis=1) > 0).all()
    assert stored_paths == [printable_path(p) for p in paths]
    _record_counts(
        "corpus",
        {
            "bad_inputs": len(bad),
            "good_inputs_odd_modes_and_names": len(good),
            "exit_code": res.returncode,
            "failures_recorded": len(index),
            "records_lost": len(bad) - len(set(index) & {paths.index(p) for p in bad}),
            "good_files_without_features": int(sum(not valid[i] for i in good_rows)),
        },
    )

    res = _cli(["-q", "extract", str(root), *opts, "--strict"], env, tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("featx: error: ") and res.stderr.count("\n") == 1
    assert list(cache.glob("*.h5")) == [h5]


def test_a_file_deleted_after_the_scan_is_vanished_and_transient(tmp_path: Path) -> None:
    from featx.extraction import extract

    root = make_imagefolder(tmp_path / "ds", {"train": 3})
    ds = load_dataset(root)
    victim = ds.split("train").paths[1]
    (root / victim).unlink()
    [res] = extract(ds, image_size=64, num_workers=0, cache_dir=tmp_path / "c", progress=False)
    assert res.n_failed == 1
    [(path, reason)] = res.failures
    assert path == victim and reason.startswith("vanished: ") and is_transient_failure(reason)


def test_reader_reasons_for_paths_that_are_not_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the DataLoader sees for each odd path; no exception, a zero image of the expected shape."""
    bad, good = build_corpus(tmp_path / "ds", deny=False)
    files = ImageFiles(tmp_path / "ds", sorted([*bad, *good]), None, PREPROCESSING.build_transform(), failed_shape=(3, 32, 32))
    monkeypatch.setenv("FEATX_MAX_IMAGE_PIXELS", "20000")
    items = [files[i] for i in range(len(files))]
    for (image, _label, pos, error), rel in zip(items, files.paths):
        assert tuple(image.shape) == (3, 32, 32) and pos == files.paths.index(rel)
        if rel in good:
            assert error == "", (rel, error)
        else:
            assert error.startswith(bad[rel]), (rel, error)
    with pytest.raises(DataError, match="dangling symlink") as info:
        load_image(tmp_path / "ds" / "class_a" / "dangling.png")
    assert "\n" not in str(info.value)


def test_transient_and_final_failures() -> None:
    transient = ["missing: x", "vanished: x", "permission denied: x", "i/o error: x", "PermissionError: [Errno 13]"]
    final = ["decode error: x", "too large: x", "not a file: a folder", "OSError: image file is truncated"]
    assert all(is_transient_failure(r) for r in transient)
    assert not any(is_transient_failure(r) for r in final)


def test_printable_path_is_utf8_safe() -> None:
    name = os.fsdecode(b"caf\xe9/\xff.png")
    out = printable_path(name)
    assert out == "caf\\xe9/\\xff.png" and out.encode("utf-8")
    assert printable_path("plain/é.png") == "plain/é.png"
    assert printable_path("\ud800x").encode("utf-8")  # a lone surrogate that is no escaped byte
    assert printable_path(b"\xffa") == "\\xffa"


# --------------------------------------------------------------------------------------------------
# Fuzzing: random and mutated image bytes through the DataLoader's reader

_SEEDS = {
    fmt: _encoded(make_image(np.random.default_rng(3), 2, size=24), fmt) for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
}
_FUZZ_COUNTS = {"examples": 0}
_FUZZ_LONG_COUNTS = {"examples": 0}


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid small image with bytes overwritten, inserted, deleted or cut off."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=4096))
    data = bytearray(_SEEDS[draw(st.sampled_from(sorted(_SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def _check_fuzzed(tmp_path: Path, data: bytes, ext: str, counts: dict[str, int], section: str) -> None:
    """One input through the DataLoader's reader and through load_image: no exception but DataError,
    a zero image of the expected shape on failure, a one-line reason that is the same when read again."""
    name = f"fuzz{ext}"
    (tmp_path / name).write_bytes(data)
    files = ImageFiles(tmp_path, [name], [3], PREPROCESSING.build_transform(), failed_shape=(3, 32, 32))
    image, label, pos, error = files[0]
    again = read_image(tmp_path / name)[1]
    assert tuple(image.shape) == (3, 32, 32) and (label, pos) == (3, 0)
    assert error == "" or (error.startswith(FAILURE_PREFIXES) and "\n" not in error and error.encode("utf-8"))
    if not error:
        assert again == "" and load_image(tmp_path / name).mode == "RGB"
    else:
        assert again == error  # reasons are reproducible (a resumed cache equals an uninterrupted one)
        assert not is_transient_failure(error)  # bytes that do not decode will not decode next time either
        with pytest.raises(DataError):
            load_image(tmp_path / name)
    counts["examples"] += 1
    counts[error.split(":")[0] if error else "decoded"] = counts.get(error.split(":")[0] if error else "decoded", 0) + 1
    _record_counts(section, dict(counts, crashes=0))


_FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
_EXTS = st.sampled_from([".jpg", ".png", ".bmp", ".tif", ".webp"])


@settings(max_examples=150, **_FUZZ)
@given(data=image_bytes(), ext=_EXTS)
def test_fuzzed_image_bytes_never_raise_and_always_give_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, ext: str
) -> None:
    monkeypatch.setenv("FEATX_MAX_IMAGE_PIXELS", "4000000")  # a mutated header may declare any size; keep decodes small
    _check_fuzzed(tmp_path, data, ext, _FUZZ_COUNTS, "fuzz")


@pytest.mark.slow
@settings(max_examples=3000, **_FUZZ)
@given(data=image_bytes(), ext=_EXTS)
def test_fuzzed_image_bytes_long_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, ext: str) -> None:
    monkeypatch.setenv("FEATX_MAX_IMAGE_PIXELS", "4000000")
    _check_fuzzed(tmp_path, data, ext, _FUZZ_LONG_COUNTS, "fuzz_long")


# --------------------------------------------------------------------------------------------------
# CSV manifests: encodings and confinement


def _csv_dataset(tmp_path: Path) -> Path:
    make_imagefolder(tmp_path / "in", {"all": 1})
    return tmp_path / "in"


def test_csv_utf8_with_bom_reads(tmp_path: Path) -> None:
    root = _csv_dataset(tmp_path)
    (root / "m.csv").write_bytes("path,label\nall/class_0/000.png,caf\u00e9\nall/class_1/000.png,th\u00e9\n".encode("utf-8-sig"))
    ds = load_dataset(root / "m.csv")
    assert ds.classes == ("caf\u00e9", "th\u00e9") and len(ds.split("train")) == 2


@pytest.mark.parametrize(
    ("encoding", "line"),
    [("latin-1", 3), ("utf-16", 1), ("cp1252", 3)],
)
def test_csv_that_is_not_utf8_is_one_line_error(tmp_path: Path, encoding: str, line: int) -> None:
    root = _csv_dataset(tmp_path)
    (root / "m.csv").write_bytes("path,label\nall/class_0/000.png,a\nall/class_1/000.png,caf\u00e9\n".encode(encoding))
    with pytest.raises(DataError) as info:
        load_dataset(root / "m.csv")
    assert str(info.value) == f"CSV {root / 'm.csv'} is not UTF-8 (line {line}): save it as UTF-8"
    with pytest.raises(DataError, match="is not UTF-8"):
        list_images([root / "m.csv"])


def _outside_cases(tmp_path: Path) -> dict[str, str]:
    root = _csv_dataset(tmp_path)
    make_image(np.random.default_rng(0), 0).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    os.symlink(tmp_path, root / "up")
    return {
        "dotdot": "../secret.png",
        "absolute": str(tmp_path / "secret.png"),
        "symlink": "escape.png",
        "symlinked_folder": "up/secret.png",
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_csv_paths_outside_the_csv_folder_are_refused(tmp_path: Path, case: str) -> None:
    rel = _outside_cases(tmp_path)[case]
    root = tmp_path / "in"
    (root / "m.csv").write_text(f"path,label\nall/class_0/000.png,a\n{rel},b\n")
    with pytest.raises(DataError, match="outside the CSV's folder") as info:
        load_dataset(root / "m.csv")
    assert "\n" not in str(info.value) and "line 3" in str(info.value) and "allow-outside-root" in str(info.value)
    ds = load_dataset(root / "m.csv", allow_outside_root=True)
    [_, outside] = ds.split("train").paths
    assert load_image(root / outside).size == (72, 72)
    (root / "p.csv").write_text(f"path\n{rel}\n")
    with pytest.raises(DataError, match="outside the CSV's folder"):
        list_images([root / "p.csv"])
    assert len(list_images([root / "p.csv"], allow_outside_root=True)[1]) == 1


def test_csv_paths_inside_and_missing_ones_are_fine(tmp_path: Path) -> None:
    root = _csv_dataset(tmp_path)
    os.symlink(root / "all" / "class_0" / "000.png", root / "inside_link.png")
    (root / "m.csv").write_text(
        "path,label\n./all/class_0/000.png,a\ninside_link.png,a\nall/../all/class_1/000.png,b\nnope.png,b\n"
    )
    ds = load_dataset(root / "m.csv")
    assert len(ds.split("train")) == 4 and ds.notes
    files = ImageFiles(root, ds.split("train").paths, None, PREPROCESSING.build_transform(), failed_shape=(3, 32, 32))
    errors = [files[i][3] for i in range(4)]
    assert (
        errors[:3] == ["", "", ""] and errors[3].startswith("missing: ") and "not there when the dataset was scanned" in errors[3]
    )


@pytest.mark.parametrize("flag", [[], ["--allow-outside-root"]])
def test_cli_refuses_outside_paths_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flag: list[str]
) -> None:
    """fit-head loads the dataset first; with the flag it gets past the scan to the (missing) caches."""
    monkeypatch.chdir(tmp_path)
    _outside_cases(tmp_path)
    (tmp_path / "in" / "m.csv").write_text("path,label\nall/class_0/000.png,a\n../secret.png,b\n")
    code = main(["fit-head", str(tmp_path / "in" / "m.csv"), "--cache-dir", str(tmp_path / "c"), *flag])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert ("outside the CSV's folder" in err) == (not flag)
    assert ("no cache for split" in err) == bool(flag)


# --------------------------------------------------------------------------------------------------
# Numeric flags: argparse refuses them (one line, exit 2) before anything is loaded or built

BAD_NUMBERS = [
    ("extract", "--batch-size", "-1"),
    ("extract", "--batch-size", "0"),
    ("extract", "--batch-size", "2.5"),
    ("extract", "--num-workers", "-1"),
    ("extract", "--image-size", "0"),
    ("extract", "--image-size", "abc"),
    ("fit-head", "--val-fraction", "0"),
    ("fit-head", "--val-fraction", "1"),
    ("fit-head", "--test-fraction", "-0.2"),
    ("fit-head", "--test-fraction", "nan"),
    ("fit-head", "--seed", "-3"),
    ("fit-head", "--n-jobs", "0"),
    ("fit-head", "--n-jobs", "-2"),
    ("fit-head", "--batch-size", "-5"),
    ("predict", "--batch-size", "0"),
    ("predict", "--num-workers", "-1"),
    ("finetune", "--epochs", "0"),
    ("finetune", "--trainable-blocks", "0"),
    ("finetune", "--lr", "0"),
    ("finetune", "--lr", "inf"),
    ("finetune", "--backbone-lr-scale", "-1"),
    ("finetune", "--momentum", "1.5"),
    ("finetune", "--weight-decay", "-1e-4"),
    ("finetune", "--dropout", "1"),
    ("finetune", "--label-smoothing", "-0.1"),
    ("finetune", "--warmup-epochs", "-1"),
    ("finetune", "--patience", "-1"),
    ("finetune", "--val-fraction", "1.5"),
    ("finetune", "--image-size", "-224"),
]


@pytest.mark.parametrize(("command", "flag", "value"), BAD_NUMBERS)
def test_bad_numbers_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, flag: str, value: str
) -> None:
    positional = {"predict": ["head.skops", "img.png"]}.get(command, ["data"])
    code = main([command, *positional, f"{flag}={value}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"featx {command}: error: argument {flag}") and err.count("\n") == 1, err
    assert f"'{value}'" in err


def test_every_numeric_flag_is_validated() -> None:
    """No int/float flag is left without a validator (a new one must get one, and a case above)."""
    from featx.cli import build_parser

    parser = build_parser()
    unchecked = []
    for action in parser._subparsers._group_actions[0].choices.items():
        name, sub = action
        for a in sub._actions:
            if a.type in (int, float):
                unchecked.append(f"{name} {a.option_strings}")
    assert not unchecked


def test_good_numbers_still_parse() -> None:
    from featx.cli import build_parser

    args = build_parser().parse_args(
        [
            "finetune",
            "d",
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--dropout",
            "0",
            "--val-fraction",
            "0.1",
            "--num-workers",
            "0",
            "--seed",
            "0",
        ]
    )
    assert (args.epochs, args.lr, args.dropout, args.val_fraction, args.num_workers) == (1, 1e-3, 0.0, 0.1, 0)
    args = build_parser().parse_args(["fit-head", "d", "--n-jobs", "-1", "--image-size", "64"])
    assert (args.n_jobs, args.image_size) == (-1, 64)


# --------------------------------------------------------------------------------------------------
# Cache folders that cannot take the cache: one line, exit 2 (the cache side is featx.extraction's)


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_cache_folder_that_is_not_a_folder_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 2})
    (tmp_path / "file").write_text("x")
    code = main(["extract", str(data), "--image-size", "64", "--num-workers", "0", "--cache-dir", str(tmp_path / where)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("featx: error: ") and err.count("\n") == 1 and "cache folder" in err


@pytest.mark.skipif(not CAN_DENY, reason="running as root without setpriv: a read-only folder cannot stop root")
def test_unwritable_cache_folder_is_one_line_error(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 2})
    (tmp_path / "ro").mkdir(mode=0o555)
    res = _cli(
        ["-q", "extract", str(data), "--image-size", "64", "--num-workers", "0", "--cache-dir", str(tmp_path / "ro")],
        {},
        tmp_path,
    )
    assert res.returncode == 2 and res.stderr.startswith("featx: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "ermission denied" in res.stderr and not list((tmp_path / "ro").iterdir())


FULL_DISK = """
mount -t tmpfs -o size=48k featx-full "$CACHE" || exit 97
"$PY" -m featx -q extract "$DATA" --image-size 64 --num-workers 0 --cache-dir "$CACHE" >"$OUT/out1" 2>"$OUT/err1"
echo $? >"$OUT/rc1"
ls -A "$CACHE" >"$OUT/ls1"
mount -o remount,size=16m "$CACHE"
"$PY" -m featx -q extract "$DATA" --image-size 64 --num-workers 0 --cache-dir "$CACHE" >"$OUT/out2" 2>"$OUT/err2"
echo $? >"$OUT/rc2"
ls -A "$CACHE" >"$OUT/ls2"
"""


@pytest.mark.slow  # two fresh processes that each build the model (~20 s on 2 cores)
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) to mount a small private tmpfs")
def test_full_disk_is_one_line_error_and_the_next_run_resumes(tmp_path: Path) -> None:
    """ENOSPC on a 48 KiB tmpfs mounted in a private mount namespace (nothing outside the test sees it)."""
    data = make_imagefolder(tmp_path / "data", {"train": 6})
    (tmp_path / "cache").mkdir()
    (tmp_path / "out").mkdir()
    ns = ["unshare", "--mount", "--propagation", "private"] if IS_ROOT else ["unshare", "--user", "--map-root-user", "--mount"]
    env = {**os.environ, "PY": sys.executable, "DATA": str(data), "CACHE": str(tmp_path / "cache"), "OUT": str(tmp_path / "out")}
    res = subprocess.run([*ns, "sh", "-c", FULL_DISK], capture_output=True, text=True, env=env, check=False)
    if res.returncode == 97 or not (tmp_path / "out" / "rc1").exists():
        pytest.skip(f"cannot mount a private tmpfs here: {(res.stderr or res.stdout).strip()[:200]}")
    out = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert out["rc1"].strip() == "2", out
    assert out["err1"].startswith("featx: error: no space left on device writing ") and out["err1"].count("\n") == 1
    assert any(name.endswith(".partial") for name in out["ls1"].split())  # kept for resume
    assert out["rc2"].strip() == "0", out
    assert [n for n in out["ls2"].split() if not n.startswith(".")] == [
        n.removesuffix(".partial") + ".h5" for n in out["ls1"].split() if n.endswith(".partial")
    ]
