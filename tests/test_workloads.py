"""Real programs on a real securevol mount: PostgreSQL, SQLite in WAL mode, git and tar.

Each test starts ``python -m securevol.mount`` on a private temporary
directory, runs the program's own consistency checks on the mount, remounts
(so that later reads decrypt the backing store instead of hitting the page
cache) and checks again. Where a marker is written, the backing store must
not contain it. Every server runs on a private Unix socket and is stopped by
its PID; teardown unmounts and fails the test on ERROR lines in the volume log.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.fs_helpers import FuseMount, backing_bytes, tree_snapshot

pytestmark = pytest.mark.slow

COMMAND_TIMEOUT = 300
SERVER_START_TIMEOUT = 60.0


def _require_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        message = "workload tests need root, /dev/fuse and fusermount3"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _require_program(path: str | None, package: str) -> str:
    if path is None or not os.path.exists(path):
        message = f"this workload needs the Debian package {package}: install it with scripts/setup.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class WorkloadMount(FuseMount):
    """A FuseMount that logs at INFO, because DEBUG lines for every request would slow the workloads down."""

    def command_args(self) -> list[str]:
        args = super().command_args()
        args[args.index("--log-level") + 1] = "INFO"
        return args

    def remount(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def workdir():
    """A private directory that other users may traverse (mode 0711) but not list.

    pytest's tmp_path lies under a 0700 directory, which the postgres user
    could not pass through to reach the mountpoint.
    """
    path = Path(tempfile.mkdtemp(prefix="securevol-workload-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def volume(workdir):
    _require_fuse()
    private = workdir / "private"
    private.mkdir(mode=0o700)
    vol = WorkloadMount(private / "backing", workdir / "mnt", private / "fuse.log")
    vol.start()
    try:
        yield vol
    finally:
        vol.cleanup()
    errors = vol.log_lines("ERROR")
    assert errors == [], f"volume log has ERROR lines: {errors[:5]}"


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run *command* and fail with its output in the message if its exit status is not 0."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(command)} exited with status {result.returncode}\n"
        f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    )
    return result


def assert_backing_store_lacks(vol: WorkloadMount, needle: bytes) -> None:
    assert not vol.pid, "unmount the volume before searching its backing store"
    stored = backing_bytes(vol.backing)
    assert needle not in stored, f"backing store {vol.backing} contains the plaintext {needle!r}"


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Return the regular files under *root* whose contents include *needle*."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
    return found


# --- PostgreSQL ----------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    binary = _require_program(str(candidates[-1]) if candidates else None, "postgresql")
    return Path(binary).parent


class PostgresServer:
    """A postgres server run as the postgres user on *data_dir*, reachable only through *socket_dir*.

    It listens on no TCP address. The port number only names the socket file.
    """

    PORT = 5432
    USER = "postgres"

    def __init__(self, bin_dir: Path, data_dir: Path, socket_dir: Path, log_file: Path) -> None:
        self.bin_dir = bin_dir
        self.data_dir = data_dir
        self.socket_dir = socket_dir
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    def as_postgres(self, program: str, *args: str) -> subprocess.CompletedProcess:
        """Run a PostgreSQL program as the postgres user against this server."""
        env = {
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "LC_ALL": "C.UTF-8",
            "PGHOST": str(self.socket_dir),
            "PGPORT": str(self.PORT),
            "PGUSER": self.USER,
        }
        command = [str(self.bin_dir / program), *args]
        return run(command, user=self.USER, group=self.USER, extra_groups=[], env=env, cwd=self.socket_dir)

    def initdb(self) -> None:
        # Data checksums make postgres verify every page it reads back from the mount.
        self.as_postgres(
            "initdb", "-D", str(self.data_dir), "-U", self.USER, "--auth=trust",
            "--data-checksums", "--encoding=UTF8", "--locale=C.UTF-8",
        )

    def start(self) -> None:
        command = [
            str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-k", str(self.socket_dir),
            "-p", str(self.PORT), "-c", "listen_addresses=",
        ]
        with open(self.log_file, "ab") as log_file:
            self.process = subprocess.Popen(
                command, user=self.USER, group=self.USER, extra_groups=[], cwd=self.socket_dir,
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"postgres exited with status {self.process.returncode}: {self.log_tail()}")
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-q", "-h", str(self.socket_dir), "-p", str(self.PORT)],
                timeout=COMMAND_TIMEOUT,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"postgres did not accept connections within {SERVER_START_TIMEOUT} s: {self.log_tail()}")

    def stop(self) -> None:
        """Shut down with SIGINT (fast shutdown: a checkpoint, then exit) and expect exit status 0."""
        self.process.send_signal(signal.SIGINT)
        status = self.process.wait(timeout=COMMAND_TIMEOUT)
        self.process = None
        assert status == 0, f"postgres exited with status {status}: {self.log_tail()}"

    def stop_immediately(self) -> None:
        """Shut down with SIGQUIT (immediate shutdown: no checkpoint), so the next start must replay the WAL."""
        self.process.send_signal(signal.SIGQUIT)
        self.process.wait(timeout=COMMAND_TIMEOUT)
        self.process = None

    def cleanup(self) -> None:
        """End the postmaster by its PID whatever state it is in. Its backends exit when it does."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def query(self, database: str, sql: str) -> str:
        return self.as_postgres("psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql).stdout.strip()

    def log_tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else "(no log)"


@pytest.fixture
def postgres(volume, workdir):
    bin_dir = _postgres_bin()
    # The volume's root directory, chowned through the mount: initdb creates the data directory in it.
    shutil.chown(volume.mountpoint, PostgresServer.USER, PostgresServer.USER)
    socket_dir = workdir / "pg-socket"
    socket_dir.mkdir(mode=0o700)
    shutil.chown(socket_dir, PostgresServer.USER, PostgresServer.USER)

    server = PostgresServer(bin_dir, volume.mountpoint / "pgdata", socket_dir, workdir / "postgres.log")
    try:
        yield server
    finally:
        server.cleanup()


PGBENCH_SCALE = 1
PGBENCH_CLIENTS = 2
PGBENCH_TRANSACTIONS = 200
MARKER_ROWS = 2000


def check_pgbench_tables(server: PostgresServer) -> None:
    """Assert the row counts pgbench's scale and run imply, and TPC-B's balance invariant."""
    counts = {
        table: int(server.query("bench", f"SELECT count(*) FROM {table}"))
        for table in ("pgbench_branches", "pgbench_tellers", "pgbench_accounts", "pgbench_history")
    }
    assert counts["pgbench_branches"] == PGBENCH_SCALE, counts
    assert counts["pgbench_tellers"] == 10 * PGBENCH_SCALE, counts
    assert counts["pgbench_accounts"] == 100_000 * PGBENCH_SCALE, counts
    assert counts["pgbench_history"] == PGBENCH_CLIENTS * PGBENCH_TRANSACTIONS, counts

    # Each TPC-B transaction adds the same delta to one account, teller and branch and logs it in history.
    sums = server.query(
        "bench",
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),"
        " (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(delta) FROM pgbench_history)",
    )
    assert len(set(sums.split("|"))) == 1, f"balances differ (accounts|tellers|branches|history): {sums}"


