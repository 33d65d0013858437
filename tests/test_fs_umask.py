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
# Entries that cannot store an ACL on securevol.
SPECIAL = {"fifo", "socket"}


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

    (plain_modes, plain_acls), (mounted_modes, mounted_acls) = results
    assert mounted_acls == plain_acls
    for name in ENTRIES:
        if name in SPECIAL and default_acl is not None:
            # No ACL of their own, so no more than what ext4's ACL grants the owner, group and others.
            assert int(mounted_modes[name], 8) & ~int(plain_modes[name], 8) == 0, name
        else:
            assert mounted_modes[name] == plain_modes[name], name

    volume.remount()
    assert modes_of(volume.mountpoint / "d") == mounted_modes


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


def open_fifo(path: str) -> str:
    os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
    return "opened"


def connect(path: str) -> str:
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
    return "connected"


def outcome(uid: int, gid: int, cwd: Path, function, path: str) -> str:
    try:
        return run_as(uid, gid, cwd, function, path)
    except OSError as exc:
        return os.strerror(exc.errno)


@pytest.mark.parametrize("default_acl", ["u::rwx,g::---,g:5555:rwx,o::---", "u::rwx,g::r-x,m::rwx,o::---"])
def test_special_files_grant_no_more_than_ext4(volume, plain_dir, default_acl):
    # FIFOs and sockets cannot store the inherited ACL, so their mode alone
    # must not let the owning group in where the ACL's own entry would not.
    results = []
    for root in (plain_dir, volume.mountpoint):
        directory = prepare(root, default_acl)
        os.chown(directory, 0, 4321)
        os.chmod(directory, 0o2775)
        make_entries(directory, 0o000)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(directory / "listening"))
        listener.listen(1)
        try:
            results.append((
                outcome(2000, 4321, directory, open_fifo, "fifo"),
                outcome(2000, 4321, directory, connect, "listening"),
                outcome(2000, 2000, directory, open_fifo, "fifo"),
            ))
        finally:
            listener.close()

    plain, mounted = results
    for on_plain, on_mount in zip(plain, mounted, strict=True):
        if on_plain != "opened" and on_plain != "connected":
            assert on_mount == on_plain
