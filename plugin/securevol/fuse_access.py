"""The FUSE operations of a volume with an allowlist: each request's caller is checked first.

``GuardedOperations`` consults an ``access.AccessChecker`` before every request
that reveals or changes the tree: lookup, open, opendir, create, readlink, the
extended attribute requests and the requests that change names or attributes. A refused caller gets EACCES.
read, write, readdir, release and fallocate carry no caller in pyfuse3. Each
handle remembers who opened it, and read, readdir and fallocate check that
opener again, so a container that a changed allowlist leaves out loses the
handles it holds too.
getattr and statfs are not checked, because host tools such as df and findmnt
stat every mountpoint, and they reveal no names or contents.

Caveats:
- write is not checked again: with the writeback cache the kernel flushes
  dirty pages through any writable handle of the file, so refusing one opener's
  handle could drop the writes of an allowed process.
- Pages already in the kernel's page cache are served without a read request,
  so a revoked opener can still read what is cached.
"""

import errno
import logging

import pyfuse3
from pyfuse3 import FUSEError

from securevol.access import AccessChecker
from securevol.crypto import VolumeKeys
from securevol.fuse_ops import SecurevolOperations

log = logging.getLogger(__name__)


class GuardedOperations(SecurevolOperations):
    """SecurevolOperations that refuse callers the volume's allowlist does not allow."""

    def __init__(
        self,
        volume: str,
        backing_root: str,
        keys: VolumeKeys,
        checker: AccessChecker,
        inode_descriptors: int | None = None,
    ) -> None:
        super().__init__(volume, backing_root, keys, inode_descriptors)
        self.checker = checker
        # File and directory handle -> caller key of the process that opened it.
        self._openers: dict[int, str | None] = {}

    def _check(self, ctx: pyfuse3.RequestContext, operation: str) -> None:
        try:
            allowed = self.checker.allows(ctx.pid, operation)
        except Exception:
            # pyfuse3 stops serving on any exception but FUSEError; refusing keeps the volume up.
            log.exception("access check failed vol=%s op=%s pid=%d", self.volume, operation, ctx.pid)
            allowed = False
        if not allowed:
            log.debug("access denied vol=%s op=%s pid=%d", self.volume, operation, ctx.pid)
            raise FUSEError(errno.EACCES)

    def _opener(self, ctx: pyfuse3.RequestContext) -> str | None:
        try:
            return self.checker.identify(ctx.pid)
        except Exception:
            log.exception("caller identification failed vol=%s pid=%d", self.volume, ctx.pid)
            return None

    def _check_handle(self, fh: int, operation: str) -> None:
        try:
            allowed = self.checker.still_allows(self._openers.get(fh), operation)
        except Exception:
            log.exception("access check failed vol=%s op=%s fh=%d", self.volume, operation, fh)
            allowed = False
        if not allowed:
            log.debug("access denied vol=%s op=%s fh=%d", self.volume, operation, fh)
            raise FUSEError(errno.EACCES)

    async def fallocate(self, fh, mode, offset, length):
        self._check_handle(fh, "fallocate")
        return await super().fallocate(fh, mode, offset, length)

    async def lookup(self, parent_ino, name, ctx):
        self._check(ctx, "lookup")
        return await super().lookup(parent_ino, name, ctx)

    async def setattr(self, ino, attr, fields, fh, ctx):
        self._check(ctx, "setattr")
        return await super().setattr(ino, attr, fields, fh, ctx)

    async def readlink(self, ino, ctx):
        self._check(ctx, "readlink")
        return await super().readlink(ino, ctx)

    async def mknod(self, parent_ino, name, mode, rdev, ctx):
        self._check(ctx, "mknod")
        return await super().mknod(parent_ino, name, mode, rdev, ctx)

    async def mkdir(self, parent_ino, name, mode, ctx):
        self._check(ctx, "mkdir")
        return await super().mkdir(parent_ino, name, mode, ctx)

    async def symlink(self, parent_ino, name, target, ctx):
        self._check(ctx, "symlink")
        return await super().symlink(parent_ino, name, target, ctx)

    async def link(self, ino, new_parent_ino, new_name, ctx):
        self._check(ctx, "link")
        return await super().link(ino, new_parent_ino, new_name, ctx)

    async def unlink(self, parent_ino, name, ctx):
        self._check(ctx, "unlink")
        return await super().unlink(parent_ino, name, ctx)

    async def rmdir(self, parent_ino, name, ctx):
        self._check(ctx, "rmdir")
        return await super().rmdir(parent_ino, name, ctx)

    async def rename(self, parent_ino_old, name_old, parent_ino_new, name_new, flags, ctx):
        self._check(ctx, "rename")
        return await super().rename(parent_ino_old, name_old, parent_ino_new, name_new, flags, ctx)

    async def opendir(self, ino, ctx):
        self._check(ctx, "opendir")
        fh = await super().opendir(ino, ctx)
        self._openers[fh] = self._opener(ctx)
        return fh

    async def readdir(self, fh, start_id, token):
        self._check_handle(fh, "readdir")
        return await super().readdir(fh, start_id, token)

    async def releasedir(self, fh):
        self._openers.pop(fh, None)
        return await super().releasedir(fh)

    async def open(self, ino, flags, ctx):
        self._check(ctx, "open")
        file_info = await super().open(ino, flags, ctx)
        self._openers[file_info.fh] = self._opener(ctx)
        return file_info

    async def create(self, parent_ino, name, mode, flags, ctx):
        self._check(ctx, "create")
        file_info, attributes = await super().create(parent_ino, name, mode, flags, ctx)
        self._openers[file_info.fh] = self._opener(ctx)
        return file_info, attributes

    async def read(self, fh, offset, size):
        self._check_handle(fh, "read")
        return await super().read(fh, offset, size)

    async def release(self, fh):
        self._openers.pop(fh, None)
        return await super().release(fh)

    async def getxattr(self, ino, name, ctx):
        self._check(ctx, "getxattr")
        return await super().getxattr(ino, name, ctx)

    async def setxattr(self, ino, name, value, ctx):
        self._check(ctx, "setxattr")
        return await super().setxattr(ino, name, value, ctx)

    async def listxattr(self, ino, ctx):
        self._check(ctx, "listxattr")
        return await super().listxattr(ino, ctx)

    async def removexattr(self, ino, name, ctx):
        self._check(ctx, "removexattr")
        return await super().removexattr(ino, name, ctx)
