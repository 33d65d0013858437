"""Tests of stopping a FUSE process that clients keep busy: SIGTERM, SIGINT, fusermount3 and kill -9.

The request loop (fuse_loop.py) serves queued requests back to back and lets
other trio tasks run only between streaks. A stop by signal runs syncfs(2) on
the process's own mount from a thread, and the kernel then waits for requests
that the loop must serve while that thread waits. Every test here makes sure
a stuck stop fails the test instead of leaving the machine with a FUSE
connection that no process serves, because it aborts that connection through fusectl.
"""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from securevol import journal, names
from securevol.contents import WriteOp
from tests.fs_helpers import (  # noqa: F401 (volume is a fixture)
    EXIT_TIMEOUT,
    KEY,
    REPO,
    FuseMount,
    MountFailed,
    is_mounted,
    process_alive,
    require_fuse,
    volume,
)

FILE_COUNT = 50
FILE_SIZE = 10_000

# A client that writes files and keeps them open, so their data stays in the
# kernel's writeback cache (dirty pages and times) until someone syncs them.
_DIRTY_CLIENT = textwrap.dedent(
    """
    import os, sys, time
    root, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    descriptors = []
    for i in range(count):
        fd = os.open(os.path.join(root, f"f{i}"), os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, bytes([i]) * size)
        descriptors.append(fd)
    print("written", flush=True)
    time.sleep(600)
    """
)

# Clients in several processes that create, rewrite, read, list and remove
# files until the mount goes away.
_BUSY_CLIENT = textwrap.dedent(
    """
    import errno, os, random, sys
    root, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    directory = os.path.join(root, f"c{seed}")
    os.makedirs(directory, exist_ok=True)
    print("started", flush=True)
    while True:
        path = os.path.join(directory, f"f{rng.randrange(30)}")
        try:
            action = rng.randrange(4)
            if action == 0:
                with open(path, "wb") as f:
                    f.write(bytes([seed]) * rng.choice([10, 5000, 200_000]))
            elif action == 1:
                with open(path, "rb") as f:
                    f.read()
            elif action == 2:
                os.listdir(directory)
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV):
                sys.exit(0)
            raise
    """
)


