"""Tests of the backing I/O thread (backing_io.py): requests it cannot carry out, and descriptors on a mount.

The thread must survive every request: once it is gone, requests fill its
queue, each holding a duplicate descriptor, and stop() at unmount waits for
room in the queue forever. Through a mount, sequential reads must leave no
descriptor behind and stay correct when the file changes under them.
"""

import os
import random
import resource
import threading
import time

import pytest

from securevol import format as fmt
from securevol.backing_io import MAX_PENDING, BackingIoWorker
from securevol.mount import DESCRIPTOR_TABLE_SLOTS
from tests.fs_helpers import KEY, FuseMount, require_fuse, run_mount_command
from tests.fs_helpers import volume  # noqa: F401 (a fixture)

STOP_TIMEOUT = 60.0


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _stop_in_thread(worker: BackingIoWorker) -> bool:
    """Call worker.stop() and tell whether it returned; a hang fails the test instead of blocking it."""
    stopper = threading.Thread(target=worker.stop, daemon=True)
    stopper.start()
    stopper.join(STOP_TIMEOUT)
    return not stopper.is_alive()


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        # A client may write near the 2**63 limit of file offsets. The ciphertext
        # offset after it does not fit in off_t, so posix_fadvise raises
        # OverflowError, and so does the check before sync_file_range.
        (2**63 + 2**20, 8 * 2**20),
        (0, -1),  # EINVAL from the kernel
    ],
    ids=["beyond-off_t", "negative-length"],
)
def test_failing_requests_keep_worker_alive(tmp_path, offset, length):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    before = _open_descriptors()
    worker = BackingIoWorker()

    for _ in range(MAX_PENDING):
        worker.read_ahead(fd, offset, length)
        worker.write_behind(fd, (offset, length), (offset, length))
    worker.read_ahead(fd, 0, 4096)

    assert _stop_in_thread(worker)
    assert _open_descriptors() == before
    os.close(fd)


# --- through a mount ---------------------------------------------------------------------------


def _fuse_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _open_file_descriptors(pid: int, backing_files: set[str]) -> int:
    """Return how many descriptors of process *pid* have one of *backing_files* open for reading or writing.

    The FUSE process keeps such a descriptor for each open file and each read-ahead
    request. Its other descriptors of a backing file are O_PATH descriptors of inodes.
    """
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as fdinfo:
                flags = next(int(line.split()[1], 8) for line in fdinfo if line.startswith("flags:"))
        except FileNotFoundError:
            continue  # closed since the listing
        if target in backing_files and not flags & os.O_PATH:
            count += 1
    return count


def _wait_for_descriptors(pid: int, expected: int) -> int:
    """Return the FUSE process's descriptor count once it is *expected*, or after STOP_TIMEOUT.

    Read-ahead duplicates and dropped inodes are closed by threads, a moment later.
    """
    deadline = time.monotonic() + STOP_TIMEOUT
    count = _fuse_descriptors(pid)
    while count != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        count = _fuse_descriptors(pid)
    return count


def test_open_read_close_cycles_leak_no_descriptors(volume):
    data = random.Random(1).randbytes(3 * 2**20)
    paths = [volume.mountpoint / f"f{i}" for i in range(8)]
    for path in paths:
        path.write_bytes(data)
    for path in paths:
        assert path.read_bytes() == data  # every inode looked up once

    # An O_PATH descriptor on the mount keeps each file's dentry in use, so the
    # kernel cannot forget the inode and have the FUSE process close its
    # descriptor of it, as a drop_caches or memory reclaim on the machine would.
    # Such an open sends no request to the FUSE process.
    pins = [os.open(path, os.O_PATH) for path in paths]
    try:
        backing_files = {
            str(entry) for entry in volume.backing.iterdir()
            if entry.is_file() and entry.stat().st_size == fmt.cipher_size(len(data))
        }
        assert len(backing_files) == len(paths)
        # close(2) can return before the FUSE process has served RELEASE, which
        # Linux sends in the background on a FUSE mount that is not fuseblk
        # (fuse_file_release in fs/fuse/file.c).
        deadline = time.monotonic() + STOP_TIMEOUT
        while _open_file_descriptors(volume.pid, backing_files) > 0:
            assert time.monotonic() < deadline, "the FUSE process kept files open that every client closed"
            time.sleep(0.05)
        before = _fuse_descriptors(volume.pid)

        for _ in range(25):
            handles = [open(path, "rb", buffering=0) for path in paths]
            for handle in handles:
                # Drop the cached plaintext, so the reads reach the FUSE process and ask for read-ahead.
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while handle.read(256 * 1024):
                    pass
            for handle in handles:
                handle.close()

        assert _wait_for_descriptors(volume.pid, before) == before
    finally:
        for pin in pins:
            os.close(pin)


