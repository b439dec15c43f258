"""Heads: scikit-learn classifiers on cached features, with the linear-evaluation protocol.

Protocol (Kornblith et al. 2019): sweep the regularisation (and kernel width) on a validation split,
pick the best by validation accuracy (ties go to the stronger regularisation), refit with the chosen
hyper-parameters on train + val, and evaluate once on test. Sweeps run in parallel with joblib, one
BLAS thread per worker (two single-threaded fits beat one fit with two fighting threads on small CPUs).

Heads are saved with skops (no pickle). Loading accepts only the exact node types featx writes, checked in
the file's schema before anything is built, so a head file someone sent you cannot run code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__
from featx.backbones import EmbedderSpec
from featx.cache import FeatureSet, now_iso
from featx.data import SplitPlan
from featx.errors import HeadFileError, MismatchError, UsageError
from featx.metrics import classification_metrics, softmax


@dataclass(frozen=True)
class HeadKind:
    """One kind of head: how to build it, what to sweep, and the exact classes its saved file may hold.

    ``steps`` are the pipeline's steps, in order, as featx builds them. They are also the only estimator
    classes :func:`load_head` accepts for this kind (see :data:`SAFE_NODE_TYPES`), so a new kind is
    loadable exactly when it is registered here.
    """

    name: str
    steps: Callable[[], tuple[tuple[str, type], ...]]  # (step name, class), imported lazily
    build: Callable[[dict[str, Any]], Any]  # params -> unfitted Pipeline
    grid: Callable[[int, int], list[dict[str, Any]]]  # (n_features, n_train) -> grid, strongest regularisation first
    description: str


def _logreg_steps() -> tuple[tuple[str, type], ...]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    return (("standardscaler", StandardScaler), ("logisticregression", LogisticRegression))


def _linear_svm_steps() -> tuple[tuple[str, type], ...]:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return (("standardscaler", StandardScaler), ("linearsvc", LinearSVC))


def _rbf_svm_steps() -> tuple[tuple[str, type], ...]:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return (("standardscaler", StandardScaler), ("svc", SVC))


def _knn_steps() -> tuple[tuple[str, type], ...]:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer

    return (("normalizer", Normalizer), ("kneighborsclassifier", KNeighborsClassifier))


def _pipeline(steps: tuple[tuple[str, type], ...], *estimators: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return Pipeline([(name, est) for (name, _), est in zip(steps, estimators)])


def _build_logreg(params: dict[str, Any]) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    return _pipeline(_logreg_steps(), StandardScaler(), LogisticRegression(C=params.get("C", 1.0), max_iter=1000, tol=1e-4))


def _build_linear_svm(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return _pipeline(_linear_svm_steps(), StandardScaler(), LinearSVC(C=params.get("C", 1.0), max_iter=5000, dual="auto"))


def _build_rbf_svm(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return _pipeline(
        _rbf_svm_steps(), StandardScaler(), SVC(kernel="rbf", C=params.get("C", 1.0), gamma=params.get("gamma", "scale"))
    )


def _build_knn(params: dict[str, Any]) -> Any:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer

    # L2-normalised features + euclidean distance = cosine neighbours, the usual k-NN probe. Brute force always:
    # a tree index (chosen automatically for narrow features) would put Cython tree objects into the head file.
    return _pipeline(
        _knn_steps(),
        Normalizer(),
        KNeighborsClassifier(n_neighbors=params.get("n_neighbors", 5), weights="distance", algorithm="brute"),
    )


HEAD_KINDS: dict[str, HeadKind] = {
    k.name: k
    for k in (
        HeadKind(
            "logreg",
            _logreg_steps,
            _build_logreg,
            lambda d, n: [{"C": float(c)} for c in np.logspace(-4, 2, 13)],
            "StandardScaler + multinomial L-BFGS logistic regression",
        ),
        HeadKind(
            "linear-svm",
            _linear_svm_steps,
            _build_linear_svm,
            # Larger C on standardised high-dimensional features is effectively hard-margin: liblinear then runs
            # for minutes (52 s for one fit at C=1 on flowers17) and such C values were never selected.
            lambda d, n: [{"C": float(c)} for c in np.logspace(-5, -1, 9)],
            "StandardScaler + LinearSVC",
        ),
        HeadKind(
            "rbf-svm",
            _rbf_svm_steps,
            _build_rbf_svm,
            lambda d, n: [{"C": float(c), "gamma": float(g / d)} for c in np.logspace(-1, 3, 5) for g in (0.1, 1.0, 10.0)],
            "StandardScaler + SVC(rbf)",
        ),
        HeadKind(
            "knn",
            _knn_steps,
            _build_knn,
            lambda d, n: [{"n_neighbors": k} for k in (20, 10, 5, 3, 1) if k <= n],
            "L2-normalise + k-NN (cosine), distance-weighted",
        ),
    )
}
HEADS = tuple(HEAD_KINDS)


def head_kind(kind: str) -> HeadKind:
    if kind not in HEAD_KINDS:
        raise UsageError(f"unknown head '{kind}' (choose from {', '.join(HEADS)})")
    return HEAD_KINDS[kind]


def make_head(kind: str, **params: Any) -> Any:
    """An unfitted scikit-learn pipeline for head ``kind`` with hyper-parameters ``params``."""
    return head_kind(kind).build(params)


def param_grid(kind: str, *, n_features: int, n_train: int) -> list[dict[str, Any]]:
    """Hyper-parameter grid, ordered from strongest to weakest regularisation."""
    return head_kind(kind).grid(n_features, n_train)


def predict_scores(estimator: Any, X: np.ndarray) -> np.ndarray:
    """Class probabilities; SVMs have none, so their margins go through a softmax (uncalibrated)."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    return softmax(estimator.decision_function(X))


