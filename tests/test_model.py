"""Model-based test of the FUSE filesystem: random operations on a securevol mount and on a plain directory.

A hypothesis state machine applies each operation to both trees and asserts
that both return the same result or fail with the same errno. After every
step the two trees must hold the same names, types, modes, link counts, sizes,
contents and user.* extended attributes. Remounting drops the kernel's page cache, so later reads come
from the ciphertext in the backing store. Whenever the volume is unmounted,
and once more after the run, the backing store must contain none of the
names, link targets or file data written through the mount.
"""

import ctypes
import errno
import hashlib
import mmap
import os
import random
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from securevol import format as fmt
from tests.fs_helpers import FuseMount, backing_bytes

BLOCK = fmt.BLOCK_SIZE

# Names are long and distinctive so that the leak check cannot match them by
# chance. The 246-byte name is stored as a long name (hashed name plus a side
# record) in the backing store, the others directly.
NAMES = ["alpha-name", "bravo-name", "charlie-name", "delta-" + "l" * 240]
# Directories that exist when an example starts. Rules may remove, rename or replace them.
INITIAL_DIRS = ["alpha-name", "alpha-name/bravo-name"]
PARENTS = ["", "", *INITIAL_DIRS]
XATTR_NAMES = ["user.echo-attribute", "user.foxtrot-attribute"]

# Offsets and sizes around block boundaries, plus anything up to a few blocks and far past the end.
BOUNDARIES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK, 3 * BLOCK + 5, 16 * BLOCK, 50_000]
OFFSETS = st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, 4 * BLOCK))
LENGTHS = st.one_of(st.sampled_from([1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK]), st.integers(1, 3 * BLOCK))
SIZES = st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, 4 * BLOCK))

PATHS = st.builds(lambda parent, name: f"{parent}/{name}".lstrip("/"), st.sampled_from(PARENTS), st.sampled_from(NAMES))
MODES = st.sampled_from([0o600, 0o640, 0o644, 0o700, 0o755, 0o444])
SEEDS = st.integers(0, 2**32 - 1)
MAX_OPEN_HANDLES = 4

# renameat2(2) and fallocate(2) flags from <linux/fs.h> and <linux/falloc.h>.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOCATE_MODES = [0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE]

# Written data shorter than this is too likely to appear in ciphertext by chance to be searched for.
MIN_LEAK_NEEDLE = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _checked(result: int) -> int:
    if result == -1:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return result


def renameat2(old: Path, new: Path, flags: int) -> None:
    _checked(_libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags))  # -100 is AT_FDCWD


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _checked(_libc.fallocate(fd, mode, offset, length))


def outcome(function: Callable, *args) -> tuple:
    """Call *function* and return ("ok", its result) or ("error", errno name), so two trees can be compared."""
    try:
        return ("ok", function(*args))
    except OSError as exc:
        return ("error", errno.errorcode.get(exc.errno, exc.errno))


def model_snapshot(root: Path) -> dict[str, tuple]:
    """Describe every entry under *root*: type, mode bits, link count, size, content digest and user.* xattrs.

    Unlike tests.fs_helpers.tree_snapshot it records the link count of files,
    because the model makes hard links.
    """
    snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            relative = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                snapshot[relative] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                snapshot[relative] = ("dir", stat.S_IMODE(info.st_mode), user_xattrs(path))
            else:
                data = path.read_bytes()
                snapshot[relative] = (
                    "file",
                    stat.S_IMODE(info.st_mode),
                    info.st_nlink,
                    info.st_size,
                    len(data),
                    hashlib.sha256(data).hexdigest(),
                    user_xattrs(path),
                )
    return snapshot


def user_xattrs(path: Path) -> list[tuple[str, bytes]]:
    """Return the user.* extended attributes of *path* (not following symlinks) with their values."""
    names = sorted(name for name in os.listxattr(path, follow_symlinks=False) if name.startswith("user."))
    return [(name, os.getxattr(path, name, follow_symlinks=False)) for name in names]


