"""End-to-end tests: securevol volumes used by real containers of a private dockerd.

The module's plugin runs `securevol serve` on a socket in /run/docker/plugins
under a driver name unique to the run (see conftest.py), with its state in a
private temp dir. Each test makes its own volumes with unique names, so the
tests do not depend on each other's order.
"""

import base64
import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest

from tests.dockerd import DockerError, mounts_under

pytestmark = [pytest.mark.slow, pytest.mark.docker]

# Long enough to span several ciphertext blocks and distinctive enough that
# finding any 16-byte piece of it on disk means plaintext leaked.
PLAINTEXT = b"securevol end-to-end plaintext marker 0123456789 " * 2000
SECRET_FILE_NAME = "plaintext-name-marker-credentials.txt"

KEEP_RUNNING = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]


def new_volume_name() -> str:
    return f"e2e-{secrets.token_hex(4)}"


def create_volume(dockerd, plugin, *options: str) -> str:
    name = new_volume_name()
    args = []
    for option in options:
        args += ["-o", option]
    dockerd.docker("volume", "create", "-d", plugin.driver, *args, name)
    return name


def write_file_in_container(dockerd, image, volume, path, data: bytes) -> None:
    dockerd.docker(
        "run", "--rm", "-i", "--network", "none", "-v", f"{volume}:/data", image,
        "sh", "-c", f"cat > /data/{path}", input=data.decode(),
    )


def read_file_in_container(dockerd, image, volume, path) -> str:
    return dockerd.run("--rm", "-v", f"{volume}:/data", image, "cat", f"/data/{path}").stdout


def volume_names(dockerd, driver) -> list[str]:
    listing = dockerd.docker("volume", "ls", "--filter", f"driver={driver}", "--format", "{{.Name}}")
    return listing.stdout.split()


def backing_files(backing: Path) -> list[Path]:
    return [Path(root) / name for root, dirs, files in os.walk(backing) for name in dirs + files]


def fuse_process_pid(mountpoint: Path) -> int:
    """Return the PID of the FUSE process serving *mountpoint*, found by its command line."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"securevol.mount" in argv and str(mountpoint).encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no FUSE process serves {mountpoint}")


def wait_for_exit(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs {timeout} s after it was killed")


def volume_mountpoint(dockerd, volume: str) -> Path:
    """Return the mountpoint the plugin reports for *volume*, which must be mounted."""
    mountpoint = dockerd.docker("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()
    assert mountpoint, f"volume {volume} has no mountpoint, so it is not mounted"
    return Path(mountpoint)


def key_material(plugin, volume: str) -> list[bytes]:
    """Return the master key and the volume's DEK, unwrapped the way the daemon does it."""
    from securevol.keys.local import LocalKeyProvider, load_master_key

    master_key = load_master_key(plugin.state_dir / "master.key")
    volume_dir = plugin.state_dir / "volumes" / volume
    record = json.loads((volume_dir / "dek.json").read_text())
    volume_id = bytes.fromhex(json.loads((volume_dir / "volume.json").read_text())["volume_id"])
    dek = LocalKeyProvider(master_key).unwrap(record, volume_id)
    return [master_key, dek.raw()]


def encodings(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()]


def test_harness_container_runs(dockerd, busybox_image):
    result = dockerd.run("--rm", busybox_image, "sh", "-c", "echo hello")

    assert result.stdout == "hello\n"


def test_harness_container_has_no_network(dockerd, busybox_image):
    result = dockerd.run("--rm", busybox_image, "ls", "/sys/class/net")

    assert result.stdout.split() == ["lo"]


def test_volume_create_and_ls(dockerd, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)

    assert volume in volume_names(dockerd, securevol_plugin.driver)


def test_written_file_read_by_next_container(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)

    write_file_in_container(dockerd, busybox_image, volume, SECRET_FILE_NAME, PLAINTEXT)

    assert read_file_in_container(dockerd, busybox_image, volume, SECRET_FILE_NAME) == PLAINTEXT.decode()


