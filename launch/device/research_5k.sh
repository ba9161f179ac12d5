# Issue 20's 5,000-step pretraining study (docs/results/README.md, "The 5,000-step pretraining study"), one
# piece per device call, on an nvidia-h200-x2 (2 GPUs, 32 cores): launch/research/round2.py spreads the
# runs over both GPUs (each run sees one: the one with the fewest runs when it starts). Run from the
# repo root with the megatron-core wheel in .bench/ (carry it) and $OUT set:
#
#   bash launch/device/research_5k.sh grid-a   # LR grids (seed 0): full relora_s0.5 relora_s2 lora_norestart, 20 runs
#   bash launch/device/research_5k.sh grid-b   # LR grids (seed 0): remora_2type remora_4type mora_norestart, 15 runs
#   bash launch/device/research_5k.sh seeds    # seeds 1, 2 of all 7 groups at their best LRs, 14 runs
#
# Each call writes $OUT/$NAME.tgz (NAME defaults to the phase; the archive holds the directory NAME/:
# every run's metrics.jsonl, run.json and log, commands.txt, status.json, placement.json, summary.json
# and, for the grids, selection.json = each group's grid scores and best LR) and $OUT/$NAME.log. The
# grids queue no seeds (--grid-only): a 5,000-step seed run would not fit after them. `seeds` reads
# the best LRs from every results/study5k/grid-*.tgz (copy the grid tarballs there first) unless
# SEEDS_AT="group=lr ..." gives them. Extra arguments go to round2.py after the phase's own (a later
# --groups wins): to split a piece, e.g. `NAME=grid-a1 ... grid-a --groups full relora_s0.5` and
# `NAME=grid-a2 ... grid-a --groups relora_s2 lora_norestart`.
# Env: BUDGET (default 520 s of runs; every run stops itself at BUDGET - 20 s, so the call ends by
# ~545 s, under the 600 s limit), STEPS (default 5000; e.g. STEPS=500 BUDGET=200 for a timing check),
# NAME, SEEDS_AT, ALLOW_ONE_GPU=1 to run with fewer than 2 GPUs (the pieces were sized for 2).
phase=$1; shift || true
name=${NAME:-$phase}
case "$phase" in
  grid-a) args=(--grid-only --groups full relora_s0.5 relora_s2 lora_norestart) ;;
  grid-b) args=(--grid-only --groups remora_2type remora_4type mora_norestart) ;;
  seeds)
    if [ -n "$SEEDS_AT" ]; then
      args=(--seeds-at $SEEDS_AT)
    else
      rm -rf /tmp/s5k_prev && mkdir -p /tmp/s5k_prev
      for f in results/study5k/grid-*.tgz; do
        tar xzf "$f" -C /tmp/s5k_prev --wildcards '*/selection.json' || { echo "no selection.json in $f"; exit 1; }
      done
      sel=(/tmp/s5k_prev/*/selection.json)
      [ -f "${sel[0]}" ] || { echo "no results/study5k/grid-*.tgz: copy the grid tarballs there or set SEEDS_AT"; exit 1; }
      args=(--seeds-from "${sel[@]}")
    fi ;;
  *) echo "usage: bash launch/device/research_5k.sh grid-a|grid-b|seeds [round2.py args]"; exit 2 ;;
esac
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
nvidia-smi -L
if [ "$ngpu" -lt 2 ] && [ -z "$ALLOW_ONE_GPU" ]; then
  echo "$ngpu GPU(s) visible: the pieces are sized for an nvidia-h200-x2 (set ALLOW_ONE_GPU=1 to run anyway)"; exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/s5k
python3 launch/research/round2.py /tmp/s5k/$name --pt-only --pt-steps ${STEPS:-5000} --budget ${BUDGET:-520} \
    --stop-margin 20 "${args[@]}" "$@" 2>&1 | grep -v -i warn > $OUT/$name.log
tar czf $OUT/$name.tgz -C /tmp/s5k $name
tail -40 $OUT/$name.log
