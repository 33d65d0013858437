"""Tests of the redo journal: a process killed in the middle of a change leaves each block old or new.

Each crash test forks a child that starts a real journaled change on real
files and SIGKILLs itself at the worst moment. The parent then recovers as the
next FUSE process would, and decrypts every block.
"""

import os
import random
import struct
import signal
from pathlib import Path

import pytest

from securevol import contents
from securevol import format as fmt
from securevol import journal as journal_module
from securevol.contents import EncryptedContents, TruncateOp, WriteOp
from securevol.journal import Journal

KEY = bytes(range(32))
B = fmt.BLOCK_SIZE  # plaintext bytes per full block
C = fmt.CIPHER_BLOCK_SIZE


@pytest.fixture
def backing(tmp_path):
    root = tmp_path / "backing"
    root.mkdir()
    (root / "dir").mkdir()
    return root


def open_root(root: Path) -> int:
    return os.open(root, os.O_PATH | os.O_DIRECTORY)


def make_file(root: Path, data: bytes) -> Path:
    """Write *data* as an encrypted file under root/dir without a journal; return its path."""
    path = root / "dir" / "target"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        EncryptedContents(fmt.ContentCipher(KEY)).write(fd, 0, data)
    finally:
        os.close(fd)
    return path


def read_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDWR)
    try:
        return bytes(EncryptedContents(fmt.ContentCipher(KEY)).read(fd, 0, 1 << 30))
    finally:
        os.close(fd)


def crash_during(root: Path, path: Path, change, tear) -> None:
    """In a child process, make *change* through a Journal, with *tear* replacing one step; the child SIGKILLs itself."""
    pid = os.fork()
    if pid == 0:
        try:
            tear()
            root_fd = open_root(root)
            store = EncryptedContents(fmt.ContentCipher(KEY), Journal(root_fd, "test").apply)
            fd = os.open(path, os.O_RDWR)
            change(store, fd)
        finally:
            os._exit(3)  # only reached if the tear did not kill the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL


def tear_target_write(after_bytes: int):
    """Return a patch that lets the first backing write of a change land only partly, then kills the process."""

    def patch():
        def torn_apply(fd, ops):
            op = ops[0]
            assert isinstance(op, WriteOp)
            os.pwrite(fd, op.data[:after_bytes], op.offset)
            os.kill(os.getpid(), signal.SIGKILL)

        journal_module.apply_ops = torn_apply

    return patch


def tear_journal_body(after_bytes: int):
    """Return a patch that lets the journal record itself land only partly, then kills the process."""

    def patch():
        def torn_pwritev_all(fd, parts, offset):
            os.pwrite(fd, b"".join(parts)[:after_bytes], offset)
            os.kill(os.getpid(), signal.SIGKILL)

        journal_module._pwritev_all = torn_pwritev_all

    return patch


def recover(root: Path) -> bool:
    root_fd = open_root(root)
    journal = Journal(root_fd, "test")
    try:
        return journal.recover()
    finally:
        journal.close()
        os.close(root_fd)


@pytest.mark.parametrize("after_bytes", [1, journal_module.PAGE_SIZE - 24, 5000, 3 * C + 7])
def test_torn_write_is_redone(backing, after_bytes):
    old = random.Random(1).randbytes(8 * B)
    new = random.Random(2).randbytes(5 * B)
    path = make_file(backing, old)

    crash_during(backing, path, lambda store, fd: store.write(fd, B + 100, new), tear_target_write(after_bytes))

    assert recover(backing) is True
    assert read_file(path) == old[: B + 100] + new + old[B + 100 + len(new) :]
    assert recover(backing) is False


