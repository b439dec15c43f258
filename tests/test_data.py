"""Datasets: discovery, decoding of odd image files, and deterministic splitting."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.data import SplitPlan, load_dataset, load_image, sample_per_class, stratified_split
from featx.errors import DataError

from .conftest import make_imagefolder


def test_imagefolder_with_splits_and_ignored_files(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", {"train": 3, "test": 2}, n_classes=3)
    (root / "train" / "class_0" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("x")
    ds = load_dataset(root)
    assert ds.classes == ("class_0", "class_1", "class_2")
    assert set(ds.splits) == {"train", "test"}
    assert len(ds.split("train")) == 9 and len(ds.split("test")) == 6
    assert ds.ignored_files == 1  # notes.txt; files beside the split folders are not scanned
    assert ds.split("train").paths[0] == "train/class_0/000.png"
    assert ds.split("train").labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_flat_imagefolder_is_a_single_train_split(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", {"x": 2})
    ds = load_dataset(root / "x")
    assert list(ds.splits) == ["train"] and len(ds.split("train")) == 4


def test_csv_manifest(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", {"all": 2})
    rows = [
        "path,label,split",
        "all/class_0/000.png,cat,train",
        "all/class_1/000.png,dog,train",
        "all/class_0/001.png,cat,test",
        "all/class_1/001.png,dog,test",
        "notes.txt,dog,train",
    ]
    (root / "m.csv").write_text("\n".join(rows))
    ds = load_dataset(root / "m.csv")
    assert ds.source == "csv" and ds.classes == ("cat", "dog")
    assert ds.split("test").labels.tolist() == [0, 1]
    assert ds.ignored_files == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "no class folders"),
        (lambda p: (p / "a").mkdir(parents=True), "no images"),
    ],
)
def test_bad_datasets_raise_one_line_errors(tmp_path: Path, setup, message: str) -> None:
    p = tmp_path / "bad"
    setup(p)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(p)
    assert "\n" not in str(info.value)


def test_csv_with_missing_files_and_unknown_labels(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, {"all": 1})
    (tmp_path / "a.csv").write_text("path,label\nall/class_0/000.png,a\nmissing.png,b\n")
    ds = load_dataset(tmp_path / "a.csv")  # a listed file that is not there is a position that fails, not an error
    assert ds.split("train").paths == ("all/class_0/000.png", "missing.png")
    assert ds.notes == ["1 listed file(s) not found; they are recorded as failures"]
    (tmp_path / "b.csv").write_text("path,label,split\nall/class_0/000.png,a,train\nall/class_1/000.png,zzz,test\n")
    with pytest.raises(DataError, match="not in train"):
        load_dataset(tmp_path / "b.csv")


def _roundtrip(im: Image.Image, fmt: str, tmp_path: Path, **save: object) -> Image.Image:
    path = tmp_path / f"img.{fmt.lower()}"
    im.save(path, format=fmt, **save)
    return load_image(path)


def test_odd_image_modes_become_rgb(tmp_path: Path) -> None:
    gray16 = Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16))
    out = _roundtrip(gray16, "PNG", tmp_path)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    half16 = Image.fromarray(np.full((10, 12), 32896, dtype=np.uint16))  # 0x8080 -> 128, not clipped to 255
    assert _roundtrip(half16, "PNG", tmp_path).getpixel((0, 0)) == (128, 128, 128)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent -> white background
    assert _roundtrip(rgba, "PNG", tmp_path).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    assert _roundtrip(pal, "PNG", tmp_path).getpixel((0, 0)) == (0, 0, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    r, g, b = _roundtrip(cmyk, "JPEG", tmp_path).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    for fmt in ("BMP", "WEBP", "TIFF"):
        assert _roundtrip(Image.new("L", (5, 7), 100), fmt, tmp_path).size == (5, 7)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_stratified_split_is_seeded_disjoint_and_stratified() -> None:
    labels = np.repeat([0, 1, 2], [10, 20, 1])
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert set(keep).isdisjoint(held) and len(keep) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 4, 0]  # a single-image class is never held out
    _keep2, held2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(held, held2)
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=4)[1])


def test_split_plan_carves_val_and_test_from_train(tmp_path: Path) -> None:
    ds = load_dataset(make_imagefolder(tmp_path / "ds", {"train": 10}, n_classes=2))
    plan = SplitPlan(val_fraction=0.2, test_fraction=0.3, seed=0).resolve(ds)
    rows = {k: set(v.positions) for k, v in plan.items()}
    assert all(v.split == "train" for v in plan.values())
    assert len(rows["test"]) == 6 and len(rows["val"]) == 2 and len(rows["train"]) == 12
    assert rows["train"].isdisjoint(rows["val"]) and rows["train"].isdisjoint(rows["test"])


def test_sample_per_class_never_exceeds_the_class() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    idx = sample_per_class(labels, 2, seed=0)
    assert np.bincount(labels[idx]).tolist() == [2, 2, 1]
