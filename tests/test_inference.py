"""Every fast path of the batched forward against the plain reference (featx.inference).

uint8 decode + per-batch normalisation vs torchvision's per-image transforms, BatchNorm folding and TorchScript
freezing vs the plain model, decode threads vs worker processes, bf16 autocast and the nvJPEG decode path (both
run on the CPU here, so the CUDA branches' code is exercised without a GPU). Nothing here checks speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featx import inference
from featx.backbones import Preprocessing, build_backbone
from featx.data import SAMPLE_DATASET, load_dataset
from featx.errors import UsageError
from featx.inference import (
    StageTimes,
    default_batch_size,
    fold_batchnorm,
    iter_features,
    normalize_batch,
    prepare_model,
    uint8_transform,
)
from featx.runtime import InferenceSettings

SIZE = 96  # a reduced resolution keeps the suite fast; every path is resolution-independent


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", image_size=SIZE)


@pytest.fixture(scope="module")
def sample_images() -> tuple[Path, list[str]]:
    split = load_dataset(SAMPLE_DATASET).split("train")
    return split.root, list(split.paths[:20])


def _features(bb, root: Path, paths: list[str], settings: InferenceSettings | None = None, **kw) -> tuple[np.ndarray, list[str]]:
    """``kw``: InferenceSettings fields (over device cpu, batch 8, no workers) and iter_features' own arguments."""
    fields = {k: kw.pop(k) for k in list(kw) if k in InferenceSettings.__dataclass_fields__}
    settings = settings or InferenceSettings(**{"device": "cpu", "batch_size": 8, "num_workers": 0, **fields})
    feats, errors = [], []
    for b in iter_features(bb.model, bb.preprocessing, root, paths, settings=settings, progress=False, **kw):
        assert b.features.dtype == np.float32
        feats.append(b.features)
        errors += b.errors
    return np.concatenate(feats), errors


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def test_uint8_decode_and_batch_normalisation_equal_the_torchvision_transform(lite0, sample_images) -> None:
    root, paths = sample_images
    tf, u8 = lite0.preprocessing.build_transform(), uint8_transform(lite0.preprocessing)
    images = [Image.open(root / p).convert("RGB") for p in paths[:6]]
    ref = torch.stack([tf(im) for im in images])
    batch = torch.from_numpy(np.stack([u8(im) for im in images]))
    mean = torch.tensor(lite0.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(lite0.preprocessing.std).view(1, 3, 1, 1)
    for channels_last in (True, False):
        x = normalize_batch(batch, mean, std, channels_last=channels_last)
        assert torch.equal(x, ref)  # bit-identical: the same float32 operations in the same order
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_pil_resize_and_crop_equal_torchvision_step_for_step(interpolation: str) -> None:
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    for input_size, resize_size in ((224, 256), (96, 109), (224, 200)):  # the last one pads (crop larger than the resize)
        pre = Preprocessing(input_size, resize_size, interpolation, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        ref = T.Compose([T.Resize(resize_size, interpolation=T.InterpolationMode(interpolation)), T.CenterCrop(input_size)])
        ours = uint8_transform(pre)
        for w, h in ((326, 256), (256, 326), (500, 201), (101, 80), (256, 256), (224, 224), (4, 900), (257, 256)):
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            expected = np.asarray(ref(im))
            got = ours(im)
            assert got.dtype == np.uint8 and got.shape == (input_size, input_size, 3)
            np.testing.assert_array_equal(got, expected, err_msg=f"{w}x{h} {pre}")


def test_features_equal_the_naive_per_image_loop(lite0, sample_images) -> None:
    root, paths = sample_images
    got, errors = _features(lite0, root, paths, optimize="none", channels_last=False)
    assert errors == [""] * len(paths)
    tf = lite0.preprocessing.build_transform()
    with torch.inference_mode():
        ref = np.concatenate([lite0.model(tf(Image.open(root / p).convert("RGB"))[None]).numpy() for p in paths])
    assert _rel(ref, got) < 1e-5


def test_batchnorm_folding_keeps_the_features(lite0) -> None:
    folded, n = fold_batchnorm(lite0.model)
    assert n > 40 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.model.modules())  # the original is untouched
    x = torch.rand(3, 3, SIZE, SIZE).sub_(0.5).mul_(4)
    with torch.inference_mode():
        assert _rel(lite0.model(x).numpy(), folded(x).numpy()) < 1e-5
    # a torchvision ResNet with non-trivial running statistics (random init has mean 0, var 1)
    rn = build_backbone("resnet18", weights="none", image_size=64).model
    g = torch.Generator().manual_seed(0)
    for m in rn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.2, generator=g)
    frn, n_rn = fold_batchnorm(rn)
    assert n_rn == 20  # every conv-BN pair, downsample shortcuts included
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert _rel(rn(x).numpy(), frn(x).numpy()) < 1e-5


@pytest.mark.parametrize("optimize", ["fold", "freeze"])
def test_optimised_models_give_the_plain_features(lite0, sample_images, optimize: str) -> None:
    root, paths = sample_images
    ref, _ = _features(lite0, root, paths, optimize="none")
    prof = StageTimes()
    got, _ = _features(lite0, root, paths, optimize=optimize, profile=prof)
    assert prof.plan["optimize"] == optimize and prof.images == len(paths) and prof.batches == 3
    assert _rel(ref, got) < 1e-4


