"""Extraction into HDF5 caches: round trip, keys, atomic writes, bad images, cache management."""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.backbones import build_backbone
from featx.cache import list_caches, load_cache, read_cache_attrs, remove_caches, write_cache_file
from featx.data import load_dataset
from featx.errors import CacheError, DataError, UsageError
from featx.extraction import compute_features, extract

from .conftest import make_imagefolder

FAST = {"image_size": 64, "progress": False, "batch_size": 8, "num_workers": 0}


def test_round_trip_features_labels_paths(tiny_dataset: Path, tmp_path: Path) -> None:
    [res] = extract(tiny_dataset, splits=["train"], cache_dir=tmp_path / "c", **FAST)
    assert not res.hit and res.n_images == 16 and res.n_failed == 0
    fs = load_cache(res.path)
    split = load_dataset(tiny_dataset).split("train")
    assert fs.paths == list(split.paths)
    assert np.array_equal(fs.labels, split.labels)
    assert np.array_equal(fs.indices, np.arange(16))
    assert fs.features.shape == (16, 1280) and fs.features.dtype == np.float32
    # the cache holds exactly what an in-memory pass computes (different batch size on purpose)
    bb = build_backbone("efficientnet_lite0", image_size=64)
    feats, errors = compute_features(bb, split.root, split.paths, batch_size=5, num_workers=0, device="cpu")
    assert errors == [""] * 16
    np.testing.assert_allclose(fs.features, feats, rtol=1e-4, atol=1e-5)
    a = fs.attrs
    assert a["complete"] and a["backbone"] == "efficientnet_lite0" and a["layer"] == "pooled"
    emb = a["embedder"]
    assert emb["preprocessing"]["input_size"] == 64 and emb["preprocessing"]["interpolation"] == "bicubic"
    assert len(emb["weights_sha256"]) == 64 and a["extraction_seconds"] > 0 and a["featx_version"]
    assert set(emb["versions"]) == {"torch", "torchvision", "timm", "pillow"}
    assert fs.embedder == bb.embedder()  # the same identity, resolved preprocessing included


def test_second_extract_is_a_hit_and_every_key_ingredient_makes_a_miss(tiny_dataset: Path, tmp_path: Path) -> None:
    cdir = tmp_path / "c"
    base = {"splits": ["val"], "cache_dir": cdir, **FAST}
    first = extract(tiny_dataset, **base)[0]
    again = extract(tiny_dataset, **base)[0]
    assert again.hit and again.key == first.key and again.path == first.path
    variants = {
        "weights": {"weights": "none"},
        "layer": {"layer": "blocks.3"},
        "preprocessing": {"image_size": 80},
        "precision": {"precision": "bf16"},
    }
    keys = {first.key}
    for name, change in variants.items():
        r = extract(tiny_dataset, **{**base, **change})[0]
        assert not r.hit, name
        keys.add(r.key)
    other_split = extract(tiny_dataset, **{**base, "splits": ["test"]})[0]
    keys.add(other_split.key)
    # the dataset's content: touching one file changes the fingerprint
    f = tiny_dataset / "val" / "class_0" / "000.png"
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = extract(tiny_dataset, **base)[0]
    assert not changed.hit
    keys.add(changed.key)
    assert len(keys) == 7
    assert len(list_caches(cdir)) == 7


def test_layer_features_have_the_block_width(tiny_dataset: Path, tmp_path: Path) -> None:
    [res] = extract(tiny_dataset, splits=["test"], layer="blocks.2", cache_dir=tmp_path, **FAST)
    assert load_cache(res.path).features.shape == (8, 40)
    with pytest.raises(UsageError, match="no layer"):
        extract(tiny_dataset, splits=["test"], layer="blocks.99", cache_dir=tmp_path, **FAST)


def test_bad_images_are_skipped_and_recorded(tiny_dataset: Path, tmp_path: Path) -> None:
    (tiny_dataset / "val" / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tiny_dataset / "val" / "class_0" / "empty.jpg").write_bytes(b"")
    [res] = extract(tiny_dataset, splits=["val"], cache_dir=tmp_path, **FAST)
    assert res.n_images == 8 and res.n_failed == 2
    fs = load_cache(res.path)
    assert len(fs.paths) == 6 and not any("broken" in p or "empty" in p for p in fs.paths)
    with h5py.File(res.path) as f:
        assert f["valid"][:].sum() == 6
        reasons = [r.decode() for r in f["failures/reason"][:]]
        assert len(reasons) == 2 and all(reasons)


def test_dataset_where_every_image_fails_is_an_error_and_leaves_no_cache(tmp_path: Path) -> None:
    d = tmp_path / "ds" / "a"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 3 images"):
        extract(tmp_path / "ds", cache_dir=tmp_path / "c", **FAST)
    assert not list((tmp_path / "c").glob("*.h5")) and not list((tmp_path / "c").glob("*.partial"))


