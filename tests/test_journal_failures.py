"""System calls of the journal failing inside a real FUSE process, made to fail with strace's syscall injection.

A journal record that cannot be marked idle is redone at the next mount. So
from then on the volume refuses every change until it is mounted again, and
the redo finds the file as the failed change left it.
"""

import errno
import os
import random
import subprocess

import pytest

from securevol import format as fmt
from tests.fs_helpers import volume, wait_until_traced  # noqa: F401 (volume is a fixture)

BLOCK = fmt.BLOCK_SIZE
ATTACH_LIMIT_SECONDS = 10

pytestmark = pytest.mark.skipif(subprocess.run(["which", "strace"], capture_output=True).returncode != 0,
                                reason="needs strace")


def attach_failing_journal_writes(volume, when: int) -> subprocess.Popen:
    """Make the FUSE process's *when*-th pwrite64 of the journal file fail with EIO."""
    journal = volume.backing / "securevol.journal"
    tracer = subprocess.Popen(
        ["strace", "-q", "-p", str(volume.pid), "-P", str(journal), "-e", "trace=pwrite64",
         "-e", f"inject=pwrite64:error=EIO:when={when}", "-o", "/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_until_traced(volume.pid, ATTACH_LIMIT_SECONDS)
    return tracer


def test_unretired_record_refuses_changes_until_remount(volume):
    volume.expected_errors.append("journal record not retired")
    path = volume.mountpoint / "f"
    old = random.Random(1).randbytes(4 * BLOCK)
    path.write_bytes(old)
    new = random.Random(2).randbytes(2 * BLOCK)

    # A journaled write marks its record active (the first pwrite64 of the
    # journal) and then idle (the second), which fails here.
    tracer = attach_failing_journal_writes(volume, when=2)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            buffer = bytearray(new)
            with pytest.raises(OSError) as caught:
                os.pwrite(fd, buffer, BLOCK)
            assert caught.value.errno == errno.EIO
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                # close(2) writes back the file's times with a setattr, a change refused now.
                assert exc.errno == errno.EIO
    finally:
        tracer.terminate()
        tracer.wait(timeout=ATTACH_LIMIT_SECONDS)

    # Every change fails now, names included, so nothing can be overwritten by the redo.
    for change in (lambda: path.unlink(), lambda: (volume.mountpoint / "g").write_bytes(b"x"),
                   lambda: os.truncate(path, 0), lambda: os.mkdir(volume.mountpoint / "d")):
        with pytest.raises(OSError) as caught:
            change()
        assert caught.value.errno == errno.EIO

    volume.remount()
    expected = old[:BLOCK] + new + old[3 * BLOCK :]
    assert path.read_bytes() == expected
    assert sorted(os.listdir(volume.mountpoint)) == ["f"]
    path.unlink()