def _score_one(
    kind: str, params: dict[str, Any], Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray
) -> dict[str, Any]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = make_head(kind, **params).fit(Xtr, ytr)
    return {"params": params, "val_accuracy": float((est.predict(Xva) == yva).mean()), "seconds": time.perf_counter() - t0}


def sweep(
    kind: str,
    Xtr: np.ndarray,
    ytr: np.ndarray,
    Xva: np.ndarray,
    yva: np.ndarray,
    *,
    grid: list[dict[str, Any]] | None = None,
    n_jobs: int | None = None,
) -> list[dict[str, Any]]:
    """Fit every grid point on train, score on val; returns the whole curve (in grid order)."""
    from joblib import Parallel, delayed, parallel_config

    grid = grid or param_grid(kind, n_features=Xtr.shape[1], n_train=len(ytr))
    jobs = min(len(grid), n_jobs or os.cpu_count() or 1)
    if jobs == 1:
        return [_score_one(kind, p, Xtr, ytr, Xva, yva) for p in grid]
    with parallel_config(backend="loky", inner_max_num_threads=1):
        return Parallel(n_jobs=jobs)(delayed(_score_one)(kind, p, Xtr, ytr, Xva, yva) for p in grid)


@dataclass
class FittedHead:
    """A head refit on train + val with the chosen hyper-parameters, plus everything needed to use it."""

    kind: str
    estimator: Any
    classes: list[str]
    best_params: dict[str, Any]
    val_accuracy: float
    sweep: list[dict[str, Any]]
    test_metrics: dict[str, Any] | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return predict_scores(self.estimator, X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.estimator.predict(X)

    @property
    def embedder(self) -> EmbedderSpec:
        """The embedder whose features this head expects (heads written by featx 0.1.0 are converted)."""
        md = self.metadata
        if "weights_id" in (md.get("embedder") or {}):
            return EmbedderSpec.from_legacy_metadata(md)
        return EmbedderSpec.from_dict(md["embedder"])


def check_same_embedder(sets: dict[str, FeatureSet]) -> None:
    """All caches fed to one head must come from the same backbone, weights, layer and preprocessing."""
    items = list(sets.items())
    ref_name, ref = items[0]
    for name, fs in items[1:]:
        diff = ref.embedder.differences(fs.embedder)
        if diff:
            raise MismatchError(
                f"{name} cache differs from {ref_name} cache in {', '.join(diff)}: {fs.path.name} vs {ref.path.name}"
            )
        if fs.classes != ref.classes:
            raise MismatchError(f"{name} cache has other classes than {ref_name} cache")


def split_features(train: FeatureSet, val: FeatureSet | None, test: FeatureSet | None, plan: SplitPlan) -> dict[str, FeatureSet]:
    """Carve missing val/test splits out of the train cache exactly as fine-tuning does (same rows)."""
    labels = train.split_labels if train.split_labels is not None else train.labels
    carved = plan.carve(labels, has_val=val is not None, has_test=test is not None)
    position_to_row = {int(p): r for r, p in enumerate(train.indices)}  # undecodable images have no row
    out = {}
    for name, positions in carved.items():
        out[name] = train.subset(np.asarray([position_to_row[int(p)] for p in positions if int(p) in position_to_row]))
    if val is not None:
        out["val"] = val
    if test is not None:
        out["test"] = test
    return out


FINAL_FITS = ("train+val", "train")


def fit_head(
    train: FeatureSet,
    val: FeatureSet | None = None,
    test: FeatureSet | None = None,
    *,
    kind: str = "logreg",
    plan: SplitPlan | None = None,
    grid: list[dict[str, Any]] | None = None,
    n_jobs: int | None = None,
    final_fit: str = "train+val",
) -> FittedHead:
    """Sweep on val, refit with the chosen values, evaluate once on test. Missing val/test are carved from train.

    ``final_fit``: ``train+val`` (default; Kornblith et al. 2019) refits on both splits, ``train`` keeps the
    model fitted on train alone, as fine-tuning does with ``--final-fit train``.
    """
    head_kind(kind)  # raises for an unknown kind
    if final_fit not in FINAL_FITS:
        raise UsageError(f"final_fit must be one of {', '.join(FINAL_FITS)}, got {final_fit!r}")
    check_same_embedder({n: fs for n, fs in {"train": train, "val": val, "test": test}.items() if fs is not None})
    plan = plan or SplitPlan()
    parts = split_features(train, val, test, plan)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    if len(np.unique(tr.labels)) < 2:
        raise UsageError("a head needs at least two classes in the training split")
    t0 = time.perf_counter()
    curve = sweep(kind, tr.features, tr.labels, va.features, va.labels, grid=grid, n_jobs=n_jobs)
    best = max(range(len(curve)), key=lambda i: (curve[i]["val_accuracy"], -i))  # ties: earlier = stronger reg.
    best_params = curve[best]["params"]
    if final_fit == "train+val":
        X_fit, y_fit = np.concatenate([tr.features, va.features]), np.concatenate([tr.labels, va.labels])
    else:
        X_fit, y_fit = tr.features, tr.labels
    estimator = make_head(kind, **best_params).fit(X_fit, y_fit)
    fit_seconds = time.perf_counter() - t0
    metrics = classification_metrics(te.labels, estimator.predict(te.features), len(train.classes)) if len(te.labels) else None
    metadata = {
        "featx_version": __version__,
        "created_at": now_iso(),
        "head": kind,
        "classes": list(train.classes),
        "embedder": train.embedder.to_dict(),
        "best_params": best_params,
        "val_accuracy": curve[best]["val_accuracy"],
        "fit_seconds": fit_seconds,
        "final_fit": final_fit,
        "n_train": len(tr.labels),
        "n_val": len(va.labels),
        "n_fit": len(y_fit),
        "n_test": len(te.labels),
        "caches": {n: fs.attrs.get("key") for n, fs in (("train", train), ("val", val), ("test", test)) if fs is not None},
        "split_plan": {"val_fraction": plan.val_fraction, "test_fraction": plan.test_fraction, "seed": plan.seed},
        "libraries": {p: importlib.metadata.version(p) for p in ("scikit-learn", "numpy")},
    }
    return FittedHead(kind, estimator, list(train.classes), best_params, curve[best]["val_accuracy"], curve, metrics, metadata)


def head_summary(head: FittedHead) -> dict[str, Any]:
    """JSON-able record of a fitted head: metadata, the sweep curve and test metrics."""
    return {**head.metadata, "sweep": head.sweep, "test_metrics": head.test_metrics}


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


# --------------------------------------------------------------------------------------------------
# Loading head files from anywhere: only what featx writes, checked before anything is constructed
#
# skops builds objects from a JSON schema of typed nodes. Its own default trust set is broad (every public
# scikit-learn estimator, numpy and scipy ufuncs, ...) and ``trusted=`` can only add to it, so featx checks
# the schema itself against the exact node types that featx writes, then hands skops that same list.

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


def _check_estimator(p: Path, kind: str, est: Any) -> None:
    """The loaded pipeline has exactly the steps featx builds for ``kind``, and fitted arrays whose shapes and
    dtypes agree with each other (libsvm and the k-NN search index into them without bounds checks)."""
    from sklearn.pipeline import Pipeline

    expected = head_kind(kind).steps()
    if type(est) is not Pipeline or not isinstance(getattr(est, "steps", None), list):
        raise _refuse(p, f"its estimator is a {type(est).__name__}, not the Pipeline featx writes")
    got = [(name, type(step)) for name, step in est.steps] if all(isinstance(s, tuple) and len(s) == 2 for s in est.steps) else []
    if got != list(expected):
        raise _refuse(p, f"its pipeline steps {[n for n, _ in got]} are not those of a {kind} head")

    def arr(obj: Any, name: str, ndim: int, kinds: str) -> np.ndarray:
        a = getattr(obj, name, None)
        if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype.kind not in kinds:
            raise _refuse(p, f"{type(obj).__name__}.{name} is missing or malformed")
        return a

    def ok(cond: bool, what: str) -> None:
        if not cond:
            raise _refuse(p, f"inconsistent fitted state: {what}")

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
    if kind in ("logreg", "linear-svm"):
        rows = 1 if k == 2 else k
        ok(arr(last, "coef_", 2, "f").shape == (rows, d) and arr(last, "intercept_", 1, "f").shape == (rows,), "coef_ shape")
    elif kind == "rbf-svm":
        sv = arr(last, "support_vectors_", 2, "f")
        n_sv = sv.shape[0]
        n_support = arr(last, "_n_support", 1, "i")
        ok(sv.dtype == np.float64 and sv.shape[1] == d and n_sv > 0, "support vectors")
        ok(n_support.shape == (k,) and int(n_support.sum()) == n_sv and (n_support >= 0).all(), "_n_support")
        ok(arr(last, "_dual_coef_", 2, "f").shape == (k - 1, n_sv), "_dual_coef_")
        ok(arr(last, "_intercept_", 1, "f").shape == (k * (k - 1) // 2,), "_intercept_")
        ok(arr(last, "support_", 1, "i").shape == (n_sv,), "support_")
        ok(tuple(getattr(last, "shape_fit_", ()))[1:] == (d,) and last.kernel == "rbf" and not last._sparse, "kernel")
        ok(arr(last, "_probA", 1, "f").size == 0 and arr(last, "_probB", 1, "f").size == 0, "probability arrays")
    elif kind == "knn":
        fit_x = arr(last, "_fit_X", 2, "f")
        y = arr(last, "_y", 1, "iu")
        n = fit_x.shape[0]
        ok(last._fit_method == "brute" and getattr(last, "_tree", None) is None, "search method")
        ok(fit_x.shape[1] == d and y.shape == (n,) and last.n_samples_fit_ == n, "training rows")
        ok(isinstance(last.n_neighbors, int) and 1 <= last.n_neighbors <= n and last.weights in ("distance", "uniform"), "k")
        ok(y.size == 0 or (0 <= y.min() and y.max() < k), "labels")
        ok(last.effective_metric_ == "euclidean", "metric")


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
    _check_estimator(p, kind, payload["estimator"])
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
