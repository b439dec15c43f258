"""Feature extraction into HDF5 caches: one cache per split, found by key, built from a crash-safe journal.

The batched forward itself lives in :mod:`featx.inference`; this module decides what to compute (cache hits,
keys, locks, resuming an interrupted run, re-trying failures that may have gone away) and where the rows go.

A run writes finished row chunks into the split's journal (``<name>.partial/``, see :mod:`featx.cache`) from
a background thread while the model computes the next ones. A kill at any moment loses at most the chunks in
flight; the same command then checks the journal, keeps every whole chunk, computes the rest with the
journal's batch size (chunk boundaries are multiples of it, so the batches are those of an uninterrupted run
and the cache is bit-identical on the CPU) and assembles the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx import __version__, distributed, runtime
from featx.backbones import POOLED, Backbone, EmbedderSpec, build_embedder, embedder_spec
from featx.cache import (
    CacheJournal,
    CacheReader,
    CacheSpec,
    Chunk,
    JournalState,
    KeyLock,
    NotFeatxError,
    base_attrs,
    cache_file_problem,
    cache_path,
    find_cache,
    lock_path,
    read_cache_attrs,
    read_failures,
    remove_assembly_file,
    resolve_cache_dir,
    shard_chunks,
    write_cache_file,
    write_error,
)
from featx.data import ImageDataset, Split, is_transient_failure, load_dataset, printable_path, refuse_inside_dataset
from featx.errors import CacheError, DataError, FeatxError, UsageError
from featx.inference import (  # noqa: F401  (compute_features is re-exported)
    StageTimes,
    check_forward_memory,
    compute_features,
    default_batch_size,
    images_in_flight,
    iter_features,
    select_model,
)
from featx.onnx_export import OrtFeatures, planned_runtime
from featx.runtime import InferenceSettings

log = logging.getLogger(__name__)

#: Rows per journal chunk: the smallest multiple of the batch size that is at least this many rows.
#: Small enough that a kill loses little (about a second of CPU work at the default batch size of 16),
#: large enough that a 100k-image split is a few thousand files.
CHUNK_MIN_ROWS = 32
#: Chunks waiting for the writer thread: the model runs ahead by at most this many.
WRITE_QUEUE_DEPTH = 2


class ExtractionInterrupted(FeatxError):
    """SIGINT or SIGTERM during extraction. The journal is kept: the same command resumes it.
    Exit code 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ExtractResult:
    split: str
    path: Path
    key: str
    hit: bool
    n_images: int
    n_failed: int
    seconds: float
    images_per_s: float
    failures: tuple[tuple[str, str], ...] = ()
    resumed_at: int = 0  # rows taken from an interrupted run's journal
    retried: int = 0  # earlier transient failures computed again (cache hit otherwise)
    notes: tuple[str, ...] = field(default=())
    shard: str = ""  # "i/n" for a --shard job: ``path`` is its shard journal, ``n_images`` its share of the rows

    def summary(self) -> str:
        if self.shard and not self.hit:
            return (
                f"{self.split}: shard {self.shard}: {self.n_images} images of its share, {self.n_failed} skipped, "
                f"{self.seconds:.1f} s -> {self.path.name} (when every shard is done: featx cache merge)"
            )
        if self.hit:
            return f"{self.split}: cache hit {self.path.name} ({self.n_images} images, no model run)"
        if self.retried:
            return (
                f"{self.split}: re-tried {self.retried} earlier failure(s), {self.n_failed} image(s) still skipped, "
                f"{self.seconds:.1f} s -> {self.path.name}"
            )
        what = f"resumed at {self.resumed_at} of {self.n_images} images" if self.resumed_at else f"{self.n_images} images"
        return (
            f"{self.split}: {what}, {self.n_failed} skipped, {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} img/s) -> {self.path.name}"
        )


@dataclass(frozen=True)
class _Runner:
    """What computes an extraction's rows: the model :func:`iter_features` runs (a torch feature model or a checked
    ONNX export), the runtime's name, the preprocessing, the embedder record, the export's record (ONNX Runtime)."""

    model: Any
    runtime: str
    preprocessing: Any
    embedder: dict[str, Any]
    onnx: dict[str, Any] | None = None


def _make_runner(
    embedder: EmbedderSpec, settings: InferenceSettings, cdir: Path, get_backbone: Callable[[], Backbone]
) -> _Runner:
    """The runner for ``settings.runtime`` (:func:`featx.inference.select_model`): with ONNX Runtime and a ready
    ``.onnx`` in the cache folder no PyTorch model is built (no torch, timm or torchvision import)."""
    layer = embedder.layer

    def build_export() -> tuple[Any, Any]:
        bb = get_backbone()
        return bb.model, bb.preprocessing

    model = select_model(
        embedder,
        [layer],
        settings=settings,
        device_type=runtime.device_type(settings.device),
        store=cdir,
        build_export=build_export,
        torch_model=lambda: get_backbone().feature_model(layer),
    )
    if isinstance(model, OrtFeatures):
        emb = embedder.with_(preprocessing=model.preprocessing).to_dict()
        return _Runner(model, "onnxruntime", model.preprocessing, emb, model.record())
    bb = get_backbone()
    return _Runner(model, "torch", bb.preprocessing, bb.embedder(layer, embedder.precision).to_dict())


def cache_spec(split: Split, embedder: EmbedderSpec) -> CacheSpec:
    """The key ingredients of one split's cache, computed without building the model."""
    return CacheSpec(dataset_fingerprint=split.fingerprint(), split=split.name, embedder=embedder)


