#!/usr/bin/env bash
# Stops the one-node cluster started by ci/slurm/start.sh: each daemon by the pid in its pid file,
# the compute side first so no job is left without its controller. Configuration, accounting
# database and job history are kept, so start.sh brings the same cluster back.
set -euo pipefail

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        printf '[slurm] stopping %s (pid %s)\n' "$name" "$pid"
        kill "$pid"
        for ((i = 0; i < 60; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name (pid $pid) did not stop within 30s" >&2
            return 1
        fi
    fi
    rm -f "$pidfile"
}

stop_pidfile slurmd /run/slurm/slurmd.pid
stop_pidfile slurmctld /run/slurm/slurmctld.pid
stop_pidfile slurmdbd /run/slurm/slurmdbd.pid
# MariaDB and munge may be the machine's own services, which start.sh reuses: stop them only when
# start.sh started them.
started=/run/slurm/started_shared_daemons
if [[ -f $started ]] && grep -qx mariadbd "$started"; then
    stop_pidfile mariadbd /run/mysqld/mysqld.pid
fi
if [[ -f $started ]] && grep -qx munged "$started"; then
    stop_pidfile munged /run/munge/munged.pid
fi
rm -f "$started"
