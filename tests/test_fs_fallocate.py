"""fallocate(2) on a real mount: reserving space, punching holes and zeroing ranges.

pyfuse3 3.5 passes no FALLOCATE request on; securevol.fuse_fallocate registers
the handler with libfuse itself (securevol.fuse_session). The tests compare the mount with a plain
directory after the same calls, and check the ciphertext in the backing file.
"""

import errno
import os
import random
from pathlib import Path

import pytest

from securevol import format as fmt
from tests.fs_helpers import (  # noqa: F401 (plain_dir and volume are fixtures)
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    expect_errno,
    fallocate_path,
    plain_dir,
    volume,
)

KEEP_SIZE = FALLOC_FL_KEEP_SIZE
PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE
COLLAPSE_RANGE = FALLOC_FL_COLLAPSE_RANGE
ZERO_RANGE = FALLOC_FL_ZERO_RANGE
INSERT_RANGE = FALLOC_FL_INSERT_RANGE
BLOCK = fmt.BLOCK_SIZE
MIB = 1 << 20

fallocate = fallocate_path


def backing_file(volume) -> Path:
    """Return the only ciphertext file of a volume that contains one regular file."""
    files = [p for p in volume.backing.iterdir() if p.is_file() and not p.name.startswith("securevol")]
    assert len(files) == 1, files
    return files[0]


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def same_on_both(volume, plain_dir, data: bytes, mode: int, offset: int, length: int) -> bytes:
    """Write *data* to a file on the mount and in the plain directory, fallocate both, and compare."""
    for root in (volume.mountpoint, plain_dir):
        (root / "f").write_bytes(data)
        fallocate(root / "f", mode, offset, length)
    expected = (plain_dir / "f").read_bytes()
    assert (volume.mountpoint / "f").read_bytes() == expected
    assert (volume.mountpoint / "f").stat().st_size == len(expected)
    return expected


@pytest.mark.parametrize(
    "offset, length",
    [
        (0, 10 * BLOCK),  # whole blocks from the start
        (BLOCK, 2 * BLOCK),  # whole blocks inside
        (100, 50),  # within one block
        (BLOCK - 10, 20),  # across one block boundary, no whole block
        (BLOCK + 5, 3 * BLOCK),  # partial, whole, whole, partial
        (5 * BLOCK + 7, 10 * BLOCK),  # from inside a block to past the end
        (7 * BLOCK, 10),  # the partial last block
        (20 * BLOCK, BLOCK),  # past the end: nothing to do
    ],
)
@pytest.mark.parametrize("mode", [PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE, 0, KEEP_SIZE])
def test_fallocate_matches_plain_directory(volume, plain_dir, mode, offset, length):
    data = random.Random(offset + length).randbytes(7 * BLOCK + 1000)
    same_on_both(volume, plain_dir, data, mode, offset, length)

    volume.remount()
    assert (volume.mountpoint / "f").read_bytes() == (plain_dir / "f").read_bytes()
    assert not volume.unexpected_errors()


