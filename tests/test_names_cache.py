"""Tests of the backing name cache (NameCipher.backing_name_for) on a real mount.

The cache maps (plaintext name, directory IV) to a backing name. These tests
reuse names where a stale entry would show. Directories are removed and made
again under the same name, which gives them a new IV. Files are renamed
between short and long names (long names keep a side record), linked under
long names, and named so that some names differ in one byte only. The same steps run on a plain directory, and
the trees must match before and after a remount.
"""

import os
from pathlib import Path

from tests.fs_helpers import plain_dir, tree_snapshot, volume  # noqa: F401 (fixtures)

NAMES = [
    b"a", b"a\xff", b"a\xfe", b"A", b"a ", b" a", b"a.b", b"a..b", b"\x01\x02",
    "ünï".encode(), b"uni",
    b"x" * 175, b"x" * 176, b"x" * 254, b"x" * 255,
    b"y" * 200 + b"1", b"y" * 200 + b"2",
]
ROUNDS = 4


def _renamed(name: bytes) -> bytes:
    """Return a new name for *name*: one byte longer, or short if it is at the 255-byte limit."""
    if len(name) < 255:
        return name + b"~"
    return b"short-" + bytes([48 + NAMES.index(name) % 10])


def _make_round(directory: bytes, round_number: int) -> None:
    os.mkdir(directory)
    for name in NAMES:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(name + b" round %d" % round_number)
    for index, name in enumerate(NAMES[:6]):
        os.link(os.path.join(directory, name), os.path.join(directory, b"L" * 230 + b"%d" % index))
    for name in NAMES:
        os.rename(os.path.join(directory, name), os.path.join(directory, _renamed(name)))


def _run_names_workload(root: Path) -> None:
    directory = os.path.join(os.fsencode(root), b"d")
    for round_number in range(ROUNDS):
        _make_round(directory, round_number)
        if round_number < ROUNDS - 1:
            for entry in os.listdir(directory):
                os.unlink(os.path.join(directory, entry))
            os.rmdir(directory)

    # The same long directory name under two parents, swapped by renames.
    for parent in ("p1", "p2"):
        (root / parent / "same" / ("x" * 250)).mkdir(parents=True)
        (root / parent / "same" / ("x" * 250) / "f").write_text(parent)
    os.rename(root / "p1" / "same", root / "p2" / "same2")
    os.rename(root / "p2" / "same", root / "p1" / "same")
    os.rename(root / "p2" / "same2", root / "p2" / "same")


def test_reused_names_match_plain_directory(volume, plain_dir):
    _run_names_workload(plain_dir)
    _run_names_workload(volume.mountpoint)
    expected = tree_snapshot(plain_dir)

    assert len(expected) == 1 + len(NAMES) + 6 + 8  # d, its entries and links, the p1 and p2 trees
    assert tree_snapshot(volume.mountpoint) == expected
    volume.remount()
    assert tree_snapshot(volume.mountpoint) == expected


def test_recreated_directory_gets_new_backing_names(volume):
    directory = volume.mountpoint / "d"
    directory.mkdir()
    (directory / "f").write_bytes(b"first")
    first_backing = set(os.listdir(volume.backing)) - {"securevol.journal"}
    first_names = {name for sub in first_backing if (volume.backing / sub).is_dir()
                   for name in os.listdir(volume.backing / sub)}

    (directory / "f").unlink()
    directory.rmdir()
    directory.mkdir()
    (directory / "f").write_bytes(b"second")

    backing_dirs = [sub for sub in os.listdir(volume.backing) if (volume.backing / sub).is_dir()]
    assert len(backing_dirs) == 1
    second_names = set(os.listdir(volume.backing / backing_dirs[0]))
    # The directory name is the same, so its backing name is too. The file's
    # backing name depends on the new directory IV, so it differs.
    assert set(backing_dirs) <= first_backing
    assert not (second_names - {"securevol.diriv"}) & first_names
    volume.remount()
    assert (directory / "f").read_bytes() == b"second"
