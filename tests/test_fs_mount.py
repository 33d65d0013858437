"""Tests of the FUSE filesystem on a real mount: ``python -m securevol.mount`` on temporary directories.

Each test starts the real FUSE process with the key on a pipe, works on the
mountpoint, and where it helps runs the same operations on a plain directory
and compares. Teardown always unmounts and ends only the process it started,
and fails the test if the volume log has ERROR lines the test did not expect.
"""

import errno
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from securevol import format as fmt
from tests.fs_helpers import (  # noqa: F401 (plain_dir and volume are fixtures)
    FuseMount,
    MountFailed,
    Volume,
    backing_bytes,
    cached_bytes,
    drop_cached_pages,
    expect_errno,
    is_mounted,
    plain_dir,
    process_alive,
    require_fuse,
    resident_bytes,
    run_mount_command,
    tree_snapshot,
    volume,
    wait_until_dirty_at_most,
    wait_until_resident,
    wait_until_traced,
)


# --- a scripted workload, run on a plain directory and on the mount -------------------------------

B = fmt.BLOCK_SIZE  # plaintext bytes per full block
SIZES = [0, 1, B - 1, B, B + 1, 3 * B + 5, 300_000]


def run_workload(root: Path) -> None:
    """Create, change and remove files and directories under *root* deterministically."""
    rng = random.Random(1234)

    for size in SIZES:
        (root / f"size-{size}").write_bytes(rng.randbytes(size))

    # Writes at arbitrary offsets, inside blocks, across blocks and past the end.
    with open(root / "size-300000", "r+b") as f:
        for offset, length in [(0, 1), (B - 1, 2), (5000, 9000), (299_990, 20), (310_000, 100)]:
            f.seek(offset)
            f.write(rng.randbytes(length))

    # A hole in the middle of a file, and a file that is only a hole.
    with open(root / "holes", "wb") as f:
        f.write(b"start")
        f.seek(5 * B + 123)
        f.write(b"end")
    with open(root / "sparse", "wb") as f:
        f.truncate(3 * B + 7)

    # Truncation: grow and shrink, mid-block and on block boundaries.
    (root / "trunc").write_bytes(rng.randbytes(10_000))
    for size in [9000, 2 * B, 8193, 20_000, 100, 0, B + 1]:
        os.truncate(root / "trunc", size)

    with open(root / "appended", "ab") as f:
        for _ in range(50):
            f.write(rng.randbytes(rng.randrange(1, 3000)))

    # Directories, renames, links and names of every length.
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "dir" / "sub" / "file").write_bytes(b"in a subdirectory")
    os.rename(root / "size-1", root / "dir" / "moved")
    os.rename(root / "dir" / "sub", root / "dir" / "renamed-sub")
    (root / "victim").write_bytes(b"replaced by rename")
    os.rename(root / f"size-{B - 1}", root / "victim")
    (root / "gone").write_bytes(b"deleted")
    os.unlink(root / "gone")
    (root / "empty-dir").mkdir()
    os.rmdir(root / "empty-dir")
    (root / ("long-" * 40 + "name")).write_bytes(b"a 205-byte name")
    (root / ("x" * 255)).write_bytes(b"the longest name")
    (root / "ünïcödé ✓").write_bytes("utf-8 name".encode())
    os.symlink(f"size-{B}", root / "relative-link")
    os.symlink("/etc/hostname", root / "absolute-link")
    os.symlink("t" * 4000, root / "long-target-link")
    os.chmod(root / f"size-{B}", 0o640)
    os.chmod(root / "dir", 0o750)


def test_workload_matches_plain_directory(volume, plain_dir):
    run_workload(plain_dir)
    run_workload(volume.mountpoint)

    assert tree_snapshot(volume.mountpoint) == tree_snapshot(plain_dir)


def test_workload_survives_remount(volume, plain_dir):
    run_workload(plain_dir)
    run_workload(volume.mountpoint)

    volume.remount()

    assert tree_snapshot(volume.mountpoint) == tree_snapshot(plain_dir)


