#!/bin/bash
# Merge the final checkpoint of a run and export Megatron + Hugging Face checkpoints.
#   sbatch --dependency=afterok:<train job> --export=ALL,RUN_DIR=runs/x slurm/merge.sh
# Env: RUN_DIR (required), OUT (RUN_DIR/merged), PYTHON (.venv/bin/python), MERGE_TP/MERGE_PP (default:
# tp = the job's task count, pp = 1; checkpoints are layout-free), DTYPE (bf16|fp32, default: model's),
# OVERWRITE=1 to replace an existing export (refused otherwise; the export is written beside and renamed).
#SBATCH --job-name=merge
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-.venv/bin/python}
[ -n "${RUN_DIR:-}" ] || { echo "merge: RUN_DIR is not set" >&2; exit 2; }
[ -d "$RUN_DIR/ckpt" ] || { echo "merge: no checkpoints in $RUN_DIR/ckpt" >&2; exit 2; }
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))} OMP_NUM_THREADS=1
EXTRA=(--tp "${MERGE_TP:-$SLURM_NTASKS}" --pp "${MERGE_PP:-1}")
[ -n "${DTYPE:-}" ] && EXTRA+=(--dtype "$DTYPE")
[ -n "${OVERWRITE:-}" ] && EXTRA+=(--overwrite)
srun --kill-on-bad-exit=1 --export=ALL "$PYTHON" launch/merge.py --checkpoint "$RUN_DIR/ckpt" \
  --out "${OUT:-$RUN_DIR/merged}" "${EXTRA[@]}"
