#!/bin/bash
# Continual pretraining on a biomedical corpus: MoRA on all canonical projections of a Llama model.
#   sbatch slurm/cpt_biomed.sh                      (defaults below: 2 nodes x 8 GPUs)
#   sbatch --nodes=1 --ntasks-per-node=2 --gres=gpu:0 --export=ALL,CONFIG=configs/tiny_cpu.yaml,\
#          OVERRIDES="parallel.tp=2 ..." slurm/cpt_biomed.sh
# Every size is an sbatch flag (nodes, tasks, time) or an environment variable:
#   CONFIG (configs/cpt_biomed.yaml)  OVERRIDES (dotted config overrides)  RUN_DIR (runs/$SLURM_JOB_NAME)
#   PYTHON (.venv/bin/python)  MASTER_PORT (derived from the job id)
# One task per GPU via srun; ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. Pre-emption:
# Slurm sends USR1 `grace` seconds before the time limit (or `scancel --signal=USR1 --batch`); this
# script forwards it to the ranks, which finish the step, save a checkpoint and exit; the job then
# requeues itself and the requeued run resumes from RUN_DIR/ckpt/latest.
#SBATCH --job-name=cpt_biomed
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG=${CONFIG:-configs/cpt_biomed.yaml}
PYTHON=${PYTHON:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-cpt_biomed}}
read -r -a OVR <<< "${OVERRIDES:-}"
[ -f "$CONFIG" ] || { echo "cpt_biomed: config file not found: $CONFIG" >&2; exit 2; }
[ -x "$PYTHON" ] || { echo "cpt_biomed: python not found: $PYTHON (set PYTHON=...)" >&2; exit 2; }

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ARGS=(--config "$CONFIG" "run.out_dir=$RUN_DIR" "checkpoint.dir=$RUN_DIR/ckpt" "${OVR[@]}")
echo "cpt_biomed: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT"

# Validate once, before any rank starts (world size vs TP*PP, data paths, keys).
WORLD_SIZE=$SLURM_NTASKS "$PYTHON" -c 'import sys; from mora_dist.training.config import load_config, ConfigError
try: load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e: sys.exit(f"cpt_biomed: config error: {e}")' "$CONFIG" "${ARGS[@]:2}" || exit 2

PREEMPTED=0
forward() { PREEMPTED=1; echo "cpt_biomed: USR1 received, checkpointing"; kill -USR1 "$SRUN_PID" 2>/dev/null; }
trap forward USR1
srun --kill-on-bad-exit=1 --export=ALL "$PYTHON" launch/train.py "${ARGS[@]}" &
SRUN_PID=$!
while :; do  # wait returns early when a trapped signal arrives; keep waiting for srun itself
  wait "$SRUN_PID"; RC=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [ "$PREEMPTED" = 1 ] && [ "$RC" = 0 ]; then
  echo "cpt_biomed: checkpoint saved, requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$RC"
