"""Test helper: run ``securevol serve`` on private directories and talk to it over its Unix socket.

``PluginServer`` starts the real daemon (gunicorn and its workers) as a
subprocess with its own state directory and socket, and stops it by PID.
``cleanup()`` also unmounts every FUSE mount the daemon made and ends its
FUSE processes by PID, so a test leaves nothing mounted behind.

``plugin_request`` sends one HTTP request over a Unix socket, without a JSON
content type, the way dockerd does.
"""

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


@dataclass
class PluginResponse:
    status: int
    content_type: str
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def err(self) -> str:
        """The ``Err`` field, "" when absent."""
        return self.json.get("Err", "")


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a server listening on a Unix socket."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 120.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = os.fspath(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def plugin_request(
    socket_path: str | os.PathLike[str],
    endpoint: str,
    body: bytes | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> PluginResponse:
    """Send *body* to *endpoint* (e.g. ``/VolumeDriver.Get``) and return the raw response."""
    connection = UnixHTTPConnection(socket_path)
    try:
        connection.request(method, endpoint, body=body, headers=headers or {})
        response = connection.getresponse()
        return PluginResponse(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        connection.close()


class PluginServer:
    """One ``securevol serve`` daemon on private directories.

    *socket_path* defaults to a socket in the private directory. End-to-end
    tests pass a unique path in /run/docker/plugins, where dockerd finds the
    plugin under the driver name ``driver``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        workers: int | None = 2,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """*extra_args* are added to the ``serve`` command line, *env* to the inherited environment.

        With *workers* None, no ``--workers`` flag is passed.
        """
        # Short paths: a Unix socket path has at most 107 bytes.
        self.base_dir = Path(tempfile.mkdtemp(prefix="sv-"))
        self.socket = Path(socket_path) if socket_path else self.base_dir / "securevol.sock"
        self.state_dir = self.base_dir / "state"
        self.mount_root = self.state_dir / "mnt"
        self.log_path = self.base_dir / "serve.log"
        self.workers = workers
        self.extra_args = tuple(extra_args)
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def driver(self) -> str:
        """The driver name dockerd derives from the socket's file name."""
        return self.socket.name.removesuffix(".sock")

    def __enter__(self) -> "PluginServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- process control -----------------------------------------------------

    def command(self) -> list[str]:
        args = [
            sys.executable, "-m", "securevol.cli", "serve",
            "--socket", str(self.socket),
            "--state-dir", str(self.state_dir),
        ]
        if self.workers is not None:
            args += ["--workers", str(self.workers)]
        return args + list(self.extra_args)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the daemon and wait until /Plugin.Activate returns 200."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"securevol serve already runs as PID {self.process.pid}")
        env = {**os.environ, **(self.env or {})}
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
        self._wait_until_ready(timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"securevol serve exited with status {self.process.returncode}:\n{self.log_text()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                if plugin_request(self.socket, "/Plugin.Activate").status == 200:
                    return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"securevol serve did not answer within {timeout} s:\n{self.log_text()}")

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        return _child_pids(self.process.pid)

    def wait_for_workers(self, count: int, timeout: float = START_TIMEOUT) -> list[int]:
        """Return the worker PIDs once *count* workers run, or whatever runs after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while len(self.worker_pids()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.worker_pids()

    def stop(self) -> int | None:
        """Stop the daemon with SIGTERM (SIGKILL after a timeout) and return its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """End the daemon as a crash would: SIGKILL to gunicorn's master and each of its workers."""
        if self.process is None or self.process.poll() is not None:
            return
        workers = self.worker_pids()
        self.process.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT)
        for pid in workers:
            _wait_for_pid_exit(pid, STOP_TIMEOUT)

    def cleanup(self) -> None:
        """Stop the daemon, unmount its volumes, end its FUSE processes and delete its directories."""
        try:
            self.stop()
        finally:
            still_mounted = self.unmount_all()
            if self.socket.parent != self.base_dir:
                with contextlib.suppress(FileNotFoundError):
                    self.socket.unlink()
            if not still_mounted:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def unmount_all(self) -> list[str]:
        """Unmount every FUSE mount under the mount root and end its process; return what stays mounted."""
        for pid, mountpoint in self.fuse_processes():
            subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, check=False)
            if not _wait_for_pid_exit(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_for_pid_exit(pid, 10)
        for mountpoint in mounts_under(self.base_dir):
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True, check=False)
        return mounts_under(self.base_dir)

    def fuse_processes(self) -> list[tuple[int, str]]:
        """Return (PID, mountpoint) of every running FUSE process whose mountpoint is in the private directory."""
        found = []
        prefix = os.fsencode(str(self.base_dir)) + b"/"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"securevol.mount" not in argv or b"--mountpoint" not in argv:
                continue
            index = argv.index(b"--mountpoint") + 1
            if index < len(argv) and argv[index].startswith(prefix):
                found.append((int(entry.name), os.fsdecode(argv[index])))
        return found

    # -- inspection ----------------------------------------------------------

    def log_text(self) -> str:
        """Everything the daemon logged so far, plus each FUSE process's log."""
        parts = [self.log_path.read_text(errors="replace") if self.log_path.exists() else ""]
        log_dir = self.state_dir / "log"
        if log_dir.is_dir():
            for path in sorted(log_dir.iterdir()):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def request(self, endpoint: str, body: bytes | None = None, method: str = "POST") -> PluginResponse:
        return plugin_request(self.socket, endpoint, body, method)

    def call(self, endpoint: str, payload: Any = None) -> PluginResponse:
        """POST *payload* as JSON to ``/VolumeDriver.<endpoint>`` (or to a path starting with "/")."""
        path = endpoint if endpoint.startswith("/") else f"/VolumeDriver.{endpoint}"
        return self.request(path, json.dumps(payload).encode())

    def volume_dir(self, name: str) -> Path:
        return self.state_dir / "volumes" / name


def mounts_under(directory: str | os.PathLike[str]) -> list[str]:
    """Return the mountpoints in /proc/self/mountinfo at or below *directory*."""
    base = os.fsencode(os.fspath(directory)).rstrip(b"/")
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mountpoint = line.split()[4].replace(b"\\040", b" ").replace(b"\\134", b"\\")
            if mountpoint == base or mountpoint.startswith(base + b"/"):
                found.append(os.fsdecode(mountpoint))
    return found


def _child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return children


def _wait_for_pid_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in (b"Z", b"X"):
            return True
        time.sleep(0.05)
    return False
