"""Helpers for tests that run a real securevol FUSE process on temporary directories.

A FuseMount starts ``python -m securevol.mount`` exactly as the daemon does:
the key through a pipe, the ``ready PID`` line on another pipe. It always
cleans up by the PID it was given: ``fusermount3 -u``, then ``-uz``, then
SIGKILL to that PID only.
"""

import ctypes
import errno
import hashlib
import multiprocessing
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VOLUME_ID = "00112233445566778899aabbccddeeff"
KEY = bytes(range(32))
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0


class MountFailed(Exception):
    """The FUSE process reported an error or did not report at all."""


class FuseMount:
    """One securevol FUSE process serving *backing* at *mountpoint*."""

    def __init__(self, backing: Path, mountpoint: Path, log_file: Path, key: bytes = KEY, volume: str = "testvol"):
        self.backing = backing
        self.mountpoint = mountpoint
        self.log_file = log_file
        self.key = key
        self.volume = volume
        self.pid: int | None = None

    def start(self, key_bytes: bytes | None = None) -> None:
        """Start the process and wait for ``ready PID``; raise MountFailed with its error line otherwise."""
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        line = run_mount_command(self.command_args(), self.key if key_bytes is None else key_bytes)
        if not line.startswith("ready "):
            raise MountFailed(line)
        self.pid = int(line.split()[1])

    def command_args(self) -> list[str]:
        return [
            "--volume", self.volume,
            "--volume-id", VOLUME_ID,
            "--backing", str(self.backing),
            "--mountpoint", str(self.mountpoint),
            "--log-file", str(self.log_file),
            "--log-level", "DEBUG",
        ]

    def stop(self) -> None:
        """Unmount with ``fusermount3 -u`` and wait for the process to exit."""
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True, capture_output=True)
        self.wait_exit()

    def wait_exit(self) -> None:
        deadline = time.monotonic() + EXIT_TIMEOUT
        while self.pid is not None and process_alive(self.pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"FUSE process {self.pid} did not exit")
            time.sleep(0.05)
        self.pid = None

    def cleanup(self) -> None:
        """Remove the mount and end the process whatever state they are in; for teardown."""
        if is_mounted(self.mountpoint):
            result = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        if self.pid is not None and process_alive(self.pid):
            deadline = time.monotonic() + 10
            while process_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def log_lines(self, level: str | None = None) -> list[str]:
        if not self.log_file.exists():
            return []
        lines = self.log_file.read_text().splitlines()
        if level is None:
            return lines
        return [line for line in lines if f" {level} " in line]


def run_mount_command(args: list[str], key_bytes: bytes, ready_fd_number: int | None = None) -> str:
    """Run ``python -m securevol.mount`` with *key_bytes* on the key pipe; return its status line.

    The launcher's stderr goes to /dev/null rather than a pipe: the detached
    FUSE process inherits it, so a pipe would never reach end-of-file.
    *ready_fd_number* puts the write end of the ready pipe at that descriptor.
    """
    key_r, key_w = os.pipe()
    ready_r, ready_w = os.pipe()
    if ready_fd_number is not None:
        os.dup2(ready_w, ready_fd_number)
        os.close(ready_w)
        ready_w = ready_fd_number
    command = [sys.executable, "-m", "securevol.mount", *args, "--key-fd", str(key_r), "--ready-fd", str(ready_w)]
    launcher = subprocess.Popen(
        command, pass_fds=(key_r, ready_w), cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    os.close(key_r)
    os.close(ready_w)

    try:
        os.write(key_w, key_bytes)
        os.close(key_w)
        line = read_line(ready_r, READY_TIMEOUT)
    finally:
        os.close(ready_r)
        launcher.wait(timeout=READY_TIMEOUT)
    if not line:
        raise MountFailed(f"no status line; launcher exit status {launcher.returncode}")
    return line


def read_line(fd: int, timeout: float) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def process_alive(pid: int) -> bool:
    """Tell whether *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Describe every entry under *root*: type, permission bits, size and content digest or link target.

    Two trees with equal snapshots hold the same names, types, modes and data.
    """
    snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            relative = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                snapshot[relative] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                snapshot[relative] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                snapshot[relative] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest)
    return snapshot


def backing_bytes(backing: Path) -> bytes:
    """Return every name and every file's bytes in the backing store, concatenated, for leak checks."""
    parts = []
    for dirpath, dirnames, filenames in os.walk(backing):
        for name in dirnames + filenames:
            parts.append(name.encode())
            path = Path(dirpath, name)
            if path.is_symlink():
                parts.append(os.readlink(path).encode())
            elif path.is_file():
                parts.append(path.read_bytes())
    return b"\n".join(parts)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


_SYS_CACHESTAT = 451  # the number of cachestat(2) on x86_64, Linux 6.5 and later
_libc = ctypes.CDLL(None, use_errno=True)