def _connection_number(mountpoint) -> int:
    """Return the FUSE connection number of *mountpoint*: the minor device number in mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                return int(fields[2].split(":")[1])
    raise AssertionError(f"{mountpoint} is not mounted")


def _abort_connection(number: int, tmp_path) -> None:
    """Abort FUSE connection *number* through fusectl, mounted in a private mount namespace."""
    control = tmp_path / "fusectl"
    control.mkdir(exist_ok=True)
    script = f"mount -t fusectl none {control} && echo 1 > {control}/{number}/abort"
    subprocess.run(["unshare", "--mount", "sh", "-c", script], check=False, capture_output=True)


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _start_client(script: str, *args) -> subprocess.Popen:
    client = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True
    )
    assert client.stdout.readline().strip() in ("written", "started")
    return client


def _end_clients(clients: list[subprocess.Popen]) -> None:
    for client in clients:
        client.kill()
        client.wait(timeout=30)
        client.stdout.close()


def _stop_and_check_exit(volume, signum: int, clients: list[subprocess.Popen], tmp_path) -> None:
    """Send *signum* to the FUSE process and assert that it exits; on a hang, abort its connection first."""
    connection = _connection_number(volume.mountpoint)
    pid = volume.pid
    os.kill(pid, signum)
    exited = _wait_gone(pid)
    if not exited:
        _abort_connection(connection, tmp_path)
    _end_clients(clients)
    assert exited, f"FUSE process {pid} did not exit after {signal.Signals(signum).name}"
    volume.pid = None


def test_sigterm_with_dirty_pages_in_open_files(volume, tmp_path):
    client = _start_client(_DIRTY_CLIENT, volume.mountpoint, FILE_COUNT, FILE_SIZE)

    _stop_and_check_exit(volume, signal.SIGTERM, [client], tmp_path)

    assert not is_mounted(volume.mountpoint)
    assert "volume unmounted vol=testvol" in volume.log_file.read_text()
    volume.start()
    for i in range(FILE_COUNT):
        assert (volume.mountpoint / f"f{i}").read_bytes() == bytes([i]) * FILE_SIZE


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_busy_processes_cleanly(volume, tmp_path, signum):
    clients = [_start_client(_BUSY_CLIENT, volume.mountpoint, seed) for seed in range(4)]
    time.sleep(1)  # let the clients fill the queue and the writeback cache

    _stop_and_check_exit(volume, signum, clients, tmp_path)

    assert not is_mounted(volume.mountpoint)
    assert "volume unmounted vol=testvol" in volume.log_file.read_text()
    volume.start()
    for seed in range(4):
        for path in (volume.mountpoint / f"c{seed}").iterdir():
            data = path.read_bytes()  # EIO here would be a torn block
            assert data == bytes([seed]) * len(data), path


def test_repeated_sigterm_still_unmounts(volume, tmp_path):
    # The first signal starts the stop; the others arrive while it syncs and unmounts.
    clients = [_start_client(_BUSY_CLIENT, volume.mountpoint, seed) for seed in range(2)]
    time.sleep(0.5)
    connection = _connection_number(volume.mountpoint)
    pid = volume.pid

    os.kill(pid, signal.SIGTERM)
    while process_alive(pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.001)
    exited = _wait_gone(pid)
    if not exited:
        _abort_connection(connection, tmp_path)
    _end_clients(clients)
    volume.pid = None

    assert exited
    assert not is_mounted(volume.mountpoint)
    assert "volume unmounted vol=testvol" in volume.log_file.read_text()


def test_kill_9_under_load_leaves_files_readable(volume, tmp_path):
    clients = [_start_client(_BUSY_CLIENT, volume.mountpoint, seed) for seed in range(4)]
    time.sleep(1)
    pid = volume.pid

    os.kill(pid, signal.SIGKILL)
    exited = _wait_gone(pid)
    _end_clients(clients)
    assert exited
    subprocess.run(["fusermount3", "-uz", str(volume.mountpoint)], check=True)

    volume.start()
    for seed in range(4):
        for path in (volume.mountpoint / f"c{seed}").iterdir():
            data = path.read_bytes()
            assert data == bytes([seed]) * len(data), path


def test_fusermount_busy_then_lazy_unmount_ends_process(volume):
    held = os.open(volume.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = subprocess.run(["fusermount3", "-u", str(volume.mountpoint)], capture_output=True, text=True)
        assert result.returncode != 0  # busy: a descriptor is open on the mount
        assert process_alive(volume.pid)
        assert os.listdir(held) == []

        subprocess.run(["fusermount3", "-uz", str(volume.mountpoint)], check=True)
        assert process_alive(volume.pid)  # the open directory keeps the filesystem
    finally:
        try:
            os.close(held)
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    assert _wait_gone(volume.pid)
    assert "volume unmounted vol=testvol" in volume.log_file.read_text()
    volume.pid = None


def _launch_mount_process(mount: FuseMount, *extra_args: str, read_status: bool = True):
    """Start ``python -m securevol.mount`` for *mount* and hand it the key; return it and the status pipe's read end.

    With *read_status* False the read end is closed before the start, and None is returned for it.
    """
    mount.backing.mkdir()
    mount.mountpoint.mkdir()
    key_read, key_write = os.pipe()
    ready_read, ready_write = os.pipe()
    if not read_status:
        os.close(ready_read)
        ready_read = None
    command = [sys.executable, "-m", "securevol.mount", *mount.command_args(), *extra_args,
               "--key-fd", str(key_read), "--ready-fd", str(ready_write)]
    process = subprocess.Popen(command, pass_fds=(key_read, ready_write), cwd=REPO, stderr=subprocess.DEVNULL)
    os.close(key_read)
    os.close(ready_write)
    os.write(key_write, KEY)
    os.close(key_write)
    return process, ready_read


def test_closed_ready_pipe_unmounts_and_exits(tmp_path):
    # No process reads the status line, so the FUSE process must take its mount down
    # again (pyfuse3.terminate from the readiness task) and exit.
    require_fuse()
    mount = FuseMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    launcher, _ = _launch_mount_process(mount, read_status=False)
    launcher.wait(timeout=30)

    deadline = time.monotonic() + EXIT_TIMEOUT
    while "volume unmounted" not in mount.log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert "mount abandoned vol=testvol: the ready pipe is closed" in mount.log_file.read_text()
        assert "volume unmounted vol=testvol" in mount.log_file.read_text()
        assert not is_mounted(mount.mountpoint)
    finally:
        mount.cleanup()


def _fuse_process_of(mountpoint) -> int | None:
    """Return the PID of the detached FUSE process serving *mountpoint*, found by its arguments.

    Other processes carry the same arguments for a moment: the launcher that
    this test process started, until it forks and exits, and a child the
    launcher forks at import to run ldconfig, until it execs (trio looks up
    libpthread). Only the detached process leads its own session.
    """
    target = os.fsencode(str(mountpoint))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            session = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[3])
        except OSError:
            continue
        if b"securevol.mount" in argv and target in argv and session == int(entry):
            return int(entry)
    return None


@pytest.mark.parametrize("attempt", range(5))
def test_sigterm_as_mount_appears_unmounts(tmp_path, attempt):
    # The signal arrives before the request loop listens for it. Its default
    # action would end the process and leave a mount that no process serves
    # (seen in 6 of 10 tries before the signals were held back).
    require_fuse()
    mount = FuseMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    start_errors: list[Exception] = []

    def start() -> None:
        try:
            mount.start()
        except MountFailed as exc:
            start_errors.append(exc)  # the stop may come before the ready line

    starter = threading.Thread(target=start)
    starter.start()
    pid = None
    deadline = time.monotonic() + EXIT_TIMEOUT
    while pid is None and time.monotonic() < deadline:
        if is_mounted(mount.mountpoint):
            pid = _fuse_process_of(mount.mountpoint)
    try:
        assert pid is not None, "the FUSE process did not mount in time"
        os.kill(pid, signal.SIGTERM)
        starter.join()

        assert _wait_gone(pid)
        assert not is_mounted(mount.mountpoint)
        assert "volume unmounted vol=testvol" in mount.log_file.read_text()
    finally:
        starter.join()
        mount.pid = pid
        mount.cleanup()


# Large enough that replaying it keeps a FUSE process in start-up for a few
# hundred milliseconds on the 2-CPU test machine.
_REPLAY_BYTES = 128 << 20


def _leave_active_journal_record(backing) -> None:
    """Leave an active journal record that rewrites the only file with its own ciphertext."""
    [name] = [entry for entry in os.listdir(backing) if not names.is_reserved(entry)]
    path = backing / name
    root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY)
    record = journal.Journal(root_fd, "testvol")
    try:
        record._sequence += 1
        body = journal._encode_body(record._sequence, path.stat().st_ino, name, [WriteOp(0, path.read_bytes())])
        journal._pwritev_all(record._fd, body, journal.BODY_OFFSET)
        record._write_control(journal._ACTIVE, sum(len(part) for part in body))
    finally:
        record.close()
        os.close(root_fd)


def _holds_back_stop_signals(pid: int) -> bool:
    """Tell whether process *pid* blocks SIGTERM and SIGINT, which it does from the start of serving."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    [blocked] = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk:")]
    stop_bits = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    return blocked & stop_bits == stop_bits