def test_reads_at_any_offset_match(volume, plain_dir):
    rng = random.Random(7)
    data = rng.randbytes(50_000)
    (plain_dir / "f").write_bytes(data)
    (volume.mountpoint / "f").write_bytes(data)
    volume.remount()  # read from the backing store, not the page cache

    with open(volume.mountpoint / "f", "rb", buffering=0) as f:
        for _ in range(300):
            offset = rng.randrange(0, 52_000)
            length = rng.randrange(0, 10_000)
            assert os.pread(f.fileno(), length, offset) == data[offset : offset + length]


def test_sizes_are_plaintext_sizes(volume):
    for size in SIZES:
        (volume.mountpoint / f"f{size}").write_bytes(bytes(size))
        # Reserved entries start with "securevol."; an encrypted name may start with "s" too.
        backing_sizes = sorted(
            p.stat().st_size for p in volume.backing.iterdir() if not p.name.startswith("securevol.")
        )

        assert (volume.mountpoint / f"f{size}").stat().st_size == size
        assert fmt.cipher_size(size) in backing_sizes


def test_backing_store_has_no_plaintext(volume):
    secret = b"TOP-SECRET-PAYLOAD-0123456789"
    (volume.mountpoint / "secret-name.txt").write_bytes(secret * 500)
    (volume.mountpoint / "secret-dir").mkdir()
    (volume.mountpoint / "secret-dir" / "inner-secret").write_bytes(secret)
    os.symlink("secret-target", volume.mountpoint / "secret-link")
    volume.stop()

    stored = backing_bytes(volume.backing)

    for needle in [secret, b"TOP-SECRET", b"secret-name", b"secret-dir", b"inner-secret", b"secret-target"]:
        assert needle not in stored
    volume.start()


def test_files_and_directories_basic_semantics(volume):
    mnt = volume.mountpoint
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"x")

    expect_errno(errno.ENOTEMPTY, os.rmdir, mnt / "d")
    expect_errno(errno.EEXIST, os.mkdir, mnt / "d")
    expect_errno(errno.ENOENT, os.stat, mnt / "missing")
    expect_errno(errno.ENOTDIR, os.listdir, mnt / "d" / "f")
    expect_errno(errno.ENAMETOOLONG, (mnt / ("n" * 256)).write_bytes, b"")
    assert sorted(os.listdir(mnt)) == ["d"]

    os.unlink(mnt / "d" / "f")
    os.rmdir(mnt / "d")
    assert os.listdir(mnt) == []


def test_rename_over_empty_directory(volume, plain_dir):
    for root in (plain_dir, volume.mountpoint):
        (root / "a").mkdir()
        (root / "a" / "content").write_bytes(b"moved along")
        (root / "b").mkdir()
        os.rename(root / "a", root / "b")

    assert tree_snapshot(volume.mountpoint) == tree_snapshot(plain_dir)
    # The replaced directory is gone from the backing store, IV and all.
    assert len([name for name in os.listdir(volume.backing) if not name.startswith("securevol.")]) == 1


def test_rename_over_non_empty_directory_fails(volume):
    (volume.mountpoint / "a").mkdir()
    (volume.mountpoint / "b").mkdir()
    (volume.mountpoint / "b" / "keep").write_bytes(b"")

    expect_errno(errno.ENOTEMPTY, os.rename, volume.mountpoint / "a", volume.mountpoint / "b")
    assert (volume.mountpoint / "b" / "keep").exists()


def test_unlinked_open_file_stays_readable(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"still here")
    with open(path, "rb") as f:
        os.unlink(path)
        assert f.read() == b"still here"
    assert not path.exists()


def test_statfs_reports_backing_free_space(volume):
    mounted = os.statvfs(volume.mountpoint)
    backing = os.statvfs(volume.backing)

    assert mounted.f_namemax == 255
    assert mounted.f_blocks == backing.f_blocks
    assert abs(mounted.f_bavail - backing.f_bavail) * backing.f_frsize < 64 * 2**20


def test_ownership_and_times(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"data")
    os.chown(path, 1234, 5678)
    os.utime(path, ns=(1_000_000_123, 2_000_000_456))
    os.symlink("f", volume.mountpoint / "l")
    os.chown(volume.mountpoint / "l", 42, 43, follow_symlinks=False)

    st = path.stat()
    link_st = (volume.mountpoint / "l").lstat()

    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert (link_st.st_uid, link_st.st_gid) == (42, 43)
    volume.remount()
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1234, 5678, 2_000_000_456)


