"""A Dask cluster for independent tasks (bench cells, head sweeps): ``--scheduler tcp://HOST:8786`` or ``local:N``.

featx schedules nothing itself: :func:`dask_client` connects a :class:`distributed.Client` to a running scheduler
(``tcp://...``, ``tls://...``, ``HOST:PORT``) or starts a :class:`distributed.LocalCluster` of N worker processes
(``local:N``) and closes it afterwards. Dask is the optional extra ``featx[dask]``; it is imported only here, inside
functions, so ``import featx`` and the local executors never load it. Errors (no Dask, a bad address, a scheduler
that does not answer) are one-line :class:`~featx.errors.UsageError` s (exit 2).

Workers run each bench cell in a process of its own (as the local bench does), so they must be allowed to start
processes: LocalClusters here are started that way; a ``dask worker`` needs ``DASK_DISTRIBUTED__WORKER__DAEMON=False``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from featx.errors import UsageError

EXTRA = "featx[dask]"
CONNECT_TIMEOUT_S = 10
_LOCAL = re.compile(r"local:(\d+)")


def check_dask() -> Any:
    """The `distributed` module; a one-line UsageError naming the extra when Dask is not installed."""
    try:
        import distributed
    except ImportError:
        raise UsageError(f"--scheduler needs Dask: pip install '{EXTRA}' (dask[distributed])") from None
    return distributed


def parse_scheduler(spec: str) -> tuple[str, str | int]:
    """``("local", N)`` for ``local:N``, ``("address", addr)`` for a scheduler's address; UsageError otherwise."""
    spec = (spec or "").strip()
    m = _LOCAL.fullmatch(spec)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 256:
            raise UsageError(f"--scheduler local:N needs 1 <= N <= 256 workers, got {spec!r}")
        return "local", n
    if re.fullmatch(r"(tcp|tls|inproc|ucx)://\S+", spec) or re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d+", spec):
        return "address", spec
    raise UsageError(f"--scheduler must be local:N or a Dask scheduler address such as tcp://HOST:8786, got {spec!r}")


def check_scheduler(spec: str) -> None:
    """Before any work: ``spec`` parses and Dask is installed (one-line UsageErrors otherwise)."""
    parse_scheduler(spec)
    check_dask()


@contextlib.contextmanager
def _dask_logs_quiet() -> Iterator[None]:
    """Dask's INFO lines (the scheduler, the nannies, the connections: some 30 per LocalCluster) only with ``featx -v``;
    its warnings and errors always."""
    dask_log = logging.getLogger("distributed")
    before = dask_log.level
    if not logging.getLogger("featx").isEnabledFor(logging.DEBUG):
        dask_log.setLevel(max(logging.WARNING, before))
    try:
        yield
    finally:
        dask_log.setLevel(before)


@contextlib.contextmanager
def dask_client(spec: str) -> Iterator[Any]:
    """A connected ``distributed.Client`` for ``spec`` (see :func:`parse_scheduler`); a LocalCluster started here is
    closed on exit, a remote scheduler is only disconnected from."""
    check_dask()  # imported first: importing distributed sets its loggers' levels
    with _dask_logs_quiet():
        with _dask_client(spec) as client:
            yield client


@contextlib.contextmanager
def _dask_client(spec: str) -> Iterator[Any]:
    """:func:`dask_client`, its logs aside."""
    how, where = parse_scheduler(spec)
    distributed = check_dask()
    import dask

    if how == "local":
        # cells run in processes of their own: the workers must not be daemonic; no dashboard (no port to hold)
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = distributed.LocalCluster(n_workers=int(where), threads_per_worker=1, processes=True, dashboard_address=None)
        try:
            with distributed.Client(cluster) as client:
                pin_local_workers(client)
                yield client
        finally:
            cluster.close()
        return
    try:
        client = distributed.Client(str(where), timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"cannot reach the Dask scheduler at {where} ({first[:160]}); start one with `dask scheduler` "
            "and workers with `dask worker ADDRESS`, or use --scheduler local:N"
        ) from None
    with client:
        yield client


def _pin(cores: list[int]) -> None:
    """On a worker: every thread of this process (and so every process it starts) runs on ``cores`` only."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cores)


def pin_local_workers(client: Any) -> None:
    """Give each worker of a LocalCluster its own share of this machine's cores (Linux CPU affinity). featx sizes its
    thread pools by the cores a process may use (:func:`featx.runtime.usable_cores`), so N workers running one cell each
    use the cores once, not N times over (oversubscribed OpenMP threads spin: measured 3.4x slower on 2 cores)."""
    if not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"):
        return
    cores = sorted(os.sched_getaffinity(0))
    workers = sorted(client.scheduler_info().get("workers", {}))
    n = len(workers)
    if not n:
        return
    for i, addr in enumerate(workers):
        share = cores[i * len(cores) // n : (i + 1) * len(cores) // n] if n <= len(cores) else [cores[i % len(cores)]]
        client.run(_pin, share, workers=[addr])


def worker_resources(client: Any) -> dict[str, dict[str, float]]:
    """Each connected worker's declared resources (``dask worker --resources GPU=1``)."""
    workers = client.scheduler_info().get("workers", {})
    return {addr: dict(info.get("resources") or {}) for addr, info in workers.items()}


def has_gpu_workers(client: Any) -> bool:
    """Whether any worker declares a ``GPU`` resource: then GPU tasks request one (``resources={"GPU": 1}``)."""
    return any(r.get("GPU", 0) >= 1 for r in worker_resources(client).values())
