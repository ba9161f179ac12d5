#!/usr/bin/env bash
# Added while the sweep ran: MoRA-sharing's best LR at 30 epochs was the lowest grid point (1e-3),
# so both MoRA types also get 3e-4 (same settings as run_uuid_sweep.sh).
set -u
cd "$(dirname "$0")/../.."
OUT=results/runs/uuid_sweep
for t in sharing rotation; do
  .venv/bin/python launch/research/uuid_memorize.py --method mora --mora-type $t --r 8 --lr 3e-4 --epochs 30 \
    --n-pairs 256 --out $OUT/mora_${t}_lr3e-4 > $OUT/mora_${t}_lr3e-4.log 2>&1
done
