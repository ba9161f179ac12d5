# Issue 16, next step (not yet run): 8B LoRA, seq 4096, mbs 2, gb 8, train.cuda_graph, on an nvidia-h200-x2
# (repo root, megatron wheel in .bench/, $OUT set): TP=1, then TP=2 + SP (SP overlapped, the default) with
# NCCL's defaults and with settings that leave the GEMMs more of the SMs (the overlapped collectives ran
# NCCL's LL protocol and slowed the GEMMs by ~6%: docs/performance.md "SP overlap"). Each row also says
# whether the run exited by itself (`exited`: the CUDA-graph exit-hang fix, Trainer.close).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
run() {  # run NAME LAYOUT [ENV=VALUE ...]
  local name=$1 layout=$2; shift 2
  env "$@" timeout 200 python3 launch/scaling.py --size 8b --methods lora --layouts $layout --seq 4096 --mbs 2 \
    --global-batch 8 --steps 8 --graph --timeout 190 --out $OUT/$name > $OUT/$name.log 2>&1
  python3 -c "
import json
for r in json.load(open('$OUT/$name/rows.json')): print('$name', '$*', {k: r.get(k) for k in ('layout', 'tokens_per_s_per_gpu', 'peak_gib', 'wall_s', 'exited', 'error')})"
  echo "  ($(( $(date +%s) - S )) s)"
}
run tp1 tp1
run default tp2sp
run simple tp2sp NCCL_PROTO=Simple
run simple_ch8 tp2sp NCCL_PROTO=Simple NCCL_MAX_NCHANNELS=8
rm -rf $OUT/*/tokens_*; tar czf $OUT/runs.tgz -C $OUT tp1 default simple simple_ch8 && rm -rf $OUT/tp1 $OUT/default $OUT/simple $OUT/simple_ch8
