"""The bench's cells as Dask tasks (``featx bench --scheduler``): one ``Client.submit`` per cell without a current
result, each run on a worker in a process of its own (:class:`~featx.bench.processes.CellProcesses`, as here), writing
its cell file into the run folder itself (:func:`~featx.bench.processes.run_job`). So the run folder must be on a
filesystem every worker shares (checked first, :func:`check_workers`), an interrupted cluster bench resumes from the
cell files that were written, and the assembled report is a local run's.

A cell that reads another's output (the few-shot heads read the features cell's caches) gets that cell's future as an
argument: a Dask task dependency. Fine-tuning cells request ``resources={"GPU": 1}`` when some worker declares a GPU
(``dask worker --resources GPU=1``), see :func:`cell_resources`; otherwise no cell has a resource restriction. Dask
is imported only when this module's functions run (it is the optional extra ``featx[dask]``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featx.bench.cells import CellRecord
from featx.bench.fingerprint import featx_source_sha256
from featx.bench.processes import CellJob, CellProcesses, Failed, run_job
from featx.cluster import has_gpu_workers
from featx.errors import UsageError

log = logging.getLogger(__name__)

#: The cell kinds that train a network: they ask for a GPU where the cluster has one (unless the bench runs on the CPU).
GPU_KINDS = frozenset({"finetune", "fewshot_finetune"})
#: The cell kinds that run a backbone at all: with ``device: cuda`` they need a GPU worker too (a CPU worker would fail).
MODEL_KINDS = GPU_KINDS | {"features", "layerwise"}
PROBE_NAME = ".featx-cluster-probe"
DAEMON_HINT = "start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False (each bench cell runs in a process of its own)"


#: Longest first (a cell kind's usual share of a grid's time): the long fine-tuning cells do not start last and leave
#: the other workers idle at the end; the features cell before the few-shot heads that wait for it.
PRIORITY = {"finetune": 4, "fewshot_finetune": 3, "features": 2, "layerwise": 1, "fewshot_heads": 0}
_ENV_LOCK = threading.Lock()


def _plain_environ() -> None:
    """Drop from this worker's environment what the Dask nanny put there for the worker itself (``OMP_NUM_THREADS=1``,
    ``MKL_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_=65536``: ``distributed.nanny.pre-spawn-environ``), so that a cell's
    process starts with the environment of a local bench's: it sizes its own thread pools from the cores it may use, and
    glibc does not hand freed tensors back to the OS after every step (measured on the quick bench: 100 s of system
    time instead of 20, benchmarks/results/scaling_dask.md). A variable set to another value is left alone."""
    import dask

    nanny = {**(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})}
    nanny.update(dask.config.get("distributed.nanny.environ", None) or {})
    with _ENV_LOCK:
        for key, value in nanny.items():
            if os.environ.get(key) == str(value):
                del os.environ[key]


def cell_task(job: CellJob, *after: Any) -> CellRecord | Failed:
    """One cell on a Dask worker: in a fresh process of its own (its costs are measured as here) with a local bench's
    environment (:func:`_plain_environ`), its cell file written by :func:`run_job`. ``after``: the results of the
    cells it waits for (a task dependency; not read)."""
    if multiprocessing.current_process().daemon:
        return Failed(f"UsageError: the Dask worker cannot start the cell's process: {DAEMON_HINT}")
    _plain_environ()
    with CellProcesses(None) as processes:
        return run_job(job, processes)


def _probe(out: str, token: str, paths: Sequence[str]) -> dict[str, Any]:
    """On a worker: does it see the run folder (the client's token file), the datasets and the cache, may it start
    processes, and which featx source does it run."""
    try:
        sees_out = (Path(out) / PROBE_NAME).read_text() == token
    except OSError:
        sees_out = False
    return {
        "out": sees_out,
        "missing": [p for p in paths if not os.path.exists(p)],
        "daemon": bool(multiprocessing.current_process().daemon),
        "featx": featx_source_sha256(),
    }


def check_workers(client: Any, out: Path, code: dict[str, str], paths: Sequence[str]) -> None:
    """Refuse (UsageError, one line) a cluster without workers, or with a worker that cannot see the run folder (written
    here, read there: a shared filesystem), a dataset or the cache, that may not start processes, or that runs another
    featx source than this process (its cells would carry this process's fingerprint)."""
    try:
        client.wait_for_workers(1, timeout=60)
    except TimeoutError:
        raise UsageError("no Dask worker joined the scheduler within 60 s: start one with `dask worker ADDRESS`") from None
    token = uuid.uuid4().hex
    probe = out / PROBE_NAME
    probe.write_text(token)
    try:
        seen = client.run(_probe, str(out.resolve()), token, [os.path.realpath(p) for p in paths])
    except Exception as exc:  # e.g. a worker without featx
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(f"the Dask workers cannot run featx ({type(exc).__name__}: {first[:160]})") from None
    finally:
        if probe.is_file() and probe.read_text() == token:  # ours: the token we just wrote
            probe.unlink()
    for worker, s in sorted(seen.items()):
        if not s["out"]:
            raise UsageError(
                f"Dask worker {worker} cannot see the bench's out-dir {out.resolve()}: it must be on a filesystem every "
                "worker shares (the cells write their files there)"
            )
        if s["missing"]:
            raise UsageError(
                f"Dask worker {worker} cannot see {s['missing'][0]}: the datasets and the cache must be on a shared filesystem"
            )
        if s["daemon"]:
            raise UsageError(f"Dask worker {worker} may not start processes: {DAEMON_HINT}")
        if s["featx"] != code.get("source_sha256"):
            raise UsageError(
                f"Dask worker {worker} runs another featx source than this process: install the same featx on every worker"
            )


def cell_resources(kind: str, device: str, gpu_workers: bool) -> dict[str, float] | None:
    """The Dask resources a cell asks for. Fine-tuning cells ask for one ``GPU`` when some worker declares one (device
    ``auto`` or ``cuda``); with ``cuda`` every cell that runs a backbone does (it cannot run on a CPU-only worker); with
    ``cpu`` none does (a CPU bench need not queue behind the GPU slots). No GPU workers: no restriction at all."""
    if not gpu_workers or device == "cpu":
        return None
    return {"GPU": 1} if kind in (MODEL_KINDS if device.startswith("cuda") else GPU_KINDS) else None


def run_cells(
    client: Any,
    jobs: Sequence[tuple[CellJob, str | None]],
    *,
    out: Path,
    code: dict[str, str],
    datasets: Sequence[Any],
    cache_dir: str | None,
) -> dict[str, CellRecord | Failed]:
    """Submit every job (``(job, id of the cell it waits for or None)``, in the grid's order) and wait for all; returns
    each cell id's record, or :class:`Failed` with its one-line error (a cell that raised, a worker that died)."""
    if not jobs:
        return {}
    from distributed import as_completed

    cache = os.path.expanduser(cache_dir) if cache_dir else None
    paths = [d.real for d in datasets] + ([cache] if cache and os.path.isdir(cache) else [])
    check_workers(client, out, code, paths)
    gpu = has_gpu_workers(client)
    run = uuid.uuid4().hex[:8]
    futures: dict[str, Any] = {}
    on_gpu = 0
    for job, after in jobs:
        deps = [futures[after]] if after in futures else []
        resources = cell_resources(job.kind, job.ctx.device, gpu)
        on_gpu += resources is not None
        futures[job.cell_id] = client.submit(
            cell_task,
            job,
            *deps,
            key=f"featx-cell-{job.cell_id}-{run}",
            pure=False,
            retries=0,
            resources=resources,
            priority=PRIORITY.get(job.kind, 0),
        )
    log.info("%d cell(s) submitted to the Dask scheduler, %d of them asking for a GPU worker", len(futures), on_gpu)
    cell_of = {f.key: cid for cid, f in futures.items()}
    done: dict[str, CellRecord | Failed] = {}
    for future in as_completed(list(futures.values())):
        cid = cell_of[future.key]
        try:
            done[cid] = future.result()
        except Exception as exc:  # the worker died (KilledWorker) or the task could not run
            first = str(exc).splitlines()[0] if str(exc) else ""
            done[cid] = Failed(f"{type(exc).__name__}: {first[:200]}")
            log.error("cell %s failed on the cluster: %s", cid, done[cid].error)
        else:
            log.info("cell %s done%s", cid, f" (failed: {done[cid].error})" if isinstance(done[cid], Failed) else "")
    return {job.cell_id: done[job.cell_id] for job, _ in jobs}
