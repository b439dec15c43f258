"""The batched frozen forward: decode images, batch them, run the model, yield features by position.

Everything between image files and a float32 feature matrix lives here (thread and worker allocation,
batch size, memory format, model preparation, autocast, device copies), so extraction into caches,
prediction and the sklearn transformer share one hot loop. Writing the features anywhere is the caller's job.

How the work is laid out (measured on a 2-core CPU, ``benchmarks/results/bench_extract.md``):

- Decoding produces 8-bit HWC crops (PIL resize + crop exactly as torchvision's ``Resize`` + ``CenterCrop`` do
  them, without importing torchvision); ``ToTensor`` + ``Normalize`` run once per batch on the device
  (bit-identical to torchvision's per-image transforms: the same float32 operations in the same order).
  A uint8 batch is 4x smaller to move between processes or to a GPU, and its NCHW view is already channels_last.
- On the CPU the default is ``streams``: one worker thread per core, each decoding one image at a time and then
  running its forward on that core alone (torch intra-op threads = 1, batch 1 per forward), batches handed back
  in order.
  Two single-threaded streams beat one two-threaded forward by ~1.45x on Lite0 (no OpenMP barrier after every
  layer, each core's activations stay in its own cache), decoding overlaps the other stream's forward, and
  nothing ever oversubscribes the cores. ``threads`` (decode in a pool *between* forwards that use every core)
  and worker processes (``num_workers > 0``, the default on CUDA, where the CPU is otherwise idle and decoding
  is the limit) remain.
- The model is prepared once per model object: eval, channels_last, BatchNorm folded into the convolution
  before it (``fold``), and on the CPU in fp32 also TorchScript trace + freeze of the folded model (``freeze``,
  the default there); each checked against the plain forward on probe batches, falling back to ``fold`` and
  then to the plain model on any mismatch. ``compile`` (torch.compile) is opt-in.

Every choice above arrives in one value, :class:`featx.runtime.InferenceSettings`, passed by the caller (the CLI
builds it from its flags over the documented ``FEATX_*`` defaults, :meth:`~featx.runtime.InferenceSettings.from_env`);
nothing here reads the environment.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx import runtime
from featx.backbones import POOLED, Backbone, EmbedderSpec, Preprocessing
from featx.data import ImageFiles
from featx.errors import UsageError
from featx.onnx_export import OnnxUnusable, OrtFeatures, ort_features, planned_runtime, unusable
from featx.runtime import OPTIMIZE_MODES, InferenceSettings

log = logging.getLogger(__name__)

# Relative agreement an optimised model must reach against the plain eval forward on the probe batch
# (max |a - b| / max |a|); folding BatchNorm changes the float32 rounding only (~1e-6 measured on Lite0).
FOLD_TOLERANCE = 1e-4
# Peak memory of a pass as a multiple of its fp32 input's bytes, measured here (growth of peak RSS, batch 2-8 at 224-896
# px). Frozen forward in inference mode: ResNet18 12x, MobileNetV2 22x, EfficientNet-Lite0 30-31x, VGG16 63x; forward +
# backward (fine-tuning): ResNet18 74x, EfficientNet-Lite0 140x, MobileNetV2 152x, VGG16 416x. featx refuses only what
# cannot fit: the factors are the smallest measured, so the estimate is a lower bound for these backbones.
FORWARD_MEMORY_FACTOR = 12
TRAINING_MEMORY_FACTOR = 64


def check_forward_memory(
    images_in_flight: int, input_size: int, device: Any, knob: str = "the batch size", *, factor: int = FORWARD_MEMORY_FACTOR
) -> None:
    """Refuse a pass that cannot fit before it starts (a one-line UsageError instead of the kernel's OOM kill):
    ``images_in_flight`` images of ``input_size`` px need at least ``factor`` times their fp32 bytes
    (:data:`FORWARD_MEMORY_FACTOR` frozen, :data:`TRAINING_MEMORY_FACTOR` with gradients)."""
    per_image = 3 * input_size * input_size * 4 * factor
    need = images_in_flight * per_image
    free = runtime.available_memory_bytes(device)
    if free is None or need <= free:
        return
    fits = free // per_image
    fix = f"lower {knob} to {fits}" if 1 <= fits < images_in_flight else "lower --image-size"
    raise UsageError(
        f"{images_in_flight} image(s) of {input_size} px in flight need at least {need / 2**30:.1f} GiB for the pass, "
        f"{free / 2**30:.1f} GiB is available on {device}: {fix}"
    )


@dataclass(frozen=True)
class Batch:
    positions: np.ndarray  # positions in the iterated list
    features: np.ndarray  # float32 (B, D); rows of failed images are undefined
    labels: np.ndarray
    errors: list[str]  # "" for images that decoded


@dataclass
class StageTimes:
    """Seconds spent per stage of :func:`iter_features` (filled when a ``profile`` object is passed).

    ``decode``: time spent getting decoded batches (threads mode: all of the decoding, which runs between
    forwards; processes: only the stalls; streams: decode + collate seconds summed over the streams).
    ``forward`` includes normalising the batch and copying features back (streams: summed over the streams).
    ``wait``: time the loop waited for the next finished batch (in threads mode decode + forward; in streams
    mode what the parallel streams did not hide).
    """

    prepare: float = 0.0
    decode: float = 0.0
    forward: float = 0.0
    consumer: float = 0.0  # time the caller spent between batches (writing the cache)
    wait: float = 0.0  # time the loop waited for the next finished batch
    images: int = 0
    batches: int = 0
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prepare_s": self.prepare,
            "decode_s": self.decode,
            "forward_s": self.forward,
            "consumer_s": self.consumer,
            "wait_s": self.wait,
            "images": self.images,
            "batches": self.batches,
            **self.plan,
        }


def default_batch_size(device: Any) -> int:
    """Images per batch handed to the caller (and per journal write). On the CPU 16: each stream decodes 16
    images and runs them through the model :func:`default_micro_batch` at a time (larger forwards are slower
    per image there, ``benchmarks/results/bench_extract.md``); on CUDA 256 keeps an H100 busy
    (``../shared/notes/gpu-reference.md``)."""
    return 256 if device.type == "cuda" else 16


# --------------------------------------------------------------------------------------------------
# Model preparation


def fold_batchnorm(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` (eval) with every BatchNorm2d that directly consumes a Conv2d's output folded
    into that convolution's weight and bias. Returns ``(model, n_folded)``.

    Pairs are found by running one small forward with hooks (a BN whose input is the very tensor a conv
    returned). timm's ``BatchNormAct2d`` keeps its activation (it becomes ``Sequential(drop, act)``).
    The caller must check the result against the original (:func:`prepare_model` does): a conv output
    that is also used elsewhere, or a hook on a replaced module, would change the numbers.
    """
    import torch
    import torch.nn as nn

    model = copy.deepcopy(model).eval()
    produced: dict[int, nn.Module] = {}
    keep: list[Any] = []  # keep conv outputs alive so their ids stay unique during the probe
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def conv_hook(m: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = m
            keep.append(out)

    def bn_hook(m: nn.Module, inp: tuple[Any, ...]) -> None:
        if inp and isinstance(inp[0], torch.Tensor) and id(inp[0]) in produced:
            pairs.append((produced[id(inp[0])], m))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_var is not None:
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64))
    finally:
        for h in handles:
            h.remove()
        keep.clear()
    seen_convs: set[int] = set()
    parents: dict[int, tuple[nn.Module, str]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            parents[id(child)] = (parent, name)
    n = 0
    with torch.no_grad():
        for conv, bn in pairs:
            if id(conv) in seen_convs or id(bn) not in parents:  # a conv feeding two BNs: leave both alone
                continue
            seen_convs.add(id(conv))
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            parent, name = parents[id(bn)]
            tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
            setattr(parent, name, nn.Sequential(*tail) if tail else nn.Identity())
            n += 1
    return model, n


def _relative_difference(a: Any, b: Any) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


_PREPARED: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], tuple[Any, str]]] = weakref.WeakKeyDictionary()


