"""Shared fixtures: small generated image datasets (real files, real decoders) and the embedded sample."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.data import SAMPLE_DATASET

# The suite was written for the PyTorch runtime and asserts exact cache-folder contents; ``auto`` would add the checked
# ``.onnx`` export there. Pin the default runtime for the tests (and their featx subprocesses); ONNX Runtime is tested
# explicitly in tests/test_onnx_runtime.py.
os.environ.setdefault("FEATX_RUNTIME", "torch")

# A shell starts a background job (``pytest &``) with SIGINT ignored, and so is every featx process the tests spawn:
# the Ctrl-C tests would then see their SIGINT ignored and the run complete. Give the suite Python's usual Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

COLOURS = [(200, 40, 40), (40, 180, 60), (40, 60, 200)]


def make_image(rng: np.random.Generator, cls: int, size: int = 72) -> Image.Image:
    """A class-dependent picture: a base colour and stripes of a class-specific orientation, plus noise."""
    base = np.array(COLOURS[cls % len(COLOURS)], dtype=np.float32)
    img = np.tile(base, (size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = [(xx // 6) % 2, (yy // 6) % 2, ((xx + yy) // 6) % 2][cls % 3]
    img[stripes == 1] *= 0.5
    img += rng.normal(0, 18, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_imagefolder(root: Path, counts: dict[str, int], n_classes: int = 2, seed: int = 0, ext: str = ".png") -> Path:
    """root/<split>/<class_k>/<i>.png with counts[split] images per class."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in range(n_classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_image(rng, c).save(d / f"{i:03d}{ext}")
    return root


@pytest.fixture()
def tiny_dataset(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "tiny", {"train": 8, "val": 3, "test": 4})


@pytest.fixture(scope="session")
def sample_dataset() -> Path:
    return SAMPLE_DATASET


@pytest.fixture(scope="session")
def sample_caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded sample extracted once at a reduced resolution (96 px keeps the suite fast)."""
    from featx.extraction import extract

    cache_dir = tmp_path_factory.mktemp("sample-cache")
    results = extract(SAMPLE_DATASET, image_size=96, cache_dir=cache_dir, progress=False)
    return {r.split: r.path for r in results} | {"cache_dir": cache_dir}
