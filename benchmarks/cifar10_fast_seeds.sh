#!/usr/bin/env bash
# Run a CIFAR-10 fast-recipe config for several seeds, one fresh process each, and print one line per
# run plus the mean and standard deviation of the test accuracy (issue 6's >= 90.6% target).
#
#   KTRANSFER_DATA_DIR=../shared/data KERAS_BACKEND=jax bash benchmarks/cifar10_fast_seeds.sh \
#       experiments/cifar10_fast.yaml 0,1,2 /tmp/fast
#
# Each run writes <out>-s<seed>/ (metrics.json, history.csv). Runs after the first reuse the persistent
# compilation cache, so their first_epoch_s shows the cached compile time.
set -euo pipefail
config=${1:?usage: cifar10_fast_seeds.sh CONFIG SEEDS OUT_PREFIX}
seeds=${2:-0,1,2}
out=${3:-/tmp/cifar10-fast}
ktransfer=(python3 -m keras_transfer)
for s in ${seeds//,/ }; do
  "${ktransfer[@]}" pretrain --config "$config" --seed "$s" --out "$out-s$s" >/dev/null
done
python3 - "$out" "$seeds" <<'PY'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2].split(",")
accs = []
for s in seeds:
    m = json.load(open(f"{out}-s{s}/metrics.json"))
    accs.append(m["accuracy"])
    print(f"seed {s}: accuracy {m['accuracy']:.4f}  first epoch {m.get('first_epoch_s', float('nan')):.2f} s  "
          f"median epoch {m.get('epoch_s_median', float('nan')):.3f} s  "
          f"training without compile {m.get('train_s_without_compile', float('nan')):.2f} s")
sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
print(f"mean {statistics.mean(accs):.4f} +- {sd:.4f} (n={len(accs)})")
PY
