"""The pyfuse3 Operations of a securevol volume: POSIX semantics over the encrypted backing store.

Names go through securevol.names, file contents through securevol.contents
(the format of securevol.format). Each inode the kernel has looked up is an
O_PATH descriptor in an InodeTable (securevol.inodes), and every operation works
relative to descriptors, never with paths built from names.

Concurrency: no handler awaits anything, so trio runs each request to
completion before the next starts. Reads never see a half-written block or a
stale size, and a read-modify-write of a block cannot interleave with another.

The backing store is changed by this process only, so the kernel may cache
entries, attributes and pages for a long time (writeback cache, long timeouts,
cached negative lookups), and every reply carries fresh attributes.

Caveats:
- pyfuse3 3.5 has no fallocate, lseek or lock handlers. fallocate is
  registered with libfuse by securevol.fuse_fallocate. SEEK_DATA/SEEK_HOLE
  treat the whole file as data: the kernel does not write dirty pages back
  before it sends an LSEEK request, so with the writeback cache an offset
  computed from the backing file could skip data not yet written. POSIX and flock locks are
  kept by the kernel, so they work between processes using this mount.
- pyfuse3 does not request FUSE_DONT_MASK. init() requests it through
  libfuse's session (securevol.fuse_session), and new entries get the
  caller's umask unless their directory has a default ACL, as on ext4.
  Without the session, the kernel applies the umask to every new entry.
"""

import contextlib
import errno
import functools
import itertools
import logging
import os
import resource
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from securevol import format as fmt
from securevol import names, syscalls, xattrs
from securevol.backing_io import BackingIoWorker
from securevol.contents import EncryptedContents
from securevol.crypto import VolumeKeys
from securevol.errors import IntegrityError, InvalidName
from securevol.fuse_session import CAP_DONT_MASK, LibfuseSession
from securevol.inodes import Inode, InodeTable
from securevol.journal import Journal
from securevol.xattrs import ExtendedAttributes, XattrError

log = logging.getLogger(__name__)

# Only this process changes the backing store, so cached entries and
# attributes can only go stale if someone edits the backing store directly.
CACHE_TIMEOUT = 3600.0

# Open flags passed on to the backing file, because they change how data
# reaches the disk. The kernel's writeback cache resolves O_APPEND itself, and
# O_DIRECT would need aligned backing I/O, which 32800-byte blocks never are.
_BACKING_OPEN_FLAGS = os.O_SYNC | os.O_DSYNC

_CAPABILITY = b"security.capability"

# Ciphertext that sequential reads ask the backing filesystem to fetch ahead of them.
_READ_AHEAD_BYTES = 8 << 20
# "." and "..", the first two entries of every listing.
_DOT_ENTRIES = 2

# Ciphertext of sequential writes that is handed to the disk at a time, and the
# ciphertext behind the latest write that is left alone (OpenFile.write_behind_ranges).
_WRITE_BEHIND_BYTES = 8 << 20
_WRITE_BEHIND_MARGIN = 1 << 20
# How far behind the range handed to the disk the ciphertext is dropped from the cache.
_DROP_BEHIND_BYTES = 24 << 20

# Directory IVs left unsynced by mkdir before one mkdir fsyncs them all. It bounds their open
# descriptors, and so does a sixteenth of the open-file limit where that is less.
_MAX_UNSYNCED_IVS = 1024

# Seconds between two warnings that the FUSE process ran out of file descriptors.
_DESCRIPTOR_WARNING_INTERVAL = 60.0


