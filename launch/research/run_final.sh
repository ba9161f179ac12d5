#!/usr/bin/env bash
# After run_uuid_sweep.sh: each method's best sweep LR trained for 100 epochs (same 256 pairs),
# then the pretraining comparison (300 steps, restarts every 75), two single-threaded runs at a time.
set -u
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
U=results/runs/uuid_final; P=results/runs/pretrain
mkdir -p $U $P
jobs=()
while read m lr; do
  case $m in
    lora) a="lora --r 8";; vera) a="vera --r 256";; fft) a="fft";;
    mora_sharing) a="mora --mora-type sharing --r 8";; mora_rotation) a="mora --mora-type rotation --r 8";;
  esac
  jobs+=("$PY launch/research/uuid_memorize.py --method $a --lr $lr --epochs 100 --n-pairs 256 --out $U/$m > $U/$m.log 2>&1")
done < <($PY launch/research/pick_best_lr.py results/runs/uuid_sweep | sort -r)   # vera (slowest) first
PT="--steps 300 --restart-every 75 --restart-warmup 10 --warmup 20 --eval-every 25"
for spec in "full 1e-3" "lora 2e-3" "mora 2e-3"; do  # one LR each (CPU budget)
  set -- $spec
  jobs+=("$PY launch/research/pretrain_relora.py --method $1 --lr $2 $PT --out $P/${1}_lr$2 > $P/${1}_lr$2.log 2>&1")
done
printf '%s\n' "${jobs[@]}" | tee $U/commands.txt | xargs -P 2 -I{} bash -c '{}'
