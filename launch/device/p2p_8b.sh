# Issue 16: the copy-engine transport (parallel.tp_transport=copy_engine, parallel/p2p.py) against NCCL's, in one
# nvidia-h200-x2 call (repo root, megatron wheel in .bench/, $OUT set): first launch/device/p2p_check.py (every SP
# exchange bit-equal between the transports, eager and graphed, and timed per layer at the 8B shapes), then 8B
# rows (seq 4096, mbs 4, gb 8, train.cuda_graph): TP=1, TP=2 + SP with NCCL, TP=2 + SP on the copy engines,
# for LoRA r=8 and then MoRA rotation. A run starts only with time left; compare rows of this call only.
# ONLY_CE=1: the copy-engine rows alone (eleventh session's call 2, on the machine call 1 had held warm).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
LIMIT=${LIMIT:-570}
[ -z "$ONLY_CE" ] && timeout 150 torchrun --nproc_per_node=2 launch/device/p2p_check.py --json $OUT/p2p_check.json > $OUT/p2p_check.txt 2>&1
echo "p2p_check rc $?"; grep -E "^mbs|mismatch|Error|error" $OUT/p2p_check.txt | head -30; echo "  ($(( $(date +%s) - S )) s)"
run() {  # run NAME METHOD LAYOUTS NEED_S [--set KEY=VALUE ...]
  local name=$1 method=$2 layouts=$3 need=$4; shift 4
  local left=$(( LIMIT - $(date +%s) + S ))
  if [ $left -lt $need ]; then echo "skip $name ($left s left)"; return; fi
  timeout $left python3 launch/scaling.py --size 8b --methods $method --layouts $layouts --seq 4096 --mbs 4 \
    --global-batch 8 --steps 8 --graph --timeout 100 --out $OUT/$name "$@" > $OUT/$name.log 2>&1
  python3 -c "
import json
for r in json.load(open('$OUT/$name/rows.json')): print('$name', {k: r.get(k) for k in ('config', 'layout', 'tokens_per_s_per_gpu', 'peak_gib', 'wall_s', 'exited', 'error')})"
  echo "  ($(( $(date +%s) - S )) s)"
}
[ -z "$ONLY_CE" ] && run lora_nccl lora tp1,tp2sp 100 --set parallel.tp_transport=nccl
run lora_ce lora tp2sp 50 --set parallel.tp_transport=copy_engine
[ -z "$ONLY_CE" ] && run rot_nccl mora-rotation tp1,tp2sp 100 --set parallel.tp_transport=nccl
run rot_ce mora-rotation tp2sp 50 --set parallel.tp_transport=copy_engine
run lora_ce2 lora tp2sp 50 --set parallel.tp_transport=copy_engine
cd $OUT && rm -rf */tokens_* && tar czf runs.tgz $(ls -d lora_* rot_* 2>/dev/null) && rm -rf $(ls -d lora_* rot_* | grep -v log)
