"""Tests of the inode table's order of lookups, which picks the entries the kernel is asked to forget."""

import os

import pytest

from securevol.inodes import InodeTable


@pytest.fixture
def table(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d").mkdir()
    root_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    inodes = InodeTable(root_fd)
    yield inodes, tmp_path
    inodes.close_all()


def _look_up(inodes: InodeTable, directory, name: str):
    fd = os.open(directory / name, os.O_PATH)
    return inodes.remember(fd, os.fstat(fd), (1, name.encode()))


def test_least_recent_entries_in_lookup_order(table):
    inodes, directory = table
    for name in ("a", "b", "c"):
        _look_up(inodes, directory, name)
    _look_up(inodes, directory, "a")  # looked up again: now the most recent

    assert inodes.least_recent_entries(2) == [(1, b"b"), (1, b"c")]


def test_open_inodes_directories_and_returned_entries_skipped(table):
    inodes, directory = table
    opened = _look_up(inodes, directory, "a")
    _look_up(inodes, directory, "d")  # a directory may be a process's working directory
    _look_up(inodes, directory, "b")
    _look_up(inodes, directory, "c")
    inodes.opened(opened)

    assert inodes.least_recent_entries(1) == [(1, b"b")]
    assert inodes.least_recent_entries(5) == [(1, b"c")]
    assert inodes.least_recent_entries(5) == []


def test_dropped_counts_forgotten_inodes(table):
    inodes, directory = table
    inode = _look_up(inodes, directory, "a")

    inodes.forget(inode.ino, 1)

    assert inodes.dropped == 1
    assert inodes.get(inode.ino) is None
