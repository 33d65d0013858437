"""Tests of times-only setattr on unlinked files, which the FUSE process skips when no handle is open.

An O_PATH descriptor opens no FUSE handle, yet it still leads to the file, so
times set through it after the last name is gone must be visible through it.
"""

import os

from tests.fs_helpers import plain_dir, volume  # noqa: F401 (fixtures)

ATIME_NS = 1_000_000_000
MTIME_NS = 2_000_000_000


def _set_times_after_unlink(root) -> os.stat_result:
    """Unlink a file held by an O_PATH descriptor, set its times through that descriptor and stat it."""
    path = root / "f"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_PATH)
    try:
        os.unlink(path)
        os.utime(f"/proc/self/fd/{fd}", ns=(ATIME_NS, MTIME_NS))
        return os.stat(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def test_opath_utime_unlinked_sets_atime(volume, plain_dir):
    """utime through an O_PATH descriptor of an unlinked file sets its atime, as on a plain directory."""
    plain = _set_times_after_unlink(plain_dir)
    mounted = _set_times_after_unlink(volume.mountpoint)

    assert plain.st_atime_ns == ATIME_NS
    assert mounted.st_mtime_ns == MTIME_NS
    assert mounted.st_atime_ns == ATIME_NS
