"""Head files: save_head writes a skops archive (no pickle) and a JSON summary; load_head accepts only what featx
writes, checked before anything is constructed.

skops builds objects from a JSON schema of typed nodes. Its own default trust set is broad (every public
scikit-learn estimator, numpy and scipy ufuncs, ...) and ``trusted=`` can only add to it, so featx checks the
schema itself against the exact node types that featx writes (:func:`safe_node_types`: the containers, the
Pipeline and the step classes of the registered head kinds), then hands skops that same list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from featx.errors import HeadFileError, UsageError
from featx.heads.fitted import FittedHead, head_summary
from featx.heads.kinds import HEAD_KINDS, HEADS, FittedState, HeadKind


def save_head(head: FittedHead, path: str | os.PathLike[str]) -> Path:
    """Write the head as a skops file (no pickle) and a JSON summary beside it (``.json``)."""
    import skops.io as sio

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {"estimator": head.estimator, "summary_json": json.dumps(head_summary(head))}
    tmp = p.with_name(p.name + ".tmp")
    sio.dump(payload, tmp)
    os.replace(tmp, p)
    p.with_suffix(".json").write_text(json.dumps(head_summary(head), indent=2))
    return p


PAYLOAD_KEYS = frozenset({"estimator", "summary_json"})
_CONTAINER_NODE_TYPES = frozenset(
    {
        ("DictNode", "builtins.dict"),
        ("ListNode", "builtins.list"),
        ("TupleNode", "builtins.tuple"),
        ("JsonNode", "builtins.str"),  # JSON-encoded primitives (numbers, strings, bools, None)
        ("TypeNode", "builtins.str"),  # the key type of dicts
        ("NdArrayNode", "numpy.ndarray"),  # stored with numpy's own format, read with allow_pickle=False
        ("NdArrayNode", "numpy.float64"),  # numpy float scalars (e.g. StandardScaler.n_samples_seen_)
    }
)
_MAX_SCHEMA_BYTES = 64 * 2**20
_MAX_COMPRESSION_RATIO = 200  # arrays of features never compress like this; zip bombs do


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def safe_node_types() -> frozenset[tuple[str, str]]:
    """Every (skops loader, type) a featx head file may hold: the containers and numpy arrays above, the
    Pipeline, and the exact step classes of each registered head kind."""
    from sklearn.pipeline import Pipeline

    estimators = {("ObjectNode", _type_name(Pipeline))}
    estimators |= {("ObjectNode", _type_name(cls)) for kind in HEAD_KINDS.values() for _, cls in kind.steps()}
    return _CONTAINER_NODE_TYPES | frozenset(estimators)


def _refuse(p: Path, why: str) -> HeadFileError:
    return HeadFileError(f"refusing to load head file {p}: {why}")


def _vet_head_file(p: Path) -> None:
    """Check the archive and every node of its schema against :func:`safe_node_types`; raise on the first
    problem. Nothing is imported or constructed from the file here."""
    import zipfile
    import zlib

    allowed = safe_node_types()
    if not zipfile.is_zipfile(p):
        raise _refuse(p, "it is not a skops archive (featx never opens pickles); re-create it with featx fit-head")
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise _refuse(p, "the archive lists a member twice")
            if "schema.json" not in names:
                raise _refuse(p, "it has no schema.json; it is not a head file written by featx")
            for info in infos:
                if info.file_size > _MAX_COMPRESSION_RATIO * max(info.compress_size, 1024):
                    raise _refuse(p, f"member {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}x")
            schema_info = z.getinfo("schema.json")
            if schema_info.file_size > _MAX_SCHEMA_BYTES:
                raise _refuse(p, f"schema.json is {schema_info.file_size} bytes")
            bad = z.testzip()  # CRC of every member: truncation and bit rot
            if bad is not None:
                raise _refuse(p, f"member {bad!r} is damaged (CRC mismatch); re-create the head with featx fit-head")
            schema = json.loads(z.read("schema.json"))
    except HeadFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise _refuse(
            p, f"the archive is damaged or truncated ({type(exc).__name__}); re-create it with featx fit-head"
        ) from None

    files: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        if "__loader__" in node or "__class__" in node or "__module__" in node:
            loader, module, cls = node.get("__loader__"), node.get("__module__"), node.get("__class__")
            if not all(isinstance(v, str) for v in (loader, module, cls)):
                raise _refuse(p, f"malformed node at {where}")
            if (loader, f"{module}.{cls}") not in allowed:
                raise _refuse(
                    p,
                    f"it contains type {module}.{cls} ({loader}) at {where}, which featx never writes "
                    "(allowed: featx.heads.safe_node_types())",
                )
            if loader == "NdArrayNode":
                if node.get("type") != "numpy" or not isinstance(node.get("file"), str):
                    raise _refuse(p, f"array node at {where} is not stored in numpy's format")
                files.append(node["file"])
        for key, value in node.items():
            walk(value, f"{where}.{key}")

    walk(schema, "$")
    content = schema.get("content") if isinstance(schema, dict) else None
    if schema.get("__loader__") != "DictNode" or not isinstance(content, dict) or set(content) != PAYLOAD_KEYS:
        got = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise _refuse(p, f"its payload must hold exactly the keys {sorted(PAYLOAD_KEYS)}, it holds {got}")
    if content["estimator"].get("__loader__") != "ObjectNode" or content["summary_json"].get("__loader__") != "JsonNode":
        raise _refuse(p, "its estimator or summary is not stored the way featx writes them")
    extra = sorted(set(names) - {"schema.json", *files})
    if extra:
        raise _refuse(p, f"the archive holds members that no node refers to, e.g. {extra[0]!r}")
    missing = sorted(set(files) - set(names))
    if missing:
        raise _refuse(p, f"the archive lacks array member {missing[0]!r}; re-create the head with featx fit-head")


def _check_estimator(p: Path, hk: HeadKind, est: Any) -> None:
    """The loaded pipeline has exactly the steps featx builds for its kind, and fitted arrays whose shapes and
    dtypes agree with each other (the kind's ``check_fitted``: libsvm and the k-NN search index into them without
    bounds checks)."""
    from sklearn.pipeline import Pipeline

    expected = hk.steps()
    if type(est) is not Pipeline or not isinstance(getattr(est, "steps", None), list):
        raise _refuse(p, f"its estimator is a {type(est).__name__}, not the Pipeline featx writes")
    got = [(name, type(step)) for name, step in est.steps] if all(isinstance(s, tuple) and len(s) == 2 for s in est.steps) else []
    if got != list(expected):
        raise _refuse(p, f"its pipeline steps {[n for n, _ in got]} are not those of a {hk.name} head")

    state = FittedState(lambda why: _refuse(p, why))
    arr, ok = state.arr, state.ok
    first, last = est.steps[0][1], est.steps[-1][1]
    d = getattr(first, "n_features_in_", None)
    ok(isinstance(d, int) and d > 0, "n_features_in_")
    if hasattr(first, "mean_"):  # StandardScaler
        ok(arr(first, "mean_", 1, "f").shape == (d,) and arr(first, "scale_", 1, "f").shape == (d,), "scaler width")
    else:  # Normalizer
        ok(first.norm == "l2", "normalizer norm")
    classes = arr(last, "classes_", 1, "iu")
    k = len(classes)
    ok(k >= 2 and getattr(last, "n_features_in_", None) == d, "classes or width of the classifier")
    hk.check_fitted(last, d, k, state)


def load_head(path: str | os.PathLike[str]) -> FittedHead:
    """Load a head saved by :func:`save_head`.

    The file is vetted before anything is built from it: an intact archive, only the node types featx
    writes (:func:`safe_node_types`), exactly the payload keys featx writes, no stray members. After
    loading, the pipeline must have the steps of its head kind and consistent fitted arrays.
    """
    import skops.io as sio

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"head file not found: {p}")
    _vet_head_file(p)
    allowed_names = sorted({name for _, name in safe_node_types()})
    untrusted = sio.get_untrusted_types(file=p)
    refused = [t for t in untrusted if t not in allowed_names]
    if refused:  # cannot happen after the schema walk; kept as a second, independent check
        raise _refuse(p, f"it contains type {refused[0]}, which featx never writes")
    try:
        payload = sio.load(p, trusted=allowed_names)
    except Exception as exc:
        raise _refuse(p, f"skops could not read it ({type(exc).__name__}); re-create it with featx fit-head") from None
    if type(payload) is not dict or set(payload) != PAYLOAD_KEYS or not isinstance(payload["summary_json"], str):
        raise _refuse(p, "its payload is not the one featx writes")
    try:
        s = json.loads(payload["summary_json"])
        kind, classes = s["head"], s["classes"]
        best, val_acc = s["best_params"], s["val_accuracy"]
    except (ValueError, KeyError, TypeError):
        raise _refuse(p, "its summary is not a featx head summary; re-create it with featx fit-head") from None
    if kind not in HEAD_KINDS:
        raise _refuse(p, f"unknown head kind {kind!r} (this featx knows {', '.join(HEADS)})")
    _check_estimator(p, HEAD_KINDS[kind], payload["estimator"])
    if len(classes) != len(payload["estimator"].steps[-1][1].classes_):
        raise _refuse(p, "its summary and its classifier disagree on the number of classes")
    return FittedHead(
        kind,
        payload["estimator"],
        classes,
        best,
        val_acc,
        s.get("sweep", []),
        s.get("test_metrics"),
        {k: v for k, v in s.items() if k not in ("sweep", "test_metrics")},
    )