def test_postgres_pgbench_restart_remount(postgres, volume):
    marker = f"securevol-pg-marker-{random.randbytes(8).hex()}"
    postgres.initdb()
    postgres.start()

    postgres.query("postgres", "CREATE DATABASE bench")
    postgres.as_postgres("pgbench", "-i", "-q", "-s", str(PGBENCH_SCALE), "bench")
    result = postgres.as_postgres(
        "pgbench", "-n", "-c", str(PGBENCH_CLIENTS), "-j", str(PGBENCH_CLIENTS), "-t", str(PGBENCH_TRANSACTIONS), "bench"
    )
    processed = f"number of transactions actually processed: {PGBENCH_CLIENTS * PGBENCH_TRANSACTIONS}/"
    assert processed in result.stdout, result.stdout
    postgres.query("bench", "CREATE TABLE marker (note text)")
    postgres.query("bench", f"INSERT INTO marker SELECT '{marker}-' || i FROM generate_series(1, {MARKER_ROWS}) i")
    check_pgbench_tables(postgres)

    # An immediate shutdown leaves the committed work only in the WAL, which the next start replays.
    postgres.stop_immediately()
    postgres.start()
    assert "redo done" in postgres.log_tail(), "postgres did not replay its WAL after the immediate shutdown"
    check_pgbench_tables(postgres)
    assert postgres.query("bench", "SELECT count(*) FROM marker") == str(MARKER_ROWS)

    # A clean stop, then a remount, so that postgres reads its pages back from the ciphertext.
    postgres.stop()
    volume.remount()
    postgres.start()
    check_pgbench_tables(postgres)
    assert postgres.query("bench", "SELECT count(*) FROM marker") == str(MARKER_ROWS)
    postgres.query("bench", "CREATE EXTENSION amcheck")
    postgres.as_postgres("pg_amcheck", "--heapallindexed", "--install-missing", "bench")
    postgres.stop()

    # The marker is in the plaintext data directory, so the search below can find what it looks for.
    assert files_containing(volume.mountpoint / "pgdata", marker.encode()), "marker not found through the mount"
    volume.stop()
    assert_backing_store_lacks(volume, marker.encode())
    volume.start()


