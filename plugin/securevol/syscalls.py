"""Linux system calls that the os module does not offer, called through ctypes.

The FUSE layer works on O_PATH file descriptors, which fchown(2), futimens(3)
and friends reject. These wrappers use the AT_EMPTY_PATH forms that act on the
descriptor itself, including a symlink's own inode, and renameat2(2) for the
rename flags. Each raises OSError with the errno, like the os module.
"""

import contextlib
import ctypes
import errno
import os
import resource

AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4
SYNC_FILE_RANGE_WRITE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_OFF_T_MAX = 2**63 - 1
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int, call: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{call}: {os.strerror(code)}")


def fchown_path_fd(fd: int, uid: int, gid: int) -> None:
    """Change the owner of the inode behind *fd* (an O_PATH descriptor is fine); -1 keeps a value."""
    result = _libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
    _check(result, "fchownat")


def set_times_path_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the access and modification times of the inode behind *fd*; None leaves a time as it is."""
    times = (_Timespec * 2)(_timespec(atime_ns), _timespec(mtime_ns))
    result = _libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
    _check(result, "utimensat")


def _timespec(ns: int | None) -> _Timespec:
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    seconds, nanoseconds = divmod(ns, 1_000_000_000)
    return _Timespec(seconds, nanoseconds)


def rename_at(old_dir_fd: int, old_name: str, new_dir_fd: int, new_name: str, flags: int = 0) -> None:
    """Rename with renameat2(2), so that RENAME_NOREPLACE and RENAME_EXCHANGE work."""
    result = _libc.renameat2(old_dir_fd, os.fsencode(old_name), new_dir_fd, os.fsencode(new_name), flags)
    _check(result, "renameat2")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the dirty pages of [offset, offset + length) of *fd* to storage, and return without waiting.

    Raises OverflowError for a range beyond off_t, which ctypes would otherwise wrap around.
    """
    if not (0 <= offset <= _OFF_T_MAX and 0 <= length <= _OFF_T_MAX):
        raise OverflowError(f"range {offset}+{length} does not fit in off_t")
    result = _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), SYNC_FILE_RANGE_WRITE)
    _check(result, "sync_file_range")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2), whose modes (punch a hole, zero a range) os.posix_fallocate lacks."""
    if not (0 <= offset and 0 < length and offset + length <= _OFF_T_MAX):
        raise OSError(errno.EFBIG, f"fallocate: range {offset}+{length} does not fit in off_t")
    result = _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length))
    _check(result, "fallocate")


def syncfs(path: str) -> None:
    """Write the cached data of the filesystem that contains *path* to its storage, with syncfs(2).

    ctypes releases the GIL for the call, which pyfuse3.syncfs (3.5) does not.
    A FUSE process that syncs its own mount needs that: the kernel waits for
    write and setattr requests, which the request loop serves only while
    this thread lets it run.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(_libc.syncfs(fd), "syncfs")
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync(2) the directory *path*, so that entries just created, renamed or removed in it persist."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace *path* atomically and durably with a mode 0600 file holding *data*.

    The steps are a temporary file next to it, fsync, rename(2) over *path*,
    and fsync of the directory, so a reader sees the old or the new content.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # A kill leaves the file behind: callers that store secrets remove such files themselves.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory or ".")


def temporary_files_of(path: str | os.PathLike[str]) -> list[str]:
    """Return the temporary files that replace_file() calls for *path* left, for example when killed."""
    directory, name = os.path.split(os.fspath(path))
    prefix = f".{name}."
    try:
        entries = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    return [os.path.join(directory, entry) for entry in entries
            if entry.startswith(prefix) and entry.endswith(".tmp") and entry.count(".") == name.count(".") + 4]


def name_current_thread(name: str) -> None:
    """Give the calling thread *name* (at most 15 bytes) in ps, top and /proc/PID/task/TID/comm.

    Python's thread names stay inside Python, so operators would see every
    thread of a FUSE process as "python".
    """
    _check(_libc.prctl(PR_SET_NAME, os.fsencode(name)[:15], 0, 0, 0), "prctl")


def forbid_core_dumps() -> None:
    """Keep this process's memory (DEKs, the KEK, plaintext) out of core dumps.

    RLIMIT_CORE 0 stops core files. A core dump piped to a program such as
    systemd-coredump ignores that limit (core(5)), but a process that is not
    dumpable is not dumped at all.
    Forked children inherit both settings; execve(2) makes a process dumpable
    again, so each securevol program calls this itself.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl")


def keep_large_buffers_in_heap(limit: int) -> None:
    """Serve allocations below *limit* bytes from the heap and keep freed memory there for reuse.

    glibc serves allocations of 128 KiB and more with fresh mmap(2) pages by
    default, so each 1 MiB read or write request faulted its buffers in page
    by page, about 500 page faults per MiB. With this, buffers are reused
    from request to request. A failure only costs speed, so it is ignored.
    """
    _libc.mallopt(_M_MMAP_THRESHOLD, limit)
    _libc.mallopt(_M_TRIM_THRESHOLD, 4 * limit)
