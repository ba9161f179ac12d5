# Issue 15's table in one call on an nvidia-h200-x2 machine (repo root, wheels in .bench/, $OUT set):
# GPU 0 the bf16 checks (with the opt-in fused MLP, parallel/mlp.py: its LoRA grad_rel_merged_vs_fp32 against
# the 0.022 of the plain path), our 8B rows (4 micro-batches of 2 a step, graphed), one more LoRA row with the
# fused MLP, and 1.1B rows; GPU 1 at the
# same time the peer: PEFT + Liger LoRA, then PEFT LoRA, both at micro-batch 2 (their best: Liger at 4 runs
# out of memory, PEFT at 4 does not fit without checkpointing).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
mkdir -p $OUT/g0 $OUT/g1
(export CUDA_VISIBLE_DEVICES=0
 MORA_DIST_FUSED_MLP=1 timeout 90 python3 launch/bench.py --check --size 8b > $OUT/g0/check.log 2>&1
 timeout 280 python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --rows frozen,lora,mora-rotation,mora-sharing,vera \
   --modes graph --no-peer --steps 6 --json $OUT/g0/b8.json > $OUT/g0/b8.log 2>&1
 MORA_DIST_FUSED_MLP=1 timeout 80 python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --rows lora \
   --modes graph --no-peer --steps 6 --json $OUT/g0/b8_fused_mlp.json > $OUT/g0/b8_fused_mlp.log 2>&1
 timeout $((440 - $(date +%s) + S)) python3 launch/bench.py --size 1b --seq 2048 --mbs 4 --rows frozen,lora,mora-rotation,mora-sharing \
   --modes graph --no-peer --json $OUT/g0/b1.json > $OUT/g0/b1.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 230 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/g1/liger.log 2>&1
 timeout $((445 - $(date +%s) + S)) python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/g1/peft.log 2>&1) &
wait
echo "elapsed $(( $(date +%s) - S )) s"
grep "^{" $OUT/g0/check.log | cut -c1-220; grep -v "^ *$" $OUT/g0/b8.log | grep "^|"; grep "^| mora" $OUT/g0/b8_fused_mlp.log; grep "^|" $OUT/g0/b1.log
grep -h "^{" $OUT/g1/*.log; tail -3 $OUT/g1/*.log | cut -c1-300
