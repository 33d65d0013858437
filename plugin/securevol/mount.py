"""Entry point of a volume's FUSE process: ``python -m securevol.mount``.

It implements the daemon side of the contract in docs/architecture.md:

- the DEK (32 raw bytes) arrives on ``--key-fd``, which is read and closed;
- the process detaches (fork, the parent exits 0) so that no daemon worker
  has to reap it;
- once mounted and serving it writes ``ready PID`` to ``--ready-fd``; on failure it writes
  ``error MESSAGE`` (one sentence, no secrets) and exits non-zero;
- SIGTERM, SIGINT or an external ``fusermount3 -u`` end it cleanly, with
  cached writes in the backing store and the mount removed.
"""

import argparse
import errno
import fcntl
import gc
import logging
import os
import re
import resource
import signal
import sys
from typing import NamedTuple

import pyfuse3
import trio

from securevol import fuse_fallocate, fuse_loop, fuse_session, names
from securevol.access import AccessChecker
from securevol.crypto import DEK_LEN, VOLUME_ID_LEN, DataKey, derive_volume_keys
from securevol.errors import IntegrityError
from securevol.fuse_access import GuardedOperations
from securevol.fuse_ops import SecurevolOperations
from securevol.journal import BackingStoreInUse
from securevol.log import setup_logging
from securevol.syscalls import forbid_core_dumps, keep_large_buffers_in_heap, syncfs

# Named explicitly: run with -m, this module is "__main__".
log = logging.getLogger("securevol.mount")

READ_AHEAD_KB = 1024
# Larger than any request's buffers (1 MiB of data plus ciphertext), so they all come from the heap.
_HEAP_BUFFER_LIMIT = 32 << 20
# Signals that stop the filesystem cleanly: cached writes are synced and the mount removed.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Descriptor slots the kernel allocates at start-up, 128 KiB at 8 bytes each.
# Every inode the kernel has looked up keeps a descriptor open here, and the
# table still grows past this size when needed.
DESCRIPTOR_TABLE_SLOTS = 16384

MOUNT_OPTIONS = frozenset({"fsname=securevol", "subtype=securevol", "allow_other", "default_permissions"})


