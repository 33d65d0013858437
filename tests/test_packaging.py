"""Tests of the three ways securevol is installed.

- config.json of the managed (v2) plugin, checked against the daemon's settings;
- scripts/install.sh and the systemd unit, installed under a private root and
  run from the unit's own ExecStart and EnvironmentFile lines;
- the managed plugin built by scripts/build-plugin.sh from a debootstrap
  rootfs, created, enabled, reconfigured and upgraded on a private dockerd,
  with real containers reading and writing a volume.
"""

import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from securevol import cli, config
from tests.dockerd import PrivateDockerd, unique_driver_name

REPO = Path(__file__).resolve().parent.parent
CONFIG_JSON = REPO / "config.json"
UNIT = REPO / "packaging" / "securevol.service"
SETTINGS_FILE = REPO / "packaging" / "securevol.default"
INSTALL_SH = REPO / "scripts" / "install.sh"
BUILD_PLUGIN_SH = REPO / "scripts" / "build-plugin.sh"
CONFIGURATION_DOC = REPO / "docs" / "configuration.md"

# Shared by every run, so the debootstrap rootfs is made once per machine.
BUILD_CACHE = REPO / "build" / "cache"

# Upper bound on waiting for a daemon to come up; a daemon that never comes up fails the test.
START_TIMEOUT = 60

PLAINTEXT = "securevol packaging plaintext 7d41c0"

# build-plugin.sh records what it built in this file of the plugin directory.
BUILD_STAMP = "rootfs/etc/securevol-build"


def plugin_config() -> dict:
    return json.loads(CONFIG_JSON.read_text())


def plugin_env(plugin: dict) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in plugin["env"]}


def setting_env_names() -> set[str]:
    """Return every SECUREVOL_* environment variable that the package's source reads."""
    names = {spec.env for spec in config.SETTINGS}
    for source in (REPO / "plugin" / "securevol").rglob("*.py"):
        names.update(re.findall(r"SECUREVOL_[A-Z0-9_]+", source.read_text()))
    return names


def settings_file_entries(path: Path) -> dict[str, str]:
    """Parse a systemd EnvironmentFile: KEY=VALUE lines, with # comments and blank lines."""
    entries = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        entries[key] = value
    return entries


def commented_settings(path: Path) -> dict[str, str]:
    """Return the ``#KEY=VALUE`` lines of a settings file: documented defaults."""
    return dict(re.findall(r"^#(SECUREVOL_[A-Z0-9_]+)=(.*)$", path.read_text(), re.MULTILINE))


def unit_directives(path: Path) -> dict[str, list[str]]:
    """Return each directive of a unit file with all its values, in order."""
    directives: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" not in line or line.lstrip().startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a Unix socket, as dockerd makes to a plugin."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.socket_path))


def post_json(socket_path: Path, endpoint: str, body: dict) -> tuple[int, dict]:
    """POST *body* to *endpoint* on the plugin socket and return the status and the decoded JSON reply."""
    connection = UnixHTTPConnection(socket_path)
    try:
        connection.request("POST", endpoint, body=json.dumps(body))
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


# config.json of the managed plugin.


def test_plugin_config_interface():
    plugin = plugin_config()

    assert plugin["interface"]["types"] == ["docker.volumedriver/1.0", "docker.authz/1.0"]
    assert plugin["interface"]["socket"] == "securevol.sock"
    # dockerd connects to /run/docker/plugins/<interface.socket> inside the plugin.
    assert plugin_env(plugin)["SECUREVOL_SOCKET"] == "/run/docker/plugins/securevol.sock"


def test_plugin_config_fuse_privileges():
    plugin = plugin_config()

    assert plugin["linux"]["capabilities"] == ["CAP_SYS_ADMIN"]
    assert plugin["linux"]["devices"] == [{"path": "/dev/fuse"}]
    assert plugin["linux"]["allowAllDevices"] is False
    # The FUSE layer reads /proc/PID/cgroup of each caller, which needs host PIDs.
    assert plugin["pidhost"] is True


def test_plugin_config_mount_root_under_propagated_mount():
    plugin = plugin_config()
    propagated = Path(plugin["propagatedMount"])
    mount_root = Path(plugin_env(plugin)["SECUREVOL_MOUNT_ROOT"])

    assert mount_root == propagated or propagated in mount_root.parents
    state_dir = Path(plugin_env(plugin)["SECUREVOL_STATE_DIR"])
    assert propagated != state_dir
    assert state_dir not in propagated.parents