def test_file_unlinked_and_truncated_while_read_sequentially(volume):
    data = random.Random(2).randbytes(6 * 2**20)
    for name in ("unlinked", "truncated"):
        (volume.mountpoint / name).write_bytes(data)
    volume.remount()  # nothing of them in the page cache

    with open(volume.mountpoint / "unlinked", "rb", buffering=0) as f:
        head = f.read(2**20)
        os.unlink(volume.mountpoint / "unlinked")
        rest = f.read()
    assert head + rest == data

    with open(volume.mountpoint / "truncated", "rb", buffering=0) as f:
        head = f.read(2**20)
        os.truncate(volume.mountpoint / "truncated", 2**20 + 5000)
        rest = f.read()
    assert head + rest == data[: 2**20 + 5000]
    assert (volume.mountpoint / "truncated").read_bytes() == data[: 2**20 + 5000]


def _proc_field(path: str, prefix: str, index: int) -> int:
    """Return whitespace-separated field *index* of the line of /proc file *path* that starts with *prefix*."""
    with open(path) as proc_file:
        for line in proc_file:
            if line.startswith(prefix):
                return int(line.split()[index])
    raise AssertionError(f"no line starting with {prefix!r} in {path}")


def _descriptor_table_size(pid: int) -> int:
    """Return the slots of *pid*'s descriptor table (FDSize), which the kernel doubles and never shrinks."""
    return _proc_field(f"/proc/{pid}/status", "FDSize:", 1)


def _open_file_limit(pid: int) -> int:
    """Return the soft RLIMIT_NOFILE of *pid*, which the FUSE process raises for itself."""
    return _proc_field(f"/proc/{pid}/limits", "Max open files", 3)


def test_descriptor_table_is_sized_before_threads_start(volume):
    # Each doubling of the table in a process with threads waits for an RCU
    # grace period (about 10 ms each on the test VM), and the FUSE process keeps a
    # descriptor for every inode the kernel has looked up.
    expected = min(DESCRIPTOR_TABLE_SLOTS, _open_file_limit(volume.pid))
    size = _descriptor_table_size(volume.pid)
    assert size >= expected

    paths = [volume.mountpoint / f"f{i:04d}" for i in range(2000)]
    for path in paths:
        path.write_bytes(b"x")
    # Pinned, every inode stays known to the kernel, so the FUSE process keeps its descriptors.
    pins = [os.open(path, os.O_PATH) for path in paths]
    try:
        assert _fuse_descriptors(volume.pid) > len(paths)
        assert _descriptor_table_size(volume.pid) == size
    finally:
        for fd in pins:
            os.close(fd)


def test_descriptor_table_growth_keeps_inherited_descriptor(tmp_path):
    # The ready pipe sits where the table growth takes its descriptor: the
    # FUSE process must still report on it.
    require_fuse()
    ready_fd_number = DESCRIPTOR_TABLE_SLOTS - 1
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= ready_fd_number:
        pytest.skip(f"needs an open file limit above {ready_fd_number}")
    mount = FuseMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    mount.backing.mkdir()
    mount.mountpoint.mkdir()

    try:
        line = run_mount_command(mount.command_args(), KEY, ready_fd_number=ready_fd_number)
        assert line.startswith("ready "), line
        mount.pid = int(line.split()[1])
        (mount.mountpoint / "f").write_bytes(b"data")
        assert (mount.mountpoint / "f").read_bytes() == b"data"
    finally:
        mount.cleanup()
