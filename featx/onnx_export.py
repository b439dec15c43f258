"""ONNX Runtime for the frozen forward: export once per embedder, keep the ``.onnx`` next to the cache, check it, run it.

Measured on the 2-core CPU (``benchmarks/results/bench_extract.md``): ONNX Runtime runs EfficientNet-Lite0 about 2x
faster than PyTorch eager or featx's frozen TorchScript, with features equal to float32 rounding. So on the CPU, in
fp32, ``runtime="auto"`` uses it when ``onnxruntime`` is importable and the export passes its check; PyTorch runs
everything else (CUDA, fp16/bf16, decode in worker processes or on the GPU).

**What is exported.** The network up to the deepest tapped layer, with featx's preprocessing tail folded in: the
graph takes the decoded uint8 crops (N, H, W, 3) and does ``ToTensor`` + ``Normalize`` itself, then returns one
output per tapped layer (``pooled``, or ``blocks.N`` global-average-pooled exactly as
:meth:`featx.backbones.Backbone.feature_model` pools it), so one ONNX Runtime pass gives every layer of a layer-wise
probe. The exporter is ``torch.onnx.export(dynamo=False)`` (the TorchScript-based exporter; no onnxscript needed), opset
:data:`OPSET`, a dynamic batch axis.

**The check.** Every export is compared with PyTorch's eager forward of the same module on a seeded probe batch of 2
images and of 1 (the batch axis must really be dynamic): for every output, ``max |ort - torch| / max |torch|`` must be
at most :data:`TOLERANCE` (1e-4, the tolerance featx already applies to BatchNorm folding and TorchScript freezing;
measured ~6e-5 relative / 8e-6 absolute on Lite0). An export that fails or disagrees is never used: ``auto`` falls back
to PyTorch with a warning, an explicit ``--runtime onnxruntime`` is a one-line error.

**The file.** ``<cache_dir>/<backbone>-<layers>-<key>.onnx``. The key hashes the embedder's identity (backbone, weights
sha256, input size, precision, library versions; :class:`~featx.backbones.EmbedderSpec`), the tapped layers and the
export recipe (exporter, opset, torch, onnx and onnxruntime versions): anything that changes gives another file.
The file is a plain ONNX model (any ONNX tool opens it) followed by two metadata entries featx appends (protobuf
concatenation merges them into ``metadata_props``): ``featx_manifest`` (JSON: format, key, embedder with its
preprocessing, layers and their widths, recipe, the check's figures) and a fixed-size ``featx_trailer`` holding the
manifest's length and the sha256 of everything before the trailer. It is written to a hidden temporary name, fsync'd
and renamed.

- Used only when the trailer, the manifest (format, the key of its name, the same identity) and the sha256 all check
  out; the verified bytes themselves are what ONNX Runtime loads (no second read). A damaged file of featx's is
  replaced by a fresh export; anything else at the name is never used and never replaced.
- Provably featx's (:func:`onnx_file_problem`, used by ``featx cache ls/rm``): a regular file, not a symbolic link,
  named ``<...>-<key>.onnx``, whose trailer and manifest are featx's for that key (like a cache file: damaged data
  does not matter for ownership; ``featx cache verify`` checks the digest).

Reusing a ready ``.onnx`` needs neither timm nor torchvision nor torch: the manifest carries the preprocessing, the
layer widths and the embedder record, so an extraction that finds one builds no PyTorch model at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featx.backbones import POOLED, EmbedderSpec, Preprocessing
from featx.data import keyed_file_problem
from featx.errors import UsageError

log = logging.getLogger(__name__)

ONNX_FORMAT = "featx-onnx-1"
OPSET = 17
EXPORTER = "torch.onnx.export(dynamo=False)"
#: Agreement an export must reach with PyTorch's eager forward on the probe batch, per output:
#: max |ort - torch| / max |torch|. The same bound featx applies to BatchNorm folding and TorchScript freezing.
TOLERANCE = 1e-4
ONNX_EXT = ".onnx"
_ONNX_NAME_RE = re.compile(r"^.+-(?P<key>[0-9a-f]{20})\.onnx$")
_MANIFEST_KEY = b"featx_manifest"
_TRAILER_KEY = b"featx_trailer"
_DIGITS = 12


class OnnxUnusable(Exception):
    """Why ONNX Runtime cannot run this embedder here (not installed, export failed, the check failed, a foreign file
    at the name, ...): ``auto`` falls back to PyTorch with this as the warning, an explicit runtime raises it as a
    :class:`~featx.errors.UsageError`."""


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` can be imported (without importing it; ``sys.modules["onnxruntime"] = None``, the
    standard way to block an import, counts as absent)."""
    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except (ValueError, ImportError):
        return False


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def recipe() -> dict[str, Any]:
    """How featx exports: part of every ``.onnx`` key, so a change of any of these re-exports (and re-checks)."""
    return {
        "format": ONNX_FORMAT,
        "exporter": EXPORTER,
        "opset": OPSET,
        "input": "uint8 NHWC, normalised in the graph",
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
    }