def resolve_optimize(optimize: str, device: Any, precision: str = "fp32") -> str:
    """``auto`` -> ``freeze`` on the CPU in fp32 (TorchScript trace + freeze of the folded model: the fastest CPU
    path measured, ``benchmarks/results/bench_extract.md``), else ``fold`` (autocast and CUDA keep eager modules)."""
    if optimize not in OPTIMIZE_MODES:
        raise UsageError(f"optimize must be one of {', '.join(OPTIMIZE_MODES)}, got '{optimize}'")
    if optimize == "auto":
        return "freeze" if device.type == "cpu" and precision == "fp32" else "fold"
    return optimize


class _Mismatch(ValueError):
    pass


def prepare_model(
    model: Any, *, device: Any, input_size: int, channels_last: bool = True, optimize: str = "auto", precision: str = "fp32"
) -> tuple[Any, str]:
    """The callable to run for inference and the optimisation actually applied (``none``, ``fold``,
    ``freeze`` or ``compile``). Cached per model object, so several splits prepare once.

    ``auto``: see :func:`resolve_optimize`. ``fold`` and ``freeze`` are checked against the plain forward on a
    random probe batch of 2 and of 1 (relative max difference <= FOLD_TOLERANCE). A ``freeze`` that fails or
    disagrees falls back to ``fold``, a ``fold`` that does to the plain model (a warning when the mode was asked
    for explicitly). ``compile`` is trusted to torch.compile (its first batches compile).
    """
    import torch

    requested = optimize
    optimize = resolve_optimize(optimize, device, precision)
    key = (str(device), channels_last, optimize, precision, input_size)
    cached = _PREPARED.get(model, {}).get(key)
    if cached is not None:
        return cached
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    plain = model.to(device).eval()
    if channels_last:
        plain = plain.to(memory_format=memory_format)
    out: tuple[Any, str] = (plain, "none")
    if optimize in ("fold", "freeze"):
        for mode in ("freeze", "fold") if optimize == "freeze" else ("fold",):
            try:
                out = _fold_or_freeze(plain, mode, device, input_size, memory_format, precision)
                break
            except Exception as exc:  # an exotic model (hooks that stop the forward, ...): the plain forward is always right
                why = f"{type(exc).__name__}: {exc}"
                then = "using fold" if mode == "freeze" else "using the plain model"
                (log.debug if requested == "auto" else log.warning)(
                    "could not %s %s (%s); %s", mode, type(model).__name__, why, then
                )
    elif optimize == "compile":
        out = (torch.compile(plain, dynamic=False), "compile")
    _PREPARED.setdefault(model, {})[key] = out
    return out


