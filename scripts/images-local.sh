#!/usr/bin/env bash
# Builds the service images without a container registry (docs/deploy.md, "Images without a
# registry"): a Debian bookworm base made by debootstrap from Debian's packages and imported
# with `docker import`, then the loader, generator and embedder images from the relocatable
# dist folder (scripts/dist.sh) with deploy/docker/Dockerfile.dist, tagged as
# docker-compose.yml names them. Idempotent: an imported base is reused, and the image builds
# hit the builder's cache when the dist folder has not changed.
#
#   scripts/images-local.sh                    # base (if missing) + loader, generator, embedder
#   scripts/images-local.sh base               # only the base image
#   scripts/images-local.sh prewarmed MODEL... # + loader:<version>-prewarmed, MODELs in /models
#
# The prewarmed loader downloads at build time from $HF_ENDPOINT (default the Hugging Face
# Hub) with the build on the host's network, so a mirror on 127.0.0.1 works.
#
# Env: LLAMA_AGENT_DIST (default dist/llama-agent), LLAMA_AGENT_REGISTRY (llama-agent),
# LLAMA_AGENT_VERSION (0.1.0), LLAMA_AGENT_BASE_IMAGE (llama-agent/debian:bookworm),
# DEBIAN_MIRROR (http://deb.debian.org/debian), HF_ENDPOINT (prewarmed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DIST="${LLAMA_AGENT_DIST:-$ROOT/dist/llama-agent}"
REGISTRY="${LLAMA_AGENT_REGISTRY:-llama-agent}"
VERSION="${LLAMA_AGENT_VERSION:-0.1.0}"
BASE="${LLAMA_AGENT_BASE_IMAGE:-llama-agent/debian:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKERFILE="$ROOT/deploy/docker/Dockerfile.dist"
# The legacy builder: it needs no buildx plugin and pulls no frontend image, so it works on an
# engine that can reach no registry. Dockerfile.dist uses nothing BuildKit-only.
export DOCKER_BUILDKIT=0

log() { echo "images-local: $*" >&2; }

base_image() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        log "base $BASE already imported"
        return 0
    fi
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    fi
    local rootfs
    rootfs="$(mktemp -d /var/tmp/llama-agent-rootfs.XXXXXX)"
    # shellcheck disable=SC2064  # expand now: the folder of this call
    trap "rm -rf '$rootfs'" EXIT
    log "debootstrap bookworm (minbase) into $rootfs"
    # What the Dockerfile's runtime-0 stage adds to debian:bookworm-slim: CA certificates (hub
    # downloads over TLS), libgomp1 (llama.cpp's OpenMP), libstdc++6.
    debootstrap --variant=minbase --include=ca-certificates,libgomp1,libstdc++6 \
        bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
        tail -n 30 "$rootfs.log" >&2
        rm -f "$rootfs.log"
        return 1
    }
    rm -f "$rootfs.log"
    # The same unprivileged user and /models as the Dockerfile's runtime stage: a fresh named
    # volume mounted on /models inherits its owner, 10001.
    chroot "$rootfs" groupadd --system --gid 10001 llama
    chroot "$rootfs" useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin llama
    install -d -o 10001 -g 10001 -m 0755 "$rootfs/models"
    # The package lists and downloaded .debs are of no use at run time.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
    tar --numeric-owner -C "$rootfs" -c . \
        | docker import --change 'CMD ["/bin/bash"]' \
            --message "debootstrap --variant=minbase bookworm $MIRROR" - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "imported $BASE"
}

# build TARGET TAG [docker build args...]
build() {
    local target="$1" tag="$2"
    shift 2
    log "building $tag (target $target)"
    local out
    out="$(mktemp)"
    # Quiet unless it fails (the legacy builder also warns that it is deprecated, every time).
    if ! docker build -f "$DOCKERFILE" --build-arg "BASE=$BASE" --target "$target" -t "$tag" \
        "$@" "$DIST" >"$out" 2>&1; then
        tail -n 40 "$out" >&2
        rm -f "$out"
        return 1
    fi
    rm -f "$out"
}

service_images() {
    local bin
    for bin in llama-loader llama-generator llama-embedder llama-cli llama-health; do
        [[ -x "$DIST/bin/$bin" ]] || {
            log "$DIST/bin/$bin missing: build the dist folder first (scripts/setup.sh or scripts/dist.sh)"
            return 1
        }
    done
    local svc
    for svc in loader generator embedder; do
        build "$svc" "$REGISTRY/$svc:$VERSION"
    done
}

prewarmed() {
    (($#)) || { log "prewarmed: name at least one model"; return 1; }
    # Host network: the build's RUN reaches a hub mirror on the host's 127.0.0.1.
    build loader-prewarmed "$REGISTRY/loader:$VERSION-prewarmed" --network host \
        --build-arg "PREWARM_MODELS=$*" \
        --build-arg "HF_ENDPOINT=${HF_ENDPOINT:-https://huggingface.co}"
}

# Older builds that a rebuild untagged, and the pre-warm stage, are of no further use: removed,
# so that repeated runs (CI) do not fill the disk. Only images of Dockerfile.dist carry the label.
prune() {
    docker image prune -f --filter label=io.llama-agent.images-local=1 >/dev/null
}

case "${1:-all}" in
    base) base_image ;;
    all) base_image && service_images && prune ;;
    prewarmed) shift && base_image && service_images && prewarmed "$@" && prune ;;
    *) echo "usage: $0 [all|base|prewarmed MODEL...]" >&2; exit 2 ;;
esac
