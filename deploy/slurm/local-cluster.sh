#!/usr/bin/env bash
# A real single-machine Slurm cluster to try the kdq launch kit (and what tests/test_slurm.py runs on).
#
# Slurm 22.05 from Debian: munge, MariaDB + slurmdbd (accounting: TorchX calls sacct), slurmctld and TWO
# virtual nodes (node1, node2: two slurmd on this host), all inside a loopback-only network namespace,
# because slurmctld and torchrun's rendezvous bind every address. Needs root and Debian/Ubuntu (apt).
#
#   deploy/slurm/local-cluster.sh start            # installs what is missing, starts everything (~25 s)
#   deploy/slurm/local-cluster.sh exec sinfo       # run a command inside the cluster's namespace
#   deploy/slurm/local-cluster.sh exec uv run --frozen torchx run -s slurm components.py:distill -j 2x1 ...
#   deploy/slurm/local-cluster.sh stop             # stops every daemon it started, removes the namespace
#
# State (configuration, logs, database) lives in $KDQ_SLURM_DIR (default /tmp/kdq-slurm); the namespace is
# $KDQ_SLURM_NETNS (default kdq-slurm). Nothing is written under /etc except one line in /etc/hosts
# ("127.0.0.1 node1 node2": TorchX uses the first node's name as the rendezvous host).
set -euo pipefail

STATE=${KDQ_SLURM_DIR:-/tmp/kdq-slurm}
NS=${KDQ_SLURM_NETNS:-kdq-slurm}
CLUSTER=kdq
NODES=(node1 node2)
CONF=$STATE/etc/slurm.conf
DB_SOCKET=$STATE/mysqld/mysqld.sock
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2)

log() { echo "[local-cluster] $*" >&2; }
die() {
    log "error: $*"
    exit 1
}
in_ns() { SLURM_CONF=$CONF MYSQL_UNIX_PORT=$DB_SOCKET nsenter --net="/run/netns/$NS" -- "$@"; }

# Wait up to $1 seconds for the command that follows to succeed.
wait_for() {
    local timeout=$1 start=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - start < timeout)) || return 1
        sleep 0.5
    done
}

install_packages() {
    local missing=()
    for cmd in munged slurmctld slurmd sbatch slurmdbd mariadbd ip nsenter; do
        command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    command -v apt-get >/dev/null || die "no apt-get: install ${PACKAGES[*]} by hand"
    apt-get update -qq
    # Plain slurm-wlm drags in ~20 -dev packages: name the daemons instead.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_configs() {
    mkdir -p "$STATE"/{etc,log,run,ctld} "${NODES[@]/#/$STATE/spool/}"
    local nodes_line=""
    local port=17001
    for node in "${NODES[@]}"; do
        nodes_line+="NodeName=$node NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=2 RealMemory=8000 State=UNKNOWN"$'\n'
        port=$((port + 1))
    done
    cat >"$CONF" <<EOF
# Written by deploy/slurm/local-cluster.sh: one machine, two virtual nodes, accounting through slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# Process tracking without cgroups works on any host; on a real cluster use proctrack/cgroup + task/cgroup.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Heterogeneous jobs (TorchX's multi-node jobs) start in seconds instead of ~30 s.
SchedulerParameters=bf_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
$nodes_line
PartitionName=$CLUSTER Nodes=$(
        IFS=,
        echo "${NODES[*]}"
    ) Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=kdq
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf"
}

start_namespace() {
    if [[ ! -e /run/netns/$NS ]]; then
        ip netns add "$NS"
    fi
    ip netns exec "$NS" ip link set lo up
    # A second loopback address: without it glibc will not resolve 127.0.0.1 and slurmctld loops.
    ip netns exec "$NS" ip addr add 127.0.0.2/8 dev lo 2>/dev/null || true
    grep -qE '^127\.0\.0\.1[[:space:]].*\bnode1\b' /etc/hosts || echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
}

start_munge() {
    if munge -n </dev/null >/dev/null 2>&1; then
        return 0 # already running (not ours: left alone on stop)
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged
    wait_for 10 munge -n </dev/null || die "munged did not start"
    cat /run/munge/munged.pid >"$STATE/run/munged.pid"
}

