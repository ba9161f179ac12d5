# The next leads of issue 15 in one nvidia-h200-x2 call (repo root, wheels in .bench/, $OUT set; ~8 min):
# GPU 0: our 8B frozen and LoRA rows at micro-batch 4 (2 a step) and at micro-batch 2 (4 a step), graphed, then a
# kernel profile of the graphed LoRA step at micro-batch 2 (what the ~104 ms of adapter cost over frozen is now,
# and whether the RoPE / SwiGLU kernels stream at bandwidth inside the step). GPU 1 at the same time: the peer,
# PEFT + Liger LoRA at micro-batch 2 (its best), so the ratios are of one call.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
S=$(date +%s)
mkdir -p $OUT/g0 $OUT/g1
(export CUDA_VISIBLE_DEVICES=0
 timeout 200 python3 launch/bench.py --size 8b --seq 4096 --mbs 4 --accum 2 --rows frozen,lora --modes graph --no-peer \
   --steps 8 --json $OUT/g0/mbs4.json > $OUT/g0/mbs4.log 2>&1
 timeout 150 python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --rows frozen,lora --modes graph --no-peer \
   --steps 8 --json $OUT/g0/mbs2.json > $OUT/g0/mbs2.log 2>&1
 timeout $((460 - $(date +%s) + S)) python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --rows lora --modes graph \
   --no-peer --steps 4 --profile $OUT/g0/profile.txt > $OUT/g0/profile.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout 240 python3 bench/peer_peft.py --size 8b --seq 4096 --mbs 2 --methods lora --liger > $OUT/g1/liger.log 2>&1) &
wait
echo "elapsed $(( $(date +%s) - S )) s"
grep -h "^|" $OUT/g0/mbs4.log $OUT/g0/mbs2.log; grep -h "^{\"method" $OUT/g1/liger.log; head -40 $OUT/g0/profile.txt
