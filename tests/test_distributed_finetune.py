"""Fine-tuning under ``torchrun --nproc_per_node=2`` (DDP on gloo/CPU): real torchrun subprocesses, the tiny random-init
ResNet-10t of tests/test_finetuning.py at 32 px, 3 classes with row counts that do not divide evenly.

What is checked: the result records the world size; every val/test row is scored exactly once, in dataset order, and
the scores equal one process scoring the saved weights; a job whose rank 0 is killed after its first checkpoint
fails naming the rank, keeps the checkpoint, and the same command with --resume ends with the uninterrupted run's
result; LP-FT, the train+val refit, a grid search and trained BatchNorm statistics run under DDP (slow).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featx.backbones import build_backbone
from featx.data import load_dataset
from featx.errors import UsageError
from featx.finetuning.ddp import eval_slice, per_rank_batch, rank_seed
from tests.conftest import make_imagefolder

BACKBONE, WEIGHTS, SIZE, CLASSES = "timm:resnet10t", "none", 32, 3
COUNTS = {"train": 9, "val": 5, "test": 7}  # per class: 27 / 15 / 21 rows, none a multiple of 2 ranks x 4
ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
FAST_ARGS = [
    *("--backbone", BACKBONE, "--weights", WEIGHTS, "--image-size", str(SIZE)),
    *("--epochs", "2", "--batch-size", "8", "--optimizer", "sgd", "--lr", "0.05", "--warmup-epochs", "0.5"),
    *("--patience", "0", "--num-workers", "0", "--device", "cpu", "--final-fit", "train"),
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FEATX_FAILPOINTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def torchrun_finetune(dataset: Path, out_dir: Path, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [*TORCHRUN, "-m", "featx", "finetune", str(dataset), *FAST_ARGS, "--out-dir", str(out_dir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=300, cwd=out_dir.parent)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("ddp") / "data", COUNTS, n_classes=CLASSES)


@pytest.fixture(scope="module")
def whole(dataset: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One uninterrupted 2-process fine-tune (2 epochs, the best-on-val model kept)."""
    out = dataset.parent / "whole"
    return torchrun_finetune(dataset, out), out


