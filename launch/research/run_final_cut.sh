#!/usr/bin/env bash
# What actually ran for the final results (CPU budget ran short; replaces the tail of run_final.sh):
# run_final.sh started VeRA (lr 3e-2) and MoRA-sharing (lr 1e-3) at 100 epochs; VeRA's final run
# was stopped (VeRA is reported from the 30-epoch sweep only) and the remaining jobs were run as two
# chains: MoRA-rotation, LoRA, FFT at their best sweep LR for 100 epochs; pretraining 200 steps,
# restarts every 50.
set -u
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
U=results/runs/uuid_final; P=results/runs/pretrain
mkdir -p $U $P
(
for spec in "mora --mora-type rotation --r 8 --lr 0.003:mora_rotation" "lora --r 8 --lr 0.003:lora" "fft --lr 0.001:fft"; do
  $PY launch/research/uuid_memorize.py --method ${spec%%:*} --epochs 100 --n-pairs 256 --out $U/${spec##*:} > $U/${spec##*:}.log 2>&1
done
) &
PT="--steps 200 --restart-every 50 --restart-warmup 10 --warmup 20 --eval-every 25"
for spec in "full 1e-3" "lora 2e-3" "mora 2e-3"; do
  set -- $spec
  $PY launch/research/pretrain_relora.py --method $1 --lr $2 $PT --out $P/${1}_lr$2 > $P/${1}_lr$2.log 2>&1
done
wait
