#!/usr/bin/env python3
"""Measure the latency that securevol's authorization plugin adds to docker commands.

The script starts two private dockerds on this machine. One runs plain, the
other with ``--authorization-plugin`` set to a securevol daemon, so dockerd
sends every API request of that daemon to securevol before it acts. Each
dockerd gets the same busybox image and a securevol volume of the same name
with the same allowlist. On the plain dockerd the volume comes from a second
securevol daemon that serves only as the volume driver. So both dockerds do
the same work (including the FUSE mount of the volume), and the difference is
the authorization path.

Each round times these commands once on each dockerd, alternating which
dockerd goes first:

  ps           docker ps
  run          docker run --rm --network none --pull=never busybox true
  run-volume   the same with -v VOLUME:/data

Times are wall-clock times of the docker CLI process, so they include the
CLI's own start-up. The report gives the median per command and daemon, the
ratio authz/plain and the difference in milliseconds.

Run it as root with the project's virtualenv:

    .venv/bin/python scripts/bench_authz.py               # 20 rounds
    .venv/bin/python scripts/bench_authz.py --rounds 5

docs/benchmarks.md records the figures of a run.
"""

import argparse
import datetime
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

try:
    from tests.dockerd import (
        PLUGIN_DIR,
        PrivateDockerd,
        build_busybox_image,
        plugin_socket_path,
        unique_driver_name,
    )
    from tests.plugin_server import PluginServer
except ImportError as error:
    sys.exit(f"bench_authz: cannot import the test helpers ({error}). Use the project's .venv/bin/python.")

log = logging.getLogger("bench_authz")

IMAGE = "authzbench-busybox"
VOLUME = "authzbench-data"
# The allowlist admits the benchmark's image, so every container passes the
# image rule, and the check does the Engine API look-ups that a real allowlist needs.
ALLOW = f"image:{IMAGE}"


class Setup:
    """A dockerd and its securevol daemon, which serves the volume and, with *authz*, authorizes requests."""

    def __init__(self, label: str, authz: bool) -> None:
        self.label = label
        self.authz = authz
        self.driver = unique_driver_name("securevol-authzbench")
        extra_args = [f"--authorization-plugin={self.driver}"] if authz else []
        self.dockerd = PrivateDockerd(extra_args)
        self.plugin = PluginServer(
            socket_path=plugin_socket_path(self.driver),
            env={"SECUREVOL_DOCKER_HOST": self.dockerd.host},
        )

    def start(self) -> None:
        # The plugin starts first, because a dockerd with an authorization
        # plugin rejects every request while that plugin cannot be reached.
        self.plugin.start()
        log.info("plugin ready setup=%s driver=%s pid=%d", self.label, self.driver, self.plugin.process.pid)
        self.dockerd.start()
        self._check_authorization_plugin()
        build_busybox_image(self.dockerd, IMAGE)
        self.dockerd.docker("volume", "create", "-d", self.driver, "-o", f"allow={ALLOW}", VOLUME)
        log.info("setup ready setup=%s dockerd_pid=%d", self.label, self.dockerd.pid)

    def _check_authorization_plugin(self) -> None:
        # A wrong flag would leave both dockerds plain and make the ratio meaningless.
        listed = self.dockerd.docker("info", "--format", "{{json .Plugins.Authorization}}").stdout
        if self.authz != (self.driver in listed):
            raise RuntimeError(f"dockerd {self.label} lists authorization plugins {listed.strip()}, "
                               f"expected authz={self.authz} for {self.driver}")

    def stop(self) -> None:
        """Remove containers and the volume, stop dockerd, then stop the plugin and remove its socket."""
        try:
            if self.dockerd.pid is not None:
                self.dockerd.remove_all_containers()
                self.dockerd.docker("volume", "rm", "--force", VOLUME, check=False)
        finally:
            try:
                self.dockerd.stop()
            finally:
                self.plugin.cleanup()


def commands() -> dict[str, list[str]]:
    """Return the timed docker commands by name. Every run has no network and never pulls an image."""
    run = ["run", "--rm", "--network", "none", "--pull=never"]
    return {
        "ps": ["ps"],
        "run": [*run, IMAGE, "true"],
        "run-volume": [*run, "-v", f"{VOLUME}:/data", IMAGE, "true"],
    }


def time_command(setup: Setup, args: list[str]) -> float:
    """Run one docker command against *setup*'s dockerd and return its wall-clock time in seconds."""
    started = time.perf_counter()
    setup.dockerd.docker(*args)
    return time.perf_counter() - started


Timings = dict[str, dict[str, list[float]]]


def measure(setups: list[Setup], rounds: int, progress: Callable[[str], None]) -> Timings:
    """Time each command *rounds* times on each setup and return the seconds by command and setup label."""
    timings: Timings = defaultdict(lambda: defaultdict(list))

    # One untimed pass warms the page cache, dockerd's image store and the plugins' workers.
    for args in commands().values():
        for setup in setups:
            setup.dockerd.docker(*args)

    for round_index in range(rounds):
        # Alternate the order so neither dockerd always runs right after the other's container.
        ordered = setups if round_index % 2 == 0 else list(reversed(setups))
        for name, args in commands().items():
            for setup in ordered:
                timings[name][setup.label].append(time_command(setup, args))
        progress(f"round {round_index + 1}/{rounds} done")
    return timings


def report(timings: Timings, rounds: int) -> str:
    lines = [
        f"docker CLI wall-clock time, median of {rounds} rounds, ms",
        f"{'command':<12} {'plain':>8} {'authz':>8} {'ratio':>7} {'added':>8}",
    ]
    for name, by_setup in timings.items():
        plain = statistics.median(by_setup["plain"]) * 1000
        authz = statistics.median(by_setup["authz"]) * 1000
        lines.append(f"{name:<12} {plain:8.1f} {authz:8.1f} {authz / plain:7.2f} {authz - plain:+8.1f}")
    return "\n".join(lines)


def machine_line() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dockerd_version = subprocess.run(["dockerd", "--version"], capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, {dockerd_version}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20,
                        help="number of timed rounds of each command on each dockerd (default 20)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        sys.exit("bench_authz: run as root, because it starts dockerd and FUSE mounts.")
    PLUGIN_DIR.mkdir(parents=True, exist_ok=True)

    setups = [Setup("plain", authz=False), Setup("authz", authz=True)]
    started = []
    try:
        for setup in setups:
            started.append(setup)
            setup.start()
        timings = measure(setups, args.rounds, lambda message: log.info("%s", message))
    finally:
        for setup in reversed(started):
            setup.stop()

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine_line()}")
    print(report(timings, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
