"""ONNX Runtime as the extraction runtime (issue 23): real onnxruntime, real exports, small generated images.

Tolerances (stated in featx.onnx_export): an export is used only when every output agrees with PyTorch's eager
forward on the probe batch to max |ort - torch| <= 1e-4 x max |torch|; on real extractions the tests hold ORT and
PyTorch caches to the same bound per layer, and a head fitted on PyTorch features predicts the same labels on ONNX
Runtime features with probabilities within 1e-3.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featx.cache import clean_caches, list_caches, load_cache, read_cache_attrs, verify_caches
from featx.cli import main as cli_main
from featx.extraction import extract
from featx.onnx_export import TOLERANCE, onnx_damage, onnx_file_problem, onnx_manifest
from featx.runtime import InferenceSettings
from tests.conftest import make_imagefolder

SIZE = 64  # small inputs keep export + forward quick
TORCH = InferenceSettings(runtime="torch")
ORT = InferenceSettings(runtime="onnxruntime")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("ort") / "ds", {"train": 6, "test": 4}, n_classes=2)


@pytest.fixture(scope="module")
def caches(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same splits extracted with PyTorch and with ONNX Runtime, pooled and blocks.3, in separate folders."""
    out: dict[str, Path] = {}
    for name, settings in (("torch", TORCH), ("ort", ORT)):
        d = tmp_path_factory.mktemp(f"cache-{name}")
        for layer in ("pooled", "blocks.3"):
            for r in extract(data, image_size=SIZE, layer=layer, settings=settings, cache_dir=d, progress=False):
                out[f"{name}:{layer}:{r.split}"] = r.path
        out[f"{name}:dir"] = d
    return out


def onnx_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.onnx"))


@pytest.mark.parametrize("layer", ["pooled", "blocks.3"])
def test_ort_features_equal_torch_within_tolerance(caches: dict[str, Path], layer: str) -> None:
    for split in ("train", "test"):
        a = load_cache(caches[f"torch:{layer}:{split}"])
        b = load_cache(caches[f"ort:{layer}:{split}"])
        assert a.features.shape == b.features.shape and a.paths == b.paths
        diff = float(np.abs(a.features - b.features).max())
        assert diff <= TOLERANCE * float(np.abs(a.features).max()), (layer, split, diff)


def test_the_cache_records_its_runtime_and_shares_the_key(caches: dict[str, Path]) -> None:
    for layer in ("pooled", "blocks.3"):
        t, o = read_cache_attrs(caches[f"torch:{layer}:train"]), read_cache_attrs(caches[f"ort:{layer}:train"])
        assert t["runtime"] == "torch" and "onnx" not in t
        assert o["runtime"] == "onnxruntime" and o["onnx"]["check_relative"] <= TOLERANCE
        assert t["key"] == o["key"]  # runtimes agree within the tolerance: one key, the runtime is recorded
    names = [p.name for p in onnx_files(caches["ort:dir"])]
    assert len(names) == 2 and any("-pooled-" in n for n in names) and any("-blocks.3-" in n for n in names)
    assert onnx_files(caches["torch:dir"]) == []


def test_a_head_fitted_on_torch_features_predicts_the_same_on_ort_features(caches: dict[str, Path]) -> None:
    from sklearn.linear_model import LogisticRegression

    tr, te_t, te_o = (load_cache(caches[k]) for k in ("torch:pooled:train", "torch:pooled:test", "ort:pooled:test"))
    head = LogisticRegression(max_iter=2000).fit(tr.features, tr.labels)
    assert (head.predict(te_t.features) == head.predict(te_o.features)).all()
    assert np.abs(head.predict_proba(te_t.features) - head.predict_proba(te_o.features)).max() <= 1e-3


