# Issue 16 / 15 on an nvidia-h200-x2 machine (repo root, megatron wheel in .bench/, $OUT set):
# 8B LoRA, seq 4096, mbs 2, gb 8: TP=1 and TP=2 + SP with SP's collectives overlapped inside the merged
# GEMMs (parallel.overlap_sp, the default), then TP=2 + SP without (parallel.overlap_sp=false), both
# profiled at steps 6-7. (The 2026-11-30 call also timed a one-pass gpass kernel on GPU 1 meanwhile:
# slower than torch's GEMMs, removed; results/perf/s4_call2/gpass.json.)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
timeout 170 python3 launch/scaling.py --size 8b --methods lora --layouts tp1 --seq 4096 --mbs 2 --global-batch 8 --steps 8 \
  --graph --timeout 160 --out $OUT/ov > $OUT/tp1.log 2>&1
echo "tp1 $(( $(date +%s) - S )) s"
timeout 170 python3 launch/scaling.py --size 8b --methods lora --layouts tp2sp --seq 4096 --mbs 2 --global-batch 8 --steps 8 \
  --graph --profile 6,2 --timeout 160 --out $OUT/ov_on > $OUT/on.log 2>&1
echo "on $(( $(date +%s) - S )) s"
timeout $((585 - $(date +%s) + S)) python3 launch/scaling.py --size 8b --methods lora --layouts tp2sp --seq 4096 --mbs 2 --global-batch 8 \
  --steps 8 --graph --profile 6,2 --timeout 160 --set parallel.overlap_sp=false --out $OUT/ov_off > $OUT/off.log 2>&1
echo "elapsed $(( $(date +%s) - S )) s"
for d in ov ov_on ov_off; do python3 -c "
import json
for r in json.load(open('$OUT/$d/rows.json')): print('$d', {k:r.get(k) for k in ('size','config','layout','mbs','tokens_per_s_per_gpu','peak_gib','error')})
"; done
grep -h "GPU kernel time" $OUT/ov_*/*/profile_rank0.txt
rm -rf $OUT/*/tokens_*; tar czf $OUT/runs.tgz -C $OUT ov ov_on ov_off && rm -rf $OUT/ov $OUT/ov_on $OUT/ov_off
