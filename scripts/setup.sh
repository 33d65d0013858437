#!/usr/bin/env bash
# Install everything the demo and the tests need on Debian 12, as root.
#
# Idempotent and quick when everything is present: apt-get runs only when a
# package is missing, and pip runs only when pyproject.toml or the Python
# interpreter changed since the last successful install.
#
# Environment: PYTHON selects the interpreter for .venv (default python3, at least 3.11).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
stamp="$venv/.securevol-setup"
python=${PYTHON:-python3}

# Debian packages, with the reason for each one that is not obvious:
#   docker.io            dockerd 20.10, containerd and runc for the end-to-end tests and the demo
#   fuse3                fusermount3 and /etc/fuse.conf for the FUSE processes
#   libfuse3-dev pkg-config gcc python3-dev   build pyfuse3 from its source distribution
#   python3-venv         python3 -m venv with Debian's own interpreter
#   gocryptfs securefs fio   reference filesystems and the I/O load generator of the benchmarks
#   busybox-static       the offline test image (no image registry is reachable)
#   debootstrap          the rootfs of the managed plugin and of the compose example's image
#   docker-registry      a loopback registry for the managed plugin's push and upgrade test
#   systemd              systemd-analyze verify of the packaged unit (systemd need not be running)
#   sqlite3 attr acl     workloads and xattr/ACL checks on a mounted volume
#   libcap2-bin          setcap and getcap, for the file capability test on a mounted volume
#   postgresql           the PostgreSQL workload test (initdb, pgbench, pg_amcheck) on a mounted volume
#   git                  the tests and CI work on a clone
apt_packages=(
    docker.io fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
    gocryptfs securefs fio busybox-static debootstrap docker-registry systemd
    sqlite3 attr acl libcap2-bin git postgresql strace
)

log() {
    printf 'setup: %s\n' "$*"
}

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: run this as root (sudo $0): it installs Debian packages." >&2
        exit 1
    fi
}

missing_apt_packages() {
    local package status
    for package in "${apt_packages[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
        if [ "$status" != "install ok installed" ]; then
            printf '%s\n' "$package"
        fi
    done
}

install_apt_packages() {
    local missing
    mapfile -t missing < <(missing_apt_packages)
    if [ "${#missing[@]}" -eq 0 ]; then
        log "Debian packages present"
        return
    fi

    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
}

check_fuse_device() {
    if [ ! -c /dev/fuse ]; then
        modprobe fuse 2>/dev/null || true
    fi
    if [ ! -c /dev/fuse ]; then
        echo "setup: /dev/fuse is missing; load the fuse kernel module (modprobe fuse) or, in a container, pass --device /dev/fuse." >&2
        exit 1
    fi
}

check_python() {
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "setup: $python is missing or older than 3.11; set PYTHON to a Python 3.11+ interpreter." >&2
        exit 1
    fi
}

# The stamp records what the last successful pip install was made from.
install_fingerprint() {
    {
        sha256sum "$repo/pyproject.toml"
        "$venv/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

install_python_packages() {
    if [ ! -x "$venv/bin/python" ]; then
        log "creating $venv with $("$python" --version)"
        "$python" -m venv "$venv"
    fi

    local fingerprint
    fingerprint=$(install_fingerprint)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then
        log "Python packages present"
        return
    fi

    # pip's build output is long and mostly warnings, so it goes to a log
    # that is shown only when the install fails.
    local pip_log="$venv/setup-pip.log"
    log "installing securevol and its test dependencies into $venv"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check -e "$repo[test,transit]" >"$pip_log" 2>&1; then
        tail -n 40 "$pip_log" >&2
        echo "setup: pip install failed; the full output is in $pip_log" >&2
        exit 1
    fi
    printf '%s\n' "$fingerprint" >"$stamp"
}

main() {
    require_root
    install_apt_packages
    check_fuse_device
    check_python
    install_python_packages
    log "done"
}

main "$@"