start_mariadb() {
    install -d -o mysql -g mysql "$STATE/mysqld"
    if [[ ! -d $STATE/mysqld/data/mysql ]]; then
        mariadb-install-db --user=mysql --datadir="$STATE/mysqld/data" --skip-test-db \
            >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: see $STATE/log/mariadb-install.log"
    fi
    if ! pid_alive "$STATE/mysqld/mariadb.pid"; then
        # Unix socket only: no TCP port at all.
        in_ns mariadbd --user=mysql --datadir="$STATE/mysqld/data" --socket="$DB_SOCKET" --skip-networking \
            --pid-file="$STATE/mysqld/mariadb.pid" --log-error="$STATE/log/mariadb.log" >/dev/null 2>&1 &
    fi
    wait_for 60 mariadb --socket="$DB_SOCKET" -e "select 1" || die "MariaDB did not start: see $STATE/log/mariadb.log"
    mariadb --socket="$DB_SOCKET" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'kdq';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurm() {
    if ! pid_alive "$STATE/run/slurmdbd.pid"; then
        in_ns slurmdbd
    fi
    # The first start creates the accounting schema (~10 s).
    wait_for 90 in_ns sacctmgr -n list cluster || die "slurmdbd did not start: see $STATE/log/slurmdbd.log"
    if [[ -z $(in_ns sacctmgr -n -P list cluster format=cluster where cluster=$CLUSTER) ]]; then
        in_ns sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! pid_alive "$STATE/run/slurmctld.pid"; then
        rm -f "$STATE/run/slurmctld.pid"
        in_ns slurmctld
    fi
    wait_for 30 in_ns scontrol ping || die "slurmctld did not start: see $STATE/log/slurmctld.log"
    for node in "${NODES[@]}"; do
        pid_alive "$STATE/run/slurmd-$node.pid" || in_ns slurmd -N "$node"
    done
    # Both nodes idle (or busy with jobs left from before): the cluster is ready.
    local check="sinfo -h -N -o %T | grep -cE '^(idle|mixed|allocated)' | grep -qx ${#NODES[@]}"
    wait_for 60 in_ns bash -c "$check" || {
        in_ns sinfo -N >&2 || true
        die "the nodes did not come up: see $STATE/log/slurmd-*.log"
    }
}

start() {
    [[ $(id -u) == 0 ]] || die "needs root (daemons, network namespace)"
    local t0=$SECONDS
    install_packages
    export PATH=$PATH:/usr/sbin:/sbin
    mkdir -p "$STATE/run" "$STATE/log"
    write_configs
    start_namespace
    start_munge
    start_mariadb
    start_slurm
    log "Slurm cluster '$CLUSTER' up in $((SECONDS - t0)) s (state: $STATE, namespace: $NS)"
    log "run commands in it with: $0 exec CMD...   (or: SLURM_CONF=$CONF nsenter --net=/run/netns/$NS CMD...)"
}

stop_pid() { # name pidfile
    local pidfile=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

stop() {
    for node in "${NODES[@]}"; do stop_pid "slurmd $node" "$STATE/run/slurmd-$node.pid"; done
    stop_pid slurmctld "$STATE/run/slurmctld.pid"
    stop_pid slurmdbd "$STATE/run/slurmdbd.pid"
    stop_pid mariadbd "$STATE/mysqld/mariadb.pid"
    stop_pid munged "$STATE/run/munged.pid" # only if we started it
    if [[ -e /run/netns/$NS ]]; then
        # Job steps still alive in the namespace would keep it busy: end them first.
        local pids
        pids=$(ip netns pids "$NS" 2>/dev/null || true)
        [[ -z $pids ]] || kill $pids 2>/dev/null || true
        ip netns delete "$NS"
    fi
    log "stopped"
}

status() {
    [[ -e /run/netns/$NS ]] || {
        echo "not running"
        return 1
    }
    in_ns sinfo -N
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
install) install_packages ;;
env) echo "export SLURM_CONF=$CONF" ;;
exec)
    shift
    (($# > 0)) || die "usage: $0 exec CMD [ARGS...]"
    [[ -e /run/netns/$NS ]] || die "not running: $0 start"
    SLURM_CONF=$CONF exec nsenter --net="/run/netns/$NS" -- "$@"
    ;;
*)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
