"""The FUSE request loop: pyfuse3's own, with a cheaper wait between requests.

No request handler of securevol awaits anything, so the loop serves one
request at a time whatever it does. Between two requests pyfuse3 takes a trio
lock and parks the task until epoll reports the FUSE device readable: two
passes through trio's scheduler, three system calls, and a sleep and wake-up
of the process for every request. Here the loop first checks the device
with poll(2) for up to SPIN_NS without sleeping, then sleeps in poll(2) for
up to FAST_WAIT_MS. On this project's 2-CPU test machine a getxattr(2) that
the filesystem serves from memory took 48 microseconds with pyfuse3's wait
and 24 with this one.

pyfuse3 looks its wait function up by name for every request, so replacing
the module attribute is enough. After FAST_STREAK requests in a row, and
whenever no request arrives in time, the loop waits trio's way, which lets
trio's other tasks (signal handling, the readiness check) run.
"""

import logging
import os
import select
import time

import pyfuse3
import trio

log = logging.getLogger(__name__)

# Requests served back to back before other trio tasks get their turn.
FAST_STREAK = 64

# How long the loop blocks in poll(2), holding up trio's other tasks, before
# it waits trio's way. A client that issues requests one after another, like
# stat(1) over a tree, sends the next one well within this time.
FAST_WAIT_MS = 2

# How long the loop checks for the next request without sleeping. Most of a
# short request's cost was the sleep and the wake-up, and a client that works
# through many files sends its next request within microseconds. The price is
# at most this much CPU time after each burst of requests.
SPIN_NS = 100_000

_FUSE_DEVICE = "/dev/fuse"


class _QueuedRequestWait:
    """Replacement for pyfuse3's wait, for a single worker task: a short blocking poll(2), then trio's wait."""

    def __init__(self, fuse_fd: int) -> None:
        self._fuse_fd = fuse_fd
        self._poll = select.poll()
        self._poll.register(fuse_fd, select.POLLIN)
        self._streak = 0

    async def __call__(self) -> bool:
        if self._streak < FAST_STREAK and self._next_request_queued():
            # Readable, or an error such as an unmount: the receive that follows handles both.
            self._streak += 1
            return True

        self._streak = 0
        try:
            await trio.lowlevel.wait_readable(self._fuse_fd)
        except trio.ClosedResourceError:
            return False  # pyfuse3.terminate() calls trio's notify_closing on the descriptor
        return True

    def _next_request_queued(self) -> bool:
        """Return whether a request arrives within SPIN_NS of polling, or else within FAST_WAIT_MS of sleeping."""
        poll = self._poll.poll
        deadline = time.monotonic_ns() + SPIN_NS
        while not poll(0):
            if time.monotonic_ns() > deadline:
                return bool(poll(FAST_WAIT_MS))
        return True


async def serve() -> None:
    """Run pyfuse3's request loop until the filesystem is unmounted or pyfuse3.terminate() is called.

    Call it after pyfuse3.init(), inside trio. One worker task is enough,
    because no handler awaits, so more tasks would only add scheduling.
    """
    slow_wait = pyfuse3._wait_fuse_readable
    fuse_fd = _find_fuse_fd()
    if fuse_fd is None:
        log.warning("FUSE device descriptor not found; using pyfuse3's request wait")
    else:
        pyfuse3._wait_fuse_readable = _QueuedRequestWait(fuse_fd)
    try:
        await pyfuse3.main(min_tasks=1, max_tasks=1)
    finally:
        pyfuse3._wait_fuse_readable = slow_wait


def _find_fuse_fd() -> int | None:
    """Return this process's descriptor of the FUSE device, which pyfuse3 does not expose."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == _FUSE_DEVICE:
                found.append(int(name))
        except OSError:
            continue  # closed while listing, such as the listing's own descriptor
    return found[0] if len(found) == 1 else None
