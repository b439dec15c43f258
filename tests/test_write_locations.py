"""featx never writes into the dataset it reads: a cache, head or fine-tuning folder inside it is refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from featx.cli import main

from .conftest import make_imagefolder


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "args",
    [
        ["extract", "{data}", "--cache-dir", "{data}/train/cache", "--image-size", "64"],
        ["extract", "{data}", "--cache-dir", "{data}", "--image-size", "64"],
        ["fit-head", "{data}", "--extract", "--out-dir", "{data}/train/heads", "--image-size", "64", "--cache-dir", "{cache}"],
        ["finetune", "{data}", "--strategy", "head", "--epochs", "1", "--image-size", "64", "--out-dir", "{data}/train/zz"],
    ],
    ids=["extract-cache-in-class", "extract-cache-is-root", "fit-head-out", "finetune-out"],
)
def test_output_folders_inside_the_dataset_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 4, "val": 2, "test": 2}, n_classes=2)
    before = _tree(data)
    argv = [a.format(data=data, cache=tmp_path / "c") for a in args]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "inside the dataset" in err
    assert _tree(data) == before  # no class folder, no file, nothing created in the dataset


def test_a_cache_folder_beside_the_dataset_is_fine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 3}, n_classes=2)
    code = main(["extract", str(data), "--cache-dir", str(tmp_path / "data-cache"), "--image-size", "64"])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "data-cache").glob("*.h5"))) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["fit-head", "{data}", "--extract", "--out-dir", "{bad}", "--image-size", "64", "--cache-dir", "{cache}"],
        ["fit-head", "--train", "{cache}/x.h5", "--out-dir", "{bad}"],
        ["finetune", "{data}", "--strategy", "head", "--epochs", "1", "--image-size", "64", "--out-dir", "{bad}"],
        ["rank", "{data}", "--image-size", "64", "--cache-dir", "{cache}", "--out", "{bad}"],
        ["bench", "--quick", "--out-dir", "{bad}"],
        ["bench", "--quick", "--out-dir", "{tmp}/b", "--cache-dir", "{bad}"],
        ["predict", "{tmp}/no-head.skops", "{data}/test", "--output", "{bad}/p.csv"],
    ],
    ids=["fit-head", "fit-head-caches", "finetune", "rank", "bench-out", "bench-cache", "predict"],
)
def test_an_output_folder_under_a_file_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """A folder featx cannot create (a file stands in its path) is a one-line usage error before anything runs,
    not an internal error after the work (the sibling of the inside-the-dataset check)."""
    data = make_imagefolder(tmp_path / "data", {"train": 4, "val": 2, "test": 2}, n_classes=2)
    (tmp_path / "afile").write_text("mine")
    argv = [a.format(data=data, cache=tmp_path / "c", bad=tmp_path / "afile" / "out", tmp=tmp_path) for a in args]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a directory" in err and "afile" in err, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "b").exists()  # nothing extracted, nothing created
    assert (tmp_path / "afile").read_text() == "mine"
