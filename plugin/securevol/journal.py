"""A one-record redo journal that makes each change of a backing file atomic if the FUSE process dies.

Why: a SIGKILL (or the OOM killer) that arrives while the kernel copies a
pwrite(2) into the page cache ends the copy at a page boundary. A ciphertext
block is 32800 bytes, so it always straddles page boundaries, and a torn block
reads as EIO for good. A change can also take several system calls (pad the
old last block, write the new run, truncate), and dying between them leaves a
file of impossible length.

How: before a change that is not atomic by itself, a record of the ops that
repair it goes to the journal file, and only then is it marked active.
Marking is a write of less than a page at offset 0, which a kill cannot tear:
the kernel checks for a fatal signal between pages, not within one. The change
is then carried out and the journal marked idle. At the next mount the ops of
an active record are carried out. A record whose body was torn was never
marked active, and its file was not touched.

The repair ops are the change itself (redo), so the file ends up exactly as
planned, because every op is idempotent. A change that only writes past the
end of the file, the common case of appending, is repaired by truncating the
file back to its old size (undo) instead, which spares copying its data into
the journal.

Layout of the journal file ``securevol.journal`` in the backing root::

    offset 0     control: magic "SVJ1" | state u32 (0 idle, 1 active) | sequence u64 | body length u64
    offset 4096  body:    sequence u64 | backing inode u64 | path length u32 | op count u32 | path
                          then per repair op: kind u8 (1 write, 2 truncate) | offset or length u64 |
                                       data length u64 | data

The path is the target's backing path relative to the backing root
(ciphertext names only), checked against the inode number at replay.

A file whose own path cannot be read gets a temporary hard link in the backing
root, TARGET_LINK_NAME, for the time of the change, and the record names that
link. That happens when the name the kernel looked it up by was removed while
another hard link remains (/proc then shows the path as deleted), and for
paths longer than PATH_MAX.

A change that fails with an error part way (EIO from the disk) is repaired
at once from its record, and the record is retired whether that works or not.

Limits: the journal protects against the death of the process, not against
power loss: nothing here is fsynced until a client calls fsync(2), and then the
target file itself is synced. A file with no name left (unlinked while open)
is changed without the journal: it disappears with its last descriptor, and
the death of this process closes that. A replay that
fails with EFBIG or EINVAL (a size the backing filesystem never takes) is
logged and dropped, so that such a record cannot stop every later mount.
"""

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct

from securevol import syscalls
from securevol.contents import Op, TruncateOp, WriteOp, apply_ops, pwrite_all

log = logging.getLogger(__name__)

FILE_NAME = "securevol.journal"
TARGET_LINK_NAME = "securevol.journal-target"
PAGE_SIZE = 4096
BODY_OFFSET = PAGE_SIZE
# Room reserved for records: the largest is a 1 MiB write request (the most
# the kernel sends) that spans 33 blocks, plus a padded old last block,
# about 1.1 MB of ciphertext.
RESERVED_SIZE = BODY_OFFSET + (2 << 20)

_CONTROL = struct.Struct(">4sIQQ")
_CONTROL_MAGIC = b"SVJ1"
_IDLE, _ACTIVE = 0, 1
_BODY_HEADER = struct.Struct(">QQII")
_OP_HEADER = struct.Struct(">BQQ")
_WRITE, _TRUNCATE = 1, 2


class BackingStoreInUse(Exception):
    """Another process holds the journal lock of this backing store, so it serves the volume already."""


