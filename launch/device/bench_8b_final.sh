# Issue 15's table in one call on an nvidia-h200-x2 machine (repo root, wheels in .bench/, $OUT set; ~9 min):
# GPU 0 first the skinny-products microbench (kernels/skinny.py at a few tilings against cuBLAS's two GEMMs;
# if the default tiling loses over the four 8B layers, the model runs without it: MORA_DIST_NO_KERNEL=skinny),
# then our 8B rows (4 micro-batches of 2 a step, graphed) and the 1.1B rows; GPU 1 at the same time the peer:
# PEFT + Liger LoRA, then PEFT LoRA, both at micro-batch 2 (their best: Liger at 4 runs out of memory, PEFT at 4
# does not fit without checkpointing), then our LoRA row without the skinny kernel (the A/B in the step).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
mkdir -p $OUT/g0 $OUT/g1
(export CUDA_VISIBLE_DEVICES=0
 timeout 80 python3 launch/bench_skinny.py --reps 30 --tile 128,128,8,3 --tile 64,128,4,3 --tile 32,256,4,3 \
   --tile 64,256,8,1 > $OUT/g0/skinny.txt 2>&1
 s=$(grep "^a step saved" $OUT/g0/skinny.txt | grep -o "kernel [0-9,]* -\?[0-9.]*" | head -1 | awk '{print $3}')
 if ! python3 -c "import sys; sys.exit(0 if float('$s') > 0 else 1)" 2>/dev/null; then
   export MORA_DIST_NO_KERNEL=skinny; fi
 echo "skinny kernel saves $s ms a step; MORA_DIST_NO_KERNEL=$MORA_DIST_NO_KERNEL" > $OUT/g0/decision.txt
 timeout 300 python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --rows frozen,lora,mora-rotation,mora-sharing,vera \
   --modes graph --no-peer --steps 6 --json $OUT/g0/b8.json > $OUT/g0/b8.log 2>&1
 timeout $((540 - $(date +%s) + S)) python3 launch/bench.py --size 1b --seq 2048 --mbs 4 --rows frozen,lora,mora-rotation,mora-sharing \
   --modes graph --no-peer --json $OUT/g0/b1.json > $OUT/g0/b1.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 240 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/g1/liger.log 2>&1
 timeout 200 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/g1/peft.log 2>&1
 MORA_DIST_NO_KERNEL=skinny timeout $((540 - $(date +%s) + S)) python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 \
   --rows lora --modes graph --no-peer --steps 6 --json $OUT/g1/b8_no_skinny.json > $OUT/g1/b8_no_skinny.log 2>&1) &
wait
echo "elapsed $(( $(date +%s) - S )) s"
cat $OUT/g0/decision.txt; grep -E "^(layer|qkv|o |gate|down|a )" $OUT/g0/skinny.txt
grep "^|" $OUT/g0/b8.log; grep "^| mora" $OUT/g1/b8_no_skinny.log; grep "^|" $OUT/g0/b1.log
grep -h "^{" $OUT/g1/*.log
