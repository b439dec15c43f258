"""featx bench under hostile use (issues 20 and 21): datasets that share a folder name, results that went stale,
an out-dir inside a dataset, a SIGKILLed bench, a second bench into the same folder, bad values in the grid file."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featx.bench import BenchConfig, FewShotConfig, check_write_locations, load_bench_config, run_bench
from featx.cli import main
from featx.data import refuse_inside_dataset
from featx.errors import UsageError

from .conftest import make_image, make_imagefolder

TINY = {"backbones": ["timm:resnet10t"], "weights": "none", "image_size": 32, "device": "cpu"}
HEADS_ONLY = {**TINY, "heads": ["logreg"], "strategies": [], "fewshot": None, "layerwise": False}


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_same_folder_name_datasets_report_separately(tmp_path: Path) -> None:
    a = make_imagefolder(tmp_path / "a" / "ds", {"train": 6, "val": 2, "test": 3}, n_classes=2)
    b = make_imagefolder(tmp_path / "b" / "ds", {"train": 6, "val": 2, "test": 3}, n_classes=3, seed=1)
    caps = {str(a): 2, str(b): 4}  # per-dataset settings keyed by path (the name "ds" would be ambiguous)
    config = BenchConfig(datasets=[str(a), str(b)], max_train_per_class=caps, **HEADS_ONLY)
    out = run_bench(config, out_dir=tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert out["failed"] == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(results["datasets"]) == [f"ds ({a})", f"ds ({b})"]
    for root, n_classes, cap in ((a, 2, 2), (b, 3, 4)):
        entry = results["datasets"][f"ds ({root})"]
        assert entry["dataset"] == str(root) and len(entry["classes"]) == n_classes
        (row,) = entry["rows"]
        assert len(row["test_labels"]) == 3 * n_classes and sorted(set(row["test_labels"])) == list(range(n_classes))
        assert len(row["train_positions"]) == cap * n_classes  # its own cap, found by path
    assert len(list((tmp_path / "out" / "cells").glob("ds-*-features.json"))) == 2  # one cell per dataset
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"ds ({a})" in report and f"ds ({b})" in report

    with pytest.raises(UsageError, match=r"max_train_per_class\.ds names 2 datasets"):
        run_bench(BenchConfig(datasets=[str(a), str(b)], max_train_per_class={"ds": 2}, **HEADS_ONLY), out_dir=tmp_path / "x")
    with pytest.raises(UsageError, match="listed twice"):
        run_bench(BenchConfig(datasets=[str(a), str(a) + "/."], **HEADS_ONLY), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def cell_mtimes(out: Path) -> dict[str, int]:
    return {p.name.split("-timm_resnet10t-")[1]: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_changed_settings_rerun_only_the_cells_they_affect(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 6, "val": 2, "test": 2}, n_classes=2, ext=".bmp")  # fixed-size files
    base = {
        **TINY,
        "datasets": [str(data)],
        "heads": ["logreg"],
        "strategies": ["head"],
        "finetune": {"epochs": 1, "batch_size": 8, "num_workers": 0},
        "finetune_grid": {"lr": [0.01], "weight_decay": [0.0]},
        "fewshot": FewShotConfig(shots=[1], draws=1, finetune_strategy=None),
        "layerwise": False,
    }
    out = tmp_path / "out"

    def bench(reuse_stale: bool = False, **changes: object) -> dict:
        config = BenchConfig(**{**base, **changes})
        outcome = run_bench(config, out_dir=out, cache_dir=str(tmp_path / "cache"), progress=False, reuse_stale=reuse_stale)
        assert outcome["failed"] == 0
        return outcome["results"].meta.to_dict()

    meta = bench()
    first = cell_mtimes(out)
    assert sorted(first) == ["features.json", "fewshot-heads.json", "finetune-head.json"]
    assert meta["stale_cells"] == [] and set(meta["code"]) == {"featx_version", "source_sha256"}
    cell = json.loads((out / "cells" / next(p.name for p in (out / "cells").glob("*-features.json"))).read_text())
    assert {"config.heads", "dataset", "embedder", "code", "libraries"} <= set(cell["fingerprint"]["parts"])

    # a fine-tuning setting: the fine-tuning cell runs again, the heads' cells are reused
    meta = bench(finetune={**base["finetune"], "epochs": 2})
    second = cell_mtimes(out)
    assert [k for k in second if second[k] != first[k]] == ["finetune-head.json"]
    assert meta["stale_cells"] == []
    results = json.loads((out / "results.json").read_text())
    assert results["datasets"]["data"]["rows"][1]["epochs_budget"] == 2

    # the heads change, kept on purpose: nothing runs, the heads' cells are listed as stale
    meta = bench(reuse_stale=True, heads=["logreg", "knn"], finetune={**base["finetune"], "epochs": 2})
    assert cell_mtimes(out) == second
    assert sorted((s["cell"].split("-timm_resnet10t-")[1], s["changed"]) for s in meta["stale_cells"]) == [
        ("features", ["config.heads"]),
        ("fewshot-heads", ["config.heads"]),
    ]

    # a training image overwritten with another picture of the same size: every cell runs again
    victim = data / "train" / "class_0" / "000.bmp"
    before = victim.stat()
    make_image(np.random.default_rng(99), 1).save(victim)
    assert victim.stat().st_size == before.st_size
    bench(finetune={**base["finetune"], "epochs": 2})
    third = cell_mtimes(out)
    assert all(third[k] != second[k] for k in third)

    # a cell from before fingerprints is stale ("no fingerprint"); --reuse-stale keeps it
    path = next((out / "cells").glob("*-fewshot-heads.json"))
    legacy = json.loads(path.read_text())
    del legacy["fingerprint"]
    path.write_text(json.dumps(legacy))
    meta = bench(reuse_stale=True, finetune={**base["finetune"], "epochs": 2})
    assert [(s["cell"], s["changed"]) for s in meta["stale_cells"]] == [(path.stem, ["no fingerprint"])]
    assert cell_mtimes(out) == {**third, "fewshot-heads.json": path.stat().st_mtime_ns}


def test_out_dir_or_cache_inside_a_dataset_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    data = make_imagefolder(tmp_path / "ds2", {"train": 3, "test": 2}, n_classes=2)
    (tmp_path / "link").symlink_to(data / "train")
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({**HEADS_ONLY, "datasets": ["ds2"]}))
    before = files_under(data)
    for flags, what in (
        (["--out-dir", "ds2/train/class_0"], "--out-dir ds2/train/class_0"),  # a PNG there becomes a training image
        (["--out-dir", "ds2/train/zz"], "--out-dir ds2/train/zz"),  # an empty class breaks every later run
        (["--out-dir", "ds2"], "--out-dir ds2"),
        (["--out-dir", "link/new"], "--out-dir link/new"),  # through a symlink
        (["--out-dir", "out", "--cache-dir", "ds2/cache"], "--cache-dir ds2/cache"),
    ):
        assert main(["-q", "bench", "--config", str(grid), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"featx: error: {what} is inside the dataset ") and "\n" not in err, err
        assert files_under(data) == before
        assert not (tmp_path / "out").exists()
    monkeypatch.setenv("FEATX_CACHE_DIR", str(data / "test" / "cache"))  # the default cache, from the environment
    with pytest.raises(UsageError, match="--cache-dir"):
        check_write_locations(load_bench_config(grid), tmp_path / "out", None)

    # an out-dir that holds a dataset is fine, unless the dataset sits where the bench writes
    monkeypatch.delenv("FEATX_CACHE_DIR")
    inner = make_imagefolder(tmp_path / "results" / "mydata", {"train": 2}, n_classes=2)
    check_write_locations(BenchConfig(datasets=[str(inner)], **HEADS_ONLY), tmp_path / "results", None)
    runs = make_imagefolder(tmp_path / "r2" / "runs" / "d", {"train": 2}, n_classes=2)
    with pytest.raises(UsageError, match="where featx bench writes"):
        check_write_locations(BenchConfig(datasets=[str(runs)], **HEADS_ONLY), tmp_path / "r2", None)
    # the shared helper (extract --cache-dir uses it too): a CSV dataset names its files, so it is never refused
    (data / "m.csv").write_text("path,label\ntrain/class_0/000.png,a\n")
    refuse_inside_dataset(data / "cache", data / "m.csv", "--cache-dir")
    with pytest.raises(UsageError, match="--cache-dir"):
        refuse_inside_dataset(data / "train" / "cache", data, "--cache-dir")


BAD_VALUES = [
    ("max_train_per_class: -5", "max_train_per_class", "-5"),
    ('max_train_per_class: "ten"', "max_train_per_class", "'ten'"),
    ("max_train_per_class: {ds: 0}", "max_train_per_class.ds", "0"),
    ("max_train_per_class: 2.5", "max_train_per_class", "2.5"),
    ('budget_notes: "one note"', "budget_notes", "'one note'"),
    ("budget_notes: [1, 2]", "budget_notes", "[1, 2]"),
    ("device: quantum", "device", "'quantum'"),
    ('seed: "x"', "seed", "'x'"),
    ("seed: -1", "seed", "-1"),
    ("seed: 5000", "seed", "5000"),
    ("val_fraction: 1.5", "val_fraction", "1.5"),
    ("test_fraction: 0", "test_fraction", "0"),
    ("image_size: 100000", "image_size", "100000"),
    ("image_size: {ds: 8}", "image_size.ds", "8"),
    ("image_size: true", "image_size", "True"),
    ("datasets: ds", "datasets", "'ds'"),
    ("datasets: []", "datasets", "[]"),
    ("backbones: resnet18", "backbones", "'resnet18'"),
    ("heads: [logreg, logreg]", "heads", "logreg twice"),
    ("weights: 3", "weights", "3"),
    ("layerwise: 'no'", "layerwise", "'no'"),
    ("quick: 1", "quick", "1"),
    ("final_fit: 3", "final_fit", "3"),
    ("finetune: [1]", "finetune", "[1]"),
    ("finetune: {epochs: ten}", "finetune", "'ten'"),
    ("finetune: {epochs: 0}", "finetune", "0"),
    ("finetune: {lr: -1}", "finetune", "-1"),
    ("finetune: {epoch: 3}", "finetune setting", "epoch"),
    ("finetune: {seed: 3}", "finetune setting", "seed"),
    ("finetune_grid: {lr: [1e-3]}", "finetune_grid.lr", "'1e-3'"),
    ("finetune_grid: {lr: [0.0]}", "finetune_grid.lr", "0.0"),
    ("finetune_grid: {weight_decay: [-0.1]}", "finetune_grid.weight_decay", "-0.1"),
    ("finetune_grid: {lr: 0.01}", "finetune_grid.lr", "0.01"),
    ("finetune_grid: {full: {lr: [.nan]}}", "finetune_grid.full.lr", "nan"),
    ("finetune_grid: {momentum: [0.9]}", "finetune_grid", "momentum"),
    ("finetune_grid: 0.01", "finetune_grid", "0.01"),
    ("fewshot: {shots: [0, 2]}", "fewshot.shots", "[0, 2]"),
    ("fewshot: {shots: 5}", "fewshot.shots", "5"),
    ("fewshot: {draws: -2}", "fewshot.draws", "-2"),
    ("fewshot: {finetune_rule_steps: 0}", "fewshot.finetune_rule_steps", "0"),
    ("fewshot: {finetune_strategy: 7}", "fewshot.finetune_strategy", "7"),
    ("fewshot: [1, 2]", "fewshot", "[1, 2]"),
    ("augment: [blur]", "augment", "'blur'"),
    ("augment: hflip", "augment", "'hflip'"),
    ("augment: []", "augment", "[]"),
    ("augment: 3", "augment", "3"),
    ("augment: {ds: [hflip, hflip]}", "augment.ds", "hflip twice"),
    ("augment: {ds: [none, hflip]}", "augment.ds", "['none', 'hflip']"),
]


@pytest.mark.parametrize(("line", "key", "shown"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_grid_values_are_one_line_usage_errors(
    line: str, key: str, shown: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    make_imagefolder(tmp_path / "ds", {"train": 2}, n_classes=2)
    lines = {"datasets": "datasets: [ds]", "strategies": "strategies: [full]"}
    lines[line.split(":")[0]] = line
    (tmp_path / "grid.yaml").write_text("\n".join(lines.values()) + "\n")
    assert main(["-q", "bench", "--config", "grid.yaml", "--out-dir", "out"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("featx: error: ") and "\n" not in err and captured.out == "", err
    assert key in err and shown in err, err
    assert not (tmp_path / "out").exists()


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, stack = {}, [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if (start := started(c)) is not None:
                out[c] = start
            stack.append(c)
    return out


def started(pid: int) -> str | None:
    """The start time of a live process (None once it is gone or a zombie: a dead process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_bench_takes_its_cells_down_and_the_lock_refuses_a_second_run(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", {"train": 6, "val": 2, "test": 2}, n_classes=2)
    grid = {
        **TINY,
        "datasets": [str(data)],
        "heads": ["logreg"],
        "strategies": ["full"],
        # long enough to be killed mid-training, with DataLoader workers below the cell's process
        "finetune": {"epochs": 500, "batch_size": 2, "num_workers": 2, "early_stopping_patience": 0},
        "finetune_grid": {"lr": [0.01], "weight_decay": [0.0]},
        "fewshot": None,
        "layerwise": False,
    }
    (tmp_path / "grid.yaml").write_text(json.dumps(grid))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "featx", "-q", "bench", "--config", str(tmp_path / "grid.yaml"), "--out-dir", str(out)]
    bench = subprocess.Popen([*args, "--cache-dir", str(tmp_path / "cache")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and bench.poll() is None:
            tree = descendants(bench.pid)
            # the fine-tuning cell's process exists (its run folder is made first) and has started its DataLoader workers
            if (out / "runs").is_dir() and len(tree) >= 4:
                break
            time.sleep(0.2)
        assert bench.poll() is None and len(tree) >= 4, bench.stderr.read().decode() if bench.poll() is not None else tree

        second = subprocess.run([*args, "--cache-dir", str(tmp_path / "cache2")], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr
        assert f"another featx bench is writing to {out}" in second.stderr

        tree = descendants(bench.pid)
        os.kill(bench.pid, signal.SIGKILL)
        bench.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(started(p) == t for p, t in tree.items()):
            time.sleep(0.1)
        survivors = [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p, t in tree.items() if started(p) == t]
        assert not survivors, survivors
    finally:  # leave nothing behind, whatever failed
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for p, t in tree.items():
            if started(p) == t:
                os.kill(p, signal.SIGKILL)
    assert not list((out / "cells").glob("*finetune*"))  # nothing finished after the kill
    with open(out / ".featx-bench.lock") as fh:  # the killed run's lock file does not block
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
