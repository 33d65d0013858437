"""POSIX behaviour that databases and tools rely on, checked on a real securevol mount.

Each test runs against a real FUSE process (see tests/fs_helpers.py). Where
the expected result is not obvious, the same steps run on a plain directory
and the results are compared.
"""

import ctypes
import errno
import fcntl
import mmap
import multiprocessing
import os
import random
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from securevol import format as fmt
from securevol import xattrs
from tests.fs_helpers import (  # noqa: F401 (plain_dir and volume are fixtures)
    backing_bytes,
    expect_errno,
    plain_dir,
    tree_snapshot,
    volume,
)

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
NOBODY = 65534


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def run_as(uid: int, gid: int, cwd: Path, function, *args):
    """Run *function* in a child process in directory *cwd* as *uid*:*gid*; return its result or re-raise its OSError.

    The child enters *cwd* while still root, so relative paths work although
    the test's temporary directories are private to root.
    """
    parent_end, child_end = multiprocessing.Pipe()

    def child():
        os.chdir(cwd)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        try:
            child_end.send(("ok", function(*args)))
        except OSError as exc:
            child_end.send(("oserror", exc.errno))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    status, value = parent_end.recv()
    process.join()
    if status == "oserror":
        raise OSError(value, os.strerror(value))
    return value


# --- links and renames ---------------------------------------------------------------------------


def test_hard_links_share_data_and_count(volume):
    a, b = volume.mountpoint / "a", volume.mountpoint / "b"
    a.write_bytes(b"first")
    os.link(a, b)

    assert a.stat().st_nlink == 2
    assert a.stat().st_ino == b.stat().st_ino
    with open(b, "r+b") as f:
        f.write(b"SECOND")
    assert a.read_bytes() == b"SECOND"

    os.unlink(a)
    assert b.stat().st_nlink == 1
    volume.remount()
    assert b.read_bytes() == b"SECOND"
    assert b.stat().st_nlink == 1


def test_hard_link_across_directories_and_long_names(volume):
    (volume.mountpoint / "d1").mkdir()
    (volume.mountpoint / "d2").mkdir()
    long_name = "L" * 230
    (volume.mountpoint / "d1" / long_name).write_bytes(b"data")

    os.link(volume.mountpoint / "d1" / long_name, volume.mountpoint / "d2" / long_name)
    os.unlink(volume.mountpoint / "d1" / long_name)
    volume.remount()

    assert os.listdir(volume.mountpoint / "d1") == []
    assert os.listdir(volume.mountpoint / "d2") == [long_name]
    assert (volume.mountpoint / "d2" / long_name).read_bytes() == b"data"


def test_hard_link_to_symlink(volume):
    os.symlink("target", volume.mountpoint / "s")
    os.link(volume.mountpoint / "s", volume.mountpoint / "s2", follow_symlinks=False)

    assert os.readlink(volume.mountpoint / "s2") == "target"
    assert (volume.mountpoint / "s2").lstat().st_nlink == 2


def test_rename_onto_own_hard_link_keeps_both(volume, plain_dir):
    long_name = "h" * 220
    for root in (plain_dir, volume.mountpoint):
        (root / long_name).write_bytes(b"one inode, two names")
        os.link(root / long_name, root / "short")
        os.rename(root / long_name, root / "short")
    volume.remount()

    assert tree_snapshot(volume.mountpoint) == tree_snapshot(plain_dir)
    assert (volume.mountpoint / long_name).read_bytes() == b"one inode, two names"


def test_rename_replaces_atomically(volume):
    target = volume.mountpoint / "config"
    target.write_bytes(b"old contents")
    new = volume.mountpoint / "config.tmp"
    new.write_bytes(b"new contents")

    with open(target, "rb") as reader:
        os.rename(new, target)
        assert reader.read() == b"old contents"  # the old inode lives on while open
    assert target.read_bytes() == b"new contents"
    assert not new.exists()


