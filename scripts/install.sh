#!/usr/bin/env bash
# Install securevol on the host as a systemd service, or remove it again.
#
# Installs a virtualenv in /opt/securevol, the unit securevol.service (ordered
# before docker.service), its settings file /etc/default/securevol, and a
# tmpfiles.d entry for /run/docker/plugins (0755) and /var/lib/securevol (0700).
#
# --root DIR installs the same layout under DIR, with the unit and the
# settings file naming the paths under DIR, so tests can install and run it
# without writing to /opt, /etc or /run.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

ROOT=
PREFIX=/opt/securevol
PYTHON=${PYTHON:-/usr/bin/python3}
WHEELS=
ACTION=install
PURGE=0
DRY_RUN=0
SYSTEMCTL=auto

usage() {
    cat <<EOF
Usage: $0 [options]            install securevol and start securevol.service
       $0 --uninstall [--purge] remove it; --purge also deletes every volume and key

  --root DIR      install under DIR instead of / (the unit and settings name paths under DIR)
  --prefix DIR    virtualenv location, below --root (default: $PREFIX)
  --python PATH   interpreter for the virtualenv (default: $PYTHON)
  --wheels DIR    install offline from the wheels in DIR (pip --no-index)
  --no-systemctl  do not call systemctl (default: call it when systemd runs and --root is not given)
  --dry-run       print each action without doing it
  --uninstall     stop and remove the service and the virtualenv; keep volumes, keys and settings
  --purge         with --uninstall: also delete the state directory (all volumes and the master key)
                  and the settings file. The data cannot be recovered afterwards.
  -h, --help      show this help
EOF
}

die() {
    echo "install: $*" >&2
    exit 1
}

step() {
    echo "==> $*"
}