def first_difference(mounted: dict, plain: dict) -> str:
    """Describe the first entry in which two snapshots differ, for assertion messages."""
    for key in sorted(set(mounted) | set(plain)):
        if mounted.get(key) != plain.get(key):
            return f"{key!r}: mount has {mounted.get(key)}, plain directory has {plain.get(key)}"
    return "no difference"


class ModelMount(FuseMount):
    """A FuseMount that logs at INFO: DEBUG lines for every request would slow hundreds of steps down."""

    def command_args(self) -> list[str]:
        args = super().command_args()
        args[args.index("--log-level") + 1] = "INFO"
        return args


class FewDescriptorsModelMount(ModelMount):
    """A ModelMount whose FUSE process keeps at most two descriptors of known inodes.

    Every file and symlink beyond them has its descriptor closed early and is
    reopened by its backing name, so renames, links and unlinks must keep
    those names right (securevol.inodes).
    """

    def command_args(self) -> list[str]:
        return [*super().command_args(), "--inode-descriptors", "2"]


class Written:
    """Names and data samples written through the mount, which the backing store must not contain."""

    def __init__(self) -> None:
        self.needles: set[bytes] = {name.encode() for name in NAMES + XATTR_NAMES}

    def add_data(self, data: bytes) -> None:
        if len(data) >= MIN_LEAK_NEEDLE:
            self.needles.add(data[:32])
            self.needles.add(data[-32:])

    def leaks_in(self, backing: Path) -> list[bytes]:
        stored = backing_bytes(backing)
        return sorted(needle for needle in self.needles if needle in stored)


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