def test_rename_noreplace(volume):
    (volume.mountpoint / "a").write_bytes(b"a")
    (volume.mountpoint / "b").write_bytes(b"b")

    expect_errno(errno.EEXIST, renameat2, volume.mountpoint / "a", volume.mountpoint / "b", RENAME_NOREPLACE)
    renameat2(volume.mountpoint / "a", volume.mountpoint / "c", RENAME_NOREPLACE)

    assert sorted(os.listdir(volume.mountpoint)) == ["b", "c"]


def test_rename_exchange(volume):
    (volume.mountpoint / "file").write_bytes(b"a file")
    (volume.mountpoint / "dir").mkdir()
    (volume.mountpoint / "dir" / "inner").write_bytes(b"inner")
    long_name = "x" * 200
    (volume.mountpoint / long_name).write_bytes(b"long")

    renameat2(volume.mountpoint / "file", volume.mountpoint / "dir", RENAME_EXCHANGE)
    renameat2(volume.mountpoint / "file", volume.mountpoint / long_name, RENAME_EXCHANGE)
    volume.remount()

    assert (volume.mountpoint / "dir").read_bytes() == b"a file"
    assert (volume.mountpoint / long_name / "inner").read_bytes() == b"inner"
    assert (volume.mountpoint / "file").read_bytes() == b"long"
    expect_errno(errno.ENOENT, renameat2, volume.mountpoint / "file", volume.mountpoint / "nope", RENAME_EXCHANGE)


def test_rename_directory_between_parents(volume, plain_dir):
    for root in (plain_dir, volume.mountpoint):
        (root / "a" / "b").mkdir(parents=True)
        (root / "a" / "b" / "f").write_bytes(b"deep")
        (root / "c").mkdir()
        os.rename(root / "a" / "b", root / "c" / ("moved-" * 35))
    volume.remount()

    assert tree_snapshot(volume.mountpoint) == tree_snapshot(plain_dir)


# --- contents ------------------------------------------------------------------------------------


def _append_lines(path: Path, writer: int, count: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(count):
            os.write(fd, f"writer {writer:02d} line {i:05d} ".encode() + b"x" * (writer * 37 % 500) + b"\n")
    finally:
        os.close(fd)


def test_append_with_concurrent_writers(volume):
    path = volume.mountpoint / "log"
    path.write_bytes(b"")
    processes = [multiprocessing.Process(target=_append_lines, args=(path, w, 400)) for w in range(6)]

    for process in processes:
        process.start()
    for process in processes:
        process.join()
        assert process.exitcode == 0
    volume.remount()

    lines = path.read_bytes().splitlines()
    assert len(lines) == 6 * 400
    for writer in range(6):
        mine = [line for line in lines if line.startswith(f"writer {writer:02d} ".encode())]
        assert [int(line.split()[3]) for line in mine] == list(range(400))
        assert all(line.endswith(b" " + b"x" * (writer * 37 % 500)) for line in mine)


def test_sparse_file_beyond_4_gib(volume):
    path = volume.mountpoint / "sparse"
    offset = 5 * 2**30 + 12345
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(offset)
        f.write(b"tail")
    volume.remount()

    assert path.stat().st_size == offset + 4
    assert path.stat().st_blocks * 512 < 1 * 2**20
    with open(path, "rb") as f:
        assert f.read(4) == b"head"
        f.seek(3 * 2**30)
        assert f.read(8192) == bytes(8192)
        f.seek(offset - 3)
        assert f.read() == b"\0\0\0tail"


def test_posix_fallocate_extends(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 10_000)
    finally:
        os.close(fd)

    assert path.stat().st_size == 10_000
    assert path.read_bytes() == b"abc" + bytes(9997)


def test_o_direct_reads_and_writes(volume):
    path = volume.mountpoint / "direct"
    buffer = mmap.mmap(-1, 3 * 4096)
    buffer.write(random.Random(2).randbytes(3 * 4096))

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        assert os.pwrite(fd, buffer, 4096) == 3 * 4096
        read_back = mmap.mmap(-1, 3 * 4096)
        assert os.preadv(fd, [read_back], 4096) == 3 * 4096
    finally:
        os.close(fd)

    assert read_back[:] == buffer[:]
    assert path.read_bytes() == bytes(4096) + buffer[:]


def test_shared_mmap_writes_persist(volume):
    path = volume.mountpoint / "mapped"
    path.write_bytes(bytes(5 * 4096 + 100))
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 0)
        mapping[10:15] = b"hello"
        mapping[4 * 4096 + 50 : 4 * 4096 + 55] = b"world"
        mapping.close()  # no msync: the unmount must write the dirty pages
    volume.remount()

    data = path.read_bytes()
    assert data[10:15] == b"hello"
    assert data[4 * 4096 + 50 : 4 * 4096 + 55] == b"world"
    assert len(data) == 5 * 4096 + 100


