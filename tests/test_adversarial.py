"""Attacks on securevol from an adversarial review, each a test that the attack fails.

The FUSE tests run a real securevol FUSE process with an access file. The test
runner is a host process, so the ``host`` rule decides whether it may use the
volume, and removing that rule revokes it.
"""

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

import pytest

from securevol.access import AccessPolicy, update_access_file, write_access_file
from tests.fs_helpers import FuseMount, require_fuse
from tests.plugin_server import PluginServer

BLOCK = 4096
REVOKE_TIMEOUT = 30.0


class GuardedMount(FuseMount):
    """A FuseMount that serves GuardedOperations, checking each caller against *access_file*."""

    def __init__(self, *args, access_file: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.access_file = access_file

    def command_args(self) -> list[str]:
        return super().command_args() + ["--access-file", str(self.access_file)]


def host_policy(tmp_path: Path, allow: str | None) -> AccessPolicy:
    return AccessPolicy(volume="testvol", allow=allow, deny_by_default=False,
                        docker_socket="unix:///nonexistent/docker.sock",
                        audit_log=str(tmp_path / "audit.jsonl"))


@pytest.fixture
def guarded(tmp_path):
    """Return a function that mounts the backing store under an access file allowing *allow*."""
    require_fuse()
    mounts: list[GuardedMount] = []

    def start(allow: str | None) -> GuardedMount:
        access_file = tmp_path / "access.json"
        write_access_file(access_file, host_policy(tmp_path, allow))
        mount = GuardedMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log",
                             access_file=access_file)
        mounts.append(mount)
        mount.start()
        return mount

    yield start
    for mount in mounts:
        mount.cleanup()


def revoke_host(mount: GuardedMount, new_allow: str) -> None:
    """Replace the allowlist and wait until the FUSE process refuses the test runner's new requests."""
    update_access_file(mount.access_file, new_allow)
    deadline = time.monotonic() + REVOKE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.listdir(mount.mountpoint)
        except PermissionError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the FUSE process kept allowing the host after the allowlist became {new_allow!r}")


def policy_loads(mount: GuardedMount) -> int:
    return sum("access policy loaded" in line for line in mount.log_lines())


def wait_for_policy_load(mount: GuardedMount, loads_before: int) -> None:
    """Wait until the FUSE process has loaded its access file again since *loads_before* loads."""
    deadline = time.monotonic() + REVOKE_TIMEOUT
    while time.monotonic() < deadline:
        # opendir is checked, so it makes the FUSE process look at its access file;
        # a lookup might not, because the kernel caches negative entries.
        os.listdir(mount.mountpoint)
        if policy_loads(mount) > loads_before:
            return
        time.sleep(0.1)
    raise AssertionError("the FUSE process did not load its changed access file")


def write_file_then_remount(guarded, allow: str, name: str, data: bytes) -> GuardedMount:
    """Write *data* through one mount, then serve it from a new one, so no page of it is cached."""
    first = guarded(allow)
    (first.mountpoint / name).write_bytes(data)
    first.stop()
    return guarded(allow)


