"""fit-head over PyTorch vs ONNX Runtime caches: the head's choice, test accuracy and differing test predictions.

Extract each dataset twice first (the caches of both runtimes share a key, so use two folders):

    featx extract ../shared/data/NAME --runtime torch --cache-dir /tmp/nt2/torch
    featx extract ../shared/data/NAME --runtime onnxruntime --cache-dir /tmp/nt2/ort

then ``python benchmarks/cross_runtime_heads.py /tmp/nt2/torch /tmp/nt2/ort hymenoptera flowers17 clothing10``.
One JSON line per dataset and head kind (issue 23's "same head choice, +-1 test image" check; near_ties.md).
"""

import json
import sys
import time
from pathlib import Path

from featx.cache import load_cache
from featx.heads import fit_head


def main() -> None:
    torch_dir, ort_dir, *datasets = sys.argv[1:]
    for ds in datasets:
        feats = {}
        for rt, d in (("torch", Path(torch_dir)), ("ort", Path(ort_dir))):
            feats[rt] = {s: load_cache(f) for s in ("train", "val", "test") for f in d.glob(f"{ds}-{s}-*.h5")}
        for kind in ("logreg", "linear-svm"):
            r = {}
            for rt, f in feats.items():
                t0 = time.perf_counter()
                r[rt] = (fit_head(f["train"], f.get("val"), f["test"], kind=kind), time.perf_counter() - t0)
            pt, po = (r[k][0].predict(feats[k]["test"].features) for k in ("torch", "ort"))
            row = {
                "ds": ds,
                "kind": kind,
                "C": [r[k][0].best_params["C"] for k in r],
                "acc": [round(r[k][0].test_metrics["accuracy"], 4) for k in r],
                "diff": int((pt != po).sum()),
                "s": [round(r[k][1], 2) for k in r],
                "rescored": r["torch"][0].metadata.get("cold_rescored"),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
