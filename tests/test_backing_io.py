"""Tests of the backing I/O thread on real files; test_fs_mount.py checks read-ahead and write-behind through a mount."""

import os
import time

import pytest

from securevol import format as fmt
from securevol.backing_io import MAX_PENDING, BackingIoWorker
from securevol.fuse_ops import OpenFile
from tests.fs_helpers import (
    cached_bytes,
    dirty_bytes,
    drop_cached_pages,
    resident_bytes,
    wait_until_dirty_at_most,
    wait_until_resident,
)


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
        worker.write_behind(fd, (0, 4096), (0, 4096))
    worker.stop()

    assert _open_descriptors() == before
    os.close(fd)


def test_closed_descriptor_is_skipped(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)
    worker = BackingIoWorker()
    before = _open_descriptors()

    worker.read_ahead(fd, 0, 4096)  # hints for a file closed already: skipped without an error
    worker.write_behind(fd, (0, 4096), (0, 4096))
    worker.stop()

    assert _open_descriptors() == before


def _dirty_file(path, size: int) -> int:
    """Write *size* bytes to a new file without syncing it; return a descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, os.urandom(size), 0)
    return fd


def test_write_behind_starts_range_only(tmp_path):
    size = 8 * 2**20
    for attempt in range(3):
        fd = _dirty_file(tmp_path / "f", size)
        # The kernel's flusher leaves a fresh file dirty for 30 s unless
        # something syncs the whole machine (another process's sync(2)). Such
        # a measurement is worthless, so it is made again.
        if dirty_bytes(tmp_path / "f") != size:
            os.close(fd)
            continue
        worker = BackingIoWorker()

        worker.write_behind(fd, (0, size // 2), (0, 0))
        worker.stop()
        os.close(fd)

        left_dirty = wait_until_dirty_at_most(tmp_path / "f", size // 2)
        if left_dirty != 0:
            break
    else:
        pytest.fail("the machine wrote fresh pages back at once in 3 attempts; nothing to measure")

    # The first half is handed to the disk; the second half is left dirty.
    assert left_dirty == size // 2


def test_drop_behind_loses_no_data(tmp_path):
    path = tmp_path / "f"
    size = 8 * 2**20
    fd = _dirty_file(path, size)
    os.fdatasync(fd)
    written = os.urandom(2**20)
    os.pwrite(fd, written, size - 2**20)  # the last MiB dirty again
    worker = BackingIoWorker()

    worker.write_behind(fd, (0, 0), (0, size))
    worker.stop()

    # Clean pages leave the cache. The kernel writes dirty ones first, and
    # keeps them if they are still under writeback. A folio is dropped whole,
    # and ext4 may cache this file in folios of up to 2 MiB, so the clean MiB
    # before the dirty one may stay.
    assert cached_bytes(path, 0, size - 2 * 2**20) == 0
    assert resident_bytes(path) <= 2 * 2**20
    assert os.pread(fd, 2**20, size - 2**20) == written
    os.close(fd)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(2**63, 4096), (0, 2**63), (-1, 4096)],
    ids=["offset-beyond-off_t", "length-beyond-off_t", "negative-offset"],
)
def test_write_behind_survives_range_beyond_off_t(tmp_path, offset, length):
    fd = _dirty_file(tmp_path / "f", 4096)
    worker = BackingIoWorker()

    worker.write_behind(fd, (offset, length), (offset, length))
    worker.write_behind(fd, (0, 4096), (0, 0))
    worker.stop()
    os.close(fd)

    assert wait_until_dirty_at_most(tmp_path / "f", 0) == 0


# --- which ranges an open file requests -------------------------------------------------------


def _write_behind_requests(writes: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Feed (offset, size) plaintext writes to an OpenFile as the FUSE layer does; return its requests."""
    handle = OpenFile(None, -1)
    requests = []
    for offset, size in writes:
        gap = handle.advance(offset, size)
        ranges = handle.write_behind_ranges(offset, offset + size, gap)
        if ranges is not None:
            requests.append(ranges)
    return requests


def test_contiguous_run_write_back_and_drop():
    mib = 2**20
    requests = _write_behind_requests([(i * mib, mib) for i in range(64)])

    write_backs = [write_back for write_back, _drop in requests]
    # Contiguous, each at least 8 MiB, ending at least 1 MiB behind the write that asked.
    assert write_backs[0][0] == fmt.block_offset(0)
    assert all(a[0] + a[1] == b[0] for a, b in zip(write_backs, write_backs[1:]))
    assert all(length >= 8 * mib for _offset, length in write_backs)
    assert write_backs[-1][0] + write_backs[-1][1] <= fmt.block_offset(64 * mib // fmt.BLOCK_SIZE) - mib
    # Drops cover only what was handed to the disk at least 24 MiB earlier, each byte once.
    drops = [drop for _write_back, drop in requests if drop[1] > 0]
    assert drops[0][0] == fmt.block_offset(0)  # after the file header, which every write reads
    assert all(a[0] + a[1] == b[0] for a, b in zip(drops, drops[1:]))
    for write_back, drop in requests:
        assert drop[0] + drop[1] <= write_back[0] - 24 * mib or drop[1] == 0


def test_scattered_backward_writes_ask_nothing():
    mib = 2**20
    scattered = [(offset, 4096) for offset in range(0, 256 * mib, 2 * mib)]
    backward = [(offset, mib) for offset in range(63 * mib, -1, -mib)]

    assert _write_behind_requests(scattered) == []
    assert _write_behind_requests(backward) == []


def test_new_run_starts_where_it_begins():
    mib = 2**20
    requests = _write_behind_requests([(0, mib), *((100 * mib + i * mib, mib) for i in range(16))])

    (write_back, drop), *_ = requests
    assert write_back[0] == fmt.block_offset(100 * mib // fmt.BLOCK_SIZE)
    assert drop == (write_back[0], 0)
