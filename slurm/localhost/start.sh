#!/usr/bin/env bash
# Install (if missing) and start a single-node Slurm cluster on localhost, as root, without systemd.
# Idempotent: returns at once when the node already answers idle. Env: FAKE_GPUS (default 2).
set -euo pipefail
DIR=$(cd "$(dirname "$0")" && pwd)
if sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then exit 0; fi
if ! command -v slurmctld >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
H=$(hostname -s); CPUS=$(nproc); MEM=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
NGPU=${FAKE_GPUS:-2}; LAST=$((NGPU - 1))
sub=(-e "s/@HOST@/$H/g" -e "s/@CPUS@/$CPUS/g" -e "s/@MEM@/$MEM/g" -e "s/@NGPU@/$NGPU/g" -e "s/@LASTGPU@/$LAST/g")
install -d -m 755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
sed "${sub[@]}" "$DIR/slurm.conf.in" > /etc/slurm/slurm.conf
sed "${sub[@]}" "$DIR/gres.conf.in" > /etc/slurm/gres.conf
for g in $(seq 0 "$LAST"); do  # slurmd accepts only character devices as GPU files
  [ -c /var/spool/slurmd/fakegpu$g ] || { rm -f /var/spool/slurmd/fakegpu$g; mknod -m 666 /var/spool/slurmd/fakegpu$g c 1 3; }
done
rm -rf /var/spool/slurmctld/*
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 120); do
  st=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
  [ "$st" = idle ] && exit 0
  sleep 0.25
done
echo "slurm node not idle: ${st:-none}" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