# --- SQLite --------------------------------------------------------------------------------------

SQLITE_WRITER = """
import sqlite3, sys

database, writer, transactions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
connection = sqlite3.connect(database, timeout=120, isolation_level=None)
connection.execute("PRAGMA busy_timeout = 120000")
for sequence in range(transactions):
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(
        "INSERT INTO entries (writer, sequence, payload) VALUES (?, ?, randomblob(500))", (writer, sequence)
    )
    connection.execute("UPDATE counters SET total = total + 1 WHERE writer = ?", (writer,))
    connection.execute("COMMIT")
connection.close()
"""

SQLITE_WRITERS = 2
SQLITE_TRANSACTIONS = 400


def check_sqlite_database(path: Path) -> None:
    import sqlite3

    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        for writer in range(SQLITE_WRITERS):
            rows, distinct, top = connection.execute(
                "SELECT count(*), count(DISTINCT sequence), max(sequence) FROM entries WHERE writer = ?", (writer,)
            ).fetchone()
            assert (rows, distinct, top) == (SQLITE_TRANSACTIONS, SQLITE_TRANSACTIONS, SQLITE_TRANSACTIONS - 1), (
                f"writer {writer}: rows={rows} distinct={distinct} max={top}"
            )
            (total,) = connection.execute("SELECT total FROM counters WHERE writer = ?", (writer,)).fetchone()
            assert total == SQLITE_TRANSACTIONS, f"writer {writer}: counter is {total}"
    finally:
        connection.close()


def test_sqlite_wal_two_writers(volume):
    import sqlite3

    database = volume.mountpoint / "app.db"
    connection = sqlite3.connect(database, isolation_level=None)
    assert connection.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
    connection.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, writer INTEGER, sequence INTEGER, payload BLOB)")
    connection.execute("CREATE TABLE counters (writer INTEGER PRIMARY KEY, total INTEGER)")
    connection.executemany("INSERT INTO counters VALUES (?, 0)", [(w,) for w in range(SQLITE_WRITERS)])

    # This connection stays open, so the last writer to close does not checkpoint and delete the WAL,
    # and its reads go through the WAL index that all three processes share by mmap of app.db-shm.
    writers = [
        subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(database), str(w), str(SQLITE_TRANSACTIONS)])
        for w in range(SQLITE_WRITERS)
    ]
    statuses = [writer.wait(timeout=COMMAND_TIMEOUT) for writer in writers]
    assert statuses == [0] * SQLITE_WRITERS, f"writer exit statuses: {statuses}"
    assert (volume.mountpoint / "app.db-wal").stat().st_size > 0, "the writers' transactions are not in the WAL"
    (total,) = connection.execute("SELECT count(*) FROM entries").fetchone()
    assert total == SQLITE_WRITERS * SQLITE_TRANSACTIONS, f"the open connection sees {total} rows"
    connection.close()

    check_sqlite_database(database)
    volume.remount()
    check_sqlite_database(database)


# --- git -----------------------------------------------------------------------------------------


def git(repository: Path, *args: str) -> str:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(repository.parent),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Workload Test",
        "GIT_AUTHOR_EMAIL": "workload@example.invalid",
        "GIT_COMMITTER_NAME": "Workload Test",
        "GIT_COMMITTER_EMAIL": "workload@example.invalid",
    }
    return run(["git", "-C", str(repository), *args], env=env).stdout


def worktree_snapshot(repository: Path) -> dict[str, tuple]:
    return {path: entry for path, entry in tree_snapshot(repository).items() if not path.startswith(".git")}


