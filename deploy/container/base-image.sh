#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3.11 for `podman build --build-arg BASE=...` on hosts
# that can reach Debian's mirror but no container registry (our CI). Elsewhere use the default
# python:3.11-slim-bookworm base and skip this.
#
#   deploy/container/base-image.sh [IMAGE]     # default localhost/kdq-base:bookworm; ~60 s, cached after
#
# The image is reused while it exists (podman image rm IMAGE to rebuild it).
set -euo pipefail
IMAGE=${1:-localhost/kdq-base:bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}
if podman image exists "$IMAGE"; then
    echo "$IMAGE exists"
    exit 0
fi
[[ $(id -u) == 0 ]] || {
    echo "base-image.sh: debootstrap needs root" >&2
    exit 1
}
command -v debootstrap >/dev/null || PATH=$PATH:/usr/sbin
# The host's own Debian mirror (deb822 sources or the classic list).
MIRROR=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
    2>/dev/null | head -1 | awk '{print $2}' || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d /var/tmp/kdq-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
# python3-venv brings ensurepip (the Dockerfile bootstraps uv with it), like python:3.11-slim has.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR" \
    >/var/tmp/kdq-debootstrap.log 2>&1 || {
    tail -20 /var/tmp/kdq-debootstrap.log >&2
    exit 1
}
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "$IMAGE built from $MIRROR"