# --- tampering -----------------------------------------------------------------------------------


def _backing_file_of(volume: Volume, size: int) -> Path:
    """Return the backing file that stores a plaintext file of *size* bytes (the only one of that size)."""
    matches = [p for p in volume.backing.iterdir() if p.is_file() and p.stat().st_size == fmt.cipher_size(size)]
    assert len(matches) == 1
    return matches[0]


def test_tampered_block_eio_and_log(volume):
    data = random.Random(3).randbytes(5 * B)
    (volume.mountpoint / "victim").write_bytes(data)
    volume.stop()

    backing_file = _backing_file_of(volume, len(data))
    with open(backing_file, "r+b") as f:
        f.seek(fmt.block_offset(2) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    volume.start()
    volume.expected_errors.append("integrity check failed")

    with open(volume.mountpoint / "victim", "rb", buffering=0) as f:
        assert os.pread(f.fileno(), B, 0) == data[:B]
        assert os.pread(f.fileno(), B, 4 * B) == data[4 * B :]
        expect_errno(errno.EIO, os.pread, f.fileno(), 10, 2 * B + 5)
        expect_errno(errno.EIO, f.read)

    errors = volume.log_lines("ERROR")
    assert len(errors) == 1
    assert "integrity check failed vol=testvol" in errors[0]
    assert f"path={backing_file.name}" in errors[0]
    assert "block=2" in errors[0]


def test_truncated_ciphertext_reads_as_eio(volume):
    data = random.Random(4).randbytes(2 * B + 300)
    (volume.mountpoint / "victim").write_bytes(data)
    volume.stop()
    backing_file = _backing_file_of(volume, len(data))
    os.truncate(backing_file, backing_file.stat().st_size - 10)
    volume.start()
    volume.expected_errors.append("integrity check failed")

    with open(volume.mountpoint / "victim", "rb", buffering=0) as f:
        assert os.pread(f.fileno(), B, 0) == data[:B]
        expect_errno(errno.EIO, os.pread, f.fileno(), 100, 2 * B)


@pytest.mark.parametrize(
    "cipher_size",
    [10, fmt.HEADER_LEN + fmt.CIPHER_BLOCK_SIZE + 20],
    ids=["partial-header", "last-block-too-short"],
)
def test_impossible_ciphertext_length_reads_as_eio(volume, cipher_size):
    # Such a length cannot be a valid file; reporting it as a shorter one would hide the damage.
    data = random.Random(5).randbytes(3 * B)
    (volume.mountpoint / "victim").write_bytes(data)
    volume.stop()
    backing_file = _backing_file_of(volume, len(data))
    os.truncate(backing_file, cipher_size)
    volume.start()
    volume.expected_errors.append("integrity check failed")

    path = volume.mountpoint / "victim"
    expect_errno(errno.EIO, path.read_bytes)
    assert path.stat().st_size == fmt.intact_plain_size(cipher_size) + 1
    errors = volume.log_lines("ERROR")
    assert errors and all(f"path={backing_file.name}" in line for line in errors)

    path.unlink()
    assert not backing_file.exists()


def test_swapped_files_read_as_eio(volume):
    (volume.mountpoint / "a").write_bytes(b"A" * 5000)
    (volume.mountpoint / "b").write_bytes(b"B" * 5000)
    volume.stop()
    files = [p for p in volume.backing.iterdir() if p.stat().st_size == fmt.cipher_size(5000)]
    contents = [p.read_bytes() for p in files]
    files[0].write_bytes(contents[0][: fmt.HEADER_LEN] + contents[1][fmt.HEADER_LEN :])
    volume.start()
    volume.expected_errors.append("integrity check failed")

    results = []
    for name in ("a", "b"):
        try:
            results.append((volume.mountpoint / name).read_bytes())
        except OSError as exc:
            results.append(exc.errno)

    assert errno.EIO in results
    assert results[0] != b"B" * 5000
    assert results[1] != b"A" * 5000


# --- process lifecycle ---------------------------------------------------------------------------


def test_kill_9_gives_clean_error_and_lazy_unmount(volume):
    (volume.mountpoint / "f").write_bytes(b"data")
    os.kill(volume.pid, signal.SIGKILL)
    volume.wait_exit()

    # ENOTCONN, or ECONNABORTED for a request that was in flight when the connection ended.
    with pytest.raises(OSError) as info:
        os.stat(volume.mountpoint / "f")
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    subprocess.run(["fusermount3", "-uz", str(volume.mountpoint)], check=True)
    assert not is_mounted(volume.mountpoint)

    volume.start()
    assert (volume.mountpoint / "f").read_bytes() == b"data"


def test_sigterm_writes_cached_data_and_unmounts(volume):
    data = random.Random(5).randbytes(3 * 2**20)
    with open(volume.mountpoint / "f", "wb") as f:
        f.write(data)  # left in the kernel's writeback cache, not fsynced
    pid = volume.pid

    os.kill(pid, signal.SIGTERM)
    volume.wait_exit()

    assert not is_mounted(volume.mountpoint)
    assert "volume unmounted vol=testvol" in volume.log_file.read_text()
    volume.start()
    assert (volume.mountpoint / "f").read_bytes() == data


def test_sigterm_with_open_file_detaches(volume):
    (volume.mountpoint / "f").write_bytes(b"x" * 10_000)
    held = os.open(volume.mountpoint / "f", os.O_RDONLY)
    try:
        os.kill(volume.pid, signal.SIGTERM)
        volume.wait_exit()

        assert not is_mounted(volume.mountpoint)
        assert "volume unmounted vol=testvol" in volume.log_file.read_text()
    finally:
        # The connection is gone, so close(2) may report that; the descriptor is released anyway.
        try:
            os.close(held)
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    volume.start()
    assert (volume.mountpoint / "f").read_bytes() == b"x" * 10_000


def test_sigterm_stops_a_volume_under_constant_load(volume):
    # The request loop serves queued requests back to back; it must still
    # give the signal handler its turn while a client keeps it busy.
    (volume.mountpoint / "f").write_bytes(b"data")
    stop = threading.Event()
    served = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                os.stat(volume.mountpoint / "f")
                os.listdir(volume.mountpoint)
            except OSError:
                return  # the mount went away
            served.append(1)

    clients = [threading.Thread(target=hammer) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        time.sleep(0.5)
        assert served, "the clients got no replies"
        os.kill(volume.pid, signal.SIGTERM)
        volume.wait_exit()
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=30)

    assert not is_mounted(volume.mountpoint)
    assert "volume unmounted vol=testvol" in volume.log_file.read_text()


def test_sequential_read_fetches_ciphertext_ahead(volume):
    size = 16 * 2**20
    (volume.mountpoint / "f").write_bytes(random.Random(3).randbytes(size))
    volume.remount()  # empties the kernel's cache of the plaintext
    backing = _backing_file_of(volume, size)
    drop_cached_pages(backing)
    assert resident_bytes(backing) < 2**20

    with open(volume.mountpoint / "f", "rb", buffering=0) as f:
        assert len(f.read(65536)) == 65536

    # The kernel itself reads ahead at most 1 MiB on this FUSE mount (READ_AHEAD_KB),
    # and securevol requests 8 MiB of the backing file beyond each sequential read.
    assert wait_until_resident(backing, 6 * 2**20) >= 6 * 2**20


def test_ascending_writes_fetch_ciphertext_ahead(volume):
    size = 16 * 2**20
    (volume.mountpoint / "f").write_bytes(random.Random(4).randbytes(size))
    volume.remount()
    backing = _backing_file_of(volume, size)
    drop_cached_pages(backing)

    # Every fourth block of the first 512 KiB; the kernel writes them back in file order at fsync.
    fd = os.open(volume.mountpoint / "f", os.O_RDWR)
    try:
        for offset in range(0, 2**19, 4 * fmt.BLOCK_SIZE):
            os.pwrite(fd, b"w" * fmt.BLOCK_SIZE, offset)
        os.fsync(fd)
    finally:
        os.close(fd)

    assert wait_until_resident(backing, 6 * 2**20) >= 6 * 2**20
    with open(volume.mountpoint / "f", "rb") as f:
        assert f.read(fmt.BLOCK_SIZE) == b"w" * fmt.BLOCK_SIZE


def _write_sequentially(path: Path, size: int, chunk: int = 2**20) -> None:
    """Write *size* bytes to *path* in *chunk*-byte writes, without fsync."""
    data = random.Random(5).randbytes(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // chunk):
            os.write(fd, data)
    finally:
        os.close(fd)


def test_sequential_writes_start_writeback_of_ciphertext(volume):
    size = 64 * 2**20
    _write_sequentially(volume.mountpoint / "f", size)
    backing = _backing_file_of(volume, size)

    # Without write-behind, all 64 MiB would stay dirty for the kernel's 30 s
    # expiry: the flusher starts only when a tenth of the memory is dirty.
    # With it, at most the last 8 MiB run, the 1 MiB margin and the tail are.
    assert wait_until_dirty_at_most(backing, 10 * 2**20) <= 10 * 2**20
    assert (volume.mountpoint / "f").read_bytes() == random.Random(5).randbytes(2**20) * 64


def test_sequential_writes_drop_cached_ciphertext(volume):
    path = volume.mountpoint / "f"
    chunk = random.Random(6).randbytes(2**20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(40):
            os.write(fd, chunk)
        # The first 40 MiB reach the disk, so their pages are clean and can be
        # dropped. A page still under writeback would stay in the cache.
        os.fsync(fd)
        backing = _backing_file_of(volume, 40 * 2**20)

        for _ in range(24):
            os.write(fd, chunk)
    finally:
        os.close(fd)

    # The writes past 40 MiB asked to drop what was handed to the disk 24 MiB
    # before them: the first 24 MiB but the header's page. The kernel keeps a
    # page cache folio (up to 1 MiB here) whole when a range ends inside it,
    # as at the header's page. The mount's own cache still has the plaintext.
    assert cached_bytes(backing, 0, 24 * 2**20) <= 4 * 2**20
    assert path.read_bytes() == chunk * 64


_WRITEBACK_CALLS = ("sync_file_range", "fsync", "fdatasync")


def _trace_writeback_calls(pid: int, log_path: Path) -> subprocess.Popen:
    """Start strace on every thread of FUSE process *pid*, logging its calls that start or wait for writeback."""
    tracer = subprocess.Popen(
        ["strace", "-q", "-f", "-y", "-p", str(pid), "-e", f"trace={','.join(_WRITEBACK_CALLS)}", "-o", str(log_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for task in os.listdir(f"/proc/{pid}/task"):
        wait_until_traced(int(task))
    return tracer


def _writeback_calls_on(log_text: str, backing: Path) -> list[str]:
    """Return the traced calls in *log_text* made on a descriptor of *backing*."""
    return [line for line in log_text.splitlines()
            if any(f"{call}(" in line for call in _WRITEBACK_CALLS) and f"<{backing}>" in line]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_scattered_writes_leave_writeback_to_kernel(volume, tmp_path):
    # Seen in the FUSE process's system calls: the backing file's dirty pages
    # would also be cleaned by any sync(2) elsewhere on the machine.
    size = 32 * 2**20
    _write_sequentially(volume.mountpoint / "f", size)
    volume.remount()  # no write-behind of the writes above is still queued
    scattered = _backing_file_of(volume, size)
    trace_log = tmp_path / "strace.log"
    tracer = _trace_writeback_calls(volume.pid, trace_log)
    try:
        # Backwards, 2 MiB apart: no run moves forward, so nothing is handed to the disk early.
        fd = os.open(volume.mountpoint / "f", os.O_WRONLY)
        try:
            for offset in range(size - 2**20, -1, -2 * 2**20):
                os.pwrite(fd, b"s" * fmt.BLOCK_SIZE, offset)
        finally:
            os.close(fd)

        # An ascending file afterwards is handed to the disk, which shows that the trace records such calls.
        _write_sequentially(volume.mountpoint / "g", 24 * 2**20)
        ascending = _backing_file_of(volume, 24 * 2**20)
        deadline = time.monotonic() + 10
        while not _writeback_calls_on(trace_log.read_text(), ascending):
            assert time.monotonic() < deadline, "no write-behind of the ascending file was traced"
            time.sleep(0.05)
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)

    assert _writeback_calls_on(trace_log.read_text(), scattered) == []


def test_fusermount_unmount_ends_process(volume):
    pid = volume.pid
    (volume.mountpoint / "f").write_bytes(b"x" * 100_000)

    subprocess.run(["fusermount3", "-u", str(volume.mountpoint)], check=True)
    volume.wait_exit()

    assert not process_alive(pid)
    assert not is_mounted(volume.mountpoint)
    volume.start()
    assert (volume.mountpoint / "f").read_bytes() == b"x" * 100_000


def test_process_detaches_and_reports_its_pid(volume):
    with open(f"/proc/{volume.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    parent_pid, session_id = int(fields[1]), int(fields[3])

    assert parent_pid != os.getpid()
    assert session_id == volume.pid
    assert is_mounted(volume.mountpoint)
    assert "securevol" in Path("/proc/self/mountinfo").read_text()


def test_fuse_threads_have_kernel_names(volume):
    (volume.mountpoint / "f").write_bytes(b"x")  # the closer thread starts with the inode table
    names = {(task / "comm").read_text().strip() for task in Path(f"/proc/{volume.pid}/task").iterdir()}

    assert "sv-backing-io" in names
    assert "sv-closer" in names


def test_mount_options(volume):
    line = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(volume.mountpoint) in line)

    assert " fuse.securevol securevol " in line
    assert "allow_other" in line
    assert "default_permissions" in line
    device = line.split()[2]
    assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip() == "1024"


@pytest.mark.parametrize("key", [b"", b"short", bytes(31)], ids=["empty", "5-bytes", "31-bytes"])
def test_bad_key_length_reports_error(tmp_path, key):
    require_fuse()
    mount = FuseMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    try:
        with pytest.raises(MountFailed, match=r"^error the key pipe delivered \d+ bytes, expected 32$"):
            mount.start(key_bytes=key)
        assert not is_mounted(mount.mountpoint)
    finally:
        mount.cleanup()


def test_bad_volume_id_reports_error(tmp_path):
    require_fuse()
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    args = ["--volume", "v", "--volume-id", "xyz", "--backing", str(tmp_path / "b"), "--mountpoint", str(tmp_path / "m")]

    line = run_mount_command(args, bytes(32))

    assert line == "error volume ID 'xyz' is invalid, expected 32 hex digits"


def test_foreign_backing_directory_refused(tmp_path):
    require_fuse()
    backing = tmp_path / "backing"
    backing.mkdir()
    (backing / "somebody-elses-file").write_bytes(b"")
    mount = FuseMount(backing, tmp_path / "mnt", tmp_path / "fuse.log")
    try:
        with pytest.raises(MountFailed, match="has files but no valid securevol.diriv"):
            mount.start()
    finally:
        mount.cleanup()


def test_key_of_other_data_refused(volume):
    (volume.mountpoint / "written-under-the-first-key").write_bytes(b"data")
    (volume.mountpoint / ("long-" + "n" * 240)).write_bytes(b"data")
    volume.stop()
    other_key = bytes(reversed(volume.key))
    volume.expected_errors.append("mount failed vol=testvol")

    with pytest.raises(MountFailed, match=r"^error the volume's key decrypts none of the 2 names in its backing"):
        volume.start(other_key)

    assert not is_mounted(volume.mountpoint)
    volume.start()
    assert "written-under-the-first-key" in os.listdir(volume.mountpoint)


def test_damaged_root_directory_iv_named_as_the_cause(volume):
    (volume.mountpoint / "top-level-file").write_bytes(b"data")
    (volume.mountpoint / "sub").mkdir()
    (volume.mountpoint / "sub" / "inner-file").write_bytes(b"data")
    volume.stop()
    iv_file = volume.backing / "securevol.diriv"
    iv = bytearray(iv_file.read_bytes())
    iv[0] ^= 0x01
    iv_file.write_bytes(bytes(iv))
    volume.expected_errors.append("mount failed vol=testvol")

    with pytest.raises(MountFailed, match=r"reads names in subdirectories .* so the root's directory IV .* is damaged"):
        volume.start()
    assert not is_mounted(volume.mountpoint)


def test_key_check_accepts_a_partly_damaged_root(volume):
    for index in range(3):
        (volume.mountpoint / f"file-{index}").write_bytes(b"data")
    volume.stop()
    damaged = sorted(name for name in os.listdir(volume.backing) if not name.startswith("securevol."))[:2]
    for name in damaged:
        os.rename(volume.backing / name, volume.backing / (name[:-2] + ("AA" if name[-2:] != "AA" else "BB")))
    volume.expected_errors.append("name unreadable")

    volume.start()

    assert len(os.listdir(volume.mountpoint)) == 1


def test_second_process_on_same_backing_refused(volume, tmp_path):
    second = FuseMount(volume.backing, tmp_path / "second-mnt", tmp_path / "second.log")
    try:
        with pytest.raises(MountFailed, match="^error backing store .* is in use by another FUSE process$"):
            second.start()
        assert not is_mounted(second.mountpoint)
    finally:
        second.cleanup()
    assert (volume.mountpoint / "still-works").write_bytes(b"x") == 1


def test_unopenable_journal_reported(volume):
    volume.stop()
    journal = volume.backing / "securevol.journal"
    journal.unlink()
    journal.mkdir()  # open(2) of the journal now fails with EISDIR
    volume.expected_errors.append("mount failed vol=testvol")

    with pytest.raises(MountFailed, match=r"^error opening the backing store .* failed \(Is a directory\); see"):
        volume.start()

    assert not is_mounted(volume.mountpoint)
    assert any("mount failed vol=testvol" in line for line in volume.log_lines("ERROR"))
    journal.rmdir()
    volume.start()
    assert os.listdir(volume.mountpoint) == []


def test_modes_of_new_entries_ignore_process_umask(volume):
    old_umask = os.umask(0)
    try:
        fd = os.open(volume.mountpoint / "f", os.O_CREAT | os.O_WRONLY, 0o4755)
        os.close(fd)
        os.mkdir(volume.mountpoint / "d", 0o1777)
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE((volume.mountpoint / "f").stat().st_mode) == 0o4755
    assert stat.S_IMODE((volume.mountpoint / "d").stat().st_mode) == 0o1777


def test_created_file_owner_and_mode(volume):
    # The first file in a directory goes the long way (create 0600, chown,
    # chmod), later ones get owner and mode from open(2) alone.
    modes = [0o644, 0o4755, 0o2711, 0o600, 0o1644, 0o777]
    directory = volume.mountpoint / "d"
    directory.mkdir()
    old_umask = os.umask(0)
    try:
        for i, mode in enumerate(modes):
            os.close(os.open(directory / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    finally:
        os.umask(old_umask)
    # Regular files never keep the sticky bit: on the backing store it marks long symlinks.
    expected = [mode & ~stat.S_ISVTX for mode in modes]

    def seen() -> list[tuple[int, int, int]]:
        return [
            (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            for st in (os.stat(directory / f"f{i}") for i in range(len(modes)))
        ]

    assert seen() == [(mode, 0, 0) for mode in expected]
    volume.remount()
    assert seen() == [(mode, 0, 0) for mode in expected]
    [backing_dir] = [p for p in volume.backing.iterdir() if p.is_dir()]
    backing_files = [p for p in backing_dir.iterdir() if p.is_file() and p.stat().st_size == 0]
    assert sorted(stat.S_IMODE(p.stat().st_mode) for p in backing_files) == sorted(expected)


def test_unlinked_open_file_times_kept(volume):
    # The FUSE process keeps the times of an unlinked file in memory rather
    # than on its backing inode; a handle still open must see them.
    path = volume.mountpoint / "f"
    path.write_bytes(b"x" * 100)
    with open(path, "r+b") as f:
        os.unlink(path)
        os.utime(f.fileno(), ns=(1_000_000_007, 2_000_000_009))
        st = os.fstat(f.fileno())

        assert st.st_atime_ns == 1_000_000_007
        assert st.st_mtime_ns == 2_000_000_009
        assert st.st_nlink == 0
    assert not path.exists()


def test_descriptor_exhaustion_logged_once(volume):
    # Every directory the kernel has looked up keeps a descriptor open in the
    # FUSE process; files give theirs up early (tests/test_fs_many_inodes.py).
    (volume.mountpoint / "f0").write_bytes(b"x")
    soft, hard = resource.prlimit(volume.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(volume.pid, resource.RLIMIT_NOFILE, (200, hard))
    directory = volume.mountpoint / "many"
    directory.mkdir()

    failed = []
    for i in range(300):
        try:
            (directory / f"d{i}").mkdir()
        except OSError as exc:
            failed.append((f"d{i}", exc.errno))
    for i, make in enumerate([os.mkdir, os.mkdir, lambda path: os.symlink("f0", path)]):
        try:
            make(directory / f"e{i}")
        except OSError as exc:
            failed.append((f"e{i}", exc.errno))

    assert failed
    assert {code for _, code in failed} == {errno.EMFILE}
    warnings = [line for line in volume.log_lines("WARNING") if "file descriptors exhausted" in line]
    assert len(warnings) == 1
    assert "limit=200" in warnings[0]

    resource.prlimit(volume.pid, resource.RLIMIT_NOFILE, (soft, hard))
    # A create that failed left no file behind. A listing reaches the FUSE
    # process, but a lookup could be served from the negative entry the kernel cached.
    assert not set(os.listdir(directory)) & {name for name, _ in failed}
    (directory / "after").write_bytes(b"ok")
    assert (directory / "after").read_bytes() == b"ok"
    assert (volume.mountpoint / "f0").read_bytes() == b"x"


# --- caches and deferred work of the FUSE process --------------------------------------------------

# A version 2 file capability that grants CAP_NET_BIND_SERVICE (bit 10), as setcap(8) writes it.
CAPABILITY_V2 = (0x02000000).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


def test_capability_set_after_write_is_seen(volume):
    path = volume.mountpoint / "f"
    path.write_bytes(b"x" * 10_000)  # the kernel requests security.capability with the writes
    expect_errno(errno.ENODATA, os.getxattr, path, "security.capability")

    os.setxattr(path, "security.capability", CAPABILITY_V2)
    assert os.getxattr(path, "security.capability") == CAPABILITY_V2

    os.removexattr(path, "security.capability")
    expect_errno(errno.ENODATA, os.getxattr, path, "security.capability")
    os.setxattr(path, "security.capability", CAPABILITY_V2)
    volume.remount()
    assert os.getxattr(path, "security.capability") == CAPABILITY_V2


def _open_iv_files(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.endswith("/securevol.diriv"):
            targets.append(target)
    return targets


def test_mkdir_iv_synced_by_next_fsync(volume):
    (volume.mountpoint / "d").mkdir()
    pending = _open_iv_files(volume.pid)
    assert len(pending) == 1
    assert len(Path(pending[0]).read_bytes()) == 16

    with open(volume.mountpoint / "d" / "f", "wb") as f:
        f.write(b"durable")
        f.flush()
        os.fsync(f.fileno())
    assert _open_iv_files(volume.pid) == []


def test_unsynced_ivs_bounded_by_limit(volume):
    # Under a limit of 800, at most 800 // 16 = 50 IV descriptors wait for an fsync.
    soft, hard = resource.prlimit(volume.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(volume.pid, resource.RLIMIT_NOFILE, (800, hard))
    try:
        for i in range(120):
            (volume.mountpoint / f"d{i}").mkdir()
            assert len(_open_iv_files(volume.pid)) < 50
    finally:
        resource.prlimit(volume.pid, resource.RLIMIT_NOFILE, (soft, hard))


def test_mkdir_iv_synced_by_fsyncdir(volume):
    (volume.mountpoint / "a").mkdir()
    (volume.mountpoint / "a" / "b").mkdir()
    assert len(_open_iv_files(volume.pid)) == 2

    fd = os.open(volume.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _open_iv_files(volume.pid) == []
    assert sorted(p.name for p in (volume.mountpoint / "a").iterdir()) == ["b"]


def _open_deleted_files(pid: int, backing: Path) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(f"{backing}/") and target.endswith(" (deleted)"):
            targets.append(target)
    return targets


def test_unlinked_file_descriptor_closed(volume):
    path = volume.mountpoint / "big"
    path.write_bytes(os.urandom(2**20))
    os.stat(path)  # the kernel has looked the file up, so the FUSE process holds its descriptor

    os.unlink(path)
    # The kernel sends FORGET for the unlinked inode, and a background thread closes its descriptor.
    deadline = time.monotonic() + 10
    while _open_deleted_files(volume.pid, volume.backing) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_deleted_files(volume.pid, volume.backing) == []
