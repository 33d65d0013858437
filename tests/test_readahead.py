"""Tests of the read-ahead thread on real files; test_fs_mount.py checks read-ahead through a mount."""

import os

from securevol.readahead import MAX_PENDING, ReadAheadWorker
from tests.fs_helpers import drop_cached_pages, wait_until_resident


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
    worker = ReadAheadWorker()

    worker.request(fd, 2**20, 2 * 2**20)
    os.close(fd)  # the worker has its own descriptor
    worker.stop()

    assert wait_until_resident(path, 2 * 2**20) >= 2 * 2**20
    assert _open_descriptors() == before - 1


def test_full_queue_drops_without_leak(tmp_path):
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
