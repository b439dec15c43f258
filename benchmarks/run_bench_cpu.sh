#!/usr/bin/env bash
# The issue 12 CPU bench, one dataset at a time under the CPU lock (so other CPU-heavy jobs can run between
# datasets but never beside one), then one last pass over the whole config: every cell is finished by then and
# skipped, so that pass only writes report.md, results.json and the plots.
#   bash benchmarks/run_bench_cpu.sh [dataset-name ...]     (default: all four, then the report)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/bench_cpu
cache=runs/bench-cpu-cache
[ -d runs/data/digits ] || python benchmarks/make_digits.py --out runs/data/digits
names=("$@")
report=0
[ ${#names[@]} -gt 0 ] || { names=(hymenoptera flowers17 clothing10 digits); report=1; }
for name in "${names[@]}"; do
  cfg="runs/bench_cpu-$name.yaml"
  python - "$name" "$cfg" <<'PY'
import sys, yaml
name, cfg = sys.argv[1], sys.argv[2]
c = yaml.safe_load(open("benchmarks/bench_cpu.yaml"))
c["datasets"] = [d for d in c["datasets"] if d.rstrip("/").split("/")[-1] == name]
assert c["datasets"], name
# per-dataset settings: keep only this dataset's key (by name or path), so none warns that it matches no dataset
for key in ("image_size", "max_train_per_class", "augment"):
    if isinstance(c.get(key), dict):
        mine = {k: v for k, v in c[key].items() if k in (name, c["datasets"][0]) or k.rstrip("/").split("/")[-1] == name}
        if mine:
            c[key] = mine
        else:
            del c[key]
yaml.safe_dump(c, open(cfg, "w"))
PY
  echo "== $name $(date -u +%H:%M:%S)"
  start=$SECONDS
  flock /tmp/featx-cpu.lock featx -q bench --config "$cfg" --out-dir "$out" --cache-dir "$cache"
  echo "== $name done in $((SECONDS - start)) s"
done
[ "$report" = 1 ] || exit 0  # named datasets only: run those cells, leave the report to the full pass
flock /tmp/featx-cpu.lock featx -q bench --config benchmarks/bench_cpu.yaml --out-dir "$out" --cache-dir "$cache"
