"""Tests of the journal for a file that keeps a name after another of its hard links is removed.

The FUSE process finds the journal path of a backing file through
/proc/self/fd. Once the name that the kernel first looked up is unlinked, that
path ends in " (deleted)" although the file is still linked under another name.
"""

import os
import random
import struct

import pytest

from securevol import format as fmt
from tests.fs_helpers import volume  # noqa: F401 (fixture)

B = fmt.BLOCK_SIZE
# Control block of securevol.journal (docs/format.md, "Journal"): magic, state, sequence, body length.
_CONTROL = struct.Struct(">4sIQQ")
# Seconds of writing before each kill. A kill tears a block only while a pwrite is under way, so many rounds run.
KILL_DELAYS = [0.1 + 0.02 * i for i in range(40)]


def _journal_sequence(volume) -> int:
    data = (volume.backing / "securevol.journal").read_bytes()[: _CONTROL.size]
    return _CONTROL.unpack(data)[2]


def _keep_second_link(volume, suffix: str = ""):
    """Create a file, link it under a second name and remove the first name. Return the second path."""
    first = volume.mountpoint / f"first{suffix}"
    second = volume.mountpoint / f"second{suffix}"
    first.write_bytes(random.Random(1).randbytes(2**20 + 5 * B))
    os.link(first, second)
    os.unlink(first)
    return second


def test_hardlink_write_is_journaled(volume):
    """A write of two blocks through the remaining hard link goes through the journal like any other."""
    second = _keep_second_link(volume)
    fd = os.open(second, os.O_RDWR | os.O_DIRECT)
    try:
        before = _journal_sequence(volume)
        os.pwrite(fd, os.urandom(2 * B), 100)
        after = _journal_sequence(volume)
    finally:
        os.close(fd)

    assert after > before


def _rewrite_until_killed(path) -> None:
    rng = random.Random(os.getpid())
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        while True:
            os.pwrite(fd, rng.randbytes(2**20), rng.randrange(0, 8) * 4096 + 100)
    except OSError:
        return
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the connection ended with the FUSE process


@pytest.mark.slow
def test_hardlink_kill_9_no_eio(volume):
    """kill -9 of the FUSE process during writes through the remaining hard link leaves every block readable."""
    for round_number, delay in enumerate(KILL_DELAYS):
        # A new pair of names each round: after a remount the kernel looks up the remaining name itself.
        second = _keep_second_link(volume, str(round_number))

        volume.kill_during_writes(_rewrite_until_killed, (second,), delay)

        try:
            data = second.read_bytes()
        except OSError as exc:
            pytest.fail(f"reading {second.name} after a kill {delay:.2f} s into the writes failed: {exc}")
        assert len(data) == second.stat().st_size
