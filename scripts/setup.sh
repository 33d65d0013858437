#!/usr/bin/env bash
# Install everything the tests need on Debian 12, as root; with --demo, only what the demo needs.
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

# Debian packages, with the reason for each one that is not obvious.
# The demo's:
#   docker.io            dockerd 20.10, containerd and runc for the demo and the end-to-end tests
#   fuse3                fusermount3 and /etc/fuse.conf for the FUSE processes
#   libfuse3-dev pkg-config gcc python3-dev   build pyfuse3 from its source distribution
#   python3-venv         python3 -m venv with Debian's own interpreter
#   busybox-static       the offline image of the demo and the tests (no image registry is reachable)
demo_packages=(
    docker.io fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv busybox-static
)
# The tests' and the benchmark's, in addition:
#   gocryptfs securefs fio   reference filesystems and the I/O load generator of the benchmarks
#   debootstrap          the rootfs of the managed plugin and of the compose example's image
#   docker-registry      a loopback registry for the managed plugin's push and upgrade test
#   systemd              systemd-analyze verify of the packaged unit (systemd need not be running)
#   sqlite3 attr acl     workloads and xattr/ACL checks on a mounted volume
#   libcap2-bin          setcap and getcap, for the file capability test on a mounted volume
#   postgresql           the PostgreSQL workload test (initdb, pgbench, pg_amcheck) on a mounted volume
#   git                  the tests and CI work on a clone
#   strace               failures injected into a FUSE process's system calls
test_packages=(
    gocryptfs securefs fio debootstrap docker-registry systemd
    sqlite3 attr acl libcap2-bin git postgresql strace
)
# Packages whose own service nothing here uses: the tests start private
# instances on loopback. A fresh install of one neither starts nor enables it.
private_services=(docker-registry postgresql)

apt_packages=("${demo_packages[@]}" "${test_packages[@]}")
if [ $# -gt 1 ] || { [ $# -eq 1 ] && [ "$1" != "--demo" ]; }; then
    echo "usage: $0 [--demo]" >&2
    exit 2
elif [ $# -eq 1 ]; then
    apt_packages=("${demo_packages[@]}")
fi

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
    hold_back_private_services "${missing[@]}"
    apt-get install -y -q "${missing[@]}"
    release_private_services "${missing[@]}"
}

# Debian's maintainer scripts ask /usr/sbin/policy-rc.d before they start a
# service; 101 means "not allowed". One is put in place only if none exists.
policy_rc_d=/usr/sbin/policy-rc.d
own_policy_rc_d=""

new_private_services() {
    local package service
    for package in "$@"; do
        for service in "${private_services[@]}"; do
            if [ "$package" = "$service" ]; then
                printf '%s\n' "$service"
            fi
        done
    done
}

hold_back_private_services() {
    local services service
    mapfile -t services < <(new_private_services "$@")
    # A dangling symbolic link counts as present: writing through it would create its target.
    if [ "${#services[@]}" -eq 0 ] || [ -e "$policy_rc_d" ] || [ -L "$policy_rc_d" ]; then
        return
    fi
    # invoke-rc.d passes the service's name, deb-systemd-invoke the unit's name.
    local names=()
    for service in "${services[@]}"; do
        names+=("$service" "$service.service")
    done
    own_policy_rc_d=$policy_rc_d
    trap 'rm -f "$own_policy_rc_d"' EXIT
    printf '#!/bin/sh\n# Written by securevol scripts/setup.sh during apt-get install; removed after it.\ncase "$1" in %s) exit 101 ;; esac\nexit 0\n' \
        "$(IFS='|'; echo "${names[*]}")" >"$policy_rc_d"
    chmod 0755 "$policy_rc_d"
}

release_private_services() {
    local services service
    if [ -n "$own_policy_rc_d" ]; then
        rm -f "$own_policy_rc_d"
        own_policy_rc_d=""
    fi
    mapfile -t services < <(new_private_services "$@")
    if ! command -v systemctl >/dev/null; then
        return
    fi
    # --now also stops a service that an existing policy-rc.d let start; it needs a running systemd.
    local now=()
    if [ -d /run/systemd/system ]; then
        now=(--now)
    fi
    for service in "${services[@]}"; do
        if systemctl disable "${now[@]}" --quiet "$service.service" 2>/dev/null; then
            log "disabled the $service service, which the tests do not use"
        fi
    done
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
