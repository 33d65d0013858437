"""A private dockerd for tests, and the offline busybox image the tests run.

Each test run starts its own dockerd on private directories and a private
socket, so that it never touches the host's Docker state or another run's.
No image registry is reachable here, so the test image is built from the
host's statically linked busybox.

Volume plugins are the exception to that isolation: dockerd 20.10 discovers
v1 plugins only in /run/docker/plugins (and /etc/docker/plugins,
/usr/lib/docker/plugins), which every dockerd on the host shares. So each run
gives its plugin a unique name (`unique_driver_name`) and socket
(`plugin_socket_path`) and removes the socket at the end.
"""

import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PLUGIN_DIR = Path("/run/docker/plugins")
BUSYBOX = Path("/bin/busybox")
DOCKER_CLI = shutil.which("docker") or "/usr/local/bin/docker"

# Default time limit of one docker CLI command, in seconds. A container that
# blocks on a hung FUSE mount must fail the test, not hang the run.
DOCKER_TIMEOUT = 120


class DockerError(Exception):
    """A docker CLI command exited non-zero; carries its arguments, exit code and output."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(f"docker {' '.join(args)} exited {returncode}: {stderr.strip() or stdout.strip()}")
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def unique_driver_name(prefix: str = "securevol-test") -> str:
    """Return a plugin name no other test run on this host uses, e.g. ``securevol-test-3f9a0c1d``."""
    return f"{prefix}-{secrets.token_hex(4)}"


def plugin_socket_path(driver_name: str) -> Path:
    """Return the socket path where dockerd discovers the v1 plugin *driver_name*."""
    return PLUGIN_DIR / f"{driver_name}.sock"


class PrivateDockerd:
    """A dockerd with its own data root, exec root and socket under a short temp dir.

    The exec root contains containerd's and the shims' Unix sockets, whose paths
    are limited to 108 bytes, so the temp dir sits directly under /tmp.
    *extra_args* go to dockerd as they are, e.g. ``["--authorization-plugin=NAME"]``.
    """

    def __init__(self, extra_args: list[str] | tuple[str, ...] = ()) -> None:
        self.extra_args = list(extra_args)
        self.root = Path(tempfile.mkdtemp(prefix="svd-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.log_path = self.root / "dockerd.log"
        self.host = f"unix://{self.socket}"
        self.pid: int | None = None
        self._process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"PrivateDockerd(root={self.root}, pid={self.pid})"

    @property
    def env(self) -> dict[str, str]:
        """Return the environment for a docker CLI (or compose) that talks to this dockerd."""
        env = dict(os.environ)
        env["DOCKER_HOST"] = self.host
        # A private config dir keeps the CLI away from the host's contexts and credentials.
        env["DOCKER_CONFIG"] = str(self.root / "cli")
        return env

    def start(self, timeout: float = 60) -> None:
        """Start dockerd and wait until it responds on its socket, or raise RuntimeError."""
        command = [
            "dockerd",
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "-H", self.host,
            "--pidfile", str(self.pidfile),
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._process.pid
        log.info("dockerd starting pid=%d root=%s", self.pid, self.root)

        self._wait_ready(timeout)
        log.info("dockerd ready pid=%d", self.pid)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with status {self._process.returncode} before it was ready:\n{self.log_tail()}"
                )
            probe = subprocess.run(
                [DOCKER_CLI, "version", "--format", "{{.Server.Version}}"],
                env=self.env, capture_output=True, text=True, timeout=30,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dockerd did not respond on {self.socket} within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """Return the last *lines* lines of dockerd's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no dockerd log)"
        return "\n".join(text.splitlines()[-lines:])

    def docker(self, *args: str, check: bool = True, input: str | None = None,
               timeout: float = DOCKER_TIMEOUT) -> subprocess.CompletedProcess:
        """Run the docker CLI against this dockerd and return the finished process (text output).

        Raises DockerError if *check* is set and the command exits non-zero.
        """
        result = subprocess.run(
            [DOCKER_CLI, *args], env=self.env, input=input, capture_output=True, text=True,
            timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise DockerError(list(args), result.returncode, result.stdout, result.stderr)
        return result

    def run(self, *args: str, check: bool = True, timeout: float = DOCKER_TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``docker run --network none ARGS``: test containers never get a network."""
        return self.docker("run", "--network", "none", *args, check=check, timeout=timeout)

    def remove_all_containers(self) -> None:
        """Force-remove every container of this dockerd, running or not."""
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)

    def stop(self, timeout: float = 60) -> None:
        """Stop dockerd by PID (SIGTERM, then SIGKILL) and delete its directories.

        dockerd stops its own containerd on SIGTERM. Mounts left under the
        private directory are unmounted first. The directories are kept if
        anything stays mounted, because deleting through a mount would delete
        its contents.
        """
        self._terminate(timeout)
        self._unmount_leftovers()
        leftover = mounts_under(self.root)
        if leftover:
            log.warning("dockerd left mounts; keeping root=%s mounts=%s", self.root, leftover)
            return
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self, timeout: float = 60) -> None:
        """Stop dockerd with SIGTERM, as a service manager would, and start it again on the same directories."""
        self._terminate(timeout)
        self.start(timeout)

    def _terminate(self, timeout: float) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("dockerd did not stop on SIGTERM pid=%d; sending SIGKILL", self.pid)
            self._process.kill()
            self._process.wait(30)
        log.info("dockerd stopped pid=%d status=%s", self.pid, self._process.returncode)

    def _unmount_leftovers(self) -> None:
        # A dockerd killed before its clean shutdown leaves its own mounts
        # here: the data root made shared for managed plugins, container
        # overlays. Deepest first, so that no parent is busy with a child.
        for mountpoint in sorted(mounts_under(self.root), reverse=True):
            if subprocess.run(["umount", mountpoint], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def mounts_under(directory: Path) -> list[str]:
    """Return the mount points at or below *directory*, from /proc/self/mountinfo."""
    prefix = str(directory).rstrip("/") + "/"
    mountpoints = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and other specials octal-escaped.
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint == prefix.rstrip("/") or mountpoint.startswith(prefix):
                mountpoints.append(mountpoint)
    return mountpoints


def build_busybox_image(dockerd: PrivateDockerd, name: str) -> str:
    """Import a one-layer image of the host's static busybox into *dockerd* as *name*; return *name*.

    Every applet is a symlink to /bin/busybox, except the ``busybox`` applet
    itself, whose symlink would replace the binary. The image has no /data, so
    a volume mounted there gets no copy of an image directory's owner and mode
    (Docker copies those into an empty volume whose mount path exists in the image).
    """
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} is missing; run scripts/setup.sh to install busybox-static")

    with tempfile.TemporaryDirectory(prefix="svimg-") as rootfs:
        bin_dir = Path(rootfs) / "bin"
        bin_dir.mkdir()
        shutil.copy2(BUSYBOX, bin_dir / "busybox")
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (bin_dir / applet).symlink_to("busybox")
        for directory in ("tmp", "proc", "sys", "dev", "etc"):
            (Path(rootfs) / directory).mkdir()

        archive = subprocess.run(["tar", "-C", rootfs, "-c", "."], capture_output=True, check=True).stdout
    imported = subprocess.run(
        [DOCKER_CLI, "import", "--change", "ENV PATH=/bin", "-", name],
        env=dockerd.env, input=archive, capture_output=True, timeout=DOCKER_TIMEOUT,
    )
    if imported.returncode != 0:
        raise DockerError(["import", name], imported.returncode, "", imported.stderr.decode(errors="replace"))
    log.info("test image imported name=%s applets=%d", name, len(applets))
    return name