def test_torn_write_through_other_link_is_redone(backing):
    """The descriptor's own name is gone, another hard link remains: the record names a temporary link."""
    old = random.Random(8).randbytes(4 * B)
    new = random.Random(9).randbytes(2 * B)
    path = make_file(backing, old)
    other = backing / "dir" / "other"

    def change(store, fd):
        os.link(path, other)
        os.unlink(path)
        store.write(fd, 100, new)

    crash_during(backing, path, change, tear_target_write(5000))

    assert (backing / journal_module.TARGET_LINK_NAME).exists()
    assert recover(backing) is True
    assert read_file(other) == old[:100] + new + old[100 + len(new) :]
    assert not (backing / journal_module.TARGET_LINK_NAME).exists()
    assert other.stat().st_nlink == 1


def test_write_through_other_link_leaves_no_link(backing):
    path = make_file(backing, random.Random(10).randbytes(3 * B))
    other = backing / "dir" / "other"
    root_fd = open_root(backing)
    journal = Journal(root_fd, "test")
    fd = os.open(path, os.O_RDWR)
    try:
        os.link(path, other)
        os.unlink(path)
        EncryptedContents(fmt.ContentCipher(KEY), journal.apply).write(fd, 100, bytes(2 * B))
    finally:
        os.close(fd)
        journal.close()
        os.close(root_fd)

    assert not (backing / journal_module.TARGET_LINK_NAME).exists()
    assert other.stat().st_nlink == 1
    assert read_file(other)[100 : 100 + 2 * B] == bytes(2 * B)


def test_torn_growth_is_redone(backing):
    old = random.Random(3).randbytes(B + 10)
    path = make_file(backing, old)

    # Growing pads the old partial block, then writes past the end: two backing writes.
    crash_during(backing, path, lambda store, fd: store.write(fd, 3 * B, b"far"), tear_target_write(3000))

    assert recover(backing) is True
    assert read_file(path) == old + bytes(3 * B - len(old)) + b"far"


def test_torn_shrink_is_redone(backing):
    old = random.Random(4).randbytes(6 * B)
    path = make_file(backing, old)

    crash_during(backing, path, lambda store, fd: store.truncate(fd, 2 * B + 5), tear_target_write(1000))

    assert recover(backing) is True
    assert read_file(path) == old[: 2 * B + 5]


def test_torn_append_is_undone(backing):
    old = random.Random(7).randbytes(3 * B)
    path = make_file(backing, old)
    before = path.read_bytes()

    # Only new blocks past the end: the journal keeps the old size, not the data.
    crash_during(backing, path, lambda store, fd: store.write(fd, 3 * B, bytes(5 * B)), tear_target_write(9000))

    assert recover(backing) is True
    assert path.read_bytes() == before
    assert read_file(path) == old


def test_torn_first_write_of_new_file_is_undone(backing):
    path = make_file(backing, b"")

    crash_during(backing, path, lambda store, fd: store.write(fd, 0, bytes(3 * B)), tear_target_write(6000))

    assert recover(backing) is True
    assert path.stat().st_size == 0


def test_torn_record_leaves_file_untouched(backing):
    old = random.Random(5).randbytes(4 * B)
    path = make_file(backing, old)
    before = path.read_bytes()

    crash_during(backing, path, lambda store, fd: store.write(fd, 0, bytes(3 * B)), tear_journal_body(2000))

    assert recover(backing) is False
    assert path.read_bytes() == before
    assert read_file(path) == old


def test_replaced_target_not_touched(backing):
    old = random.Random(6).randbytes(3 * B)
    path = make_file(backing, old)
    crash_during(backing, path, lambda store, fd: store.write(fd, 0, bytes(2 * B)), tear_target_write(10))
    os.rename(path, backing / "dir" / "moved")
    replacement = make_file(backing, b"a different file")

    assert recover(backing) is True
    assert read_file(replacement) == b"a different file"


def test_atomic_changes_skip_the_journal(backing):
    root_fd = open_root(backing)
    journal = Journal(root_fd, "test")
    path = make_file(backing, b"small")
    fd = os.open(path, os.O_RDWR)
    journal_file = backing / journal_module.FILE_NAME

    def records_written() -> int:
        _magic, _state, sequence, _body_len = struct.unpack(">4sIQQ", journal_file.read_bytes()[:24])
        return sequence

    try:
        journal.apply(fd, [WriteOp(30, b"within one page")])
        journal.apply(fd, [TruncateOp(100)])
        assert records_written() == 0
        journal.apply(fd, [WriteOp(4000, bytes(200))])
        assert records_written() == 1
    finally:
        os.close(fd)
        journal.close()
        os.close(root_fd)