def test_git_commit_gc_fsck_clone(volume):
    _require_program(shutil.which("git"), "git")
    repository = volume.mountpoint / "repo"
    repository.mkdir()
    git(repository, "init", "-q", "-b", "main")
    sources = sorted((Path(__file__).parent.parent / "plugin" / "securevol").glob("*.py"))
    assert sources, "no source files to commit"
    rng = random.Random(11)

    # Several commits: real source files, a changing binary file, a rename and a removal.
    for number, source in enumerate(sources[:8]):
        shutil.copyfile(source, repository / source.name)
        (repository / "blob.bin").write_bytes(rng.randbytes(300_000))
        if number == 3:
            git(repository, "mv", sources[0].name, "renamed.py")
        if number == 5:
            git(repository, "rm", "-q", sources[1].name)
        git(repository, "add", "-A")
        git(repository, "commit", "-q", "-m", f"commit {number}")

    git(repository, "gc", "-q", "--aggressive", "--prune=now")
    git(repository, "fsck", "--full", "--strict")
    head = git(repository, "rev-parse", "HEAD").strip()
    history = git(repository, "log", "--format=%H")
    assert len(history.split()) == 8, history

    # A local clone hard-links the object files, and --no-local sends a pack through git's transport.
    clones = {"--local": volume.mountpoint / "clone-local", "--no-local": volume.mountpoint / "clone-transport"}
    for option, clone in clones.items():
        git(volume.mountpoint, "clone", "-q", option, str(repository), str(clone))
        git(clone, "fsck", "--full", "--strict")
        assert git(clone, "rev-parse", "HEAD").strip() == head
        assert git(clone, "log", "--format=%H") == history
        assert worktree_snapshot(clone) == worktree_snapshot(repository)

    volume.remount()
    git(repository, "fsck", "--full", "--strict")
    git(clones["--local"], "fsck", "--full", "--strict")
    assert git(repository, "status", "--porcelain") == ""


# --- tar -----------------------------------------------------------------------------------------

TAR_SOURCES = ["usr/lib/python3.11", "usr/share/doc"]


def test_tar_extract_matches_source_tree(volume, workdir):
    for source in TAR_SOURCES:
        _require_program(f"/{source}", source)
    archive = workdir / "private" / "sources.tar"
    run(["tar", "-C", "/", "-cf", str(archive), *TAR_SOURCES])

    run(["tar", "-C", str(volume.mountpoint), "-xpf", str(archive)])
    for source in TAR_SOURCES:
        run(["diff", "-r", "--no-dereference", f"/{source}", str(volume.mountpoint / source)])

    # Compare modes, sizes and digests again after a remount, now decrypted from the backing store.
    volume.remount()
    for source in TAR_SOURCES:
        extracted = tree_snapshot(volume.mountpoint / source)
        original = tree_snapshot(Path("/", source))
        assert len(extracted) == len(original), f"{source}: {len(extracted)} entries extracted, {len(original)} in the source"
        assert extracted == original, f"{source} differs after a remount"
        assert owners_and_mtimes(volume.mountpoint / source) == owners_and_mtimes(Path("/", source)), (
            f"{source}: owners or modification times differ after a remount"
        )

    # A sample of the extracted files' contents must not appear in the ciphertext.
    samples = sample_contents(Path("/", TAR_SOURCES[0]), count=20)
    volume.stop()
    stored = backing_bytes(volume.backing)
    for sample in samples:
        assert sample not in stored, f"backing store contains plaintext {sample[:40]!r}"
    volume.start()

    run(["rm", "-rf", str(volume.mountpoint / "usr")])
    assert os.listdir(volume.mountpoint) == []
    leftovers = [name for name in os.listdir(volume.backing) if not name.startswith("securevol.")]
    assert leftovers == [], f"backing store entries left after deleting everything: {leftovers[:5]}"


def owners_and_mtimes(root: Path) -> dict[str, tuple[int, int, int]]:
    """Return the owner, group and whole-second modification time of every entry under *root*.

    Whole seconds, because the GNU tar format stores no fractions of a second.
    """
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            entries[str(path.relative_to(root))] = (info.st_uid, info.st_gid, int(info.st_mtime))
    return entries


def sample_contents(root: Path, count: int) -> list[bytes]:
    """Return 64-byte slices from the middle of *count* files under *root* that are at least 4 KiB long.

    Slices with few distinct bytes are skipped: a run of zeros could match a
    hole in a sparse backing file.
    """
    candidates = sorted(
        path for path in root.rglob("*") if path.is_file() and not path.is_symlink() and path.stat().st_size >= 4096
    )
    chosen = random.Random(5).sample(candidates, min(count, len(candidates)))
    samples = []
    for path in chosen:
        data = path.read_bytes()
        middle = len(data) // 2
        sample = data[middle : middle + 64]
        if len(set(sample)) >= 16:
            samples.append(sample)
    assert samples, f"no file of 4 KiB or more under {root}"
    return samples
