#!/usr/bin/env bash
# Show securevol at work: create an encrypted volume, use it from containers,
# and look at what is on the host's disk. Run as root on Debian 12.
#
# Uses the dockerd at DOCKER_HOST (default /var/run/docker.sock) if one
# responds, otherwise starts a private one. Everything the demo starts
# (volume, image, plugin, dockerd, socket, demo directory) is removed when it
# ends, also after an error or Ctrl-C.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/dockerd.sh
source "$repo/scripts/lib/dockerd.sh"

suffix=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
driver="securevol-demo-$suffix"
plugin_socket="/run/docker/plugins/$driver.sock"
volume="demo-secrets-$suffix"
app="demo-app-$suffix"
intruder="demo-intruder-$suffix"
image=""
built_image=""
private_dockerd=""
serve_pid=""
volume_created=""
demo_dir=""

step_number=0
step() {
    step_number=$((step_number + 1))
    printf '\n\033[1m== %d. %s\033[0m\n' "$step_number" "$*"
}

# Print a command the way a user would type it, then run it.
show() {
    local arg words=()
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            words+=("$arg")
        else
            words+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    printf '$ %s\n' "${words[*]}"
    "$@"
}

cleanup() {
    local status=$?
    # A second Ctrl-C must not cut the cleanup short and leave a dockerd behind.
    trap - EXIT
    trap '' INT TERM
    set +e
    if [ "$status" -ne 0 ] && [ -n "$serve_pid" ] && [ -f "$demo_dir/serve.log" ]; then
        echo "last lines of the plugin's log:" >&2
        tail -n 20 "$demo_dir/serve.log" >&2
    fi
    step "Cleaning up"

    if [ -n "$volume_created" ]; then
        docker ps -aq --filter "volume=$volume" | xargs -r docker rm -f >/dev/null
        docker volume rm "$volume" >/dev/null && echo "removed volume $volume"
    fi
    if [ -n "$built_image" ] && [ -z "$private_dockerd" ]; then
        docker image rm "$built_image" >/dev/null && echo "removed image $built_image"
    fi
    if [ -n "$serve_pid" ]; then
        kill -TERM "$serve_pid" 2>/dev/null
        wait "$serve_pid" 2>/dev/null
        echo "stopped securevol serve (pid $serve_pid)"
    fi
    rm -f "$plugin_socket"
    if [ -n "$private_dockerd" ]; then
        stop_private_dockerd "$private_dockerd"
        echo "stopped the private dockerd"
    fi
    if [ -n "$demo_dir" ]; then
        unmount_leftovers "$demo_dir"
        rm -rf "$demo_dir"
        echo "removed $demo_dir"
    fi

    if [ "$status" -ne 0 ]; then
        echo "demo failed (exit status $status)" >&2
    fi
    exit "$status"
}

# Lazily unmount anything still mounted under DIR, deepest first, so that
# rm -rf never deletes through a live mount.
unmount_leftovers() {
    local dir=$1 mountpoint
    awk -v prefix="$dir/" 'index($5, prefix) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r mountpoint; do
            umount -l "$mountpoint" 2>/dev/null || true
        done
}

wait_for_socket() {
    local attempt
    for attempt in $(seq 1 100); do
        if [ -S "$plugin_socket" ]; then
            return 0
        fi
        if ! kill -0 "$serve_pid" 2>/dev/null; then
            echo "securevol serve exited during start; its log follows:" >&2
            cat "$demo_dir/serve.log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "securevol serve did not create $plugin_socket within 10 s" >&2
    return 1
}

choose_docker_daemon() {
    local running=${DOCKER_HOST:-unix:///var/run/docker.sock}
    if DOCKER_HOST=$running docker version >/dev/null 2>&1; then
        export DOCKER_HOST=$running
        echo "using the running dockerd at $running"
        return
    fi

    private_dockerd="$demo_dir/docker"
    mkdir -p "$private_dockerd"
    start_private_dockerd "$private_dockerd"
    export DOCKER_HOST="unix://$private_dockerd/docker.sock"
    echo "no dockerd responds at $running; started a private one at $DOCKER_HOST"
}

choose_image() {
    local candidate
    for candidate in busybox:latest alpine:latest debian:bookworm; do
        if docker image inspect "$candidate" >/dev/null 2>&1; then
            image=$candidate
            echo "using the local image $image"
            return
        fi
    done

    image="securevol-demo-busybox-$suffix"
    build_busybox_image "$image"
    built_image=$image
    echo "no image at hand; imported $image from the host's busybox-static"
}

start_plugin() {
    mkdir -p /run/docker/plugins
    # --docker-host: the allowlist check at mount time asks this dockerd which container is starting.
    "$repo/.venv/bin/securevol" serve \
        --socket "$plugin_socket" \
        --state-dir "$demo_dir/state" \
        --docker-host "$DOCKER_HOST" \
        >"$demo_dir/serve.log" 2>&1 &
    serve_pid=$!
    wait_for_socket
    echo "securevol serve (pid $serve_pid) listens on $plugin_socket; driver name: $driver"
    echo "state directory: $demo_dir/state"
}

main() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "demo: run this as root (sudo $0): it starts a Docker plugin and FUSE mounts." >&2
        exit 1
    fi
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    step "Installing what the demo needs"
    "$repo/scripts/setup.sh" --demo
    demo_dir=$(mktemp -d /tmp/svdemo-XXXXXX)

    step "Finding a Docker daemon"
    choose_docker_daemon

    step "Finding an image for the containers"
    choose_image

    step "Starting the securevol plugin"
    start_plugin

    step "Creating an encrypted volume that only the container '$app' may use"
    show docker volume create -d "$driver" -o "allow=name:$app" "$volume"
    volume_created=1

    step "Writing a secret from the container '$app'"
    show docker run --rm --network none --name "$app" -v "$volume:/data" "$image" \
        sh -c 'echo "db password: correct horse battery staple" > /data/credentials.txt'

    step "Reading it back from a new container '$app': the plaintext"
    show docker run --rm --network none --name "$app" -v "$volume:/data" "$image" \
        sh -c 'ls -la /data && cat /data/credentials.txt'

    step "Any other container is refused"
    if show docker run --rm --network none --name "$intruder" -v "$volume:/data" "$image" cat /data/credentials.txt; then
        echo "the container '$intruder' read the volume although the allowlist names only '$app'" >&2
        exit 1
    fi
    echo "(refused, as expected: the allowlist names only '$app')"

    local backing="$demo_dir/state/volumes/$volume/data"
    step "The same volume on the host's disk: the ciphertext"
    show ls -laR "$backing"
    local file
    file=$(find "$backing" -type f ! -name 'securevol.*' | head -n 1)
    if [ -n "$file" ]; then
        printf '$ hexdump -C %s | head -n 12\n' "$file"
        busybox hexdump -C "$file" | head -n 12
    fi
    printf '$ grep -r "correct horse" %s\n' "$backing"
    if grep -r "correct horse" "$backing"; then
        echo "the plaintext was found in the backing store, so securevol did not encrypt it" >&2
        exit 1
    fi
    echo "(no match: the plaintext is not on disk)"

    step "What Docker knows about the volume: no key material"
    show docker volume inspect "$volume"

    echo
    echo "The demo worked."
}

main "$@"