def _fold_or_freeze(
    plain: Any, optimize: str, device: Any, input_size: int, memory_format: Any, precision: str
) -> tuple[Any, str]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = torch.rand(2, 3, input_size, input_size).sub_(0.5).mul_(4)  # normalised-image range
    probe = probe.to(device).contiguous(memory_format=memory_format)
    folded, n = fold_batchnorm(plain.cpu())
    plain.to(device)
    folded = folded.to(device)
    if memory_format == torch.channels_last:
        folded = folded.to(memory_format=memory_format)
    if n == 0 and optimize == "fold":
        return plain, "none"
    candidate: Any = folded
    if optimize == "freeze":
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # "torch.jit.* is deprecated": still the fastest CPU path measured
            candidate = torch.jit.freeze(torch.jit.trace(folded, probe, check_trace=False).eval())
    tol = FOLD_TOLERANCE * (1 if precision == "fp32" else 100)
    with torch.inference_mode(), runtime.autocast(device, precision):
        for x in (probe, probe[:1]):  # batch 1 too: a trace must not have baked in the batch size
            diff = _relative_difference(plain(x), candidate(x))
            if not diff <= tol:
                raise _Mismatch(f"it changed the features by {diff:.2g} (relative) at batch {len(x)}")
    return candidate, optimize


# --------------------------------------------------------------------------------------------------
# Decoding to uint8 batches