def _handler(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors of a request handler into FUSEError, the only exception pyfuse3 accepts.

    Integrity failures are logged where the backing file is known; here they
    become EIO like any unexpected error, which is logged with its traceback.
    """

    @functools.wraps(method)
    async def wrapper(self: "SecurevolOperations", *args: Any) -> Any:
        try:
            return method(self, *args)
        except FUSEError:
            raise
        except (InvalidName, XattrError) as exc:
            raise FUSEError(exc.errno) from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._warn_descriptor_limit(method.__name__, exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except IntegrityError as exc:
            log.error("integrity check failed vol=%s op=%s error=%s", self.volume, method.__name__, exc)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("request failed vol=%s op=%s", self.volume, method.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


class OpenFile:
    """An open regular file: its inode, a read-write descriptor of its backing file, and its read-ahead and write-behind state."""

    __slots__ = ("inode", "fd", "next_offset", "advised_until", "written_back_from", "dropped_from")

    def __init__(self, inode: Inode, fd: int) -> None:
        self.inode = inode
        self.fd = fd
        self.next_offset = 0  # plaintext offset where the previous read or write ended
        self.advised_until = 0  # backing offset up to which read-ahead was requested
        # Backing offsets from which write-behind and drop-behind have not been
        # requested yet. They start after the file header, so that its page,
        # which every write reads, stays in the cache.
        self.written_back_from = self.dropped_from = fmt.block_offset(0)

    def advance(self, offset: int, size: int) -> int:
        """Record an access to [offset, offset + size); return its distance from the end of the previous one."""
        gap = offset - self.next_offset
        self.next_offset = offset + size
        return gap

    def read_ahead_range(self, end: int) -> tuple[int, int] | None:
        """Return the backing range (offset, length) to fetch ahead of a forward access that ended at *end*.

        The backing file's own read-ahead is smaller than one FUSE read, so
        without this every read waits for the disk and nothing overlaps
        decryption. A block write that does not cover whole backing pages must
        read them first, so writes request it too. A read moves forward when it starts
        where the previous one ended; a write may start up to
        _READ_AHEAD_BYTES later, because the kernel writes dirty pages back in
        file order but skips the clean ones.
        """
        start = fmt.block_offset(end // fmt.BLOCK_SIZE)
        if start + _READ_AHEAD_BYTES // 2 <= self.advised_until:
            return None
        begin = max(start, self.advised_until)
        self.advised_until = start + _READ_AHEAD_BYTES
        return begin, self.advised_until - begin

    def write_behind_ranges(self, offset: int, end: int, gap: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """Return the backing ranges (offset, length) to write back and to drop after a write to [offset, end).

        Only a run of contiguous writes (*gap* 0) makes a request, once every
        _WRITE_BEHIND_BYTES, and never for the last _WRITE_BEHIND_MARGIN
        before the write: the next writes still change those pages, and a page
        under writeback would be written twice. Any other write starts a new
        run, so that pages that scattered writes may change again stay in the
        cache until the kernel or an fsync(2) writes them.

        The range to drop from the cache ends _DROP_BEHIND_BYTES before the
        range to write back, so that its writeback has most likely finished:
        the kernel keeps pages that are dirty or under writeback.
        """
        if gap != 0:
            self.written_back_from = self.dropped_from = fmt.block_offset(offset // fmt.BLOCK_SIZE)
            return None
        until = fmt.block_offset(end // fmt.BLOCK_SIZE) - _WRITE_BEHIND_MARGIN
        if until - self.written_back_from < _WRITE_BEHIND_BYTES:
            return None

        write_back = (self.written_back_from, until - self.written_back_from)
        self.written_back_from = until
        drop_until = max(self.dropped_from, write_back[0] - _DROP_BEHIND_BYTES)
        drop = (self.dropped_from, drop_until - self.dropped_from)
        self.dropped_from = drop_until
        return write_back, drop


class OpenDir:
    """An open directory and the listing taken when reading it started."""

    __slots__ = ("inode", "entries")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.entries: list[names.DirEntry] | None = None


class SecurevolOperations(pyfuse3.Operations):
    """Serves one volume: *backing_root* contains its ciphertext, *keys* are its sub-keys."""

    enable_writeback_cache = True
    supports_dot_lookup = True
    # The kernel enforces POSIX ACLs stored as extended attributes.
    enable_acl = True

    def __init__(self, volume: str, backing_root: str, keys: VolumeKeys, inode_descriptors: int | None = None) -> None:
        """*inode_descriptors* bounds the descriptors of known inodes (securevol.inodes); None: half the open-file limit."""
        super().__init__()
        self.volume = volume
        self._backing_root = os.path.realpath(backing_root)
        root_fd = os.open(self._backing_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._inodes = InodeTable(root_fd, inode_descriptors)
        self._names = names.NameCipher(keys.name_key, volume)
        # Finish a change cut short by the death of the previous process before serving anything.
        self._journal = Journal(root_fd, volume)
        self._journal.recover()
        self._contents = EncryptedContents(fmt.ContentCipher(keys.content_key), self._journal.apply)
        self._xattrs = ExtendedAttributes(keys.xattr_key, volume)
        self._files: dict[int, OpenFile] = {}
        self._backing_io = BackingIoWorker()
        self._dirs: dict[int, OpenDir] = {}
        self._next_fh = itertools.count(1)
        # (inode, block) pairs logged as damaged; repeats log at DEBUG until the file changes.
        self._reported_damage: dict[int, set[object]] = {}
        # Inodes whose last write failed; repeats log at DEBUG until a write succeeds.
        self._failed_writes: set[int] = set()
        # Read-only descriptors of directory IV files written by mkdir but not yet fsynced.
        self._unsynced_ivs: list[int] = []
        self._last_descriptor_warning: float | None = None
        self._euid = os.geteuid()
        self._egid = os.getegid()
        umask = os.umask(0)
        os.umask(umask)
        self._umask_is_zero = umask == 0
        # Set by mount.py when it found libfuse's session, before the kernel's INIT request.
        self.libfuse_session: LibfuseSession | None = None
        # Whether the kernel leaves the caller's umask to this filesystem (FUSE_DONT_MASK).
        self._umask_in_requests = False

    def init(self) -> None:
        """Ask the kernel for FUSE_DONT_MASK, so that a default ACL can take the umask's place as on ext4.

        pyfuse3 calls this while libfuse handles the kernel's INIT request and
        ignores what it raises, so every error is logged here.
        """
        if self.libfuse_session is None:
            return
        try:
            self._umask_in_requests = self.libfuse_session.request_capability(CAP_DONT_MASK)
        except Exception:
            log.exception("requesting FUSE_DONT_MASK failed vol=%s; the kernel applies the umask", self.volume)
            return
        if not self._umask_in_requests:
            log.warning("the kernel does not offer FUSE_DONT_MASK vol=%s; it applies the umask", self.volume)

    def close(self) -> None:
        """Close every descriptor; call once the filesystem is unmounted."""
        for handle in self._files.values():
            os.close(handle.fd)
        self._files.clear()
        for fd in self._unsynced_ivs:
            os.close(fd)
        self._unsynced_ivs.clear()
        self._dirs.clear()
        self._backing_io.stop()
        self._journal.close()
        self._inodes.close_all()

    # --- lookup and attributes -------------------------------------------------------------------

    @_handler
    def lookup(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_ino)
        if name == b".":
            return self._remember(os.open(".", os.O_PATH | os.O_CLOEXEC, dir_fd=parent.fd))
        if name == b"..":
            if parent is self._inodes.root:
                return self._remember(os.open(".", os.O_PATH | os.O_CLOEXEC, dir_fd=parent.fd))
            return self._remember(os.open("..", os.O_PATH | os.O_CLOEXEC, dir_fd=parent.fd))

        backing = self._backing_name(parent, name)
        try:
            fd = os.open(backing.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except FileNotFoundError:
            return self._negative_entry()
        return self._remember(fd, parent, backing.name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self._inodes.forget(ino, count)
            except OSError:
                log.exception("forget failed vol=%s ino=%d", self.volume, ino)

    @_handler
    def getattr(self, ino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self._inode(ino)
        return self._attributes_of(inode, os.fstat(inode.fd))

    @_handler
    def setattr(
        self,
        ino: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._journal.check_usable()
        inode = self._inode(ino)
        atime = attr.st_atime_ns if fields.update_atime else None
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        only_times = not (fields.update_size or fields.update_uid or fields.update_gid or fields.update_mode)
        if only_times:
            st = os.fstat(inode.fd)
            if st.st_nlink == 0:
                # With the writeback cache the kernel sends the times of an
                # unlinked file as it evicts the inode, after the last user.
                # Kept in memory, they cost no journaled change of an inode
                # that is about to be freed, and getattr still reports them.
                self._keep_unlinked_times(inode, atime, mtime)
                return self._attributes_of(inode, st)

        self._store_unlinked_times(inode)
        if fields.update_size:
            self._truncate(inode, fh, attr.st_size)
        # Owner before mode: chown(2) clears the set-user-ID bit, and a mode
        # sent in the same request must win.
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            syscalls.fchown_path_fd(inode.fd, uid, gid)
        if fields.update_mode:
            self._chmod(inode, attr.st_mode)
            self._chmod_access_acl(inode, attr.st_mode)
        if fields.update_atime or fields.update_mtime:
            syscalls.set_times_path_fd(inode.fd, atime, mtime)

        return self._attributes_of(inode, os.fstat(inode.fd))

    @_handler
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        backing = os.fstatvfs(self._inodes.root.fd)
        data = pyfuse3.StatvfsData()
        data.f_bsize = backing.f_bsize
        data.f_frsize = backing.f_frsize
        data.f_blocks = backing.f_blocks
        data.f_bfree = backing.f_bfree
        data.f_bavail = backing.f_bavail
        data.f_files = backing.f_files
        data.f_ffree = backing.f_ffree
        data.f_favail = backing.f_favail
        data.f_namemax = names.MAX_NAME_BYTES
        return data

    # --- directory entries -----------------------------------------------------------------------

    @_handler
    def mkdir(
        self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._journal.check_usable()
        parent = self._inode(parent_ino)
        backing = self._backing_name(parent, name)
        uid, gid, inherit_gid = self._new_owner(parent, ctx)
        mode = self._mode_of_new_entry(parent, mode, ctx)

        temp_name = names.new_temp_name()
        with self._side_record(parent, backing):
            names.make_dir(parent.fd, temp_name, 0o700, fsync=False)
            setgid = stat.S_ISGID if inherit_gid else 0
            attributes = self._set_up_entry(parent, temp_name, backing.name, uid, gid, stat.S_IFDIR | mode | setgid)
        self._defer_iv_fsync(parent, backing.name)
        return attributes

    @_handler
    def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._journal.check_usable()
        parent = self._inode(parent_ino)
        backing = self._backing_name(parent, name)
        uid, gid, _ = self._new_owner(parent, ctx)
        mode = self._mode_of_new_entry(parent, mode, ctx)

        temp_name = names.new_temp_name()
        with self._side_record(parent, backing):
            if stat.S_ISREG(mode):
                # A regular file from mknod(2) is an empty file, and must not carry the
                # sticky bit that marks the backing file of a long symlink.
                os.close(os.open(temp_name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, dir_fd=parent.fd))
                mode &= ~stat.S_ISVTX
            else:
                os.mknod(temp_name, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=parent.fd)
            return self._set_up_entry(parent, temp_name, backing.name, uid, gid, mode)

    @_handler
    def symlink(
        self, parent_ino: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._journal.check_usable()
        parent = self._inode(parent_ino)
        backing = self._backing_name(parent, name)
        uid, gid, _ = self._new_owner(parent, ctx)

        temp_name = names.new_temp_name()
        with self._side_record(parent, backing):
            self._names.write_symlink(parent.fd, temp_name, target)
            return self._set_up_entry(parent, temp_name, backing.name, uid, gid, None)

    @_handler
    def readlink(self, ino: int, ctx: pyfuse3.RequestContext) -> bytes:
        inode = self._inode(ino)
        try:
            return self._names.read_symlink_fd(inode.fd)
        except IntegrityError as exc:
            self._report_damage(inode, exc)
            raise FUSEError(errno.EIO) from None

    @_handler
    def link(
        self, ino: int, new_parent_ino: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._journal.check_usable()
        inode = self._inode(ino)
        parent = self._inode(new_parent_ino)
        backing = self._backing_name(parent, new_name)

        with self._side_record(parent, backing):
            # linkat(2) through the /proc magic link links the inode itself, even an unlinked-but-open one.
            os.link(inode.proc_path, backing.name, dst_dir_fd=parent.fd, follow_symlinks=True)
        self._inodes.name_added(inode, parent, backing.name)
        inode.lookups += 1
        self._store_unlinked_times(inode)
        return self._attributes_of(inode, os.fstat(inode.fd))

    @_handler
    def unlink(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._journal.check_usable()
        parent = self._inode(parent_ino)
        backing = self._backing_name(parent, name)
        self._inodes.name_removed(parent, backing.name)
        os.unlink(backing.name, dir_fd=parent.fd)
        self._remove_side_record_after(parent, backing.name)

    @_handler
    def rmdir(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._journal.check_usable()
        parent = self._inode(parent_ino)
        backing = self._backing_name(parent, name)
        names.remove_dir(parent.fd, backing.name)
        self._remove_side_record_after(parent, backing.name)

    @_handler
    def rename(
        self,
        old_parent_ino: int,
        old_name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._journal.check_usable()
        old_parent = self._inode(old_parent_ino)
        new_parent = self._inode(new_parent_ino)
        old = self._backing_name(old_parent, old_name)
        new = self._backing_name(new_parent, new_name)
        if old_parent is new_parent and old.name == new.name:
            return

        if flags & pyfuse3.RENAME_EXCHANGE:
            syscalls.rename_at(old_parent.fd, old.name, new_parent.fd, new.name, syscalls.RENAME_EXCHANGE)
            self._inodes.names_exchanged(old_parent, old.name, new_parent, new.name)
            return

        with self._side_record(new_parent, new):
            if flags & pyfuse3.RENAME_NOREPLACE:
                syscalls.rename_at(old_parent.fd, old.name, new_parent.fd, new.name, syscalls.RENAME_NOREPLACE)
            else:
                self._rename_replacing(old_parent, old, new_parent, new)
        self._inodes.name_moved(old_parent, old.name, new_parent, new.name)
        # The kernel handles a rename onto another hard link of the same inode
        # itself, so here *old* is always gone and so is its side record.
        self._remove_side_record_after(old_parent, old.name)

    # --- directories -----------------------------------------------------------------------------

    @_handler
    def opendir(self, ino: int, ctx: pyfuse3.RequestContext) -> int:
        inode = self._inode(ino)
        fh = next(self._next_fh)
        self._dirs[fh] = OpenDir(inode)
        self._inodes.opened(inode)
        return fh

    @_handler
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        directory = handle.inode
        if start_id == 0 or handle.entries is None:
            temporary: list[str] = []
            damaged: list[tuple[str, IntegrityError]] = []
            handle.entries = self._names.list_dir(directory.fd, self._dir_iv(directory), temporary, damaged)
            if temporary:
                self._remove_temporary_entries(directory, temporary)
            for backing_name, exc in damaged:
                self._report_damaged_name(directory, backing_name, exc)

        for index in range(start_id, _DOT_ENTRIES + len(handle.entries)):
            if index < _DOT_ENTRIES:
                if not self._reply_dot_entry(token, directory, index):
                    return
                continue

            entry = handle.entries[index - _DOT_ENTRIES]
            try:
                fd = os.open(entry.backing_name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
            except FileNotFoundError:
                continue  # removed since the listing was taken

            st = os.fstat(fd)
            attributes = self._attributes(self._inodes.fuse_ino(st.st_ino), st)
            if not pyfuse3.readdir_reply(token, entry.plain_name, attributes, index + 1):
                os.close(fd)
                return
            self._inodes.remember(fd, st, directory, entry.backing_name)

    def _reply_dot_entry(self, token: pyfuse3.ReaddirToken, directory: Inode, index: int) -> bool:
        """Add "." (index 0) or ".." (index 1) to a listing, as ext4 lists them; False if the reply is full.

        The kernel never links these two names from a READDIRPLUS reply (fs/fuse/readdir.c,
        fuse_direntplus_link), so they count no lookup and are never forgotten. Their inode
        numbers must not be 0, because glibc's readdir skips such entries.
        """
        if index == 0:
            name, st, ino = b".", os.fstat(directory.fd), directory.ino
        else:
            name = b".."
            if directory.ino == pyfuse3.ROOT_INODE:
                st, ino = os.fstat(directory.fd), directory.ino
            else:
                st = os.stat("..", dir_fd=directory.fd, follow_symlinks=False)
                ino = self._inodes.fuse_ino(st.st_ino)
        return pyfuse3.readdir_reply(token, name, self._attributes(ino, st), index + 1)

    @_handler
    def releasedir(self, fh: int) -> None:
        handle = self._dirs.pop(fh)
        self._inodes.closed(handle.inode)

    @_handler
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._dirs[fh]
        self._fsync_dir_ivs()
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=handle.inode.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- regular files ---------------------------------------------------------------------------

    @_handler
    def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._journal.check_usable()
        parent = self._inode(parent_ino)
        backing = self._backing_name(parent, name)
        uid, gid, inherit_gid = self._new_owner(parent, ctx)
        mode = self._mode_of_new_entry(parent, mode, ctx)

        with self._side_record(parent, backing):
            fd, path_fd = self._create_backing_file(parent, backing, mode, flags, uid, gid, inherit_gid)

        attributes = self._remember(path_fd, parent, backing.name)
        inode = self._inodes.get(attributes.st_ino)
        inode.absent_xattrs.add(_CAPABILITY)  # a new file has no file capabilities yet
        return self._open_handle(inode, fd), attributes

    def _create_backing_file(
        self,
        parent: Inode,
        backing: names.BackingName,
        mode: int,
        flags: int,
        uid: int,
        gid: int,
        inherit_gid: bool,
    ) -> tuple[int, int]:
        """Create the backing file of a new regular file; return a read-write and an O_PATH descriptor of it."""
        open_flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (flags & _BACKING_OPEN_FLAGS)
        # When open(2) alone gives the file its owner and mode, two journaled
        # changes of the backing inode per created file are spared. Otherwise
        # the file is set up under a temporary name and renamed into place, so
        # that a kill never leaves a visible file with root's owner and mode 0600.
        as_requested = self._creates_as_requested(parent, uid, gid, inherit_gid)
        initial_mode = stat.S_IMODE(mode) & ~stat.S_ISVTX if as_requested else 0o600
        name = backing.name if as_requested else names.new_temp_name()
        fd = os.open(name, open_flags, initial_mode, dir_fd=parent.fd)
        try:
            if not as_requested:
                os.fchown(fd, uid, gid)
                mode = self._inherit_default_acl(parent, f"/proc/self/fd/{fd}", stat.S_IFREG | mode)
                os.fchmod(fd, stat.S_IMODE(mode) & ~stat.S_ISVTX)
                _rename_new_entry(parent.fd, name, backing.name)
                name = backing.name
            # Only this process changes the backing directory, so the name still leads to the new file.
            path_fd = os.open(backing.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except BaseException:
            os.close(fd)
            self._discard_new_entry(parent, name)
            raise
        return fd, path_fd

    @_handler
    def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        inode = self._inode(ino)
        # Always read-write: the writeback cache reads pages of write-only files,
        # and every partial block write is a read-modify-write.
        fd = os.open(inode.proc_path, os.O_RDWR | os.O_CLOEXEC | (flags & _BACKING_OPEN_FLAGS))
        if flags & os.O_TRUNC:
            # libfuse turns on FUSE_ATOMIC_O_TRUNC, so the kernel sends no
            # setattr for O_TRUNC: it drops its cached pages and size and
            # leaves the truncation to this open.
            try:
                self._contents.truncate(fd, 0)
            except BaseException:
                os.close(fd)
                raise
            self._reported_damage.pop(inode.ino, None)
        return self._open_handle(inode, fd)

    @_handler
    def read(self, fh: int, offset: int, size: int) -> memoryview:
        handle = self._files[fh]
        if handle.advance(offset, size) == 0:
            self._read_ahead(handle, offset + size)
        try:
            return self._contents.read(handle.fd, offset, size)
        except IntegrityError as exc:
            self._report_damage(handle.inode, exc, handle.fd)
            raise FUSEError(errno.EIO) from None

    @_handler
    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._files[fh]
        self._reported_damage.pop(handle.inode.ino, None)
        end = offset + len(data)
        gap = handle.advance(offset, len(data))
        if 0 <= gap <= _READ_AHEAD_BYTES:
            self._read_ahead(handle, end)

        try:
            self._contents.write(handle.fd, offset, data)
        except IntegrityError as exc:
            self._report_damage(handle.inode, exc, handle.fd)
            raise FUSEError(errno.EIO) from None
        except OSError as exc:
            self._report_failed_write(handle, offset, len(data), exc)
            raise
        if self._failed_writes:
            self._failed_writes.discard(handle.inode.ino)

        backing_ranges = handle.write_behind_ranges(offset, end, gap)
        if backing_ranges is not None:
            self._backing_io.write_behind(handle.fd, *backing_ranges)
        return len(data)

    @_handler
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """Serve fallocate(2), which pyfuse3 does not pass on: securevol.fuse_fallocate calls this."""
        handle = self._files[fh]
        self._journal.check_usable()
        keep_size = bool(mode & syscalls.FALLOC_FL_KEEP_SIZE)
        operation = mode & ~syscalls.FALLOC_FL_KEEP_SIZE
        self._reported_damage.pop(handle.inode.ino, None)
        try:
            if operation == 0:
                self._contents.allocate(handle.fd, offset, length, keep_size)
            elif operation == syscalls.FALLOC_FL_PUNCH_HOLE and keep_size:
                self._contents.punch_hole(handle.fd, offset, length)
            elif operation == syscalls.FALLOC_FL_ZERO_RANGE:
                self._contents.zero_range(handle.fd, offset, length, keep_size)
            else:
                raise FUSEError(errno.EOPNOTSUPP)
        except IntegrityError as exc:
            self._report_damage(handle.inode, exc, handle.fd)
            raise FUSEError(errno.EIO) from None

    async def flush(self, fh: int) -> None:
        """Tell the kernel that this filesystem needs no FLUSH requests.

        Writes reach the backing file before write() returns, so close(2) has
        nothing left to do here. The kernel still writes dirty pages back before
        close(2) returns; after ENOSYS it only stops sending FLUSH itself, which
        spares one request per close.
        """
        raise FUSEError(errno.ENOSYS)

    @_handler
    def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._files[fh]
        self._fsync_dir_ivs()
        if datasync:
            os.fdatasync(handle.fd)
        else:
            os.fsync(handle.fd)

    @_handler
    def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        os.close(handle.fd)
        self._inodes.closed(handle.inode)

    # --- extended attributes ---------------------------------------------------------------------

    @_handler
    def getxattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        inode = self._inode(ino)
        # With the writeback cache the kernel requests security.capability
        # before writes to a file, so misses are remembered.
        if name in inode.absent_xattrs:
            raise FUSEError(errno.ENODATA)
        try:
            return self._xattrs.get(inode.proc_path, name)
        except XattrError as exc:
            if exc.errno == errno.ENODATA:
                inode.absent_xattrs.add(name)
            raise
        except IntegrityError as exc:
            self._report_damage(inode, exc)
            raise FUSEError(errno.EIO) from None

    @_handler
    def setxattr(self, ino: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._journal.check_usable()
        inode = self._inode(ino)
        inode.absent_xattrs.clear()
        if name == xattrs.ACL_ACCESS:
            self._set_access_acl(inode, value)
        else:
            self._xattrs.set(inode.proc_path, name, value)

    @_handler
    def listxattr(self, ino: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        inode = self._inode(ino)
        damaged: list[tuple[str, IntegrityError]] = []
        names_found = self._xattrs.list_names(inode.proc_path, damaged)
        for backing_name, exc in damaged:
            self._report_damaged_name(inode, backing_name, exc, attribute=True)
        return names_found

    @_handler
    def removexattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._journal.check_usable()
        inode = self._inode(ino)
        inode.absent_xattrs.clear()
        self._xattrs.remove(inode.proc_path, name)

    # --- helpers ---------------------------------------------------------------------------------

    def _warn_descriptor_limit(self, operation: str, exc: OSError) -> None:
        """Log, at most once per _DESCRIPTOR_WARNING_INTERVAL, that a request failed for lack of descriptors.

        Each inode the kernel has looked up keeps a descriptor open here, so a
        volume with many files in use reaches RLIMIT_NOFILE, and the client
        sees EMFILE on its own call without knowing why.
        """
        now = time.monotonic()
        last = self._last_descriptor_warning
        if last is not None and now - last < _DESCRIPTOR_WARNING_INTERVAL:
            return
        self._last_descriptor_warning = now

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.warning(
            "file descriptors exhausted vol=%s op=%s error=%s known_inodes=%d open_files=%d limit=%d",
            self.volume, operation, exc.strerror, len(self._inodes), len(self._files), soft,
        )

    def _read_ahead(self, handle: OpenFile, end: int) -> None:
        backing_range = handle.read_ahead_range(end)
        if backing_range is None:
            return

        # Ciphertext past the end of the backing file is not on disk yet (a new
        # file, an append): asking for it would only wake the thread, which
        # then competes for the GIL with the request that woke it.
        start, length = backing_range
        on_disk = os.fstat(handle.fd).st_size - start
        if on_disk > 0:
            self._backing_io.read_ahead(handle.fd, start, min(length, on_disk))

    def _inode(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is None:
            log.warning("request for unknown inode vol=%s ino=%d", self.volume, ino)
            raise FUSEError(errno.ESTALE)
        return inode

    def _remember(self, fd: int, parent: Inode | None = None, backing_name: str | None = None) -> pyfuse3.EntryAttributes:
        """Count a lookup of the inode behind O_PATH descriptor *fd* (owned from now on), return its attributes.

        *parent* and *backing_name* lead to the inode again if its descriptor
        is closed early (securevol.inodes).
        """
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self._inodes.remember(fd, st, parent, backing_name)
        return self._attributes(inode.ino, st)

    def _attributes(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Return the plaintext view of backing attributes *st*: plaintext sizes, symlinks as symlinks."""
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = ino
        attributes.generation = 0
        attributes.entry_timeout = CACHE_TIMEOUT
        attributes.attr_timeout = CACHE_TIMEOUT

        mode = st.st_mode
        size = st.st_size
        if names.is_symlink(st):
            mode = stat.S_IFLNK | 0o777
            size = names.symlink_size(st)
        elif stat.S_ISREG(mode):
            size = fmt.readable_plain_size(size)

        attributes.st_mode = mode
        attributes.st_nlink = st.st_nlink
        attributes.st_uid = st.st_uid
        attributes.st_gid = st.st_gid
        attributes.st_rdev = st.st_rdev
        attributes.st_size = size
        attributes.st_blksize = fmt.BLOCK_SIZE
        attributes.st_blocks = st.st_blocks
        attributes.st_atime_ns = st.st_atime_ns
        attributes.st_mtime_ns = st.st_mtime_ns
        attributes.st_ctime_ns = st.st_ctime_ns
        return attributes

    def _attributes_of(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Return the attributes of *inode* from its backing stat *st*, with times kept in memory applied."""
        attributes = self._attributes(inode.ino, st)
        if inode.unlinked_times is not None:
            atime, mtime = inode.unlinked_times
            if atime is not None:
                attributes.st_atime_ns = atime
            if mtime is not None:
                attributes.st_mtime_ns = mtime
        return attributes

    def _keep_unlinked_times(self, inode: Inode, atime: int | None, mtime: int | None) -> None:
        old_atime, old_mtime = inode.unlinked_times or (None, None)
        inode.unlinked_times = (
            atime if atime is not None else old_atime,
            mtime if mtime is not None else old_mtime,
        )

    def _store_unlinked_times(self, inode: Inode) -> None:
        """Write times kept in memory to the backing inode, before a change that may make the file visible again."""
        if inode.unlinked_times is not None:
            syscalls.set_times_path_fd(inode.fd, *inode.unlinked_times)
            inode.unlinked_times = None

    def _negative_entry(self) -> pyfuse3.EntryAttributes:
        """Return a "no such entry" reply that the kernel may cache, as only this process adds entries."""
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = 0
        attributes.entry_timeout = CACHE_TIMEOUT
        return attributes

    def _dir_iv(self, directory: Inode) -> bytes:
        if directory.dir_iv is None:
            try:
                directory.dir_iv = names.read_dir_iv(directory.fd)
            except IntegrityError as exc:
                self._report_damage(directory, exc)
                raise FUSEError(errno.EIO) from None
        return directory.dir_iv

    def _backing_name(self, parent: Inode, name: bytes) -> names.BackingName:
        if not parent.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return self._names.backing_name_for(name, self._dir_iv(parent))

    @contextlib.contextmanager
    def _side_record(self, parent: Inode, backing: names.BackingName) -> Iterator[None]:
        """Write the side record of a long *backing* name for the entry that the block makes.

        The record comes first, so that a crash never leaves a long-named
        entry without one. If making the entry fails, a record that no entry
        uses is removed again rather than left in the backing directory.
        """
        if not backing.is_long:
            yield
            return

        names.write_side_record(parent.fd, backing)
        try:
            yield
        except BaseException:
            self._remove_unused_side_record(parent, backing.name)
            raise

    def _remove_side_record_after(self, parent: Inode, backing_name: str) -> None:
        """Remove the side record of an entry that is already gone from *parent*.

        The request has done its work by then, so a record that cannot be removed is logged
        and left, rather than failing a request whose change stays.
        """
        try:
            names.remove_side_record(parent.fd, backing_name)
        except OSError as exc:
            path = _printable(f"{self._backing_path(parent.fd)}/{backing_name}{names.SIDE_RECORD_SUFFIX}")
            log.warning("removing a side record failed vol=%s path=%s error=%s", self.volume, path, exc.strerror)

    def _remove_unused_side_record(self, parent: Inode, backing_name: str) -> None:
        try:
            os.lstat(backing_name, dir_fd=parent.fd)
            return  # an entry of that name exists, such as the target of a refused rename
        except FileNotFoundError:
            pass
        try:
            names.remove_side_record(parent.fd, backing_name)
        except OSError as exc:
            log.warning("removing an unused side record failed vol=%s error=%s", self.volume, exc.strerror)

    def _defer_iv_fsync(self, parent: Inode, backing_name: str) -> None:
        """Keep the IV file of new directory *backing_name* open, to fsync it with the next fsync request.

        mkdir does not fsync the IV itself: fsync per mkdir was the largest
        cost of unpacking archives. No client can rely on a directory or an
        entry in it surviving a power loss before it calls fsync(2) or
        fsyncdir, and those requests first fsync every pending IV, of any
        directory, so an entry made durable never sits in a directory whose
        IV was lost. docs/format.md ("Writing reserved files") has the details.
        """
        path = f"{backing_name}/{names.DIR_IV_NAME}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except OSError as exc:
            # The directory exists now, so mkdir must not fail; sync(2) takes no descriptor.
            log.warning("directory IV not kept for fsync vol=%s error=%s", self.volume, exc.strerror)
            os.sync()
            return
        self._unsynced_ivs.append(fd)
        # A small open-file limit lowers the bound, so that the IVs cannot take what files need.
        soft_limit, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if len(self._unsynced_ivs) >= min(_MAX_UNSYNCED_IVS, soft_limit // 16):
            self._fsync_dir_ivs()

    def _fsync_dir_ivs(self) -> None:
        """fsync the IV files that mkdir left unsynced; keep the ones that fail for the next try."""
        failed = []
        for fd in self._unsynced_ivs:
            try:
                os.fsync(fd)
            except OSError:
                failed.append(fd)
                continue
            os.close(fd)
        self._unsynced_ivs = failed
        if failed:
            raise OSError(errno.EIO, f"fsync of {len(failed)} directory IV files failed")

    def _new_owner(self, parent: Inode, ctx: pyfuse3.RequestContext) -> tuple[int, int, bool]:
        """Return the owner, group and set-group-ID inheritance of a new entry in *parent*."""
        parent_st = os.fstat(parent.fd)
        if parent_st.st_mode & stat.S_ISGID:
            return ctx.uid, parent_st.st_gid, True
        return ctx.uid, ctx.gid, False

    def _creates_as_requested(self, parent: Inode, uid: int, gid: int, inherit_gid: bool) -> bool:
        """Tell whether a backing entry created in *parent* gets owner *uid*:*gid* and its exact mode by itself.

        It does when this process has that user and group (or the directory
        passes its group on) and the umask is 0. *parent* must also have no
        default ACL to inherit, which is known after its first new entry.
        """
        return (
            self._umask_is_zero
            and uid == self._euid
            and (inherit_gid or gid == self._egid)
            and xattrs.ACL_DEFAULT in parent.absent_xattrs
        )

    def _set_up_entry(
        self, parent: Inode, temp_name: str, backing_name: str, uid: int, gid: int, mode: int | None
    ) -> pyfuse3.EntryAttributes:
        """Give the new entry *temp_name* its owner, inherited ACL and *mode*, rename it to *backing_name*.

        The entry stays under its reserved temporary name until it is complete
        (a directory's IV, owner and mode), so a kill of this process never
        leaves a visible half-made entry. Then its lookup is counted. *mode*
        includes the file type; None leaves the mode alone (symlinks). Only
        regular files and directories store an inherited ACL, because Linux has
        no user.* attributes on device nodes, FIFOs and sockets. Those get
        permission bits that grant no more than the default ACL would.
        """
        try:
            fd = os.open(temp_name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except BaseException:
            self._discard_new_entry(parent, temp_name)
            raise

        path = f"/proc/self/fd/{fd}"
        try:
            syscalls.fchown_path_fd(fd, uid, gid)
            if mode is not None:
                store_acl = stat.S_ISREG(mode) or stat.S_ISDIR(mode)
                mode = self._inherit_default_acl(parent, path, mode, store_acl)
                os.chmod(path, stat.S_IMODE(mode))
            _rename_new_entry(parent.fd, temp_name, backing_name)
        except BaseException:
            os.close(fd)
            self._discard_new_entry(parent, temp_name)
            raise
        return self._remember(fd, parent, backing_name)

    def _remove_temporary_entries(self, directory: Inode, backing_names: list[str]) -> None:
        """Remove entries that a killed process left under temporary names, keeping the directory's times.

        Handlers run one at a time and each removes its own temporary entries
        before it returns, so any found here is a leftover. A leftover
        directory would count in the parent's link count for good.
        """
        st = os.fstat(directory.fd)
        removed = 0
        for backing_name in backing_names:
            try:
                names.remove_temporary_entry(directory.fd, backing_name)
                removed += 1
            except OSError as exc:
                log.warning("removing a leftover temporary entry failed vol=%s error=%s", self.volume, exc.strerror)
        syscalls.set_times_path_fd(directory.fd, st.st_atime_ns, st.st_mtime_ns)
        log.info("leftover temporary entries removed vol=%s count=%d", self.volume, removed)

    def _discard_new_entry(self, parent: Inode, backing_name: str) -> None:
        """Remove an entry that a failing request created, so that no entry outlives the error the client gets.

        The kernel caches the failed name as absent, so a leftover entry would
        stay hidden and make the next create of that name fail with EEXIST.
        This runs when descriptors ran out, so it opens none.
        """
        try:
            try:
                os.unlink(backing_name, dir_fd=parent.fd)
            except IsADirectoryError:
                os.unlink(f"{backing_name}/{names.DIR_IV_NAME}", dir_fd=parent.fd)
                os.rmdir(backing_name, dir_fd=parent.fd)
        except OSError as exc:
            log.warning("removing a half-created entry failed vol=%s error=%s", self.volume, exc.strerror)

    def _set_access_acl(self, inode: Inode, value: bytes) -> None:
        """Store an access ACL and make the permission bits follow it.

        With FUSE_POSIX_ACL the kernel enforces ACLs but leaves the mode to the
        filesystem, and it consults the ACL only while the group bits are set.
        An ACL that grants nothing beyond the mode is not stored, as on ext4.
        """
        entries = xattrs.parse_acl(value)
        self._chmod(inode, xattrs.mode_of_acl(entries, os.fstat(inode.fd).st_mode))
        if not xattrs.is_minimal_acl(entries):
            self._xattrs.set(inode.proc_path, xattrs.ACL_ACCESS, value)
            return
        try:
            self._xattrs.remove(inode.proc_path, xattrs.ACL_ACCESS)
        except XattrError:
            pass  # there was none

    def _inherit_default_acl(self, parent: Inode, path: str, mode: int, store_acl: bool = True) -> int:
        """Give a new entry at *path* the ACLs its directory's default ACL calls for; return its mode.

        A directory inherits the default ACL itself as well. Without a default
        ACL in *parent*, nothing changes and *mode* is returned as it is.
        Unless *store_acl*, nothing is stored and the mode alone grants what
        the inherited ACL grants the owner, owning group and others.
        """
        default = self._default_acl(parent)
        if default is None:
            return mode

        entries, mode = xattrs.inherit_acl(xattrs.parse_acl(default), mode)
        if not store_acl:
            return xattrs.mode_without_acl(entries, mode)
        if not xattrs.is_minimal_acl(entries):
            self._xattrs.set(path, xattrs.ACL_ACCESS, xattrs.format_acl(entries))
        if stat.S_ISDIR(mode):
            self._xattrs.set(path, xattrs.ACL_DEFAULT, default)
        return mode

    def _default_acl(self, directory: Inode) -> bytes | None:
        """Return the default ACL of *directory*, or None if it has none (remembered until one is set)."""
        if xattrs.ACL_DEFAULT in directory.absent_xattrs:
            return None
        try:
            return self._xattrs.get(directory.proc_path, xattrs.ACL_DEFAULT)
        except XattrError as exc:
            if exc.errno == errno.ENODATA:
                directory.absent_xattrs.add(xattrs.ACL_DEFAULT)
            return None

    def _mode_of_new_entry(self, parent: Inode, mode: int, ctx: pyfuse3.RequestContext) -> int:
        """Return the requested *mode* of a new entry in *parent* with the caller's umask applied.

        With FUSE_DONT_MASK the kernel sends the umask instead of applying it.
        As on ext4, the umask applies only when *parent* has no default ACL,
        because a default ACL limits the new entry's mode itself.
        """
        if not self._umask_in_requests or self._default_acl(parent) is not None:
            return mode
        return mode & ~(ctx.umask & 0o777)

    def _chmod_access_acl(self, inode: Inode, mode: int) -> None:
        """Make a stored access ACL follow new permission bits *mode*, as chmod(2) does on ext4."""
        if xattrs.ACL_ACCESS in inode.absent_xattrs or names.is_symlink(os.fstat(inode.fd)):
            return
        try:
            value = self._xattrs.get(inode.proc_path, xattrs.ACL_ACCESS)
        except XattrError as exc:
            if exc.errno == errno.ENODATA:
                inode.absent_xattrs.add(xattrs.ACL_ACCESS)
            return
        entries = xattrs.chmod_acl(xattrs.parse_acl(value), mode)
        self._xattrs.set(inode.proc_path, xattrs.ACL_ACCESS, xattrs.format_acl(entries))

    def _chmod(self, inode: Inode, mode: int) -> None:
        st = os.fstat(inode.fd)
        if names.is_symlink(st):
            return  # Linux symlinks have no mode of their own
        mode = stat.S_IMODE(mode)
        if stat.S_ISREG(st.st_mode):
            # The sticky bit on a backing regular file marks a long symlink, and
            # Linux ignores it on regular files anyway.
            mode &= ~stat.S_ISVTX
        os.chmod(inode.proc_path, mode)

    def _truncate(self, inode: Inode, fh: int | None, size: int) -> None:
        handle = self._files.get(fh) if fh is not None else None
        fd = handle.fd if handle is not None else os.open(inode.proc_path, os.O_RDWR | os.O_CLOEXEC)
        self._reported_damage.pop(inode.ino, None)
        try:
            self._contents.truncate(fd, size)
        except IntegrityError as exc:
            self._report_damage(inode, exc, fd)
            raise FUSEError(errno.EIO) from None
        finally:
            if handle is None:
                os.close(fd)

    def _rename_replacing(
        self, old_parent: Inode, old: names.BackingName, new_parent: Inode, new: names.BackingName
    ) -> None:
        """Rename *old* to *new*, atomically replacing an existing *new*.

        A backing directory is never empty (it contains its IV), so a directory
        replacing an empty directory goes by exchange, then the old target is
        removed from its new place.
        """
        try:
            target = os.stat(new.name, dir_fd=new_parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            target = None

        if target is None or not stat.S_ISDIR(target.st_mode):
            if target is not None:
                self._inodes.name_removed(new_parent, new.name)
            os.rename(old.name, new.name, src_dir_fd=old_parent.fd, dst_dir_fd=new_parent.fd)
            return

        source = os.stat(old.name, dir_fd=old_parent.fd, follow_symlinks=False)
        if not stat.S_ISDIR(source.st_mode):
            raise FUSEError(errno.EISDIR)
        if not self._is_empty_dir(new_parent, new):
            raise FUSEError(errno.ENOTEMPTY)
        syscalls.rename_at(old_parent.fd, old.name, new_parent.fd, new.name, syscalls.RENAME_EXCHANGE)
        names.remove_dir(old_parent.fd, old.name)

    def _is_empty_dir(self, parent: Inode, backing: names.BackingName) -> bool:
        """Tell whether a backing directory contains nothing but reserved files, by the rule names.remove_dir uses."""
        fd = os.open(backing.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            entries = os.listdir(fd)
        finally:
            os.close(fd)
        return all(names.is_reserved(entry) and not names.is_long_name(entry) for entry in entries)

    def _open_handle(self, inode: Inode, fd: int) -> pyfuse3.FileInfo:
        fh = next(self._next_fh)
        self._files[fh] = OpenFile(inode, fd)
        self._inodes.opened(inode)
        # The page cache stays valid across opens, because no one else writes the backing file.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _report_damage(self, inode: Inode, exc: IntegrityError, fd: int | None = None) -> None:
        """Log one ERROR line per damaged block (DEBUG for repeats), naming ciphertext paths only."""
        block = exc.block_no if isinstance(exc, fmt.BlockIntegrityError) else "-"
        path = self._backing_path(fd if fd is not None else inode.fd)
        reported = self._reported_damage.setdefault(inode.ino, set())
        level = logging.DEBUG if block in reported else logging.ERROR
        reported.add(block)
        log.log(level, "integrity check failed vol=%s path=%s block=%s error=%s", self.volume, path, block, exc)

    def _report_damaged_name(self, inode: Inode, backing_name: str, exc: IntegrityError, attribute: bool = False) -> None:
        """Log one ERROR line per damaged entry name in directory *inode*, or attribute name of *inode* (DEBUG for repeats)."""
        if attribute:
            event = "attribute name unreadable"
            where = f"path={self._backing_path(inode.fd)} attribute={_printable(backing_name)}"
        else:
            event = "name unreadable"
            where = f"path={_printable(self._backing_path(inode.fd) + '/' + backing_name)}"

        reported = self._reported_damage.setdefault(inode.ino, set())
        level = logging.DEBUG if (event, backing_name) in reported else logging.ERROR
        reported.add((event, backing_name))
        log.log(level, "%s vol=%s %s error=%s", event, self.volume, where, exc)

    def _report_failed_write(self, handle: OpenFile, offset: int, size: int, exc: OSError) -> None:
        """Log a write that failed in the backing store: one WARNING line per file until one of its writes succeeds.

        With the writeback cache most writes reach this process after write(2)
        has returned, so the program learns of the failure only from fsync(2)
        or close(2), and the operator only from this line.
        """
        ino = handle.inode.ino
        level = logging.DEBUG if ino in self._failed_writes else logging.WARNING
        self._failed_writes.add(ino)
        log.log(
            level,
            "write failed vol=%s path=%s offset=%d length=%d error=%s",
            self.volume,
            self._backing_path(handle.fd),
            offset,
            size,
            exc.strerror or errno.errorcode.get(exc.errno, exc.errno),
        )

    def _backing_path(self, fd: int) -> str:
        """Return the backing path of *fd* relative to the backing root: ciphertext names only."""
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return "?"
        return _printable(os.path.relpath(target, self._backing_root))


def _printable(path: str) -> str:
    """Return *path* as it is if it is printable ASCII, else escaped as by ascii().

    Anyone with write access to the backing store can choose its names, and a newline in one
    must not start a forged log line.
    """
    if path.isascii() and path.isprintable():
        return path
    return ascii(path)


def _rename_new_entry(dir_fd: int, temp_name: str, backing_name: str) -> None:
    """Rename a completed new entry into place; raise FileExistsError if *backing_name* exists.

    Backing filesystems without RENAME_NOREPLACE (NFS, for one) reject the
    flag with EINVAL. There the check and a plain rename are enough, because
    only this process changes the backing store, one request at a time.
    """
    try:
        syscalls.rename_at(dir_fd, temp_name, dir_fd, backing_name, syscalls.RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise

    try:
        os.lstat(backing_name, dir_fd=dir_fd)
    except FileNotFoundError:
        os.rename(temp_name, backing_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), backing_name)