def test_punch_frees_backing_blocks(volume, plain_dir):
    data = random.Random(3).randbytes(8 * MIB)
    (volume.mountpoint / "f").write_bytes(data)
    os.sync()
    backing = backing_file(volume)
    before = allocated_bytes(backing)

    same_on_both(volume, plain_dir, data, PUNCH_HOLE | KEEP_SIZE, 1 * MIB + 3, 4 * MIB)

    # The space of about 4 MiB of ciphertext is given back.
    assert before - allocated_bytes(backing) >= 4 * MIB - 2 * (BLOCK + fmt.BLOCK_OVERHEAD)
    ciphertext = backing.read_bytes()
    first_whole = -(-(1 * MIB + 3) // BLOCK)
    last_whole = (5 * MIB + 3) // BLOCK
    hole = ciphertext[fmt.block_offset(first_whole) : fmt.block_offset(last_whole)]
    assert hole == bytes(len(hole))
    # The partial blocks at both ends are encrypted zeros, not zeros on disk.
    assert ciphertext[fmt.block_offset(first_whole - 1) : fmt.block_offset(first_whole)] != bytes(fmt.CIPHER_BLOCK_SIZE)


def test_zero_range_keeps_space_reserved(volume, plain_dir):
    data = random.Random(4).randbytes(4 * MIB)
    (volume.mountpoint / "f").write_bytes(data)
    os.sync()
    backing = backing_file(volume)
    before = allocated_bytes(backing)

    same_on_both(volume, plain_dir, data, ZERO_RANGE | KEEP_SIZE, MIB, 2 * MIB)

    assert allocated_bytes(backing) >= before - 2 * fmt.CIPHER_BLOCK_SIZE
    hole = backing.read_bytes()[fmt.block_offset(MIB // BLOCK) : fmt.block_offset(3 * MIB // BLOCK)]
    assert hole == bytes(len(hole))


@pytest.mark.parametrize("mode", [0, KEEP_SIZE])
def test_allocate_reserves_backing_space(volume, plain_dir, mode):
    expected = same_on_both(volume, plain_dir, b"abc", mode, 0, 64 * MIB)
    backing = backing_file(volume)

    assert allocated_bytes(backing) >= fmt.cipher_size(64 * MIB) - fmt.CIPHER_BLOCK_SIZE
    assert (volume.mountpoint / "f").stat().st_size == len(expected)
    # The reserved space reads as zeros: ciphertext that is all zeros is a hole.
    with open(volume.mountpoint / "f", "r+b") as f:
        f.seek(40 * MIB)
        f.write(b"late")
    expected = bytearray(expected.ljust(40 * MIB + 4, b"\0"))
    expected[40 * MIB : 40 * MIB + 4] = b"late"
    assert (volume.mountpoint / "f").read_bytes() == bytes(expected)


def test_punch_hole_with_dirty_pages(volume):
    # Written pages still dirty in the kernel's cache when the hole is punched:
    # the kernel writes the range back first, and the pages after it stay as written.
    path = volume.mountpoint / "f"
    data = random.Random(5).randbytes(20 * BLOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        fallocate(path, PUNCH_HOLE | KEEP_SIZE, 3 * BLOCK, 5 * BLOCK + 9)
        os.pwrite(fd, b"after", 4 * BLOCK)
    finally:
        os.close(fd)

    expected = bytearray(data)
    expected[3 * BLOCK : 8 * BLOCK + 9] = bytes(5 * BLOCK + 9)
    expected[4 * BLOCK : 4 * BLOCK + 5] = b"after"
    assert path.read_bytes() == bytes(expected)
    volume.remount()
    assert path.read_bytes() == bytes(expected)


@pytest.mark.parametrize(
    "mode",
    [PUNCH_HOLE, COLLAPSE_RANGE, INSERT_RANGE, PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE],
    ids=["punch-without-keep-size", "collapse", "insert", "punch-and-zero"],
)
def test_unsupported_modes_change_nothing(volume, mode):
    path = volume.mountpoint / "f"
    data = random.Random(6).randbytes(4 * BLOCK)
    path.write_bytes(data)

    expect_errno(errno.EOPNOTSUPP, fallocate, path, mode, BLOCK, BLOCK)

    assert path.read_bytes() == data


def test_fallocate_damaged_block_eio(volume):
    volume.expected_errors.append("integrity check failed")
    path = volume.mountpoint / "f"
    path.write_bytes(random.Random(7).randbytes(3 * BLOCK))
    volume.stop()
    backing = backing_file(volume)
    with open(backing, "r+b") as f:
        f.seek(fmt.block_offset(1) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    volume.start()

    # Zeroing part of the damaged block needs its plaintext; a whole block needs none.
    expect_errno(errno.EIO, fallocate, path, PUNCH_HOLE | KEEP_SIZE, BLOCK + 10, 10)
    # A range that also covers whole blocks fails before any of them is punched.
    def after_damage() -> bytes:
        with open(path, "rb") as f:
            f.seek(2 * BLOCK)
            return f.read()

    before = after_damage()
    expect_errno(errno.EIO, fallocate, path, PUNCH_HOLE | KEEP_SIZE, BLOCK + 10, 2 * BLOCK)
    volume.remount()  # the kernel's cached pages would hide a change
    assert after_damage() == before
    assert before != bytes(len(before))
    fallocate(path, PUNCH_HOLE | KEEP_SIZE, BLOCK, BLOCK)
    assert path.read_bytes()[BLOCK : 2 * BLOCK] == bytes(BLOCK)
    assert [line for line in volume.log_lines("ERROR") if "integrity check failed" in line and "block=1 " in line]


def test_mount_installs_fallocate(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"x" * 100)
    fallocate(path, PUNCH_HOLE | KEEP_SIZE, 0, 100)
    assert path.read_bytes() == bytes(100)
    assert volume.log_lines("WARNING") == []
