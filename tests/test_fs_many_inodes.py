"""Tests of a FUSE process that has more inodes looked up than it keeps descriptors for.

The process closes the descriptors of the least recently used files and
symlinks beyond its budget and reopens each by its backing name when a request
needs it (securevol.inodes). These tests give it a budget of a few descriptors,
so that the files they work on have been closed early. Each test checks that
requests reach the right backing file after renames, renames over other files,
exchanges, hard links or unlinks.
"""

import ctypes
import os
import stat

import pytest

from tests.fs_helpers import Volume, started_volume, tree_snapshot

BUDGET = 4
FILLERS = 40
# Other O_PATH descriptors of the process: the root, directories, and the one a request reopens.
MARGIN = 12

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
RENAME_EXCHANGE = 2


class FewDescriptorsVolume(Volume):
    def command_args(self) -> list[str]:
        return [*super().command_args(), "--inode-descriptors", str(BUDGET)]


@pytest.fixture
def volume(tmp_path):
    yield from started_volume(tmp_path, FewDescriptorsVolume)


def _push_out(volume, batch: str) -> None:
    """Create and look up more files than the budget, so that earlier files lose their descriptors."""
    fillers = volume.mountpoint / f"fillers-{batch}"
    fillers.mkdir()
    for i in range(FILLERS):
        (fillers / f"f{i}").write_bytes(b"filler")


def _closed_early(volume) -> int:
    return sum("closed early" in line for line in volume.log_lines("DEBUG"))


