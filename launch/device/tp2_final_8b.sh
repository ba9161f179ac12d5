# Issue 15's block-gradient microbench, then issue 16's 8B rows, in one nvidia-h200-x2 call (repo root, megatron
# wheel in .bench/, $OUT set): LoRA r=8 and MoRA rotation, seq 4096, mbs 2, gb 8, train.cuda_graph, TP=1 and
# TP=2 + SP with NCCL's defaults, then LoRA TP=2 + SP with NCCL_PROTO=Simple if time is left (fifth session:
# +1.2% in one call, 0.0% in the next). A run starts only with time left.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
# MoRA's block-gradient kernels at the 8B shapes on GPU 0 first: v9, new and the dispatched pick (`dispatch ms`)
(CUDA_VISIBLE_DEVICES=0 timeout 90 python3 launch/bench_rotgrad.py; CUDA_VISIBLE_DEVICES=0 timeout 70 python3 launch/bench_rotgrad.py --decouple) > $OUT/rotgrad.txt 2>&1
grep -E "^ *(proj|layer)" $OUT/rotgrad.txt; echo "  ($(( $(date +%s) - S )) s)"
run() {  # run NAME METHODS LAYOUTS NEED_S [ENV=VALUE ...]
  local name=$1 methods=$2 layouts=$3 need=$4; shift 4
  local left=$(( 580 - $(date +%s) + S ))
  if [ $left -lt $need ]; then echo "skip $name ($left s left)"; return; fi
  env "$@" timeout $left python3 launch/scaling.py --size 8b --methods $methods --layouts $layouts --seq 4096 --mbs 2 \
    --global-batch 8 --steps 8 --graph --timeout 110 --out $OUT/$name > $OUT/$name.log 2>&1
  python3 -c "
import json
for r in json.load(open('$OUT/$name/rows.json')): print('$name', '$*', {k: r.get(k) for k in ('config', 'layout', 'tokens_per_s_per_gpu', 'peak_gib', 'wall_s', 'exited', 'error')})"
  echo "  ($(( $(date +%s) - S )) s)"
}
run main lora,mora-rotation tp1,tp2sp 300
run simple_lora lora tp2sp 70 NCCL_PROTO=Simple
cd $OUT && rm -rf */tokens_* && tar czf runs.tgz $(ls -d main simple_lora 2>/dev/null) && rm -rf main simple_lora
