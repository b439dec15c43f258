"""Peak memory of a cell: its whole process tree's resident memory (:class:`TreeMemory`) and the device's peak."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path


def _proc_status_kb(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


class TreeMemory:
    """Peak resident memory of this process and every descendant (joblib/loky sweep workers, DataLoader
    decode workers), MiB: the sum over the tree of each process's own peak (``VmHWM`` from /proc), polled every
    ``interval`` seconds by a thread and once more on :meth:`peak_mb`. The sum of per-process peaks bounds
    the simultaneous peak from above; a worker living shorter than one poll can be missed. Linux only: elsewhere
    it falls back to this process's own peak.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def sample(self) -> float:
        from featx.runtime import peak_rss_mb

        if not Path("/proc/self/status").exists():
            total = peak_rss_mb()
        else:
            pid = os.getpid()
            total = sum(_proc_status_kb(p, "VmHWM") for p in [pid, *descendants(pid)]) / 1024
        with self._lock:
            self.peak = max(self.peak, total)
            return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.sample()


def device_peak_mb(device: str) -> float | None:
    """CUDA peak allocation of this process, when it used CUDA (None on the CPU)."""
    torch = sys.modules.get("torch")
    if torch is None or device == "cpu" or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20
