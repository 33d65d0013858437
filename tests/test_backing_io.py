"""Tests of the backing I/O thread on real files; test_fs_mount.py checks read-ahead and write-behind through a mount."""

import os
import time

import pytest

from securevol.backing_io import MAX_PENDING, BackingIoWorker
from tests.fs_helpers import dirty_bytes, drop_cached_pages, wait_until_resident


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _uncached_file(path, size: int) -> int:
    path.write_bytes(os.urandom(size))
    drop_cached_pages(path)
    return os.open(path, os.O_RDONLY)


def test_worker_caches_range_closes_duplicate(tmp_path):
    path = tmp_path / "f"
    fd = _uncached_file(path, 4 * 2**20)
    before = _open_descriptors()
    worker = BackingIoWorker()

    worker.read_ahead(fd, 2**20, 2 * 2**20)
    os.close(fd)  # the worker has its own descriptor
    worker.stop()

    assert wait_until_resident(path, 2 * 2**20) >= 2 * 2**20
    assert _open_descriptors() == before - 1


def test_full_queue_drops_without_leak(tmp_path):
    path = tmp_path / "f"
    fd = _uncached_file(path, 2**20)
    before = _open_descriptors()
    worker = BackingIoWorker()

    for _ in range(2 * MAX_PENDING):
        worker.read_ahead(fd, 0, 4096)
        worker.write_behind(fd, 0, 4096)
    worker.stop()

    assert _open_descriptors() == before
    os.close(fd)


def test_closed_descriptor_is_skipped(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)
    worker = BackingIoWorker()
    before = _open_descriptors()

    worker.read_ahead(fd, 0, 4096)  # hints for a file closed already: skipped without an error
    worker.write_behind(fd, 0, 4096)
    worker.stop()

    assert _open_descriptors() == before


def _dirty_file(path, size: int) -> int:
    """Write *size* bytes to a new file without syncing it; return a descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, os.urandom(size), 0)
    return fd


def _wait_until_clean(path, limit: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while dirty_bytes(path) > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return dirty_bytes(path)


def test_write_behind_starts_writeback_of_range_only(tmp_path):
    size = 8 * 2**20
    for attempt in range(3):
        fd = _dirty_file(tmp_path / "f", size)
        # The kernel's flusher leaves a fresh file dirty for 30 s unless
        # something syncs the whole machine; then measure again.
        if dirty_bytes(tmp_path / "f") == size:
            break
        os.close(fd)
    else:
        pytest.fail("the machine wrote fresh pages back at once in 3 attempts; nothing to measure")
    worker = BackingIoWorker()

    worker.write_behind(fd, 0, size // 2)
    worker.stop()
    os.close(fd)

    # The first half is handed to the disk; the second half is left dirty.
    assert _wait_until_clean(tmp_path / "f", size // 2) == size // 2


@pytest.mark.parametrize(
    ("offset", "length"),
    [(2**63, 4096), (0, 2**63), (-1, 4096)],
    ids=["offset-beyond-off_t", "length-beyond-off_t", "negative-offset"],
)
def test_write_behind_works_after_range_beyond_off_t(tmp_path, offset, length):
    fd = _dirty_file(tmp_path / "f", 4096)
    worker = BackingIoWorker()

    worker.write_behind(fd, offset, length)
    worker.write_behind(fd, 0, 4096)
    worker.stop()
    os.close(fd)

    assert _wait_until_clean(tmp_path / "f", 0) == 0
