#!/usr/bin/env bash
# Bring up a real two-node Slurm cluster on this one machine: nodes n1 and n2 are two slurmd
# daemons on this host. It backs idiff's Slurm tests and CI; it is not a production setup.
#
#   sudo bash slurm/start-cluster.sh               # Debian 12, as root; systemd is not needed
#   ACCOUNTING=0 sudo bash slurm/start-cluster.sh  # no MariaDB + slurmdbd (sacct then has no data)
#
# Safe to run again: installed packages and running daemons are kept; if the configuration it
# writes differs from the one in use, the cluster is restarted. slurm/stop-cluster.sh stops it.
set -euo pipefail

ACCOUNTING=${ACCOUNTING:-1}
CLUSTER=idiff
NODES=(n1 n2)
STATE=/var/spool/idiff-slurm   # own spool: a cluster started under another ClusterName keeps its state
LOGS=/var/log/slurm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "start-cluster: $*" >&2; exit 1; }
trap 'echo "start-cluster: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
usec() { local t=${EPOCHREALTIME//[.,]/}; echo "$t"; }
took() { local d=$(($(usec) - $1)); printf '%d.%ds' $((d / 1000000)) $((d % 1000000 / 100000)); }
alive() { [[ -r $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; }
# poll until "$@" succeeds, for at most $1 seconds
wait_for() {
  local deadline=$(($(usec) + $1 * 1000000)); shift
  until "$@" >/dev/null 2>&1; do
    (($(usec) < deadline)) || return 1
    sleep 0.2
  done
}

[[ $ACCOUNTING == [01] ]] || die "ACCOUNTING must be 0 or 1, not '$ACCOUNTING'"
((EUID == 0)) || die "run as root: it installs packages and starts system daemons"
if [[ ! -r /etc/debian_version ]] || ! command -v apt-get >/dev/null; then
  die "needs Debian with apt-get (written for Debian 12)"
fi

t_all=$(usec)
pkgs=(slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev)
if ((ACCOUNTING)); then pkgs+=(slurmdbd mariadb-server); fi
missing=()
for p in "${pkgs[@]}"; do
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
echo "TIMING apt: $(took "$t_all") (installed: ${missing[*]:-nothing new})"

# The node names must resolve: tools that take the first node of a job as the rendezvous
# address (submitit's TorchDistributedEnvironment) otherwise hang until the time limit.
grep -qE '^127\.0\.0\.1[[:space:]]+n1[[:space:]]+n2[[:space:]]*$' /etc/hosts \
  || echo '127.0.0.1 n1 n2' >>/etc/hosts

# A node configured with more CPUs or memory than its slurmd finds is drained. Both slurmds find
# the whole host, so each node gets all cores and half the memory.
cpus=$(nproc)
mem_mb=$(($(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) / 1024 / 2))

mkdir -p /etc/slurm /run/munge "$LOGS" "$STATE/ctld"
for n in "${NODES[@]}"; do mkdir -p "$STATE/$n" "/tmp/idiff-slurm-tmp/$n"; done

if ((ACCOUNTING)); then
  accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  accounting="AccountingStorageType=accounting_storage/none"
fi

slurm_conf="# Written by idiff's slurm/start-cluster.sh; edits are overwritten on its next run.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only when its old credential expires (default 120 s).
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
# Both slurmds share one /tmp; srun --mpi=pmix fails with 'File exists' unless each has its own.
TmpFS=/tmp/idiff-slurm-tmp/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
# No cgroups in a container: track processes by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$accounting
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# The scheduler runs every second, so a requeued job does not wait for the default 60 s pass.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
# Finished jobs stay visible to scontrol for 5 minutes (tests read Restarts= there).
MinJobAge=300
# Short grace between SIGTERM and SIGKILL keeps cancellations in tests quick.
KillWait=5
Waittime=0
JobRequeue=1
# slurmctld will not start with a MailProg that does not exist, and mail goes nowhere here.
MailProg=/bin/true
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"

# slurmdbd talks to MariaDB as its root user over the local socket (unix_socket authentication,
# Debian's default), so there is no database password to keep anywhere.
dbd_conf="# Written by idiff's slurm/start-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db"

# Write a config file; return 0 if its content changed.
update() {
  local file=$1 text=$2 mode=$3
  [[ -r $file && $(<"$file") == "$text" ]] && return 1
  install -m "$mode" /dev/stdin "$file" <<<"$text"
}
changed=0
update /etc/slurm/slurm.conf "$slurm_conf" 644 && changed=1
if ((ACCOUNTING)); then update /etc/slurm/slurmdbd.conf "$dbd_conf" 600 && changed=1; fi
if ((changed)) && { alive /run/slurmctld.pid || alive /run/slurmd-n1.pid || alive /run/slurmd-n2.pid \
  || alive /run/slurmdbd.pid; }; then
  echo "start-cluster: configuration changed; restarting the running cluster"
  bash "$HERE/stop-cluster.sh"
fi

t_daemons=$(usec)
munge_ok() { munge -n | unmunge; }
if ! munge_ok >/dev/null 2>&1; then
  if [[ ! -s /etc/munge/munge.key ]]; then  # Debian's postinst normally creates it
    mungekey --create --force --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge_ok || die "munged does not answer; see /var/log/munge/munged.log"
fi

if ((ACCOUNTING)); then
  db_ok() { mariadb -e 'select 1'; }
  if ! db_ok >/dev/null 2>&1; then
    install -d -o mysql -g mysql /run/mysqld
    # mariadbd stays in the foreground; setsid detaches it from this script and its terminal.
    setsid -f /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
      >>"$LOGS/mariadb.log" 2>&1
    wait_for 30 db_ok || die "MariaDB did not start; see $LOGS/mariadb.log"
  fi
  alive /run/slurmdbd.pid || /usr/sbin/slurmdbd
  wait_for 30 sacctmgr -n show cluster || die "slurmdbd does not answer; see $LOGS/slurmdbd.log"
  # slurmctld only records accounting for a cluster that slurmdbd knows
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
fi

# -i: start even if saved state cannot be read (e.g. written by another Slurm version)
alive /run/slurmctld.pid || /usr/sbin/slurmctld -i
for n in "${NODES[@]}"; do alive "/run/slurmd-$n.pid" || /usr/sbin/slurmd -N "$n"; done

# Up means responding and schedulable: a cluster already in use may be running jobs, and the
# not-responding, drained and down states carry other names or a '*' suffix.
nodes_up() {
  local listing
  listing=$(sinfo -h -N -o '%N %t' | sort -u)
  [[ $(grep -cE '^n[12] (idle|mix|alloc|comp)-?$' <<<"$listing") == 2 ]]
}
if ! wait_for 30 nodes_up; then
  sinfo -N -l >&2 || true
  die "nodes n1, n2 are not up after 30 s; see $LOGS/slurmctld.log and $LOGS/slurmd-n*.log" \
    "(a drained node: scontrol update NodeName=n1,n2 State=RESUME)"
fi

# The real test: one job step with a task on each node.
ran=$(timeout 60 srun --immediate=30 -N2 -n2 -t 1 printenv SLURMD_NODENAME | sort | tr '\n' ' ') \
  || die "a 2-node srun failed or could not start within 30 s"
[[ $ran == "n1 n2 " ]] || die "a 2-node srun ran on '$ran' instead of n1 and n2"
echo "TIMING daemons up to first 2-node srun: $(took "$t_daemons")"
echo "TIMING total: $(took "$t_all")"
sinfo