class Journal:
    """The journal of one backing store; *root_fd* is its backing root (an O_PATH descriptor is fine)."""

    def __init__(self, root_fd: int, volume: str) -> None:
        self._root_fd = root_fd
        self._volume = volume
        self._root_path = os.readlink(f"/proc/self/fd/{root_fd}")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(FILE_NAME, flags, 0o600, dir_fd=root_fd)
        # Two FUSE processes on one backing store would each believe they
        # alone change it, so the second one stops here.
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise BackingStoreInUse(f"backing store {self._root_path} is in use by another FUSE process") from None
        self._sequence = self._read_control()[1]
        # The error that kept a record from being retired; changes fail from then on.
        self._unusable: str | None = None
        self._reserve_space()

    def close(self) -> None:
        os.close(self._fd)

    # --- journaled changes -----------------------------------------------------------------------

    def apply(self, fd: int, ops: list[Op]) -> None:
        """Carry out *ops* on backing file *fd* so that a death of this process leaves all or none of them."""
        self.check_usable()
        if _is_atomic(ops):
            apply_ops(fd, ops)
            return

        path = self._relative_path(fd)
        st = os.fstat(fd)
        if path is None and st.st_nlink > 0:
            path = self._link_target(fd)
        if path is None:
            self._apply_unjournaled(fd, ops, st)
            return

        try:
            self._apply_journaled(fd, ops, path, st)
        finally:
            if path == TARGET_LINK_NAME and self._unusable is None:
                # A record left active needs the link at the next mount; a retired one does not.
                self._remove_target_link()

    def check_usable(self) -> None:
        """Raise EIO if a record could not be retired, so that no change can be overwritten by its redo."""
        if self._unusable is not None:
            raise OSError(errno.EIO, f"the volume's journal failed ({self._unusable}); remount the volume")

    def _apply_unjournaled(self, fd: int, ops: list[Op], st: os.stat_result) -> None:
        """Carry out *ops* on a file without a name: it disappears with its last descriptor, so no record is needed."""
        _preallocate_or_release(fd, ops, st.st_size)
        _reserve(fd, ops, st.st_size)
        try:
            apply_ops(fd, ops)
        except Exception as exc:
            self._repair(fd, _repair_ops(ops, st.st_size), "(unlinked)", exc)
            raise

    def _apply_journaled(self, fd: int, ops: list[Op], path: str, st: os.stat_result) -> None:
        repair = _repair_ops(ops, st.st_size)

        # Space first, so that a redo after a kill needs no new space on a full disk.
        _preallocate_or_release(fd, ops, st.st_size)

        self._sequence += 1
        body = _encode_body(self._sequence, st.st_ino, path, repair)
        body_len = sum(len(part) for part in body)
        _pwritev_all(self._fd, body, BODY_OFFSET)
        self._write_control(_ACTIVE, body_len)

        try:
            _reserve(fd, ops, st.st_size)
        except BaseException:
            # Nothing was written and the size is back, so there is nothing to redo.
            self._retire_record()
            raise
        try:
            apply_ops(fd, ops)
        except Exception as exc:
            self._repair(fd, repair, path, exc)
            self._retire_record()
            raise
        self._retire_record()

    def _repair(self, fd: int, repair: list[Op], path: str, error: Exception) -> None:
        """Carry out the repair ops of a change that failed part way, such as after EIO from the disk.

        The change may have left half a block. Its space was allocated before,
        so on a backing filesystem with fallocate(2) the cause is not ENOSPC.
        The caller retires the record afterwards whether this works or not. A
        record left active would be redone later, possibly over newer data
        written another way (fallocate), or into another file that reuses the inode.
        """
        try:
            apply_ops(fd, repair)
        except Exception as repair_error:
            log.error(
                "change failed and its repair failed vol=%s path=%s error=%s repair_error=%s; "
                "blocks of this file may read as damaged",
                self._volume,
                path,
                error,
                repair_error,
            )
        else:
            log.warning("change failed and was repaired vol=%s path=%s error=%s", self._volume, path, error)

    def _retire_record(self) -> None:
        """Mark the record idle; if that fails, refuse every later change until the volume is mounted again.

        A record that stays active is redone at the next mount, which is
        harmless only if nothing changed the file since.
        """
        try:
            self._write_control(_IDLE, 0)
        except OSError as exc:
            self._unusable = exc.strerror or str(exc)
            log.error(
                "journal record not retired vol=%s error=%s; changes fail until the volume is mounted again",
                self._volume,
                self._unusable,
            )
            raise

    # --- recovery --------------------------------------------------------------------------------

    def recover(self) -> bool:
        """Redo the change that was in progress when the previous process died; tell whether there was one."""
        redone = self._recover_record()
        # Left over by the previous process, and only its record could need it.
        # A redo that failed (ENOSPC) keeps record and link for the next mount.
        self._remove_target_link()
        return redone

    def _recover_record(self) -> bool:
        state, sequence, body_len = self._read_control()
        if state != _ACTIVE:
            return False

        body = os.pread(self._fd, body_len, BODY_OFFSET)
        try:
            body_sequence, ino, path, ops = _decode_body(body)
        except (ValueError, struct.error) as exc:
            log.error("journal record unreadable vol=%s error=%s", self._volume, exc)
            self._finish_recovery()
            return False
        if body_sequence != sequence:
            log.error("journal record out of date vol=%s want=%d have=%d", self._volume, sequence, body_sequence)
            self._finish_recovery()
            return False

        self._redo(path, ino, ops)
        self._finish_recovery()
        return True

    def _redo(self, path: str, ino: int, ops: list[Op]) -> None:
        try:
            st = os.stat(path, dir_fd=self._root_fd, follow_symlinks=False)
        except OSError as exc:
            log.warning("journal target gone vol=%s path=%s error=%s", self._volume, path, exc.strerror)
            return
        # Checked before the open: a device node that took the name and inode
        # must not be opened by this process, which runs as root on the host.
        # Nothing else changes the backing store before the mount serves requests.
        if st.st_ino != ino or not stat.S_ISREG(st.st_mode):
            log.warning("journal target replaced vol=%s path=%s", self._volume, path)
            return
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._root_fd)
        try:
            try:
                apply_ops(fd, ops)
            except (OSError, OverflowError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.EFBIG, errno.EINVAL):
                    raise  # such as ENOSPC: the next mount may succeed
                # A size or offset the backing filesystem never takes (an
                # OverflowError is one beyond off_t). The change failed the same
                # way when it was made, and failing every mount would not help.
                log.error("journal replay failed vol=%s path=%s error=%s", self._volume, path, exc)
                return
            os.fsync(fd)
            log.warning("journal replayed vol=%s path=%s ops=%d", self._volume, path, len(ops))
        finally:
            os.close(fd)

    def _finish_recovery(self) -> None:
        self._write_control(_IDLE, 0)
        os.fsync(self._fd)

    # --- helpers ---------------------------------------------------------------------------------

    def _reserve_space(self) -> None:
        """Allocate room for the largest record now, so that a full disk does not fail in-place overwrites.

        A record is written before its change, so without this an overwrite
        of existing blocks, which needs no new space on the backing
        filesystem, failed with ENOSPC on a full disk until the journal file
        had grown once.
        """
        try:
            os.posix_fallocate(self._fd, 0, RESERVED_SIZE)
        except OSError as exc:
            log.warning(
                "journal space not reserved vol=%s error=%s; overwrites may fail with ENOSPC on a full disk",
                self._volume,
                exc.strerror,
            )

    def _read_control(self) -> tuple[int, int, int]:
        data = os.pread(self._fd, _CONTROL.size, 0)
        if len(data) < _CONTROL.size or data == bytes(_CONTROL.size):
            return _IDLE, 0, 0  # a new journal file, empty or only reserved
        magic, state, sequence, body_len = _CONTROL.unpack(data)
        if magic != _CONTROL_MAGIC:
            log.error("journal control block invalid vol=%s magic=%s", self._volume, magic.hex())
            return _IDLE, 0, 0
        return state, sequence, body_len

    def _write_control(self, state: int, body_len: int) -> None:
        # Less than a page at offset 0: a kill cannot tear this write.
        os.pwrite(self._fd, _CONTROL.pack(_CONTROL_MAGIC, state, self._sequence, body_len), 0)

    def _link_target(self, fd: int) -> str:
        """Link the file behind *fd* as TARGET_LINK_NAME in the backing root, so that a record can name it."""
        self._remove_target_link()  # left over if the process died after its change was done
        os.link(f"/proc/self/fd/{fd}", TARGET_LINK_NAME, dst_dir_fd=self._root_fd, follow_symlinks=True)
        return TARGET_LINK_NAME

    def _remove_target_link(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(TARGET_LINK_NAME, dir_fd=self._root_fd)

    def _relative_path(self, fd: int) -> str | None:
        """Return the backing path of *fd* relative to the backing root, or None if it has none."""
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            return None
        prefix = self._root_path.rstrip("/") + "/"
        if not target.startswith(prefix) or target.endswith(" (deleted)"):
            return None
        return target[len(prefix) :]


def _is_atomic(ops: list[Op]) -> bool:
    """Tell whether *ops* is one system call that a kill cannot tear: a truncate, or a write within one page."""
    if len(ops) != 1:
        return False
    op = ops[0]
    if isinstance(op, TruncateOp):
        return True
    return op.offset // PAGE_SIZE == (op.offset + len(op.data) - 1) // PAGE_SIZE


def _reserve(fd: int, ops: list[Op], size: int) -> None:
    """Allocate space for the writes past the end (*size*), so that a full disk fails before any byte lands.

    Without this, ENOSPC part way through could leave a last block of
    impossible length. Filesystems without fallocate(2) skip the check.
    If one allocation fails (ENOSPC, or EFBIG past the backing filesystem's
    largest file), the file is cut back to *size*: posix_fallocate(3) extends
    the file with zeros, which would read as a damaged header or block.
    """
    try:
        _allocate(fd, ops, size)
    except BaseException:
        os.ftruncate(fd, size)
        raise


def _allocate(fd: int, ops: list[Op], size: int) -> None:
    for op in ops:
        if isinstance(op, TruncateOp):
            if op.length > size:
                # Growing now, before any write, fails a size beyond the
                # backing filesystem's largest file (EFBIG) while nothing has changed.
                os.ftruncate(fd, op.length)
            size = op.length
            continue
        start = max(op.offset, size)
        end = op.offset + len(op.data)
        if end <= start:
            continue
        try:
            os.posix_fallocate(fd, start, end - start)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        size = end


def _repair_ops(ops: list[Op], size: int) -> list[Op]:
    """Return the ops that repair *ops* on a file of *size* bytes: cutting an append back, else the ops again."""
    if all(isinstance(op, WriteOp) and op.offset >= size for op in ops):
        return [TruncateOp(size)]
    return ops


def _preallocate_or_release(fd: int, ops: list[Op], size: int) -> None:
    """Preallocate the space of *ops*; if that fails, give back what it allocated past the end (*size*)."""
    try:
        _preallocate(fd, ops)
    except BaseException:
        if any(isinstance(op, WriteOp) and op.offset + len(op.data) > size for op in ops):
            # A truncation to the same size frees the blocks allocated past the end.
            os.ftruncate(fd, size)
        raise


def _preallocate(fd: int, ops: list[Op]) -> None:
    """Allocate the backing space of every write of *ops* without changing the file's size.

    Writes inside the file count too: a hole there (a punched or skipped
    block) takes new space. A full disk then fails the change before any
    byte lands, and a redo after a kill needs no new space. Filesystems
    without fallocate(2) skip this.
    """
    for op in ops:
        if not isinstance(op, WriteOp) or not op.data:
            continue
        try:
            syscalls.fallocate(fd, syscalls.FALLOC_FL_KEEP_SIZE, op.offset, len(op.data))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def _encode_body(sequence: int, ino: int, path: str, ops: list[Op]) -> list[bytes | bytearray]:
    """Return the journal body for *ops* as a list of buffers, so that written data is not copied."""
    path_bytes = os.fsencode(path)
    parts: list[bytes | bytearray] = [_BODY_HEADER.pack(sequence, ino, len(path_bytes), len(ops)), path_bytes]
    for op in ops:
        if isinstance(op, WriteOp):
            parts.append(_OP_HEADER.pack(_WRITE, op.offset, len(op.data)))
            parts.append(op.data)
        else:
            parts.append(_OP_HEADER.pack(_TRUNCATE, op.length, 0))
    return parts


def _pwritev_all(fd: int, parts: list[bytes | bytearray], offset: int) -> None:
    written = os.pwritev(fd, parts, offset)
    total = sum(len(part) for part in parts)
    if written < total:
        # A short write of a regular file is rare (a signal, a full disk); finish it the plain way.
        pwrite_all(fd, b"".join(parts)[written:], offset + written)


def _decode_body(body: bytes) -> tuple[int, int, str, list[Op]]:
    sequence, ino, path_len, op_count = _BODY_HEADER.unpack_from(body)
    position = _BODY_HEADER.size
    path = os.fsdecode(body[position : position + path_len])
    position += path_len

    ops: list[Op] = []
    for _ in range(op_count):
        kind, value, data_len = _OP_HEADER.unpack_from(body, position)
        position += _OP_HEADER.size
        if kind == _WRITE:
            data = body[position : position + data_len]
            if len(data) != data_len:
                raise ValueError("journal record ends inside a write")
            ops.append(WriteOp(value, data))
            position += data_len
        elif kind == _TRUNCATE:
            ops.append(TruncateOp(value))
        else:
            raise ValueError(f"journal record has an unknown op kind {kind}")
    return sequence, ino, path, ops