def test_fsync_makes_data_survive_kill_9(volume):
    path = volume.mountpoint / "durable"
    data = random.Random(3).randbytes(2 * 2**20)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.fdatasync(f.fileno())

    os.kill(volume.pid, signal.SIGKILL)
    volume.wait_exit()
    volume.cleanup()
    volume.start()

    assert path.read_bytes() == data


# --- attributes ----------------------------------------------------------------------------------


def test_attributes_right_after_each_operation(volume):
    path = volume.mountpoint / "f"
    with open(path, "wb") as f:
        f.write(b"x" * 5000)
        f.flush()
        assert os.fstat(f.fileno()).st_size == 5000
        f.truncate(100)
        assert os.fstat(f.fileno()).st_size == 100
    os.chmod(path, 0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.link(path, volume.mountpoint / "g")
    assert path.stat().st_nlink == 2
    os.utime(path, ns=(1, 123_456_789_012_345_678))
    assert path.stat().st_mtime_ns == 123_456_789_012_345_678
    os.truncate(path, 9000)
    assert path.stat().st_size == 9000
    assert (volume.mountpoint / "g").stat().st_size == 9000


def test_touch_now_and_omit(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"")
    os.utime(path, ns=(10**18, 2 * 10**18))

    subprocess.run(["touch", "-a", str(path)], check=True)
    after_a = path.stat()
    subprocess.run(["touch", "-m", "-d", "2001-02-03 04:05:06.123456789", str(path)], check=True)
    after_m = path.stat()

    assert after_a.st_mtime_ns == 2 * 10**18
    assert abs(after_a.st_atime_ns - time.time_ns()) < 60 * 10**9
    assert after_m.st_atime_ns == after_a.st_atime_ns
    assert after_m.st_mtime_ns % 10**9 == 123_456_789


def test_inode_numbers_stable_while_open(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"data")
    with open(path, "rb") as f:
        ino = os.fstat(f.fileno()).st_ino
        os.rename(path, volume.mountpoint / "g")
        assert (volume.mountpoint / "g").stat().st_ino == ino
        os.unlink(volume.mountpoint / "g")
        assert os.fstat(f.fileno()).st_ino == ino
        assert f.read() == b"data"


def test_owner_and_group_of_new_entries(volume):
    os.chmod(volume.mountpoint, 0o777)
    setgid_dir = volume.mountpoint / "shared"
    setgid_dir.mkdir()
    os.chown(setgid_dir, 0, 4321)
    os.chmod(setgid_dir, 0o2777)

    run_as(1000, 1000, volume.mountpoint, Path("mine").write_bytes, b"x")
    run_as(1000, 1000, volume.mountpoint, os.mkdir, "shared/sub")
    run_as(1000, 1000, volume.mountpoint, Path("shared/file").write_bytes, b"y")

    assert ((volume.mountpoint / "mine").stat().st_uid, (volume.mountpoint / "mine").stat().st_gid) == (1000, 1000)
    assert (setgid_dir / "sub").stat().st_gid == 4321
    assert (setgid_dir / "sub").stat().st_mode & stat.S_ISGID
    assert (setgid_dir / "file").stat().st_gid == 4321
    assert (setgid_dir / "file").stat().st_uid == 1000


def test_permissions_for_non_root(volume):
    os.chmod(volume.mountpoint, 0o755)
    private = volume.mountpoint / "private"
    private.write_bytes(b"secret")
    os.chmod(private, 0o600)
    (volume.mountpoint / "theirs").write_bytes(b"")
    os.chown(volume.mountpoint / "theirs", 1000, 1000)

    mnt = volume.mountpoint
    expect_errno(errno.EACCES, run_as, 1000, 1000, mnt, Path("private").read_bytes)
    expect_errno(errno.EPERM, run_as, 1000, 1000, mnt, os.chmod, "private", 0o644)
    expect_errno(errno.EPERM, run_as, 1000, 1000, mnt, os.chown, "theirs", 1001, -1)
    expect_errno(errno.EACCES, run_as, 1000, 1000, mnt, Path("new").write_bytes, b"")
    run_as(1000, 1000, mnt, os.chmod, "theirs", 0o640)
    assert stat.S_IMODE((volume.mountpoint / "theirs").stat().st_mode) == 0o640


def test_chown_clears_setuid(volume, plain_dir):
    modes = []
    for root in (plain_dir, volume.mountpoint):
        path = root / "program"
        path.write_bytes(b"#!/bin/sh\n")
        os.chmod(path, 0o4755)
        os.chown(path, 1000, 1000)
        modes.append(stat.S_IMODE(path.stat().st_mode))

    assert modes[1] == modes[0]


# --- extended attributes -------------------------------------------------------------------------


def test_xattrs_round_trip_encrypted(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"data")

    os.setxattr(path, "user.colour", b"ultramarine-secret")
    os.setxattr(path, "user.empty", b"")
    os.setxattr(path, "user." + "n" * (xattrs.MAX_NAME_BYTES - 5), b"long name")
    expect_errno(errno.EEXIST, os.setxattr, path, "user.colour", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, path, "user.other", b"x", os.XATTR_REPLACE)
    expect_errno(errno.ERANGE, os.setxattr, path, "user." + "n" * xattrs.MAX_NAME_BYTES, b"x")
    volume.remount()

    assert os.getxattr(path, "user.colour") == b"ultramarine-secret"
    assert os.getxattr(path, "user.empty") == b""
    assert sorted(os.listxattr(path)) == sorted(["user.colour", "user.empty", "user." + "n" * (xattrs.MAX_NAME_BYTES - 5)])
    os.removexattr(path, "user.empty")
    expect_errno(errno.ENODATA, os.getxattr, path, "user.empty")
    expect_errno(errno.ENODATA, os.removexattr, path, "user.empty")
    volume.stop()
    stored = b"".join(
        name.encode() + os.getxattr(p, name) for p in volume.backing.iterdir() for name in os.listxattr(p)
    )
    assert b"ultramarine" not in stored
    assert b"colour" not in stored
    volume.start()


def test_acl_enforced_and_kept(volume):
    os.chmod(volume.mountpoint, 0o755)
    path = volume.mountpoint / "f"
    path.write_bytes(b"shared with one user")
    os.chmod(path, 0o600)

    read = Path("f").read_bytes
    expect_errno(errno.EACCES, run_as, 1234, 1234, volume.mountpoint, read)
    subprocess.run(["setfacl", "-m", "u:1234:r", str(path)], check=True)
    assert run_as(1234, 1234, volume.mountpoint, read) == b"shared with one user"
    expect_errno(errno.EACCES, run_as, 1235, 1235, volume.mountpoint, read)

    volume.remount()
    listing = subprocess.run(["getfacl", "-c", str(path)], check=True, capture_output=True, text=True).stdout
    assert "user:1234:r--" in listing
    assert run_as(1234, 1234, volume.mountpoint, read) == b"shared with one user"


def test_default_acl_inherited_like_ext4(volume, plain_dir):
    # Umask 0 here; test_fs_umask.py compares other umasks.
    listings = []
    for root in (plain_dir, volume.mountpoint):
        (root / "d").mkdir()
        subprocess.run(["setfacl", "-d", "-m", "u:99:rwx,g::rx,o::-", str(root / "d")], check=True)
        old_umask = os.umask(0)
        try:
            (root / "d" / "file").write_bytes(b"")
            (root / "d" / "sub").mkdir()
            os.mknod(root / "d" / "node", stat.S_IFREG | 0o640)
        finally:
            os.umask(old_umask)
        names = ["d/file", "d/sub", "d/node"]
        acls = subprocess.run(["getfacl", "-c", *names], cwd=root, check=True, capture_output=True, text=True)
        modes = [stat.S_IMODE((root / name).stat().st_mode) for name in names]
        listings.append((acls.stdout, modes))

    assert listings[1] == listings[0]


def test_default_acl_added_later_is_inherited(volume, plain_dir):
    # The filesystem remembers that a directory has no default ACL after the
    # first entry made in it; setting one afterwards must end that.
    listings = []
    old_umask = os.umask(0)
    try:
        for root in (plain_dir, volume.mountpoint):
            (root / "d").mkdir()
            (root / "d" / "before").write_bytes(b"")
            subprocess.run(["setfacl", "-d", "-m", "u:99:rwx", str(root / "d")], check=True)
            (root / "d" / "after").write_bytes(b"")
            subprocess.run(["setfacl", "-k", str(root / "d")], check=True)
            (root / "d" / "after-removal").write_bytes(b"")
    finally:
        os.umask(old_umask)
    for root in (plain_dir, volume.mountpoint):
        names = ["d/before", "d/after", "d/after-removal"]
        acls = subprocess.run(["getfacl", "-c", *names], cwd=root, check=True, capture_output=True, text=True)
        listings.append(acls.stdout)

    assert "user:99:rwx" in listings[1]
    assert listings[1] == listings[0]


def test_file_capabilities_kept(volume):
    program = volume.mountpoint / "ping-like"
    program.write_bytes(Path("/bin/true").read_bytes())
    os.chmod(program, 0o755)

    subprocess.run(["setcap", "cap_net_raw+ep", str(program)], check=True)
    volume.remount()

    output = subprocess.run(["getcap", str(program)], check=True, capture_output=True, text=True).stdout
    assert "cap_net_raw=ep" in output


def test_write_by_non_root_drops_capabilities(volume, plain_dir):
    results = []
    for root in (plain_dir, volume.mountpoint):
        os.chmod(root, 0o777)
        program = root / "prog"
        program.write_bytes(b"#!/bin/sh\n")
        os.chmod(program, 0o777)
        subprocess.run(["setcap", "cap_net_raw+ep", str(program)], check=True)
        run_as(1000, 1000, root, _append, Path("prog"), b"# changed\n")
        results.append(subprocess.run(["getcap", str(program)], capture_output=True, text=True).stdout.strip())

    assert results[1] == results[0]


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# --- special files -------------------------------------------------------------------------------


def test_fifo_between_processes(volume):
    fifo = volume.mountpoint / "pipe"
    os.mkfifo(fifo, 0o600)
    assert stat.S_ISFIFO(fifo.stat().st_mode)

    def write_message():
        with open(fifo, "wb") as f:
            f.write(b"through the fifo")

    writer = threading.Thread(target=write_message)
    writer.start()
    with open(fifo, "rb") as f:
        assert f.read() == b"through the fifo"
    writer.join()


def test_unix_socket_on_volume(volume):
    path = str(volume.mountpoint / "sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        connection, _ = server.accept()
        client.sendall(b"ping")
        assert connection.recv(4) == b"ping"
        connection.close()
    finally:
        client.close()
        server.close()

    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_device_node_created_but_nodev(volume):
    device = volume.mountpoint / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))

    st = device.stat()
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    # The mount has nodev, so the node cannot be opened: a volume never grants device access.
    expect_errno(errno.EACCES, device.read_bytes)


