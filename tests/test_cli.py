"""The command line end to end: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from featx.cli import main

from .conftest import make_imagefolder


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_fit_head_predict_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = make_imagefolder(tmp_path / "data", {"train": 10, "test": 5}, n_classes=3)
    opts = ["--image-size", "64", "--num-workers", "0"]
    code, out, _ = run(["extract", str(data), *opts], capsys)
    assert code == 0 and "0/2 cache hits" in out and "30 images" in out
    code, out, _ = run(["extract", str(data), *opts], capsys)
    assert code == 0 and "2/2 cache hits" in out
    code, out, _ = run(["cache", "ls"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 4  # header, rule, train, test
    code, out, _ = run(["fit-head", str(data), "--head", "logreg,knn", "--image-size", "64", "--n-jobs", "1"], capsys)
    assert code == 0 and "logreg" in out and "confusion matrix" in out
    metrics = json.loads((tmp_path / "heads" / "data-efficientnet_lite0-pooled-metrics.json").read_text())
    assert metrics["logreg"]["test_metrics"]["accuracy"] >= 0.9  # generated classes are easy
    assert metrics["logreg"]["n_val"] == 6  # carved: 20% of train, stratified
    stream = ["fit-head", str(data), "--head", "logreg", "--image-size", "64", "--stream", "--sweep-rows", "9", "--out-dir", "sh"]
    code, out, err = run(stream, capsys)
    assert code == 0, err
    streamed = json.loads((tmp_path / "sh" / "data-efficientnet_lite0-pooled-metrics.json").read_text())["logreg"]
    assert code == 0 and streamed["stream"] and streamed["refit_converged"] and 9 <= streamed["sweep_rows"] <= 12
    assert streamed["n_val"] == 6 and streamed["n_fit"] == metrics["logreg"]["n_fit"]  # the same rows as in memory
    head = tmp_path / "heads" / "data-efficientnet_lite0-pooled-logreg.skops"
    code, out, _ = run(["predict", str(head), str(data / "test"), "--num-workers", "0"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("path,label,p_class_0") and len(lines) == 16
    correct = sum(line.split(",")[1] in line.split(",")[0] for line in lines[1:])
    assert correct >= 14
    code, _, _ = run(["predict", str(head), str(data / "test"), "-o", str(tmp_path / "p.json"), "--num-workers", "0"], capsys)
    assert code == 0 and len(json.loads((tmp_path / "p.json").read_text())["predictions"]) == 15
    code, out, _ = run(["cache", "rm", "--all"], capsys)
    assert code == 0 and out.count("removed") == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["extract", "{tmp}/missing"], "dataset not found"),
        (["extract", "{tmp}/empty"], "no class folders"),
        (["extract", "{tmp}/noimg"], "no images"),
        (["extract", "{tmp}/data", "--backbone", "resnet19"], "unknown backbone 'resnet19'; did you mean resnet18"),
        (["extract", "{tmp}/data", "--weights", "{tmp}/nope.pth"], "not found"),
        (["fit-head", "{tmp}/data", "--head", "forest"], "unknown head"),
        (["fit-head", "{tmp}/data"], "no cache for split"),
        (["fit-head", "{tmp}/data", "--sweep-rows", "100"], "go with --stream"),
        (["predict", "{tmp}/nohead.skops", "{tmp}/data"], "head file not found"),
        (["cache", "info", "deadbeef", "--cache-dir", "{tmp}"], "no cache with key"),
        (["finetune", "{tmp}/data", "--strategy", "magic"], "strategy"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_imagefolder(tmp_path / "data", {"train": 2})
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    code, _out, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("featx: error: ") and "Traceback" not in err


def test_head_cache_mismatch_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = make_imagefolder(tmp_path / "data", {"train": 6, "test": 3})
    assert run(["extract", str(data), "--image-size", "64", "--num-workers", "0"], capsys)[0] == 0
    assert run(["extract", str(data), "--image-size", "72", "--splits", "test", "--num-workers", "0"], capsys)[0] == 0
    assert run(["fit-head", str(data), "--image-size", "64", "--n-jobs", "1"], capsys)[0] == 0
    from featx.cache import list_caches

    other = next(r for r in list_caches("cache") if r["split"] == "test" and "72" in json.dumps(read(r["path"])))
    head = tmp_path / "heads" / "data-efficientnet_lite0-pooled-logreg.skops"
    code, _, err = run(["predict", str(head), "--cache", other["key"]], capsys)
    assert code == 2 and "does not match the head" in err and err.count("\n") == 1


def read(path: str) -> dict:
    from featx.cache import read_cache_attrs

    return read_cache_attrs(path)["embedder"]["preprocessing"]


def test_console_script_runs_as_a_module() -> None:
    res = subprocess.run([sys.executable, "-m", "featx", "--version"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.startswith("featx ")
    res = subprocess.run([sys.executable, "-m", "featx", "extract"], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "required" in res.stderr
