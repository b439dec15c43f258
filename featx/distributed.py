"""torch.distributed as torchrun launches it: which rank this process is, its device, and small shared objects.

featx never spawns ranks itself: ``torchrun --nproc_per_node=N -m featx ...`` (or Slurm's ``srun`` with the same
variables) starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`from_environment` reads them (nothing else in featx does), joins the process group — NCCL
when this rank drives a GPU, gloo otherwise — and returns a :class:`DistContext`; a plain single process gets None
and every caller keeps its single-process path. torch is imported only when a group is joined.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from featx.errors import UsageError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This rank's place in the job. Collectives are torch.distributed's, on the default group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" or "nccl"
    device: str  # "cpu" or "cuda:<local_rank>"
    local_world_size: int = 1  # ranks on this machine (torchrun's LOCAL_WORLD_SIZE)
    owns_group: bool = False  # from_environment joined the group (and close() leaves it); else a caller had joined it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object: a dataset scan, a key, an error line)."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the process group. With gloo, every rank first meets the others (a barrier bounded to 30 s, errors
        ignored: a rank may be gone): a rank that tore its group down while a peer's last collective was still in
        flight left a gloo worker thread holding that work, and the process aborted at exit ("terminate called
        without an active exception", SIGABRT; pytorch/pytorch#190489), seen once in CI."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if self.backend == "gloo" and self.world_size > 1:
            with contextlib.suppress(Exception):
                dist.monitored_barrier(timeout=_dt.timedelta(seconds=30))
        dist.destroy_process_group()

    @contextlib.contextmanager
    def cpu_share(self) -> Iterator[list[int]]:
        """While inside, this rank runs on its share of the machine's cores: the affinity mask split into
        ``local_world_size`` contiguous, disjoint parts (so featx's per-process defaults, one decode stream or thread
        per usable core, do not start N times the cores). The mask is restored on exit. Where the mask has fewer cores
        than ranks, or the platform has no affinity, nothing changes. Yields the cores this rank uses."""
        try:
            mask = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            yield []
            return
        n = max(1, self.local_world_size)
        if n == 1 or len(mask) < n:
            yield mask
            return
        k = len(mask) // n
        mine = mask[self.local_rank * k : (self.local_rank + 1) * k]
        os.sched_setaffinity(0, mine)
        try:
            yield mine
        finally:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, mask)


def launched() -> bool:
    """True in a process that torchrun (or an equivalent launcher) started as one rank of several."""
    return all(v in os.environ for v in ENV_VARS) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """False only in a rank other than 0 of a torchrun job (the CLI prints its summaries on rank 0 only)."""
    return not launched() or os.environ.get("RANK") == "0"


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not an integer (set by torchrun; check the launcher)") from None


def from_environment(device: str | None = None, *, timeout_s: float = 1800.0) -> DistContext | None:
    """Join torchrun's process group, or return None outside torchrun.

    ``device``: None/"auto" picks ``cuda:LOCAL_RANK`` when CUDA is present, the CPU otherwise; "cpu" forces gloo on
    GPU machines too; "cuda" means this rank's GPU. ``timeout_s`` bounds every collective, so a rank that died
    leaves the others failing instead of waiting forever (torchrun also stops them when one rank exits non-zero).
    """
    if not launched():
        return None
    import torch
    import torch.distributed as dist

    rank, world, local = _int_env("RANK"), _int_env("WORLD_SIZE"), _int_env("LOCAL_RANK")
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    want_cuda = (device in (None, "auto") and torch.cuda.is_available()) or (device or "").startswith("cuda")
    if want_cuda:
        if not torch.cuda.is_available():
            raise UsageError(f"rank {rank}: --device {device} but CUDA is not available on this machine")
        if local >= torch.cuda.device_count():
            raise UsageError(f"rank {rank}: LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
        backend, dev = "nccl", f"cuda:{local}"
    else:
        backend, dev = "gloo", "cpu"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1) if (os.environ.get("LOCAL_WORLD_SIZE") or "1").isdigit() else 1
    return DistContext(
        rank=rank, world_size=world, local_rank=local, backend=backend, device=dev, local_world_size=local_world, owns_group=owns
    )