def test_journal_is_a_reserved_name():
    from securevol import names

    assert names.is_reserved(journal_module.FILE_NAME)
    assert not names.is_long_name(journal_module.FILE_NAME)


def test_apply_ops_in_order(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        contents.apply_ops(fd, [WriteOp(0, b"abcdef"), TruncateOp(3), WriteOp(5, b"x")])
    finally:
        os.close(fd)

    assert path.read_bytes() == b"abc\0\0x"


def test_failed_change_repaired_at_once(backing, monkeypatch):
    # A change that fails half way (here an EIO after its first op) is carried
    # out again from its record right away, and the record is retired.
    root_fd = open_root(backing)
    journal = Journal(root_fd, "test")
    # Plain bytes: the journal copies backing bytes and does not read the format.
    path = backing / "dir" / "first"
    path.write_bytes(bytes(20_000))
    fd = os.open(path, os.O_RDWR)
    calls: list[int] = []
    fail_once_after_first_op = failing_once_after_first_op(calls)

    try:
        monkeypatch.setattr(journal_module, "apply_ops", fail_once_after_first_op)
        with pytest.raises(OSError):
            journal.apply(fd, [WriteOp(0, b"a" * 5000), WriteOp(10_000, b"b" * 5000)])
    finally:
        os.close(fd)
        journal.close()
        os.close(root_fd)

    assert calls == [2, 2]
    assert path.read_bytes()[:5000] == b"a" * 5000
    assert path.read_bytes()[10_000:15_000] == b"b" * 5000
    # Nothing is left to redo at the next mount.
    assert control_state(backing) == 0


def test_failed_repair_retires_record(backing, monkeypatch):
    # When the repair fails too, the record is retired all the same: redone
    # later, it could write old data over what changed since.
    root_fd = open_root(backing)
    journal = Journal(root_fd, "test")
    path = backing / "dir" / "first"
    path.write_bytes(bytes(20_000))
    fd = os.open(path, os.O_RDWR)

    try:
        monkeypatch.setattr(journal_module, "apply_ops", fail_with_eio)
        with pytest.raises(OSError):
            journal.apply(fd, [WriteOp(0, b"a" * 5000), WriteOp(10_000, b"b" * 5000)])
    finally:
        os.close(fd)
        journal.close()
        os.close(root_fd)

    assert control_state(backing) == 0
    assert path.read_bytes() == bytes(20_000)


def control_state(backing: Path) -> int:
    """Return the journal's state: 0 idle, 1 active."""
    _magic, state, _sequence, _body_len = struct.unpack(">4sIQQ", (backing / journal_module.FILE_NAME).read_bytes()[:24])
    return state


def test_unretired_record_stops_changes(backing, monkeypatch):
    # If the record cannot be marked idle, its redo at the next mount could
    # overwrite later changes, so no change is allowed until then.
    root_fd = open_root(backing)
    journal = Journal(root_fd, "test")
    path = backing / "dir" / "first"
    path.write_bytes(bytes(20_000))
    fd = os.open(path, os.O_RDWR)
    real_write_control = Journal._write_control

    def fail_idle(self, state, body_len):
        if state == 0:
            raise OSError(5, "Input/output error")
        real_write_control(self, state, body_len)

    try:
        monkeypatch.setattr(Journal, "_write_control", fail_idle)
        with pytest.raises(OSError):
            journal.apply(fd, [WriteOp(0, b"a" * 5000), WriteOp(10_000, b"b" * 5000)])
        monkeypatch.setattr(Journal, "_write_control", real_write_control)

        with pytest.raises(OSError, match="remount the volume"):
            journal.apply(fd, [TruncateOp(0)])
        with pytest.raises(OSError, match="remount the volume"):
            journal.check_usable()
    finally:
        os.close(fd)
        journal.close()
        os.close(root_fd)

    assert path.stat().st_size == 20_000
    assert control_state(backing) == 1


def test_redo_skips_fifo_with_same_inode(backing):
    # ext4 reuses inode numbers: a FIFO that took the target's name and inode
    # must neither receive the redo nor stop the mount.
    fifo = backing / "dir" / "reused"
    os.mkfifo(fifo)
    write_active_record(backing, "dir/reused", fifo.stat().st_ino, [WriteOp(0, b"x" * 5000)])

    root_fd = open_root(backing)
    try:
        journal = Journal(root_fd, "test")
        assert journal.recover() is True
        journal.close()
    finally:
        os.close(root_fd)

    assert control_state(backing) == 0


def write_active_record(backing: Path, path: str, ino: int, ops: list) -> None:
    """Write a journal record for *ops* on *path* and mark it active, as a process killed during the change leaves it."""
    body = b"".join(bytes(part) for part in journal_module._encode_body(1, ino, path, ops))
    journal_file = backing / journal_module.FILE_NAME
    with open(journal_file, "wb") as f:
        f.write(struct.pack(">4sIQQ", b"SVJ1", 1, 1, len(body)))
        f.seek(journal_module.BODY_OFFSET)
        f.write(body)


def test_failed_change_removes_target_link(backing, monkeypatch):
    # A file whose opened name was removed while another link remains is
    # journaled through a temporary link, which must not outlive a failed change.
    first = backing / "dir" / "first"
    first.write_bytes(bytes(20_000))
    os.link(first, backing / "dir" / "second")
    root_fd = open_root(backing)
    journal = Journal(root_fd, "test")
    fd = os.open(first, os.O_RDWR)
    first.unlink()

    try:
        monkeypatch.setattr(journal_module, "apply_ops", fail_with_eio)
        with pytest.raises(OSError):
            journal.apply(fd, [WriteOp(0, b"a" * 5000), WriteOp(10_000, b"b" * 5000)])
    finally:
        os.close(fd)
        journal.close()
        os.close(root_fd)

    assert not (backing / journal_module.TARGET_LINK_NAME).exists()
    assert (backing / "dir" / "second").stat().st_nlink == 1


def test_failed_change_of_unlinked_file_repaired(backing, monkeypatch):
    # A file without a name is changed without a record, and is repaired from its ops all the same.
    path = backing / "dir" / "gone"
    path.write_bytes(bytes(20_000))
    root_fd = open_root(backing)
    journal = Journal(root_fd, "test")
    fd = os.open(path, os.O_RDWR)
    path.unlink()
    calls: list[int] = []
    fail_once_after_first_op = failing_once_after_first_op(calls)

    try:
        monkeypatch.setattr(journal_module, "apply_ops", fail_once_after_first_op)
        with pytest.raises(OSError):
            journal.apply(fd, [WriteOp(0, b"a" * 5000), WriteOp(10_000, b"b" * 5000)])
        assert calls == [2, 2]
        assert os.pread(fd, 5000, 10_000) == b"b" * 5000
    finally:
        os.close(fd)
        journal.close()
        os.close(root_fd)


def failing_once_after_first_op(calls: list[int]):
    """Return a replacement of apply_ops that stops with EIO after the first op of its first call.

    Each call appends its number of ops to *calls*.
    """
    real_apply_ops = journal_module.apply_ops

    def apply_ops(target_fd, ops):
        calls.append(len(ops))
        if len(calls) == 1:
            real_apply_ops(target_fd, ops[:1])
            raise OSError(5, "Input/output error")
        real_apply_ops(target_fd, ops)

    return apply_ops


def fail_with_eio(target_fd, ops):
    """Stand in for apply_ops on a disk that fails every write."""
    raise OSError(5, "Input/output error")
