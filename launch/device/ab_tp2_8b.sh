# A/B of the TP=2 + SP switches, in one nvidia-h200-x2 call (repo root, megatron
# wheel in .bench/, $OUT set): first GPU 0's kernel microbenches (MoRA block gradients at the 1.1B shapes, to
# refit kernels/blockdiag.grad_impl; the RoPE and SwiGLU-backward kernels against the compiled megatron code
# they replaced), then 8B LoRA r=8, seq 4096, mbs 2, gb 8, train.cuda_graph: TP=1 once, TP=2 + SP with the
# defaults and with one switch changed per run (ran in the seventh session of 2026-11-30: none beyond the spread):
#   carve8 / carve16   parallel.overlap_sm_carveout=8 / 16 (GEMMs beside SP's collectives leave SMs to NCCL)
#   lossmap            parallel.overlap_sp_loss=false (the loss through megatron's gather / reduce-scatter)
#   simple             NCCL_PROTO=Simple
# then the defaults again (the spread between two identical runs of the same call). A run starts only with
# time left; each row is one process, so compare rows of this call only.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
(CUDA_VISIBLE_DEVICES=0 timeout 60 python3 launch/bench_rotgrad.py --size 1b
 CUDA_VISIBLE_DEVICES=0 timeout 60 python3 launch/bench_rotgrad.py --size 1b --decouple
 CUDA_VISIBLE_DEVICES=0 timeout 60 python3 launch/bench_rope.py || echo "KERNEL-FAIL rope"
 CUDA_VISIBLE_DEVICES=0 timeout 100 python3 launch/bench_swiglu.py --reps 50 || echo "KERNEL-FAIL swiglu"
) > $OUT/kernels.txt 2>&1
# a kernel that failed its microbench stays out of the training runs below (so they still measure the rest)
export MORA_DIST_NO_KERNEL=$(grep -o "KERNEL-FAIL [a-z]*" $OUT/kernels.txt | cut -d" " -f2 | paste -sd,)
echo "MORA_DIST_NO_KERNEL=$MORA_DIST_NO_KERNEL"
grep -E "^ *(proj|layer|q|k)|^\|" $OUT/kernels.txt; echo "  ($(( $(date +%s) - S )) s)"
run() {  # run NAME LAYOUTS NEED_S [--set KEY=VALUE ...] ; env from the caller
  local name=$1 layouts=$2 need=$3; shift 3
  local left=$(( 575 - $(date +%s) + S ))
  if [ $left -lt $need ]; then echo "skip $name ($left s left)"; return; fi
  timeout $left python3 launch/scaling.py --size 8b --methods lora --layouts $layouts --seq 4096 --mbs 2 \
    --global-batch 8 --steps 8 --graph --timeout 100 --out $OUT/$name "$@" > $OUT/$name.log 2>&1
  python3 -c "
import json
for r in json.load(open('$OUT/$name/rows.json')): print('$name', {k: r.get(k) for k in ('layout', 'tokens_per_s_per_gpu', 'peak_gib', 'wall_s', 'exited', 'error')})"
  echo "  ($(( $(date +%s) - S )) s)"
}
run tp1 tp1 70
run base tp2sp 50
run carve8 tp2sp 50 --set parallel.overlap_sm_carveout=8
run carve16 tp2sp 50 --set parallel.overlap_sm_carveout=16
run lossmap tp2sp 50 --set parallel.overlap_sp_loss=false
NCCL_PROTO=Simple run simple tp2sp 50
run base2 tp2sp 50
cd $OUT && rm -rf */tokens_* && tar czf runs.tgz $(ls -d tp1 base carve8 carve16 lossmap simple base2 2>/dev/null) && \
  rm -rf tp1 base carve8 carve16 lossmap simple base2
