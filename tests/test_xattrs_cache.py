"""Tests of the remembered missing extended attributes (Inode.absent_xattrs) and of ACLs under chmod.

The FUSE process remembers per inode which attributes getxattr found
missing, and that a directory has no default ACL. These tests change
attributes in the ways that could leave such a memory stale: through a hard
link, by setfacl and setcap after a miss, by chmod of a file with an ACL,
across a remount. Where ext4 decides what is right, the same steps run on a
plain directory and the results are compared.
"""

import errno
import os
import subprocess
from pathlib import Path

from tests.fs_helpers import expect_errno, plain_dir, volume  # noqa: F401 (fixtures)
from tests.test_fs_posix import NOBODY, run_as

CAPABILITY = "security.capability"


def _getfacl(root: Path, *names: str) -> str:
    listing = subprocess.run(["getfacl", "-cp", *names], cwd=root, check=True, capture_output=True, text=True)
    return listing.stdout


def _can_open(path: Path, flags: int) -> bool:
    try:
        os.close(os.open(path, flags))
    except PermissionError:
        return False
    return True


def test_chmod_narrows_access_acl_like_ext4(volume, plain_dir):
    outcomes = []
    for root in (plain_dir, volume.mountpoint):
        os.chmod(root, 0o755)
        path = root / "f"
        path.write_bytes(b"secret")
        os.chmod(path, 0o664)
        subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rw,g:daemon:rwx", str(path)], check=True)

        os.chmod(path, 0o640)  # the mask and the other entry must shrink with the mode
        after_640 = _getfacl(root, "f")
        nobody_writes = run_as(NOBODY, NOBODY, root, _can_open, Path("f"), os.O_WRONLY)
        os.chmod(path, 0o600)
        other_reads = run_as(NOBODY + 1, NOBODY + 1, root, _can_open, Path("f"), os.O_RDONLY)
        outcomes.append((after_640, _getfacl(root, "f"), nobody_writes, other_reads))

    # ext4 denies both after the chmod.
    assert outcomes[0][2] is False
    assert outcomes[0][3] is False
    assert outcomes[1] == outcomes[0]


def test_chmod_keeps_acl_mask_after_remount(volume, plain_dir):
    listings = []
    for root in (plain_dir, volume.mountpoint):
        path = root / "d"
        path.mkdir()
        subprocess.run(["setfacl", "-m", "u:99:rwx", str(path)], check=True)
        os.chmod(path, 0o710)
        if root == volume.mountpoint:
            volume.remount()
        listings.append(_getfacl(root, "d"))

    assert "mask::--x" in listings[0]
    assert listings[1] == listings[0]


def test_chmod_without_acl_stores_none(volume):
    path = volume.mountpoint / "plain-mode"
    path.write_bytes(b"")
    expect_errno(errno.ENODATA, os.getxattr, path, "system.posix_acl_access")

    os.chmod(path, 0o640)

    expect_errno(errno.ENODATA, os.getxattr, path, "system.posix_acl_access")
    assert _getfacl(volume.mountpoint, "plain-mode") == "user::rw-\ngroup::r--\nother::---\n\n"


def test_xattr_miss_then_set_through_hard_link(volume):
    first = volume.mountpoint / "first"
    second = volume.mountpoint / "second"
    first.write_bytes(b"data")
    os.link(first, second)
    expect_errno(errno.ENODATA, os.getxattr, first, "user.colour")
    expect_errno(errno.ENODATA, os.getxattr, first, CAPABILITY)

    os.setxattr(second, "user.colour", b"blue")
    subprocess.run(["setcap", "cap_net_raw+ep", str(second)], check=True)

    assert os.getxattr(first, "user.colour") == b"blue"
    assert "cap_net_raw=ep" in subprocess.run(["getcap", str(first)], capture_output=True, text=True).stdout


def test_xattr_removed_through_hard_link_is_missing(volume):
    first = volume.mountpoint / "first"
    second = volume.mountpoint / "second"
    first.write_bytes(b"data")
    os.setxattr(first, "user.colour", b"blue")
    os.link(first, second)
    assert os.getxattr(second, "user.colour") == b"blue"

    os.removexattr(first, "user.colour")

    expect_errno(errno.ENODATA, os.getxattr, second, "user.colour")


def test_new_file_capability_set_then_write_drops_it(volume, plain_dir):
    # create() marks security.capability missing, and setcap must end that.
    # A write by a non-root user must still remove the capability afterwards.
    results = []
    for root in (plain_dir, volume.mountpoint):
        os.chmod(root, 0o777)
        program = root / "prog"
        with open(program, "wb") as f:
            f.write(b"#!/bin/sh\n")
            os.fchmod(f.fileno(), 0o777)
            subprocess.run(["setcap", "cap_net_raw+ep", str(program)], check=True)
            f.write(b"# more\n")  # a write by root keeps nothing on ext4 either
        after_root = subprocess.run(["getcap", str(program)], capture_output=True, text=True).stdout.strip()
        subprocess.run(["setcap", "cap_net_raw+ep", str(program)], check=True)
        run_as(1000, 1000, root, _append, Path("prog"), b"# changed\n")
        after_user = subprocess.run(["getcap", str(program)], capture_output=True, text=True).stdout.strip()
        results.append((after_root.replace(str(root), ""), after_user.replace(str(root), "")))

    assert results[1] == results[0]


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_default_acl_on_recreated_directory(volume, plain_dir):
    # The same name, removed and made again, is a new inode without the old
    # directory's memory of a missing default ACL.
    listings = []
    old_umask = os.umask(0)
    try:
        for root in (plain_dir, volume.mountpoint):
            (root / "d").mkdir()
            (root / "d" / "first").write_bytes(b"")
            os.unlink(root / "d" / "first")
            os.rmdir(root / "d")
            (root / "d").mkdir()
            subprocess.run(["setfacl", "-d", "-m", "u:99:rwx", str(root / "d")], check=True)
            (root / "d" / "second").write_bytes(b"")
            listings.append(_getfacl(root, "d/second"))
    finally:
        os.umask(old_umask)

    assert "user:99:rwx" in listings[1]
    assert listings[1] == listings[0]


def test_xattrs_after_remount(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"x")
    expect_errno(errno.ENODATA, os.getxattr, path, "user.later")
    os.setxattr(path, "user.later", b"1")
    os.removexattr(path, "user.later")
    expect_errno(errno.ENODATA, os.getxattr, path, "user.later")
    os.setxattr(path, "user.later", b"2")

    volume.remount()

    assert os.getxattr(path, "user.later") == b"2"
