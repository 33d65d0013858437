"""FALLOCATE requests, which pyfuse3 3.5 does not hand to the filesystem.

pyfuse3 registers no fallocate handler with libfuse, so libfuse replies to the
kernel's first FALLOCATE request with ENOSYS. From then on the kernel fails
every fallocate(2) on the mount with EOPNOTSUPP, so holes cannot be punched or
ranges zeroed, and posix_fallocate(3) writes zeros itself instead of
reserving space.

install() writes a handler into libfuse's handler table (securevol.fuse_session).
The handler calls the Operations object's ``fallocate`` coroutine and replies
with fuse_reply_err. It runs inside pyfuse3's request loop, which holds the
GIL while libfuse dispatches a request, so it runs like any other handler:
one request at a time.
"""

import ctypes
import errno
import logging
from typing import Any

import pyfuse3

from securevol.fuse_session import FALLOCATE_SLOT, LibfuseSession

log = logging.getLogger(__name__)

# Offset of ``fh`` in struct fuse_file_info (fuse_common.h): an int and two
# 32-bit bit-field words come first.
_FILE_INFO_FH_OFFSET = 16

_FallocateHandler = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p
)


def install(session: LibfuseSession, operations: Any) -> None:
    """Make libfuse pass FALLOCATE requests to *operations*.fallocate(fh, mode, offset, length)."""
    # Looked up through pyfuse3's own module, so that it is the libfuse pyfuse3 is linked with.
    reply_err = ctypes.CDLL(pyfuse3.__file__).fuse_reply_err
    reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    reply_err.restype = ctypes.c_int

    def handle(request: int, _ino: int, mode: int, offset: int, length: int, file_info: int | None) -> None:
        # Every request needs exactly one reply, or its caller waits forever.
        if not file_info:
            log.error("fallocate request without a file handle vol=%s", operations.volume)
            reply_err(request, errno.EIO)
            return
        fh = ctypes.c_uint64.from_address(file_info + _FILE_INFO_FH_OFFSET).value
        reply_err(request, _run(operations.fallocate(fh, mode, offset, length)))

    session.set_handler(FALLOCATE_SLOT, _FallocateHandler(handle))


def _run(coroutine: Any) -> int:
    """Run a handler coroutine that never awaits, and return the errno of the reply (0 for success)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return 0
    except pyfuse3.FUSEError as exc:
        return exc.errno
    except BaseException:
        log.exception("fallocate request failed")
        return errno.EIO
    coroutine.close()
    log.error("fallocate handler awaited something, which the request loop cannot serve here")
    return errno.EIO
