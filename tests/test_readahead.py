"""Tests of the read-ahead thread on real files; test_fs_mount.py checks read-ahead through a mount."""

import os
import subprocess
import time

from securevol.readahead import MAX_PENDING, ReadAheadWorker


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _resident_bytes(path) -> int:
    output = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return int(output.strip())


def _uncached_file(path, size: int) -> int:
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def test_requested_range_is_cached_and_duplicate_closed(tmp_path):
    path = tmp_path / "f"
    fd = _uncached_file(path, 4 * 2**20)
    before = _open_descriptors()
    worker = ReadAheadWorker()

    worker.request(fd, 2**20, 2 * 2**20)
    os.close(fd)  # the worker has its own descriptor
    worker.stop()

    # The disk reads may still be under way when posix_fadvise returns.
    deadline = time.monotonic() + 10
    while _resident_bytes(path) < 2 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _resident_bytes(path) >= 2 * 2**20
    assert _open_descriptors() == before - 1


def test_full_queue_drops_requests_without_leaking(tmp_path):
    path = tmp_path / "f"
    fd = _uncached_file(path, 2**20)
    before = _open_descriptors()
    worker = ReadAheadWorker()

    for _ in range(4 * MAX_PENDING):
        worker.request(fd, 0, 4096)
    worker.stop()

    assert _open_descriptors() == before
    os.close(fd)


def test_closed_descriptor_is_skipped(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)
    worker = ReadAheadWorker()
    before = _open_descriptors()

    worker.request(fd, 0, 4096)  # a hint for a file closed already: skipped without an error
    worker.stop()

    assert _open_descriptors() == before
