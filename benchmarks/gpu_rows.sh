#!/usr/bin/env bash
# The H100 rows of benchmarks/results/ in one command on the `device` machine (set-up: "How to rerun" in
# benchmarks/README.md: Keras wheels in .whl/, the CIFAR-10 archive in .data/cifar10/, carry [".whl", ".data",
# ".gpu"] or this file's folder). Usage: [SEEDS=0,1,2] bash benchmarks/gpu_rows.sh PART...  with PART among
#   torch     EfficientNetB0, torch backend, bf16, batch 256, against timm eager and compiled
#   torchoff  the same with KTRANSFER_ACCEL=off (the whole torch fast path off: Keras' own code), no timm
#   jax       EfficientNetB0, JAX, bf16, batch 256
#   jaxplain  the same with plain Keras compiled first (does the first compilation pay for both?)
#   jaxbn     benchmarks/jax_batch_norm.py: one-pass batch statistics against Keras' two (XLA bytes, step time)
#   fast      experiments/cifar10_fast.yaml on JAX over SEEDS (first run compiles, later ones hit the cache)
# Used on 2026-11-24 as: torch torchoff (one call), SEEDS=0,1,2 jax fast (one call), SEEDS=3,4 fast.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KTRANSFER_DATA_DIR=.data KTRANSFER_CACHE_DIR=/tmp/kt MPLBACKEND=Agg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
kt() { python3 -m keras_transfer "$@"; }
for part in "$@"; do
  echo "=== $part $(date +%T)"
  case $part in
    torch) KERAS_BACKEND=torch kt bench --model efficientnet_b0 --strategies full --precision mixed_bfloat16 \
             --batch-size 256 --steps 20 --repeats 3 --timm --out $OUT ;;
    torchoff) KTRANSFER_ACCEL=off KERAS_BACKEND=torch kt bench --model efficientnet_b0 --strategies full \
             --precision mixed_bfloat16 --batch-size 256 --steps 20 --repeats 3 --no-timm --out $OUT ;;
    jax) KERAS_BACKEND=jax kt bench --model efficientnet_b0 --strategies full --precision mixed_bfloat16 \
             --batch-size 256 --steps 30 --repeats 3 --no-timm --out $OUT ;;
    jaxplain) KERAS_BACKEND=jax kt bench --model efficientnet_b0 --strategies full --precision mixed_bfloat16 \
             --batch-size 256 --steps 30 --repeats 3 --no-timm --compile-first plain --out $OUT ;;
    jaxbn) KERAS_BACKEND=jax python3 benchmarks/jax_batch_norm.py --size 224 --batch 256 --steps 30 --repeats 3 \
             2>&1 | grep -v "^I0000\|^WARNING\|oneDNN" | tee $OUT/jax-batch-norm.txt ;;
    fast)
          KERAS_BACKEND=jax bash benchmarks/cifar10_fast_seeds.sh experiments/cifar10_fast.yaml ${SEEDS:-0,1,2} /tmp/fast 2>&1 | grep -v "^I0000\|^WARNING\|oneDNN" | tee $OUT/fast-seeds.txt
          for s in ${SEEDS//,/ }; do cp /tmp/fast-s$s/history.csv $OUT/fast-s$s-history.csv 2>/dev/null; done ;;
  esac
done
echo "=== end $(date +%T)"
