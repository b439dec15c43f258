"""``--scheduler``: the bench's cells and fit-head's kinds as Dask tasks (LocalCluster worker processes, real cells, real
heads) give what the local executor gives; an interrupted cluster bench resumes; errors are one line, exit 2."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import featx.cluster
from featx.bench import BenchConfig, FewShotConfig, run_bench
from featx.cache import load_cache
from featx.cli import main
from featx.heads import load_head

from .conftest import make_imagefolder

# device auto (the CPU here): on a cluster whose workers declare a GPU the fine-tuning cells ask for one
TINY = {"backbones": ["timm:resnet10t"], "weights": "none", "image_size": 32, "device": "auto"}
# What a run measures about itself (time, memory, when, where): the only fields a cluster run may change.
COST = re.compile(r"seconds|wall|_s$|memory|rss|images_per_s|created_at|^command$|^machine$|^fingerprint$")


def tiny_grid(data: Path) -> BenchConfig:
    """All five cell kinds on 2 classes x (6 train, 2 val, 2 test) images at 32 px."""
    return BenchConfig(
        datasets=[str(data)],
        **TINY,
        heads=["logreg", "knn"],
        strategies=["head"],
        finetune={"epochs": 1, "batch_size": 8, "num_workers": 0},
        finetune_grid={"lr": [0.01], "weight_decay": [0.0]},
        fewshot=FewShotConfig(
            shots=[2], draws=1, finetune_strategy="head", finetune_shots=[2], finetune_draws=1, finetune_rule_steps=2
        ),
        layerwise=True,
    )


def strip_costs(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_costs(v) for k, v in value.items() if not COST.search(k)}
    if isinstance(value, list):
        return [strip_costs(v) for v in value]
    return value


PINNABLE = hasattr(os, "sched_setaffinity")
CORES = sorted(os.sched_getaffinity(0)) if PINNABLE else []


@contextlib.contextmanager
def cores(which: list[int]) -> Iterator[None]:
    """This thread (and the processes it starts) on ``which`` cores only, for the block."""
    if not PINNABLE:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, which)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def same(a: Any, b: Any, path: str = "") -> None:
    """Equal, floats to 1e-5 relative: a head fitted on a worker runs with the worker's BLAS threads (Dask's nanny sets
    OMP_NUM_THREADS=1), which changes the order of float sums. (The bench's cells are compared exactly: they run on as
    many cores there as here.)"""
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9), path
    else:
        assert a == b, path


def report_numbers(out: Path) -> str:
    """report.md with its costs (durations, memory, ratios of durations) and creation time blanked out."""
    text = "\n".join(line for line in (out / "report.md").read_text().splitlines() if not line.startswith("| created"))
    text = re.sub(r"\d+(?:\.\d+)?×", "N×", text)
    return re.sub(r"\d+(?:\.\d+)?(?:†)? ?(?:s|MB|GB|ms|images/s)\b(?:†)?", "T", text)


def cells(out: Path) -> dict[str, Any]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}


@pytest.fixture(scope="module")
def local_bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dask-bench")
    data = make_imagefolder(root / "data", {"train": 6, "val": 2, "test": 2}, n_classes=2)
    # one core, as each local:2 worker below gets one: a cell's numbers depend on its thread count (the order of float32
    # sums: 2 threads instead of 1 move a val_log_loss at 1e-7 and can flip a test image), not on where it runs
    with cores(CORES[:1]):
        outcome = run_bench(tiny_grid(data), out_dir=root / "local", cache_dir=str(root / "cache-local"), progress=False)
    assert outcome["failed"] == 0
    return {"root": root, "data": data, "out": root / "local"}


def test_cluster_bench_equals_local_and_resumes(local_bench: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    import dask
    import distributed

    root, data, local = local_bench["root"], local_bench["data"], local_bench["out"]
    out = root / "cluster"
    with cores(CORES[:2]):  # local:2 pins each worker to its share: one core each (or the one core twice)
        outcome = run_bench(
            tiny_grid(data), out_dir=out, cache_dir=str(root / "cache-cluster"), progress=False, scheduler="local:2"
        )
    assert outcome["failed"] == 0
    # every cell computed on the workers (its own cache: the features were extracted there), written by its task
    assert (root / "cache-cluster").is_dir() and not (out / ".featx-cluster-probe").exists()
    assert not list((out / "cells").glob("*.tmp"))
    want = cells(local)
    assert sorted(want) == sorted(cells(out)) and len(want) == 5
    assert strip_costs(cells(out)) == strip_costs(want)  # exactly: the same floats
    local_results = json.loads((local / "results.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert strip_costs(results["datasets"]) == strip_costs(local_results["datasets"])
    assert report_numbers(out) == report_numbers(local)
    rows = results["datasets"]["data"]["rows"]
    assert [r["strategy"] for r in rows] == ["logreg", "knn", "head"] and all(r["accuracy"] is not None for r in rows)

    # interrupted: two cells never wrote their files. A cluster whose workers declare a GPU (fine-tuning cells request
    # one) and are reached by address reruns exactly those two; the others are reused untouched.
    for kind in ("finetune-head", "layerwise"):
        next((out / "cells").glob(f"*-{kind}.json")).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    with (
        caplog.at_level(logging.INFO, logger="featx.bench.cluster"),
        dask.config.set({"distributed.worker.daemon": False}),
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None, resources={"GPU": 1}
        ) as cluster,
        distributed.Client(cluster) as pin,
    ):
        pin.run(featx.cluster._pin, CORES[:1])  # its cells on one core, as above
        again = run_bench(
            tiny_grid(data),
            out_dir=out,
            cache_dir=str(root / "cache-cluster"),
            progress=False,
            scheduler=cluster.scheduler_address,
        )
    assert again["failed"] == 0
    assert "2 cell(s) submitted to the Dask scheduler, 1 of them asking for a GPU worker" in caplog.text
    now = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert {k: v for k, v in now.items() if k in kept} == kept
    assert sorted(set(now) - set(kept)) == sorted(n for n in want if n.endswith(("-finetune-head.json", "-layerwise.json")))
    assert strip_costs(json.loads((out / "results.json").read_text())["datasets"]) == strip_costs(local_results["datasets"])


def test_which_cells_ask_for_a_gpu_worker() -> None:
    from featx.bench.cluster import cell_resources

    kinds = ["features", "finetune", "fewshot_heads", "fewshot_finetune", "layerwise"]
    gpu = {"GPU": 1}
    assert [cell_resources(k, "auto", True) for k in kinds] == [None, gpu, None, gpu, None]
    assert [cell_resources(k, "cuda:1", True) for k in kinds] == [gpu, gpu, None, gpu, gpu]
    assert all(cell_resources(k, d, g) is None for k in kinds for d, g in [("cpu", True), ("auto", False), ("cuda", False)])


def test_a_cells_process_gets_a_local_processs_environment() -> None:
    """Dask's nanny gives its workers OMP_NUM_THREADS=1 and MALLOC_TRIM_THRESHOLD_=65536 (about 6x the page faults and 5x
    the system time of a local bench: scaling_dask.md); a cell's process, spawned from the worker, starts without them."""
    from featx.bench.cluster import _plain_environ

    keys = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")
    with featx.cluster.dask_client("local:1") as client:
        nanny = client.submit(lambda: {k: os.environ.get(k) for k in keys}, pure=False).result()
        cell = client.submit(lambda: (_plain_environ(), {k: os.environ.get(k) for k in keys})[1], pure=False).result()
    assert nanny == {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"} and cell == dict.fromkeys(keys)


def test_workers_that_may_not_start_processes_are_refused_before_any_cell(local_bench: dict[str, Any], tmp_path: Path) -> None:
    """A default ``dask worker`` is daemonic: the check says how to start it, and no cell runs."""
    import distributed

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with pytest.raises(featx.errors.UsageError, match="DASK_DISTRIBUTED__WORKER__DAEMON=False"):
            run_bench(
                tiny_grid(local_bench["data"]), out_dir=tmp_path / "out", progress=False, scheduler=cluster.scheduler_address
            )
    assert list((tmp_path / "out" / "cells").iterdir()) == []


def test_fit_head_on_a_cluster_equals_the_local_fit(sample_caches: dict[str, Path], tmp_path: Path) -> None:
    caches = ["--train", str(sample_caches["train"]), "--val", str(sample_caches["val"]), "--test", str(sample_caches["test"])]
    args = ["-q", "fit-head", *caches, "--head", "logreg,knn,linear-svm"]
    assert main([*args, "--out-dir", str(tmp_path / "here")]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "there"), "--scheduler", "local:2"]) == 0
    (here,) = (tmp_path / "here").glob("*-metrics.json")
    there = tmp_path / "there" / here.name
    a, b = json.loads(here.read_text()), json.loads(there.read_text())
    test = load_cache(sample_caches["test"])
    assert sorted(a) == ["knn", "linear-svm", "logreg"]
    for kind in a:
        assert Path(b[kind]["path"]).parent == tmp_path / "there"
        h1, h2 = load_head(a[kind]["path"]), load_head(b[kind]["path"])
        assert h1.best_params == h2.best_params
        assert np.array_equal(h1.estimator.predict(test.features), h2.estimator.predict(test.features))
        a[kind].pop("path"), b[kind].pop("path")
        same(strip_costs(a[kind]), strip_costs(b[kind]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_scheduler_errors_are_one_line_exit_2(
    tmp_path: Path, sample_caches: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 2}, n_classes=2)
    bench = ["bench", "--dataset", str(data), "--backbone", "timm:resnet10t", "--cache-dir", str(tmp_path / "c")]
    fit = ["fit-head", "--train", str(sample_caches["train"]), "--out-dir", str(tmp_path / "heads")]

    def one_line_error(argv: list[str], pattern: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(pattern, err[0]), err

    # a scheduler nobody listens on: one line naming it, nothing written
    monkeypatch.setattr(featx.cluster, "CONNECT_TIMEOUT_S", 2)
    address = f"tcp://127.0.0.1:{_free_port()}"
    one_line_error(
        [*bench, "--out-dir", str(tmp_path / "o1"), "--scheduler", address], f"cannot reach the Dask scheduler at {address}"
    )
    one_line_error([*fit, "--scheduler", address], "cannot reach the Dask scheduler")
    one_line_error([*bench, "--out-dir", str(tmp_path / "o2"), "--scheduler", "local:0"], "local:N needs 1 <= N")
    one_line_error([*fit, "--scheduler", "somewhere"], "must be local:N or a Dask scheduler address")

    # Dask not installed (an import of it fails): one line naming the extra, before anything is created
    monkeypatch.setitem(sys.modules, "distributed", None)
    one_line_error([*bench, "--out-dir", str(tmp_path / "o3"), "--scheduler", "local:2"], r"pip install 'featx\[dask\]'")
    one_line_error([*fit, "--scheduler", "local:2"], r"pip install 'featx\[dask\]'")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3)) and not (tmp_path / "heads").exists()


def test_featx_imports_no_dask() -> None:
    modules = "featx, featx.bench, featx.heads, featx.cluster, featx.cli"
    code = f"import sys, {modules}; print(sorted({{'dask', 'distributed'}} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
