#!/bin/bash
# Tokenize a corpus on a Ray cluster spanning the allocation: Ray head on the first node, one Ray
# worker per other node (srun), the pipeline driver here with --address, Ray stopped at the end.
#   sbatch --nodes=4 --cpus-per-task=64 slurm/tokenize.sh --input 'data/pubmed/*.jsonl.gz' \
#          --tokenizer tok/llama.model --output-prefix data/pubmed_text_document [--dedup ...]
# Arguments are passed to `python -m data_pipeline.tokenize` unchanged. --workers defaults to all
# allocated CPUs minus one (for the driver). Re-submitting the same command resumes a killed run.
# Env: PYTHON (.venv/bin/python)  RAY (ray next to PYTHON)  RAY_PORT (derived from the job id)
#      RAY_AUTH_MODE (token)  RAY_AUTH_TOKEN (default: `ray get-auth-token --generate`, ~/.ray/auth_token).
# Inputs, tokenizer and output must be on a filesystem every node sees (or a pyarrow URI for inputs).
#SBATCH --job-name=tokenize
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-.venv/bin/python}
RAY=${RAY:-$(dirname "$PYTHON")/ray}
[ "$#" -gt 0 ] || { echo "tokenize.sh: pass data_pipeline.tokenize arguments (--input ... --tokenizer ... --output-prefix ...)" >&2; exit 2; }
[ -x "$PYTHON" ] || { echo "tokenize.sh: python not found: $PYTHON (set PYTHON=...)" >&2; exit 2; }
[ -x "$RAY" ] || { echo "tokenize.sh: ray executable not found: $RAY (set RAY=...)" >&2; exit 2; }

# Ray token auth: one token for the head, workers and driver, handed to every srun step via the env.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  RAY_AUTH_TOKEN=$("$RAY" get-auth-token --generate 2>/dev/null | tail -n 1)
  [ -n "$RAY_AUTH_TOKEN" ] || { echo "tokenize.sh: could not get a Ray auth token" >&2; exit 1; }
  export RAY_AUTH_TOKEN
fi

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
PORT=${RAY_PORT:-$((30000 + SLURM_JOB_ID % 20000))}
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname -I | awk '{print $1}')
ADDRESS="$HEAD_IP:$PORT"
echo "tokenize.sh: job $SLURM_JOB_ID, ${#NODES[@]} node(s) x $CPUS CPUs, Ray head $ADDRESS"

# This job's Ray only: its own temp dir on the head and, once up, its session name, which every Ray
# process of the cluster (on every node) carries in its command line. Stopping kills exactly those:
# `ray stop` would kill every Ray on the node, another user's or job's too.
RAY_TMP=${RAY_TMP:-/tmp/ray_job${SLURM_JOB_ID}}
SESSION=
PIDS=()
stop_ray() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  if [ -n "$SESSION" ]; then  # "[s]ession..." matches the session but not this pkill's own command line
    local pat="[${SESSION:0:1}]${SESSION:1}"
    for sig in TERM KILL; do
      srun --overlap --nodes="${#NODES[@]}" --ntasks-per-node=1 pkill -"$sig" -f -- "$pat" >/dev/null 2>&1
      [ "$sig" = TERM ] && sleep 3
    done
  fi
  wait 2>/dev/null
}
trap 'stop_ray; exit 143' TERM INT

srun --nodes=1 --ntasks=1 -w "$HEAD" "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$PORT" \
  --num-cpus="$CPUS" --include-dashboard=false --disable-usage-stats --temp-dir="$RAY_TMP" --block &
PIDS+=($!)
alive() {  # number of alive Ray nodes, 0 while the head does not answer
  "$PYTHON" -c 'import ray,sys; ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(n["Alive"] for n in ray.nodes()))' "$ADDRESS" 2>/dev/null | tail -1
}
for _ in $(seq 120); do [ "$(alive)" -ge 1 ] 2>/dev/null && break; sleep 2; done
SESSION=$(srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" readlink "$RAY_TMP/session_latest" 2>/dev/null | xargs -r basename)
[ "$(alive)" -ge 1 ] 2>/dev/null || { echo "tokenize.sh: Ray head did not come up at $ADDRESS" >&2; stop_ray; exit 1; }
echo "tokenize.sh: Ray session ${SESSION:-unknown} (stopped at the end by that name)"
for n in "${NODES[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$n" "$RAY" start --address="$ADDRESS" --num-cpus="$CPUS" --disable-usage-stats --block &
  PIDS+=($!)
done
for _ in $(seq 120); do [ "$(alive)" -ge "${#NODES[@]}" ] 2>/dev/null && break; sleep 2; done
echo "tokenize.sh: $(alive) of ${#NODES[@]} Ray node(s) up"

WORKERS=()
[[ " $* " == *" --workers "* || " $* " == *" --workers="* ]] || WORKERS=(--workers $((CPUS * ${#NODES[@]} - 1 > 0 ? CPUS * ${#NODES[@]} - 1 : 1)))
"$PYTHON" -m data_pipeline.tokenize --address "$ADDRESS" "${WORKERS[@]}" "$@"
RC=$?
stop_ray
echo "tokenize.sh: exit $RC"
exit "$RC"
