# Issue 16 on an nvidia-h200-x2 machine (repo root, megatron wheel in .bench/, $OUT set): NCCL settings for
# SP's all-gather / reduce-scatter (launch/nccl_probe.py, eager and graphed), the fastest exported for the
# runs; then 8B TP=1 vs TP=2 + SP (profiled, steps 6-7) and 1.1B TP=1 / TP=2 + SP / PP=2 at 32 micro-batches.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
S=$(date +%s)
for v in "NCCL_DEBUG=WARN" "NCCL_PROTO=Simple" "NCCL_MIN_NCHANNELS=32" "NCCL_PROTO=Simple NCCL_MIN_NCHANNELS=32"; do
  env $v timeout 60 python3 -m torch.distributed.run --nproc_per_node=2 launch/nccl_probe.py --shape "8192,4096;8192,2048" 2>/dev/null | grep '^{' >> $OUT/nccl.jsonl
done
BEST=$(python3 -c "
import json
rows=[json.loads(l) for l in open('$OUT/nccl.jsonl')]
t=lambda r: sum(v for k,v in r['8192,4096'].items() if k.endswith('graph_us'))
for r in rows: print(r['env'], r['8192,4096'], file=__import__('sys').stderr)
b=min(rows, key=t); print(' '.join(f'{k}={v}' for k,v in b['env'].items() if k!='NCCL_NVLS_ENABLE'))")
echo "nccl probe $(( $(date +%s) - S )) s; chosen: $BEST"
export $BEST
timeout 250 python3 launch/scaling.py --size 8b --methods lora --layouts tp1,tp2sp --seq 4096 --mbs 2 --global-batch 8 --steps 8 \
  --graph --profile 6,2 --timeout 150 --out $OUT/s8b > $OUT/s8b.log 2>&1
timeout $((570 - $(date +%s) + S)) python3 launch/scaling.py --size 1b --methods lora --layouts tp1,tp2sp,pp2 --seq 2048 --mbs 4 \
  --global-batch 128 --steps 8 --graph --profile 6,2 --timeout 90 --out $OUT/s1b > $OUT/s1b.log 2>&1
echo "elapsed $(( $(date +%s) - S )) s"
grep -h "GPU kernel time" $OUT/s*/*/profile_rank*.txt
for d in s8b s1b; do python3 -c "
import json
for r in json.load(open('$OUT/$d/rows.json')): print({k:r.get(k) for k in ('size','layout','mbs','global_batch','tokens_per_s_per_gpu','efficiency','peak_gib','error')})
"; done
rm -rf $OUT/s*/tokens_* ; tar czf $OUT/runs.tgz -C $OUT s8b s1b && rm -rf $OUT/s8b $OUT/s1b