def test_mknod_regular_file(volume):
    os.mknod(volume.mountpoint / "plain", stat.S_IFREG | 0o1640)

    st = (volume.mountpoint / "plain").lstat()
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 0


# --- locks ---------------------------------------------------------------------------------------


def _try_lock(path: Path, use_flock: bool) -> str:
    with open(path, "r+b") as f:
        try:
            if use_flock:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        except OSError as exc:
            return errno.errorcode[exc.errno]
    return "locked"


@pytest.mark.parametrize("use_flock", [False, True], ids=["posix", "flock"])
def test_locks_exclude_other_processes(volume, use_flock):
    path = volume.mountpoint / "lockfile"
    path.write_bytes(b"x" * 100)
    context = multiprocessing.get_context("fork")

    with open(path, "r+b") as f:
        if use_flock:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            fcntl.lockf(f, fcntl.LOCK_EX, 10, 0)
        with context.Pool(1) as pool:
            assert pool.apply(_try_lock, (path, use_flock)) in ("EAGAIN", "EACCES")
    with context.Pool(1) as pool:
        assert pool.apply(_try_lock, (path, use_flock)) == "locked"


# --- concurrency and crashes ---------------------------------------------------------------------


def _block_writer(path: Path, blocks: int, rounds: int) -> None:
    # O_DIRECT, so that each pwrite reaches the FUSE process whole. Through
    # the writeback cache, Linux 6.18 sends a page to the filesystem while a
    # buffered writer may still be copying into it. The WRITE request itself
    # can then carry a page that is half old and half new (seen here: values
    # switching every 64 bytes), until the next writeback sends it again.
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    page = mmap.mmap(-1, 4096)
    try:
        for generation in range(1, rounds + 1):
            page[:] = bytes([generation % 256]) * 4096
            for block in range(blocks):
                os.pwritev(fd, [page], block * 4096)
    finally:
        os.close(fd)
        page.close()


