#!/usr/bin/env bash
# Stops the daemons start-cluster.sh started from DIR.
dir=$(realpath -m "${1:?state folder}")
munge_dir=$(cat "$dir/munge-dir" 2>/dev/null || true)
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" ${munge_dir:+"$munge_dir/munged.pid"}; do
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
done
[ -n "$munge_dir" ] && rm -rf "$munge_dir"
exit 0
