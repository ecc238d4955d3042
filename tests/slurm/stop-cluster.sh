#!/usr/bin/env bash
# Stops the daemons start-cluster.sh started from DIR.
dir=$(realpath -m "${1:?state folder}")
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
done
exit 0
