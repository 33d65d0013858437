#!/usr/bin/env bash
# Build the securevol managed (v2) Docker plugin and register it with `docker plugin create`.
#
# A managed plugin is a directory holding config.json and rootfs/. This script
# builds rootfs/ in one of two ways:
#   --from dockerfile   `docker build` from the Dockerfile, then `docker export`.
#                       Needs a registry that serves the base image.
#   --from debootstrap  a Debian rootfs made locally with debootstrap (cached),
#                       plus wheels built on this host and installed offline in
#                       a chroot. Needs only Debian's package mirror and PyPI.
# The docker CLI talks to whatever DOCKER_HOST names.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SOURCE=$REPO

NAME=securevol
FROM=dockerfile
BUILD_DIR=$REPO/build/plugin
CACHE_DIR=$REPO/build/cache
CREATE=1
REGISTRY=docker.io/
BASE_IMAGE=library/debian:bookworm-slim
SUITE=bookworm
MIRROR=${SECUREVOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PIP=${PIP:-$REPO/.venv/bin/pip}

# Packages of the plugin's rootfs. python3-venv brings ensurepip, so the
# chroot can make a virtualenv without network access.
ROOTFS_PACKAGES=python3,python3-venv,fuse3,ca-certificates

# The venv path inside the plugin. config.json's entrypoint names it too.
VENV=/opt/securevol

usage() {
    cat <<EOF
Usage: $0 [options]

Build the securevol managed plugin and create it in the Docker daemon named by DOCKER_HOST.

  --name NAME          plugin name given to 'docker plugin create' (default: $NAME)
  --from METHOD        how to build the rootfs: dockerfile or debootstrap (default: $FROM)
  --build-dir DIR      where the plugin directory (config.json, rootfs/) is made (default: $BUILD_DIR)
  --cache-dir DIR      where the debootstrap base rootfs is cached (default: $CACHE_DIR)
  --source DIR         securevol source tree to install (default: $SOURCE)
  --no-create          only prepare the plugin directory; do not call 'docker plugin create'
  --registry PREFIX    registry prefix of the base image, with trailing slash (dockerfile; default: $REGISTRY)
  --base-image IMAGE   base image without registry (dockerfile; default: $BASE_IMAGE)
  --mirror URL         Debian mirror for debootstrap (default: $MIRROR)
  -h, --help           show this help
EOF
}

die() {
    echo "build-plugin: $*" >&2
    exit 1
}

step() {
    echo "==> $*"
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --name) NAME=$2; shift 2 ;;
            --from) FROM=$2; shift 2 ;;
            --build-dir) BUILD_DIR=$2; shift 2 ;;
            --cache-dir) CACHE_DIR=$2; shift 2 ;;
            --source) SOURCE=$(realpath "$2"); shift 2 ;;
            --no-create) CREATE=0; shift ;;
            --registry) REGISTRY=$2; shift 2 ;;
            --base-image) BASE_IMAGE=$2; shift 2 ;;
            --mirror) MIRROR=$2; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument '$1'" ;;
        esac
    done

    case "$FROM" in
        dockerfile|debootstrap) ;;
        *) die "--from must be 'dockerfile' or 'debootstrap', not '$FROM'" ;;
    esac
}

# The debootstrap base rootfs is cached because it takes tens of seconds and
# about 280 MB of downloads. The stamp file records the suite and package
# list, so a change of either rebuilds it. A run that died half way left no
# stamp, so the next run starts again.
base_rootfs() {
    local base=$CACHE_DIR/debootstrap-$SUITE
    local stamp=$base.stamp
    local want="$SUITE $ROOTFS_PACKAGES"

    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/debootstrap.lock"
    flock 9

    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        echo "$base"
        return
    fi

    step "debootstrap $SUITE into $base (cached for later builds)" >&2
    rm -rf "$base" "$stamp"
    debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" "$SUITE" "$base" "$MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1 \
        || die "debootstrap failed; its output is in $CACHE_DIR/debootstrap.log"
    echo "$want" >"$stamp"
    echo "$base"
}

# Build wheels of securevol and every dependency on this host, so that
# pyfuse3 compiles against the host's libfuse3-dev and the chroot needs no
# compiler and no network.
build_wheels() {
    local wheels=$1

    step "build wheels of securevol and its dependencies"
    rm -rf "$wheels"
    mkdir -p "$wheels"
    "$PIP" wheel --quiet --wheel-dir "$wheels" "$SOURCE[transit]"
}

rootfs_from_debootstrap() {
    local rootfs=$1
    local base wheels

    base=$(base_rootfs)
    wheels=$BUILD_DIR/wheels
    build_wheels "$wheels"

    step "copy the base rootfs"
    cp -a "$base" "$rootfs"

    step "install securevol into $VENV inside the rootfs"
    mkdir -p "$rootfs/tmp/securevol-wheels"
    cp "$wheels"/*.whl "$rootfs/tmp/securevol-wheels/"
    # env -i keeps the host's pip settings (index URLs, find-links) out of the chroot.
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$rootfs" python3 -m venv "$VENV"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$rootfs" "$VENV/bin/pip" install --quiet \
        --no-index --no-cache-dir --disable-pip-version-check \
        --find-links /tmp/securevol-wheels "securevol[transit]"
    rm -rf "$rootfs/tmp/securevol-wheels"

    # Package caches and docs are dead weight in a plugin rootfs.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
}

rootfs_from_dockerfile() {
    local rootfs=$1
    local image=securevol-plugin-rootfs:$$
    local container

    step "docker build the rootfs image from $REGISTRY$BASE_IMAGE"
    docker build --tag "$image" \
        --build-arg "REGISTRY=$REGISTRY" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --file "$SOURCE/Dockerfile" "$SOURCE"

    step "export the image into the rootfs"
    container=$(docker create "$image" true)
    mkdir -p "$rootfs"
    docker export "$container" | tar -x -C "$rootfs"
    docker rm "$container" >/dev/null
    docker rmi "$image" >/dev/null
}

# Record what went into the rootfs, so an operator can tell which build a plugin runs.
write_build_stamp() {
    local version commit

    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$SOURCE/pyproject.toml")
    commit=$(git -C "$SOURCE" rev-parse --short HEAD 2>/dev/null || echo unknown)
    printf 'securevol %s commit %s built %s from %s\n' \
        "$version" "$commit" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$FROM" >"$1"
}

main() {
    parse_args "$@"
    [ "$(id -u)" -eq 0 ] || die "run as root: debootstrap, chroot and 'docker plugin create' need it"

    local plugin_dir=$BUILD_DIR/plugin
    rm -rf "$plugin_dir"
    mkdir -p "$plugin_dir"

    "rootfs_from_$FROM" "$plugin_dir/rootfs"
    write_build_stamp "$plugin_dir/rootfs/etc/securevol-build"
    cp "$SOURCE/config.json" "$plugin_dir/config.json"

    if [ "$CREATE" -eq 0 ]; then
        step "plugin directory ready: $plugin_dir"
        return
    fi

    step "docker plugin create $NAME"
    docker plugin create "$NAME" "$plugin_dir"
    # The unpacked rootfs is now a copy inside the daemon's data root.
    rm -rf "$plugin_dir"
    step "created plugin $NAME; configure it with 'docker plugin set', then 'docker plugin enable $NAME'"
}

main "$@"