def test_plugin_config_state_mount():
    plugin = plugin_config()
    [state] = [mount for mount in plugin["mounts"] if mount["name"] == "state"]

    assert state["destination"] == plugin_env(plugin)["SECUREVOL_STATE_DIR"]
    assert state["source"] == config.DEFAULT_STATE_DIR
    assert state["type"] == "bind"
    assert state["settable"] == ["source"]


def test_plugin_config_docker_socket_mount():
    plugin = plugin_config()
    [docker_socket] = [mount for mount in plugin["mounts"] if mount["name"] == "docker-socket"]

    assert f"unix://{docker_socket['destination']}" == plugin_env(plugin)["SECUREVOL_DOCKER_HOST"]
    assert docker_socket["settable"] == ["source"]


def test_plugin_config_entrypoint_is_build_venv():
    plugin = plugin_config()
    venv = re.search(r"^VENV=(\S+)$", BUILD_PLUGIN_SH.read_text(), re.MULTILINE).group(1)

    assert plugin["entrypoint"] == [f"{venv}/bin/securevol", "serve"]


def test_dockerfile_matches_plugin_config():
    # The Dockerfile path needs a registry, so it is checked here against the
    # same facts that the debootstrap path is tested with.
    dockerfile = (REPO / "Dockerfile").read_text()
    entrypoint = plugin_config()["entrypoint"]

    assert f"ENTRYPOINT {json.dumps(entrypoint)}" in dockerfile
    assert "COPY --from=build /opt/securevol /opt/securevol" in dockerfile
    for source in re.findall(r"^COPY (?!--from)(.+) /src/\S*$", dockerfile, re.MULTILINE):
        for name in source.split():
            assert (REPO / name).exists(), f"the Dockerfile copies {name}, which is missing"
    for package in ("python3", "fuse3", "ca-certificates"):
        assert package in dockerfile


def test_plugin_config_env_names_are_settings():
    names = setting_env_names()

    for entry in plugin_config()["env"]:
        assert entry["name"] in names, f"config.json sets {entry['name']}, which securevol never reads"


def test_settings_file_names_are_settings():
    names = setting_env_names()
    entries = settings_file_entries(SETTINGS_FILE) | commented_settings(SETTINGS_FILE)

    assert entries, "packaging/securevol.default sets nothing"
    for name in entries:
        assert name in names, f"securevol.default sets {name}, which securevol never reads"


def test_settings_file_defaults_match_code():
    for name, value in commented_settings(SETTINGS_FILE).items():
        spec = next((spec for spec in config.SETTINGS if spec.env == name), None)
        if spec is None or spec.default is None:
            continue
        assert value == str(spec.default), f"securevol.default documents {name}={value}, the code uses {spec.default}"


def test_configuration_doc_lists_every_setting():
    text = CONFIGURATION_DOC.read_text()

    for spec in config.SETTINGS:
        assert spec.env in text, f"docs/configuration.md does not describe {spec.env}"
        assert spec.flag in text, f"docs/configuration.md does not describe {spec.flag}"
    for entry in plugin_config()["env"]:
        assert entry["name"] in text


def test_unit_keeps_fuse_processes_on_stop():
    directives = unit_directives(UNIT)

    assert directives["KillMode"] == ["process"]
    assert directives["Before"] == ["docker.service"]
    # A private mount namespace would hide the FUSE mounts from dockerd.
    for option in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths",
                   "TemporaryFileSystem", "BindPaths", "MountFlags"):
        assert option not in directives, f"{option}= gives the service its own mount namespace"


def test_unit_stop_timeout_leaves_room_for_graceful_stop():
    [stop_timeout] = unit_directives(UNIT)["TimeoutStopSec"]

    # systemd kills the daemon when TimeoutStopSec ends; gunicorn's workers must
    # be done before then, with time for the arbiter to reap them.
    assert int(stop_timeout.removesuffix("s")) >= cli.GRACEFUL_STOP_SECONDS + 10


# install.sh and the systemd unit, under a private root.


def run_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL,
    )


def private_root() -> Path:
    # Directly under /tmp: the socket path under it must fit in 107 bytes.
    return Path(tempfile.mkdtemp(prefix="svi-", dir="/tmp"))


