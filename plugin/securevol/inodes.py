"""The FUSE process's table of the inodes the kernel has looked up, each held by an O_PATH descriptor.

A FUSE inode number is the backing inode number, except that the backing
root and backing inode 1 trade places, because FUSE fixes the root at 1. Each
known inode keeps an O_PATH descriptor to its backing inode: operations then
work relative to descriptors (openat-style, or through /proc/self/fd/N), so
renames elsewhere in the tree and paths longer than PATH_MAX do not matter, and
the backing filesystem cannot reuse the inode number while the kernel still
knows it.

An inode stays in the table while the kernel's lookup count or the number of
open file handles is above zero. Descriptors of dropped inodes are closed by a
background thread: closing the last descriptor of an unlinked backing file
makes the backing filesystem free its blocks inside close(2), which would
otherwise stall the request loop on every FORGET after an unlink.

The kernel can look up more inodes than the process may hold descriptors for
(a find(1) over a large tree). When the table holds more descriptors than half
the open-file limit, it closes those of the least recently used files and
symlinks that are not open, and reopens one by a backing name when it is next
used. Each such file keeps the names it is known by: the directory inode and
backing name of each lookup, create and link, kept up to date by rename and
unlink. A file whose last known name is removed while its lookup count is above
zero is reopened first and keeps its descriptor from then on. So its backing
inode is never freed, and its number never reused, while the kernel may still
refer to it. Directories are never closed early, and one that holds a known name
stays in the table after the kernel's FORGET: they are where every reopen
starts.
"""

import errno
import logging
import os
import queue
import resource
import stat
import threading
import time
from collections import OrderedDict

import pyfuse3

from securevol import syscalls

log = logging.getLogger(__name__)

# Seconds the closer thread waits after a first dropped descriptor for others to close with it.
CLOSE_BATCH_DELAY = 0.002

CLOSER_THREAD_NAME = "sv-closer"

# The share of the open-file limit that descriptors of known inodes may use;
# open files, read-ahead and the journal need the rest.
INODE_DESCRIPTOR_SHARE = 0.5

# Known inodes remembered between two looks at the open-file limit.
LIMIT_CHECK_INTERVAL = 64

# Descriptors closed at once when over budget, as a share of the budget.
CLOSE_EARLY_BATCH = 0.125

_CLOSED = -1


class Inode:
    """One backing inode with a lookup count above zero or an open handle."""

    __slots__ = (
        "ino", "_fd", "_table", "lookups", "opens", "is_dir", "names", "named_children", "dir_iv", "absent_xattrs",
        "unlinked_times",
    )

    def __init__(self, ino: int, fd: int, is_dir: bool, table: "InodeTable | None" = None) -> None:
        self.ino = ino
        self._fd = fd
        self._table = table
        self.lookups = 0
        self.opens = 0
        self.is_dir = is_dir
        # The (parent FUSE inode number, backing name) pairs known to lead to
        # this file, any of which reopens it once its descriptor was closed early.
        # A dict used as an ordered set: a file can have tens of thousands of hard links.
        self.names: dict[tuple[int, str], None] = {}
        # For a directory: how many such names lie in it. It stays in the
        # table while there are any, so that the files can still be reopened.
        self.named_children = 0
        self.dir_iv: bytes | None = None  # cached by the name layer for directories
        # Names of extended attributes found missing; only this process sets
        # attributes, so the set stays true until setxattr or removexattr here.
        self.absent_xattrs: set[bytes] = set()
        # (atime_ns, mtime_ns) set on an unlinked file and kept here instead of
        # on the backing inode, which is about to be freed; None keeps a time.
        self.unlinked_times: tuple[int | None, int | None] | None = None

    @property
    def fd(self) -> int:
        """The O_PATH descriptor of the backing inode, reopened by name if it was closed early."""
        if self._fd == _CLOSED:
            self._table.reopen(self)
        return self._fd

    @property
    def has_descriptor(self) -> bool:
        return self._fd != _CLOSED

    @property
    def proc_path(self) -> str:
        """A path that reopens the backing inode, for calls that take no descriptor."""
        return f"/proc/self/fd/{self.fd}"

    def __repr__(self) -> str:
        return f"Inode(ino={self.ino}, lookups={self.lookups}, opens={self.opens})"


