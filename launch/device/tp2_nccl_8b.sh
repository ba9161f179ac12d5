# Issue 16 (and 15's block-gradient kernel), one nvidia-h200-x2 call (repo root, megatron wheel in .bench/, $OUT set).
# 1. launch/bench_rotgrad.py on GPU 0: MoRA's block-gradient kernels (v9, new; dispatched since s5-rothybrid) at the 8B shapes
#    (rotation and decouple) with the refitted token-split rule.
# 2. 8B LoRA, seq 4096, mbs 2, gb 8, train.cuda_graph: TP=1, then TP=2 + SP (SP overlapped, the default) with
#    NCCL's defaults and with settings that leave the GEMMs more of the SMs (the overlapped collectives ran
#    NCCL's LL protocol and slowed the GEMMs by ~6%: docs/performance.md "SP overlap"). Each row also says
#    whether the run exited by itself (`exited`: the CUDA-graph exit-hang fix, Trainer.close). A run starts
#    only if the call has time left for it.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
(CUDA_VISIBLE_DEVICES=0 timeout 60 python3 launch/bench_rotgrad.py; CUDA_VISIBLE_DEVICES=0 timeout 40 python3 launch/bench_rotgrad.py --decouple) > $OUT/rotgrad.txt 2>&1
echo "rotgrad ($(( $(date +%s) - S )) s)"; grep -E "^ *(proj|layer)" $OUT/rotgrad.txt
run() {  # run NAME LAYOUT NEED_S [ENV=VALUE ...]
  local name=$1 layout=$2 need=$3; shift 3
  local left=$(( 575 - $(date +%s) + S ))
  if [ $left -lt $need ]; then echo "skip $name ($left s left)"; return; fi
  env "$@" timeout $left python3 launch/scaling.py --size 8b --methods lora --layouts $layout --seq 4096 --mbs 2 \
    --global-batch 8 --steps 8 --graph --timeout $(( left - 5 )) --out $OUT/$name > $OUT/$name.log 2>&1
  python3 -c "
import json
for r in json.load(open('$OUT/$name/rows.json')): print('$name', '$*', {k: r.get(k) for k in ('layout', 'tokens_per_s_per_gpu', 'peak_gib', 'wall_s', 'exited', 'error')})"
  echo "  ($(( $(date +%s) - S )) s)"
}
run tp1 tp1 80
run default tp2sp 120
run simple tp2sp 120 NCCL_PROTO=Simple
run simple_ch8 tp2sp 110 NCCL_PROTO=Simple NCCL_MAX_NCHANNELS=8
cd $OUT && rm -rf */tokens_* && tar czf runs.tgz $(ls -d tp1 default simple simple_ch8 2>/dev/null) && rm -rf tp1 default simple simple_ch8
