# Issue 16 on an nvidia-h200-x2 machine (repo root, megatron wheel in .bench/, $OUT set): 8B (seq 4096,
# mbs 2, global batch 8, train.cuda_graph) per-GPU tokens/s of LoRA r=8 and MoRA rotation at
# TP=1 (phase "tp1", GPU 0 only) and TP=2 + SP (phase "tp2sp", both GPUs; SP overlapped, the default):
#   bash launch/device/tp2_rows_8b.sh tp1; bash launch/device/tp2_rows_8b.sh tp2sp
# Rows: $OUT/s8b_<phase>/rows.json (ratios: tp2sp over tp1 of the same method, same call).
P=${1:?phase: tp1 or tp2sp}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
timeout 330 python3 launch/scaling.py --size 8b --methods lora,mora-rotation --layouts $P --seq 4096 --mbs 2 --global-batch 8 \
  --steps 8 --graph --timeout 160 --out $OUT/s8b_$P > $OUT/s8b_$P.log 2>&1
echo "$P $(( $(date +%s) - S )) s"
python3 -c "
import json
for r in json.load(open('$OUT/s8b_$P/rows.json')): print({k:r.get(k) for k in ('size','config','layout','mbs','tokens_per_s_per_gpu','peak_gib','error')})
"
rm -rf $OUT/s8b_$P/tokens_*; tar czf $OUT/s8b_$P.tgz -C $OUT s8b_$P && rm -rf $OUT/s8b_$P