# --------------------------------------------------------------------------------------------------
# Which runtime


def planned_runtime(settings: Any, device_type: str, precision: str) -> str:
    """The runtime a run will use unless the export fails: ``torch`` or ``onnxruntime``.

    ``auto``: ONNX Runtime on the CPU in fp32 with threads or streams decoding, when ``onnxruntime`` is importable;
    PyTorch otherwise (on CUDA always: no GPU was measured with ORT's CUDA provider yet, and PyTorch + autocast is the
    GPU path featx measured). An explicit ``onnxruntime`` where it cannot run is a :class:`UsageError`.
    """
    requested = settings.runtime
    if requested == "torch":
        return "torch"
    why = None
    if device_type != "cpu":
        why = f"the device is {device_type} (ONNX Runtime runs on the CPU in featx)"
    elif precision != "fp32":
        why = f"precision {precision} (ONNX Runtime runs fp32 in featx)"
    elif settings.decode in ("processes", "gpu") or (settings.num_workers or 0) > 0:
        why = "decoding in worker processes or on the GPU (ONNX Runtime decodes in streams or threads)"
    elif not onnxruntime_available():
        why = "the onnxruntime package is not installed (pip install onnxruntime onnx)"
    if why is None:
        return "onnxruntime"
    if requested == "onnxruntime":
        raise UsageError(f"--runtime onnxruntime cannot run here: {why}; use --runtime torch or auto")
    return "torch"


def unusable(requested: str, why: str) -> None:
    """An export or file that cannot be used: a one-line UsageError for an explicit ``onnxruntime``, else a warning
    (``auto`` goes on with PyTorch)."""
    if requested == "onnxruntime":
        raise UsageError(f"--runtime onnxruntime cannot be used: {why}; use --runtime torch or auto")
    log.warning("ONNX Runtime not used (%s); running PyTorch", why)


# --------------------------------------------------------------------------------------------------
# Names and keys


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_")[:40] or "x"


def onnx_identity(embedder: EmbedderSpec, taps: Sequence[str]) -> dict[str, Any]:
    """What an ``.onnx`` key hashes: the embedder (its layer replaced by the tapped layers), the recipe."""
    ident = {**embedder.identity(), "layer": None}
    return {"embedder": ident, "taps": list(taps), "recipe": recipe()}


