# Shell functions to start and stop a private dockerd and to build the offline
# busybox image. Source this file; tests/dockerd.py does the same for the tests.
#
# A private dockerd keeps its data root, exec root and socket under one short
# directory, because containerd's socket paths under the exec root must stay
# below the 108-byte limit of Unix socket paths.

# Start dockerd under DIR and wait until it responds. Return non-zero on failure.
# Afterwards DOCKER_HOST must be set by the caller to unix://DIR/docker.sock.
start_private_dockerd() {
    local dir=$1
    dockerd --data-root "$dir/data" --exec-root "$dir/exec" \
        -H "unix://$dir/docker.sock" --pidfile "$dir/docker.pid" \
        --bridge=none --iptables=false --ip-masq=false \
        </dev/null >"$dir/dockerd.log" 2>&1 &
    echo $! >"$dir/dockerd.launched-pid"

    local attempt
    for attempt in $(seq 1 150); do
        if DOCKER_HOST="unix://$dir/docker.sock" docker version >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$(cat "$dir/dockerd.launched-pid")" 2>/dev/null; then
            echo "dockerd exited during start; its log follows:" >&2
            tail -n 20 "$dir/dockerd.log" >&2
            return 1
        fi
        sleep 0.2
    done
    echo "dockerd did not respond on unix://$dir/docker.sock within 30 s; its log follows:" >&2
    tail -n 20 "$dir/dockerd.log" >&2
    return 1
}

# Stop the dockerd started under DIR by its PID: SIGTERM, then SIGKILL after 30 s.
stop_private_dockerd() {
    local dir=$1 pid attempt
    [ -f "$dir/dockerd.launched-pid" ] || return 0
    pid=$(cat "$dir/dockerd.launched-pid")
    kill -TERM "$pid" 2>/dev/null || return 0
    for attempt in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# Import a one-layer image NAME of the host's static busybox into the dockerd at DOCKER_HOST.
# Every applet is a symlink to /bin/busybox except the `busybox` applet, whose
# symlink would replace the binary itself.
build_busybox_image() {
    local name=$1 rootfs applet
    rootfs=$(mktemp -d /tmp/svimg-XXXXXX)
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/etc"
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
    done
    tar -C "$rootfs" -c . | docker import --change 'ENV PATH=/bin' - "$name" >/dev/null
    local status=$?
    rm -rf "$rootfs"
    return $status
}
