"""Tests of writes and truncations that the backing store cannot take, on a real mount.

The cases are sizes and offsets near 2**63, which the kernel lets a client
ask for on a FUSE mount, sizes beyond the backing filesystem's largest file
(16 TiB on ext4 with 4 KiB blocks), and a full disk under the first write of
a file. Each must fail with an error, leave the file as it was, and leave a
volume that mounts again: a journal record of an impossible change once made
every later mount fail.
"""

import errno
import os

import pytest

from tests.fs_helpers import expect_errno, plain_dir, volume  # noqa: F401 (fixtures)
from tests.test_fs_posix import small_volume  # noqa: F401 (a fixture)

MAX_OFFSET = 2**63 - 1
BEYOND_EXT4 = 17 * 2**40


def _backing_entries(volume) -> dict[str, int]:
    return {name: os.lstat(volume.backing / name).st_size for name in os.listdir(volume.backing)}


def test_truncate_to_max_offset_fails_cleanly(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"hi\n")

    expect_errno(errno.EFBIG, os.truncate, path, MAX_OFFSET)

    assert path.read_bytes() == b"hi\n"
    volume.remount()
    assert path.read_bytes() == b"hi\n"


def test_write_near_max_offset_fails_cleanly(volume):
    path = volume.mountpoint / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # With the writeback cache the error arrives with the write-back, at fsync.
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"z" * 10_000, MAX_OFFSET - 2**22)
            os.fsync(fd)
        assert info.value.errno in (errno.EFBIG, errno.EIO)
    finally:
        os.close(fd)

    volume.remount()
    assert path.read_bytes() == b""


def test_failed_write_back_logged_once(volume):
    # write(2) returns before the kernel writes the page back, so the error
    # reaches the program at fsync(2) or close(2) and the operator through the log.
    path = volume.mountpoint / "secret-name"
    path.write_bytes(b"hello")
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in (2**62, 2**62 + 2**20):
            assert os.pwrite(fd, b"X", offset) == 1
        with pytest.raises(OSError) as info:
            os.fsync(fd)
        assert info.value.errno in (errno.EFBIG, errno.EIO)
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno in (errno.EFBIG, errno.EIO)

    failed = [line for line in volume.log_lines("WARNING") if "write failed" in line]
    assert len(failed) == 1, failed
    assert f"offset={2**62}" in failed[0] or f"offset={2**62 + 2**20}" in failed[0]
    assert "secret-name" not in failed[0]
    backing_names = [name for name in os.listdir(volume.backing) if not name.startswith("securevol.")]
    assert any(f"path={name}" in failed[0] for name in backing_names), (failed[0], backing_names)

    volume.remount()
    assert path.read_bytes() == b"hello"


def test_truncate_beyond_backing_limit_like_plain(volume, plain_dir):
    # On ext4 both fail with EFBIG; on a filesystem that takes the size, both succeed.
    outcomes = []
    for root in (plain_dir, volume.mountpoint):
        path = root / "f"
        path.write_bytes(b"hi\n")
        try:
            os.truncate(path, BEYOND_EXT4)
            outcomes.append(("ok", path.stat().st_size))
        except OSError as exc:
            outcomes.append((errno.errorcode[exc.errno], path.stat().st_size))

    assert outcomes[1] == outcomes[0]
    volume.remount()
    assert (volume.mountpoint / "f").stat().st_size == outcomes[0][1]
    with open(volume.mountpoint / "f", "rb") as f:
        assert f.read(3) == b"hi\n"


def test_first_write_past_backing_limit_leaves_empty_file(volume, plain_dir):
    outcomes = []
    for root in (plain_dir, volume.mountpoint):
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"z" * 10_000, BEYOND_EXT4)
            os.fsync(fd)
            outcomes.append("ok")
        except OSError as exc:
            outcomes.append("EFBIG" if exc.errno in (errno.EFBIG, errno.EIO) else errno.errorcode[exc.errno])
        finally:
            os.close(fd)

    assert outcomes[1] == outcomes[0]
    volume.remount()
    if outcomes[0] != "ok":
        assert (volume.mountpoint / "f").read_bytes() == b""


def _fill_disk(path) -> None:
    """Write *path* in 16 KiB steps until the backing filesystem is full."""
    with open(path, "wb") as f:
        while True:
            try:
                f.write(os.urandom(16384))
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


def test_disk_full_on_first_write_leaves_empty_file(small_volume):
    # A first write that does not start at offset 0 is a header write and a
    # block write, so the journal reserves space for both before writing.
    _fill_disk(small_volume.mountpoint / "filler")
    path = small_volume.mountpoint / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, os.urandom(64 * 1024), 4096)
            os.fsync(fd)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)

    assert _backing_entries(small_volume)[_backing_name_of(small_volume, path)] == 0
    (small_volume.mountpoint / "filler").unlink()
    small_volume.remount()
    assert path.read_bytes() == b""
    path.write_bytes(b"after")  # the file is usable, not damaged
    assert path.read_bytes() == b"after"


def _backing_name_of(volume, path) -> str:
    ino = os.stat(path).st_ino
    for name in os.listdir(volume.backing):
        if os.lstat(volume.backing / name).st_ino == ino:
            return name
    raise AssertionError(f"no backing file has inode {ino}")
