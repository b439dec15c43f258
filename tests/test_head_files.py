"""Head files from someone else: only what featx writes loads; hostile files are refused before anything runs.

Each hostile case first shows, with a *control*, that a naive loader (plain skops with the file's own
untrusted types, or plain pickle) really runs the payload and creates a marker file. Then featx is run on
the same file through the CLI: exit code 2, one line on stderr, and no marker.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io as sio

from featx.cache import load_cache
from featx.cli import main
from featx.errors import HeadFileError, WeightsError
from featx.heads import HEADS, fit_head, load_head, safe_node_types, save_head

LEGACY = Path(__file__).parent / "data" / "legacy_heads"


# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def sample_sets(sample_caches: dict[str, Path]) -> list[Any]:
    return [load_cache(sample_caches[s]) for s in ("train", "val", "test")]


@pytest.fixture(scope="module")
def real_head(sample_sets: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    head = fit_head(*sample_sets, kind="logreg", n_jobs=1)
    return save_head(head, tmp_path_factory.mktemp("real") / "logreg.skops")


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _rewrite_schema(src: Path, dst: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    members = _members(src)
    schema = json.loads(members["schema.json"])
    mutate(schema)
    members["schema.json"] = json.dumps(schema).encode()
    return _write_zip(dst, members)


def _json_node(value: Any) -> dict[str, Any]:
    return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode", "content": json.dumps(value), "is_json": True}


def _runstring_node(code: str) -> dict[str, Any]:
    """numpy.testing's ``runstring(code, dict)`` called through skops' reduce-constructor node: ``exec(code)``."""
    empty = {
        "__class__": "dict",
        "__module__": "builtins",
        "__loader__": "DictNode",
        "content": {},
        "key_types": {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode", "content": []},
    }
    args = {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode", "content": [_json_node(code), empty]}
    return {
        "__class__": "runstring",
        "__module__": "numpy.testing._private.utils",
        "__loader__": "ConstructorFromReduceNode",
        "content": args,
    }


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def _naive_skops_load(path: Path) -> Any:
    """What a user of plain skops would do: trust whatever get_untrusted_types lists."""
    return sio.load(path, trusted=sio.get_untrusted_types(file=path))


def _predict_cli(head: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["-q", "predict", str(head), "--cache", str(cache)])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_refused(code: int, err: str, marker: Path, *, match: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("featx: error: refusing to load head file"), err
    assert match in err, err
    assert "Traceback" not in err
    assert not marker.exists(), "the payload ran"


# --------------------------------------------------------------------------------------------------
# hostile files


def test_numpy_callable_as_the_estimator(
    real_head: Path, sample_caches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"

    def swap_estimator(schema: dict[str, Any]) -> None:
        schema["content"]["estimator"] = _runstring_node(_touch_code(marker))

    evil = _rewrite_schema(real_head, tmp_path / "evil.skops", swap_estimator)
    _naive_skops_load(evil)  # control: a naive load executes the payload
    assert marker.read_text() == "ran"
    marker.unlink()

    code, err = _predict_cli(evil, sample_caches["test"], capsys)
    _assert_refused(code, err, marker, match="numpy.testing._private.utils.runstring")


def test_payload_hidden_beside_a_real_estimator(
    real_head: Path, sample_caches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"

    def hide(schema: dict[str, Any]) -> None:
        schema["content"]["notes"] = _runstring_node(_touch_code(marker))
        schema["key_types"]["content"].append({"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode"})

    evil = _rewrite_schema(real_head, tmp_path / "evil.skops", hide)
    loaded = _naive_skops_load(evil)  # control: it runs, and the real estimator still works
    assert marker.read_text() == "ran" and hasattr(loaded["estimator"], "predict")
    marker.unlink()

    code, err = _predict_cli(evil, sample_caches["test"], capsys)
    _assert_refused(code, err, marker, match="runstring")


def test_same_payload_hidden_with_only_allowed_types_is_refused_by_the_key_check(
    real_head: Path, sample_caches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An extra top-level key with harmless content is still not what featx writes."""

    def extra_key(schema: dict[str, Any]) -> None:
        schema["content"]["notes"] = _json_node("hello")
        schema["key_types"]["content"].append({"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode"})

    odd = _rewrite_schema(real_head, tmp_path / "odd.skops", extra_key)
    code, err = _predict_cli(odd, sample_caches["test"], capsys)
    _assert_refused(code, err, tmp_path / "no-marker", match="exactly the keys ['estimator', 'summary_json']")