def test_interrupted_write_never_looks_complete(tmp_path: Path) -> None:
    final = tmp_path / "x.h5"

    def blocks():  # the writer dies after the first block
        yield 0, np.ones((2, 3), np.float32), np.ones(2, bool), ["", ""]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_cache_file(final, n_rows=4, blocks=blocks(), labels=np.zeros(4), paths=list("abcd"), classes=["a"], attrs={})
    assert not final.exists() and not list(tmp_path.iterdir())
    # a file without the 'complete' flag (e.g. copied mid-write) is refused on read
    with h5py.File(final, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 3)))
    with pytest.raises(CacheError, match="incomplete"):
        load_cache(final)


def test_cache_management(tiny_dataset: Path, tmp_path: Path) -> None:
    [res] = extract(tiny_dataset, splits=["test"], cache_dir=tmp_path, **FAST)
    rows = list_caches(tmp_path)
    assert [r["key"] for r in rows] == [res.key] and rows[0]["shape"] == [8, 1280]
    assert read_cache_attrs(res.path)["key"] == res.key
    assert remove_caches([res.key[:8]], tmp_path) == [res.path]
    assert list_caches(tmp_path) == []
    with pytest.raises(CacheError, match="no cache"):
        remove_caches([res.key], tmp_path)


def test_weights_from_a_local_state_dict_file(tiny_dataset: Path, tmp_path: Path) -> None:
    import torch

    bb = build_backbone("efficientnet_lite0", "none")
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in bb.model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pth")
    r1 = extract(tiny_dataset, splits=["test"], weights=str(tmp_path / "w.pth"), cache_dir=tmp_path, **FAST)[0]
    r2 = extract(tiny_dataset, splits=["test"], weights="none", cache_dir=tmp_path, **FAST)[0]
    assert r1.key != r2.key
    assert not np.allclose(load_cache(r1.path).features, load_cache(r2.path).features)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    from featx.errors import WeightsError

    with pytest.raises(WeightsError, match="cannot load weights"):
        extract(tiny_dataset, splits=["test"], weights=str(tmp_path / "bad.pth"), cache_dir=tmp_path, **FAST)


def test_torchvision_weights_load_from_the_hub_cache(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `weights=ResNet18_Weights...` path: torchvision finds the file in $TORCH_HOME and loads it."""
    import torch
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    model = resnet18(weights=None)
    torch.save(model.state_dict(), ckpt / "resnet18-f37072fd.pth")
    bb = build_backbone("resnet18", "imagenet")
    assert bb.feature_dim == 512 and bb.preprocessing.interpolation == "bilinear"
    assert torch.equal(bb.model.conv1.weight, model.conv1.weight)
    [res] = extract(tiny_dataset, splits=["test"], backbone="resnet18", cache_dir=tmp_path / "c", **FAST)
    assert load_cache(res.path).features.shape == (8, 512)


def test_timm_backbone_and_unknown_names(tiny_dataset: Path, tmp_path: Path) -> None:
    from featx.errors import UnknownBackboneError

    [res] = extract(tiny_dataset, splits=["test"], backbone="timm:resnet10t", weights="none", cache_dir=tmp_path, **FAST)
    assert load_cache(res.path).features.shape == (8, 512)
    with pytest.raises(UnknownBackboneError, match="did you mean resnet18"):
        extract(tiny_dataset, backbone="resnet19", cache_dir=tmp_path, **FAST)
    with pytest.raises(UnknownBackboneError, match="timm"):
        extract(tiny_dataset, backbone="timm:not_a_model_xyz", cache_dir=tmp_path, **FAST)


def test_fp16_on_cpu_is_a_usage_error(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fp16 needs a CUDA"):
        extract(tiny_dataset, splits=["test"], precision="fp16", device="cpu", cache_dir=tmp_path, **FAST)
    assert not list(tmp_path.glob("*.h5"))


def test_generated_dataset_in_jpeg(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "j", {"train": 2}, ext=".jpg")
    [res] = extract(root, cache_dir=tmp_path / "c", **FAST)
    assert res.n_images == 4 and res.n_failed == 0


def test_find_caches_locates_every_split_without_a_model(tiny_dataset: Path, tmp_path: Path) -> None:
    from featx.extraction import find_caches

    made = {r.split: r.path for r in extract(tiny_dataset, cache_dir=tmp_path, **FAST)}
    assert find_caches(tiny_dataset, image_size=64, cache_dir=tmp_path) == made
    with pytest.raises(CacheError, match="no cache for split 'train'"):
        find_caches(tiny_dataset, image_size=72, cache_dir=tmp_path)
