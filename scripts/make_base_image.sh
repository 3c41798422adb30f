#!/bin/sh
# Build the local base image of TenSafe's Dockerfiles (ARG BASE) without an image registry:
# debootstrap a minimal Debian bookworm (python3 = 3.11, the Python the wheelhouse is built for), then
# `podman import` it as localhost/tensafe-base:bookworm. Run as root (debootstrap needs it).
#   scripts/make_base_image.sh [IMAGE]      default IMAGE: localhost/tensafe-base:bookworm
# Reuses the image when it exists (TENSAFE_REBUILD_BASE=1 forces a rebuild).
set -eu
IMAGE=${1:-localhost/tensafe-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${CONTAINERS_CONF:=$ROOT/deploy/podman/containers.conf}"
export CONTAINERS_CONF
if [ -z "${TENSAFE_REBUILD_BASE:-}" ] && podman image exists "$IMAGE"; then
    echo "base image $IMAGE exists"; exit 0
fi
WORK=$ROOT/build/base-rootfs
rm -rf "$WORK"; mkdir -p "$WORK"
start=$(date +%s)
# python3-venv: ensurepip's pip, for the builder stage's venv. libpq5 is not needed (psycopg[binary]).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK" "$MIRROR"
# Keep the image small: no apt lists, docs, man pages or locales beyond C.
rm -rf "$WORK"/var/lib/apt/lists/* "$WORK"/var/cache/apt/*.bin "$WORK"/var/cache/apt/archives/*.deb \
       "$WORK"/usr/share/doc/* "$WORK"/usr/share/man/* "$WORK"/usr/share/info/*
tar -C "$WORK" -c . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE"
rm -rf "$WORK"
echo "base image $IMAGE built in $(( $(date +%s) - start )) s"
podman image ls "$IMAGE"
