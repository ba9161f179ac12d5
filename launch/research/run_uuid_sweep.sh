#!/usr/bin/env bash
# LR sweep for the UUID memorisation experiment: 3 learning rates per method, 30 epochs,
# 256 pairs, two single-threaded runs at a time (2 CPU cores). Usage: bash launch/research/run_uuid_sweep.sh
set -u
cd "$(dirname "$0")/../.."
OUT=results/runs/uuid_sweep
mkdir -p $OUT
jobs=()
for lr in 1e-3 3e-3 1e-2; do jobs+=("lora --r 8 --lr $lr lora_lr$lr"); done
for t in sharing rotation; do for lr in 1e-3 3e-3 1e-2; do jobs+=("mora --mora-type $t --r 8 --lr $lr mora_${t}_lr$lr"); done; done
for lr in 3e-4 1e-3 3e-3; do jobs+=("fft --lr $lr fft_lr$lr"); done
for lr in 3e-3 1e-2 3e-2; do jobs+=("vera --r 256 --lr $lr vera_lr$lr"); done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'set -- {}; name=${@: -1}; args=("${@:1:$#-1}");
  .venv/bin/python launch/research/uuid_memorize.py --method "${args[@]}" --epochs 30 --n-pairs 256 \
    --out '$OUT'/$name > '$OUT'/$name.log 2>&1'
