"""A hypothesis state machine that runs the same file operations on a securevol mount and a plain directory.

After every step the two trees must hold the same names, sizes, link counts
and bytes. Open handles live across steps, so writes through a handle of a
renamed, hard-linked or unlinked file, and remounts, are covered too.
"""

import errno
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.fs_helpers import FuseMount, require_fuse, tree_snapshot

NAMES = ["a", "b", "c", "dir/d", "dir/" + "long" * 50]
offsets = st.one_of(st.integers(0, 20_000), st.sampled_from([0, 4095, 4096, 4097, 8192]), st.just(5 * 2**20))
lengths = st.one_of(st.integers(1, 10_000), st.sampled_from([1, 4096, 4097]))


class MountVersusPlain(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        require_fuse()
        self.tmp = Path(tempfile.mkdtemp(prefix="securevol-model-"))
        self.plain = self.tmp / "plain"
        self.mount = FuseMount(self.tmp / "backing", self.tmp / "mnt", self.tmp / "fuse.log")
        self.mount.start()
        for root in self.roots:
            (root / "dir").mkdir(parents=True, exist_ok=True)
        self.handles: dict[str, tuple[int, int]] = {}

    @property
    def roots(self) -> tuple[Path, Path]:
        return self.plain, self.mount.mountpoint

    def teardown(self):
        self._close_handles()
        self.mount.cleanup()
        errors = self.mount.log_lines("ERROR")
        shutil.rmtree(self.tmp)
        assert errors == []

    # --- helpers ---------------------------------------------------------------------------------

    def _both(self, function, *args):
        """Run *function(root, *args)* on both trees; both must succeed or fail with the same errno."""
        outcomes = []
        for root in self.roots:
            try:
                outcomes.append(("ok", function(root, *args)))
            except OSError as exc:
                outcomes.append(("error", errno.errorcode.get(exc.errno, exc.errno)))
        assert outcomes[0] == outcomes[1]
        return outcomes[0]

    def _fds(self, name: str) -> tuple[int, int] | None:
        return self.handles.get(name)

    def _close_handles(self):
        for fds in self.handles.values():
            for fd in fds:
                os.close(fd)
        self.handles.clear()

    # --- rules -----------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), offset=offsets, length=lengths, fill=st.integers(0, 255))
    def write(self, name, offset, length, fill):
        data = bytes([fill]) * length
        fds = self._fds(name)
        if fds is not None:
            assert [os.pwrite(fd, data, offset) for fd in fds] == [length, length]
            return

        def write_at(root):
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        self._both(write_at)

    @rule(name=st.sampled_from(NAMES), size=offsets)
    def truncate(self, name, size):
        fds = self._fds(name)
        if fds is not None:
            for fd in fds:
                os.ftruncate(fd, size)
            return
        self._both(lambda root: os.truncate(root / name, size))

    @rule(name=st.sampled_from(NAMES), offset=st.integers(0, 20_000), length=st.integers(1, 20_000))
    def fallocate(self, name, offset, length):
        def allocate(root):
            fd = os.open(root / name, os.O_RDWR)
            try:
                os.posix_fallocate(fd, offset, length)
            finally:
                os.close(fd)

        self._both(allocate)

    @rule(source=st.sampled_from(NAMES), destination=st.sampled_from(NAMES))
    def rename(self, source, destination):
        outcome = self._both(lambda root: os.rename(root / source, root / destination))
        if outcome[0] == "ok" and source != destination and source in self.handles:
            replaced = self.handles.pop(destination, None)
            self.handles[destination] = self.handles.pop(source)
            if replaced is not None:
                self.handles[f"replaced-{destination}-{id(replaced)}"] = replaced

    @rule(source=st.sampled_from(NAMES), destination=st.sampled_from(NAMES))
    def link(self, source, destination):
        self._both(lambda root: os.link(root / source, root / destination))

    @rule(name=st.sampled_from(NAMES))
    def unlink(self, name):
        self._both(lambda root: os.unlink(root / name))

    @rule(name=st.sampled_from(NAMES))
    def open_handle(self, name):
        if name in self.handles:
            return
        fds, errors = [], []
        for root in self.roots:
            try:
                fds.append(os.open(root / name, os.O_RDWR))
            except OSError as exc:
                errors.append(exc.errno)
        if errors:
            for fd in fds:
                os.close(fd)
            assert errors == [errno.ENOENT, errno.ENOENT]
            return
        self.handles[name] = (fds[0], fds[1])

    @precondition(lambda self: self.handles)
    @rule()
    def reopen(self):
        self._close_handles()

    @rule()
    def remount(self):
        self._close_handles()
        self.mount.stop()
        self.mount.start()

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def trees_match(self):
        assert tree_snapshot(self.mount.mountpoint) == tree_snapshot(self.plain)
        for name in NAMES:
            stats = []
            for root in self.roots:
                try:
                    st_ = (root / name).stat()
                    stats.append((st_.st_size, st_.st_nlink))
                except FileNotFoundError:
                    stats.append(None)
            assert stats[0] == stats[1]

    @invariant()
    def open_handles_match(self):
        for fds in self.handles.values():
            sizes = [os.fstat(fd).st_size for fd in fds]
            assert sizes[0] == sizes[1]
            assert os.pread(fds[0], sizes[0] + 1, 0) == os.pread(fds[1], sizes[1] + 1, 0)


MountVersusPlain.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
TestMountVersusPlain = MountVersusPlain.TestCase
