"""One identity for an embedder: EmbedderSpec drives cache keys, head metadata, prediction and checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featx import backbones
from featx.backbones import EmbedderSpec, build_backbone, build_embedder, file_sha256, resolve_embedder
from featx.cache import load_cache
from featx.cli import main
from featx.errors import CacheError, MismatchError, WeightsError
from featx.extraction import compute_features, extract, find_caches
from featx.finetuning import FinetuneConfig, finetune
from featx.heads import fit_head, load_head, save_head
from featx.prediction import predict

from .conftest import make_imagefolder

FAST = {"image_size": 64, "progress": False, "batch_size": 8, "num_workers": 0}
LEGACY = Path(__file__).parent / "data" / "legacy_heads"


def test_spec_is_torch_free_and_round_trips() -> None:
    spec = resolve_embedder("efficientnet_lite0", layer="blocks.3", image_size=96)
    assert spec.weights == "imagenet" and len(spec.weights_sha256) == 64 and spec.preprocessing is None
    assert set(spec.versions) == {"torch", "torchvision", "timm", "pillow"}
    assert EmbedderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    bb = build_embedder(spec)
    resolved = bb.embedder("blocks.3")
    assert resolved.identity() == spec.identity() and resolved.preprocessing is not None
    assert resolved.preprocessing.input_size == 96
    # a change in any ingredient is a difference; library versions are reported separately
    assert spec.differences(spec.with_(layer="pooled")) == ["layer"]
    assert spec.differences(spec.with_(image_size=128)) == ["image_size"]
    assert spec.differences(spec.with_(versions={**spec.versions, "timm": "0.0"})) == []
    assert spec.version_changes(spec.with_(versions={**spec.versions, "timm": "0.0"})) == {"timm": (spec.versions["timm"], "0.0")}


def test_a_weights_file_is_hashed_once_per_process(tiny_dataset: Path, tmp_path: Path) -> None:
    sd = build_backbone("efficientnet_lite0", "none").model.state_dict()
    torch.save(sd, tmp_path / "w.pth")
    backbones._sha256_of.cache_clear()
    [res] = extract(tiny_dataset, splits=["train"], weights=str(tmp_path / "w.pth"), cache_dir=tmp_path / "c", **FAST)
    fs = load_cache(res.path)
    head = fit_head(fs, kind="knn", n_jobs=1)
    save_head(head, tmp_path / "h.skops")
    predict(tmp_path / "h.skops", [tiny_dataset / "test"], device="cpu", num_workers=0)
    extract(tiny_dataset, splits=["train"], weights=str(tmp_path / "w.pth"), cache_dir=tmp_path / "c", **FAST)  # a hit
    info = backbones._sha256_of.cache_info()
    assert info.misses == 1 and info.hits >= 3  # resolve, build, predict's rebuild, the second extract


def test_torchvision_file_names_match_the_weights_enums() -> None:
    """The registry names the hub file without importing torchvision; it must be the enum's own file."""
    from torchvision import models

    for name, entry in backbones._REGISTRY.items():
        if entry.source == "torchvision":
            cls_name, member = entry.weights_ref.split(".")
            assert entry.file == Path(getattr(getattr(models, cls_name), member).url).name, name


def test_torch_hub_dir_matches_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert backbones.torch_hub_dir() == Path(torch.hub.get_dir())


