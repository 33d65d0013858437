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
"""

import logging
import os
import queue
import stat
import threading
import time

import pyfuse3

from securevol import syscalls

log = logging.getLogger(__name__)

# Seconds the closer thread waits after a first dropped descriptor for others to close with it.
CLOSE_BATCH_DELAY = 0.002

CLOSER_THREAD_NAME = "sv-closer"


class Inode:
    """One backing inode with a lookup count above zero or an open handle."""

    __slots__ = ("ino", "fd", "lookups", "opens", "is_dir", "dir_iv", "absent_xattrs", "unlinked_times")

    def __init__(self, ino: int, fd: int, is_dir: bool) -> None:
        self.ino = ino
        self.fd = fd
        self.lookups = 0
        self.opens = 0
        self.is_dir = is_dir
        self.dir_iv: bytes | None = None  # cached by the name layer for directories
        # Names of extended attributes found missing; only this process sets
        # attributes, so the set stays true until setxattr or removexattr here.
        self.absent_xattrs: set[bytes] = set()
        # (atime_ns, mtime_ns) set on an unlinked file and kept here instead of
        # on the backing inode, which is about to be freed; None keeps a time.
        self.unlinked_times: tuple[int | None, int | None] | None = None

    @property
    def proc_path(self) -> str:
        """A path that reopens the backing inode, for calls that take no descriptor."""
        return f"/proc/self/fd/{self.fd}"

    def __repr__(self) -> str:
        return f"Inode(ino={self.ino}, lookups={self.lookups}, opens={self.opens})"


class InodeTable:
    """Maps FUSE inode numbers to Inode records and keeps their lookup counts."""

    def __init__(self, root_fd: int) -> None:
        root_stat = os.fstat(root_fd)
        self._root_backing_ino = root_stat.st_ino
        root = Inode(pyfuse3.ROOT_INODE, root_fd, is_dir=True)
        root.lookups = 1  # the root stays in the table for the whole mount
        self._inodes: dict[int, Inode] = {root.ino: root}
        self._closer = _DescriptorCloser()

    @property
    def root(self) -> Inode:
        return self._inodes[pyfuse3.ROOT_INODE]

    def __len__(self) -> int:
        return len(self._inodes)

    def fuse_ino(self, backing_ino: int) -> int:
        """Return the FUSE inode number of a backing inode number."""
        if backing_ino == self._root_backing_ino:
            return pyfuse3.ROOT_INODE
        if backing_ino == pyfuse3.ROOT_INODE:
            return self._root_backing_ino
        return backing_ino

    def get(self, ino: int) -> Inode | None:
        return self._inodes.get(ino)

    def remember(self, fd: int, st: os.stat_result) -> Inode:
        """Count one lookup of the backing inode behind O_PATH descriptor *fd* and return its record.

        Takes ownership of *fd*: it becomes the record's descriptor, or is
        closed if the inode is known already.
        """
        ino = self.fuse_ino(st.st_ino)
        inode = self._inodes.get(ino)
        if inode is None:
            inode = Inode(ino, fd, is_dir=stat.S_ISDIR(st.st_mode))
            self._inodes[ino] = inode
        else:
            os.close(fd)
        inode.lookups += 1
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

    def closed(self, inode: Inode) -> None:
        inode.opens -= 1
        self._drop_if_unused(inode)

    def close_all(self) -> None:
        """Close every descriptor; called once the filesystem is unmounted."""
        for inode in self._inodes.values():
            os.close(inode.fd)
        self._inodes.clear()
        self._closer.stop()

    def _drop_if_unused(self, inode: Inode) -> None:
        if inode.lookups > 0 or inode.opens > 0 or inode.ino == pyfuse3.ROOT_INODE:
            return
        del self._inodes[inode.ino]
        # The record is gone, so nothing uses this descriptor any more, and its
        # number cannot be handed out again before the closer closes it.
        self._closer.close_later(inode.fd)


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