# Run a command, or only print it under --dry-run.
run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
        return
    fi
    "$@"
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --root) ROOT=$(realpath -m "$2"); shift 2 ;;
            --prefix) PREFIX=$2; shift 2 ;;
            --python) PYTHON=$2; shift 2 ;;
            --wheels) WHEELS=$(realpath "$2"); shift 2 ;;
            --no-systemctl) SYSTEMCTL=no; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            --uninstall) ACTION=uninstall; shift ;;
            --purge) PURGE=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument '$1'" ;;
        esac
    done

    if [ "$PURGE" -eq 1 ] && [ "$ACTION" != uninstall ]; then
        die "--purge only makes sense with --uninstall"
    fi
    case "$PREFIX" in
        /*) ;;
        *) die "--prefix must be an absolute path, not '$PREFIX'" ;;
    esac
}

set_paths() {
    VENV=$ROOT$PREFIX
    ETC=$ROOT/etc
    SETTINGS=$ETC/default/securevol
    UNIT_DIR=$ETC/systemd/system
    UNIT=$UNIT_DIR/securevol.service
    TMPFILES=$ETC/tmpfiles.d/securevol.conf
    PLUGIN_DIR=$ROOT/run/docker/plugins
    STATE_DIR=$ROOT/var/lib/securevol

    if [ "$SYSTEMCTL" = auto ]; then
        # /run/systemd/system exists only when systemd is the running init.
        if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
            SYSTEMCTL=yes
        else
            SYSTEMCTL=no
        fi
    fi
}

# Copy a packaged file to its place, pointing its paths at ROOT and PREFIX.
install_file() {
    local source=$1 target=$2 mode=$3

    if [ "$DRY_RUN" -eq 1 ]; then
        run install -m "$mode" "$source" "$target"
        return
    fi
    install -d -m 0755 "$(dirname "$target")"
    sed -e "s|/opt/securevol|$VENV|g" \
        -e "s|/etc/default/securevol|$SETTINGS|g" \
        -e "s|/run/docker/plugins|$PLUGIN_DIR|g" \
        -e "s|/var/lib/securevol|$STATE_DIR|g" \
        "$source" >"$target.tmp"
    chmod "$mode" "$target.tmp"
    mv "$target.tmp" "$target"
}

install_venv() {
    step "virtualenv $VENV"
    run "$PYTHON" -m venv "$VENV"

    local pip=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
    local package="$REPO"
    if [ -n "$WHEELS" ]; then
        pip+=(--no-index --find-links "$WHEELS")
        package=securevol
    fi

    run "${pip[@]}" "$package[transit]"
    # pip keeps an installed securevol of the same version number, so an
    # upgrade from a newer checkout of the same version must force it.
    run "${pip[@]}" --no-deps --force-reinstall "$package"
}

do_install() {
    step "directories $PLUGIN_DIR (0755) and $STATE_DIR (0700)"
    run install -d -m 0755 "$PLUGIN_DIR"
    run install -d -m 0700 "$STATE_DIR"
    # install -d leaves the mode of an existing directory alone.
    run chmod 0700 "$STATE_DIR"

    install_venv

    step "unit $UNIT and $TMPFILES"
    install_file "$REPO/packaging/securevol.service" "$UNIT" 0644
    install_file "$REPO/packaging/securevol.tmpfiles" "$TMPFILES" 0644

    # The settings file is the administrator's: never overwrite an edited one.
    if [ -e "$SETTINGS" ]; then
        step "settings $SETTINGS exist; left as they are"
    else
        step "settings $SETTINGS"
        install_file "$REPO/packaging/securevol.default" "$SETTINGS" 0600
    fi

    if [ "$SYSTEMCTL" = yes ]; then
        step "enable and start securevol.service"
        run systemctl daemon-reload
        run systemctl enable --now securevol.service
        echo "The volume driver is securevol; a running dockerd finds it without a restart."
    else
        echo "systemd is not managing it here; start it with: set -a; . $SETTINGS; set +a; $VENV/bin/securevol serve"
    fi
}

# Prints the value of NAME in the settings file, without quotes; empty if it is not set.
settings_value() {
    [ -f "$SETTINGS" ] || return 0
    sed -n "s/^$1=//p" "$SETTINGS" | tail -n 1 | sed 's/^"\(.*\)"$/\1/'
}

# The settings file may move the state directory and the mount root away from the defaults.
set_configured_paths() {
    CONFIGURED_STATE_DIR=$(settings_value SECUREVOL_STATE_DIR)
    CONFIGURED_STATE_DIR=${CONFIGURED_STATE_DIR:-$STATE_DIR}
    CONFIGURED_MOUNT_ROOT=$(settings_value SECUREVOL_MOUNT_ROOT)
    CONFIGURED_MOUNT_ROOT=${CONFIGURED_MOUNT_ROOT:-$CONFIGURED_STATE_DIR/mnt}
}

# Mountpoints under the state directories or the mount root mean containers still use volumes.
mounted_volumes() {
    local dir
    for dir in "$STATE_DIR" "$CONFIGURED_STATE_DIR" "$CONFIGURED_MOUNT_ROOT"; do
        awk -v dir="$dir/" 'index($5, dir) == 1 { print $5 }' /proc/self/mountinfo
    done | sort -u
}

# Prints the PID of a daemon that holds a state directory's lock, if one does.
running_daemon() {
    local dir lock
    for dir in "$STATE_DIR" "$CONFIGURED_STATE_DIR"; do
        lock="$dir/daemon.lock"
        if [ -f "$lock" ] && ! flock -n "$lock" true; then
            cat "$lock"
            return
        fi
    done
}

do_uninstall() {
    set_configured_paths

    # Checked before anything changes: the FUSE processes of mounted volumes run from $VENV,
    # and the unit's KillMode=process keeps them running when the service stops.
    local mounted
    mounted=$(mounted_volumes)
    if [ -n "$mounted" ]; then
        die "volumes are still mounted and their FUSE processes run from $VENV, so nothing was removed; stop the containers that use them: $mounted"
    fi

    if [ "$SYSTEMCTL" = yes ]; then
        step "stop and disable securevol.service"
        run systemctl disable --now securevol.service || true
    fi

    local daemon_pid
    daemon_pid=$(running_daemon)
    if [ -n "$daemon_pid" ] && [ "$DRY_RUN" -eq 0 ]; then
        die "a securevol daemon (pid $daemon_pid) still runs on $CONFIGURED_STATE_DIR, so nothing was removed; stop it first"
    fi

    step "remove $UNIT, $TMPFILES and $VENV"
    run rm -f "$UNIT" "$TMPFILES"
    run rm -rf "$VENV"
    if [ "$SYSTEMCTL" = yes ]; then
        run systemctl daemon-reload
    fi

    if [ "$PURGE" -eq 0 ]; then
        echo "Kept $CONFIGURED_STATE_DIR (volumes and keys) and $SETTINGS; --purge deletes them."
        return
    fi

    step "purge $STATE_DIR and $SETTINGS: every volume and key is deleted"
    run rm -rf "$STATE_DIR"
    run rm -f "$SETTINGS"
}

main() {
    parse_args "$@"
    set_paths

    if [ -z "$ROOT" ] && [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
        die "run as root (sudo $0), or use --root DIR or --dry-run"
    fi

    "do_$ACTION"
}

main "$@"
