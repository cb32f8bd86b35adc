#!/usr/bin/env bash
# Stop the daemons of slurm/start-cluster.sh, found through their pid files. Nothing else is
# touched, so it is safe in an EXIT trap (the daemons outlive the shell that started them):
#   trap 'bash slurm/stop-cluster.sh' EXIT
# Always exits 0: a daemon that is not running is already stopped.
set -u

# stop PIDFILE NAME: a pid file may be stale and its number reused, so the process must be NAME.
stop() {
  local pidfile=$1 name=$2 pid
  [[ -r $pidfile ]] || return 0
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in {1..100}; do
    kill -0 "$pid" 2>/dev/null || { echo "stopped $name ($pid)"; return 0; }
    sleep 0.1
  done
  echo "stop-cluster: $name ($pid) still running 10 s after SIGTERM; sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null
  return 0
}

# Nodes first, the services they report to after them. Each daemon takes about 2 s to shut
# down, so those that do not depend on each other stop together.
stop /run/slurmd-n1.pid slurmd &
stop /run/slurmd-n2.pid slurmd &
wait
stop /run/slurmctld.pid slurmctld
stop /run/slurmdbd.pid slurmdbd
stop /run/mysqld/mysqld.pid mariadbd &
stop /run/munge/munged.pid munged &
wait
exit 0
