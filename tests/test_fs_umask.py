"""The umask of new entries on a real mount, with and without a default ACL, against a plain directory.

The kernel sends the caller's umask along with the mode (FUSE_DONT_MASK, which
securevol.fuse_session requests), so that the filesystem can ignore it under a
default ACL as ext4 does.
"""

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.fs_helpers import plain_dir, volume  # noqa: F401 (fixtures)
from tests.test_fs_posix import run_as

UMASKS = [0o022, 0o077, 0o002, 0o027, 0o000, 0o777]
DEFAULT_ACLS = [None, "g::rwx,o::rx", "u:99:rwx,g::rx,o::-", "u::rw,g::r,o::r,m::rwx"]


def make_entries(directory: Path, umask: int) -> None:
    """Create one entry of each kind in *directory* under *umask*, each asking for wide permissions."""
    old_umask = os.umask(umask)
    try:
        os.close(os.open(directory / "created", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.close(os.open(directory / "created-setuid", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o4777))
        os.mknod(directory / "node", stat.S_IFREG | 0o666)
        os.mkdir(directory / "dir", 0o777)
        os.mkfifo(directory / "fifo", 0o666)
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(directory / "socket"))
    finally:
        os.umask(old_umask)


ENTRIES = ["created", "created-setuid", "node", "dir", "fifo", "socket"]


def modes_of(directory: Path) -> dict[str, str]:
    return {name: oct(stat.S_IMODE((directory / name).lstat().st_mode)) for name in ENTRIES}


def acls_of(directory: Path) -> str:
    """Return getfacl's listing of the new file and directory (FIFOs and sockets keep no ACL on securevol)."""
    listing = subprocess.run(
        ["getfacl", "-c", "created", "node", "dir"], cwd=directory, check=True, capture_output=True, text=True
    )
    return listing.stdout


def prepare(root: Path, default_acl: str | None) -> Path:
    directory = root / "d"
    directory.mkdir()
    if default_acl is not None:
        subprocess.run(["setfacl", "-d", "-m", default_acl, str(directory)], check=True)
    return directory


@pytest.mark.parametrize("default_acl", DEFAULT_ACLS, ids=["no-acl", "group-rwx", "named-user", "mask-rwx"])
@pytest.mark.parametrize("umask", UMASKS, ids=[oct(u) for u in UMASKS])
def test_new_entry_modes_match_plain_directory(volume, plain_dir, umask, default_acl):
    results = []
    for root in (plain_dir, volume.mountpoint):
        directory = prepare(root, default_acl)
        make_entries(directory, umask)
        results.append((modes_of(directory), acls_of(directory)))

    assert results[1][0] == results[0][0]
    assert results[1][1] == results[0][1]

    volume.remount()
    assert modes_of(volume.mountpoint / "d") == results[0][0]


@pytest.mark.parametrize("default_acl", [None, "g::rwx,o::rx"], ids=["no-acl", "group-rwx"])
def test_umask_of_other_user_applied(volume, plain_dir, default_acl):
    # A user other than the FUSE process's creates entries the long way (temporary name, chown, chmod).
    results = []
    for root in (plain_dir, volume.mountpoint):
        directory = prepare(root, default_acl)
        os.chmod(directory, 0o777)
        run_as(1234, 1234, directory, make_entries, Path("."), 0o027)
        results.append(modes_of(directory))

    assert results[1] == results[0]


def test_umask_in_setgid_directory(volume, plain_dir):
    results = []
    for root in (plain_dir, volume.mountpoint):
        directory = prepare(root, None)
        os.chown(directory, 0, 4321)
        os.chmod(directory, 0o2777)
        make_entries(directory, 0o022)
        results.append((modes_of(directory), (directory / "dir").stat().st_gid))

    assert results[1] == results[0]
    assert results[1][1] == 4321
