# The 2-GPU scaling runs of docs/perf/2gpu_scaling.json, run from the repo root on an nvidia-h200-x2 device
# machine with the megatron-core wheel in .bench/ and $OUT set (the device runner's output folder).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
timeout 230 python3 launch/scaling.py --size 8b --methods lora --layouts tp1,tp2sp --seq 4096 --mbs 2 --global-batch 8 --steps 6 --graph --timeout 110 --out $OUT/s8b > $OUT/s8b.log 2>&1
timeout $((575 - $(date +%s) + S)) python3 launch/scaling.py --size 1b --methods lora --layouts tp1,tp2sp,dp2,pp2 --seq 2048 --mbs 4 --global-batch 64 --steps 20 --graph --hf --timeout 100 --out $OUT/s1b > $OUT/s1b.log 2>&1
echo "elapsed $(( $(date +%s) - S ))"
for d in s8b s1b; do python3 -c "
import json,sys
for r in json.load(open('$OUT/$d/rows.json')): print({k:r.get(k) for k in ('size','layout','mbs','global_batch','tokens_per_s_per_gpu','efficiency','peak_gib','loss_max_abs_diff','error')})
"; done
grep -h "rank0\]:.*Error\|Error" $OUT/s*/*.log | sort | uniq -c | head -20