def _cachestat(path: Path, offset: int = 0, length: int = 0) -> _Cachestat:
    """Return the page cache state of [offset, offset + length) of *path* (length 0: to the end), by cachestat(2)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        result = _Cachestat()
        byte_range = _CachestatRange(offset, length)
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(byte_range), ctypes.byref(result), 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"cachestat: {os.strerror(error)}")
    finally:
        os.close(fd)
    return result


def dirty_bytes(path: Path) -> int:
    """Return how many bytes of *path* are dirty in the page cache (written, writeback not started)."""
    return _cachestat(path).dirty * os.sysconf("SC_PAGE_SIZE")


def resident_bytes(path: Path) -> int:
    """Return how many bytes of *path* are in the page cache."""
    return cached_bytes(path, 0, 0)


def cached_bytes(path: Path, offset: int, length: int) -> int:
    """Return how many bytes of [offset, offset + length) of *path* are in the page cache (length 0: to the end)."""
    return _cachestat(path, offset, length).cache * os.sysconf("SC_PAGE_SIZE")


def wait_until_dirty_at_most(path: Path, limit: int, timeout: float = 10.0) -> int:
    """Return the dirty bytes of *path* once at most *limit*, or after *timeout* seconds.

    Writeback that the FUSE process requests runs on its thread, a moment
    after the write that caused it.
    """
    deadline = time.monotonic() + timeout
    while dirty_bytes(path) > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return dirty_bytes(path)


def drop_cached_pages(path: Path) -> None:
    """Write back and drop the page cache of *path* alone; only clean pages can be dropped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def wait_until_resident(path: Path, minimum: int, timeout: float = 10.0) -> int:
    """Return the cached bytes of *path* once at least *minimum*, or after *timeout* seconds.

    Read-ahead submits disk reads that may still be under way when the
    request for them returns.
    """
    deadline = time.monotonic() + timeout
    while resident_bytes(path) < minimum and time.monotonic() < deadline:
        time.sleep(0.05)
    return resident_bytes(path)


_libc_errno = ctypes.CDLL(None, use_errno=True)
_libc_errno.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

# fallocate(2) modes from <linux/falloc.h>.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20


def fallocate_path(path: Path, mode: int, offset: int, length: int) -> None:
    """Open *path* read-write and call fallocate(2) on it; raise OSError with its errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc_errno.fallocate(fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def tracer_pid(pid: int) -> int:
    """Return the PID of the process that ptraces *pid*, such as strace, or 0."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def wait_until_traced(pid: int, timeout: float = 10.0) -> None:
    """Wait until a tracer such as strace has attached to *pid*."""
    deadline = time.monotonic() + timeout
    while tracer_pid(pid) == 0:
        assert time.monotonic() < deadline, "strace did not attach"
        time.sleep(0.01)


def expect_errno(expected: int, function, *args, **kwargs) -> None:
    """Call *function* and assert that it raises OSError with *expected* errno."""
    try:
        function(*args, **kwargs)
    except OSError as exc:
        assert exc.errno == expected, f"expected {errno.errorcode[expected]}, got {exc!r}"
    else:
        raise AssertionError(f"expected {errno.errorcode[expected]}, but {function.__name__} succeeded")


# --- pytest fixtures -------------------------------------------------------------------------------


def require_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        message = "FUSE tests need root, /dev/fuse and fusermount3"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class Volume(FuseMount):
    """A FuseMount with the list of ERROR log lines its test expects."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.expected_errors: list[str] = []

    def remount(self) -> None:
        self.stop()
        self.start()

    def kill_during_writes(self, writer, args: tuple, delay: float, writers: int = 2) -> None:
        """Run *writers* processes of *writer*(*args*), SIGKILL the FUSE process after *delay* seconds, mount again."""
        processes = [multiprocessing.Process(target=writer, args=args) for _ in range(writers)]
        for process in processes:
            process.start()

        time.sleep(delay)
        os.kill(self.pid, signal.SIGKILL)
        # Writes into the kernel's cache may go on succeeding after the FUSE process is gone.
        for process in processes:
            process.kill()
            process.join()
        self.wait_exit()
        self.cleanup()
        self.start()

    def unexpected_errors(self) -> list[str]:
        return [
            line
            for line in self.log_lines("ERROR")
            if not any(expected in line for expected in self.expected_errors)
        ]


def started_volume(tmp_path: Path, volume_class: type = Volume):
    """Yield a started *volume_class* on directories in *tmp_path*; clean up, then check its log for unexpected errors."""
    require_fuse()
    vol = volume_class(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    vol.start()
    try:
        yield vol
    finally:
        vol.cleanup()
    assert vol.unexpected_errors() == []


@pytest.fixture
def volume(tmp_path):
    yield from started_volume(tmp_path)


@pytest.fixture
def plain_dir(tmp_path):
    path = tmp_path / "plain"
    path.mkdir()
    return path
