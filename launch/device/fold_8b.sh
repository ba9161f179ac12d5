# Issue 15, 2026-12-01: MoRA's tile fold (block types' g summed over their row tiles before the block
# products, `blockdiag.folded`) and the one-pass block sums (`kernels/tilesum.py`; sharing's q/k/v by
# query group), on one H200 (repo root, wheels in .bench/, the previous code's tree in .bench/old
# (`git archive eb66145 mora_dist launch bench`), $OUT set). Two calls of ~9 min, one after the other:
#   bash launch/device/fold_8b.sh a   # kernel microbenches, our 8B rows, rotation + sharing with the old code, PEFT + Liger
#   bash launch/device/fold_8b.sh b   # PEFT, our LoRA + rotation rows again, the 1.1B rows (new and old code), bench --check
# and, after v9's adapters stopped folding (1.1B rotation), the final table in one call:
#   bash launch/device/fold_8b.sh c   # our 8B rows, PEFT + Liger, the 1.1B rows (new and old code), PEFT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
left() { echo $(( $1 - $(date +%s) + S )); }
B8="launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --modes graph --no-peer --steps 6"
if [ "$1" = a ]; then
  timeout 120 python3 launch/bench_rotgrad.py > $OUT/kernels.txt 2>&1
  timeout 50 python3 launch/bench_rotgrad.py --tilesum >> $OUT/kernels.txt 2>&1
  timeout $(left 390) python3 $B8 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b8.json > $OUT/b8.log 2>&1
  (cd .bench/old && PYTHONPATH=/tmp/site:$PWD timeout $(left 500) python3 $B8 --rows mora-rotation,mora-sharing \
    --json $OUT/b8_old.json > $OUT/b8_old.log 2>&1)
  timeout $(left 585) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
  cat $OUT/kernels.txt; grep "^|" $OUT/b8.log; grep -h "^| mora" $OUT/b8_old.log
elif [ "$1" = c ]; then
  B1="launch/bench.py --size 1b --seq 2048 --mbs 4 --modes graph --no-peer"
  timeout 260 python3 $B8 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b8.json > $OUT/b8.log 2>&1
  timeout $(left 380) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
  timeout $(left 460) python3 $B1 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b1.json > $OUT/b1.log 2>&1
  (cd .bench/old && PYTHONPATH=/tmp/site:$PWD timeout $(left 500) python3 $B1 --rows mora-rotation,mora-sharing \
    --json $OUT/b1_old.json > $OUT/b1_old.log 2>&1)
  timeout $(left 585) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/peft.log 2>&1
  grep "^|" $OUT/b8.log; grep "^|" $OUT/b1.log; grep -h "^| mora" $OUT/b1_old.log
else
  timeout 170 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/peft.log 2>&1
  timeout $(left 280) python3 $B8 --rows lora,mora-rotation --json $OUT/b8_again.json > $OUT/b8_again.log 2>&1
  B1="launch/bench.py --size 1b --seq 2048 --mbs 4 --modes graph --no-peer"
  timeout $(left 390) python3 $B1 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b1.json > $OUT/b1.log 2>&1
  (cd .bench/old && PYTHONPATH=/tmp/site:$PWD timeout $(left 470) python3 $B1 --rows mora-rotation,mora-sharing \
    --json $OUT/b1_old.json > $OUT/b1_old.log 2>&1)
  timeout $(left 580) python3 launch/bench.py --check --size 8b --no-peer --json $OUT/check.json > $OUT/check.log 2>&1
  grep -h "^| mora" $OUT/b8_again.log; grep "^|" $OUT/b1.log; grep -h "^| mora" $OUT/b1_old.log; tail -12 $OUT/check.log
fi
echo "elapsed $(( $(date +%s) - S )) s"
grep -h "^{\"method" $OUT/*.log