def onnx_key(embedder: EmbedderSpec, taps: Sequence[str]) -> str:
    blob = json.dumps(onnx_identity(embedder, taps), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def onnx_path(cache_dir: str | os.PathLike[str], embedder: EmbedderSpec, taps: Sequence[str]) -> Path:
    """``<cache_dir>/<backbone>-<layers>-<key>.onnx``: where the export of these layers of this embedder lives."""
    return Path(cache_dir) / f"{_slug(embedder.backbone)}-{_slug('+'.join(taps))}-{onnx_key(embedder, taps)}{ONNX_EXT}"


# --------------------------------------------------------------------------------------------------
# The file: ONNX bytes + featx_manifest + featx_trailer (protobuf metadata_props entries, field 14)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise ValueError("bad varint")
        c = b[i]
        n |= (c & 0x7F) << shift
        i += 1
        if not c & 0x80:
            return n, i
        shift += 7


def _entry(key: bytes, value: bytes) -> bytes:
    """A serialised ``ModelProto.metadata_props`` entry (field 14, a StringStringEntryProto)."""
    inner = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value
    return b"\x72" + _varint(len(inner)) + inner


def _parse_entry(b: bytes) -> tuple[bytes, bytes]:
    """(key, value) of a whole serialised metadata entry; ValueError otherwise."""
    if not b or b[0] != 0x72:
        raise ValueError("not a metadata entry")
    n, i = _read_varint(b, 1)
    if i + n != len(b) or b[i] != 0x0A:
        raise ValueError("not a metadata entry")
    kl, i = _read_varint(b, i + 1)
    key, i = b[i : i + kl], i + kl
    if i >= len(b) or b[i] != 0x12:
        raise ValueError("not a metadata entry")
    vl, i = _read_varint(b, i + 1)
    if i + vl != len(b):
        raise ValueError("not a metadata entry")
    return key, b[i:]


def _trailer(manifest_len: int, digest: str) -> bytes:
    return _entry(_TRAILER_KEY, f"{manifest_len:0{_DIGITS}d}{digest}".encode())


TRAILER_SIZE = len(_trailer(0, "0" * 64))


def file_bytes(model: bytes, manifest: dict[str, Any]) -> bytes:
    """The ``.onnx`` featx writes: the exported model, its manifest, the trailer (manifest length + sha256)."""
    m = _entry(_MANIFEST_KEY, json.dumps(manifest, sort_keys=True).encode())
    body = model + m
    return body + _trailer(len(m), hashlib.sha256(body).hexdigest())


@dataclass(frozen=True)
class _Parsed:
    manifest: dict[str, Any]
    digest: str  # the sha256 the trailer records
    body_len: int  # bytes the digest covers


def _parse_tail(tail: bytes, read_at: Callable[[int, int], bytes], size: int) -> _Parsed:
    key, value = _parse_entry(tail)
    if key != _TRAILER_KEY or not re.fullmatch(rb"\d{%d}[0-9a-f]{64}" % _DIGITS, value):
        raise ValueError("no featx trailer")
    mlen, digest = int(value[:_DIGITS]), value[_DIGITS:].decode()
    body_len = size - TRAILER_SIZE
    if not 0 < mlen <= min(body_len, 1 << 24):
        raise ValueError("no featx manifest")
    key, value = _parse_entry(read_at(body_len - mlen, mlen))
    if key != _MANIFEST_KEY:
        raise ValueError("no featx manifest")
    manifest = json.loads(value.decode("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != ONNX_FORMAT:
        raise ValueError("not a featx manifest")
    return _Parsed(manifest, digest, body_len)


def _read_parsed(p: Path) -> tuple[_Parsed | None, str]:
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size <= TRAILER_SIZE:
                return None, "too short to be featx's (truncated?)"
            fh.seek(size - TRAILER_SIZE)

            def read_at(off: int, n: int) -> bytes:
                fh.seek(off)
                return fh.read(n)

            return _parse_tail(fh.read(TRAILER_SIZE), read_at, size), ""
    except OSError as exc:
        return None, f"it cannot be read: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"no featx manifest at its end ({exc}; truncated, or not written by featx)"


def onnx_file_problem(path: str | os.PathLike[str]) -> str | None:
    """None when ``path`` is provably an ``.onnx`` featx wrote for the key of its name (a regular file named
    ``<...>-<key>.onnx`` ending in featx's manifest and trailer for that key); else why not. The digest is not checked
    here (:func:`onnx_damage`): a damaged file of featx's is still featx's to replace or delete."""
    p = Path(path)
    m = _ONNX_NAME_RE.match(p.name)
    name_help = "ONNX name (<backbone>-<layers>-<20-hex key>.onnx)"
    return keyed_file_problem(p, m["key"] if m else None, name_help, _manifest_key, "the export")


def _manifest_key(p: Path) -> tuple[str | None, str]:
    parsed, why = _read_parsed(p)
    return (None, why) if parsed is None else (parsed.manifest.get("key"), "")


def onnx_damage(path: str | os.PathLike[str]) -> str | None:
    """None when the sha256 of a featx ``.onnx`` matches its trailer; else what is wrong (read in full)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    try:
        _verified(data)
    except ValueError as exc:
        return str(exc)
    return None


def onnx_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a featx ``.onnx`` (for ``cache ls``), None when there is none."""
    parsed, _ = _read_parsed(Path(path))
    return parsed.manifest if parsed else None


def _verified(data: bytes) -> _Parsed:
    if len(data) <= TRAILER_SIZE:
        raise ValueError("too short to be featx's (truncated?)")
    parsed = _parse_tail(data[-TRAILER_SIZE:], lambda off, n: data[off : off + n], len(data))
    if hashlib.sha256(memoryview(data)[: parsed.body_len]).hexdigest() != parsed.digest:
        raise ValueError("its sha256 does not match the one featx recorded: damaged")
    return parsed


def _load_verified(path: Path, embedder: EmbedderSpec, taps: Sequence[str]) -> tuple[bytes, dict[str, Any]]:
    """The bytes and manifest of a usable ``.onnx`` at ``path``; ValueError with the reason otherwise."""
    why = onnx_file_problem(path)
    if why:
        raise ValueError(why)
    data = path.read_bytes()
    parsed = _verified(data)
    want = onnx_identity(embedder, taps)
    if parsed.manifest.get("key") != onnx_key(embedder, taps) or parsed.manifest.get("identity") != json.loads(json.dumps(want)):
        raise ValueError("it was exported for another embedder or recipe")
    return data, parsed.manifest


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# Export and check (torch imported here only)


def _make_export_module(base: Any, taps: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> Any:
    import torch
    import torch.nn as nn

    modules = dict(base.named_modules())
    missing = [t for t in taps if t != POOLED and t not in modules]
    if missing:
        raise UsageError(f"the model has no layer(s) {', '.join(missing)}")

    class _Stop(Exception):
        pass

    class ExportModule(nn.Module):
        """uint8 NHWC -> (pooled output of each tap): featx's normalisation, then the network, stopping after the last
        tap when the pooled output is not asked for. Pooling as Backbone.feature_model: spatial mean of 4-D outputs,
        else flatten."""

        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = x.permute(0, 3, 1, 2).float().div(255).sub(self.mean).div(self.std)
            outs: dict[str, torch.Tensor] = {}
            wanted = [t for t in taps if t != POOLED]

            def hook(name: str) -> Callable[..., None]:
                def fn(_m: Any, _i: Any, o: torch.Tensor) -> None:
                    outs[name] = o.mean(dim=(2, 3)) if o.dim() == 4 else o.flatten(1)
                    if POOLED not in taps and len(outs) == len(wanted):
                        raise _Stop

                return fn

            handles = [modules[t].register_forward_hook(hook(t)) for t in wanted]
            try:
                final = self.base(x)
            except _Stop:
                final = None
            finally:
                for h in handles:
                    h.remove()
            return tuple(final if t == POOLED else outs[t] for t in taps)

    return ExportModule().eval()


def export_checked(
    base: Any, taps: Sequence[str], preprocessing: Preprocessing, embedder: EmbedderSpec
) -> tuple[bytes, dict[str, Any]]:
    """Export ``base`` (a torch module on the CPU, eval) with these taps and check it against PyTorch's eager forward of
    the same computation: the file's bytes and manifest. :class:`OnnxUnusable` when the export fails or disagrees."""
    import io

    import torch

    t0 = time.perf_counter()
    try:
        module = _make_export_module(base, taps, preprocessing.mean, preprocessing.std)
        size = preprocessing.input_size
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=gen)
        buf = io.BytesIO()
        names = [f"out{i}" for i in range(len(taps))]
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (probe,),
                buf,
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=names,
                dynamic_axes={"images": {0: "n"}, **{n: {0: "n"} for n in names}},
            )
        model = buf.getvalue()
    except UsageError:
        raise
    except Exception as exc:
        text = str(exc).strip()
        raise OnnxUnusable(f"the export failed: {type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}") from None
    t_export = time.perf_counter() - t0
    try:
        sess = _session(model, 1)
        check = []
        with torch.inference_mode():
            for x in (probe, probe[:1]):
                ref = [r.float().numpy() for r in module(x)]
                got = sess.run(None, {"images": x.numpy()})
                for t, r, g in zip(taps, ref, got):
                    if r.shape != g.shape:
                        raise OnnxUnusable(f"layer {t}: shape {g.shape} from ONNX Runtime, {r.shape} from PyTorch")
                    diff = float(np.abs(r - g).max())
                    scale = float(np.abs(r).max()) or 1e-12
                    check.append({"layer": t, "batch": len(x), "max_abs_diff": diff, "max_abs": scale, "relative": diff / scale})
    except OnnxUnusable:
        raise
    except Exception as exc:
        raise OnnxUnusable(f"ONNX Runtime could not run the export: {type(exc).__name__}: {str(exc)[:160]}") from None
    worst = max(check, key=lambda c: c["relative"])
    if not worst["relative"] <= TOLERANCE:
        raise OnnxUnusable(
            f"the export disagrees with PyTorch at layer {worst['layer']}: max |ort - torch| = {worst['max_abs_diff']:.3g}, "
            f"{worst['relative']:.3g} of the largest feature (tolerance {TOLERANCE:g})"
        )
    dims = [int(r.shape[1]) for r in ref]
    manifest = {
        "format": ONNX_FORMAT,
        "key": onnx_key(embedder, taps),
        "identity": onnx_identity(embedder, taps),
        "embedder": embedder.with_(preprocessing=preprocessing).to_dict(),
        "taps": list(taps),
        "dims": dims,
        "recipe": recipe(),
        "check": {"tolerance": TOLERANCE, "probe": "seeded uint8 images, batch 2 and 1", "worst": worst, "all": check},
        "export_seconds": round(t_export, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return model, manifest


def _session(data: bytes, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads > 1:  # decode threads share the cores between forwards: no busy-waiting workers
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class OrtFeatures:
    """A checked export run by ONNX Runtime: uint8 (N, H, W, 3) -> float32 (N, D), the taps' outputs concatenated
    in the order of ``taps``. One session per thread count (a session with one intra-op thread runs on the calling
    thread; several streams call it at once)."""

    runtime = "onnxruntime"

    def __init__(self, data: bytes, manifest: dict[str, Any], path: Path | None) -> None:
        self.data, self.manifest, self.path = data, manifest, path
        self.taps: list[str] = list(manifest["taps"])
        self.dims: list[int] = [int(d) for d in manifest["dims"]]
        self.preprocessing = Preprocessing.from_dict(manifest["embedder"]["preprocessing"])
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def feature_dim(self) -> int:
        return sum(self.dims)

    def session(self, threads: int) -> Any:
        with self._lock:
            if threads not in self._sessions:
                self._sessions[threads] = _session(self.data, threads)
            return self._sessions[threads]

    def run(self, images: np.ndarray, threads: int = 1) -> np.ndarray:
        outs = self.session(threads).run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)

    def record(self) -> dict[str, Any]:
        """What a cache records about the export it came from."""
        return {
            "file": self.path.name if self.path else "",
            "key": self.manifest["key"],
            "recipe": self.manifest["recipe"],
            "check_max_abs_diff": self.manifest["check"]["worst"]["max_abs_diff"],
            "check_relative": self.manifest["check"]["worst"]["relative"],
            "tolerance": TOLERANCE,
        }


def ort_features(
    embedder: EmbedderSpec,
    taps: Sequence[str],
    *,
    store: Path | None,
    build: Callable[[], tuple[Any, Preprocessing]],
) -> OrtFeatures:
    """The checked ONNX Runtime model for these layers of ``embedder``: the ready file in ``store`` when it verifies
    (nothing of PyTorch is built), else an export of ``build()`` (the torch module and preprocessing), checked, and
    written atomically to ``store`` (None: kept in memory only). :class:`OnnxUnusable` says why it cannot be had."""
    path = onnx_path(store, embedder, taps) if store is not None else None
    if path is not None and (path.exists() or path.is_symlink()):
        owned = onnx_file_problem(path)
        if owned is not None:
            raise OnnxUnusable(f"{path} is not featx's ({owned}); featx neither uses nor replaces it: delete it by hand")
        try:
            data, manifest = _load_verified(path, embedder, taps)
            return OrtFeatures(data, manifest, path)
        except ValueError as exc:
            log.warning("re-exporting %s: %s", path.name, exc)
        except OSError as exc:
            raise OnnxUnusable(f"cannot read {path}: {exc.strerror or exc}") from None
    base, prep = build()
    model, manifest = export_checked(base, taps, prep, embedder)
    data = file_bytes(model, manifest)
    if path is not None:
        try:
            _write_atomic(path, data)
            log.info("exported %s (checked: max |ort - torch| %.2g)", path.name, manifest["check"]["worst"]["max_abs_diff"])
        except OSError as exc:  # a read-only cache folder: run from memory
            log.warning("cannot write %s (%s): the export is used from memory", path, exc.strerror or exc)
            path = None
    return OrtFeatures(data, manifest, path)
