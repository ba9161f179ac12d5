# Where the time goes (issues 15, 16), on an nvidia-h200-x2 machine from the repo root, wheels in .bench/,
# $OUT set: GPU 0 the bf16 checks and kernel profiles of the 8B step (frozen, LoRA, MoRA rotation and
# sharing, 4 micro-batches of 2 a step, graphed) while GPU 1 measures the peer (PEFT LoRA, PEFT + Liger at
# micro-batch 2 and 4); then both GPUs: profiles of TP=2 + SP at 8B and of TP=1 / TP=2 + SP at 1.1B.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
mkdir -p $OUT/g0 $OUT/g1
(export CUDA_VISIBLE_DEVICES=0
 timeout 120 python3 launch/bench.py --check --size 8b > $OUT/g0/check.log 2>&1
 timeout 300 python3 launch/bench.py --size 8b --seq 4096 --mbs 2 --accum 4 --rows frozen,lora,mora-rotation,mora-sharing \
   --modes graph --no-peer --steps 6 --profile $OUT/g0/prof8b.txt --json $OUT/g0/b8.json > $OUT/g0/b8.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 for a in "2 lora" "2 lora --liger" "4 lora --liger"; do set -- $a
   timeout 140 python3 .bench/peer_peft.py --size 8b --seq 4096 --mbs $1 --methods $2 $3 2>&1 | grep "^{" >> $OUT/g1/peer.jsonl; done) &
wait
echo "single-GPU part $(( $(date +%s) - S )) s"
timeout 200 python3 launch/scaling.py --size 8b --methods lora --layouts tp2sp --seq 4096 --mbs 2 --global-batch 8 --steps 8 \
  --graph --profile 6,2 --timeout 180 --out $OUT/p8b > $OUT/p8b.log 2>&1
timeout $((560 - $(date +%s) + S)) python3 launch/scaling.py --size 1b --methods lora --layouts tp1,tp2sp --seq 2048 --mbs 4 \
  --global-batch 64 --steps 8 --graph --profile 6,2 --timeout 120 --out $OUT/p1b > $OUT/p1b.log 2>&1
echo "elapsed $(( $(date +%s) - S )) s"
tail -5 $OUT/g0/check.log; grep -v "^ *$" $OUT/g0/b8.log | tail -12; cat $OUT/g1/peer.jsonl
grep -h "GPU kernel time" $OUT/g0/prof8b.txt $OUT/p*/*/profile_rank*.txt
for d in p8b p1b; do python3 -c "
import json
for r in json.load(open('$OUT/$d/rows.json')): print({k:r.get(k) for k in ('size','layout','tokens_per_s_per_gpu','efficiency','peak_gib','error')})
"; done
tar czf $OUT/all.tgz -C $OUT g0 g1 p8b p1b p8b.log p1b.log && rm -rf $OUT/g0 $OUT/g1 $OUT/p8b $OUT/p1b
