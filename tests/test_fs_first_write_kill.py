"""Tests of the first write of a new file (header and blocks in one write) against kill -9.

A first write that fits in one page needs no journal record, because a kill
cannot tear a write within a page. Clients here create files of sizes around
the page boundary (by create, by mknod then open, and by O_TRUNC rewrites)
until the FUSE process is killed. After a remount every file must read
without an error, empty or with the whole contents of one of its writes.

NOTE: a kill rarely lands inside a pwrite(2), so these rounds seldom test a
torn write itself; they catch plans that leave a killed file unreadable or
mixed, such as an O_TRUNC rewrite that keeps the old tail.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.fs_helpers import EXIT_TIMEOUT, process_alive, volume  # noqa: F401 (a fixture)

# Plaintext sizes around one page of ciphertext (a 24-byte header and 32 bytes per block).
SIZES = [1, 100, 3000, 4000, 4039, 4040, 4041, 4072, 4096, 4097, 5000, 70_000, 1_000_000]
OPERATIONS_BEFORE_KILL = 400
KILL_ROUNDS = 4

_CLIENT = textwrap.dedent(
    """
    import errno, os, random, sys
    root, seed, sizes = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    rng = random.Random(seed)
    directory = os.path.join(root, f"c{seed}")
    os.makedirs(directory, exist_ok=True)
    count = 0
    while True:
        path = os.path.join(directory, f"f{rng.randrange(100)}")
        data = bytes([rng.randrange(1, 256)]) * rng.choice(sizes)
        try:
            how = rng.randrange(3)
            if how == 0:
                with open(path, "wb") as f:
                    f.write(data)
            elif how == 1:
                if os.path.exists(path):
                    os.unlink(path)
                os.mknod(path, 0o100644)
                with open(path, "r+b") as f:
                    f.write(data)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, data)
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                sys.exit(0)
            raise
        count += 1
        print(count, flush=True)
    """
)


def _is_one_write(data: bytes) -> bool:
    """Tell whether *data* is the contents of one client write, or whole blocks of the start of one."""
    if not data:
        return True
    uniform = data == bytes([data[0]]) * len(data)
    return uniform and (len(data) in SIZES or len(data) % 4096 == 0)


def _write_until_killed(volume) -> None:
    """Run clients on the mount and kill -9 the FUSE process after OPERATIONS_BEFORE_KILL writes."""
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", _CLIENT, str(volume.mountpoint), str(seed), ",".join(map(str, SIZES))],
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(3)
    ]
    try:
        while int(clients[0].stdout.readline() or OPERATIONS_BEFORE_KILL) < OPERATIONS_BEFORE_KILL:
            pass
        os.kill(volume.pid, signal.SIGKILL)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while process_alive(volume.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for client in clients:
            client.kill()
            client.wait(timeout=30)
            client.stdout.close()
    subprocess.run(["fusermount3", "-uz", str(volume.mountpoint)], check=True)


def test_kill_9_during_small_file_writes(volume):
    for _ in range(KILL_ROUNDS):
        _write_until_killed(volume)
        volume.start()

        checked = 0
        for directory in volume.mountpoint.iterdir():
            for path in directory.iterdir():
                assert _is_one_write(path.read_bytes()), path
                checked += 1
        assert checked > 0