PIL_INTERPOLATION = {"nearest": 0, "nearest-exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


class _ResizeCropHWC:
    """PIL RGB image -> uint8 array (H, W, 3): torchvision's ``Resize(resize_size)`` + ``CenterCrop(input_size)``
    on PIL images, step for step (the same output size rule, the same ``Image.resize`` call with the same filter,
    the same crop box, zeros where the crop is larger than the image), without importing torchvision.
    Normalisation happens per batch (see the module doc)."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        if preprocessing.interpolation not in PIL_INTERPOLATION:
            raise UsageError(f"unknown interpolation '{preprocessing.interpolation}' (known: {', '.join(PIL_INTERPOLATION)})")
        self.short = preprocessing.resize_size
        self.crop = preprocessing.input_size
        self.filter = PIL_INTERPOLATION[preprocessing.interpolation]

    def size_after_resize(self, w: int, h: int) -> tuple[int, int]:
        """torchvision's ``_compute_resized_output_size`` for one requested short side."""
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.short, int(self.short * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def __call__(self, image: Any) -> np.ndarray:
        w, h = image.size
        nw, nh = self.size_after_resize(w, h)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), self.filter)
        c = self.crop
        pad_l, pad_t = ((c - nw) // 2 if c > nw else 0), ((c - nh) // 2 if c > nh else 0)
        pw, ph = max(nw, c), max(nh, c)  # the size after torchvision's zero padding
        left, top = int(round((pw - c) / 2.0)) - pad_l, int(round((ph - c) / 2.0)) - pad_t
        if (left, top, nw, nh) != (0, 0, c, c):
            image = image.crop((left, top, left + c, top + c))  # PIL fills outside the image with zeros
        return np.asarray(image, dtype=np.uint8)


def uint8_transform(preprocessing: Preprocessing) -> Callable[[Any], np.ndarray]:
    """The eval transform up to the crop (the same PIL resize and crop as ``build_transform``), as uint8 HWC."""
    return _ResizeCropHWC(preprocessing)


class _Collate:
    """Stack ``ImageFiles`` items into ``(uint8 (B, H, W, 3), labels, positions, errors)``; failed rows are zeros."""

    def __init__(self, size: int, *, as_numpy: bool = False) -> None:
        self.size = size
        self.as_numpy = as_numpy  # ONNX Runtime: a numpy batch, torch never imported

    def __call__(self, items: Sequence[tuple[Any, int, int, str]]) -> tuple[Any, np.ndarray, np.ndarray, list[str]]:
        if self.as_numpy:
            arr = np.zeros((len(items), self.size, self.size, 3), dtype=np.uint8)
            out: Any = arr
        else:
            import torch

            out = torch.zeros((len(items), self.size, self.size, 3), dtype=torch.uint8)
            arr = out.numpy()
        errors = []
        for k, (image, _lab, _pos, err) in enumerate(items):
            if not err:
                image = np.asarray(image)
                if image.shape != (self.size, self.size, 3):
                    err = f"decode error: preprocessing gave shape {image.shape}, expected {(self.size, self.size, 3)}"
                else:
                    arr[k] = image
            errors.append(err)
        labels = np.array([it[1] for it in items], dtype=np.int64)
        positions = np.array([it[2] for it in items], dtype=np.int64)
        return out, labels, positions, errors


def _die_with_parent(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a decode worker gets SIGKILL when its parent dies (even by SIGKILL),
    and decodes on one thread (the parent's forward owns the other cores)."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    import torch

    torch.set_num_threads(1)


def normalize_batch(images: Any, mean: Any, std: Any, *, channels_last: bool) -> Any:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) normalised, on the images' device.

    The float32 operations of ``ToTensor`` + ``Normalize`` in the same order, so the values are identical;
    the permuted view of an NHWC batch is already channels_last.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
    return x if channels_last else x.contiguous()


def _decode_gpu(files: ImageFiles, idx: Sequence[int], preprocessing: Preprocessing, device: Any, collate: _Collate) -> Any:
    """Batch decode JPEGs with ``torchvision.io.decode_jpeg`` on ``device`` and resize/crop there.

    Files that are not JPEGs, or that nvJPEG refuses, go through the CPU path (with its failure reasons).
    Numbers differ slightly from PIL's resize (a tensor bicubic with antialias), so this is opt-in.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    size = preprocessing.input_size
    datas: list[Any] = []
    jpeg: list[int] = []
    for k, i in enumerate(idx):
        try:
            with open(files.root / files.paths[i], "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        if raw[:3] == b"\xff\xd8\xff":
            datas.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            jpeg.append(k)
    decoded: dict[int, Any] = {}
    if datas:
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except RuntimeError:  # one bad file fails the whole batch: decode one by one
            images = []
            for d in datas:
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
                except RuntimeError:
                    images.append(None)
        interp = InterpolationMode(preprocessing.interpolation)
        for k, im in zip(jpeg, images):
            if im is None:
                continue
            im = F.resize(im, [preprocessing.resize_size], interpolation=interp, antialias=True)
            decoded[k] = F.center_crop(im, [size, size]).permute(1, 2, 0)
    rest = [k for k in range(len(idx)) if k not in decoded]
    items = [files[idx[k]] for k in rest]
    cpu_u8, _, _, cpu_err = collate(items) if items else (None, None, None, [])
    out = torch.zeros((len(idx), size, size, 3), dtype=torch.uint8, device=device)
    errors = [""] * len(idx)
    for k, im in decoded.items():
        out[k] = im
    for j, k in enumerate(rest):
        errors[k] = cpu_err[j]
        out[k] = cpu_u8[j].to(device)
    labels = np.array([int(files.labels[i]) for i in idx], dtype=np.int64)
    positions = np.array([int(files.indices[i]) for i in idx], dtype=np.int64)
    return out, labels, positions, errors


# --------------------------------------------------------------------------------------------------
# The loop


def decode_threads() -> int:
    """Threads that decode between forwards on the CPU: every core this process may use."""
    return runtime.usable_cores()


def default_streams() -> int:
    """CPU streams (``decode="streams"``): one per core this process may use."""
    return runtime.usable_cores()


def default_micro_batch(device: Any) -> int:
    """Images per forward inside a stream: 1 on the CPU. Measured on the 2-core CPU (Lite0, frozen, channels_last):
    two single-threaded streams at batch 1 ran 81 img/s against 57 at batch 8 and 51 at batch 16, and against 56
    for the best single forward with two intra-op threads (``benchmarks/results/bench_extract.md``): small batches
    keep each core's activations in its own cache and no OpenMP team waits on a barrier after every layer."""
    return 1 if device.type == "cpu" else 0


def resolve_decode(decode: str, device: Any, num_workers: int) -> str:
    """``auto`` made concrete: processes with workers, else streams on the CPU, threads on CUDA."""
    if decode == "auto":
        decode = "processes" if num_workers > 0 else ("threads" if device.type == "cuda" else "streams")
    return decode


def stream_layout(device: Any, batch_size: int, streams: int | None, micro_batch: int | None) -> tuple[int, int]:
    """(streams, images per forward in a stream) for ``decode="streams"``: the settings' ``streams`` /
    ``micro_batch``, else :func:`default_streams` / :func:`default_micro_batch`."""
    n_streams = streams or default_streams()
    micro = micro_batch or default_micro_batch(device) or batch_size
    return n_streams, micro


def resolve_settings(settings: InferenceSettings, device: Any) -> InferenceSettings:
    """``settings`` with the device, batch size and worker count made concrete (:func:`default_batch_size`,
    :func:`featx.runtime.default_num_workers` for ``device``, a resolved ``torch.device``)."""
    return settings.with_(
        device=str(device),
        batch_size=settings.batch_size or default_batch_size(device),
        num_workers=runtime.default_num_workers(device) if settings.num_workers is None else settings.num_workers,
    )


def images_in_flight(device: Any, settings: InferenceSettings) -> tuple[int, str]:
    """How many images :func:`iter_features` runs through the model at once, and the setting that changes it."""
    s = resolve_settings(settings, device)
    assert s.batch_size is not None and s.num_workers is not None  # resolved
    if resolve_decode(s.decode, device, s.num_workers) == "streams":
        n_streams, micro = stream_layout(device, s.batch_size, s.streams, s.micro_batch)
        return n_streams * micro, "the streams x micro-batch (FEATX_STREAMS, FEATX_MICRO_BATCH)"
    return s.batch_size, "--batch-size"


_DEFAULT_SETTINGS = InferenceSettings()  # featx's own choices (no environment: callers pass from_env() if they want it)

#: Lets the nvJPEG branch run with a CPU device (the tests exercise its code without a GPU).
_GPU_DECODE_ON_CPU = False


def iter_features(
    model: Any,
    preprocessing: Preprocessing,
    root: str | Path,
    paths: Sequence[str],
    labels: Sequence[int] | np.ndarray | None = None,
    *,
    settings: InferenceSettings = _DEFAULT_SETTINGS,
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "extract",
    profile: StageTimes | None = None,
) -> Iterator[Batch]:
    """Yield features for ``paths`` batch by batch, in order. ``model`` maps images to (N, D).

    ``settings`` (:class:`~featx.runtime.InferenceSettings`) say where and how: device, batch size (default
    :func:`default_batch_size`), worker processes, memory format, model preparation (``optimize``: see
    :func:`prepare_model`) and ``decode``, how decoding and the forward share the machine:

    - ``streams`` (the CPU default): ``streams`` worker threads (default: one per core), each decoding
      ``micro_batch`` images (default :func:`default_micro_batch`) and running their forward on one core (torch
      intra-op threads = 1 while the loop runs); batches of ``batch_size`` come back in order. No core ever runs
      two heavy things at once, decoding overlaps the other streams' forwards, and the caller's work between
      batches (writing the cache) overlaps both.
    - ``threads``: a pool of :func:`decode_threads` threads; on the CPU it decodes between forwards that use
      every core (intra-op threads), on CUDA two batches ahead of them.
    - ``processes``: ``num_workers`` DataLoader worker processes (the default on CUDA and with ``--num-workers``).
    - ``gpu``: nvJPEG on the CUDA device (opt-in: its resize differs slightly from PIL's).
    - ``auto``: processes when ``num_workers > 0``, else streams on the CPU and threads on CUDA.

    ``jpeg_draft``: let JPEGs decode at a reduced DCT scale when they are at least twice the resize size
    (faster on large photos; changes the numbers slightly, so off unless asked for).

    ``model`` may also be a checked ONNX export (:class:`featx.onnx_export.OrtFeatures`): ONNX Runtime then runs the
    forward (see :func:`_iter_features_ort`) and torch is not imported.
    """
    if isinstance(model, OrtFeatures):
        yield from _iter_features_ort(
            model, preprocessing, root, paths, labels, settings=settings, progress=progress, desc=desc, profile=profile
        )
        return
    import torch

    t_start = time.perf_counter()
    device = runtime.resolve_device(settings.device)
    settings = resolve_settings(settings, device)
    batch_size, num_workers, channels_last = settings.batch_size, settings.num_workers, settings.channels_last
    assert batch_size is not None and num_workers is not None  # resolved
    decode = resolve_decode(settings.decode, device, num_workers)
    cuda = device.type == "cuda"
    if decode == "processes" and num_workers <= 0:
        raise UsageError("decode 'processes' needs --num-workers > 0")
    if decode == "gpu" and not cuda and not _GPU_DECODE_ON_CPU:
        raise UsageError("--decode gpu needs a CUDA device")
    if decode == "streams" and cuda:
        raise UsageError("decode 'streams' is for the CPU (on CUDA use threads, processes or gpu)")
    n_streams, micro = stream_layout(device, batch_size, settings.streams, settings.micro_batch)
    size = preprocessing.input_size
    files = _image_files(preprocessing, root, paths, labels, settings)
    collate = _Collate(size)
    n_flight, knob = images_in_flight(device, settings)
    check_forward_memory(n_flight, size, device, knob)
    fn, applied = prepare_model(
        model, device=device, input_size=size, channels_last=channels_last, optimize=settings.optimize, precision=precision
    )
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    if profile is not None:
        profile.prepare += time.perf_counter() - t_start
        profile.plan = {
            "decode": decode,
            "optimize": applied,
            "batch_size": batch_size,
            "num_workers": num_workers if decode == "processes" else 0,
            "decode_threads": decode_threads() if decode in ("threads", "gpu") else 0,
            "streams": n_streams if decode == "streams" else 0,
            "micro_batch": micro if decode == "streams" else batch_size,
            "runtime": "torch",
            "torch_threads": 1 if decode == "streams" else torch.get_num_threads(),
            "channels_last": channels_last,
            "jpeg_draft": settings.jpeg_draft,
            "device": str(device),
        }
    bar = runtime.progress_bar(None, total=len(files), desc=desc, enabled=progress)

    def forward(images: Any) -> np.ndarray:
        x = normalize_batch(images.to(device, non_blocking=True), mean, std, channels_last=channels_last)
        with runtime.autocast(device, precision):
            feats = fn(x)
        return feats.float().cpu().numpy()  # synchronises with the device

    if decode == "streams":
        results = _streams(files, collate, batch_size, n_streams, micro, forward)
    else:
        results = _decode_then_forward(files, collate, preprocessing, device, batch_size, num_workers, decode, forward)
    with torch.inference_mode():
        yield from _consume(results, bar, profile)


def _consume(results: Iterator[_Result], bar: Any, profile: StageTimes | None) -> Iterator[Batch]:
    """Yield the finished batches of ``results`` in order, with the progress bar and the stage times."""
    try:
        while True:
            t0 = time.perf_counter()
            try:
                pos, out, labs, errors, t_dec, t_fwd = next(results)
            except StopIteration:
                break
            t1 = time.perf_counter()
            yield Batch(pos, out, labs, list(errors))
            bar.update(len(pos))
            if profile is not None:
                profile.decode += t_dec
                profile.forward += t_fwd
                profile.wait += t1 - t0
                profile.consumer += time.perf_counter() - t1
                profile.images += len(pos)
                profile.batches += 1
    finally:
        bar.close()
        results.close()


#: The ONNX Runtime layout on the CPU when ``decode`` is ``auto`` (measured on 2 cores,
#: benchmarks/results/bench_extract.md): ``streams`` (one stream per core: decode, then a one-thread session run on
#: that core) or ``threads`` (decode in a pool between session runs that use every core).
def _image_files(
    preprocessing: Preprocessing, root: str | Path, paths: Sequence[str], labels: Any, settings: InferenceSettings
) -> ImageFiles:
    """The images as uint8 crops of the model's input size (both runtimes normalise on their side of the forward)."""
    size = preprocessing.input_size
    return ImageFiles(
        root,
        paths,
        labels,
        uint8_transform(preprocessing),
        draft_size=preprocessing.resize_size if settings.jpeg_draft else None,
        failed_shape=(size, size, 3),
    )


ORT_DEFAULT_DECODE = "streams"


def _iter_features_ort(
    model: OrtFeatures,
    preprocessing: Preprocessing,
    root: str | Path,
    paths: Sequence[str],
    labels: Sequence[int] | np.ndarray | None,
    *,
    settings: InferenceSettings,
    progress: bool,
    desc: str,
    profile: StageTimes | None,
) -> Iterator[Batch]:
    """:func:`iter_features` with ONNX Runtime on the CPU, torch-free: decoding as for PyTorch (uint8 crops, the
    graph normalises), laid out as ``streams`` (each core decodes and runs a one-thread session: the default,
    :data:`ORT_DEFAULT_DECODE`) or ``threads`` (a decode pool between runs of a session with one thread per core)."""
    t_start = time.perf_counter()
    if runtime.device_type(settings.device) != "cpu":
        raise UsageError("ONNX Runtime runs on the CPU in featx: use --device cpu, or --runtime torch on CUDA")
    device = runtime.CpuDevice()
    batch_size = settings.batch_size or default_batch_size(device)
    decode = ORT_DEFAULT_DECODE if settings.decode == "auto" else settings.decode
    if decode not in ("streams", "threads"):
        raise UsageError(f"--decode {decode} needs --runtime torch (ONNX Runtime decodes in streams or threads)")
    if model.preprocessing != preprocessing:
        raise UsageError("internal: the ONNX export was made for another preprocessing")
    n_streams, micro = stream_layout(device, batch_size, settings.streams, settings.micro_batch)
    threads = 1 if decode == "streams" else runtime.usable_cores()
    size = preprocessing.input_size
    files = _image_files(preprocessing, root, paths, labels, settings)
    collate = _Collate(size, as_numpy=True)
    if decode == "streams":
        check_forward_memory(n_streams * micro, size, device, "the streams x micro-batch (FEATX_STREAMS, FEATX_MICRO_BATCH)")
    else:
        check_forward_memory(batch_size, size, device)
    model.session(threads)  # created (graph optimised) before the first batch
    if profile is not None:
        profile.prepare += time.perf_counter() - t_start
        profile.plan = {
            "runtime": "onnxruntime",
            "decode": decode,
            "optimize": "onnxruntime",
            "batch_size": batch_size,
            "num_workers": 0,
            "decode_threads": decode_threads() if decode == "threads" else 0,
            "streams": n_streams if decode == "streams" else 0,
            "micro_batch": micro if decode == "streams" else batch_size,
            "ort_threads": threads,
            "channels_last": False,
            "jpeg_draft": settings.jpeg_draft,
            "device": "cpu",
        }
    bar = runtime.progress_bar(None, total=len(files), desc=desc, enabled=progress)

    def forward(images: np.ndarray) -> np.ndarray:
        return model.run(images, threads)

    if decode == "streams":
        results = _streams(files, collate, batch_size, n_streams, micro, forward, use_torch=False)
    else:
        results = _decode_then_forward(files, collate, preprocessing, device, batch_size, 0, "threads", forward)
    yield from _consume(results, bar, profile)


_Result = tuple[np.ndarray, np.ndarray, np.ndarray, list[str], float, float]  # pos, features, labels, errors, decode s, forward s


def _decode_then_forward(
    files: ImageFiles,
    collate: _Collate,
    preprocessing: Preprocessing,
    device: Any,
    batch_size: int,
    num_workers: int,
    decode: str,
    forward: Callable[[Any], np.ndarray],
) -> Iterator[_Result]:
    """threads / processes / gpu: decoded batches from :func:`_batches`, each forward in this thread."""
    batches = _batches(files, collate, preprocessing, device, batch_size, num_workers, decode)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                images, labs, pos, errors = next(batches)
            except StopIteration:
                return
            t1 = time.perf_counter()
            out = forward(images)
            yield pos, out, labs, errors, t1 - t0, time.perf_counter() - t1
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _streams(
    files: ImageFiles,
    collate: _Collate,
    batch_size: int,
    n_streams: int,
    micro: int,
    forward: Callable[[Any], np.ndarray],
    *,
    use_torch: bool = True,
) -> Iterator[_Result]:
    """Batches decoded and forwarded by ``n_streams`` worker threads, one core each (torch intra-op threads are 1
    while this runs and restored after), yielded in order. The unit of work is one micro-batch (decode its images,
    forward them), so the images of one batch spread over all streams (its latency and the tail at the end are
    one micro-batch, not one batch); two batches are in flight, so no stream waits while the caller works."""
    from concurrent.futures import Future, ThreadPoolExecutor

    n = len(files)
    ranges = [range(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    if use_torch:
        import torch

        mode: Callable[[], Any] = torch.inference_mode
    else:  # ONNX Runtime (one intra-op thread per session run: it runs on the calling stream's thread)
        import contextlib

        mode = contextlib.nullcontext

    def work(idx: range) -> _Result:
        with mode():
            t0 = time.perf_counter()
            images, labs, pos, errors = collate([files[i] for i in idx])
            t1 = time.perf_counter()
            return pos, forward(images), labs, errors, t1 - t0, time.perf_counter() - t1

    if use_torch:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=n_streams, thread_name_prefix="featx-stream")
    pending: deque[list[Future[_Result]]] = deque()
    it = iter(ranges)
    try:
        while True:
            while len(pending) < 2:
                r = next(it, None)
                if r is None:
                    break
                pending.append([pool.submit(work, r[k : k + micro]) for k in range(0, len(r), micro)])
            if not pending:
                return
            parts = [f.result() for f in pending.popleft()]
            yield (
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]),
                [e for p in parts for e in p[3]],
                sum(p[4] for p in parts),
                sum(p[5] for p in parts),
            )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if use_torch:
            torch.set_num_threads(threads)


def _batches(
    files: ImageFiles,
    collate: _Collate,
    preprocessing: Preprocessing,
    device: Any,
    batch_size: int,
    num_workers: int,
    decode: str,
) -> Iterator[tuple[Any, np.ndarray, np.ndarray, list[str]]]:
    """Decoded uint8 batches in order, by the chosen decode mode."""
    n = len(files)
    ranges = [range(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    cuda = device.type == "cuda"
    if decode == "processes":
        from torch.utils.data import DataLoader

        loader = DataLoader(
            files,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=cuda,
            worker_init_fn=_die_with_parent,
            persistent_workers=False,
            prefetch_factor=4,
        )
        yield from loader
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="featx-decode")
    # On the CPU the next batch is decoded only when asked for (between forwards: no oversubscription);
    # on CUDA two batches are decoded ahead while the device computes.
    ahead = 2 if cuda else 0
    try:
        if decode == "gpu":
            for r in ranges:
                yield _decode_gpu(files, list(r), preprocessing, device, collate)
            return
        pending: deque[list[Any]] = deque()
        it = iter(ranges)

        def submit() -> bool:
            r = next(it, None)
            if r is None:
                return False
            pending.append([pool.submit(files.__getitem__, i) for i in r])
            return True

        while True:
            while len(pending) <= ahead and submit():
                pass
            if not pending:
                return
            items = [f.result() for f in pending.popleft()]
            batch = collate(items)
            if cuda:
                batch = (batch[0].pin_memory(), *batch[1:])
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: Checked exports made in this process, per torch model object (the transformer and prediction export once).
_ORT_MODELS: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], OrtFeatures]] = weakref.WeakKeyDictionary()


