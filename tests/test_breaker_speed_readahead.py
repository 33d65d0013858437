"""Tests of the read-ahead thread (readahead.py) with requests it cannot carry out.

The thread must survive every request: once it is gone, requests fill its
queue, each holding a duplicate descriptor, and stop() at unmount waits for
room in the queue forever.
"""

import os
import threading

from securevol.readahead import MAX_PENDING, ReadAheadWorker

STOP_TIMEOUT = 60.0


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _stop_in_thread(worker: ReadAheadWorker) -> bool:
    """Call worker.stop() and tell whether it returned; a hang fails the test instead of blocking it."""
    stopper = threading.Thread(target=worker.stop, daemon=True)
    stopper.start()
    stopper.join(STOP_TIMEOUT)
    return not stopper.is_alive()


def test_offset_beyond_off_t_keeps_worker_alive(tmp_path):
    # A client may write near the 2**63 limit of file offsets. The ciphertext
    # offset after it does not fit in off_t, so posix_fadvise raises OverflowError.
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    before = _open_descriptors()
    worker = ReadAheadWorker()

    for _ in range(2 * MAX_PENDING):
        worker.request(fd, 2**63 + 2**20, 8 * 2**20)
    worker.request(fd, 0, 4096)

    assert _stop_in_thread(worker)
    assert _open_descriptors() == before
    os.close(fd)


def test_negative_length_keeps_worker_alive(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    before = _open_descriptors()
    worker = ReadAheadWorker()

    for _ in range(2 * MAX_PENDING):
        worker.request(fd, 0, -1)  # EINVAL from the kernel

    assert _stop_in_thread(worker)
    assert _open_descriptors() == before
    os.close(fd)