class StartupError(Exception):
    """A reason the filesystem cannot start, in one sentence for the ready pipe."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m securevol.mount", description=__doc__.splitlines()[0])
    parser.add_argument("--volume", required=True, help="volume name, used in log lines")
    parser.add_argument("--volume-id", required=True, help="volume ID as 32 hex digits")
    parser.add_argument("--backing", required=True, help="backing directory that contains the ciphertext")
    parser.add_argument("--mountpoint", required=True, help="directory to mount the plaintext view on")
    parser.add_argument("--key-fd", type=int, required=True, help="descriptor to read the 32-byte DEK from")
    parser.add_argument("--ready-fd", type=int, required=True, help="descriptor to write 'ready PID' to")
    parser.add_argument("--log-file", help="file to append log lines to (default: stderr)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    parser.add_argument(
        "--access-file", help="the volume's access file (allowlist); without it every caller is allowed"
    )
    parser.add_argument(
        "--foreground", action="store_true", help="do not detach; for debugging by hand"
    )
    parser.add_argument(
        "--inode-descriptors", type=_positive_int, default=None, metavar="N",
        help="descriptors of known files kept open before the least recently used are closed "
             "(default: half the open-file limit)",
    )
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    # Before the DEK is read: a core dump would write it to disk next to the ciphertext.
    forbid_core_dumps()
    keep_large_buffers_in_heap(_HEAP_BUFFER_LIMIT)
    args = parse_args(argv)
    _setup_logging(args)

    try:
        dek = _read_key(args.key_fd)
        volume_id = _parse_volume_id(args.volume_id)
        _check_directories(args.backing, args.mountpoint)
        _prepare_backing_root(args.backing)
        keys = derive_volume_keys(dek, volume_id)
        _check_key_reads_names(args.backing, keys, args.volume)
    except StartupError as exc:
        log.error("mount failed vol=%s error=%s", args.volume, exc)
        _report(args.ready_fd, f"error {exc}")
        return 1

    if not args.foreground:
        _detach()
    return _serve(args, keys)


# --- start-up steps ------------------------------------------------------------------------------


def _setup_logging(args: argparse.Namespace) -> None:
    stream = None
    if args.log_file:
        fd = os.open(args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # backslashreplace, so that a line with a name that is not UTF-8 is written and not dropped.
        stream = open(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 (lives as long as the process)
    setup_logging(args.log_level, stream)


def _read_key(key_fd: int) -> DataKey:
    """Read exactly DEK_LEN bytes from *key_fd*, then close it."""
    chunks = []
    remaining = DEK_LEN
    try:
        while remaining > 0:
            chunk = os.read(key_fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise StartupError(f"reading the key from descriptor {key_fd} failed: {exc.strerror}") from None
    finally:
        _close_quietly(key_fd)

    key = b"".join(chunks)
    if len(key) != DEK_LEN:
        raise StartupError(f"the key pipe delivered {len(key)} bytes, expected {DEK_LEN}")
    return DataKey(key)


def _parse_volume_id(text: str) -> bytes:
    try:
        volume_id = bytes.fromhex(text)
    except ValueError:
        volume_id = b""
    if len(volume_id) != VOLUME_ID_LEN:
        raise StartupError(f"volume ID {text!r} is invalid, expected {2 * VOLUME_ID_LEN} hex digits")
    return volume_id


def _check_directories(backing: str, mountpoint: str) -> None:
    for role, path in (("backing directory", backing), ("mountpoint", mountpoint)):
        if not os.path.isdir(path):
            raise StartupError(f"{role} {path} does not exist or is not a directory")


def _prepare_backing_root(backing: str) -> None:
    """Give an empty backing root its directory IV; refuse a non-empty one without an IV."""
    root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            names.read_dir_iv(root_fd)
            return
        except IntegrityError:
            pass

        if any(not names.is_reserved(entry) for entry in os.listdir(backing)):
            raise StartupError(
                f"backing directory {backing} has files but no valid {names.DIR_IV_NAME}, "
                "so it is not a securevol volume"
            )
        try:
            names.write_dir_iv(root_fd)
        except FileExistsError:
            raise StartupError(f"{names.DIR_IV_NAME} in {backing} is damaged, so names cannot be read") from None
        log.info("backing store initialised path=%s", backing)
    finally:
        os.close(root_fd)


def _check_key_reads_names(backing: str, keys, volume: str) -> None:
    """Refuse a key under which no entry name in the backing root authenticates.

    A volume.json and dek.json restored from another volume of the same name
    would otherwise mount as an empty directory that accepts writes, with the
    real files hidden. One name that authenticates is enough, and a root
    without entries cannot tell, so both mount. When the root's names fail but
    names inside its subdirectories authenticate, the key is right and the
    root's directory IV is what was damaged.
    """
    cipher = names.NameCipher(keys.name_key, volume)
    root_fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        readable, unreadable = _count_readable_names(root_fd, cipher)
        if readable or not unreadable:
            return
        subdirectories_readable = _subdirectory_names_readable(root_fd, cipher)
    finally:
        os.close(root_fd)

    iv_path = os.path.join(backing, names.DIR_IV_NAME)
    if subdirectories_readable:
        raise StartupError(
            f"the volume's key reads names in subdirectories of its backing store but none of the "
            f"{unreadable} in its root, so the root's directory IV {iv_path} is damaged; restore that file "
            "from a backup"
        )
    raise StartupError(
        f"the volume's key decrypts none of the {unreadable} names in its backing store {backing}: either its "
        f"volume.json and dek.json belong to other data (restore the pair that was saved with it), or its "
        f"directory IV {iv_path} is damaged (restore that file)"
    )


def _count_readable_names(dir_fd: int, cipher) -> tuple[int, int]:
    """Return how many entry names of backing directory *dir_fd* authenticate (0 or 1, it stops at the first) and how many fail."""
    dir_iv = names.read_dir_iv(dir_fd)
    readable = unreadable = 0
    for backing_name in os.listdir(dir_fd):
        if names.is_reserved(backing_name) and not names.is_long_name(backing_name):
            continue
        try:
            cipher.plain_name_for(dir_fd, backing_name, dir_iv)
            readable += 1
            break
        except (IntegrityError, OSError):
            unreadable += 1
    return readable, unreadable


def _subdirectory_names_readable(root_fd: int, cipher, limit: int = 16) -> bool:
    """Tell whether a name inside one of the first *limit* subdirectories of the backing root authenticates."""
    checked = 0
    for backing_name in os.listdir(root_fd):
        if checked >= limit:
            break
        if names.is_reserved(backing_name):
            continue
        try:
            child_fd = os.open(
                backing_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd
            )
        except OSError:
            continue  # not a directory
        checked += 1
        try:
            readable, _unreadable = _count_readable_names(child_fd, cipher)
        except (IntegrityError, OSError):
            readable = 0
        finally:
            os.close(child_fd)
        if readable:
            return True
    return False


def _detach() -> None:
    """Fork; the parent exits 0 at once and the child continues in a new session."""
    if os.fork() != 0:
        os._exit(0)
    os.setsid()


def _raise_open_file_limit() -> None:
    """Raise RLIMIT_NOFILE as far as allowed: every inode the kernel has looked up keeps a descriptor open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except OSError:
        ceiling = hard
    for limit in (ceiling, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return
        except (ValueError, OSError):
            continue
    log.warning("open file limit unchanged soft=%d hard=%d", soft, hard)


_TABLE_NOT_GROWN = (
    "growing the descriptor table failed slots=%d error=%s; the first lookups after the mount may be slower"
)


def _grow_descriptor_table(slots: int) -> None:
    """Grow this process's descriptor table to *slots* descriptors now, within RLIMIT_NOFILE.

    The kernel doubles the table when it runs out of slots, and in a process
    with more than one thread each doubling waits for an RCU grace period. On
    this project's test VM, the stat(2) of the first 3,000 files after a mount
    waited through six doublings (64 to 4,096 slots), 58 ms in all. Grown here,
    before any thread starts, the table needs no wait, and the kernel never
    shrinks it.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = min(slots, soft) - 1
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning(_TABLE_NOT_GROWN, slots, exc.strerror)
        return
    try:
        # The lowest free descriptor at or above *highest*: an inherited
        # descriptor there, such as the ready pipe, stays open.
        if highest > fd:
            os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, highest))
    except OSError as exc:
        log.warning(_TABLE_NOT_GROWN, slots, exc.strerror)
    finally:
        os.close(fd)


def _raise_read_ahead(mountpoint: str) -> None:
    """Let the kernel read ahead READ_AHEAD_KB on this mount rather than the default 128 KiB.

    Fewer, larger read requests cut the per-request cost of this Python
    process. The setting belongs to this FUSE connection's own backing device.
    It must be made after the FUSE INIT reply, which caps read-ahead at the
    value the kernel offered at mount time. The stat(2) below returns only once
    the request loop has answered INIT, so this runs in a thread.
    """
    os.stat(mountpoint)
    device = _mount_device(mountpoint)
    if device is None:
        log.warning("read-ahead unchanged: mount not found in mountinfo mountpoint=%s", mountpoint)
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        if exc.errno == errno.EROFS:
            # A managed plugin's container has /sys read-only; nothing to act on.
            log.info("read-ahead left at the kernel default, /sys is read-only device=%s", device)
        else:
            log.warning("read-ahead unchanged device=%s error=%s", device, exc)


def _mount_device(mountpoint: str) -> str | None:
    """Return the MAJOR:MINOR of the last mount at *mountpoint*, from /proc/self/mountinfo."""
    target = os.fsencode(mountpoint)
    device = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            # Field 5 is the mountpoint, with space, tab, newline and backslash as octal escapes.
            unescaped = re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match.group(1), 8)]), fields[4])
            if unescaped == target:
                device = fields[2].decode()
    return device


# --- serving -------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace, keys) -> int:
    # Held back until the request loop listens for them (stop_on_signal). Their
    # default action would end the process and leave a mount that no process serves.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _ignore_signal)
    os.umask(0)  # modes of new backing entries are set exactly from the request
    _raise_open_file_limit()
    _grow_descriptor_table(DESCRIPTOR_TABLE_SLOTS)

    # Resolved before mounting: afterwards a stat(2) of the mountpoint would
    # wait for this very process, which does not serve requests yet.
    mountpoint = os.path.realpath(args.mountpoint)
    try:
        operations = _make_operations(args, keys)
    except BackingStoreInUse as exc:
        log.error("mount failed vol=%s error=%s", args.volume, exc)
        _report(args.ready_fd, f"error {exc}")
        return 1
    except (OSError, IntegrityError) as exc:
        # Opening the journal or redoing its record, such as ENOSPC during the replay.
        log.exception("mount failed vol=%s backing=%s", args.volume, args.backing)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _report(args.ready_fd, f"error opening the backing store {args.backing} failed ({reason}); see the volume log")
        return 1
    try:
        pyfuse3.init(operations, args.mountpoint, set(MOUNT_OPTIONS))
    except RuntimeError:
        log.exception("mount failed vol=%s mountpoint=%s", args.volume, args.mountpoint)
        operations.close()
        _report(args.ready_fd, f"error mounting FUSE at {args.mountpoint} failed; see the volume log")
        return 1
    _extend_pyfuse3(operations)

    # The objects of start-up (modules, classes, functions) live as long as
    # the process, so frozen they are left out of every later full collection.
    # Such a collection walked them all. After the page cache was dropped, it
    # read each extension module's traverse function back from disk: 18 major
    # faults in a cold stat of 10,000 files, and 3 with the objects frozen.
    gc.freeze()
    try:
        outcome = trio.run(_run_until_unmounted, mountpoint, args)
    except BaseException:
        _ignore_stop_signals()
        log.exception("FUSE loop failed vol=%s", args.volume)
        pyfuse3.close(unmount=True)
        operations.close()
        return 1
    _ignore_stop_signals()

    # After an external unmount the mountpoint may already belong to a new
    # mount; only a stop by this process leaves its own mount to remove.
    pyfuse3.close(unmount=outcome.stopped_here)
    operations.close()
    log.info("volume unmounted vol=%s", args.volume)
    return 0 if outcome.ready else 1


def _extend_pyfuse3(operations: SecurevolOperations) -> None:
    """Register the fallocate handler and let init() request FUSE_DONT_MASK, through libfuse's session.

    Without the session, the mount works as plain pyfuse3 does: fallocate(2)
    fails with EOPNOTSUPP and the kernel applies the umask to new entries.
    """
    try:
        session = fuse_session.locate()
    except fuse_session.SessionLayoutError as exc:
        log.warning(
            "libfuse session not found vol=%s error=%s; fallocate(2) is unsupported and the kernel applies the umask",
            operations.volume,
            exc,
        )
        return
    fuse_fallocate.install(session, operations)
    operations.libfuse_session = session


def _make_operations(args: argparse.Namespace, keys) -> SecurevolOperations:
    if args.access_file:
        checker = AccessChecker(args.access_file)
        return GuardedOperations(args.volume, args.backing, keys, checker, args.inode_descriptors)
    return SecurevolOperations(args.volume, args.backing, keys, args.inode_descriptors)


class _LoopOutcome(NamedTuple):
    """Outcome of the request loop."""

    stopped_here: bool  # this process ended it, so its mount is still in place
    ready: bool  # "ready" was reported; otherwise an error line was


async def _run_until_unmounted(mountpoint: str, args: argparse.Namespace) -> _LoopOutcome:
    """Serve requests until the filesystem is unmounted or this process stops it."""
    stopped_here = False
    ready = False
    # Set before the stop signals are unblocked if one was held back during start-up. The stop
    # itself begins when the receiver yields that signal, which may come after announce_ready
    # gets its result, because trio runs tasks that wake together in random order.
    stop_held_back = False

    async def announce_ready() -> None:
        # The stat in _raise_read_ahead returns once this loop has answered the
        # kernel's INIT, so "ready" means mounted and serving.
        nonlocal stopped_here, ready
        try:
            await trio.to_thread.run_sync(_raise_read_ahead, mountpoint)
        except OSError as exc:
            log.error("mount not usable vol=%s error=%s", args.volume, exc)
            _report(args.ready_fd, f"error the new mount at {mountpoint} is not usable: {exc.strerror}")
            stopped_here = True
            pyfuse3.terminate()
            return
        if stopped_here or stop_held_back:
            # A signal held back during start-up has begun the stop. "ready"
            # would have the daemon hand Docker a mountpoint that is about to
            # be an empty directory on the host's disk.
            log.warning("mount abandoned vol=%s: stop requested before it was ready", args.volume)
            _report(args.ready_fd, "error the FUSE process was stopped before it was ready")
            return
        if _report(args.ready_fd, f"ready {os.getpid()}"):
            ready = True
            log.info("volume mounted vol=%s mountpoint=%s pid=%d", args.volume, mountpoint, os.getpid())
            return
        log.error("mount abandoned vol=%s: the ready pipe is closed", args.volume)
        stopped_here = True
        pyfuse3.terminate()

    async def stop_on_signal() -> None:
        nonlocal stopped_here, stop_held_back
        # A signal that arrived before the receiver opened was held back (see
        # _serve) and is delivered now. The receiver stays open until the loop
        # ends, so a repeated signal during the stop is only logged. Closing
        # it restores _ignore_signal for the unmount that follows.
        with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            stop_held_back = bool(signal.sigpending() & set(_STOP_SIGNALS))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            async for signum in signals:
                name = signal.Signals(signum).name
                if stopped_here:
                    log.info("stop already in progress signal=%s", name)
                    continue
                log.info("stop requested signal=%s", name)
                stopped_here = True
                # syncfs(2) makes the kernel write its cached pages through this
                # very loop, so it runs in a thread while the loop keeps serving.
                try:
                    await trio.to_thread.run_sync(syncfs, mountpoint)
                except OSError as exc:
                    log.warning("syncfs before stop failed error=%s", exc)
                pyfuse3.terminate()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        nursery.start_soon(announce_ready)
        await fuse_loop.serve()
        nursery.cancel_scope.cancel()
    return _LoopOutcome(stopped_here, ready)


def _ignore_stop_signals() -> None:
    """Ignore SIGTERM and SIGINT for the rest of the process, which is stopping already.

    Python's shutdown restores the default action of signals that have a
    Python handler, and a stop signal arriving then would end the process
    with that signal rather than exit status 0. SIG_IGN is left in place.
    """
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _ignore_signal(signum: int, frame) -> None:
    """Do nothing with a stop signal that arrives outside the request loop.

    A handler rather than SIG_IGN, because setting SIG_IGN would discard a
    signal that is held back until the loop listens for it.
    """


def _report(ready_fd: int, line: str) -> bool:
    """Write one status line to the ready pipe and close it; return False if the reader is gone."""
    try:
        os.write(ready_fd, (line + "\n").encode("utf-8", "replace"))
        return True
    except OSError:
        return False
    finally:
        _close_quietly(ready_fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
