"""Starting, checking and stopping the FUSE process of a volume.

The contract with the FUSE process (``python -m securevol.mount``) is in
docs/architecture.md: the DEK arrives on a pipe, the process detaches itself,
and it reports ``ready PID`` or ``error MESSAGE`` on another pipe. Because it
detaches, it is not a child of the daemon: it is checked and stopped by PID,
and before a signal is sent the PID is confirmed to still belong to a
``securevol.mount`` process serving the expected mountpoint.
"""

import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from securevol.crypto import DataKey
from securevol.errors import MountFailed

log = logging.getLogger(__name__)

# Environment variables a FUSE process may inherit. Everything else, such as
# a KMS token, stays in the daemon.
_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH")

_READY_LINE_MAX = 4096
_POLL_INTERVAL = 0.05


@dataclass(frozen=True)
class FuseLaunch:
    """Everything needed to start one volume's FUSE process."""

    volume: str
    volume_id: str  # hex
    backing: Path
    mountpoint: Path
    log_file: Path
    log_level: str
    access_file: Path | None = None  # the volume's allowlist for the FUSE process (securevol.access)


class Mounter:
    """Starts, checks and stops FUSE processes, keeping no state between calls."""

    def __init__(self, mount_timeout: float, stop_timeout: float = 10.0) -> None:
        self.mount_timeout = mount_timeout
        self.stop_timeout = stop_timeout

    # -- starting ------------------------------------------------------------

    def start(self, launch: FuseLaunch, dek: DataKey) -> int:
        """Start the FUSE process, hand it the DEK and return its PID once it reports ready.

        Raises MountFailed if it reports an error, exits, or stays silent for
        longer than the mount timeout.
        """
        launch.mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_r, key_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            process = self._spawn(launch, key_r, ready_w)
        finally:
            os.close(key_r)
            os.close(ready_w)

        try:
            _send_key(key_w, dek)
            line = _read_ready_line(ready_r, self.mount_timeout)
        finally:
            os.close(key_w)
            os.close(ready_r)

        return self._finish_start(launch, process, line)

    def _spawn(self, launch: FuseLaunch, key_fd: int, ready_fd: int) -> subprocess.Popen:
        args = [
            sys.executable, "-m", "securevol.mount",
            "--volume", launch.volume,
            "--volume-id", launch.volume_id,
            "--backing", str(launch.backing),
            "--mountpoint", str(launch.mountpoint),
            "--key-fd", str(key_fd),
            "--ready-fd", str(ready_fd),
            "--log-file", str(launch.log_file),
            "--log-level", launch.log_level,
        ]
        if launch.access_file is not None:
            args += ["--access-file", str(launch.access_file)]
        launch.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_fd = os.open(launch.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # A new session keeps the FUSE process out of the daemon's process
            # group, so a Ctrl-C or a signal to gunicorn's group does not end it.
            return subprocess.Popen(
                args,
                pass_fds=(key_fd, ready_fd),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd="/",
                env={name: os.environ[name] for name in _INHERITED_ENV if name in os.environ},
                start_new_session=True,
            )
        finally:
            os.close(log_fd)

    def _finish_start(self, launch: FuseLaunch, process: subprocess.Popen, line: str | None) -> int:
        name = launch.volume
        if line is not None and line.startswith("ready "):
            pid = _parse_pid(line)
            _reap_launcher(process, name)
            if pid is None:
                self._abandon_start(launch, process)
                raise MountFailed(f"The FUSE process of volume {name!r} sent an invalid ready line.")
            return pid

        self._abandon_start(launch, process)
        if line is not None and line.startswith("error "):
            reason = line[len("error "):].strip().rstrip(".")
            raise MountFailed(f"Volume {name!r} could not be mounted: {reason}.")
        if line is None:
            raise MountFailed(
                f"The FUSE process of volume {name!r} did not report ready within "
                f"{self.mount_timeout:g} seconds; see {launch.log_file}."
            )
        # The launcher exits 0 once it has forked, so a failure shows only in
        # its status when it ended before forking.
        status = f" (exit status {process.returncode})" if process.returncode else ""
        raise MountFailed(
            f"The FUSE process of volume {name!r} ended without reporting ready{status}; see {launch.log_file}."
        )

    def _abandon_start(self, launch: FuseLaunch, process: subprocess.Popen) -> None:
        # The launcher is our child. Its detached FUSE process did not report
        # a PID, so it is found by its command line. One that hangs before
        # serving requests would otherwise keep the mountpoint forever.
        if process.poll() is None:
            process.kill()
        process.wait()
        for pid in find_fuse_processes(launch.mountpoint):
            log.warning("fuse process killed after failed start vol=%s pid=%d", launch.volume, pid)
            _signal_fuse_process(pid, launch.mountpoint, signal.SIGKILL)
        if is_mounted(launch.mountpoint):
            _run_fusermount(launch.mountpoint, lazy=True)

    # -- checking ------------------------------------------------------------

    def is_serving(self, pid: int | None, mountpoint: Path, mounted: set[bytes] | None = None) -> bool:
        """Tell whether *pid* is the live FUSE process of *mountpoint* and the mount is in place.

        *mounted* is the result of ``fuse_mountpoints()`` when the caller has read it already.
        """
        if pid is None or not is_fuse_process(pid, mountpoint):
            return False
        if mounted is None:
            return is_mounted(mountpoint)
        return os.fsencode(str(mountpoint)) in mounted

    # -- stopping ------------------------------------------------------------

    def stop(self, pid: int | None, mountpoint: Path) -> None:
        """Unmount *mountpoint* and make sure its FUSE process *pid* ends.

        An orderly ``fusermount3 -u`` lets the process write pending data
        and exit 0; if the mount is busy it is detached lazily. A process
        that outlives the unmount gets SIGTERM, then SIGKILL.
        """
        if is_mounted(mountpoint) and not _run_fusermount(mountpoint, lazy=False):
            log.warning("unmount busy, detaching lazily mountpoint=%s", mountpoint)
            _run_fusermount(mountpoint, lazy=True)

        if pid is None:
            return
        if self._wait_for_exit(pid, mountpoint, self.stop_timeout):
            return

        for sig in (signal.SIGTERM, signal.SIGKILL):
            log.warning("fuse process still running, sending %s pid=%d", sig.name, pid)
            if not _signal_fuse_process(pid, mountpoint, sig):
                return
            if self._wait_for_exit(pid, mountpoint, self.stop_timeout):
                break
        if is_mounted(mountpoint):
            _run_fusermount(mountpoint, lazy=True)

    def clear_stale(self, pid: int | None, mountpoint: Path) -> None:
        """Stop every FUSE process of *mountpoint*, recorded as *pid* or not, then detach its mount."""
        if pid is not None and is_fuse_process(pid, mountpoint):
            self.stop(pid, mountpoint)
        for stray_pid in find_fuse_processes(mountpoint):
            log.warning("stray fuse process stopped pid=%d mountpoint=%s", stray_pid, mountpoint)
            self.stop(stray_pid, mountpoint)
        if is_mounted(mountpoint):
            log.warning("stale mount detached mountpoint=%s", mountpoint)
            _run_fusermount(mountpoint, lazy=True)

    @staticmethod
    def _wait_for_exit(pid: int, mountpoint: Path, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while is_fuse_process(pid, mountpoint):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)
        return True


# -- helpers -----------------------------------------------------------------


def _send_key(key_fd: int, dek: DataKey) -> None:
    # 32 bytes fit in any pipe buffer, so this write does not block.
    try:
        os.write(key_fd, dek.raw())
    except BrokenPipeError:
        pass  # the process died before reading; its status explains why


def _read_ready_line(ready_fd: int, timeout: float) -> str | None:
    """Return the first line the FUSE process wrote, "" on EOF without a line, None on timeout."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([ready_fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(ready_fd, _READY_LINE_MAX)
        if not chunk:
            return buffer.decode("utf-8", "replace") if buffer else ""
        buffer += chunk
        if len(buffer) > _READY_LINE_MAX:
            break
    return buffer.split(b"\n", 1)[0].decode("utf-8", "replace")


def _parse_pid(line: str) -> int | None:
    fields = line.split()
    if len(fields) == 2 and fields[1].isdigit():
        return int(fields[1])
    return None


def _reap_launcher(process: subprocess.Popen, volume: str) -> None:
    # The launcher forks the FUSE process and exits at once; reap it so no
    # zombie remains in the gunicorn worker.
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("fuse launcher did not detach vol=%s pid=%d", volume, process.pid)


def is_fuse_process(pid: int, mountpoint: Path) -> bool:
    """Tell whether *pid* is a running ``securevol.mount`` process for *mountpoint*.

    The check on the command line guards against a PID reused by another
    process after the FUSE process died.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if state in (b"Z", b"X") or b"securevol.mount" not in argv or b"--mountpoint" not in argv:
        return False
    value_index = argv.index(b"--mountpoint") + 1
    return value_index < len(argv) and argv[value_index] == os.fsencode(str(mountpoint))


def find_fuse_processes(mountpoint: Path) -> list[int]:
    """Return the PIDs of all running ``securevol.mount`` processes for *mountpoint*."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and is_fuse_process(int(entry.name), mountpoint):
            pids.append(int(entry.name))
    return pids


def _signal_fuse_process(pid: int, mountpoint: Path, sig: signal.Signals) -> bool:
    """Send *sig* to *pid* if it is still the FUSE process of *mountpoint*; return False if it was gone."""
    if not is_fuse_process(pid, mountpoint):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def is_mounted(mountpoint: Path) -> bool:
    """Tell whether a FUSE filesystem is mounted at *mountpoint* in this mount namespace."""
    return os.fsencode(str(mountpoint)) in fuse_mountpoints()


def fuse_mountpoints() -> set[bytes]:
    """Return the mountpoints of every FUSE filesystem in this mount namespace, as bytes."""
    mountpoints = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            separator = fields.index(b"-")
            fs_type = fields[separator + 1]
            if fs_type.split(b".")[0] in (b"fuse", b"fuseblk"):
                mountpoints.add(_unescape_mountinfo(fields[4]))
    return mountpoints


def _unescape_mountinfo(field: bytes) -> bytes:
    # The kernel writes space, tab, newline and backslash as \ooo octal escapes.
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == ord("\\") and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def _run_fusermount(mountpoint: Path, lazy: bool) -> bool:
    args = ["fusermount3", "-uz" if lazy else "-u", str(mountpoint)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        if not is_mounted(mountpoint):
            return True  # someone else unmounted it in the meantime
        log.warning(
            "fusermount failed mountpoint=%s lazy=%s status=%d error=%s",
            mountpoint, lazy, result.returncode, result.stderr.strip(),
        )
        return False
    return True
