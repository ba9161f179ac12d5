# Megatron's DistributedOptimizer vs torch AdamW in launch/train.py (issue 16, item 5), run from the repo
# root on an nvidia-h200-x2 device machine with the megatron-core wheel in .bench/ and $OUT set.
# torchrun runs at DP=2 with the same seed, data and config: LoRA r=16 on every projection plus the
# full-rank parts train.full_rank=[embedding, output_layer, norms], 20 steps, the 1b shape (vocab 32000,
# hidden 2048) cut to 8 layers to stay within ~4 minutes (each run is cut at 100 s) (the memory the DistributedOptimizer saves is
# the full-rank parts' Adam state, which the layer count barely changes):
#   1 adamw, fp32 base         2 distributed, fp32 base, checkpoints at steps 10 and 20
#   3 distributed, resumed from run 2's step-10 checkpoint (steps 11..20 must repeat run 2's losses)
#   4 distributed, bf16 base (the configuration it is for: fp32 masters sharded; torch AdamW refuses
#     full-rank parts on a bf16 base)
#   5 distributed, fp32 base, train.cuda_graph=true (should repeat run 2's losses to float noise)
# Prints max |loss difference| run 1 vs run 2 (expected: float noise, well under 1e-3; fused vs
# megatron's torch AdamW kernels), run 3 vs run 2 (expected 0: a bit-exact resume), and each run's
# peak GPU memory on rank 0 (expected: run 2 below run 1 by about half the Adam moments of embedding
# and head, 2 x 65.5M x 8 B / 2 = 0.5 GiB). Logs: $OUT/run*.log.
# CPU dry run (no wheel, gloo, tiny shape; distributed is GPU-only, so adamw stands in for it):
#   OUT=/tmp/dc CPU_DRY_RUN=1 bash launch/device/distopt_check.sh
set -u
S=$(date +%s)
OUT=${OUT:?set OUT to an output folder}
WORK=$(mktemp -d)  # data, run folders and checkpoints: outside $OUT (only logs come back)
mkdir -p "$OUT"
if [ -z "${CPU_DRY_RUN:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/megatron*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  PY=python3
  SHAPE="model.vocab_size=32000 model.hidden_size=2048 model.num_layers=8 model.num_attention_heads=32 model.num_query_groups=4 model.ffn_hidden_size=5632"
  BATCH="data.seq_length=1024 train.micro_batch=2 train.global_batch=8"
  DIST=distributed VOCAB=32000
else
  export PYTHONPATH=$PWD OMP_NUM_THREADS=1
  PY=${PY:-python3}
  SHAPE="model.vocab_size=256 model.hidden_size=64 model.num_layers=2 model.num_attention_heads=4 model.num_query_groups=2 model.ffn_hidden_size=176"
  BATCH="data.seq_length=32 train.micro_batch=2 train.global_batch=8"
  DIST=adamw VOCAB=256
fi
export PYTHONUNBUFFERED=1
$PY -c "import sys; sys.path.insert(0, 'launch'); import bench; bench.random_tokens('$WORK/tokens', $VOCAB, 1_000_000)" \
  > "$OUT/data.log" 2>&1 || { tail "$OUT/data.log"; exit 1; }

train() {  # train NAME OPTIMIZER DTYPE [overrides...]: one torchrun run, its folder $WORK/NAME, log $OUT/NAME.log
  local name=$1 opt=$2 dtype=$3; shift 3
  timeout 100 $PY -m torch.distributed.run --standalone --nproc_per_node=2 launch/train.py \
    $SHAPE $BATCH "data.train=[{path: $WORK/tokens}]" data.eod_id=0 model.dtype=$dtype model.seed=1234 \
    adapter.method=lora adapter.r=16 "adapter.targets=[q, k, v, o, gate, up, down]" \
    "train.full_rank=[embedding, output_layer, norms]" train.full_rank_lr=1e-3 train.optimizer=$opt \
    train.steps=20 train.lr=2e-3 train.warmup=4 train.clip_grad=1.0 train.log_every=1 train.eval_every=0 \
    train.compile=false run.name=$name run.out_dir=$WORK/$name "$@" > "$OUT/$name.log" 2>&1
  echo "$name ($opt, $dtype): exit $? after $(( $(date +%s) - S ))s"
}
train run1 adamw fp32
train run2 $DIST fp32 checkpoint.dir=$WORK/ckpt checkpoint.every=10 checkpoint.keep=0
echo step_0000010 > "$WORK/ckpt/latest"  # run 3 resumes at step 10
train run3 $DIST fp32 checkpoint.dir=$WORK/ckpt checkpoint.every=10 checkpoint.keep=0
if [ -z "${CPU_DRY_RUN:-}" ]; then
  train run4 $DIST bf16
  train run5 $DIST fp32 train.cuda_graph=true
fi
$PY - "$WORK" <<'EOF'
import json, os, sys

def read(name):
    path = os.path.join(sys.argv[1], name, "metrics.jsonl")
    recs = [json.loads(x) for x in open(path) if x.strip()] if os.path.exists(path) else []
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, max((r.get("peak_mem_gib") or 0 for r in recs), default=0)

runs = {n: read(n) for n in ("run1", "run2", "run3", "run4", "run5")}
for n, (losses, mem) in runs.items():
    if losses:
        print(f"{n}: steps {min(losses)}..{max(losses)}, loss {losses[min(losses)]:.4f} -> {losses[max(losses)]:.4f}, "
              f"peak memory rank 0 {mem:.2f} GiB")
for a, b, what in (("run1", "run2", "adamw vs distributed"), ("run2", "run3", "distributed vs its resume"),
                   ("run2", "run5", "distributed eager vs cuda_graph")):
    la, lb = runs[a][0], runs[b][0]
    if not la and not lb:
        continue
    common = sorted(set(la) & set(lb))
    if common:
        print(f"max |loss difference| {what} ({a}, {b}) over steps {common[0]}..{common[-1]}: "
              f"{max(abs(la[s] - lb[s]) for s in common):.3e}")
    else:
        print(f"{what}: nothing to compare (see the logs {a}.log, {b}.log)")
if runs["run1"][0] and runs["run2"][0]:
    print(f"peak memory distributed - adamw (fp32, rank 0): {runs['run2'][1] - runs['run1'][1]:+.2f} GiB")
EOF
rm -rf "$WORK"
echo "elapsed $(( $(date +%s) - S ))s"
