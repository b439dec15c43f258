"""Sizes that cannot fit are refused up front with one line (exit 2), never an OOM kill or an overflow traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from featx.backbones import MAX_IMAGE_SIZE, resolve_embedder
from featx.cli import main
from featx.errors import UsageError
from featx.inference import FORWARD_MEMORY_FACTOR, check_forward_memory
from featx.runtime import available_memory_bytes

from .conftest import make_imagefolder


@pytest.mark.parametrize("size", ["100000", "99999999999999999999", str(MAX_IMAGE_SIZE + 1)])
def test_extract_refuses_image_sizes_past_the_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 2}, n_classes=2)
    code = main(["extract", str(data), "--cache-dir", str(tmp_path / "c"), "--image-size", size])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"from 16 to {MAX_IMAGE_SIZE}" in err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("*.h5"))


def test_resolve_embedder_bounds_image_size() -> None:
    assert resolve_embedder(image_size=MAX_IMAGE_SIZE).image_size == MAX_IMAGE_SIZE
    for bad in (15, MAX_IMAGE_SIZE + 1, True, 224.0):
        with pytest.raises(UsageError, match="image-size"):
            resolve_embedder(image_size=bad)


def test_forward_memory_check_names_a_batch_that_fits() -> None:
    import torch

    cpu = torch.device("cpu")
    free = available_memory_bytes(cpu)
    assert free is not None and free > 0
    per_image = 3 * 224 * 224 * 4 * FORWARD_MEMORY_FACTOR
    check_forward_memory(1, 224, cpu)  # 38 MiB: fits on any machine that runs the suite
    too_many = free // per_image + 10
    with pytest.raises(UsageError, match=r"lower --batch-size to \d+") as info:
        check_forward_memory(too_many, 224, cpu, "--batch-size")
    fits = int(str(info.value).rsplit(" ", 1)[-1])
    assert 1 <= fits < too_many and fits * per_image <= free


def test_extract_refuses_a_batch_whose_forward_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 2}, n_classes=2)
    cache = tmp_path / "c"
    code = main(
        ["extract", str(data), "--cache-dir", str(cache), "--image-size", "4096", "--batch-size", "4096", "--num-workers", "1"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "GiB for the pass" in err
    assert not list(cache.glob("*.h5")) and not list(cache.glob("*.partial"))  # refused before the journal exists


def test_finetune_refuses_a_batch_whose_training_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 4, "val": 2, "test": 2}, n_classes=2)
    args = ["finetune", str(data), "--strategy", "full", "--image-size", "4096", "--batch-size", "512"]
    code = main([*args, "--out-dir", str(tmp_path / "ft")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "GiB for the pass" in err
    assert not list((tmp_path / "ft").glob("*.pt"))