def _freeze(pid: int) -> None:
    """Stop process *pid* with SIGSTOP and wait until it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while _process_state(pid) != "T":
        assert time.monotonic() < deadline, "the FUSE process did not stop"
        time.sleep(0.01)


def _process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _signal_pending(pid: int, signum: int) -> bool:
    """Tell whether *signum* waits, undelivered, for process *pid* or one of its threads."""
    bit = 1 << (signum - 1)
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    pending = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & bit for mask in pending)


def test_sigterm_during_start_reports_no_ready(tmp_path):
    # The signal is held back while the process replays its journal, and
    # begins the stop as soon as the loop runs. A "ready" line then would have
    # the daemon hand Docker a mountpoint that is about to be a plain directory.
    require_fuse()
    mount = FuseMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    mount.start()
    (mount.mountpoint / "big").write_bytes(os.urandom(_REPLAY_BYTES))
    mount.stop()
    _leave_active_journal_record(mount.backing)
    start_errors: list[Exception] = []

    def start() -> None:
        try:
            mount.start()
        except MountFailed as exc:
            start_errors.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    pid = None
    deadline = time.monotonic() + EXIT_TIMEOUT
    while pid is None and time.monotonic() < deadline:
        candidate = _fuse_process_of(mount.mountpoint)
        if candidate is not None and _holds_back_stop_signals(candidate):
            pid = candidate
    try:
        assert pid is not None, "the FUSE process did not start serving in time"
        # Frozen, the process cannot finish the replay between the check and
        # the signal, so the signal is surely held back when the loop starts.
        _freeze(pid)
        try:
            assert not is_mounted(mount.mountpoint), "the journal replay ended before the signal"
            os.kill(pid, signal.SIGTERM)
            assert _signal_pending(pid, signal.SIGTERM)
        finally:
            os.kill(pid, signal.SIGCONT)
        starter.join()

        assert mount.pid is None, "the FUSE process reported ready after a stop was requested"
        assert "stopped before it was ready" in str(start_errors[0])
        assert _wait_gone(pid)
        assert not is_mounted(mount.mountpoint)
        log_text = mount.log_file.read_text()
        assert "journal replayed" in log_text
        assert "mount abandoned vol=testvol: stop requested before it was ready" in log_text
    finally:
        starter.join()
        mount.pid = pid
        mount.cleanup()


def test_signals_after_unmount_keep_exit_status_zero(tmp_path):
    # Python's shutdown restores the default action of signals that have a
    # Python handler; a stop signal arriving then ended the process with it.
    require_fuse()
    mount = FuseMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fuse.log")
    process, ready_read = _launch_mount_process(mount, "--foreground")
    try:
        with os.fdopen(ready_read) as ready:
            assert ready.readline().startswith("ready ")

        subprocess.run(["fusermount3", "-u", str(mount.mountpoint)], check=True)
        while process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGINT)
            time.sleep(0.001)

        assert process.returncode == 0
        assert "volume unmounted vol=testvol" in mount.log_file.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        mount.cleanup()
