# Issue 15, 2026-12-01 (tenth session): LoRA's g Q and g^T H in one pass over g (`kernels/dualmm.py`) on one
# H200 (repo root, wheels in .bench/, $OUT set):
#   bash launch/device/dualmm_8b.sh a   # first try (kernel everywhere): kernel table, 8B frozen + LoRA with / without it, PEFT + Liger
# then, the kernel where it wins (summed ranks <= 16), two calls one after the other:
#   bash launch/device/dualmm_8b.sh c   # kernel table, our 8B rows, LoRA without the kernel (A/B), PEFT + Liger
#   bash launch/device/dualmm_8b.sh d   # LoRA with / without again, the 1.1B rows (+ LoRA without), PEFT, bench --check
# (c was run; the profile after it showed the step's idle GPU time; d was not run.) Then, with the step's weight
# builds as one CUDA graph (`training/cuda_graph.BuildGraph`), the final table in one call:
#   bash launch/device/dualmm_8b.sh e   # 1.1B rows, our 8B rows, LoRA with eager builds (A/B), PEFT + Liger, PEFT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
left() { echo $(( $1 - $(date +%s) + S )); }
B8="launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --modes graph --no-peer --steps 6"
B1="launch/bench.py --size 1b --seq 2048 --mbs 4 --modes graph --no-peer"
if [ "$1" = a ]; then
  timeout 100 python3 launch/bench_factor_grads.py > $OUT/kernels.txt 2>&1
  timeout 40 python3 launch/bench_factor_grads.py --size 1b >> $OUT/kernels.txt 2>&1
  timeout 300 python3 $B8 --rows frozen,lora --json $OUT/b8.json > $OUT/b8.log 2>&1
  MORA_DIST_NO_KERNEL=dualmm timeout $(left 390) python3 $B8 --rows lora --json $OUT/b8_off.json > $OUT/b8_off.log 2>&1
  timeout $(left 585) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
  cat $OUT/kernels.txt; grep "^|" $OUT/b8.log; grep -h "^| lora" $OUT/b8_off.log
elif [ "$1" = c ]; then
  timeout 100 python3 launch/bench_factor_grads.py > $OUT/kernels.txt 2>&1
  timeout 300 python3 $B8 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b8.json > $OUT/b8.log 2>&1
  MORA_DIST_NO_KERNEL=dualmm timeout $(left 400) python3 $B8 --rows lora --json $OUT/b8_off.json > $OUT/b8_off.log 2>&1
  timeout $(left 585) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
  cat $OUT/kernels.txt; grep "^|" $OUT/b8.log; grep -h "^| lora" $OUT/b8_off.log
elif [ "$1" = e ]; then
  # canary: the build graph at 1.1B with accumulation (its replays checked against eager builds: build_graph_diff)
  timeout 80 python3 $B1 --accum 2 --steps 3 --rows lora,mora-rotation,mora-sharing --json $OUT/b1_acc.json > $OUT/b1_acc.log 2>&1
  EB=""  # the build graph failed there: the 8B rows without it (the table says which)
  grep -q '"error"' $OUT/b1_acc.json && EB="--eager-build"
  timeout $(left 300) python3 $B8 $EB --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b8.json > $OUT/b8.log 2>&1
  timeout $(left 355) python3 $B8 --eager-build --rows lora --json $OUT/b8_eb.json > $OUT/b8_eb.log 2>&1
  timeout $(left 460) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/liger.log 2>&1
  timeout $(left 545) python3 $B1 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b1.json > $OUT/b1.log 2>&1
  timeout $(left 590) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/peft.log 2>&1
  grep "^|" $OUT/b1_acc.log; grep "^|" $OUT/b8.log; grep -h "^| mora" $OUT/b8_eb.log; grep "^|" $OUT/b1.log
  grep -h build_graph_diff $OUT/*.json
else
  timeout 70 python3 $B8 --rows lora --json $OUT/b8_on2.json > $OUT/b8_on2.log 2>&1
  MORA_DIST_NO_KERNEL=dualmm timeout $(left 140) python3 $B8 --rows lora --json $OUT/b8_off2.json > $OUT/b8_off2.log 2>&1
  timeout $(left 260) python3 $B1 --rows frozen,lora,mora-rotation,mora-sharing --json $OUT/b1.json > $OUT/b1.log 2>&1
  MORA_DIST_NO_KERNEL=dualmm timeout $(left 300) python3 $B1 --rows lora --json $OUT/b1_off.json > $OUT/b1_off.log 2>&1
  timeout $(left 450) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/peft.log 2>&1
  timeout $(left 580) python3 launch/bench.py --check --size 8b --no-peer --json $OUT/check.json > $OUT/check.log 2>&1
  grep -h "^| lora" $OUT/b8_on2.log $OUT/b8_off2.log; grep "^|" $OUT/b1.log; grep -h "^| lora" $OUT/b1_off.log; tail -12 $OUT/check.log
fi
echo "elapsed $(( $(date +%s) - S )) s"
grep -h "^{\"method" $OUT/*.log