def test_prepare_model_falls_back_to_the_plain_model_when_folding_would_change_numbers() -> None:
    class Shared(torch.nn.Module):  # the conv output feeds the BN *and* the residual: folding would be wrong
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)
            self.bn.running_mean.fill_(0.5)
            self.bn.running_var.fill_(3.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return (self.bn(y) + y).mean(dim=(2, 3))

    model = Shared().eval()
    fn, applied = prepare_model(model, device=torch.device("cpu"), input_size=16, optimize="fold")
    assert applied == "none" and fn is model


def test_decode_threads_and_worker_processes_give_the_same_features(lite0, sample_images) -> None:
    root, paths = sample_images
    threads, e1 = _features(lite0, root, paths, decode="threads")
    procs, e2 = _features(lite0, root, paths, decode="processes", num_workers=1)
    assert e1 == e2 == [""] * len(paths)
    np.testing.assert_allclose(procs, threads, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="num-workers"):
        _features(lite0, root, paths, decode="processes", num_workers=0)
    with pytest.raises(UsageError, match="CUDA"):
        _features(lite0, root, paths, decode="gpu")


def test_bf16_autocast_runs_on_the_cpu_and_stays_close(lite0, sample_images) -> None:
    root, paths = sample_images
    ref, _ = _features(lite0, root, paths[:8])
    got, _ = _features(lite0, root, paths[:8], precision="bf16")
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.98


def test_gpu_decode_path_on_the_cpu(lite0, sample_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nvJPEG branch (torchvision.io.decode_jpeg + tensor resize) run with device=cpu: JPEGs go through it,
    other files and broken ones through the PIL path with its failure reasons, in order."""
    root, paths = sample_images
    for p in paths[:6]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes((root / p).read_bytes())
    Image.open(root / paths[0]).convert("RGB").save(tmp_path / "as.png")
    (tmp_path / "broken.jpg").write_bytes((root / paths[1]).read_bytes()[:200])
    files = [*paths[:6], "as.png", "broken.jpg"]
    monkeypatch.setattr(inference, "_GPU_DECODE_ON_CPU", True)
    ref, ref_err = _features(lite0, tmp_path, files, decode="threads")
    got, err = _features(lite0, tmp_path, files, decode="gpu")
    assert err[:7] == ref_err[:7] == [""] * 7 and err[7] and ref_err[7]
    np.testing.assert_allclose(got[6], ref[6], rtol=0, atol=1e-5)  # the PNG took the PIL path: the same numbers
    cos = (ref[:6] * got[:6]).sum(1) / (np.linalg.norm(ref[:6], axis=1) * np.linalg.norm(got[:6], axis=1))
    assert cos.min() > 0.98  # tensor bicubic + antialias vs PIL's resize: close, not equal (so it is opt-in)


def test_jpeg_draft_decodes_large_photos_close_to_full_decode(lite0, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:900, 0:1200]
    for i in range(3):
        img = np.stack([(xx * (i + 1) // 7) % 256, (yy * (i + 2) // 5) % 256, (xx + yy) // 9 % 256], -1).astype(np.float64)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / f"{i}.jpg", quality=90)
    files = [f"{i}.jpg" for i in range(3)]
    full, _ = _features(lite0, tmp_path, files)
    draft, _ = _features(lite0, tmp_path, files, jpeg_draft=True)
    assert not np.array_equal(full, draft)  # draft really decoded at a reduced scale
    cos = (full * draft).sum(1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(draft, axis=1))
    assert cos.min() > 0.97


def test_env_switches_and_defaults(lite0, sample_images, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented FEATX_* variables are defaults that InferenceSettings.from_env reads (the one place)."""
    root, paths = sample_images
    cpu = {"device": "cpu", "batch_size": 8, "num_workers": 0}
    monkeypatch.setenv("FEATX_OPTIMIZE", "none")
    prof = StageTimes()
    _features(lite0, root, paths[:4], settings=InferenceSettings.from_env(**cpu), profile=prof)
    assert prof.plan["optimize"] == "none"
    monkeypatch.setenv("FEATX_OPTIMIZE", "bogus")
    with pytest.raises(UsageError, match="optimize"):
        _features(lite0, root, paths[:4], settings=InferenceSettings.from_env(**cpu))
    assert default_batch_size(torch.device("cpu")) == 16 and default_batch_size(torch.device("cuda")) == 256


def test_inference_settings_are_a_value_and_the_environment_only_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings passed explicitly win over the environment; nothing below from_env reads it; bad values are the
    same one-line UsageErrors as the flags'."""
    from featx.runtime import inference_settings

    monkeypatch.setenv("FEATX_DECODE", "threads")
    monkeypatch.setenv("FEATX_STREAMS", "3")
    monkeypatch.setenv("FEATX_JPEG_DRAFT", "yes")
    env = InferenceSettings.from_env()
    assert (env.decode, env.streams, env.micro_batch, env.jpeg_draft) == ("threads", 3, None, True)
    assert InferenceSettings.from_env(decode="auto").decode == "auto"  # an explicit value beats the environment
    assert InferenceSettings().decode == "auto" and not InferenceSettings().jpeg_draft  # no environment in the value
    assert env.to_dict() == {"optimize": "", "decode": "threads", "jpeg_draft": "1", "streams": "3", "micro_batch": ""}
    assert InferenceSettings(device=torch.device("cpu")).device == "cpu"
    monkeypatch.setenv("FEATX_MICRO_BATCH", "0")
    with pytest.raises(UsageError, match="FEATX_MICRO_BATCH must be a positive integer"):
        InferenceSettings.from_env()
    with pytest.raises(UsageError, match="decode must be one of"):
        InferenceSettings(decode="fast")
    given = InferenceSettings(device="cpu", batch_size=4)
    assert inference_settings(given, device="cpu", batch_size=None) is given
    with pytest.raises(UsageError, match="batch_size=8"):
        inference_settings(given, batch_size=8)