def test_torchvision_weights_are_identified_by_the_file_sha(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    f = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    f.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(resnet18().state_dict(), f)
    spec = resolve_embedder("resnet18")
    assert spec.weights_sha256 == file_sha256(f)
    torch.manual_seed(2)
    torch.save(resnet18().state_dict(), f)  # other weights under the same name: another identity
    assert resolve_embedder("resnet18").weights_sha256 != spec.weights_sha256
    with pytest.raises(MismatchError, match="weights of resnet18 changed"):
        build_embedder(spec)


def test_timm_hub_weights_load_from_the_hugging_face_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """timm's real pretrained path, offline: the file in the Hugging Face cache is hashed and is what loads."""
    import timm
    from safetensors.torch import save_file

    arch = "test_resnet.r160_in1k"
    snapshot = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    torch.manual_seed(3)
    state = timm.create_model(arch, pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    spec = resolve_embedder(f"timm:{arch}")
    assert spec.weights_sha256 == file_sha256(snapshot / "model.safetensors")
    bb = build_embedder(spec)
    loaded = bb.model.state_dict()
    for k in ("conv1.0.weight", "layer1.0.conv1.weight"):
        assert torch.equal(loaded[k], state[k]), k


def test_a_cache_whose_stored_spec_differs_from_its_name_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    [a] = extract(tiny_dataset, splits=["test"], cache_dir=tmp_path, **FAST)
    [b] = extract(tiny_dataset, splits=["test"], cache_dir=tmp_path, **{**FAST, "image_size": 72})
    # put b's bytes under a's name: the key in the name no longer matches what the file says
    shutil.copyfile(b.path, a.path)
    with pytest.raises(CacheError, match="does not hold what its name says"):
        extract(tiny_dataset, splits=["test"], cache_dir=tmp_path, **FAST)
    # an edited embedder attribute is caught the same way
    shutil.copyfile(b.path, tmp_path / "b.h5")
    with h5py.File(b.path, "a") as f:
        emb = json.loads(f.attrs["embedder"])
        emb["layer"] = "blocks.2"
        f.attrs["embedder"] = json.dumps(emb)
    with pytest.raises(CacheError, match="stored embedder differ"):
        extract(tiny_dataset, splits=["test"], cache_dir=tmp_path, **{**FAST, "image_size": 72})


def test_a_finetuning_checkpoint_is_weights_for_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Fine-tune on one dataset, then use the best epoch's backbone as the frozen extractor for another."""
    first = make_imagefolder(tmp_path / "first", {"train": 6, "val": 2, "test": 2}, n_classes=3)
    second = make_imagefolder(tmp_path / "second", {"train": 5, "test": 3}, n_classes=2, seed=1)
    cfg = FinetuneConfig(strategy="full", epochs=2, batch_size=6, num_workers=0, device="cpu", early_stopping_patience=0)
    finetune(first, image_size=64, config=cfg, out_dir=tmp_path / "ft", progress=False)
    ckpt_path = tmp_path / "ft" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    expected = {k.removeprefix("backbone."): v for k, v in ckpt["best_state"].items() if k.startswith("backbone.")}

    bb = build_backbone("efficientnet_lite0", str(ckpt_path), image_size=64)
    state = bb.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert bb.spec.weights_source == "file" and bb.spec.weights_sha256 == file_sha256(ckpt_path)

    cache_dir = tmp_path / "cache"
    common = ["--weights", str(ckpt_path), "--image-size", "64", "--cache-dir", str(cache_dir)]
    assert main(["-q", "extract", str(second), "--num-workers", "0", *common]) == 0
    fs = load_cache(find_caches(second, weights=str(ckpt_path), image_size=64, cache_dir=cache_dir)["train"])
    split = fs.paths
    direct, _ = compute_features(bb, second / "train", [p.removeprefix("train/") for p in split], device="cpu", num_workers=0)
    np.testing.assert_allclose(fs.features, direct, rtol=1e-4, atol=1e-5)
    out = tmp_path / "heads"
    assert main(["-q", "fit-head", str(second), "--head", "logreg", "--n-jobs", "1", "--out-dir", str(out), *common]) == 0
    head = next(out.glob("*.skops"))
    assert load_head(head).embedder.weights_sha256 == file_sha256(ckpt_path)
    assert main(["-q", "predict", str(head), str(second / "test"), "--num-workers", "0", "-o", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 6
    ft2 = ["-q", "finetune", str(second), "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]
    assert main([*ft2, "--weights", str(ckpt_path), "--image-size", "64", "--out-dir", str(tmp_path / "ft2")]) == 0
    capsys.readouterr()
    # a checkpoint fine-tuned from one backbone is not weights for another
    code = main(["-q", "extract", str(second), "--backbone", "mobilenet_v2", "--weights", str(ckpt_path)])
    assert code == 2 and "fine-tuned from efficientnet_lite0" in capsys.readouterr().err


def test_moved_weights_file(tiny_dataset: Path, tmp_path: Path) -> None:
    sd = build_backbone("efficientnet_lite0", "none").model.state_dict()
    torch.save({k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "w.pth")
    [res] = extract(tiny_dataset, splits=["train"], weights=str(tmp_path / "w.pth"), cache_dir=tmp_path / "c", **FAST)
    head = save_head(fit_head(load_cache(res.path), kind="logreg", n_jobs=1), tmp_path / "h.skops")
    before = predict(head, [tiny_dataset / "test"], device="cpu", num_workers=0)
    (tmp_path / "w.pth").rename(tmp_path / "moved.pth")
    with pytest.raises(WeightsError, match="is gone; pass the file"):
        predict(head, [tiny_dataset / "test"], device="cpu", num_workers=0)
    after = predict(head, [tiny_dataset / "test"], device="cpu", num_workers=0, weights=tmp_path / "moved.pth")
    np.testing.assert_allclose(after.probabilities, before.probabilities, atol=1e-6)
    torch.save(sd, tmp_path / "other.pth")
    with pytest.raises(MismatchError, match="weights of efficientnet_lite0 changed"):
        predict(head, [tiny_dataset / "test"], device="cpu", num_workers=0, weights=tmp_path / "other.pth")


def test_a_head_from_featx_0_1_0_predicts_images_end_to_end(sample_dataset: Path) -> None:
    """The legacy head's embedder (layer blocks.1 at 64 px) is rebuilt from its old metadata."""
    data = np.load(LEGACY / "v0.1.0-test-features.npz")
    head = load_head(LEGACY / "v0.1.0-logreg.skops")
    assert head.embedder.layer == "blocks.1" and head.embedder.preprocessing.input_size == 64
    preds = predict(head, [sample_dataset / "test"], device="cpu", num_workers=0)
    order = {p: i for i, p in enumerate(preds.paths)}
    rows = [order[str(sample_dataset / p)] for p in data["paths"]]
    np.testing.assert_allclose(preds.probabilities[rows], data["proba_logreg"], atol=1e-4)


def test_public_functions_take_one_embedder_spec(tiny_dataset: Path, tmp_path: Path) -> None:
    """extract, find_caches, the sklearn transformer and finetune take an EmbedderSpec; the loose keywords are a
    convenience that builds the same spec, and a keyword that contradicts a given spec is a one-line UsageError."""
    from featx.backbones import embedder_spec
    from featx.errors import UsageError
    from featx.estimators import ImageFeatureExtractor

    spec = resolve_embedder("efficientnet_lite0", image_size=64)
    assert embedder_spec(backbone="efficientnet_lite0", image_size=64) == spec
    assert embedder_spec(spec, backbone="efficientnet_lite0", weights="imagenet", image_size=64) is spec
    cache = tmp_path / "c"
    results = extract(tiny_dataset, spec, cache_dir=cache, progress=False, batch_size=8, num_workers=0)
    assert find_caches(tiny_dataset, spec, cache_dir=cache) == find_caches(tiny_dataset, image_size=64, cache_dir=cache)
    assert find_caches(tiny_dataset, spec, cache_dir=cache) == {r.split: r.path for r in results}
    with pytest.raises(UsageError, match=r"image_size=96 \(embedder: 64\)"):
        extract(tiny_dataset, spec, image_size=96, cache_dir=cache, progress=False)
    with pytest.raises(UsageError, match="pooled"):
        finetune(tiny_dataset, spec.with_(layer="blocks.3"), out_dir=tmp_path / "ft", config=FinetuneConfig(device="cpu"))
    tf = ImageFeatureExtractor(embedder=spec, device="cpu").fit([])
    assert tf.get_params()["embedder"] is spec and tf.embedder_ is spec and tf.n_features_out_ == 1280
    with pytest.raises(UsageError, match="backbone='resnet18'"):
        ImageFeatureExtractor("resnet18", embedder=spec).fit([])