def export_source(backbone: Backbone, layer: str) -> tuple[Any, list[str]]:
    """(torch module, tapped layers) that an ONNX export of ``backbone.feature_model(layer)`` computes: the network
    and ``[layer]``, or for a multi-layer model (:meth:`~featx.backbones.Backbone.multi_layer_model`, the layer-wise
    probe) the network under it and every tap, each an output of the one graph."""
    taps = getattr(backbone.model, "_taps", None)
    if taps is not None and layer == POOLED:
        return backbone.model.model, [name for name, _ in taps]
    return backbone.model, [layer]


def select_model(
    embedder: EmbedderSpec,
    taps: Sequence[str],
    *,
    settings: InferenceSettings,
    device_type: str,
    store: Path | None,
    build_export: Callable[[], tuple[Any, Preprocessing]],
    torch_model: Callable[[], Any],
) -> Any:
    """What :func:`iter_features` runs: a checked ONNX export (:class:`~featx.onnx_export.OrtFeatures`) when the
    settings' runtime resolves to ONNX Runtime here (:func:`~featx.onnx_export.planned_runtime`) and the export can be
    had (ready in ``store``, or made from ``build_export()`` and checked), else ``torch_model()``. ``auto`` falls back
    to PyTorch with a warning, an explicit ``onnxruntime`` raises a one-line :class:`UsageError`."""
    if planned_runtime(settings, device_type, embedder.precision) == "onnxruntime":
        try:
            return ort_features(embedder, taps, store=store, build=build_export)
        except OnnxUnusable as exc:
            unusable(settings.runtime, str(exc))
    return torch_model()