def test_revoked_file_handle_cannot_read(guarded):
    data = os.urandom(1024 * BLOCK) + b"distinctive tail"
    mount = write_file_then_remount(guarded, "host", "secret.bin", data)
    fd = os.open(mount.mountpoint / "secret.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, BLOCK, 0) == data[:BLOCK]

        revoke_host(mount, "name:web")

        # The last block was never read, so the kernel has to ask the FUSE process for it.
        with pytest.raises(PermissionError):
            os.pread(fd, BLOCK, len(data) - 16)
    finally:
        os.close(fd)


def test_revoked_dir_handle_cannot_list(guarded):
    mount = write_file_then_remount(guarded, "host", "plaintext-name.txt", b"x")
    fd = os.open(mount.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        revoke_host(mount, "name:web")

        with pytest.raises(OSError) as raised:
            os.listdir(fd)
        assert raised.value.errno == errno.EACCES
    finally:
        os.close(fd)


def test_allowed_handle_keeps_reading(guarded):
    data = os.urandom(1024 * BLOCK)
    mount = write_file_then_remount(guarded, "host", "kept.bin", data)
    fd = os.open(mount.mountpoint / "kept.bin", os.O_RDONLY)
    try:
        loads_before = policy_loads(mount)
        update_access_file(mount.access_file, "host,name:web")
        wait_for_policy_load(mount, loads_before)

        assert os.pread(fd, BLOCK, len(data) - BLOCK) == data[-BLOCK:]
    finally:
        os.close(fd)


# -- key material in core dumps ----------------------------------------------------------------


def core_file_limits(pid: int) -> tuple[str, str]:
    """Return the soft and hard RLIMIT_CORE of *pid* as /proc/PID/limits shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError(f"/proc/{pid}/limits has no core file size line")


def test_fuse_process_dumps_no_core(tmp_path):
    require_fuse()
    mount = FuseMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    mount.start()
    try:
        # The hard limit too, or the process (holding the DEK) could raise it again.
        assert core_file_limits(mount.pid) == ("0", "0")
    finally:
        mount.cleanup()


def test_daemon_and_workers_dump_no_core():
    with PluginServer(workers=2) as server:
        pids = [server.process.pid, *server.wait_for_workers(2)]
        for pid in pids:
            assert core_file_limits(pid) == ("0", "0"), f"process {pid}"


# -- key provider settings ---------------------------------------------------------------------


def test_missing_master_key_not_replaced_while_volumes_exist():
    server = PluginServer(workers=1)
    server.start()
    try:
        assert server.call("Create", {"Name": "kept"}).err == ""
        server.stop()
        # As if the administrator moved the key elsewhere and forgot SECUREVOL_MASTER_KEY.
        old_key = server.state_dir / "master.key"
        old_key.rename(server.base_dir / "moved.key")

        with pytest.raises(RuntimeError, match="master key file .* is missing"):
            server.start()
        assert not old_key.exists()
    finally:
        server.cleanup()


def test_master_key_created_when_volumes_use_none():
    with PluginServer(workers=1) as server:
        assert server.call("Create", {"Name": "first"}).err == ""
        assert (server.state_dir / "master.key").is_file()


# -- volume records ------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="mounting needs /dev/fuse and root")
def test_create_keeps_volume_that_lost_its_record():
    with PluginServer(workers=1) as server:
        assert server.call("Create", {"Name": "data"}).err == ""
        mountpoint = Path(server.call("Mount", {"Name": "data", "ID": "m1"}).json["Mountpoint"])
        (mountpoint / "table").write_bytes(b"rows" * 1000)
        assert server.call("Unmount", {"Name": "data", "ID": "m1"}).err == ""

        volume_dir = server.volume_dir("data")
        wrapped_dek = (volume_dir / "dek.json").read_bytes()
        (volume_dir / "volume.json").unlink()

        # dockerd sends Create for a name that Get does not find, e.g. for 'docker run -v data:/x'.
        response = server.call("Create", {"Name": "data"})

        assert "volume.json" in response.err
        assert (volume_dir / "dek.json").read_bytes() == wrapped_dek
        assert len(os.listdir(volume_dir / "data")) > 1


# -- death of the FUSE process -------------------------------------------------------------------


def test_closed_and_fsynced_writes_survive_kill(tmp_path):
    require_fuse()
    mount = FuseMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    mount.start()
    try:
        closed = {f"closed-{index}": os.urandom(20000 + index) for index in range(20)}
        for name, data in closed.items():
            (mount.mountpoint / name).write_bytes(data)
        synced = os.urandom(50000)
        fd = os.open(mount.mountpoint / "synced", os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, synced)
        os.fsync(fd)

        os.kill(mount.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.close(fd)  # ENOTCONN: the process that would flush it is gone
        mount.cleanup()
        mount.start()

        for name, data in closed.items():
            assert (mount.mountpoint / name).read_bytes() == data, name
        assert (mount.mountpoint / "synced").read_bytes() == synced
    finally:
        mount.cleanup()


@pytest.mark.xfail(strict=True, reason="the kernel answers a cached entry without asking the FUSE process, "
                                       "so a refused caller can stat names an allowed one looked up")
def test_refused_caller_cannot_stat_cached_name(guarded):
    mount = guarded("host")
    (mount.mountpoint / "plaintext-name.txt").write_bytes(b"x" * 1234)

    revoke_host(mount, "name:web")

    with pytest.raises(PermissionError):
        os.stat(mount.mountpoint / "plaintext-name.txt")