@pytest.fixture(scope="module")
def installed_root() -> Iterator[Path]:
    """A root directory into which install.sh installed securevol, removed afterwards."""
    root = private_root()
    result = run_install("--root", str(root))
    assert result.returncode == 0, result.stderr
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_install_dry_run_changes_nothing():
    root = private_root()
    try:
        result = run_install("--root", str(root), "--dry-run")

        assert result.returncode == 0, result.stderr
        assert f"+ install -d -m 0700 {root}/var/lib/securevol" in result.stdout
        assert list(root.iterdir()) == []
    finally:
        shutil.rmtree(root)


def test_install_rejects_unknown_argument():
    result = run_install("--frobnicate")

    assert result.returncode != 0
    assert "unknown argument '--frobnicate'" in result.stderr


def test_install_rejects_purge_without_uninstall():
    result = run_install("--purge", "--dry-run")

    assert result.returncode != 0
    assert "--purge" in result.stderr


@pytest.mark.slow
def test_install_layout_and_modes(installed_root: Path):
    root = installed_root

    assert (root / "run/docker/plugins").stat().st_mode & 0o777 == 0o755
    assert (root / "var/lib/securevol").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/default/securevol").stat().st_mode & 0o777 == 0o600
    assert os.access(root / "opt/securevol/bin/securevol", os.X_OK)

    directives = unit_directives(root / "etc/systemd/system/securevol.service")
    assert directives["ExecStart"] == [f"{root}/opt/securevol/bin/securevol serve"]
    assert directives["EnvironmentFile"] == [f"-{root}/etc/default/securevol"]

    settings = settings_file_entries(root / "etc/default/securevol")
    assert settings["SECUREVOL_SOCKET"] == f"{root}/run/docker/plugins/securevol.sock"
    assert settings["SECUREVOL_STATE_DIR"] == f"{root}/var/lib/securevol"


@pytest.mark.slow
def test_installed_unit_verifies(installed_root: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing; scripts/setup.sh installs the systemd package")
    unit = installed_root / "etc/systemd/system/securevol.service"

    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    assert "securevol.service" not in verified.stderr, verified.stderr

    # The same check must fail on a unit whose command is missing, or it proves nothing.
    broken_dir = installed_root / "broken"
    broken_dir.mkdir()
    broken = broken_dir / "securevol.service"
    broken.write_text(unit.read_text().replace("/bin/securevol serve", "/bin/missing serve"))
    rejected = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert rejected.returncode != 0
    assert "missing" in rejected.stderr


@pytest.mark.slow
def test_tmpfiles_entry_creates_directories(installed_root: Path):
    root = private_root()
    try:
        conf = root / "securevol.conf"
        conf.write_text((REPO / "packaging/securevol.tmpfiles").read_text()
                        .replace("/run/", f"{root}/run/").replace("/var/", f"{root}/var/"))

        subprocess.run(["systemd-tmpfiles", "--create", str(conf)], check=True, capture_output=True)

        assert (root / "run/docker/plugins").stat().st_mode & 0o777 == 0o755
        assert (root / "var/lib/securevol").stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(root)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, to receive sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))

    def wait_for(self, message: str, timeout: float) -> list[str]:
        """Return every message received until one contains *message*; raise TimeoutError after *timeout*."""
        received = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.socket.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                received.append(self.socket.recv(4096).decode())
            except TimeoutError:
                break
            if message in received[-1]:
                return received
        raise TimeoutError(f"no {message!r} on {self.path}; received {received}")

    def close(self) -> None:
        self.socket.close()
        self.path.unlink(missing_ok=True)


def start_from_unit(unit: Path, notify_path: Path) -> subprocess.Popen:
    """Start the unit's ExecStart with the environment its EnvironmentFile sets, as systemd would."""
    directives = unit_directives(unit)
    [exec_start] = directives["ExecStart"]
    [environment_file] = directives["EnvironmentFile"]

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": str(notify_path)}
    env |= settings_file_entries(Path(environment_file.lstrip("-")))
    return subprocess.Popen(
        shlex.split(exec_start), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop_process(process: subprocess.Popen) -> str:
    """Stop *process* with SIGTERM, as systemd does with KillMode=process; return its output."""
    [stop_timeout] = unit_directives(UNIT)["TimeoutStopSec"]
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=int(stop_timeout.removesuffix("s")))
    except subprocess.TimeoutExpired:
        # As systemd would, but for the whole session: a gunicorn worker left
        # behind by its killed master would keep the output pipe open.
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    return output.decode(errors="replace")