def score_in_one_process(state: dict[str, torch.Tensor], dataset: Path, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, predictions and mean cross-entropy of saved weights on every row of ``split``, in one process,
    computed here from the image files (not through featx's loaders)."""
    bb = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE)
    model = nn.Sequential(OrderedDict(backbone=bb.model, head=nn.Sequential(nn.Dropout(0.2), nn.Linear(bb.feature_dim, CLASSES))))
    model.load_state_dict(state)
    model.eval()
    rows = load_dataset(dataset).split(split)
    tf = bb.preprocessing.build_transform()
    x = torch.stack([tf(Image.open(rows.root / p).convert("RGB")) for p in rows.paths])
    with torch.no_grad():
        logits = model(x)
    y = torch.from_numpy(rows.labels)
    return rows.labels, logits.argmax(1).numpy(), nn.functional.cross_entropy(logits, y).item()


def test_eval_slices_cover_every_row_once_and_batches_split_evenly() -> None:
    for n in (0, 1, 2, 5, 21, 100):
        for world in (1, 2, 3, 8):
            rows = [i for r in range(world) for i in eval_slice(n, r, world)]
            assert rows == list(range(n))  # disjoint, complete, in dataset order when concatenated by rank
    assert per_rank_batch(32, 8) == 4 and per_rank_batch(8, 1) == 8
    with pytest.raises(UsageError, match="global batch and must be divisible by the 3 ranks"):
        per_rank_batch(32, 3)
    seeds = {rank_seed(0, e, r) for e in range(3) for r in range(4)}
    assert len(seeds) == 12 and rank_seed(0, 1, 1) == rank_seed(0, 1, 1) != rank_seed(1, 1, 1)


SCORE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from PIL import Image
    from torch import nn
    from featx import distributed
    from featx.backbones import build_backbone
    from featx.data import load_dataset
    from featx.finetuning import FinetuneConfig
    from featx.finetuning.env import Env

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist = distributed.from_environment("cpu")
    ds, bb = load_dataset(data), build_backbone("timm:resnet10t", "none", image_size=32)
    tf = bb.preprocessing.build_transform()
    splits = {name: ds.split(name) for name in ("val", "test")}
    images = {n: torch.stack([tf(Image.open(s.root / p).convert("RGB")) for p in s.paths]) for n, s in splits.items()}
    means = {n: x.mean(dim=(1, 2, 3)) for n, x in images.items()}

    class RowOf(nn.Module):  # logits whose argmax is the row an image is: its mean pixel, nearest in the split's table
        def __init__(self, table):
            super().__init__()
            self.table = table
        def forward(self, x):
            return -(x.mean(dim=(1, 2, 3))[:, None] - self.table[None, :]).abs() * 1000

    env = Env(ds, dict(splits), {}, bb, {}, torch.device("cpu"), 0, None, False, dist)
    cfg = FinetuneConfig(batch_size=4, num_workers=0, device="cpu")
    got = {}
    for name in splits:
        model, labels = RowOf(means[name]), torch.from_numpy(splits[name].labels)
        one_process = nn.functional.cross_entropy(model(images[name]), labels).item()  # every row, here, once
        y, p, loss = env.score(name, model, cfg, log_loss=True)
        got[name] = {"labels": y.tolist(), "rows": p.tolist(), "loss": loss, "one_process_loss": one_process,
                     "distinct": len(set(means[name].tolist()))}
    (out / f"scores-rank{dist.rank}.json").write_text(json.dumps(got))
    dist.close()
    """
)


def test_gathered_scores_hold_every_row_once_in_dataset_order(tmp_path: Path, dataset: Path) -> None:
    """Env.score under 2 gloo ranks with a model whose prediction *is* the row scored (an image's mean pixel looked
    up in the split's table): the gathered predictions must be 0..n-1 -- no row missing, repeated or out of order."""
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    proc = subprocess.run(
        [*TORCHRUN, str(script), str(dataset), str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"scores-rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # every rank holds the same gathered scores
    for name, n in (("val", 15), ("test", 21)):  # odd counts: the ranks' slices differ in size (7/8, 10/11)
        s = r0[name]
        assert s["distinct"] == n  # the lookup can tell every row apart
        assert s["rows"] == list(range(n))
        assert s["labels"] == load_dataset(dataset).split(name).labels.tolist()
        assert s["loss"] == pytest.approx(s["one_process_loss"], rel=1e-5)  # summed over the ranks, over n rows


def test_ddp_finetune_records_world_size_and_scores_every_row_once(
    whole: tuple[subprocess.CompletedProcess[str], Path], dataset: Path
) -> None:
    proc, out = whole
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo" and res["per_rank_batch_size"] == 4
    assert res["config"]["batch_size"] == 8 and res["batch_norm"] == "frozen"
    # the sampler pads 27 train rows to 28 (14 per rank, 4 steps of 4 images: the single process's 4 steps of 8)
    assert [(h["images"], h["steps"]) for h in res["history"]] == [(28, 4), (28, 4)]
    assert proc.stdout.count("test acc") == 1  # rank 0 prints the table, rank 1 stays silent

    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and res["best_epoch"] == ckpt["best_epoch"]
    y_test, p_test, _ = score_in_one_process(ckpt["best_state"], dataset, "test")
    assert res["n_test"] == len(res["test_predictions"]) == len(y_test) == 21  # each test row once, no padding
    assert res["test_labels"] == y_test.tolist() and res["test_predictions"] == p_test.tolist()
    y_val, p_val, val_loss = score_in_one_process(ckpt["best_state"], dataset, "val")
    assert res["n_val"] == 15 and res["val_accuracy"] == float(np.mean(y_val == p_val))
    assert res["val_log_loss"] == pytest.approx(val_loss, rel=1e-5)


def test_ddp_resumes_after_rank0_is_killed_and_matches_uninterrupted_run(
    whole: tuple[subprocess.CompletedProcess[str], Path], dataset: Path
) -> None:
    proc, out_whole = whole
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dataset.parent / "cut"
    killed = torchrun_finetune(dataset, out, FEATX_FAILPOINTS="finetune.checkpoint_saved=1:SIGKILL")  # rank 0, epoch 1
    assert killed.returncode != 0
    # torchrun's summary names the rank that died first (a surviving rank may also print featx's one line, if it
    # notices the lost peer before torchrun stops it)
    assert re.search(r"Root Cause.*?rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: -9", killed.stderr, re.S), killed.stderr[-3000:]
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and not (out / "result.json").exists()

    resumed = torchrun_finetune(dataset, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = json.loads((out / "result.json").read_text()), json.loads((out_whole / "result.json").read_text())
    assert a["resumed_from_epoch"] == 1 and a["world_size"] == 2
    assert a["history"][:1] == saved["history"]  # epoch 1 not re-run
    assert [h["val_accuracy"] for h in a["history"]] == [h["val_accuracy"] for h in b["history"]]
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-5)
    assert a["test_predictions"] == b["test_predictions"] and a["metrics"] == b["metrics"]
    final = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    reference = torch.load(out_whole / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)


API_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from featx.finetuning import FinetuneConfig, finetune, finetune_search

    data, out, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    fast = dict(optimizer="sgd", batch_size=8, num_workers=0, device="cpu", lr=0.05, warmup_epochs=0.5,
                early_stopping_patience=0, epochs=2)
    common = dict(backbone="timm:resnet10t", weights="none", image_size=32, out_dir=out, progress=False)
    if kind == "lp-ft-search":
        res = finetune_search(data, config=FinetuneConfig(strategy="lp-ft", **fast), grid={"lr": [0.05, 0.1]},
                              final_fit="train+val", **common)
    else:
        res = finetune(data, config=FinetuneConfig(strategy="full", freeze_bn_stats=False, **fast), final_fit="train", **common)
    rank = int(__import__("os").environ["RANK"])
    (out / f"returned-by-rank{rank}.json").write_text(json.dumps(res, sort_keys=True))
    """
)


def _torchrun_api(tmp_path: Path, dataset: Path, out: Path, kind: str) -> list[dict[str, Any]]:
    script = tmp_path / "run_api.py"
    script.write_text(API_SCRIPT)
    proc = subprocess.run(
        [*TORCHRUN, str(script), str(dataset), str(out), kind], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"returned-by-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_lp_ft_search_and_train_val_refit(tmp_path: Path, dataset: Path) -> None:
    out = tmp_path / "lpft"
    r0, r1 = _torchrun_api(tmp_path, dataset, out, "lp-ft-search")
    assert r0 == r1  # every rank returns rank 0's record
    assert r0 == json.loads((out / "result.json").read_text())  # written once, by rank 0
    assert r0["world_size"] == 2 and len(r0["grid"]) == 2 and r0["lp_stage"]["final_n_fit"] == 27 + 15
    assert r0["history"][0]["epoch"] == 0  # lp-ft's probe-initialised network scored on all val rows
    assert r0["n_fit"] == 42 and r0["final_epochs"] == len(r0["final_history"]) == r0["best_epoch"]
    assert len(r0["test_predictions"]) == r0["n_test"] == 21
    assert (out / "final_checkpoint.pt").is_file() == (r0["best_epoch"] > 0)


@pytest.mark.slow
def test_ddp_trained_batchnorm_statistics_on_cpu_are_rank0s(tmp_path: Path, dataset: Path) -> None:
    out = tmp_path / "bn"
    r0, r1 = _torchrun_api(tmp_path, dataset, out, "full-bn")
    assert r0 == r1 and r0["batch_norm"] == "per-rank"  # SyncBatchNorm needs GPUs; gloo/CPU: local batches
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    start = build_backbone(BACKBONE, WEIGHTS, image_size=SIZE).model.state_dict()
    assert any(not torch.equal(ckpt["model"][f"backbone.{k}"], v) for k, v in start.items() if k.endswith("running_mean"))
    y_test, p_test, _ = score_in_one_process(ckpt["best_state"], dataset, "test")  # rank 0's statistics score all rows
    assert r0["test_predictions"] == p_test.tolist() and r0["test_labels"] == y_test.tolist()


@pytest.mark.slow
def test_ddp_refuses_a_global_batch_the_ranks_cannot_split(tmp_path: Path, dataset: Path) -> None:
    proc = torchrun_finetune(dataset, tmp_path / "odd", "--batch-size", "7")
    assert proc.returncode != 0
    assert proc.stderr.count("featx: error: --batch-size 7 is the global batch and must be divisible by the 2 ranks") == 1
    assert "Traceback" not in proc.stderr.split("featx: error")[0][-200:]
