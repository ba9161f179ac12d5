#!/bin/bash
# Submit training and the dependent merge/export job:  slurm/submit.sh [sbatch flags for training]
# Env as for cpt_biomed.sh (CONFIG, OVERRIDES, RUN_DIR, PYTHON) and merge.sh (MERGE_TP, MERGE_PP,
# MERGE_NTASKS = their product). Prints "<train job id> <merge job id>".
set -euo pipefail
cd "$(dirname "$0")/.."
export RUN_DIR=${RUN_DIR:-runs/cpt_biomed}
train=$(sbatch --parsable --export=ALL "$@" slurm/cpt_biomed.sh)
merge=$(sbatch --parsable --dependency="afterok:${train%%;*}" --ntasks="${MERGE_NTASKS:-1}" --export=ALL slurm/merge.sh)
echo "${train%%;*} ${merge%%;*}"
