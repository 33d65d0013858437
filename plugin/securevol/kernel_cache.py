"""Requests that the kernel forget cached directory entries, made by a thread off the request loop.

Each entry is sent with FUSE's notify_inval_entry (pyfuse3.invalidate_entry).
The kernel takes the parent directory's lock for it, and a request for that
directory in progress holds the lock, so a notification sent from the request
loop could wait for the loop itself. This thread waits instead.

pyfuse3.invalidate_entry_async does the same on a thread of its own, but that
thread outlives pyfuse3.close(), after which a queued notification would use
the closed FUSE session. This thread is stopped before the session closes.
"""

import logging
import queue
import threading

import pyfuse3

from securevol import syscalls

log = logging.getLogger(__name__)

THREAD_NAME = "sv-forget"

# Seconds stop() waits for a notification in progress. A notification can wait
# for a directory lock held by a client whose request the stopped loop never serves.
STOP_TIMEOUT = 1.0


class EntryForgetter:
    """A thread that sends the kernel requests to forget (parent inode, name) entries, in order."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def forget(self, entries: list[tuple[int, bytes]]) -> None:
        """Queue *entries* for the kernel to forget; entries it does not know are skipped."""
        for entry in entries:
            self._queue.put(entry)

    def stop(self) -> bool:
        """Drop the queued entries and end the thread; return False if a notification still runs.

        Call it before pyfuse3.close(). Calling it again is harmless.
        """
        self._stopping = True
        self._queue.put(None)
        self._thread.join(STOP_TIMEOUT)
        return not self._thread.is_alive()

    def _run(self) -> None:
        syscalls.name_current_thread(THREAD_NAME)
        while (entry := self._queue.get()) is not None:
            if self._stopping:
                continue
            parent_ino, name = entry
            try:
                pyfuse3.invalidate_entry(parent_ino, name)
            except FileNotFoundError:
                pass  # renamed, removed or already forgotten
            except OSError as exc:
                log.debug("forget request failed parent=%d error=%s", parent_ino, exc.strerror)
