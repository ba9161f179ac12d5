# Issue 16 on an nvidia-h200-x2 machine (repo root, megatron wheel in .bench/, $OUT set): 1.1B (seq 2048,
# mbs 4, global batch 128 = 32 micro-batches, train.cuda_graph) per-GPU tokens/s of LoRA r=8 and MoRA
# rotation at TP=1 and TP=2 + SP (SP overlapped, the default; MoRA's row-parallel shards merged).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
timeout ${BUDGET:-330} python3 launch/scaling.py --size 1b --methods lora,mora-rotation --layouts tp1,tp2sp --seq 2048 --mbs 4 \
  --global-batch 128 --steps 8 --graph --timeout 100 --out $OUT/s1b > $OUT/s1b.log 2>&1
echo "elapsed $(( $(date +%s) - S )) s"
python3 -c "
import json
for r in json.load(open('$OUT/s1b/rows.json')): print({k:r.get(k) for k in ('size','config','layout','mbs','tokens_per_s_per_gpu','efficiency','peak_gib','error')})
"
rm -rf $OUT/s1b/tokens_*; tar czf $OUT/s1b.tgz -C $OUT s1b && rm -rf $OUT/s1b
