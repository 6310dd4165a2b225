#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the slurm profile against the real thing.
#
# Installs Debian's SLURM (slurmctld, slurmd, slurmdbd), munge and MariaDB when missing, writes a
# slurm.conf whose only node is localhost with this machine's CPUs and memory, and starts munged,
# MariaDB, slurmdbd, slurmctld and slurmd directly (containers have no systemd). Returns once
# `sinfo` shows the node idle. Running it again on a healthy cluster only checks it; a changed
# configuration restarts the daemons.
#
# Accounting goes through slurmdbd and MariaDB because snakemake's slurm executor asks `sacct` for
# the state of its jobs, and Debian 12's SLURM (22.05) has no other accounting storage that sacct
# can read (accounting_storage/none makes sacct refuse to answer).
#
# Needs root. Environment:
#   VLRETRIEVAL_SLURM_PARTITION  partition name (default: debug)
#   VLRETRIEVAL_SLURM_ACCOUNT    account the invoking user is added to (default: vlretrieval)
set -euo pipefail

PARTITION=${VLRETRIEVAL_SLURM_PARTITION:-debug}
ACCOUNT=${VLRETRIEVAL_SLURM_ACCOUNT:-vlretrieval}
CLUSTER=vlretrieval
NODE=localhost
SUBMIT_USER=${SUDO_USER:-$(id -un)}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

log() { printf '[slurm] %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "ci/slurm/start.sh needs root (it installs packages and starts system daemons)" >&2
    exit 1
fi

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "timed out after ${seconds}s waiting for ${what}" >&2
    return 1
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- packages --------------------------------------------------------------------------------
packages=(slurm-wlm slurmdbd munge mariadb-server)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # The packages' own service starts fail without systemd; we start the daemons ourselves below.
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld
chown slurm:slurm "$LOG_DIR" "$RUN_DIR" /var/spool/slurmctld
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld

# --- configuration ---------------------------------------------------------------------------
# The node line comes from slurmd itself, so it matches what slurmd reports on registration (a
# node claiming more CPUs or memory than it has is drained).
hardware=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
new_conf=$(mktemp)
new_dbd_conf=$(mktemp)
trap 'rm -f "$new_conf" "$new_dbd_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by ci/slurm/start.sh: a one-node cluster on this machine.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroup plugins: a container usually cannot delegate cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
# snakemake's slurm executor puts the rule and wildcards of a job in its comment; keeping comments
# in the accounting database lets sacct tell which rule a job ran.
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$new_dbd_conf" <<EOF
# Written by ci/slurm/start.sh. MariaDB authenticates the slurm user by its unix socket: no password.
AuthType=auth/munge
DbdHost=$NODE
SlurmUser=slurm
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF

# Never take over a real cluster's configuration.
for conf in "$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf"; do
    if [[ -e $conf ]] && ! grep -q "^# Written by ci/slurm/start.sh" "$conf"; then
        echo "$conf exists and was not written by ci/slurm/start.sh; refusing to replace it" >&2
        exit 1
    fi
done

changed=0
install_conf() {  # install_conf NEW TARGET MODE
    if ! cmp -s "$1" "$2"; then
        install -m "$3" -o slurm -g slurm "$1" "$2"
        changed=1
    fi
}
install_conf "$new_conf" "$CONF_DIR/slurm.conf" 644
install_conf "$new_dbd_conf" "$CONF_DIR/slurmdbd.conf" 600

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }

if ((changed == 0)) && pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid" \
    && pid_alive "$RUN_DIR/slurmdbd.pid" && [[ $(node_state) =~ ^(idle|mixed|allocated) ]]; then
    log "already running: $(sinfo -h -o '%P %a %D %T')"
    exit 0
fi

if ((changed)); then
    for daemon in slurmd slurmctld slurmdbd; do
        if pid_alive "$RUN_DIR/$daemon.pid"; then
            log "configuration changed: stopping $daemon to restart it"
            pid=$(cat "$RUN_DIR/$daemon.pid")
            kill "$pid"
            wait_for 30 "$daemon to stop" bash -c "! kill -0 $pid"
        fi
    done
fi

# --- munge -----------------------------------------------------------------------------------
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    # stop.sh stops only the shared daemons this script started, never the machine's own.
    mkdir -p "$RUN_DIR" && echo munged >>"$RUN_DIR/started_shared_daemons"
    wait_for 20 munged bash -c 'munge -n </dev/null | unmunge'
fi

# --- MariaDB and the accounting database -----------------------------------------------------
if ! mariadb-admin --protocol=socket ping >/dev/null 2>&1; then
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    log "starting mariadbd"
    # Only on the loopback interface: the database serves slurmdbd and nothing else.
    setsid nohup /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
        --pid-file=/run/mysqld/mysqld.pid >/var/log/slurm/mariadb.log 2>&1 </dev/null &
    wait_for 60 mariadbd mariadb-admin --protocol=socket ping
    mkdir -p "$RUN_DIR" && echo mariadbd >>"$RUN_DIR/started_shared_daemons"
fi
mariadb --protocol=socket <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# --- slurmdbd, then the cluster and account it must know before slurmctld registers ----------
if ! pid_alive "$RUN_DIR/slurmdbd.pid"; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
fi
wait_for 60 slurmdbd sacctmgr -n list cluster
if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if [[ -z $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]]; then
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="vlretrieval test jobs" organization=vlretrieval >/dev/null
fi
if [[ -z $(sacctmgr -n -P list association cluster="$CLUSTER" account="$ACCOUNT" user="$SUBMIT_USER" format=user) ]]; then
    sacctmgr -i add user "$SUBMIT_USER" account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
fi

# --- slurmctld and slurmd --------------------------------------------------------------------
if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
wait_for 60 slurmctld scontrol ping
if ! pid_alive "$RUN_DIR/slurmd.pid"; then
    log "starting slurmd"
    # The node is called localhost whatever the machine's hostname is.
    /usr/sbin/slurmd -N "$NODE"
fi

for ((i = 0; i < 120; i++)); do
    state=$(node_state)
    case $state in
        idle | mixed | allocated) break ;;
        # A node left down or drained by an earlier unclean stop is healthy again once slurmd is up.
        down* | drain* | drained*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
if [[ ! $(node_state) =~ ^(idle|mixed|allocated) ]]; then
    echo "node $NODE did not become idle (state: $(node_state)); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" >&2
    exit 1
fi
log "ready: $(sinfo -h -o '%P %a %D %T %c CPUs %m MB')"