class UnitDaemon(NamedTuple):
    """The daemon started from the installed unit, for a test to talk to and then stop."""

    process: subprocess.Popen
    socket_path: Path
    output: list[str]


@contextlib.contextmanager
def daemon_from_unit(installed_root: Path) -> Iterator[UnitDaemon]:
    """Start the installed unit's daemon, wait for READY=1, and stop it with SIGTERM on exit."""
    unit = installed_root / "etc/systemd/system/securevol.service"
    socket_path = Path(settings_file_entries(installed_root / "etc/default/securevol")["SECUREVOL_SOCKET"])
    notify = NotifySocket(installed_root / "notify.sock")
    process = start_from_unit(unit, notify.path)
    daemon = UnitDaemon(process, socket_path, [])
    try:
        # Type=notify: systemd starts docker.service only after READY=1.
        notify.wait_for("READY=1", START_TIMEOUT)
        yield daemon
    finally:
        notify.close()
        daemon.output.append(stop_process(process))


@pytest.mark.slow
def test_unit_exec_start_answers_activate(installed_root: Path):
    with daemon_from_unit(installed_root) as daemon:
        status, body = post_json(daemon.socket_path, "/Plugin.Activate", {})

        assert status == 200
        assert "VolumeDriver" in body["Implements"]
        assert daemon.socket_path.stat().st_mode & 0o777 == 0o660
    assert daemon.process.returncode == 0, daemon.output


@pytest.mark.slow
def test_unit_stop_with_half_sent_request_exits_cleanly(installed_root: Path):
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as client:
        with daemon_from_unit(installed_root) as daemon:
            # A client that stops half way through its headers keeps a worker
            # thread waiting; the stop must still end before systemd kills it.
            client.connect(str(daemon.socket_path))
            client.sendall(b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\n")
            time.sleep(1)
    assert daemon.process.returncode == 0, daemon.output


@pytest.mark.slow
def test_reinstall_keeps_edited_settings(installed_root: Path):
    settings = installed_root / "etc/default/securevol"
    original = settings.read_text()
    settings.write_text(original + "SECUREVOL_LOG_LEVEL=DEBUG\n")
    try:
        result = run_install("--root", str(installed_root))

        assert result.returncode == 0, result.stderr
        assert "left as they are" in result.stdout
        assert settings.read_text().endswith("SECUREVOL_LOG_LEVEL=DEBUG\n")
    finally:
        settings.write_text(original)


@pytest.mark.slow
def test_uninstall_rejected_while_daemon_runs(installed_root: Path):
    with daemon_from_unit(installed_root):
        result = run_install("--root", str(installed_root), "--uninstall", "--purge", "--no-systemctl")

    assert result.returncode != 0
    assert "still runs on" in result.stderr
    assert "nothing was removed" in result.stderr
    assert (installed_root / "opt/securevol/bin/securevol").exists()
    assert (installed_root / "var/lib/securevol").is_dir()


def _set_setting(root: Path, name: str, value: str) -> None:
    settings = root / "etc/default/securevol"
    lines = [line for line in settings.read_text().splitlines() if not line.startswith(f"{name}=")]
    settings.write_text("\n".join([*lines, f"{name}={value}"]) + "\n")


@pytest.mark.slow
def test_uninstall_finds_daemon_on_configured_state_dir():
    root = private_root()
    try:
        assert run_install("--root", str(root)).returncode == 0
        _set_setting(root, "SECUREVOL_STATE_DIR", str(root / "srv/state"))

        with daemon_from_unit(root):
            result = run_install("--root", str(root), "--uninstall", "--no-systemctl")

        assert result.returncode != 0
        assert f"still runs on {root / 'srv/state'}" in result.stderr
        assert (root / "opt/securevol/bin/securevol").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def tmpfs_at(mountpoint: Path) -> Iterator[None]:
    """Mount a small tmpfs at *mountpoint* for the block: a mount that stands for a volume in use."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "securevol-test", str(mountpoint)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.mark.slow
def test_uninstall_finds_mounts_under_configured_mount_root():
    root = private_root()
    try:
        assert run_install("--root", str(root)).returncode == 0
        _set_setting(root, "SECUREVOL_MOUNT_ROOT", f'"{root / "srv/mnt"}"')
        with tmpfs_at(root / "srv/mnt/db"):
            result = run_install("--root", str(root), "--uninstall", "--purge", "--no-systemctl")

        assert result.returncode != 0
        assert "still mounted" in result.stderr
        assert (root / "var/lib/securevol").is_dir()
        assert (root / "opt/securevol/bin/securevol").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_uninstall_keeps_state_unless_purged():
    root = private_root()
    try:
        assert run_install("--root", str(root)).returncode == 0
        master_key = root / "var/lib/securevol/master.key"
        master_key.write_bytes(os.urandom(32))

        result = run_install("--root", str(root), "--uninstall")

        assert result.returncode == 0, result.stderr
        assert not (root / "opt/securevol").exists()
        assert not (root / "etc/systemd/system/securevol.service").exists()
        assert master_key.exists()
        assert (root / "etc/default/securevol").exists()

        result = run_install("--root", str(root), "--uninstall", "--purge")

        assert result.returncode == 0, result.stderr
        assert not (root / "var/lib/securevol").exists()
        assert not (root / "etc/default/securevol").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_uninstall_rejected_while_volume_mounted():
    root = private_root()
    mountpoint = root / "var/lib/securevol/mnt/db"
    try:
        with tmpfs_at(mountpoint):
            assert run_install("--root", str(root)).returncode == 0

            result = run_install("--root", str(root), "--uninstall", "--no-systemctl")

            assert result.returncode != 0
            assert "still mounted" in result.stderr
            assert "nothing was removed" in result.stderr
            assert mountpoint.is_dir()
            assert (root / "opt/securevol/bin/securevol").exists()
    finally:
        shutil.rmtree(root)


# The managed plugin on a private dockerd.


class Registry:
    """A docker-registry process on a loopback port, with its storage in a private directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_loopback_port()
        self.address = f"127.0.0.1:{self.port}"
        config_path = root / "registry.yml"
        config_path.write_text(
            "version: 0.1\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'storage'}\n"
            f"http:\n  addr: {self.address}\n"
        )
        self.log = open(root / "registry.log", "wb")
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config_path)], stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with status {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"docker-registry did not listen on port {port} within {START_TIMEOUT} s")


