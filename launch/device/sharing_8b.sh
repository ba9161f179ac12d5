# Issue 15, 2026-12-01 (twelfth session): MoRA sharing's weight build as a read of M per weight
# (`kernels/build.tile_add`, was a product with the tile maps, K = rh per term) and q/k/v's block sums of g
# in one launch for all query groups (was one a group), on one H200 (repo root, wheels in .bench/, $OUT set):
#   bash launch/device/sharing_8b.sh a      # kernel table (8B, 1.1B), 1.1B canary, 8B sharing + rotation
#                                           # profiled, sharing with the product build (A/B), bench --check
#   bash launch/device/sharing_8b.sh final  # the 8B rows, PEFT + Liger, PEFT (the table), 1.1B rows
#   bash launch/device/sharing_8b.sh supp   # the other rows: VeRA next to LoRA, micro-batch 1 next to 2,
#                                           # PEFT + Liger; kernel profiles of frozen / LoRA / VeRA (files tarred:
#                                           # a call brings back at most 8 files)
# then, with the factors' gradients summed over a step's micro-batches (fixed_adapters' accumulate):
#   bash launch/device/sharing_8b.sh acc    # 1.1B canary (losses vs call 1's: sharing 7.8794, LoRA 10.5786),
#                                           # 8B frozen / LoRA / sharing, LoRA per micro-batch (A/B), PEFT + Liger
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
left() { echo $(( $1 - $(date +%s) + S )); }
B8="launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --modes graph --no-peer --steps 6"
B1="launch/bench.py --size 1b --seq 2048 --mbs 4 --modes graph --no-peer"
if [ "$1" = a ]; then
  timeout 120 python3 launch/bench_rotgrad.py --sharing --reps 50 > $OUT/kernels.txt 2>&1
  timeout 60 python3 launch/bench_rotgrad.py --sharing --size 1b --reps 50 >> $OUT/kernels.txt 2>&1
  # canary: the build graph at 1.1B with accumulation (its replays checked against eager builds: build_graph_diff)
  timeout $(left 250) python3 $B1 --accum 2 --steps 3 --rows mora-sharing,lora --json $OUT/b1_acc.json > $OUT/b1_acc.log 2>&1
  timeout $(left 420) python3 $B8 --rows mora-sharing,mora-rotation --profile $OUT/prof8b.txt --json $OUT/b8.json > $OUT/b8.log 2>&1
  MORA_DIST_NO_KERNEL=tilebuild timeout $(left 500) python3 $B8 --rows mora-sharing --json $OUT/b8_old.json > $OUT/b8_old.log 2>&1
  timeout $(left 585) python3 launch/bench.py --check --no-peer --json $OUT/check.json > $OUT/check.log 2>&1
  cat $OUT/kernels.txt; grep "^|" $OUT/b1_acc.log; grep "^|" $OUT/b8.log; grep -h "^| mora" $OUT/b8_old.log
  grep -h "sharing" $OUT/check.log
elif [ "$1" = acc ]; then
  timeout 100 python3 $B1 --accum 2 --steps 3 --rows mora-sharing,lora,vera --json $OUT/b1_acc.json > $OUT/b1_acc.log 2>&1
  PM=""; grep -q '"error"' $OUT/b1_acc.json || [ ! -s $OUT/b1_acc.json ] && PM="--per-micro-grads"  # canary failed
  timeout $(left 345) python3 $B8 $PM --rows frozen,lora,mora-sharing --json $OUT/b8.json > $OUT/b8.log 2>&1
  [ -z "$PM" ] && timeout $(left 425) python3 $B8 --per-micro-grads --rows lora --json $OUT/b8_pm.json > $OUT/b8_pm.log 2>&1
  timeout $(left 530) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
  grep "^|" $OUT/b1_acc.log; grep -h '"loss"' $OUT/b1_acc.log | grep -o '"name": "[^"]*"\|"loss": [0-9.]*'
  grep "^|" $OUT/b8.log; grep -h "^| mora_dist | lora" $OUT/b8_pm.log
elif [ "$1" = supp ]; then
  timeout 300 python3 $B8 --rows frozen,lora,vera --profile $OUT/prof8b.txt --json $OUT/b8.json > $OUT/b8.log 2>&1
  timeout $(left 410) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
  timeout $(left 585) python3 ${B8/--mbs 2 --accum 4/--mbs 1 --accum 8} --rows frozen,lora --json $OUT/b8_mbs1.json > $OUT/b8_mbs1.log 2>&1
  grep "^|" $OUT/b8.log; grep "^|" $OUT/b8_mbs1.log
else
  timeout 300 python3 $B8 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b8.json > $OUT/b8.log 2>&1
  timeout $(left 405) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
  timeout $(left 500) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/peft.log 2>&1
  timeout $(left 590) python3 $B1 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b1.json > $OUT/b1.log 2>&1
  grep "^|" $OUT/b8.log; grep "^|" $OUT/b1.log
fi
grep -h build_graph_diff $OUT/*.json | head -12
echo "elapsed $(( $(date +%s) - S )) s"
grep -h "^{\"method\|tokens_per_s" $OUT/liger.log $OUT/peft.log 2>/dev/null | tail -4
