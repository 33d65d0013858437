#!/usr/bin/env bash
# Build a PostgreSQL image from Debian's packages, for machines that cannot pull postgres:16.
#
# The image behaves like the official postgres image as far as compose.yaml
# needs: PGDATA=/var/lib/postgresql/data, initialised on first start with
# POSTGRES_PASSWORD for the postgres user, the server running as the postgres
# user, and any command other than "postgres" run as it is.
#
#   examples/postgres/build-local-image.sh [--tag TAG] [--cache-dir DIR]
#   PG_IMAGE=TAG docker compose -f examples/postgres/compose.yaml up -d --wait db
#
# The docker CLI talks to whatever DOCKER_HOST names. The rootfs is made with
# debootstrap and cached, because that takes a minute and 300 MB of downloads.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

TAG=securevol-example/postgres:15
CACHE_DIR=$REPO/build/cache
SUITE=bookworm
PG_MAJOR=15
MIRROR=${SECUREVOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}

die() {
    echo "build-local-image: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG=$2; shift 2 ;;
        --cache-dir) CACHE_DIR=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "unknown argument '$1'" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "run as root: debootstrap needs it"

# The entrypoint follows the official image's contract: as root it prepares
# PGDATA and the socket directory, then runs itself again as postgres.
write_entrypoint() {
    cat >"$1" <<'EOF'
#!/bin/sh
set -eu
if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /run/postgresql
    chown postgres:postgres "$PGDATA" /run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD to initialise the database}"
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$password_file"
    initdb --username=postgres --pwfile="$password_file" --auth-local=trust \
        --auth-host=scram-sha-256 --pgdata="$PGDATA"
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
EOF
    chmod 0755 "$1"
}

build_rootfs() {
    local rootfs=$1

    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/postgres-debootstrap.lock"
    flock 9
    if [ -f "$rootfs.stamp" ]; then
        return
    fi

    echo "==> debootstrap $SUITE with postgresql-$PG_MAJOR into $rootfs (cached)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="postgresql-$PG_MAJOR" "$SUITE" "$rootfs" "$MIRROR" \
        >"$CACHE_DIR/postgres-debootstrap.log" 2>&1 \
        || die "debootstrap failed; its output is in $CACHE_DIR/postgres-debootstrap.log"
    # Debian's package made a cluster in /var/lib/postgresql/$PG_MAJOR/main, but the image uses PGDATA.
    rm -rf "$rootfs/var/lib/postgresql/$PG_MAJOR" "$rootfs/etc/postgresql/$PG_MAJOR"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    write_entrypoint "$rootfs/usr/local/bin/docker-entrypoint.sh"
    touch "$rootfs.stamp"
}

rootfs=$CACHE_DIR/postgres-$PG_MAJOR-$SUITE
build_rootfs "$rootfs"

echo "==> docker import $TAG"
tar -C "$rootfs" -c . | docker import \
    --change "ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV PGDATA=/var/lib/postgresql/data" \
    --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    --change 'CMD ["postgres"]' \
    --change "EXPOSE 5432" \
    - "$TAG" >/dev/null
echo "==> built $TAG"
