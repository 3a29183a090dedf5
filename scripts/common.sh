# Sourced by the scripts in this folder: names, version and small helpers shared by them.
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The crate version, e.g. 0.1.0 (Cargo.toml's first `version =` line is the package's).
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -n1)}
REVISION=${REVISION:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
# Static Linux binaries land in target/dist/linux-ARCH/{server,client}; images in target/images.
DIST=$ROOT/target/dist
IMAGES=$ROOT/target/images
BINARIES=(server client)
# Local image names; ghcr.io/websocket-test/{server,client} are the published ones.
local_image() { echo "localhost/websocket-test-$1"; }
# Largest image we accept (bytes): a tenth of the seed's 20 MB bound.
IMAGE_SIZE_LIMIT=${IMAGE_SIZE_LIMIT:-3000000}

# Rust target triple of a Linux architecture (Go/OCI names: amd64, arm64) and libc (musl, gnu).
rust_target() {
    case $1 in
        amd64) echo "x86_64-unknown-linux-${2:-musl}" ;;
        arm64) echo "aarch64-unknown-linux-${2:-musl}" ;;
        *) echo "unknown architecture $1" >&2; return 1 ;;
    esac
}

# The image size bound for binaries built against LIBC (scripts/build-static records it in
# target/dist/linux-ARCH/libc): 3 MB with musl (2 MB before TLS: rustls, ring's P-256 tables
# and the Mozilla roots add about 0.9 MB); a static glibc adds about 0.8 MB, so the fallback
# build gets 4 MB and a warning.
image_size_limit() {
    if [[ $(cat "$DIST/linux-$1/libc" 2>/dev/null || echo musl) == gnu ]]; then
        echo "${IMAGE_SIZE_LIMIT_GNU:-4000000}"
    else
        echo "$IMAGE_SIZE_LIMIT"
    fi
}

# The machine's own architecture in OCI terms.
host_arch() {
    case $(uname -m) in
        x86_64) echo amd64 ;;
        aarch64 | arm64) echo arm64 ;;
        *) uname -m ;;
    esac
}

# Architectures that scripts/build-static produced (both binaries present), e.g. "amd64 arm64".
built_arches() {
    local arch found=()
    for arch in amd64 arm64; do
        if [[ -x $DIST/linux-$arch/server && -x $DIST/linux-$arch/client ]]; then
            found+=("$arch")
        fi
    done
    echo "${found[*]}"
}

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
