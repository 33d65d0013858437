"""A volume whose backing filesystem is full: what ext4 allows in place still works.

The backing store is a small ext4 image mounted by the test, filled up to the
last block, so that ENOSPC comes from a real filesystem.
"""

import errno
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from securevol import format as fmt
from tests.fs_helpers import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Volume,
    expect_errno,
    fallocate_path,
    require_fuse,
)

KEEP_SIZE = FALLOC_FL_KEEP_SIZE
PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE
ZERO_RANGE = FALLOC_FL_ZERO_RANGE
BLOCK = fmt.BLOCK_SIZE
MIB = 1 << 20

fallocate = fallocate_path


def fill_up(directory: Path) -> None:
    """Write files in *directory* until its filesystem has no free block left."""
    chunk = bytes(MIB)
    number = len(list(directory.glob("filler*")))
    with open(directory / f"filler{number}", "wb", buffering=0) as filler:
        for size in (MIB, 4096, 1):
            try:
                while True:
                    filler.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        os.fsync(filler.fileno())
    assert os.statvfs(directory).f_bavail == 0


@pytest.fixture
def small_disk(tmp_path):
    """A mounted 64 MiB ext4 image with no blocks reserved for root."""
    require_fuse()
    image = tmp_path / "disk.img"
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def unmount(mountpoint: Path) -> None:
    """Unmount *mountpoint*, waiting for a FUSE process that a failed test left to exit; detach it at last."""
    for _ in range(50):
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


@pytest.fixture
def full_volume(small_disk, tmp_path):
    """A volume on *small_disk* holding the 4 MiB file ``data``, then a full disk."""
    volume = Volume(small_disk / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    volume.start()
    try:
        data = random.Random(9).randbytes(4 * MIB)
        (volume.mountpoint / "data").write_bytes(data)
        os.sync()
        fill_up(small_disk)
        volume.data = data
        yield volume
    finally:
        volume.cleanup()
    assert volume.unexpected_errors() == []


def test_overwrite_in_place_on_full_disk(full_volume):
    path = full_volume.mountpoint / "data"
    new = random.Random(10).randbytes(MIB)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, new, BLOCK + 123)
        os.fsync(fd)
    finally:
        os.close(fd)

    expected = bytearray(full_volume.data)
    expected[BLOCK + 123 : BLOCK + 123 + MIB] = new
    full_volume.remount()
    assert path.read_bytes() == bytes(expected)


@pytest.mark.parametrize(
    "mode, offset, length",
    [(PUNCH_HOLE | KEEP_SIZE, 100, 100), (PUNCH_HOLE | KEEP_SIZE, 5, 10 * BLOCK), (ZERO_RANGE | KEEP_SIZE, 7, 10 * BLOCK)],
    ids=["punch-in-one-block", "punch-blocks", "zero-blocks"],
)
def test_zeroing_on_full_disk(full_volume, mode, offset, length):
    path = full_volume.mountpoint / "data"
    fallocate(path, mode, offset, length)

    expected = bytearray(full_volume.data)
    expected[offset : offset + length] = bytes(length)
    assert path.read_bytes() == bytes(expected)


@pytest.mark.parametrize("mode", [0, KEEP_SIZE, ZERO_RANGE], ids=["grow", "keep-size", "zero-range-grow"])
def test_allocate_on_full_disk_changes_nothing(full_volume, mode):
    path = full_volume.mountpoint / "data"
    expect_errno(errno.ENOSPC, fallocate, path, mode, 3 * MIB, 200 * MIB)

    assert path.stat().st_size == 4 * MIB
    assert path.read_bytes() == full_volume.data


def test_write_into_hole_on_full_disk(full_volume):
    # A hole inside the file takes new space when written: the write must
    # fail before any byte lands, leaving the hole readable as zeros.
    path = full_volume.mountpoint / "data"
    fallocate(path, PUNCH_HOLE | KEEP_SIZE, 4 * BLOCK, 8 * BLOCK)
    fill_up(full_volume.backing.parent)
    old = bytearray(full_volume.data)
    old[4 * BLOCK : 12 * BLOCK] = bytes(8 * BLOCK)
    new = bytearray(old)
    new[4 * BLOCK + 100 : 4 * BLOCK + 100 + MIB] = random.Random(11).randbytes(MIB)

    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, new[4 * BLOCK + 100 : 4 * BLOCK + 100 + MIB], 4 * BLOCK + 100)
            os.fsync(fd)
        assert info.value.errno == errno.ENOSPC
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC  # close(2) writes back what fsync could not

    # The kernel hands the write over in several requests, and those outside
    # the hole need no new space, so each block is old or new, and none is damaged.
    full_volume.remount()
    data = path.read_bytes()
    assert len(data) == len(old)
    for start in range(0, len(data), BLOCK):
        block = data[start : start + BLOCK]
        assert block in (old[start : start + BLOCK], new[start : start + BLOCK]), start // BLOCK
    assert data[4 * BLOCK : 12 * BLOCK] == bytes(8 * BLOCK)


def test_failed_append_gives_space_back(full_volume):
    # The space reserved for an append that does not fit is released, so a
    # smaller write that fits still succeeds.
    disk = full_volume.backing.parent
    for filler in disk.glob("filler*"):
        filler.unlink()
    fill_up(disk)
    with open(next(disk.glob("filler*")), "r+b") as filler:
        filler.truncate(filler.seek(0, os.SEEK_END) - 600 * 1024)
    os.sync()
    free_before = os.statvfs(disk).f_bavail

    path = full_volume.mountpoint / "data"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        with pytest.raises(OSError) as info:
            os.write(fd, os.urandom(2 * MIB))
            os.fsync(fd)
        assert info.value.errno == errno.ENOSPC
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC

    os.sync()
    assert os.statvfs(disk).f_bavail >= free_before - 8
    (full_volume.mountpoint / "small").write_bytes(os.urandom(300 * 1024))
    assert path.read_bytes()[: len(full_volume.data)] == full_volume.data
