"""Tests that a FUSE process killed while it makes a new entry leaves no half-made entry visible.

strace attaches to the FUSE process and sends it SIGKILL when the process
enters a chosen system call (strace's syscall injection). So each test stops
the process at one exact step of mkdir or create, after the backing entry
exists but before its directory IV, owner or mode is in place. After a
remount the name must be absent, and making it again must work.
"""

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from securevol import fuse_ops
from tests.fs_helpers import volume, wait_until_traced  # noqa: F401 (volume is a fixture)
from tests.test_fs_posix import run_as

USER = 1000
# An upper bound for strace to attach, not an expected duration.
ATTACH_LIMIT_SECONDS = 10

pytestmark = pytest.mark.skipif(subprocess.run(["which", "strace"], capture_output=True).returncode != 0,
                                reason="needs strace")


def kill_at_syscall(volume, syscall: str, action, *args, when: int = 1) -> int:
    """Run *action* as USER while strace kills the FUSE process as it enters *syscall* the *when*-th time.

    Then mount again and return the errno that *action* failed with.
    """
    tracer = subprocess.Popen(
        ["strace", "-q", "-p", str(volume.pid), "-e", f"trace={syscall}",
         "-e", f"inject={syscall}:signal=KILL:when={when}", "-o", "/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_traced(volume.pid, ATTACH_LIMIT_SECONDS)

        with pytest.raises(OSError) as caught:
            run_as(USER, USER, volume.mountpoint, action, *args)
    finally:
        tracer.wait(timeout=ATTACH_LIMIT_SECONDS)

    volume.wait_exit()
    volume.cleanup()
    volume.start()
    return caught.value.errno


def user_directory(volume) -> Path:
    directory = volume.mountpoint / "home"
    directory.mkdir()
    os.chown(directory, USER, USER)
    return directory


def make_directory(path: str) -> None:
    os.mkdir(path, 0o750)


def create_file(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640))


# The steps of mkdir after the backing directory exists: the IV, the owner and the mode. Before
# the new directory's O_PATH open, the third openat, come the reads of the parent's IV and of the
# new name by the lookup.
@pytest.mark.parametrize(("syscall", "when"), [("openat", 3), ("fchownat", 1), ("chmod", 1)])
def test_mkdir_killed_leaves_no_entry(volume, syscall, when):
    home = user_directory(volume)

    error = kill_at_syscall(volume, syscall, make_directory, "home/new", when=when)

    assert error in (errno.ENOTCONN, errno.ECONNABORTED)
    assert os.listdir(home) == []
    run_as(USER, USER, volume.mountpoint, make_directory, "home/new")
    st = (home / "new").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o750)
    assert os.listdir(home / "new") == []


@pytest.mark.parametrize("syscall", ["fchown", "fchmod"])
def test_create_by_user_killed_leaves_no_entry(volume, syscall):
    home = user_directory(volume)

    error = kill_at_syscall(volume, syscall, create_file, "home/new")

    assert error in (errno.ENOTCONN, errno.ECONNABORTED)
    assert os.listdir(home) == []
    run_as(USER, USER, volume.mountpoint, create_file, "home/new")
    st = (home / "new").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o640)


def test_rmdir_removes_what_a_killed_mkdir_left(volume):
    home = user_directory(volume)
    kill_at_syscall(volume, "fchownat", make_directory, "home/new")

    home.rmdir()

    assert os.listdir(volume.mountpoint) == []
    assert [name for name in os.listdir(volume.backing) if not name.startswith("securevol.")] == []


def test_listing_removes_what_a_killed_mkdir_left(volume):
    home = user_directory(volume)
    backing_home = volume.backing / next(name for name in os.listdir(volume.backing)
                                         if not name.startswith("securevol."))
    kill_at_syscall(volume, "fchownat", make_directory, "home/new")
    assert backing_home.stat().st_nlink == 3  # the leftover temporary directory counts
    mtime_before = backing_home.stat().st_mtime_ns

    assert os.listdir(home) == []

    assert [name for name in os.listdir(backing_home) if name.startswith("securevol.tmp.")] == []
    assert backing_home.stat().st_nlink == 2
    assert backing_home.stat().st_mtime_ns == mtime_before
    assert any("leftover temporary entries removed vol=testvol count=1" in line for line in volume.log_lines())


def test_rename_new_entry_on_simulated_filesystem_without_noreplace(tmp_path, monkeypatch):
    """NFS rejects RENAME_NOREPLACE with EINVAL; no such filesystem runs here, so rename_at simulates it."""
    def reject_flags(*args):
        raise OSError(errno.EINVAL, "renameat2: Invalid argument")

    monkeypatch.setattr(fuse_ops.syscalls, "rename_at", reject_flags)
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        (tmp_path / "securevol.tmp.1").write_text("new")
        (tmp_path / "taken").write_text("old")

        with pytest.raises(FileExistsError):
            fuse_ops._rename_new_entry(dir_fd, "securevol.tmp.1", "taken")
        fuse_ops._rename_new_entry(dir_fd, "securevol.tmp.1", "free")
    finally:
        os.close(dir_fd)

    assert (tmp_path / "taken").read_text() == "old"
    assert (tmp_path / "free").read_text() == "new"
    assert not (tmp_path / "securevol.tmp.1").exists()
