"""Tests of requests that fail because the FUSE process ran out of file descriptors.

A failing mkdir must leave nothing behind in the backing directory, including
the side record that a long name (176 bytes or more) writes before the directory.
"""

import errno
import os
import resource
import time

import pytest

from securevol import names
from tests.fs_helpers import volume  # noqa: F401 (fixture)

LONG_NAME = "n" * 200


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _backing_dir(volume):
    [directory] = [path for path in volume.backing.iterdir() if path.is_dir()]
    return directory


def test_long_mkdir_emfile_no_side_record(volume):
    """mkdir of a long name that fails with EMFILE while writing the directory IV removes its side record."""
    parent = volume.mountpoint / "d"
    parent.mkdir()
    # Cache the negative lookup now, so that the mkdir below sends MKDIR and no LOOKUP.
    assert not os.path.lexists(parent / LONG_NAME)
    time.sleep(0.05)  # let the closer thread close dropped descriptors

    soft, hard = resource.prlimit(volume.pid, resource.RLIMIT_NOFILE)
    # One free descriptor is enough for the side record and the new directory's
    # O_PATH descriptor, not for the IV's temporary file next to it.
    resource.prlimit(volume.pid, resource.RLIMIT_NOFILE, (_open_descriptors(volume.pid) + 1, hard))
    try:
        with pytest.raises(OSError) as info:
            os.mkdir(parent / LONG_NAME)
    finally:
        resource.prlimit(volume.pid, resource.RLIMIT_NOFILE, (soft, hard))

    assert info.value.errno == errno.EMFILE
    assert os.listdir(parent) == []
    backing_names = os.listdir(_backing_dir(volume))
    orphans = [
        name
        for name in backing_names
        if name.endswith(names.SIDE_RECORD_SUFFIX) and name.removesuffix(names.SIDE_RECORD_SUFFIX) not in backing_names
    ]
    assert orphans == []
