# Issue 16's 1.1B rows with SP's exchanges on the copy engines (parallel.tp_transport=auto, the default since the
# eleventh session), in one nvidia-h200-x2 call (repo root, megatron wheel in .bench/, $OUT set): 1.1B, seq 2048,
# mbs 4, gb 128 (32 micro-batches), train.cuda_graph, LoRA r=8 and MoRA rotation at TP=1, TP=2 + SP, PP=2 and
# DP=2; then a kernel + CPU profile of two 8B LoRA TP=2 + SP steps (seq 4096, mbs 4, gb 8) on the copy engines
# (the "after" of docs/performance.md's "Where the TP=2 step goes now"), after launch/device/p2p_check.py. A run
# starts only with time left.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
LIMIT=${LIMIT:-570}
# the copy-engine exchanges against NCCL's first (p2p.py was restructured after its last GPU run): if any differs,
# the rows below run over NCCL and say so
timeout 120 torchrun --nproc_per_node=2 launch/device/p2p_check.py --json $OUT/p2p_check.json > $OUT/p2p_check.txt 2>&1
P2P=$?; grep -E "^mbs|mismatch" $OUT/p2p_check.txt
SET=""; [ $P2P -ne 0 ] && { SET="--set parallel.tp_transport=nccl"; echo "p2p_check failed (rc $P2P): rows over NCCL"; }
show() { python3 -c "
import json
for r in json.load(open('$OUT/$1/rows.json')): print('$1', {k: r.get(k) for k in ('size', 'config', 'layout', 'mbs', 'tokens_per_s_per_gpu', 'efficiency', 'peak_gib', 'exited', 'error')})"; echo "  ($(( $(date +%s) - S )) s)"; }
for m in lora mora-rotation; do
  left=$(( LIMIT - 90 - $(date +%s) + S ))
  [ $left -lt 150 ] && { echo "skip 1b $m ($left s left)"; continue; }
  timeout $left python3 launch/scaling.py --size 1b --methods $m --layouts tp1,tp2sp,pp2,dp2 --seq 2048 --mbs 4 \
    --global-batch 128 --steps 6 --graph --timeout 100 --out $OUT/s1b_$m $SET > $OUT/s1b_$m.log 2>&1
  show s1b_$m
done
left=$(( LIMIT - $(date +%s) + S ))
if [ $left -gt 60 ]; then
  timeout $left python3 launch/scaling.py --size 8b --methods lora --layouts tp2sp --seq 4096 --mbs 4 --global-batch 8 \
    --steps 6 --graph --profile 5,2 --timeout $left --out $OUT/p8b $SET > $OUT/p8b.log 2>&1
  show p8b
fi
cd $OUT && rm -rf */tokens_* && tar czf runs.tgz $(ls -d s1b_* p8b 2>/dev/null | grep -v "\.log$") && rm -rf $(ls -d s1b_* p8b | grep -v "\.log$")