def chunk_rows_for(batch_size: int) -> int:
    """Rows per journal chunk for this batch size (a multiple of it, so resumed batches line up)."""
    return batch_size * max(1, -(-CHUNK_MIN_ROWS // batch_size))


def find_caches(
    dataset: str | Path | ImageDataset,
    embedder: EmbedderSpec | None = None,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    layer: str | None = None,
    image_size: int | None = None,
    precision: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Path]:
    """The existing cache of every split of ``dataset`` for ``embedder``, found by key (no model is built).
    ``backbone``, ``weights``, ``layer``, ``image_size`` and ``precision`` are a convenience that builds the
    embedder (:func:`featx.backbones.embedder_spec`). A split without a cache raises :class:`CacheError` saying
    which command makes it."""
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    cdir = resolve_cache_dir(cache_dir)
    embedder = embedder_spec(
        embedder, backbone=backbone, weights=weights, layer=layer, image_size=image_size, precision=precision
    )
    found = {}
    for name, split in ds.splits.items():
        path = find_cache(cdir, cache_spec(split, embedder))
        if path is None:
            raise CacheError(
                f"no cache for split '{name}' of {ds.root} with these options in {cdir}: "
                f"run `featx extract {ds.root}` with the same options first (or add --extract)"
            )
        found[name] = path
    return found


# --------------------------------------------------------------------------------------------------
# Locks and signals


_SIGNAL_HANDLER: list[Any] = []  # our handler while one is installed
_PENDING: list[int] = []  # signals our handler received during this extraction


def _after_fork_in_child() -> None:
    """A forked DataLoader worker must not keep our handlers (workers are stopped with SIGTERM, and Ctrl-C is for
    the main process); the key lock's descriptors are closed by featx.cache's own fork handler."""
    if _SIGNAL_HANDLER:
        with contextlib.suppress(Exception):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Terminated(BaseException):
    """Raised in the main thread by our SIGTERM handler."""


def _signal_error(signum: int) -> BaseException:
    return _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _raise_pending() -> None:
    """Raise again a SIGINT/SIGTERM whose exception was swallowed where it first landed.

    Python runs a signal handler in whatever the main thread executes at that moment; when that is a finaliser or a
    callback that ignores exceptions ("Exception ignored in ..."), the KeyboardInterrupt is lost and, without this
    check, the run would go on to completion. Called after every batch, so an interrupt is never lost.
    """
    if _PENDING:
        raise _signal_error(_PENDING[-1])


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While extracting, SIGINT and SIGTERM unwind (the writer drains, the journal stays), and are remembered."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        _PENDING.append(signum)
        raise _signal_error(signum)

    # A process started with SIGINT ignored (``nohup``, a background job of a script) keeps ignoring it.
    ours = [s for s in (signal.SIGTERM, signal.SIGINT) if not (s == signal.SIGINT and signal.getsignal(s) == signal.SIG_IGN)]
    try:
        old = {s: signal.signal(s, handler) for s in ours}
    except (ValueError, OSError):  # pragma: no cover
        yield
        return
    _SIGNAL_HANDLER.append(handler)
    _PENDING.clear()
    try:
        yield
    finally:
        _SIGNAL_HANDLER.remove(handler)
        _PENDING.clear()
        for s, h in old.items():
            signal.signal(s, h)


def _prepare_cache_dir(cdir: Path) -> None:
    try:
        cdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot use cache folder {cdir}: {exc.strerror or exc}") from None
    if not cdir.is_dir():
        raise CacheError(f"cannot use cache folder {cdir}: not a directory")


def _journal_gone(journal: CacheJournal) -> CacheError | None:
    """The error to report when the journal folder (or its journal.json) was removed under a running extraction."""
    if (journal.dir / "journal.json").is_file():
        return None
    return CacheError(
        f"the journal {journal.dir} was removed while this extraction ran (by `featx cache rm` from an older featx, "
        "or another program): the rows computed so far are lost; run the same command again"
    )


# --------------------------------------------------------------------------------------------------
# The writer thread


class _ChunkWriter:
    """Writes journal chunks in a background thread so that disk waits overlap the next batches.

    The queue is bounded (the model runs at most ``depth`` chunks ahead); an error in the thread is
    raised in the caller's thread at the next :meth:`put` or at :meth:`close`.
    """

    def __init__(self, journal: CacheJournal, depth: int = WRITE_QUEUE_DEPTH) -> None:
        self.journal = journal
        self.written: dict[int, Path] = {}
        self.seconds = 0.0  # time spent writing chunks (in the thread, overlapping the next batches)
        self._q: queue.Queue[Chunk | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._failed_chunk = -1
        self._thread = threading.Thread(target=self._run, name="featx-journal-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._q.get()
            if chunk is None:
                return
            if self._error is not None:
                continue  # keep draining so that put() never blocks forever
            try:
                t = time.perf_counter()
                self.written[chunk.index] = self.journal.write_chunk(chunk)
                self.seconds += time.perf_counter() - t
            except BaseException as exc:  # re-raised in the caller's thread
                self._error, self._failed_chunk = exc, chunk.index

    def _check(self) -> None:
        if self._error is None:
            return
        exc = self._error
        target = self.journal.dir / f"chunk-{self._failed_chunk:09d}"
        if isinstance(exc, OSError):
            gone = _journal_gone(self.journal)
            if gone is not None:
                raise gone from None
            raise write_error(exc, target, journal=self.journal.dir) from None
        raise exc

    def put(self, chunk: Chunk) -> None:
        self._check()
        while True:
            try:
                self._q.put(chunk, timeout=0.2)
                return
            except queue.Full:
                self._check()

    def close(self) -> None:
        """Write what is queued, stop the thread, raise its error if any."""
        self._q.put(None)
        self._thread.join()
        self._check()


# --------------------------------------------------------------------------------------------------
# extract()


#: Seconds any rank of a torchrun extraction waits in one collective (rank 0's scan, journal preparation, assembly).
EXTRACT_COLLECTIVE_TIMEOUT_S = 12 * 3600.0


def extract(
    dataset: str | Path | ImageDataset,
    embedder: EmbedderSpec | None = None,
    *,
    splits: Sequence[str] | None = None,
    settings: InferenceSettings | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    strict: bool = False,
    allow_outside_root: bool = False,
    backbone: str | None = None,
    weights: str | None = None,
    layer: str | None = None,
    image_size: int | None = None,
    precision: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    channels_last: bool | None = None,
    shard: str | tuple[int, int] | None = None,
) -> list[ExtractResult]:
    """Extract the features of ``embedder`` (an :class:`~featx.backbones.EmbedderSpec`) for each split of
    ``dataset`` into the cache folder; existing caches are hits.

    ``settings`` (:class:`~featx.runtime.InferenceSettings`) say how the forward runs (default:
    :meth:`~featx.runtime.InferenceSettings.from_env`). Loose keywords are a convenience: ``backbone``,
    ``weights``, ``layer``, ``image_size``, ``precision`` build the embedder, ``device``, ``batch_size``,
    ``num_workers``, ``channels_last`` the settings (given with the object, they must agree with it).

    The model is built only when some split misses (or re-tries earlier transient failures). An interrupted
    run is resumed from its journal. ``force`` rebuilds a cache even if one exists; the old one is replaced
    only when the new one is complete. ``strict`` raises :class:`DataError` when any image of a split could
    not be read (the cache is still written). Returns one result per split.

    Under ``torchrun`` (:func:`featx.distributed.from_environment`) every rank calls this with the same arguments:
    rank 0 scans the dataset and prepares each split's journal, the ranks compute disjoint sets of its missing
    chunks, rank 0 assembles the cache, and every rank returns the same results (the single-process cache).
    ``shard`` ``"i/n"`` (or ``(i, n)``, 0 <= i < n): a separate job computes only the i-th of n contiguous ranges of
    chunks into its own journal ``<name>.shard-<i>-of-<n>.partial``; :func:`featx.cache.merge_shards` (``featx cache
    merge``) assembles the cache from all n.
    """
    shard_ = parse_shard(shard)
    embedder = embedder_spec(
        embedder, backbone=backbone, weights=weights, layer=layer, image_size=image_size, precision=precision
    )
    settings = runtime.inference_settings(
        settings, device=device, batch_size=batch_size, num_workers=num_workers, channels_last=channels_last
    )
    ctx = None
    if distributed.launched():
        if shard_ is not None:
            raise UsageError("--shard is for separate jobs without torchrun (under torchrun the ranks share one journal)")
        # collectives wait while rank 0 scans, prepares and assembles (hours for millions of images): a long bound;
        # a rank that dies is noticed at once anyway (gloo's closed connection; torchrun stops the others)
        ctx = distributed.from_environment(settings.device, timeout_s=EXTRACT_COLLECTIVE_TIMEOUT_S)
    try:
        if ctx is None:
            ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset, allow_outside_root=allow_outside_root)
            return _extract_all(ds, splits, embedder, settings, cache_dir, force, progress, strict, None, shard_)
        if ctx.device.startswith("cuda"):
            settings = settings.with_(device=ctx.device)
        with ctx.cpu_share():
            if isinstance(dataset, ImageDataset):
                ds = dataset
            else:  # the scan runs once, on rank 0, and is shared
                ds = _on_main(ctx, lambda: load_dataset(dataset, allow_outside_root=allow_outside_root))
            return _extract_all(ds, splits, embedder, settings, cache_dir, force, progress and ctx.is_main, strict, ctx, None)
    finally:
        if ctx is not None and ctx.owns_group:
            with contextlib.suppress(Exception):
                ctx.close()


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` -> (i, n) with 0 <= i < n; a :class:`UsageError` otherwise."""
    if shard is None:
        return None
    text = shard if isinstance(shard, str) else "/".join(map(str, shard))
    i, sep, n = str(text).strip().partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n) <= 100000):
        raise UsageError(f"--shard must be i/n with 0 <= i < n (0-based: 0/4 ... 3/4 for four jobs), got {text!r}")
    return int(i), int(n)


class _RankError(FeatxError):
    """An error one rank raised, raised on every rank (with that rank's exit code); ``on_every_rank`` tells the CLI
    that rank 0 prints it, so a job of N ranks prints one line, not N."""

    on_every_rank = True

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _on_main(ctx: distributed.DistContext, fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 and its value broadcast; its FeatxError raised on every rank."""
    box: tuple[str, Any, int] | None = None
    if ctx.is_main:
        try:
            box = ("ok", fn(), 0)
        except FeatxError as exc:
            box = ("err", str(exc), exc.exit_code)
    box = ctx.broadcast(box)
    if box[0] == "err":
        raise _RankError(box[1], box[2])
    return box[1]


def _extract_all(
    ds: ImageDataset,
    splits: Sequence[str] | None,
    embedder: EmbedderSpec,
    settings: InferenceSettings,
    cache_dir: str | Path | None,
    force: bool,
    progress: bool,
    strict: bool,
    ctx: distributed.DistContext | None,
    shard: tuple[int, int] | None,
) -> list[ExtractResult]:
    names = list(splits) if splits else list(ds.splits)
    for n in names:
        ds.split(n)  # raises a clear error for a split the dataset does not have
    layer = embedder.layer
    cdir = resolve_cache_dir(cache_dir)
    if ctx is None or ctx.is_main:
        refuse_inside_dataset(cdir, ds, "--cache-dir")
        _prepare_cache_dir(cdir)
    results: list[ExtractResult] = []
    built: list[Backbone] = []
    runners: dict[str, _Runner] = {}

    def get_backbone() -> Backbone:
        if not built:
            bb = build_embedder(embedder)
            if layer != POOLED and layer not in dict(bb.model.named_modules()):
                raise UsageError(f"backbone {bb.name} has no layer '{layer}' (try: {', '.join(bb.layers)})")
            built.append(bb)
        return built[0]

    def get_runner(run_settings: InferenceSettings) -> _Runner:
        if run_settings.runtime not in runners:
            runners[run_settings.runtime] = _make_runner(embedder, run_settings, cdir, get_backbone)
        return runners[run_settings.runtime]

    for name in names:
        split = ds.split(name)
        if ctx is not None:
            result = _extract_split_dist(
                ctx, ds, split, embedder, cdir, get_runner, force=force, settings=settings, progress=progress
            )
            results.append(result)
        else:
            spec = cache_spec(split, embedder)
            final = cache_path(cdir, ds.name, spec)
            with KeyLock(lock_path(final)):  # a second run for the same key waits, then sees a hit
                result = _extract_or_hit(
                    ds, split, spec, final, get_runner, force=force, settings=settings, progress=progress, shard=shard
                )
            results.append(result)
        if strict and result.n_failed:
            first = result.failures[0] if result.failures else _first_failure(result.path, split)
            raise DataError(
                f"{result.n_failed} of {result.n_images} images in split '{name}' could not be read "
                f"(first: {first[0]}: {first[1]}); the cache {result.path.name} is kept: fix them, or run without --strict"
            )
    return results


def _first_failure(path: Path, split: Split) -> tuple[str, str]:
    fails = read_failures(path)
    if not fails:
        return ("?", "?")
    i, reason = fails[0]
    return printable_path(split.paths[i]), reason


def _extract_or_hit(
    ds: ImageDataset,
    split: Split,
    spec: CacheSpec,
    final: Path,
    get_runner: Callable[[InferenceSettings], _Runner],
    *,
    force: bool,
    settings: InferenceSettings,
    progress: bool,
    shard: tuple[int, int] | None = None,
    work: Callable[..., Any] | None = None,
) -> Any:
    """The split's cache hit (re-trying transient failures), else ``work`` (default :func:`_extract_split`) on its
    journal (a shard's own journal with ``shard``)."""
    remove_assembly_file(final)  # an assembly killed before its rename (something foreign there: a clear error)
    journal = CacheJournal(final)
    hit = None if force else find_cache(final.parent, spec)
    if hit is not None:
        if journal.exists():
            _discard_quietly(journal)  # left by a run killed between the rename and the clean-up
        a = read_cache_attrs(hit)
        transient = [(i, r) for i, r in read_failures(hit) if is_transient_failure(r)]
        if transient and cache_file_problem(hit) is None:
            return _with_interrupts(
                final,
                split,
                lambda: _retry_failures(
                    hit, split, spec, [i for i, _ in transient], get_runner, settings=settings, progress=progress
                ),
            )
        if transient:
            log.warning("%s: not re-trying %d earlier failure(s): %s", split.name, len(transient), cache_file_problem(hit))
        return ExtractResult(split.name, hit, spec.key(), True, int(a["n_images"]), int(a["n_failed"]), 0.0, 0.0)
    if final.exists() or final.is_symlink():  # --force: the new cache will replace this file; only if it is featx's
        why = cache_file_problem(final)
        if why:
            raise NotFeatxError(final, why)
    if shard is not None:
        journal = CacheJournal(final, shard)
    journal.check_ours()  # never resume over, or discard, a folder featx cannot prove it wrote
    fn = work or _extract_split
    return _with_interrupts(final, split, lambda: fn(ds, split, spec, journal, get_runner, settings=settings, progress=progress))


# --------------------------------------------------------------------------------------------------
# Under torchrun: rank 0 prepares and assembles, every rank computes its share of the missing chunks


def _extract_split_dist(
    ctx: distributed.DistContext,
    ds: ImageDataset,
    split: Split,
    embedder: EmbedderSpec,
    cdir: Path,
    get_runner: Callable[[InferenceSettings], _Runner],
    *,
    force: bool,
    settings: InferenceSettings,
    progress: bool,
) -> ExtractResult:
    """One split under torchrun. Rank 0 holds the key lock throughout, finds a hit or prepares the journal (creating
    it, or resuming it; the ONNX export, if one is needed, is made here, before the others build their runner) and
    broadcasts its header and missing chunks; every rank computes a contiguous, balanced part of those chunks (no
    padding, no chunk twice) and writes them with the journal's atomic chunk write; after a gather of every rank's
    outcome rank 0 checks the journal and assembles the cache; all ranks return rank 0's result."""
    t0 = time.perf_counter()
    lock: KeyLock | None = None
    prep: _Prepared | None = None
    plan: dict[str, Any] = {}
    try:
        if ctx.is_main:
            try:
                spec = cache_spec(split, embedder)
                final = cache_path(cdir, ds.name, spec)
                lock = KeyLock(lock_path(final))
                lock.__enter__()
                got = _extract_or_hit(
                    ds, split, spec, final, get_runner, force=force, settings=settings, progress=progress, work=_prepare_journal
                )
                if isinstance(got, ExtractResult):  # a hit (its transient failures re-tried here, on rank 0)
                    plan = {"result": got}
                else:
                    prep = got
                    journal = CacheJournal(final)
                    journal.header = _journal_header_of(final)
                    plan = {"final": final, "header": journal.header, "todo": prep.todo}
            except FeatxError as exc:
                plan = {"error": str(exc), "code": exc.exit_code}
        plan = ctx.broadcast(plan)
        if "error" in plan:
            raise _RankError(plan["error"], plan["code"])
        if "result" in plan:
            return plan["result"]
        final, header, todo = plan["final"], plan["header"], plan["todo"]
        shares = [[int(i) for i in part] for part in np.array_split(np.asarray(todo, dtype=np.int64), ctx.world_size)]
        journal = CacheJournal(final)
        journal.header = header
        status: tuple[str, Any, int]
        try:
            with _signals_raise():
                try:
                    computed = _compute_share(ctx, split, journal, shares[ctx.rank], prep, get_runner, settings, progress)
                    status = ("ok", computed, 0)
                except FeatxError as exc:
                    status = ("err", str(exc), exc.exit_code)
                statuses = ctx.gather(status)
        except (KeyboardInterrupt, _Terminated) as exc:
            sig, code = ("SIGTERM", 143) if isinstance(exc, _Terminated) else ("SIGINT", 130)
            raise ExtractionInterrupted(
                _stopped(ctx, split, journal, shares, f"this rank ({ctx.rank}) got {sig}"), code
            ) from None
        except RuntimeError as exc:  # a collective failed: a rank went away
            log.debug("rank %d: collective failed: %s", ctx.rank, exc)
            raise CacheError(_stopped(ctx, split, journal, shares, f"rank {ctx.rank} lost its connection to them")) from None
        failed = [(r, st) for r, st in enumerate(statuses) if st[0] == "err"]
        if failed:
            r, st = failed[0]
            raise _RankError(f"rank {r}: {st[1]}", st[2])
        computed = sum(int(st[1]) for st in statuses)
        return _on_main(ctx, lambda: _with_interrupts(final, split, lambda: _assemble_dist(split, journal, prep, computed, t0)))
    finally:
        if lock is not None:
            lock.release()


def _journal_header_of(final: Path) -> dict[str, Any]:
    j = CacheJournal(final)
    j.open()
    return j.header


def _compute_share(
    ctx: distributed.DistContext,
    split: Split,
    journal: CacheJournal,
    mine: list[int],
    prep: _Prepared | None,
    get_runner: Callable[[InferenceSettings], _Runner],
    settings: InferenceSettings,
    progress: bool,
) -> int:
    """This rank's chunks of the journal rank 0 prepared. A rank other than 0 first checks that it sees that very
    journal (the cache folder must be shared) and that its runner computes what the header says."""
    if ctx.is_main:
        assert prep is not None
        state, runner, dev = prep.state, prep.runner, prep.dev
    else:
        try:
            seen = _journal_header_of(journal.final)
        except ValueError as exc:
            seen = {"problem": str(exc)}
        if seen != journal.header:
            why = seen.get("problem", "its journal.json differs from rank 0's")
            raise CacheError(
                f"rank {ctx.rank} does not see the journal {journal.dir} that rank 0 prepared ({why}): under torchrun "
                "the cache folder must be on a filesystem every rank shares (else: --shard i/n jobs and featx cache merge)"
            )
        state, runner, dev = JournalState(), None, None
        if mine:
            runner = get_runner(settings)
            made = (journal.header.get("runtime", "torch"), journal.header["cache_attrs"].get("embedder"))
            if (runner.runtime, _norm_json(runner.embedder)) != made:
                raise CacheError(
                    f"rank {ctx.rank} resolves the model differently from rank 0 ({runner.runtime} vs {made[0]}): "
                    "give every rank the same featx, weights and runtime"
                )
            dev = runtime.CpuDevice() if runner.runtime == "onnxruntime" else runtime.resolve_device(settings.device)
    rows = journal.done_rows(mine)
    which = f"chunks {mine[0]}-{mine[-1]}" if len(mine) > 1 else f"chunk {mine[0]}" if mine else "no chunk"
    log.info("rank %d computes %s of %d (%d rows)", ctx.rank, which, journal.n_chunks, rows)
    if not mine:
        return 0
    assert runner is not None
    emb = journal.header["embedder"]
    return _compute_missing(
        split, journal, state, runner, layer=emb["layer"], precision=emb.get("precision", "fp32"), dev=dev,
        settings=settings, progress=progress, chunks=mine, who=f"rank {ctx.rank} ",
    )  # fmt: skip


def _stopped(ctx: distributed.DistContext, split: Split, journal: CacheJournal, shares: list[list[int]], how: str) -> str:
    """One line for a job that stopped because a rank went away: which ranks had not written all their chunks (from
    the shared journal), what happened here, where the finished chunks are, and how to resume."""
    have = set(journal.chunk_files())
    short = [r for r, part in enumerate(shares) if r != ctx.rank and any(i not in have for i in part)]
    who = (
        f"rank{'s' if len(short) > 1 else ''} {', '.join(map(str, short))} stopped before writing all "
        f"{'their' if len(short) > 1 else 'its'} chunks (killed or crashed: torchrun's summary gives the exit)"
        if short
        else "another rank stopped"
    )
    total = sum(1 for i in have if i < journal.n_chunks)
    return (
        f"distributed extraction of split '{split.name}' failed: {who}; {how}; {total} of {journal.n_chunks} chunks are "
        f"kept in {journal.dir.name}: run the same command again to resume"
    )


def _assemble_dist(split: Split, journal: CacheJournal, prep: _Prepared | None, computed: int, t0: float) -> ExtractResult:
    """Rank 0, after every rank reported: the journal checked again (every rank's chunks) and assembled."""
    journal.open()
    state = journal.verify()
    for problem in state.problems:
        log.warning("%s: discarded damaged chunk %s", journal.dir.name, problem)
    missing = [i for i in range(journal.n_chunks) if i not in state.chunks]
    if missing:
        raise CacheError(
            f"{len(missing)} of {journal.n_chunks} chunks of {journal.dir} are missing after every rank finished "
            f"(first: {missing[0]}); run the same command again to compute them"
        )
    return _assemble(split, journal, state, prep.resumed_at if prep else 0, computed, t0)


def _discard_quietly(journal: CacheJournal) -> None:
    """Discard a journal that is no longer needed (its cache is complete); one that is not provably featx's is
    left alone with a warning instead of failing a finished extraction."""
    try:
        journal.discard()
    except CacheError as exc:
        log.warning("%s", exc)


def _with_interrupts(final: Path, split: Split, fn: Callable[[], ExtractResult]) -> ExtractResult:
    """Run ``fn`` turning SIGINT / SIGTERM into :class:`ExtractionInterrupted` (the journal is kept)."""
    try:
        with _signals_raise():
            return fn()
    except (KeyboardInterrupt, _Terminated) as exc:
        remove_assembly_file(final, strict=False)
        sig, code = ("SIGTERM", 143) if isinstance(exc, _Terminated) else ("SIGINT", 130)
        journal = CacheJournal(final)
        kept = f"the finished chunks are kept in {journal.dir.name}" if journal.exists() else "nothing was lost"
        raise ExtractionInterrupted(
            f"interrupted by {sig} while extracting split '{split.name}'; {kept}: run the same command again to resume",
            code,
        ) from None


def _norm_json(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _extract_split(
    ds: ImageDataset,
    split: Split,
    spec: CacheSpec,
    journal: CacheJournal,
    get_runner: Callable[[InferenceSettings], _Runner],
    *,
    settings: InferenceSettings,
    progress: bool,
) -> ExtractResult:
    t0 = time.perf_counter()
    prep = _prepare_journal(ds, split, spec, journal, get_runner, settings=settings)
    computed = 0
    if prep.todo:
        computed = _compute_missing(
            split, journal, prep.state, prep.runner, layer=spec.embedder.layer, precision=spec.embedder.precision,
            dev=prep.dev, settings=settings, progress=progress, chunks=prep.todo,
        )  # fmt: skip
    if journal.shard is not None:
        return _shard_result(split, journal, prep, computed, t0)
    return _assemble(split, journal, prep.state, prep.resumed_at, computed, t0)


@dataclass
class _Prepared:
    """A split's journal ready for work: what it holds, the chunks still to compute here (all missing ones; a shard's
    missing ones), the runner that computes them (None when there are none) and the device it runs on."""

    state: JournalState
    todo: list[int]
    runner: _Runner | None
    dev: Any
    resumed_at: int


def _wanted(journal: CacheJournal) -> list[int]:
    """The chunks this journal is to hold: all of them, or a shard's share."""
    return shard_chunks(journal.n_chunks, journal.shard) if journal.shard is not None else list(range(journal.n_chunks))


def _prepare_journal(
    ds: ImageDataset,
    split: Split,
    spec: CacheSpec,
    journal: CacheJournal,
    get_runner: Callable[[InferenceSettings], _Runner],
    *,
    settings: InferenceSettings,
    progress: bool = False,
) -> _Prepared:
    """Resume the split's journal when it is current (its whole chunks kept), else create it (building the runner:
    with ONNX Runtime this makes the export when there is none)."""
    layer, precision = spec.embedder.layer, spec.embedder.precision
    planned = planned_runtime(settings, runtime.device_type(settings.device), precision)
    dev = runtime.CpuDevice() if planned == "onnxruntime" else runtime.resolve_device(settings.device)
    runtime.check_precision(precision, dev)
    n = len(split)
    # What must match for a journal to be resumed (the key covers rows and embedder; the device changes numbers;
    # the settings that can change the rounding without being in the key are the settings' own record; the runtime
    # that computes the rows: a journal never holds rows of two runtimes, a resume with another one starts over).
    requested = _norm_json(
        {
            "key": spec.key(),
            "spec": spec.identity(),
            "n_rows": n,
            "device": dev.type,
            "layer": layer,
            "featx_version": __version__,
            **settings.to_dict(),
            "runtime": planned,
            **({"shard": list(journal.shard)} if journal.shard is not None else {}),
        }
    )
    state = None
    if journal.exists():
        try:
            journal.open()
            made = {**journal.header, "runtime": journal.header.get("runtime", "torch")}  # featx before runtimes: torch
            stale = [k for k, v in requested.items() if made.get(k) != v]
            if stale:
                raise ValueError(f"it was made with other settings ({', '.join(stale)})")
            state = journal.verify()
            for problem in state.problems:
                log.warning("%s: discarded damaged chunk %s", journal.dir.name, problem)
        except ValueError as exc:
            log.warning("discarding the interrupted extraction in %s: %s; starting over", journal.dir, exc)
            journal.discard()
            state = None
    runner: _Runner | None = None
    if state is None or any(i not in state.chunks for i in _wanted(journal)):
        runner = get_runner(settings)
        emb = runner.embedder
        requested["runtime"] = runner.runtime  # ``auto`` may have fallen back to PyTorch
        if state is not None and journal.header.get("runtime", "torch") != runner.runtime:
            log.warning(
                "discarding the interrupted extraction in %s: it was made with %s, this run uses %s; starting over",
                journal.dir,
                journal.header.get("runtime", "torch"),
                runner.runtime,
            )
            journal.discard()
            state = None
        elif state is not None and journal.header.get("cache_attrs", {}).get("embedder") != _norm_json(emb):
            log.warning("discarding the interrupted extraction in %s: the model resolves differently now", journal.dir)
            journal.discard()
            state = None
        if state is None:
            bs = settings.batch_size or default_batch_size(dev)
            workers = runtime.default_num_workers() if settings.num_workers is None else settings.num_workers
            n_flight, knob = images_in_flight(dev, settings.with_(batch_size=bs, num_workers=workers))
            check_forward_memory(n_flight, runner.preprocessing.input_size, dev, knob)  # before the journal exists
            cache_attrs = {
                "key": spec.key(),
                "embedder": emb,
                "dataset_name": ds.name,
                "dataset_root": printable_path(str(ds.root)),
                "dataset_fingerprint": spec.dataset_fingerprint,
                "split": split.name,
                "backbone": emb["backbone"],  # the embedder's fields most looked at, also flat for `cache ls` and h5 tools
                "layer": layer,
                "device": str(dev),
                "batch_size": bs,
                "chunk_rows": chunk_rows_for(bs),
                "channels_last": bool(settings.channels_last),
                "dtype": "float16" if precision == "fp16" else "float32",
                "runtime": runner.runtime,  # which runtime computed the rows (numbers agree within onnx_export.TOLERANCE)
                **({"onnx": runner.onnx} if runner.onnx else {}),
            }
            journal.create(
                {
                    **requested,
                    "batch_size": bs,
                    "chunk_rows": chunk_rows_for(bs),
                    "channels_last": bool(settings.channels_last),
                    "dataset_name": ds.name,
                    "split": split.name,
                    "embedder": emb,
                    "cache_attrs": _norm_json(cache_attrs),
                    "created_at": base_attrs()["created_at"],
                    **({"classes": list(split.classes)} if journal.shard is not None else {}),
                }
            )
            state = journal.verify()
    resumed_at = journal.done_rows(state.chunks)
    if resumed_at and settings.batch_size and settings.batch_size != journal.header["batch_size"]:
        kept = journal.header["batch_size"]
        log.info("resuming with the journal's batch size %s (asked: %s) so that the batches match", kept, settings.batch_size)
    todo = [i for i in _wanted(journal) if i not in state.chunks]
    return _Prepared(state, todo, runner if todo else None, dev, resumed_at)


def _shard_result(split: Split, journal: CacheJournal, prep: _Prepared, computed: int, t0: float) -> ExtractResult:
    """A --shard job's result: its journal holds its share; `featx cache merge` makes the cache."""
    mine = _wanted(journal)
    rows = journal.done_rows(mine)
    lo, hi = (journal.chunk_range(mine[0])[0], journal.chunk_range(mine[-1])[1]) if mine else (0, 0)
    failures = tuple((printable_path(split.paths[i]), r) for i, r in sorted(prep.state.failures.items()) if lo <= i < hi)
    seconds = time.perf_counter() - t0
    ips = computed / seconds if seconds else 0.0
    shard = f"{journal.shard[0]}/{journal.shard[1]}" if journal.shard else ""
    key = str(journal.header["key"])
    return ExtractResult(split.name, journal.dir, key, False, rows, len(failures), seconds, ips, failures, 0, shard=shard)


def _assemble(
    split: Split, journal: CacheJournal, state: JournalState, resumed_at: int, computed: int, t0: float
) -> ExtractResult:
    """The cache from a journal that holds every chunk (checked), then the journal discarded."""
    n = len(split)
    cache_attrs = dict(journal.header["cache_attrs"])
    dtype = np.float16 if cache_attrs.get("dtype") == "float16" else np.float32
    if resumed_at:
        log.info("%s: resumed at %d of %d images (journal %s)", split.name, resumed_at, n, journal.dir.name)
    if len(state.failures) == n:
        first = state.failures[0]
        _discard_quietly(journal)
        raise DataError(f"none of the {n} images in split '{split.name}' could be decoded (first: {first})")
    wall = time.perf_counter() - t0
    attrs = {
        **base_attrs(),
        **cache_attrs,
        "extraction_seconds": state.seconds,
        "n_images": n,
        "feature_dim": int(state.dim or 0),
        "images_per_s": computed / wall if computed else 0.0,
        "resumed_at": resumed_at,
    }

    def blocks() -> Iterator[tuple[int, np.ndarray, np.ndarray, list[str]]]:
        for i in range(journal.n_chunks):
            try:
                c = journal.read_chunk(state.chunks[i], i)
            except ValueError as exc:  # changed on disk since it was checked: the next run recomputes it
                gone = _journal_gone(journal)
                if gone is not None:
                    raise gone from None
                state.chunks[i].unlink(missing_ok=True)
                raise CacheError(f"journal chunk {state.chunks[i]} went bad ({exc}); run the same command again") from None
            yield c.start, c.features, c.valid, c.reasons

    t_assembly = time.perf_counter()
    path = write_cache_file(
        journal.final,
        n_rows=n,
        blocks=blocks(),
        labels=np.asarray(split.labels),
        paths=[printable_path(p) for p in split.paths],
        classes=list(split.classes),
        attrs=attrs,
        dtype=dtype,
        journal=journal.dir,
    )
    _discard_quietly(journal)
    t_assembly = time.perf_counter() - t_assembly
    log.info("%s: cache assembled from %d journal chunks in %.2f s", split.name, journal.n_chunks, t_assembly)
    seconds = time.perf_counter() - t0
    failures = tuple((printable_path(split.paths[i]), r) for i, r in sorted(state.failures.items()))
    for p, r in failures:
        log.debug("skipped %s: %s", p, r)
    ips = computed / seconds if seconds else 0.0
    key = str(journal.header["key"])
    return ExtractResult(split.name, path, key, False, n, len(failures), seconds, ips, failures, resumed_at)


def _compute_missing(
    split: Split,
    journal: CacheJournal,
    state: Any,
    runner: _Runner,
    *,
    layer: str,
    precision: str,
    dev: Any,
    settings: InferenceSettings,
    progress: bool,
    chunks: Sequence[int],
    who: str = "",
) -> int:
    """Compute ``chunks`` (contiguous runs of chunks, each one pass over its rows) and write them through the
    background writer, with the journal's batch size and memory format. Returns the number of rows computed.
    Logs (info) where the time went: decode, forward, journal writes (``who``: "rank R " under torchrun)."""
    t_start = time.perf_counter()
    prof = StageTimes()
    written_s = 0.0
    h = journal.header
    dtype = np.float16 if h["cache_attrs"].get("dtype") == "float16" else np.float32
    rows_in_chunks = journal.shard is not None  # a shard journal's chunks carry their paths and labels
    bs, chunk_rows = int(h["batch_size"]), journal.chunk_rows
    workers = runtime.default_num_workers() if settings.num_workers is None else settings.num_workers
    if runner.runtime == "torch":
        runtime.configure_threads(workers, dev)
    run = settings.with_(device=str(dev), batch_size=bs, num_workers=workers, channels_last=bool(h.get("channels_last", True)))
    model = runner.model
    missing = sorted(chunks)
    runs: list[tuple[int, int]] = []  # [first chunk, last chunk] of each contiguous run
    for i in missing:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    # The writer thread starts after the DataLoader has forked its workers (first chunk) and stops at the end
    # of each run of chunks, so no worker is ever forked while it runs.
    writer: _ChunkWriter | None = None
    computed = 0
    try:
        for first, last in runs:
            lo, hi = journal.chunk_range(first)[0], journal.chunk_range(last)[1]
            buf: dict[str, Any] = {}
            t_chunk = time.perf_counter()
            for b in iter_features(
                model,
                runner.preprocessing,
                split.root,
                split.paths[lo:hi],
                split.labels[lo:hi],
                settings=run,
                precision=precision,
                progress=progress,
                desc=f"extract {split.name}",
                profile=prof,
            ):
                _raise_pending()
                rows = np.asarray(b.positions, dtype=np.int64) + lo
                ci = int(rows[0]) // chunk_rows
                start, stop = journal.chunk_range(ci)
                if not buf:
                    dim = b.features.shape[1]
                    buf = {
                        "features": np.zeros((stop - start, dim), dtype=dtype),
                        "valid": np.zeros(stop - start, dtype=bool),
                        "reasons": [""] * (stop - start),
                        "filled": 0,
                    }
                ok = np.array([not e for e in b.errors], dtype=bool)
                local = rows - start
                buf["features"][local] = np.where(ok[:, None], b.features, 0).astype(dtype, copy=False)
                buf["valid"][local] = ok
                for j, e in zip(local, b.errors):
                    buf["reasons"][int(j)] = e
                    if e:
                        state.failures[start + int(j)] = e
                buf["filled"] += len(rows)
                computed += len(rows)
                if buf["filled"] == stop - start:
                    now = time.perf_counter()
                    chunk = Chunk(ci, start, buf["features"], buf["valid"], buf["reasons"], now - t_chunk)
                    if rows_in_chunks:
                        chunk = dataclasses.replace(
                            chunk, paths=[printable_path(p) for p in split.paths[start:stop]], labels=split.labels[start:stop]
                        )
                    t_chunk = now
                    state.seconds += chunk.seconds
                    state.dim = state.dim or int(buf["features"].shape[1])
                    writer = writer or _ChunkWriter(journal)
                    writer.put(chunk)
                    buf = {}
            if writer is not None:
                w, writer = writer, None
                try:
                    w.close()
                finally:
                    state.chunks.update(w.written)
                    written_s += w.seconds
    finally:
        if writer is not None:
            try:
                writer.close()
            finally:
                state.chunks.update(writer.written)
                written_s += writer.seconds
    _raise_pending()
    log.info(
        "%s%s: %d rows in %.1f s (%.1f img/s): decode %.1f s, forward %.1f s, waiting for batches %.1f s, "
        "journal writes %.1f s (in the background; decode/forward summed over parallel streams)",
        who, split.name, computed, time.perf_counter() - t_start, computed / max(time.perf_counter() - t_start, 1e-9),
        prof.decode, prof.forward, prof.wait, written_s,
    )  # fmt: skip
    if any(i not in state.chunks for i in missing):
        raise CacheError(f"internal: {sum(i in state.chunks for i in missing)} of {len(missing)} journal chunks after extraction")
    return computed


def _retry_failures(
    hit: Path,
    split: Split,
    spec: CacheSpec,
    rows: list[int],
    get_runner: Callable[[InferenceSettings], _Runner],
    *,
    settings: InferenceSettings,
    progress: bool,
) -> ExtractResult:
    """A complete cache holds failures that may have gone away (a permission, an I/O error): compute exactly
    those rows again (with the cache's batch size, memory format and runtime: a cache never mixes rows of two
    runtimes) and rewrite the cache (atomically, like any cache write)."""
    t0 = time.perf_counter()
    precision = spec.embedder.precision
    made_by = str(read_cache_attrs(hit).get("runtime", "torch"))
    try:
        runner = get_runner(settings.with_(runtime=made_by))
    except FeatxError as exc:  # that runtime cannot run here now: keep the cache as it is
        log.warning(
            "%s: not re-trying %d earlier failure(s): the cache was made with %s (%s)", split.name, len(rows), made_by, exc
        )
        a = read_cache_attrs(hit)
        return ExtractResult(split.name, hit, spec.key(), True, int(a["n_images"]), int(a["n_failed"]), 0.0, 0.0)
    dev = runtime.CpuDevice() if runner.runtime == "onnxruntime" else runtime.resolve_device(settings.device)
    runtime.check_precision(precision, dev)
    workers = runtime.default_num_workers() if settings.num_workers is None else settings.num_workers
    if runner.runtime == "torch":
        runtime.configure_threads(workers, dev)
    with CacheReader(hit) as reader:
        bs = int(reader.attrs.get("batch_size") or settings.batch_size or default_batch_size(dev))
        run = settings.with_(
            device=str(dev),
            batch_size=bs,
            num_workers=workers,
            channels_last=bool(reader.attrs.get("channels_last", settings.channels_last)),
        )
        idx = np.asarray(rows, dtype=np.int64)
        new_feats: dict[int, np.ndarray] = {}
        new_errors: dict[int, str] = {}
        for b in iter_features(
            runner.model,
            runner.preprocessing,
            split.root,
            [split.paths[i] for i in idx],
            split.labels[idx],
            settings=run,
            precision=precision,
            progress=progress,
            desc=f"re-try {split.name}",
        ):
            for p, feat, err in zip(b.positions, b.features, b.errors):
                row = int(idx[int(p)])
                new_errors[row] = err
                if not err:
                    new_feats[row] = feat
        old_failures = dict(read_failures(hit))
        reasons_all = {**old_failures, **{r: e for r, e in new_errors.items()}}
        n = reader.n_rows
        dtype = reader._features.dtype
        step = max(reader.chunk_rows, 1)

        def blocks() -> Iterator[tuple[int, np.ndarray, np.ndarray, list[str]]]:
            for start in range(0, n, step):
                stop = min(start + step, n)
                feats = np.array(reader.read_rows(start, stop))
                valid = reader.valid[start:stop].copy()
                reasons = [""] * (stop - start)
                for r in range(start, stop):
                    if r in new_feats:
                        feats[r - start] = new_feats[r]
                        valid[r - start] = True
                    elif reasons_all.get(r):
                        valid[r - start] = False
                        reasons[r - start] = reasons_all[r]
                yield start, feats, valid, reasons

        keep = {k: v for k, v in reader.attrs.items() if k not in ("complete", "n_failed", "attrs_sha256", "tables_sha256")}
        attrs = {**keep, "retried_at": base_attrs()["created_at"], "n_retried": len(rows)}
        write_cache_file(
            hit,
            n_rows=n,
            blocks=blocks(),
            labels=reader.labels,
            paths=reader.paths(),
            classes=reader.classes,
            attrs=attrs,
            dtype=dtype,
        )
    still = sorted(r for r, e in reasons_all.items() if e and r not in new_feats)
    seconds = time.perf_counter() - t0
    failures = tuple((printable_path(split.paths[i]), reasons_all[i]) for i in still)
    log.info("%s: re-tried %d earlier failure(s); %d now decode", split.name, len(rows), len(new_feats))
    return ExtractResult(split.name, hit, spec.key(), False, n, len(still), seconds, len(rows) / seconds, failures, 0, len(rows))
