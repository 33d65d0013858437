"""Tests of open(2) with O_TRUNC on a real mount.

libfuse turns on FUSE_ATOMIC_O_TRUNC, so the kernel passes O_TRUNC to the
filesystem's open and sends no truncating setattr. It drops its own cached
pages and size at once. A filesystem that ignores the flag keeps the old
contents in the backing store, and they come back after the kernel's cache
goes: after a remount, or after a truncate that grows the file again.
"""

import os

import pytest

from securevol.access import update_access_file
from tests.fs_helpers import volume  # noqa: F401 (a fixture)
from tests.test_adversarial import guarded, revoke_host  # noqa: F401 (guarded is a fixture)

OLD = b"old contents " * 400


def _backing_size(volume, path) -> int:
    """Return the ciphertext size of the backing file of *path* (same inode number)."""
    ino = os.stat(path).st_ino
    for name in os.listdir(volume.backing):
        st = os.lstat(volume.backing / name)
        if st.st_ino == ino:
            return st.st_size
    raise AssertionError(f"no backing file has inode {ino}")


def test_rewrite_with_o_trunc_survives_remount(volume):
    path = volume.mountpoint / "rewritten"
    path.write_bytes(OLD)
    path.write_bytes(b"new")  # open(2) with O_WRONLY | O_CREAT | O_TRUNC

    volume.remount()

    assert path.read_bytes() == b"new"


def test_o_trunc_empties_backing_file(volume):
    path = volume.mountpoint / "emptied"
    path.write_bytes(OLD)

    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))

    assert _backing_size(volume, path) == 0
    assert path.read_bytes() == b""


def test_grow_after_o_trunc_reads_zeros(volume):
    path = volume.mountpoint / "regrown"
    path.write_bytes(OLD)

    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    os.truncate(path, 5000)

    assert path.read_bytes() == bytes(5000)


def test_o_trunc_with_another_handle_open(volume):
    path = volume.mountpoint / "shared"
    path.write_bytes(OLD)
    reader = os.open(path, os.O_RDONLY)
    try:
        with open(path, "r+b") as f:
            f.truncate(0)  # ftruncate, the setattr path, for comparison
        path.write_bytes(OLD)
        os.close(os.open(path, os.O_RDWR | os.O_TRUNC))

        assert os.pread(reader, 100, 0) == b""
    finally:
        os.close(reader)

    volume.remount()
    assert path.read_bytes() == b""


def test_o_trunc_of_empty_file_keeps_it_empty(volume):
    path = volume.mountpoint / "empty"
    path.touch()

    os.close(os.open(path, os.O_RDWR | os.O_TRUNC))
    path.write_bytes(b"x")

    volume.remount()
    assert path.read_bytes() == b"x"


def test_refused_caller_cannot_truncate_with_o_trunc(guarded):
    mount = guarded("host")
    path = mount.mountpoint / "kept"
    path.write_bytes(OLD)

    revoke_host(mount, "name:web")
    with pytest.raises(PermissionError):
        os.open(path, os.O_WRONLY | os.O_TRUNC)

    update_access_file(mount.access_file, "host")
    mount.stop()
    mount = guarded("host")
    assert (mount.mountpoint / "kept").read_bytes() == OLD