def compute_features(
    backbone: Backbone,
    root: str | Path,
    paths: Sequence[str],
    *,
    layer: str = POOLED,
    precision: str = "fp32",
    settings: InferenceSettings | None = None,
    progress: bool = False,
    device: str | Any | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    optimize: str | None = None,
    decode: str | None = None,
    onnx_dir: str | Path | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Features of images in memory (no cache): ``(features (N, D) float32, errors)``.

    ``settings``: how the forward runs (default: :meth:`InferenceSettings.from_env`); ``device``, ``batch_size``,
    ``num_workers``, ``optimize`` and ``decode`` are a convenience that builds them (or must agree with them).
    ``errors[i]`` is "" when image i decoded, else the reason (its feature row is zeros). With ONNX Runtime
    (``settings.runtime``) the checked export is kept in ``onnx_dir`` when given (an existing folder, e.g. the cache
    folder), else in memory for this process.
    """
    settings = runtime.inference_settings(
        settings, device=device, batch_size=batch_size, num_workers=num_workers, optimize=optimize, decode=decode
    )
    dev_type = runtime.device_type(settings.device)
    base, taps = export_source(backbone, layer)
    store = Path(onnx_dir) if onnx_dir is not None and Path(onnx_dir).is_dir() else None

    def from_memory() -> tuple[Any, Preprocessing]:
        return base, backbone.preprocessing

    def torch_model() -> Any:
        return backbone.feature_model(layer)

    memo = _ORT_MODELS.setdefault(base, {})
    model = memo.get(tuple(taps)) if planned_runtime(settings, dev_type, precision) == "onnxruntime" else None
    if model is None:
        model = select_model(
            backbone.embedder(layer, precision),
            taps,
            settings=settings,
            device_type=dev_type,
            store=store,
            build_export=from_memory,
            torch_model=torch_model,
        )
        if isinstance(model, OrtFeatures):
            memo[tuple(taps)] = model
    if isinstance(model, OrtFeatures):
        dev: Any = runtime.CpuDevice()
        runtime.check_precision(precision, dev)
        settings = settings.with_(device="cpu")
    else:
        dev = runtime.resolve_device(settings.device)
        runtime.check_precision(precision, dev)
        settings = resolve_settings(settings, dev)
        assert settings.num_workers is not None  # resolved
        runtime.configure_threads(settings.num_workers, dev)
    out: np.ndarray | None = None
    errors: list[str] = [""] * len(paths)
    for b in iter_features(
        model,
        backbone.preprocessing,
        root,
        paths,
        settings=settings,
        precision=precision,
        progress=progress,
        desc="features",
    ):
        if out is None:
            out = np.zeros((len(paths), b.features.shape[1]), dtype=np.float32)
        ok = np.array([not e for e in b.errors], dtype=bool)
        out[b.positions[ok]] = b.features[ok]
        for p, e in zip(b.positions, b.errors):
            errors[int(p)] = e
    if out is None:
        out = np.zeros((0, backbone.feature_dim), dtype=np.float32)
    return out, errors
