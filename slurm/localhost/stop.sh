#!/usr/bin/env bash
# Stop the daemons start.sh started (jobs first, munged last).
set -u
squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
for pf in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  [ -s "$pf" ] || continue
  pid=$(cat "$pf"); kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$pf"
done
