# The next leads of issue 15 in one nvidia-h200-x2 call (repo root, wheels in .bench/, $OUT set; ~8 min):
# does a larger micro-batch (4, accum 2) or a longer accumulation (mbs 2, accum 8: a CPT step of 64k tokens,
# still far below the 0.5-4M of a real global batch) shorten the adapter rows against the frozen base?
# GPU 0: our 8B frozen and LoRA rows at those two settings; GPU 1 at the same time: the peer (PEFT + Liger
# LoRA at micro-batch 2, its best), then our baseline setting (mbs 2, accum 4), so every ratio is of one call.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
S=$(date +%s)
mkdir -p $OUT/g0 $OUT/g1
(export CUDA_VISIBLE_DEVICES=0
 timeout 220 python3 launch/bench.py --size 8b --seq 4096 --mbs 4 --accum 2 --rows frozen,lora --modes graph --no-peer \
   --steps 8 --json $OUT/g0/mbs4.json > $OUT/g0/mbs4.log 2>&1
 timeout $((470 - $(date +%s) + S)) python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 8 --rows frozen,lora \
   --modes graph --no-peer --steps 5 --warm 3 --json $OUT/g0/acc8.json > $OUT/g0/acc8.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 240 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/g1/liger.log 2>&1
 timeout $((470 - $(date +%s) + S)) python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --rows frozen,lora \
   --modes graph --no-peer --steps 8 --json $OUT/g1/mbs2.json > $OUT/g1/mbs2.log 2>&1) &
wait
echo "elapsed $(( $(date +%s) - S )) s"
grep -h "^|" $OUT/g0/mbs4.log $OUT/g0/acc8.log $OUT/g1/mbs2.log; grep -h "^{\"method" $OUT/g1/liger.log
