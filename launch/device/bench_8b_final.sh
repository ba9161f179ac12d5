# Issue 15's table in one call on an nvidia-h200-x2 machine (repo root, wheels in .bench/, $OUT set; ~7 min):
# GPU 0: our 8B rows (4 micro-batches of 2 a step, graphed), then the 1.1B rows. GPU 1 at the same time: the
# peer, PEFT + Liger LoRA, then PEFT LoRA, both at micro-batch 2 (their best: Liger at 4 runs out of memory,
# PEFT at 4 does not fit without checkpointing), then our LoRA row again (the GPU-to-GPU spread).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
mkdir -p $OUT/g0 $OUT/g1
B8="launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --modes graph --no-peer --steps 6"
(export CUDA_VISIBLE_DEVICES=0
 timeout 300 python3 $B8 --rows frozen,lora,mora-rotation,mora-sharing,vera --json $OUT/g0/b8.json > $OUT/g0/b8.log 2>&1
 timeout $((500 - $(date +%s) + S)) python3 launch/bench.py --size 1b --seq 2048 --mbs 4 --rows frozen,lora,mora-rotation,mora-sharing \
   --modes graph --no-peer --json $OUT/g0/b1.json > $OUT/g0/b1.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 240 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/g1/liger.log 2>&1
 timeout 200 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora > $OUT/g1/peft.log 2>&1
 timeout $((500 - $(date +%s) + S)) python3 $B8 --rows lora --json $OUT/g1/b8_lora.json > $OUT/g1/b8_lora.log 2>&1) &
wait
echo "elapsed $(( $(date +%s) - S )) s"
grep "^|" $OUT/g0/b8.log; grep -h "^| mora" $OUT/g1/b8_lora.log; grep "^|" $OUT/g0/b1.log
grep -h "^{\"method" $OUT/g1/liger.log $OUT/g1/peft.log
# the device returns only a few files: GPU 1's logs travel as one archive
tar czf $OUT/g1.tgz -C $OUT g1 && rm -rf $OUT/g1
