#!/usr/bin/env bash
# Starts a single-node Slurm for xtask's Slurm test: `start.sh DIR CTLD_PORT SLURMD_PORT` writes
# DIR/slurm.conf from slurm.conf.in, starts slurmctld and slurmd in the foreground mode (-D) in
# the background, writes their process ids to DIR/slurmctld.pid and DIR/slurmd.pid at once (so
# that the caller stops them even if this script fails), and waits until the node takes jobs.
# The caller stops the daemons by those ids; nothing here is left running otherwise.
set -euo pipefail
dir=$1 ctld_port=$2 slurmd_port=$3
here=$(cd "$(dirname "$0")" && pwd)
# The daemons live in /usr/sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
for cmd in slurmctld slurmd sbatch sinfo; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "start.sh: $cmd is missing: run scripts/setup (apt-get install slurmctld slurmd slurm-client)" >&2
        exit 1
    fi
done
mkdir -p "$dir/state" "$dir/spool"
sed -e "s|@DIR@|$dir|g" -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
    -e "s|@USER@|$(id -un)|g" "$here/slurm.conf.in" >"$dir/slurm.conf"
export SLURM_CONF=$dir/slurm.conf
# -i: a fresh state folder has no state to recover (and nothing of an earlier test is wanted).
slurmctld -D -i -f "$SLURM_CONF" </dev/null >"$dir/slurmctld.out" 2>&1 &
echo $! >"$dir/slurmctld.pid"
# -N: the node's name is the configured `localhost`, whatever this machine's hostname is.
slurmd -D -N localhost -f "$SLURM_CONF" </dev/null >"$dir/slurmd.out" 2>&1 &
echo $! >"$dir/slurmd.pid"
state=""
for _ in $(seq 1 60); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
        echo "start.sh: slurmctld (pid $(cat "$dir/slurmctld.pid")) and slurmd (pid $(cat "$dir/slurmd.pid")) are up" >&2
        exit 0
    fi
    for d in slurmctld slurmd; do
        if ! kill -0 "$(cat "$dir/$d.pid")" 2>/dev/null; then
            echo "start.sh: $d exited at start; its output:" >&2
            tail -n 30 "$dir/$d.out" "$dir/$d.log" >&2 2>/dev/null || true
            exit 1
        fi
    done
    sleep 0.5
done
echo "start.sh: the node did not become idle in 30 s (state: '${state:-no answer}'); the daemons' output:" >&2
tail -n 30 "$dir/slurmctld.out" "$dir/slurmd.out" "$dir/slurmctld.log" "$dir/slurmd.log" >&2 2>/dev/null || true
sinfo -R >&2 2>/dev/null || true
exit 1
