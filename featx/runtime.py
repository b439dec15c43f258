"""How featx runs: the inference settings, device, precision, threads and resource measurement shared by
extraction, prediction and fine-tuning (a torch-free leaf: torch is imported inside the functions that need it)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from featx.errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16")
OPTIMIZE_MODES = ("auto", "none", "fold", "freeze", "compile")
DECODE_MODES = ("auto", "streams", "threads", "processes", "gpu")
RUNTIMES = ("auto", "torch", "onnxruntime")

#: The environment variables that give an inference setting its default. They are read in one place,
#: :meth:`InferenceSettings.from_env`, and featx never writes them.
SETTINGS_ENV = {
    "optimize": "FEATX_OPTIMIZE",
    "decode": "FEATX_DECODE",
    "jpeg_draft": "FEATX_JPEG_DRAFT",
    "streams": "FEATX_STREAMS",
    "micro_batch": "FEATX_MICRO_BATCH",
    "runtime": "FEATX_RUNTIME",
}


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{what} must be one of {', '.join(choices)}, got '{value}'")


@dataclass(frozen=True)
class InferenceSettings:
    """How the frozen forward runs: one value passed from the CLI or the API down to :mod:`featx.inference`.

    None or ``auto`` leaves a setting to featx: the device to CUDA when present, the batch size and worker
    count to :func:`featx.inference.default_batch_size` and :func:`default_num_workers`, ``optimize`` and
    ``decode`` to :func:`featx.inference.resolve_optimize` / :func:`featx.inference.resolve_decode`, streams and
    micro-batch to one stream per core at :func:`featx.inference.default_micro_batch`.

    - ``device``: ``auto``, ``cpu`` or ``cuda[:N]`` (a ``torch.device`` is accepted and kept as its text).
    - ``optimize``: model preparation (``none``, ``fold``, ``freeze``, ``compile``), see
      :func:`featx.inference.prepare_model`.
    - ``decode``: ``streams``, ``threads``, ``processes`` or ``gpu``, see :func:`featx.inference.iter_features`.
    - ``jpeg_draft``: let large JPEGs decode at a reduced DCT scale (faster; changes the numbers slightly).
    - ``streams`` / ``micro_batch``: CPU streams and images per forward inside a stream (``decode="streams"``).
    - ``runtime``: what runs the frozen forward: ``torch``, ``onnxruntime`` (the model exported once to ONNX, kept
      next to the cache, checked against PyTorch's forward: :mod:`featx.onnx_export`) or ``auto`` (ONNX Runtime on
      the CPU in fp32 when it is installed and the export passes its check, PyTorch otherwise and on CUDA).

    The settings never change which features a cache holds by key (that is the
    :class:`~featx.backbones.EmbedderSpec`, which also carries the precision); those that can change the float32
    rounding are recorded in an extraction's journal (:meth:`to_dict`). The environment gives defaults only
    through :meth:`from_env`.
    """

    device: str = "auto"
    batch_size: int | None = None
    num_workers: int | None = None
    channels_last: bool = True
    optimize: str = "auto"
    decode: str = "auto"
    jpeg_draft: bool = False
    streams: int | None = None
    micro_batch: int | None = None
    runtime: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", str(self.device))  # torch.device("cuda", 0) -> "cuda:0"
        _check_choice("optimize", self.optimize, OPTIMIZE_MODES)
        _check_choice("decode", self.decode, DECODE_MODES)
        _check_choice("runtime", self.runtime, RUNTIMES)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **given: Any) -> InferenceSettings:
        """``given`` settings (None: not given) over the documented environment defaults: ``FEATX_OPTIMIZE``,
        ``FEATX_DECODE``, ``FEATX_RUNTIME``, ``FEATX_JPEG_DRAFT`` (1/true/yes/on), ``FEATX_STREAMS``,
        ``FEATX_MICRO_BATCH`` (positive integers), over the field defaults.
        The one place featx reads these variables (``environ``: os.environ)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in ("optimize", "decode", "runtime"):
            raw = env.get(SETTINGS_ENV[name], "")
            if raw:
                values[name] = raw
        if env.get(SETTINGS_ENV["jpeg_draft"], "").strip().lower() in ("1", "true", "yes", "on"):
            values["jpeg_draft"] = True
        for name in ("streams", "micro_batch"):
            raw = env.get(SETTINGS_ENV[name], "").strip()
            if raw:
                if not raw.isdigit() or int(raw) < 1:
                    raise UsageError(f"{SETTINGS_ENV[name]} must be a positive integer, got '{raw}'")
                values[name] = int(raw)
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UsageError(f"unknown inference setting(s): {', '.join(unknown)}")
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> InferenceSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, str]:
        """What an extraction journal records (and a resume compares): the settings that can change the float32
        rounding without being in the cache key, as text, "" where featx chooses. The device type, the batch
        size used and the memory format are recorded beside them, resolved; worker counts never change the
        numbers. The same fields and text as the journals of featx before settings were a value. The runtime is not
        here: a journal records the runtime that actually ran (``auto`` resolves per machine and model), see
        :func:`featx.extraction.extract`."""
        return {
            "optimize": "" if self.optimize == "auto" else self.optimize,
            "decode": "" if self.decode == "auto" else self.decode,
            "jpeg_draft": "1" if self.jpeg_draft else "",
            "streams": "" if self.streams is None else str(self.streams),
            "micro_batch": "" if self.micro_batch is None else str(self.micro_batch),
        }