def test_volume_options_reach_root_directory(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin, "uid=1234", "gid=2345", "mode=0750")

    result = dockerd.run("--rm", "-v", f"{volume}:/data", busybox_image, "stat", "-c", "%u %g %a", "/data")

    assert result.stdout.split() == ["1234", "2345", "750"]


def test_backing_store_has_only_ciphertext(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    write_file_in_container(dockerd, busybox_image, volume, SECRET_FILE_NAME, PLAINTEXT)
    dockerd.run("--rm", "-v", f"{volume}:/data", busybox_image, "mkdir", "/data/plaintext-directory-marker")

    backing = securevol_plugin.state_dir / "volumes" / volume / "data"
    files = backing_files(backing)
    stored = b"".join(path.read_bytes() for path in files if path.is_file() and not path.is_symlink())

    assert files, f"the backing store {backing} is empty"
    assert len(stored) >= len(PLAINTEXT), "the backing store is smaller than the plaintext written"
    for path in files:
        assert "marker" not in path.name, f"a backing store name contains plaintext: {path.name}"
    for start in range(0, len(PLAINTEXT) - 16, 16):
        piece = PLAINTEXT[start:start + 16]
        assert piece not in stored, f"plaintext bytes {piece!r} are in the backing store"


def test_state_directories_are_root_only(dockerd, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    state_dir = securevol_plugin.state_dir
    # The backing store's own root carries the volume's mode option; the
    # directories above it keep everyone but root out.
    for path in [state_dir, state_dir / "volumes", state_dir / "volumes" / volume, securevol_plugin.mount_root]:
        mode = path.stat().st_mode
        assert mode & 0o077 == 0, f"{path} has mode {mode & 0o7777:04o}, open to group or others"


def test_inspect_shows_no_key_material(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    container = dockerd.run("-d", "-v", f"{volume}:/data", busybox_image, *KEEP_RUNNING).stdout.strip()

    inspect = dockerd.docker("volume", "inspect", volume).stdout
    mountpoint = volume_mountpoint(dockerd, volume)
    fuse_pid = fuse_process_pid(mountpoint)
    fuse_cmdline = Path(f"/proc/{fuse_pid}/cmdline").read_bytes().decode(errors="replace")
    fuse_environ = Path(f"/proc/{fuse_pid}/environ").read_bytes().decode(errors="replace")
    dockerd.docker("rm", "-f", container)

    assert json.loads(inspect)[0]["Driver"] == securevol_plugin.driver
    for secret in key_material(securevol_plugin, volume):
        for text in encodings(secret):
            assert text not in inspect, "docker volume inspect shows key material"
            assert text not in fuse_cmdline, "the FUSE process's arguments contain key material"
            assert text not in fuse_environ, "the FUSE process's environment contains key material"
            assert text not in securevol_plugin.log_text(), "the plugin's log contains key material"
    assert "wrapped_key" not in inspect


def test_unknown_option_error_is_one_sentence(dockerd, securevol_plugin):
    result = dockerd.docker("volume", "create", "-d", securevol_plugin.driver, "-o", "colour=blue",
                            new_volume_name(), check=False)

    assert result.returncode != 0
    assert "colour" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_key_option_rejected_with_reason(dockerd, securevol_plugin):
    result = dockerd.docker("volume", "create", "-d", securevol_plugin.driver, "-o", "passphrase=hunter2",
                            new_volume_name(), check=False)

    assert result.returncode != 0
    assert "key provider" in result.stderr
    assert "hunter2" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("name", ["..", "-leading-dash", "a" * 200])
def test_invalid_volume_name_rejected(dockerd, securevol_plugin, name):
    volumes_dir = securevol_plugin.state_dir / "volumes"
    before = sorted(os.listdir(volumes_dir)) if volumes_dir.exists() else []

    result = dockerd.docker("volume", "create", "-d", securevol_plugin.driver, "--", name, check=False)

    after = sorted(os.listdir(volumes_dir)) if volumes_dir.exists() else []
    assert result.returncode != 0
    assert "name" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert after == before


def test_allowlist_admits_only_named_container(dockerd, busybox_image, securevol_plugin):
    allowed = f"allowed-{secrets.token_hex(4)}"
    volume = create_volume(dockerd, securevol_plugin, f"allow=name:{allowed}")

    dockerd.run("--rm", "--name", allowed, "-v", f"{volume}:/data", busybox_image,
                "sh", "-c", "echo for the allowed container > /data/allowed.txt")
    refused = dockerd.run("--rm", "--name", f"other-{secrets.token_hex(4)}", "-v", f"{volume}:/data",
                          busybox_image, "cat", "/data/allowed.txt", check=False)
    reread = dockerd.run("--rm", "--name", allowed, "-v", f"{volume}:/data", busybox_image, "cat", "/data/allowed.txt")

    assert refused.returncode != 0, "a container not on the allowlist mounted the volume"
    assert volume in refused.stderr
    assert "for the allowed container" not in refused.stdout
    assert reread.stdout == "for the allowed container\n"


def test_docker_cp_keeps_volume_mounted(dockerd, busybox_image, securevol_plugin, tmp_path):
    volume = create_volume(dockerd, securevol_plugin)
    container = dockerd.run("-d", "-v", f"{volume}:/data", busybox_image, *KEEP_RUNNING).stdout.strip()
    mountpoint = volume_mountpoint(dockerd, volume)
    copied = tmp_path / "copied.txt"
    copied.write_text("copied in\n")

    dockerd.docker("cp", str(copied), f"{container}:/data/copied.txt")
    dockerd.docker("cp", f"{container}:/data/copied.txt", str(tmp_path / "copied-back.txt"))

    assert str(mountpoint) in mounts_under(mountpoint.parent), "docker cp unmounted the running container's volume"
    dockerd.docker("exec", container, "sh", "-c", "echo still writable > /data/after-cp.txt")
    assert dockerd.docker("exec", container, "cat", "/data/copied.txt").stdout == "copied in\n"
    assert dockerd.docker("exec", container, "cat", "/data/after-cp.txt").stdout == "still writable\n"
    assert (tmp_path / "copied-back.txt").read_text() == "copied in\n"
    dockerd.docker("rm", "-f", container)


def test_volume_rm_destroys_data(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    write_file_in_container(dockerd, busybox_image, volume, SECRET_FILE_NAME, PLAINTEXT)
    volume_dir = securevol_plugin.state_dir / "volumes" / volume

    dockerd.docker("volume", "rm", volume)

    assert volume not in volume_names(dockerd, securevol_plugin.driver)
    assert not volume_dir.exists()
    recreated = dockerd.docker("volume", "create", "-d", securevol_plugin.driver, volume)
    assert recreated.returncode == 0
    listing = dockerd.run("--rm", "-v", f"{volume}:/data", busybox_image, "ls", "-A", "/data").stdout
    assert listing == "", "a volume created again under the same name shows the old files"
    dockerd.docker("volume", "rm", volume)


def test_volume_rm_rejected_while_in_use(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    container = dockerd.run("-d", "-v", f"{volume}:/data", busybox_image, *KEEP_RUNNING).stdout.strip()

    result = dockerd.docker("volume", "rm", volume, check=False)

    assert result.returncode != 0
    assert volume in volume_names(dockerd, securevol_plugin.driver)
    dockerd.docker("rm", "-f", container)


def test_plugin_restart_keeps_container_running(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    container = dockerd.run("-d", "-v", f"{volume}:/data", busybox_image, *KEEP_RUNNING).stdout.strip()
    dockerd.docker("exec", container, "sh", "-c", "echo before restart > /data/before.txt")

    securevol_plugin.kill()
    dockerd.docker("exec", container, "sh", "-c", "echo while down > /data/down.txt")
    securevol_plugin.start()

    dockerd.docker("exec", container, "sh", "-c", "echo after restart > /data/after.txt")
    assert dockerd.docker("exec", container, "cat", "/data/before.txt", "/data/down.txt").stdout == (
        "before restart\nwhile down\n"
    )
    assert volume in volume_names(dockerd, securevol_plugin.driver)
    listing = dockerd.run("--rm", "-v", f"{volume}:/data", busybox_image, "cat",
                          "/data/before.txt", "/data/down.txt", "/data/after.txt").stdout
    assert listing == "before restart\nwhile down\nafter restart\n"
    dockerd.docker("rm", "-f", container)


def test_killed_fuse_process_then_remount(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    write_file_in_container(dockerd, busybox_image, volume, "kept.txt", b"kept\n")
    container = dockerd.run("-d", "-v", f"{volume}:/data", busybox_image, *KEEP_RUNNING).stdout.strip()
    fuse_pid = fuse_process_pid(volume_mountpoint(dockerd, volume))

    os.kill(fuse_pid, signal.SIGKILL)
    wait_for_exit(fuse_pid)

    # The kernel fails every request on a FUSE connection whose server died with ENOTCONN.
    broken_read = dockerd.docker("exec", container, "cat", "/data/kept.txt", check=False)
    broken_write = dockerd.docker("exec", container, "sh", "-c", "echo lost > /data/lost.txt", check=False)
    assert broken_read.returncode != 0, "a container read its volume after the FUSE process was killed"
    assert "Transport endpoint is not connected" in broken_read.stderr
    assert broken_write.returncode != 0, "a container wrote to its volume after the FUSE process was killed"
    assert read_file_in_container(dockerd, busybox_image, volume, "kept.txt") == "kept\n"
    dockerd.docker("rm", "-f", container)
    assert read_file_in_container(dockerd, busybox_image, volume, "kept.txt") == "kept\n"


def test_container_restart_remounts_volume(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    container = dockerd.run("-d", "-v", f"{volume}:/data", busybox_image, *KEEP_RUNNING).stdout.strip()
    dockerd.docker("exec", container, "sh", "-c", "echo first run > /data/run.txt")

    dockerd.docker("restart", "--time", "5", container)

    assert dockerd.docker("exec", container, "cat", "/data/run.txt").stdout == "first run\n"
    mountpoint = volume_mountpoint(dockerd, volume)
    assert str(mountpoint) in mounts_under(securevol_plugin.mount_root)
    dockerd.docker("rm", "-f", container)
    assert str(mountpoint) not in mounts_under(securevol_plugin.mount_root), (
        "the volume stayed mounted after its only container was removed"
    )


def test_image_content_copied_into_new_volume(dockerd, busybox_image, securevol_plugin):
    # Docker copies an image's files into an empty volume mounted over them,
    # with owner and mode, through the FUSE mount: tar extraction with chown.
    seeded_image = f"{busybox_image}-seeded-{secrets.token_hex(4)}"
    builder = dockerd.run("-d", busybox_image, "sh", "-c",
                          "mkdir /seed && echo seeded > /seed/file && chown 99:98 /seed/file && chmod 0711 /seed")
    dockerd.docker("wait", builder.stdout.strip())
    dockerd.docker("commit", builder.stdout.strip(), seeded_image)
    volume = create_volume(dockerd, securevol_plugin)

    result = dockerd.run("--rm", "-v", f"{volume}:/seed", seeded_image, "sh", "-c",
                         "cat /seed/file && stat -c '%u %g' /seed/file && stat -c '%a' /seed")

    assert result.stdout.split("\n")[:3] == ["seeded", "99 98", "711"]
    dockerd.docker("rm", "-f", builder.stdout.strip())
    dockerd.docker("image", "rm", seeded_image)


def test_two_containers_share_volume(dockerd, busybox_image, securevol_plugin):
    volume = create_volume(dockerd, securevol_plugin)
    first = dockerd.run("-d", "-v", f"{volume}:/data", busybox_image, *KEEP_RUNNING).stdout.strip()
    second = dockerd.run("-d", "-v", f"{volume}:/data", busybox_image, *KEEP_RUNNING).stdout.strip()

    dockerd.docker("exec", first, "sh", "-c", "echo from first > /data/shared.txt")
    dockerd.docker("rm", "-f", first)

    assert dockerd.docker("exec", second, "cat", "/data/shared.txt").stdout == "from first\n"
    dockerd.docker("rm", "-f", second)


def test_docker_error_names_exit_code(dockerd, busybox_image):
    with pytest.raises(DockerError) as raised:
        dockerd.run("--rm", busybox_image, "sh", "-c", "exit 3")

    assert raised.value.returncode == 3
