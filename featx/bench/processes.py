"""Cell processes die with the bench; one bench at a time writes into a run folder.

Cells whose costs are reported run in a fresh process each, the others in one shared helper process
(:class:`CellProcesses`); every such process kills its own tree when the bench process goes
(``PR_SET_PDEATHSIG`` and a watchdog thread, :func:`_worker_init`) and holds a copy of the run folder's lock
(:func:`run_folder_lock`).

A cell to run is a :class:`CellJob`; :func:`run_job` runs it (here, or in a Dask task on a cluster worker:
:mod:`featx.bench.cluster`) and writes its cell file the same way everywhere, :func:`write_cell_file`."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from featx.bench.cells import CellRecord, run_cell
from featx.bench.context import CellContext
from featx.bench.fingerprint import prepare_run_dir
from featx.bench.memory import descendants
from featx.errors import UsageError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOCK_NAME = ".featx-bench.lock"
_HELD_LOCK_FD: int | None = None  # in a cell's process: its copy of the run folder's lock, held while it lives


def _kill_own_tree_and_exit(*_: Any) -> None:
    """Stop every descendant of this process (so that none starts another), kill them all, then this process."""
    me = os.getpid()
    stopped: set[int] = set()
    for _round in range(50):
        new = [p for p in descendants(me) if p not in stopped]
        if not new:
            break
        for p in new:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGSTOP)
        stopped.update(new)
    for p in stopped:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.25)
    _kill_own_tree_and_exit()


def _worker_init(parent_pid: int, lock_fd: int | None) -> None:
    """First thing in every cell process: it and all it starts (DataLoader workers, joblib's loky workers, their
    resource trackers) die with the bench process, however that one ends.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, whose handler kills this process's whole tree (a plain SIGKILL
    would orphan the tree: loky workers outlive their parent indefinitely). The death signal fires when the
    *thread* that spawned this process exits: with the spawn context, ``ProcessPoolExecutor.submit`` spawns from
    the calling thread (CPython 3.9-3.13), the thread that runs :func:`run_bench` and outlives the pool. Everywhere
    (and in case the handler cannot run): a thread that sees the parent pid change does the same within 0.25 s.
    """
    global _HELD_LOCK_FD
    _HELD_LOCK_FD = lock_fd
    signal.signal(signal.SIGTERM, _kill_own_tree_and_exit)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="featx-watch-parent", daemon=True).start()


def _received_fd(dup: Any) -> int:
    return int(dup.detach())


class _SharedFd:
    """A file descriptor that a spawned process receives a copy of (multiprocessing passes it at spawn time)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_received_fd, (reduction.DupFd(self.fd),))


class CellProcesses:
    """Where cells run. Cells whose costs are reported get a fresh process each (peak memory is a per-process
    maximum); the others share one helper process, so that the bench process itself starts no DataLoader or joblib
    workers (it could not take them down if it were killed). Every process gets :func:`_worker_init` and a copy of
    the run folder's lock: a second bench is refused until the last of them is gone."""

    def __init__(self, lock_fd: int | None) -> None:
        self.lock_fd = lock_fd
        self._shared: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        lock = None if self.lock_fd is None or os.name != "posix" else _SharedFd(self.lock_fd)
        return ProcessPoolExecutor(
            max_workers=1, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(), lock)
        )

    def run(self, kind: str, ctx: CellContext, *, fresh: bool) -> CellRecord:
        if fresh:
            pool = self._pool()
        else:
            pool = self._shared = self._shared or self._pool()
        healthy = True
        future = pool.submit(run_cell, kind, ctx)
        try:
            return future.result()
        except BrokenProcessPool:  # the process died (out of memory, killed): the next shared cell gets a new one
            healthy = False
            raise
        except Exception:  # the cell raised; its process is fine
            raise
        except BaseException:  # Ctrl-C or the like, here: the cell's process and its tree go too
            healthy = False
            _stop(pool, future)
            raise
        finally:
            if not healthy and not fresh:
                self._shared = None
            if fresh or not healthy:
                pool.shutdown(wait=healthy, cancel_futures=True)

    def __enter__(self) -> CellProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shared is not None:
            if exc[0] is not None and not isinstance(exc[1], Exception):
                _stop(self._shared)
            self._shared.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._shared = None


def _stop(pool: ProcessPoolExecutor, future: Future[Any] | None = None) -> None:
    """End the pool's processes after an interrupt. Ctrl-C in a terminal reaches the whole process group, so the cell
    usually ends by itself at once: then its process exits cleanly. Otherwise (the signal was this process's alone)
    each process is asked to kill its tree (SIGTERM, see :func:`_worker_init`), and killed after 5 s. Should this be
    cut short, the processes still die with this one."""
    procs = list(getattr(pool, "_processes", {}).values())
    if future is not None:
        with contextlib.suppress(FutureTimeout, CancelledError):
            future.exception(timeout=3)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(3)
        if p.is_alive():
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()


@contextlib.contextmanager
def run_folder_lock(out: Path) -> Iterator[int | None]:
    """Hold ``out/.featx-bench.lock`` while the run writes into ``out``; refuse at once when another run holds it.
    ``flock``: the kernel drops the lock with its last holder, so a lock file left by a killed run never blocks."""
    path = out / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # not POSIX
        from filelock import FileLock, Timeout

        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise _busy(out, "") from None
        try:
            yield None
        finally:
            lock.release()
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise _busy(out, os.pread(fd, 32, 0).decode("ascii", "replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def _busy(out: Path, holder: str) -> UsageError:
    by = f" (started by pid {holder})" if holder.isdigit() else ""
    return UsageError(f"another featx bench is writing to {out}{by}: wait for it to finish, or use another --out-dir")


# --------------------------------------------------------------------------------------------------
# One cell to run, wherever it runs


@dataclass(frozen=True)
class Failed:
    """A cell that raised (or whose process died): its one-line error."""

    error: str


@dataclass(frozen=True)
class CellJob:
    """A cell without a current result: its kind and context (with its id), the fingerprint its file will carry, where
    that file goes, and whether its costs are reported (a fresh process; on a cluster every cell gets one)."""

    kind: str
    ctx: CellContext
    fingerprint: dict[str, Any]
    path: str  # <out>/cells/<id>.json
    fresh: bool

    @property
    def cell_id(self) -> str:
        return self.ctx.cell_id


def write_cell_file(path: Path, record: CellRecord) -> None:
    """The finished cell's file, written whole (a temporary file renamed over it): a cell file is never half there. The
    temporary name is this writer's own: a cell still running on a cluster worker after its bench was stopped may finish
    while the rerun's copy of it writes the same file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=1, default=float))
    os.replace(tmp, path)


def run_job(job: CellJob, processes: CellProcesses) -> CellRecord | Failed:
    """Prepare the cell's run folder, run the cell in ``processes``, write its file; a cell that raises (or whose process
    dies) is a :class:`Failed` with its one-line error, logged, and leaves no cell file."""
    try:
        if job.ctx.run_dir:
            prepare_run_dir(Path(job.ctx.run_dir), job.fingerprint)
        data = processes.run(job.kind, job.ctx, fresh=job.fresh)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.error("cell %s failed: %s", job.cell_id, msg)
        log.debug("%s", traceback.format_exc())
        return Failed(msg)
    data = dataclasses.replace(data, fingerprint=job.fingerprint)
    write_cell_file(Path(job.path), data)
    return data