class InodeTable:
    """Maps FUSE inode numbers to Inode records, keeps their lookup counts and bounds their descriptors."""

    def __init__(self, root_fd: int, max_descriptors: int | None = None) -> None:
        """*max_descriptors* bounds the descriptors held; None: a share of the open-file limit, looked up as it changes."""
        root_stat = os.fstat(root_fd)
        self._root_backing_ino = root_stat.st_ino
        root = Inode(pyfuse3.ROOT_INODE, root_fd, is_dir=True)
        root.lookups = 1  # the root stays in the table for the whole mount
        self._inodes: dict[int, Inode] = {root.ino: root}
        self._closer = _DescriptorCloser()

        # Files and symlinks that hold a descriptor and have a name to reopen
        # by, least recently used first; and the same inodes by that name.
        self._closable: OrderedDict[int, Inode] = OrderedDict()
        self._by_name: dict[tuple[int, str], Inode] = {}
        self._descriptors = 1
        self._max_descriptors = max_descriptors
        self._next_limit_check = 0

    @property
    def root(self) -> Inode:
        return self._inodes[pyfuse3.ROOT_INODE]

    def __len__(self) -> int:
        return len(self._inodes)

    @property
    def descriptors(self) -> int:
        """The number of descriptors the table holds."""
        return self._descriptors

    def fuse_ino(self, backing_ino: int) -> int:
        """Return the FUSE inode number of a backing inode number."""
        if backing_ino == self._root_backing_ino:
            return pyfuse3.ROOT_INODE
        if backing_ino == pyfuse3.ROOT_INODE:
            return self._root_backing_ino
        return backing_ino

    def get(self, ino: int) -> Inode | None:
        inode = self._inodes.get(ino)
        if ino in self._closable:
            self._closable.move_to_end(ino)
        return inode

    def remember(self, fd: int, st: os.stat_result, parent: Inode | None = None, name: str | None = None) -> Inode:
        """Count one lookup of the backing inode behind O_PATH descriptor *fd* and return its record.

        Takes ownership of *fd*: it becomes the record's descriptor, or is
        closed if the inode is known already. *parent* and *name* are the
        directory and backing name the inode was found by. They reopen it if
        its descriptor is closed early. Directories, "." and ".." go without.
        """
        ino = self.fuse_ino(st.st_ino)
        inode = self._inodes.get(ino)
        if inode is None:
            inode = Inode(ino, fd, is_dir=stat.S_ISDIR(st.st_mode), table=self)
            self._inodes[ino] = inode
            self._descriptors += 1
        elif not inode.has_descriptor:
            inode._fd = fd  # spares the reopen
            self._descriptors += 1
        else:
            os.close(fd)
        if parent is not None and name is not None and not inode.is_dir:
            self.name_added(inode, parent, name)
        self._make_closable(inode)
        inode.lookups += 1

        if self._descriptors >= self._next_limit_check:
            self._keep_within_budget(keep=inode)
        return inode

    def forget(self, ino: int, count: int) -> None:
        """Take *count* lookups off an inode, dropping it when nothing refers to it any more."""
        inode = self._inodes.get(ino)
        if inode is None or ino == pyfuse3.ROOT_INODE:
            return
        if count > inode.lookups:
            log.warning("forget exceeds lookup count ino=%d lookups=%d count=%d", ino, inode.lookups, count)
            count = inode.lookups
        inode.lookups -= count
        self._drop_if_unused(inode)

    def opened(self, inode: Inode) -> None:
        inode.opens += 1
        self._closable.pop(inode.ino, None)

    def closed(self, inode: Inode) -> None:
        inode.opens -= 1
        self._make_closable(inode)
        self._drop_if_unused(inode)

    # -- names of files whose descriptor may be closed early ----------------------------------------

    def name_added(self, inode: Inode, parent: Inode, name: str) -> None:
        """Note that backing *name* in *parent* leads to *inode* (a lookup, create or link)."""
        if inode.is_dir:
            return
        key = (parent.ino, name)
        owner = self._by_name.get(key)
        if owner is inode:
            return
        if owner is not None:
            # Every removal of a name passes name_removed, so this does not happen.
            log.warning("backing name recorded twice ino=%d other=%d", inode.ino, owner.ino)
            self.name_removed(parent, name)
        inode.names[key] = None
        self._by_name[key] = inode
        parent.named_children += 1
        self._make_closable(inode)

    def name_removed(self, parent: Inode, name: str) -> None:
        """Note that backing *name* in *parent* is about to go; call it before unlink or a rename over it.

        A file known by no other name is reopened now, while the name still
        leads to it, and keeps its descriptor for as long as it is known.
        """
        inode = self._by_name.get((parent.ino, name))
        if inode is None:
            return
        if len(inode.names) == 1:
            inode.fd  # noqa: B018 (the property reopens it)
        self._forget_name(inode, (parent.ino, name))
        if not inode.names:
            self._closable.pop(inode.ino, None)

    def name_moved(self, old_parent: Inode, old_name: str, new_parent: Inode, new_name: str) -> None:
        """Note that backing *old_name* in *old_parent* is now *new_name* in *new_parent*."""
        inode = self._by_name.get((old_parent.ino, old_name))
        if inode is not None:
            self._forget_name(inode, (old_parent.ino, old_name))
            self.name_added(inode, new_parent, new_name)

    def names_exchanged(self, old_parent: Inode, old_name: str, new_parent: Inode, new_name: str) -> None:
        """Note that two backing names traded their inodes (RENAME_EXCHANGE)."""
        first = self._by_name.get((old_parent.ino, old_name))
        second = self._by_name.get((new_parent.ino, new_name))
        if first is not None:
            self._forget_name(first, (old_parent.ino, old_name))
        if second is not None:
            self._forget_name(second, (new_parent.ino, new_name))
        if first is not None:
            self.name_added(first, new_parent, new_name)
        if second is not None:
            self.name_added(second, old_parent, old_name)

    def reopen(self, inode: Inode) -> None:
        """Give *inode*, whose descriptor was closed early, a new one by one of its names."""
        parent_ino, name = next(iter(inode.names))
        parent = self._inodes[parent_ino]
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        if self.fuse_ino(os.fstat(fd).st_ino) != inode.ino:
            os.close(fd)
            log.error("backing name leads to another inode ino=%d", inode.ino)
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        inode._fd = fd
        self._descriptors += 1
        self._make_closable(inode)
        if self._descriptors >= self._next_limit_check:
            self._keep_within_budget(keep=inode)

    def _forget_name(self, inode: Inode, key: tuple[int, str]) -> None:
        """Take one name off *inode*; a directory left holding no known name and no lookup is dropped."""
        del self._by_name[key]
        del inode.names[key]
        parent = self._inodes[key[0]]
        parent.named_children -= 1
        self._drop_if_unused(parent)

    def _make_closable(self, inode: Inode) -> None:
        """Put *inode* at the recently used end of the closable files, if its descriptor may be closed early."""
        if inode.names and inode.opens == 0 and inode.has_descriptor:
            self._closable[inode.ino] = inode
            self._closable.move_to_end(inode.ino)

    # -- the descriptor budget ----------------------------------------------------------------------

    def _keep_within_budget(self, keep: Inode) -> None:
        """Close the descriptors of the least recently used unopened files while over budget."""
        budget = self._budget()
        if self._descriptors > budget:
            target = budget - int(budget * CLOSE_EARLY_BATCH)
            closed = self._close_early(self._descriptors - target, keep)
            log.debug("descriptors of known inodes closed early count=%d held=%d", closed, self._descriptors)
        self._next_limit_check = min(budget + 1, self._descriptors + LIMIT_CHECK_INTERVAL)

    def _budget(self) -> int:
        if self._max_descriptors is not None:
            return self._max_descriptors
        # Looked up each time, because an operator can change it with prlimit(1).
        soft_limit, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, int(soft_limit * INODE_DESCRIPTOR_SHARE))

    def _close_early(self, count: int, keep: Inode) -> int:
        # Open files are never in _closable, so only *keep* is passed over.
        closed = 0
        while closed < count and self._closable:
            _ino, inode = self._closable.popitem(last=False)
            if inode is keep:
                self._closable[inode.ino] = inode
                if len(self._closable) == 1:
                    break
                continue
            os.close(inode._fd)
            inode._fd = _CLOSED
            self._descriptors -= 1
            closed += 1
        return closed

    # -- dropping -----------------------------------------------------------------------------------

    def close_all(self) -> None:
        """Close every descriptor; called once the filesystem is unmounted."""
        for inode in self._inodes.values():
            if inode.has_descriptor:
                os.close(inode._fd)
        self._inodes.clear()
        self._closable.clear()
        self._by_name.clear()
        self._closer.stop()

    def _drop_if_unused(self, inode: Inode) -> None:
        if inode.lookups > 0 or inode.opens > 0 or inode.named_children > 0 or inode.ino == pyfuse3.ROOT_INODE:
            return
        if self._inodes.get(inode.ino) is not inode:
            return  # dropped already
        del self._inodes[inode.ino]
        self._closable.pop(inode.ino, None)
        for key in list(inode.names):
            self._forget_name(inode, key)
        if inode.has_descriptor:
            # The record is gone, so nothing uses this descriptor any more, and its
            # number cannot be handed out again before the closer closes it.
            self._closer.close_later(inode._fd)
            inode._fd = _CLOSED
            self._descriptors -= 1


class _DescriptorCloser:
    """A thread that closes descriptors handed to it, in order, off the request loop."""

    _STOP = -1

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=CLOSER_THREAD_NAME, daemon=True)
        self._thread.start()

    def close_later(self, fd: int) -> None:
        self._queue.put(fd)

    def stop(self) -> None:
        """Close every queued descriptor, then end the thread."""
        self._queue.put(self._STOP)
        self._thread.join()

    def _run(self) -> None:
        syscalls.name_current_thread(CLOSER_THREAD_NAME)
        while True:
            batch = [self._queue.get()]
            # An rm -r drops thousands of inodes. Gathering them before closing
            # wakes this thread once per burst, not once per descriptor, and
            # each wake-up took the GIL from the request loop.
            time.sleep(CLOSE_BATCH_DELAY)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for fd in batch:
                if fd == self._STOP:
                    return
                try:
                    os.close(fd)
                except OSError as exc:
                    log.warning("closing a dropped inode failed fd=%d error=%s", fd, exc)
