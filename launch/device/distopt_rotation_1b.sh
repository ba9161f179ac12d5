# Issue 16 on an nvidia-h200-x2 machine (repo root, megatron wheel in .bench/, $OUT set): megatron's
# DistributedOptimizer check (launch/device/distopt_check.sh, logs under $OUT/distopt), then 1.1B MoRA
# rotation per-GPU scaling for the layouts SP overlap does not touch: TP=1 (reference), PP=2 (32
# micro-batches), DP=2, from one HF checkpoint (losses compared), in the time left of the call.
S=$(date +%s)
OUT=$OUT/distopt bash launch/device/distopt_check.sh > $OUT/distopt.txt 2>&1
cat $OUT/distopt.txt
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
timeout $((580 - $(date +%s) + S)) python3 launch/scaling.py --size 1b --methods mora-rotation --layouts tp1,pp2,dp2 \
  --seq 2048 --mbs 4 --global-batch 128 --steps 8 --graph --hf --timeout 100 --out $OUT/s1b > $OUT/s1b.log 2>&1
echo "elapsed $(( $(date +%s) - S )) s"
python3 -c "
import json
for r in json.load(open('$OUT/s1b/rows.json')): print({k:r.get(k) for k in ('size','config','layout','mbs','global_batch','tokens_per_s_per_gpu','efficiency','peak_gib','loss_max_abs_diff','error')})
"
rm -rf $OUT/s1b/tokens_* $OUT/s1b/hf_*; tar czf $OUT/runs.tgz -C $OUT s1b distopt && rm -rf $OUT/s1b $OUT/distopt