class MountModel(RuleBasedStateMachine):
    """Random operations applied to a securevol mount and to a plain directory, compared step by step.

    Subclasses set ``workdir`` (a directory for this run), ``finished``
    (a list that receives each example's ModelMount and Written record) and
    ``mount_class`` (ModelMount or a subclass).
    """

    workdir: Path
    finished: list
    mount_class: type

    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="model-", dir=self.workdir))
        self.plain = self.base / "plain"
        self.plain.mkdir()
        for directory in INITIAL_DIRS:
            (self.plain / directory).mkdir()
        self.volume = self.mount_class(self.base / "backing", self.base / "mnt", self.base / "fuse.log")
        try:
            self.volume.start()
        except BaseException:
            self.volume.cleanup()
            raise
        for directory in INITIAL_DIRS:
            (self.mnt / directory).mkdir()
        self.written = Written()
        # Pairs of descriptors of the same file: (on the mount, in the plain directory).
        self.handles: list[tuple[int, int]] = []

    @property
    def mnt(self) -> Path:
        return self.volume.mountpoint

    def both(self, function: Callable[[Path], object]) -> object:
        """Run *function* on the mount's root, then on the plain root, and assert that both outcomes are equal."""
        mounted = outcome(function, self.mnt)
        plain = outcome(function, self.plain)
        assert mounted == plain, f"mount returned {mounted}, plain directory returned {plain}{self.log_errors()}"
        return mounted

    def both_handles(self, index: int, function: Callable[[int], object]) -> object:
        mounted_fd, plain_fd = self.handles[index % len(self.handles)]
        mounted = outcome(function, mounted_fd)
        plain = outcome(function, plain_fd)
        assert mounted == plain, f"mount returned {mounted}, plain directory returned {plain}{self.log_errors()}"
        return mounted

    def log_errors(self) -> str:
        """Return the volume log's ERROR lines as the tail of an assertion message."""
        errors = self.volume.log_lines("ERROR")
        return "\nvolume log ERROR lines:\n" + "\n".join(errors[-5:]) if errors else ""

    # --- whole files by path ----------------------------------------------------------------------

    @rule(path=PATHS, offset=OFFSETS, length=LENGTHS, seed=SEEDS)
    def write(self, path, offset, length, seed):
        data = pattern(seed, length)
        self.written.add_data(data)

        def write_at(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        self.both(write_at)

    @rule(path=PATHS, seed=SEEDS, length=LENGTHS)
    def append(self, path, seed, length):
        data = pattern(seed, length)
        self.written.add_data(data)

        def append_to(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both(append_to)

    @rule(path=PATHS, size=SIZES)
    def truncate(self, path, size):
        self.both(lambda root: os.truncate(root / path, size))

    @rule(path=PATHS, offset=OFFSETS, length=LENGTHS)
    def posix_fallocate(self, path, offset, length):
        def allocate(root: Path) -> None:
            fd = os.open(root / path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, offset, length)
            finally:
                os.close(fd)

        self.both(allocate)

    @rule(path=PATHS, mode=st.sampled_from(FALLOCATE_MODES), offset=OFFSETS, length=LENGTHS)
    def fallocate(self, path, mode, offset, length):
        def allocate(root: Path) -> None:
            fd = os.open(root / path, os.O_RDWR)
            try:
                fallocate(fd, mode, offset, length)
            finally:
                os.close(fd)

        self.both(allocate)

    @rule(path=PATHS, mode=MODES)
    def chmod(self, path, mode):
        self.both(lambda root: os.chmod(root / path, mode))

    @rule(
        path=PATHS,
        name=st.sampled_from(XATTR_NAMES),
        seed=SEEDS,
        length=st.integers(0, 300),
        flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]),
    )
    def set_xattr(self, path, name, seed, length, flags):
        value = pattern(seed, length)
        self.written.add_data(value)
        self.both(lambda root: os.setxattr(root / path, name, value, flags))

    @rule(path=PATHS, name=st.sampled_from(XATTR_NAMES))
    def remove_xattr(self, path, name):
        self.both(lambda root: os.removexattr(root / path, name))

    # --- names ------------------------------------------------------------------------------------

    # Name operations mostly fail on a path that does not exist. One rule for
    # all of them keeps their share of the steps smaller than that of writes.
    # "target" is a keyword argument of hypothesis' @rule, hence "destination".
    @rule(
        operation=st.sampled_from(["mkdir", "rmdir", "unlink", "rename", "link", "symlink"]),
        source=PATHS,
        destination=PATHS,
        flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
    )
    def change_names(self, operation, source, destination, flags):
        operations = {
            "mkdir": lambda root: os.mkdir(root / source, 0o755),
            "rmdir": lambda root: os.rmdir(root / source),
            "unlink": lambda root: os.unlink(root / source),
            "rename": lambda root: renameat2(root / source, root / destination, flags),
            "link": lambda root: os.link(root / source, root / destination, follow_symlinks=False),
            "symlink": lambda root: os.symlink(os.path.basename(source), root / destination),
        }
        self.both(operations[operation])

    # --- open descriptors -------------------------------------------------------------------------

    @precondition(lambda self: len(self.handles) < MAX_OPEN_HANDLES)
    @rule(path=PATHS, create=st.booleans())
    def open_handle(self, path, create):
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        mounted = outcome(os.open, self.mnt / path, flags, 0o644)
        plain = outcome(os.open, self.plain / path, flags, 0o644)
        if mounted[0] == "ok" and plain[0] == "ok":
            self.handles.append((mounted[1], plain[1]))
            return
        for kind, value in (mounted, plain):
            if kind == "ok":
                os.close(value)
        assert mounted == plain, f"mount returned {mounted}, plain directory returned {plain}{self.log_errors()}"

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_OPEN_HANDLES - 1), offset=OFFSETS, length=LENGTHS, seed=SEEDS)
    def handle_write(self, index, offset, length, seed):
        data = pattern(seed, length)
        self.written.add_data(data)
        self.both_handles(index, lambda fd: os.pwrite(fd, data, offset))

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_OPEN_HANDLES - 1), offset=OFFSETS, length=LENGTHS, seed=SEEDS)
    def handle_mmap_write(self, index, offset, length, seed):
        data = pattern(seed, length)
        self.written.add_data(data)

        # A shared mapping cannot grow the file, so the write is clipped to the current size.
        def write_mapped(fd: int) -> int:
            size = os.fstat(fd).st_size
            start, end = min(offset, size), min(offset + length, size)
            if start < end:
                with mmap.mmap(fd, size) as mapping:
                    mapping[start:end] = data[: end - start]
                    mapping.flush()
            return end - start

        self.both_handles(index, write_mapped)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_OPEN_HANDLES - 1), offset=OFFSETS, length=LENGTHS)
    def handle_read(self, index, offset, length):
        self.both_handles(index, lambda fd: os.pread(fd, length, offset))

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_OPEN_HANDLES - 1), size=SIZES)
    def handle_truncate(self, index, size):
        self.both_handles(index, lambda fd: os.ftruncate(fd, size))

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_OPEN_HANDLES - 1))
    def handle_fsync_and_stat(self, index):
        self.both_handles(index, lambda fd: (os.fsync(fd), os.fstat(fd).st_size, os.fstat(fd).st_nlink))

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_OPEN_HANDLES - 1))
    def close_handle(self, index):
        mounted_fd, plain_fd = self.handles.pop(index % len(self.handles))
        os.close(mounted_fd)
        os.close(plain_fd)

    # --- the volume -------------------------------------------------------------------------------

    @rule()
    def remount(self):
        self.close_handles()
        self.volume.stop()
        self.check_backing_store()
        self.volume.start()

    def close_handles(self) -> None:
        for mounted_fd, plain_fd in self.handles:
            os.close(mounted_fd)
            os.close(plain_fd)
        self.handles.clear()

    def check_backing_store(self) -> None:
        leaks = self.written.leaks_in(self.volume.backing)
        assert leaks == [], f"backing store contains plaintext: {leaks[:3]}"
        errors = self.volume.log_lines("ERROR")
        assert errors == [], f"volume log has ERROR lines: {errors[:3]}"

    @invariant()
    def trees_match(self):
        try:
            mounted = model_snapshot(self.mnt)
        except OSError as exc:
            raise AssertionError(f"reading the mount failed: {exc!r}{self.log_errors()}") from exc
        plain = model_snapshot(self.plain)
        assert mounted == plain, first_difference(mounted, plain) + self.log_errors()

    def teardown(self):
        try:
            self.close_handles()
        finally:
            self.volume.cleanup()
        self.finished.append((self.volume, self.written))
        shutil.rmtree(self.plain)