class ManagedPlugin:
    """A securevol managed plugin in a private dockerd, its host state directory and its plugin directory."""

    def __init__(self, dockerd: PrivateDockerd, work: Path) -> None:
        self.dockerd = dockerd
        self.work = work
        self.name = unique_driver_name("securevol-plugin")
        self.state_dir = work / "state"
        self.plugin_dir = work / "build" / "plugin"

    def build(self) -> None:
        result = subprocess.run(
            ["bash", str(BUILD_PLUGIN_SH), "--from", "debootstrap", "--no-create", "--source", str(self.source()),
             "--build-dir", str(self.work / "build"), "--cache-dir", str(BUILD_CACHE)],
            env=self.dockerd.env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, f"build-plugin.sh failed:\n{result.stdout}\n{result.stderr}"

    def source(self) -> Path:
        """Return a copy of the committed tree, or the checkout itself outside git.

        Building from a copy of HEAD keeps files that are being edited in the
        checkout out of the plugin.
        """
        if not (REPO / ".git").exists():
            return REPO
        source = self.work / "source"
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"],
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
        return source

    def create(self) -> None:
        self.dockerd.docker("plugin", "create", self.name, str(self.plugin_dir), timeout=600)
        # The state directory must exist: dockerd does not create a bind mount's source.
        self.state_dir.mkdir(mode=0o700)
        self.set_mount_sources()

    def set_mount_sources(self) -> None:
        self.dockerd.docker("plugin", "set", self.name, f"state.source={self.state_dir}",
                            f"docker-socket.source={self.dockerd.socket}")

    def enable(self) -> None:
        result = self.dockerd.docker("plugin", "enable", self.name, check=False)
        assert result.returncode == 0, f"{result.stderr}\ndockerd log:\n{self.dockerd.log_tail(60)}"

    def disable(self) -> None:
        # dockerd counts every volume of the driver as a use of the plugin, mounted or not,
        # so disabling a plugin that has volumes takes --force.
        self.dockerd.docker("plugin", "disable", "--force", self.name)

    def rootfs(self) -> Path:
        """Return the plugin's rootfs inside the dockerd's data root."""
        plugin_id = self.inspect("{{.Id}}")
        return self.dockerd.root / "data" / "plugins" / plugin_id / "rootfs"

    def inspect(self, template: str) -> str:
        return self.dockerd.docker("plugin", "inspect", "--format", template, self.name).stdout.strip()

    def remove(self) -> None:
        self.dockerd.docker("plugin", "rm", "--force", self.name, check=False)


@pytest.fixture(scope="module")
def managed_plugin(dockerd: PrivateDockerd, busybox_image: str) -> Iterator[ManagedPlugin]:
    """The plugin built from a debootstrap rootfs, created with a private state dir and enabled."""
    work = Path(tempfile.mkdtemp(prefix="svp-", dir="/tmp"))
    plugin = ManagedPlugin(dockerd, work)
    try:
        plugin.build()
        plugin.create()
        plugin.enable()
        yield plugin
    finally:
        dockerd.remove_all_containers()
        volumes = dockerd.docker("volume", "ls", "-q", "--filter", f"driver={plugin.name}", check=False)
        for volume in volumes.stdout.split():
            dockerd.docker("volume", "rm", "--force", volume, check=False)
        plugin.remove()
        shutil.rmtree(work, ignore_errors=True)


def write_and_read(plugin: ManagedPlugin, image: str, volume: str, text: str) -> str:
    """Write *text* into *volume* from one container and return what a second container reads."""
    run_with_volume(plugin, image, volume, "sh", "-c", f"echo '{text}' > /data/secret.txt")
    return read_back(plugin, image, volume)


def read_back(plugin: ManagedPlugin, image: str, volume: str) -> str:
    return run_with_volume(plugin, image, volume, "cat", "/data/secret.txt")


def run_with_volume(plugin: ManagedPlugin, image: str, volume: str, *command: str) -> str:
    """Run *command* in a container with *volume* on /data; on failure, fail with the plugin's logs."""
    result = plugin.dockerd.run("--rm", "-v", f"{volume}:/data", image, *command, check=False)
    if result.returncode != 0:
        fuse_log = plugin.state_dir / "log" / f"{volume}.log"
        fuse_text = fuse_log.read_text(errors="replace") if fuse_log.exists() else "(no FUSE log)"
        pytest.fail(f"{' '.join(command)} failed: {result.stderr}\nFUSE log:\n{fuse_text}\n"
                    f"dockerd log:\n{plugin.dockerd.log_tail(40)}")
    return result.stdout


def assert_ciphertext_only(state_dir: Path, volume: str, plaintext: str) -> None:
    """Check that the volume's backing store contains files and none contains the plaintext or its name."""
    backing = state_dir / "volumes" / volume / "data"
    files = [path for path in backing.rglob("*") if path.is_file()]
    assert files, f"no files in the backing store {backing}"
    for path in files:
        assert plaintext.encode() not in path.read_bytes(), f"plaintext found in {path}"
        assert "secret" not in str(path.relative_to(backing)), f"plaintext name in {path}"


@pytest.mark.slow
@pytest.mark.docker
def test_managed_plugin_volume_roundtrip(managed_plugin: ManagedPlugin, busybox_image: str):
    plugin = managed_plugin
    plugin.dockerd.docker("volume", "create", "-d", plugin.name, "roundtrip")

    assert write_and_read(plugin, busybox_image, "roundtrip", PLAINTEXT) == PLAINTEXT + "\n"
    assert_ciphertext_only(plugin.state_dir, "roundtrip", PLAINTEXT)
    assert (plugin.rootfs() / "etc/securevol-build").read_text().startswith("securevol ")
    # The rootfs's pyfuse3 is built from source with its symbol table, so fallocate and DONT_MASK work there too.
    fuse_log = (plugin.state_dir / "log" / "roundtrip.log").read_text()
    assert "volume mounted" in fuse_log
    assert "libfuse session not found" not in fuse_log
    # The plugin's /sys is read-only: an INFO line, no warning an operator would chase.
    assert "read-ahead left at the kernel default" in fuse_log
    assert " WARNING " not in fuse_log
    assert plugin.dockerd.docker("volume", "inspect", "--format", "{{.Driver}}", "roundtrip").stdout.strip() \
        == f"{plugin.name}:latest"


@pytest.mark.slow
@pytest.mark.docker
def test_managed_plugin_set_and_reenable_keep_data(managed_plugin: ManagedPlugin, busybox_image: str):
    plugin = managed_plugin
    plugin.dockerd.docker("volume", "create", "-d", plugin.name, "reenable")
    write_and_read(plugin, busybox_image, "reenable", PLAINTEXT)

    plugin.disable()
    plugin.dockerd.docker("plugin", "set", plugin.name, "SECUREVOL_LOG_LEVEL=DEBUG")
    plugin.enable()

    assert "SECUREVOL_LOG_LEVEL=DEBUG" in plugin.inspect("{{json .Settings.Env}}")
    assert read_back(plugin, busybox_image, "reenable") == PLAINTEXT + "\n"
    assert "reenable" in plugin.dockerd.docker("volume", "ls", "--format", "{{.Name}}").stdout.split()


@pytest.mark.slow
@pytest.mark.docker
def test_managed_plugin_rekey_in_its_mount_namespace(managed_plugin: ManagedPlugin, busybox_image: str):
    """docs/install.md's way to rotate the KEK of a managed plugin: nsenter into the plugin's mounts."""
    plugin = managed_plugin
    plugin.dockerd.docker("volume", "create", "-d", plugin.name, "rekeyed")
    write_and_read(plugin, busybox_image, "rekeyed", PLAINTEXT)
    old_key = (plugin.state_dir / "master.key").read_bytes()

    # The commands of docs/install.md ("Admin commands"), with the test's plugin name.
    script = (
        f"id=$(docker plugin inspect -f '{{{{.Id}}}}' {plugin.name})\n"
        'pid=$(grep -l "$id" /proc/[0-9]*/cgroup | head -n 1 | cut -d/ -f3)\n'
        'nsenter --target "$pid" --mount -- /opt/securevol/bin/securevol rekey\n'
    )
    result = subprocess.run(["bash", "-ec", script], env=plugin.dockerd.env, capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 0, result.stderr
    assert "Rewrapped" in result.stdout
    assert (plugin.state_dir / "master.key").read_bytes() != old_key
    assert not (plugin.state_dir / "master.key.previous").exists()
    assert read_back(plugin, busybox_image, "rekeyed") == PLAINTEXT + "\n"


@pytest.mark.slow
@pytest.mark.docker
def test_managed_plugin_rejects_unsettable_value(managed_plugin: ManagedPlugin):
    plugin = managed_plugin
    plugin.disable()
    try:
        result = plugin.dockerd.docker("plugin", "set", plugin.name, "SECUREVOL_SOCKET=/tmp/x.sock", check=False)
    finally:
        plugin.enable()

    assert result.returncode != 0
    assert "not settable" in result.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_managed_plugin_upgrade_keeps_volumes(managed_plugin: ManagedPlugin, busybox_image: str):
    plugin = managed_plugin
    dockerd = plugin.dockerd
    dockerd.docker("volume", "create", "-d", plugin.name, "upgrade")
    write_and_read(plugin, busybox_image, "upgrade", PLAINTEXT)

    registry = Registry(plugin.work)
    try:
        # dockerd trusts plain-HTTP registries on 127.0.0.0/8 without --insecure-registry.
        remote = f"{registry.address}/{plugin.name}:v2"
        # A new build stamp makes v2's rootfs differ from the installed one, as a real upgrade's would.
        (plugin.plugin_dir / BUILD_STAMP).write_text("securevol upgrade test v2\n")
        dockerd.docker("plugin", "create", remote, str(plugin.plugin_dir), timeout=600)
        dockerd.docker("plugin", "push", remote, timeout=600)
        dockerd.docker("plugin", "rm", remote)

        plugin.disable()
        # Without --skip-remote-check the CLI prompts for confirmation because the names differ,
        # and reads "no" from an empty stdin while still exiting 0.
        dockerd.docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check",
                       plugin.name, remote, timeout=600)
        # dockerd 20.10 still shows the mount sources set before the upgrade, but
        # starts the upgraded plugin with config.json's defaults unless they are set again.
        plugin.set_mount_sources()
        plugin.enable()
    finally:
        registry.stop()

    assert plugin.inspect("{{.PluginReference}}") == remote
    assert (plugin.rootfs() / "etc/securevol-build").read_text() == "securevol upgrade test v2\n"
    assert read_back(plugin, busybox_image, "upgrade") == PLAINTEXT + "\n"
    assert_ciphertext_only(plugin.state_dir, "upgrade", PLAINTEXT)