def test_os_system_as_a_function_transformer(
    sample_caches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    marker = tmp_path / "marker"
    est = Pipeline([("f", FunctionTransformer(os.system)), ("clf", LogisticRegression())])
    evil = tmp_path / "evil.skops"
    sio.dump({"estimator": est, "summary_json": json.dumps({"head": "logreg"})}, evil)
    loaded = _naive_skops_load(evil)  # control: the loaded transformer runs shell commands
    loaded["estimator"].steps[0][1].transform(f"touch {marker}")
    assert marker.exists()
    marker.unlink()

    code, err = _predict_cli(evil, sample_caches["test"], capsys)
    _assert_refused(code, err, marker, match="FunctionTransformer")


def test_custom_class(
    sample_caches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    (tmp_path / "featx_test_evil_module.py").write_text(
        textwrap.dedent(
            f"""
            class Boom:
                def __setstate__(self, state):
                    open({str(marker)!r}, "w").write("ran")
                def __getstate__(self):
                    return {{"x": 1}}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import featx_test_evil_module

    evil = tmp_path / "evil.skops"
    sio.dump({"estimator": featx_test_evil_module.Boom(), "summary_json": "{}"}, evil)
    _naive_skops_load(evil)  # control: constructing the object runs its __setstate__
    assert marker.exists()
    marker.unlink()

    code, err = _predict_cli(evil, sample_caches["test"], capsys)
    _assert_refused(code, err, marker, match="featx_test_evil_module.Boom")
    sys.modules.pop("featx_test_evil_module", None)


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_renamed_skops(sample_caches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.skops"
    evil.write_bytes(pickle.dumps({"estimator": _Touch(marker)}))
    pickle.loads(evil.read_bytes())  # control: unpickling runs the command
    assert marker.exists()
    marker.unlink()

    code, err = _predict_cli(evil, sample_caches["test"], capsys)
    _assert_refused(code, err, marker, match="not a skops archive")


def test_truncated_file(
    real_head: Path, sample_caches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"

    def hide(schema: dict[str, Any]) -> None:
        schema["content"]["estimator"] = _runstring_node(_touch_code(marker))

    evil = _rewrite_schema(real_head, tmp_path / "evil.skops", hide)
    data = evil.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        truncated = tmp_path / f"cut{cut}.skops"
        truncated.write_bytes(data[:cut])
        code, err = _predict_cli(truncated, sample_caches["test"], capsys)
        _assert_refused(code, err, marker, match="refusing")
    # a member whose bytes were damaged in place: the CRC check catches it
    members = _members(real_head)
    npy = next(n for n in members if n.endswith(".npy"))
    damaged = bytearray(members[npy])
    damaged[-5] ^= 0xFF
    with zipfile.ZipFile(tmp_path / "bitrot.skops", "w", compression=zipfile.ZIP_STORED) as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    raw = (tmp_path / "bitrot.skops").read_bytes().replace(members[npy], bytes(damaged), 1)
    (tmp_path / "bitrot.skops").write_bytes(raw)
    code, err = _predict_cli(tmp_path / "bitrot.skops", sample_caches["test"], capsys)
    _assert_refused(code, err, marker, match="CRC")


def test_zip_with_extra_members(
    real_head: Path, sample_caches: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    members = _members(real_head)
    members["payload.pkl"] = pickle.dumps(_Touch(marker))
    evil = _write_zip(tmp_path / "evil.skops", members)
    code, err = _predict_cli(evil, sample_caches["test"], capsys)
    _assert_refused(code, err, marker, match="'payload.pkl'")


def test_svc_with_inconsistent_support_arrays_is_refused(sample_sets: list[Any], tmp_path: Path) -> None:
    """libsvm indexes its arrays by _n_support without bounds checks: a crafted count must not reach predict."""
    head = fit_head(*sample_sets, kind="rbf-svm", n_jobs=1)
    real = save_head(head, tmp_path / "svm.skops")
    members = _members(real)
    schema = json.loads(members["schema.json"])
    svc = schema["content"]["estimator"]["content"]["content"]["steps"]["content"][1]["content"][1]["content"]["content"]
    npy = svc["_n_support"]["file"]
    import io

    counts = np.load(io.BytesIO(members[npy]))
    counts[0] += 1000
    buf = io.BytesIO()
    np.save(buf, counts)
    members[npy] = buf.getvalue()
    _write_zip(tmp_path / "bad.skops", members)
    with pytest.raises(HeadFileError, match="_n_support"):
        load_head(tmp_path / "bad.skops")


# --------------------------------------------------------------------------------------------------
# what featx writes keeps loading


@pytest.mark.parametrize("kind", HEADS)
def test_every_head_kind_round_trips(sample_sets: list[Any], tmp_path: Path, kind: str) -> None:
    head = fit_head(*sample_sets, kind=kind, n_jobs=1)
    loaded = load_head(save_head(head, tmp_path / f"{kind}.skops"))
    X = sample_sets[2].features
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X))
    assert loaded.kind == kind and loaded.classes == head.classes and loaded.best_params == head.best_params


def _node_types(path: Path) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "__loader__" in node:
                found.add((node["__loader__"], f"{node['__module__']}.{node['__class__']}"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(_members(path)["schema.json"]))
    return found


def test_the_safe_list_is_exactly_what_featx_writes(tmp_path: Path) -> None:
    """Every allowed node type is used by some head kind, and each kind uses only allowed ones; narrow
    features (where k-NN would pick a tree index) and binary problems included."""
    rng = np.random.default_rng(0)
    used: set[tuple[str, str]] = set()
    for n_features, n_classes in ((6, 2), (40, 4)):
        X = rng.normal(size=(80, n_features)).astype(np.float32)
        y = np.arange(80) % n_classes
        from featx.heads import make_head

        for kind in HEADS:
            est = make_head(kind).fit(X, y)
            path = tmp_path / f"{kind}-{n_features}.skops"
            sio.dump({"estimator": est, "summary_json": "{}"}, path)
            types = _node_types(path)
            assert types <= safe_node_types(), (kind, types - safe_node_types())
            used |= types
    assert used == set(safe_node_types())


@pytest.mark.parametrize("kind", HEADS)
def test_heads_saved_by_featx_0_1_0_still_load(kind: str) -> None:
    """Files written by the release before the allowlist (tests/data/legacy_heads, made with featx 0.1.0)."""
    data = np.load(LEGACY / "v0.1.0-test-features.npz")
    head = load_head(LEGACY / f"v0.1.0-{kind}.skops")
    np.testing.assert_allclose(head.predict_proba(data["X"]), data[f"proba_{kind.replace('-', '_')}"], rtol=1e-6)
    assert head.metadata["featx_version"] == "0.1.0" and head.kind == kind


# --------------------------------------------------------------------------------------------------
# weights and checkpoints: torch.load(weights_only=True), and a message that does not suggest turning it off


def test_weights_file_with_code_is_refused_without_suggesting_weights_only_false(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Touch(marker)}, evil)
    with pytest.raises(WeightsError, match=r"posix\.system"):
        from featx.backbones import load_torch_file

        load_torch_file(evil)
    code = main(["-q", "extract", str(tiny_dataset), "--weights", str(evil), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "weights_only" not in err and "posix.system" in err
    assert not marker.exists()


def test_checkpoint_with_code_is_refused_on_resume(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    marker = tmp_path / "marker"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "rng": _Touch(marker)}, out / "checkpoint.pt")
    code = main(["-q", "finetune", str(tiny_dataset), "--resume", "--out-dir", str(out), "--image-size", "32", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "refusing to load checkpoint" in err and "posix.system" in err and "weights_only" not in err
    assert not marker.exists()