def test_the_onnx_is_reused_without_torch_and_rebuilt_when_the_key_changes(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    extract(data, image_size=SIZE, settings=ORT, cache_dir=cache, progress=False)
    [onnx] = onnx_files(cache)
    st = onnx.stat()
    man = onnx_manifest(onnx)
    assert man is not None and man["taps"] == ["pooled"] and man["check"]["worst"]["relative"] <= TOLERANCE
    # a fresh process with the .onnx ready: no torch, timm or torchvision imported, the file untouched
    code = (
        "import sys; from featx.extraction import extract; from featx.runtime import InferenceSettings\n"
        f"r = extract({str(data)!r}, image_size={SIZE}, settings=InferenceSettings(runtime='onnxruntime'), "
        f"cache_dir={str(cache)!r}, force=True, progress=False)\n"
        "print([m for m in ('torch', 'timm', 'torchvision') if m in sys.modules])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout
    assert onnx.stat().st_mtime_ns == st.st_mtime_ns and onnx.stat().st_ino == st.st_ino
    # another embedder (input size): another file
    extract(data, image_size=SIZE + 32, settings=ORT, cache_dir=cache, progress=False)
    assert len(onnx_files(cache)) == 2


def test_a_damaged_onnx_of_featx_is_replaced_and_never_used(data: Path, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "cache"
    extract(data, image_size=SIZE, settings=ORT, cache_dir=cache, progress=False)
    [onnx] = onnx_files(cache)
    raw = bytearray(onnx.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the weights
    onnx.write_bytes(bytes(raw))
    assert onnx_file_problem(onnx) is None and "damaged" in (onnx_damage(onnx) or "")
    [(_p, ok, msg)] = [v for v in verify_caches(cache_dir=cache) if v[0] == onnx]
    assert not ok and "damaged" in msg
    caplog.set_level("WARNING", logger="featx")
    extract(data, image_size=SIZE, settings=ORT, cache_dir=cache, progress=False, force=True)
    assert "re-exporting" in caplog.text and onnx_damage(onnx) is None  # replaced by a fresh, checked export


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_a_truncated_or_foreign_onnx_is_not_used_and_not_deleted(
    data: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str], caplog
) -> None:
    cache = tmp_path / "cache"
    extract(data, image_size=SIZE, settings=ORT, cache_dir=cache, progress=False)
    [onnx] = onnx_files(cache)
    content = onnx.read_bytes()[:-500] if kind == "truncated" else b"somebody else's model\n"
    onnx.write_bytes(content)
    assert onnx_file_problem(onnx) is not None
    # explicit onnxruntime: a one-line error, exit 2; the file is left as it is
    args = ["-q", "extract", str(data), "--image-size", str(SIZE), "--cache-dir", str(cache), "--force"]
    code = cli_main([*args, "--runtime", "onnxruntime"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not featx's" in err[0] and "onnxruntime cannot be used" in err[0], err
    # auto: a warning, PyTorch computes the cache
    caplog.set_level("WARNING", logger="featx")
    [r, _] = extract(data, image_size=SIZE, cache_dir=cache, progress=False, force=True, settings=InferenceSettings())
    assert "ONNX Runtime not used" in caplog.text and read_cache_attrs(r.path)["runtime"] == "torch"
    assert onnx.read_bytes() == content
    # cache ls names it as not featx's; cache rm --all leaves it; rm by name refuses it
    [row] = [row for row in list_caches(cache) if row["file"] == onnx.name]
    assert row["featx"] is False
    removal = clean_caches(cache_dir=cache, all_=True)
    assert onnx in [p for p, _ in removal.left] and onnx.read_bytes() == content
    assert cli_main(["cache", "rm", str(onnx), "--cache-dir", str(cache)]) != 0 and onnx.exists()


def test_cache_rm_removes_a_featx_onnx(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    extract(data, image_size=SIZE, settings=ORT, cache_dir=cache, progress=False)
    [onnx] = onnx_files(cache)
    [row] = [row for row in list_caches(cache) if row["file"] == onnx.name]
    assert row["featx"] is True and row["layer"] == "pooled"
    assert [ok for p, ok, _ in verify_caches(cache_dir=cache) if p == onnx] == [True]
    removal = clean_caches(cache_dir=cache, all_=True)
    assert onnx in removal.removed and not onnx.exists()


def test_explicit_onnxruntime_that_cannot_run_is_a_one_line_error(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["-q", "extract", str(data), "--image-size", str(SIZE), "--cache-dir", str(tmp_path / "c")]
    base += ["--runtime", "onnxruntime"]
    assert cli_main([*base, "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime cannot run here: precision bf16" in err[0], err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert cli_main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime package is not installed" in err[0], err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("*.h5"))


def test_auto_falls_back_to_torch_without_onnxruntime(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    [r, _] = extract(data, image_size=SIZE, cache_dir=tmp_path / "c", progress=False, settings=InferenceSettings())
    assert read_cache_attrs(r.path)["runtime"] == "torch" and onnx_files(tmp_path / "c") == []


def test_a_journal_is_never_resumed_with_another_runtime(data: Path, tmp_path: Path, caplog) -> None:
    """A journal made by PyTorch, resumed by ONNX Runtime: discarded (warning) and recomputed, never mixed."""
    from featx.cache import CacheJournal

    cache = tmp_path / "cache"
    [r] = extract(data, splits=["train"], image_size=SIZE, settings=TORCH.with_(batch_size=4), cache_dir=cache, progress=False)
    want = load_cache(r.path).features
    # rebuild the journal state of an interrupted torch run: run again into a journal, stop before assembly
    journal = CacheJournal(r.path)
    r.path.unlink()
    import featx.extraction as ex

    real = ex.write_cache_file

    def stop(*a, **k):
        raise KeyboardInterrupt

    ex.write_cache_file = stop
    try:
        with pytest.raises(ex.ExtractionInterrupted):
            extract(data, splits=["train"], image_size=SIZE, settings=TORCH.with_(batch_size=4), cache_dir=cache, progress=False)
    finally:
        ex.write_cache_file = real
    assert journal.exists() and json.loads((journal.dir / "journal.json").read_text())["runtime"] == "torch"
    caplog.set_level("WARNING", logger="featx")
    [r2] = extract(data, splits=["train"], image_size=SIZE, settings=ORT.with_(batch_size=4), cache_dir=cache, progress=False)
    assert "other settings (runtime)" in caplog.text and r2.resumed_at == 0
    a = read_cache_attrs(r2.path)
    assert a["runtime"] == "onnxruntime" and a["resumed_at"] == 0
    got = load_cache(r2.path).features
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def test_runtime_setting_from_env_and_cli() -> None:
    assert InferenceSettings.from_env({"FEATX_RUNTIME": "torch"}).runtime == "torch"
    assert InferenceSettings.from_env({"FEATX_RUNTIME": "torch"}, runtime="onnxruntime").runtime == "onnxruntime"
    assert InferenceSettings().to_dict() == InferenceSettings(runtime="torch").to_dict()  # journals record the resolved one
    from featx.errors import UsageError

    with pytest.raises(UsageError, match="runtime must be one of auto, torch, onnxruntime"):
        InferenceSettings.from_env({"FEATX_RUNTIME": "tensorrt"})


def test_compute_features_layerwise_exports_every_tap_as_an_output(data: Path) -> None:
    """The layer-wise probe's multi-layer model: one ONNX Runtime pass gives every tapped layer, equal to PyTorch's."""
    import dataclasses

    from featx.backbones import build_backbone
    from featx.data import load_dataset
    from featx.inference import compute_features

    bb = build_backbone(image_size=SIZE)
    layers = ["blocks.1", "blocks.4", "pooled"]
    model, dims = bb.multi_layer_model(layers)
    tap = dataclasses.replace(bb, model=model)
    split = load_dataset(data).split("test")
    a, _ = compute_features(tap, split.root, split.paths, settings=TORCH)
    b, _ = compute_features(tap, split.root, split.paths, settings=ORT)
    assert a.shape == b.shape == (len(split), sum(dims))
    lo = 0
    for d in dims:
        part_a, part_b = a[:, lo : lo + d], b[:, lo : lo + d]
        assert np.abs(part_a - part_b).max() <= TOLERANCE * np.abs(part_a).max()
        lo += d