def _require_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        message = "FUSE tests need root, /dev/fuse and fusermount3"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def run_model(workdir: Path, model_settings: settings, mount_class: type = ModelMount) -> None:
    """Run the state machine, then check every example's backing store and log once more."""
    _require_fuse()
    finished: list = []
    machine = type("Model", (MountModel,), {"workdir": workdir, "finished": finished, "mount_class": mount_class})

    run_state_machine_as_test(machine, settings=model_settings)

    assert finished, "the state machine ran no example"
    for volume, written in finished:
        leaks = written.leaks_in(volume.backing)
        assert leaks == [], f"backing store {volume.backing} contains plaintext: {leaks[:3]}"
        errors = volume.log_lines("ERROR")
        assert errors == [], f"volume log {volume.log_file} has ERROR lines: {errors[:3]}"


QUICK = settings(
    max_examples=20,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Sized to take a few minutes on a 2-core machine. Raise max_examples locally
# when changing the FUSE layer.
LONG = settings(QUICK, max_examples=30, stateful_step_count=80)


def test_model_matches_plain_directory(tmp_path):
    run_model(tmp_path, QUICK)


@pytest.mark.slow
def test_model_matches_plain_directory_long(tmp_path):
    run_model(tmp_path, LONG)


def test_model_with_descriptors_closed_early(tmp_path):
    run_model(tmp_path, QUICK, FewDescriptorsModelMount)