def test_no_torn_blocks_under_concurrent_readers(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(bytes(64 * 4096))
    writer = multiprocessing.Process(target=_block_writer, args=(path, 64, 60))
    writer.start()

    # The reader uses O_DIRECT so that each read reaches the FUSE process and
    # shows what it decrypts. A buffered reader would test the kernel instead:
    # Linux copies page-cache pages to readers without the page lock, so a
    # buffered read concurrent with a write can show a torn page on any
    # filesystem, ext4 included. Each 4 KiB write covers part of a block, so
    # the FUSE process rewrites the block around it (read-modify-write).
    torn = []
    buffer = mmap.mmap(-1, 64 * 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while writer.is_alive():
            assert os.preadv(fd, [buffer], 0) == 64 * 4096
            data = bytes(buffer)
            torn += [i for i in range(64) if len(set(data[i * 4096 : (i + 1) * 4096])) != 1]
    finally:
        os.close(fd)
        buffer.close()
    writer.join()

    assert writer.exitcode == 0
    assert torn == []
    volume.remount()
    assert path.read_bytes() == bytes([60]) * (64 * 4096)


def _grower(path: Path, steps: int) -> None:
    with open(path, "ab", buffering=0) as f:
        for i in range(steps):
            f.write(bytes([i % 251 + 1]) * 1000)


def test_sizes_never_stale_while_growing(volume):
    path = volume.mountpoint / "growing"
    path.write_bytes(b"")
    grower = multiprocessing.Process(target=_grower, args=(path, 3000))
    grower.start()

    last_size = 0
    with open(path, "rb", buffering=0) as f:
        while grower.is_alive():
            size = os.fstat(f.fileno()).st_size
            assert size >= last_size
            data = os.pread(f.fileno(), size, 0)
            assert len(data) >= size - size % 1000
            assert bytes(1) not in data[: size - size % 1000]
            last_size = size
    grower.join()

    assert path.stat().st_size == 3000 * 1000


def _endless_writer(path: Path) -> None:
    """Rewrite random ranges of *path* until killed; O_DIRECT sends every write through the FUSE process at once."""
    rng = random.Random(os.getpid())
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        while True:
            offset = rng.randrange(0, 256) * 4096 + rng.choice([0, 0, 100, 4000])
            os.pwrite(fd, rng.randbytes(rng.choice([4096, 65536, 300_000, 2**20])), offset)
    except OSError:
        return
    finally:
        os.close(fd)


@pytest.mark.parametrize("delay", [0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
def test_kill_9_mid_write_leaves_file_readable(volume, delay):
    path = volume.mountpoint / "busy"
    path.write_bytes(random.Random(9).randbytes(256 * 4096))

    volume.kill_during_writes(_endless_writer, (path,), delay)

    size = path.stat().st_size
    data = path.read_bytes()
    assert len(data) == size
    assert fmt.cipher_size(size) == sum(p.stat().st_size for p in volume.backing.iterdir() if p.is_file() and not p.name.startswith("securevol."))


def test_backing_store_has_no_xattr_or_name_plaintext(volume):
    (volume.mountpoint / "visible-name").write_bytes(b"")
    os.setxattr(volume.mountpoint / "visible-name", "user.visible-attr", b"visible-value")
    volume.stop()

    stored = backing_bytes(volume.backing)

    assert b"visible" not in stored
    volume.start()


@pytest.fixture
def small_volume(tmp_path):
    """A volume whose backing store is a 4 MiB tmpfs that this test mounts itself."""
    from tests.fs_helpers import Volume, require_fuse

    require_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "securevol-test", str(backing)], check=True)
    vol = Volume(backing, tmp_path / "mnt", tmp_path / "fuse.log")
    try:
        vol.start()
        yield vol
    finally:
        vol.cleanup()
        subprocess.run(["umount", str(backing)], check=True)
    assert vol.unexpected_errors() == []


def test_disk_full_fails_cleanly(small_volume):
    path = small_volume.mountpoint / "big"
    kept = random.Random(8).randbytes(1 * 2**20)
    path.write_bytes(kept)

    with pytest.raises(OSError) as info:
        with open(path, "ab") as f:
            for _ in range(8):
                f.write(os.urandom(2**20))
            f.flush()
            os.fsync(f.fileno())
    assert info.value.errno == errno.ENOSPC
    small_volume.remount()

    data = path.read_bytes()
    assert data[: len(kept)] == kept
    assert len(data) == path.stat().st_size
    assert fmt.cipher_size(len(data)) <= 4 * 2**20


def _listing_with_inodes(directory: Path) -> dict[str, int]:
    """Return every name that readdir(3) gives for *directory*, dot entries included, with its d_ino."""
    output = subprocess.run(["ls", "-a1i", "--", str(directory)], capture_output=True, text=True, check=True).stdout
    return {name: int(ino) for ino, name in (line.split(maxsplit=1) for line in output.splitlines())}


def test_listing_has_dot_entries_like_plain_directory(volume, plain_dir):
    for root in (volume.mountpoint, plain_dir):
        (root / "d" / "sub").mkdir(parents=True)
        (root / "d" / "f").write_text("x")

    for relative in ("d", "d/sub"):
        assert sorted(_listing_with_inodes(volume.mountpoint / relative)) == sorted(
            _listing_with_inodes(plain_dir / relative))

    listing = _listing_with_inodes(volume.mountpoint / "d")
    assert listing["."] == (volume.mountpoint / "d").stat().st_ino
    assert listing[".."] == volume.mountpoint.stat().st_ino
    assert _listing_with_inodes(volume.mountpoint / "d" / "sub")[".."] == (volume.mountpoint / "d").stat().st_ino

    # Repeated listings and a remount leave the inode table consistent: the dot entries count no lookup.
    for _ in range(20):
        assert sorted(os.listdir(volume.mountpoint / "d")) == ["f", "sub"]
    volume.remount()
    assert sorted(_listing_with_inodes(volume.mountpoint / "d")) == [".", "..", "f", "sub"]
