#!/usr/bin/env bash
# A single-node Slurm cluster on localhost for the tests: munged, slurmctld and slurmd, run as root.
# Usage: start-cluster.sh DIR [CTLD_PORT SLURMD_PORT] -> DIR/slurm.conf; export SLURM_CONF=DIR/slurm.conf,
# then wait for `sinfo -h -o %T` to say idle (tests/deploy/test_slurm.py waits with a deadline).
# Everything (munge socket and key, ports, state, logs) is private to DIR, so it cannot collide
# with a cluster already on the machine.
set -euo pipefail
dir=$(realpath -m "${1:?state folder}")
ctld_port=${2:-6817}
slurmd_port=${3:-6818}
mkdir -p "$dir/state" "$dir/spool"

# munge: a key of our own, the daemon as the munge user. Its folder must be reachable by that
# user, which a private temporary folder (pytest's, say) is not, so it lives in /tmp of its own.
munge_dir=$(mktemp -d /tmp/sft-job-munge.XXXXXX)
echo "$munge_dir" > "$dir/munge-dir"
chown munge:munge "$munge_dir"
mungekey --create --keyfile="$munge_dir/munge.key" --force
chown munge:munge "$munge_dir/munge.key"
chmod 400 "$munge_dir/munge.key"
socket="$munge_dir/munge.socket"
runuser -u munge -- munged --force --socket="$socket" --key-file="$munge_dir/munge.key" \
  --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed"

cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=sftjob-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
MinJobAge=600
KillWait=30
NodeName=localhost CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -N localhost -f "$SLURM_CONF"
echo "slurm started: SLURM_CONF=$SLURM_CONF (the node is ready when sinfo says idle)"
