#!/bin/sh
# The image's entry point: `kdq` by default, any command when the first argument is one.
#   podman run IMAGE                      -> kdq --help
#   podman run IMAGE distill --preset demo -> kdq distill --preset demo
#   podman run IMAGE kdq --help | torchrun ... | bash -c ...  -> runs that command
# (TorchX's local_docker scheduler passes `bash -c "torchrun ..."` or `kdq ...` as the command.)
set -e
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ] && command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec kdq "$@"