def _path_descriptors(pid: int) -> int:
    """Count the O_PATH descriptors of the process: those of its table of known inodes."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as info:
                flags = next(line for line in info if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        if int(flags.split()[1], 8) & os.O_PATH:
            count += 1
    return count


def test_known_files_beyond_budget_keep_few_descriptors(volume):
    mnt = volume.mountpoint
    inos = {}
    for d in range(3):
        (mnt / f"d{d}").mkdir()
        for i in range(100):
            path = mnt / f"d{d}" / f"f{i}"
            path.write_bytes(f"{d}/{i}".encode() * 10)
            inos[path] = path.stat().st_ino

    # All 300 files are still looked up; the process keeps descriptors for
    # the root, the 3 directories and at most BUDGET files.
    assert _path_descriptors(volume.pid) <= 1 + 3 + BUDGET
    assert _closed_early(volume) > 0

    # Each open and chmod reaches the process, which reopens the file by name.
    for path, ino in inos.items():
        d, i = path.parent.name[1:], path.name[1:]
        with open(path, "rb") as f:
            assert f.read() == f"{d}/{i}".encode() * 10
            assert os.fstat(f.fileno()).st_ino == ino
        os.chmod(path, 0o640 if int(i) % 2 else 0o604)
    assert _path_descriptors(volume.pid) <= 1 + 3 + BUDGET + 1

    volume.remount()
    for path, ino in inos.items():
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == (0o640 if int(path.name[1:]) % 2 else 0o604)
        assert path.read_bytes() == f"{path.parent.name[1:]}/{path.name[1:]}".encode() * 10


def test_rename_and_exchange_of_closed_files(volume):
    mnt = volume.mountpoint
    (mnt / "sub").mkdir()
    for name in ("moved", "renamed", "source", "target", "left", "right"):
        (mnt / name).write_bytes(name.encode())
    _push_out(volume, "1")

    os.rename(mnt / "renamed", mnt / "renamed-2")
    os.rename(mnt / "moved", mnt / "sub" / "moved-2")
    os.rename(mnt / "source", mnt / "target")
    assert _libc.renameat2(-100, os.fsencode(mnt / "left"), -100, os.fsencode(mnt / "right"), RENAME_EXCHANGE) == 0
    _push_out(volume, "2")

    # setattr and setxattr go through each file's descriptor, reopened by name.
    expected = {
        "renamed-2": b"renamed",
        "sub/moved-2": b"moved",
        "target": b"source",
        "left": b"right",
        "right": b"left",
    }
    for name, data in expected.items():
        os.chmod(mnt / name, 0o600)
        os.setxattr(mnt / name, "user.origin", data)
        assert (mnt / name).read_bytes() == data
    assert not (mnt / "source").exists()

    volume.remount()
    for name, data in expected.items():
        assert (mnt / name).read_bytes() == data
        assert os.getxattr(mnt / name, "user.origin") == data
        assert stat.S_IMODE((mnt / name).stat().st_mode) == 0o600


def test_unlinked_name_of_linked_file_keeps_it_reachable(volume):
    mnt = volume.mountpoint
    (mnt / "first").write_bytes(b"linked contents")
    os.link(mnt / "first", mnt / "second")
    ino = (mnt / "first").stat().st_ino
    _push_out(volume, "1")

    # The file was found by "first", which goes now; it must stay reachable
    # through "second" although its descriptor was closed.
    os.unlink(mnt / "first")
    _push_out(volume, "2")

    os.chmod(mnt / "second", 0o600)
    st = (mnt / "second").stat()
    assert (st.st_ino, st.st_nlink, stat.S_IMODE(st.st_mode)) == (ino, 1, 0o600)
    assert (mnt / "second").read_bytes() == b"linked contents"
    os.link(mnt / "second", mnt / "third")
    assert (mnt / "third").stat().st_nlink == 2

    volume.remount()
    assert (mnt / "third").read_bytes() == b"linked contents"
    assert (mnt / "second").stat().st_nlink == 2


def test_file_replaced_while_open_stays_readable(volume):
    mnt = volume.mountpoint
    (mnt / "old").write_bytes(b"old contents")
    (mnt / "new").write_bytes(b"new contents")
    with open(mnt / "old", "rb") as held:
        _push_out(volume, "1")
        os.rename(mnt / "new", mnt / "old")
        _push_out(volume, "2")

        assert os.fstat(held.fileno()).st_nlink == 0
        assert held.read() == b"old contents"
        assert (mnt / "old").read_bytes() == b"new contents"


def test_tree_after_changes_matches_a_plain_directory(volume, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for root in (volume.mountpoint, plain):
        (root / "a").mkdir()
        for i in range(30):
            (root / "a" / f"f{i}").write_bytes(bytes([i]) * (i * 1000))
        for i in range(0, 30, 3):
            os.rename(root / "a" / f"f{i}", root / f"g{i}")
        for i in range(1, 30, 3):
            os.link(root / "a" / f"f{i}", root / f"h{i}")
            os.unlink(root / "a" / f"f{i}")
        for i in range(2, 30, 6):
            os.rename(root / "a" / f"f{i}", root / "a" / f"f{i + 3}")
        os.symlink("a/f5", root / "link")
        os.rename(root / "link", root / "link-2")

    assert tree_snapshot(volume.mountpoint) == tree_snapshot(plain)
    volume.remount()
    assert tree_snapshot(volume.mountpoint) == tree_snapshot(plain)


def test_link_then_unlink_stays_within_budget(volume):
    # The way git stores an object: write a temporary file, link it to its name, unlink the temporary name.
    mnt = volume.mountpoint
    (mnt / "objects").mkdir()
    for i in range(100):
        (mnt / "objects" / f"tmp{i}").write_bytes(f"object {i}".encode())
        os.link(mnt / "objects" / f"tmp{i}", mnt / "objects" / f"obj{i}")
        os.unlink(mnt / "objects" / f"tmp{i}")

    assert _path_descriptors(volume.pid) <= BUDGET + MARGIN
    for i in range(100):
        os.chmod(mnt / "objects" / f"obj{i}", 0o444)
        assert (mnt / "objects" / f"obj{i}").read_bytes() == f"object {i}".encode()
    assert _path_descriptors(volume.pid) <= BUDGET + MARGIN


def test_hard_link_readable_after_first_directory_forgotten(volume):
    mnt = volume.mountpoint
    (mnt / "d1").mkdir()
    (mnt / "d2").mkdir()
    (mnt / "d1" / "a").write_bytes(b"hello")
    os.link(mnt / "d1" / "a", mnt / "d2" / "b")
    # An O_PATH descriptor keeps the file known without opening it through the FUSE process.
    holder = os.open(mnt / "d2" / "b", os.O_PATH)
    try:
        _push_out(volume, "1")
        os.sync()
        # Reclaim of dentries and inodes, as memory pressure would do: the kernel sends FORGET for d1.
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")

        os.chmod(f"/proc/self/fd/{holder}", 0o600)
        with open(f"/proc/self/fd/{holder}", "rb") as f:
            assert f.read() == b"hello"
        assert (mnt / "d2" / "b").read_bytes() == b"hello"
    finally:
        os.close(holder)
