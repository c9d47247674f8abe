#!/usr/bin/env bash
# A Docker-compatible API socket served by podman, for `torchx run -s local_docker` (and docker-py, the
# docker CLI) on hosts without a Docker daemon. The service and the containers' bridge network live in
# their own loopback-only network namespace; clients reach it through the unix socket. Needs root.
#
#   eval "$(deploy/container/docker-socket.sh start)"   # prints: export DOCKER_HOST=unix:///run/kdq-podman.sock
#   deploy/container/docker-socket.sh stop
#
# $KDQ_PODMAN_SOCKET (default /run/kdq-podman.sock) and $KDQ_PODMAN_NETNS (default kdq-podman) choose the
# socket and the namespace; $CONTAINERS_CONF defaults to deploy/container/containers.conf.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SOCKET=${KDQ_PODMAN_SOCKET:-/run/kdq-podman.sock}
NS=${KDQ_PODMAN_NETNS:-kdq-podman}
PIDFILE=${SOCKET%.sock}.pid
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

start() {
    [[ $(id -u) == 0 ]] || {
        echo "docker-socket.sh: needs root" >&2
        exit 1
    }
    if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "export DOCKER_HOST=unix://$SOCKET"
        return 0
    fi
    [[ -e /run/netns/$NS ]] || ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    ip netns exec "$NS" ip addr add 127.0.0.2/8 dev lo 2>/dev/null || true
    rm -f "$SOCKET"
    nsenter --net="/run/netns/$NS" -- podman system service --time=0 "unix://$SOCKET" \
        >"${SOCKET%.sock}.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 300); do
        [[ -S $SOCKET ]] && break
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || {
            cat "${SOCKET%.sock}.log" >&2
            exit 1
        }
        sleep 0.2
    done
    [[ -S $SOCKET ]] || {
        echo "docker-socket.sh: no socket after 60 s" >&2
        exit 1
    }
    echo "export DOCKER_HOST=unix://$SOCKET"
}

stop() {
    if [[ -f $PIDFILE ]]; then
        local pid
        pid=$(cat "$PIDFILE")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$PIDFILE"
    fi
    rm -f "$SOCKET"
    if [[ -e /run/netns/$NS ]]; then
        local pids
        pids=$(ip netns pids "$NS" 2>/dev/null || true)
        [[ -z $pids ]] || kill $pids 2>/dev/null || true
        ip netns delete "$NS"
    fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
