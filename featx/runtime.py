"""Device, precision, threads and resource measurement shared by extraction and fine-tuning."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

from featx.errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16")


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
