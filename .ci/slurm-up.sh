#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for tests/test_slurm.py and for trying cluster=slurm
# (README.md, "A SLURM cluster on your own machine"). Idempotent: a cluster that already answers is left
# alone. Needs root and Debian's packages; without them it says why and exits 1, and the SLURM tests
# skip with that reason. The slurm.conf it writes is below (one node, CPUs=$(nproc --all): plain nproc obeys OMP_NUM_THREADS).
#
#   bash .ci/slurm-up.sh          # install if needed, start munged, slurmctld, slurmd; wait for the node
#
# Everything lives under $SLURM_TEST_DIR (default /tmp/paratrain-slurm): state, spool, logs.
set -uo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/paratrain-slurm}
NODE=$(hostname -s)

up() { scontrol ping 2>/dev/null | grep -q UP && sinfo -h -N -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }
fail() { echo "slurm-up: $*" >&2; exit 1; }

if command -v scontrol >/dev/null && up; then
    echo "slurm-up: cluster already up on $NODE"
    exit 0
fi
[ "$(id -u)" = 0 ] || fail "needs root to install and start SLURM (running as $(id -un))"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "apt-get not found: install slurmctld slurmd slurm-client munge by hand"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || fail "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || fail "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# munge: one key, the daemon run as user munge.
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || mungekey -c -k /etc/munge/munge.key || fail "mungekey -c failed"
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
if ! pgrep -u munge -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
fi

mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
cat > /etc/slurm/slurm.conf <<EOF
# Written by paratrain .ci/slurm-up.sh: a single-node cluster for tests.
ClusterName=paratrain
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Tests requeue jobs: a requeued job may start again after cred_expire s (default 120), and a
# signalled one is killed after KillWait s (default 30).
AuthInfo=cred_expire=10
KillWait=5
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$(nproc --all) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

pgrep -x slurmctld >/dev/null || slurmctld -c || fail "slurmctld did not start (see $DIR/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start (see $DIR/slurmd.log)"

for _ in $(seq 60); do
    up && { echo "slurm-up: cluster up on $NODE ($(nproc --all) CPUs)"; exit 0; }
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    sleep 1
done
fail "the node did not become idle in 60 s (see $DIR/slurmctld.log, $DIR/slurmd.log)"