def inference_settings(settings: InferenceSettings | None = None, **given: Any) -> InferenceSettings:
    """The settings a public function runs with: ``settings`` when passed, else :meth:`InferenceSettings.from_env`.
    ``given`` are the function's loose keywords (``device=``, ``batch_size=`` ...; None: not given): they build the
    settings, or must agree with ``settings`` (a :class:`UsageError` says which differ)."""
    if settings is None:
        return InferenceSettings.from_env(**given)
    if not isinstance(settings, InferenceSettings):
        raise UsageError(f"settings must be an InferenceSettings, got {type(settings).__name__}")
    given = {k: str(v) if k == "device" and v is not None else v for k, v in given.items()}
    clash = [f"{k}={v!r} (settings: {getattr(settings, k)!r})" for k, v in given.items() if v not in (None, getattr(settings, k))]
    if clash:
        raise UsageError(f"give these either in settings= or as keywords, not both with other values: {', '.join(clash)}")
    return settings


class CpuDevice:
    """The CPU as a device without importing torch (``.type == "cpu"``, ``str()`` "cpu"): what the ONNX Runtime
    path of extraction needs of a device. :func:`resolve_device` gives ``torch.device`` objects."""

    type = "cpu"
    index = None

    def __str__(self) -> str:
        return "cpu"

    def __repr__(self) -> str:
        return "CpuDevice()"


def _cuda_impossible() -> bool:
    """True when this machine certainly has no CUDA device (Linux, no NVIDIA device node and no driver): then ``auto``
    is the CPU without importing torch (~1-2 s of start-up). Elsewhere torch is asked."""
    if not sys.platform.startswith("linux"):
        return False
    return not (os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl"))


def device_type(device: str = "auto") -> str:
    """``cpu`` or ``cuda`` for a device setting, importing torch only when CUDA may be there (``auto`` on a machine
    with an NVIDIA driver, or ``cuda[:N]``, which :func:`resolve_device` checks)."""
    if device == "cpu" or (device == "auto" and _cuda_impossible()):
        return "cpu"
    return resolve_device(device).type


def resolve_device(device: str = "auto") -> Any:
    """``auto`` picks CUDA when present; asking for CUDA without one is a usage error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got '{device}'")
    return torch.device(device)


def check_precision(precision: str, device: Any) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (use fp32 or bf16 on the CPU)")


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the forward pass (fp16/bf16); a no-op for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask on Linux, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_num_workers(device: Any = None) -> int:
    """Decode worker *processes* (0 = decode in threads inside this process).

    CPU: 0. Decoding runs in a thread pool between forwards, so the forward keeps every core; a decode
    process beside a multi-threaded forward oversubscribes the cores and collapses throughput on small
    machines (measured on 2 cores: benchmarks/results/bench_extract.md). CUDA: the CPU only decodes, and
    decoding is the limit (../shared/notes/gpu-reference.md), so up to 8 worker processes, one core left.
    ``device`` None means CUDA when available (torch is imported only if it already is).
    """
    if device is None:
        import sys

        torch = sys.modules.get("torch")
        cuda = bool(torch is not None and torch.cuda.is_available())
    else:
        cuda = getattr(device, "type", str(device)).startswith("cuda")
    if not cuda:
        return 0
    return max(1, min(8, usable_cores() - 1))


def configure_threads(num_workers: int, device: Any) -> None:
    """On the CPU, give torch the cores the decode worker processes do not use (never fewer than one),
    so forward threads + workers never exceed the cores. On CUDA torch's CPU threads only launch kernels."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(max(1, usable_cores() - max(0, num_workers)))


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes(device: Any) -> int | None:
    """Memory a new allocation can still get: the CUDA device's free memory, or on the CPU the smaller of the
    kernel's ``MemAvailable`` and what the cgroup limit leaves (v2 ``memory.max``, v1 ``limit_in_bytes``).
    None where it cannot be told."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    candidates = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            candidates.append(max(0, limit - usage))
    return min(candidates) if candidates else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB (DataLoader workers are separate processes).

    On Linux this is ``VmHWM`` from /proc/self/status: ``ru_maxrss`` survives ``execve``, so a freshly
    spawned process would report its parent's peak whenever that was higher.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class ResourceMeter:
    """Wall time and peak memory of a block: CUDA peak allocation on GPU, process peak RSS otherwise.

    RSS peaks are process-lifetime maxima (the kernel keeps no resettable counter), so the figure
    reported for a block includes anything that ran earlier in the same process; the bench runs
    each cell in its own subprocess to keep them separate.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.seconds = 0.0
        self.peak_memory_mb = 0.0
        self.memory_kind = "cuda" if device.type == "cuda" else "rss"

    def __enter__(self) -> ResourceMeter:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_memory_mb = peak_rss_mb()
        self.seconds = time.perf_counter() - self._t0


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0


def progress_bar(iterable: Any, *, total: int | None, desc: str, unit: str = "img", enabled: bool = True) -> Any:
    """tqdm on stderr (images/s in the postfix via ``unit``); silent when disabled."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False
    )
