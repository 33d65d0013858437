"""Real workloads on a securevol mount: SQLite in WAL mode with two writers, git, and a source tree through tar.

These take tens of seconds, so they carry the ``slow`` marker.
"""

import multiprocessing
import os
import sqlite3
import subprocess
import sysconfig
import tarfile
from pathlib import Path

import pytest

from tests.fs_helpers import tree_snapshot, volume  # noqa: F401 (volume is a fixture)

pytestmark = pytest.mark.slow


def _sqlite_writer(path: str, writer: int, rows: int) -> None:
    connection = sqlite3.connect(path, timeout=60)
    try:
        for i in range(rows):
            with connection:
                connection.execute(
                    "INSERT INTO items (writer, seq, payload) VALUES (?, ?, ?)", (writer, i, os.urandom(300).hex())
                )
    finally:
        connection.close()


def test_sqlite_wal_with_two_writers(volume):
    path = str(volume.mountpoint / "app.db")
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    connection.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, writer INT, seq INT, payload TEXT)")
    connection.commit()
    connection.close()

    writers = [multiprocessing.Process(target=_sqlite_writer, args=(path, w, 2000)) for w in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    volume.remount()

    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        counts = dict(connection.execute("SELECT writer, COUNT(*) FROM items GROUP BY writer").fetchall())
        assert counts == {0: 2000, 1: 2000}
        sequences = connection.execute("SELECT seq FROM items WHERE writer = 1 ORDER BY id").fetchall()
        assert [seq for (seq,) in sequences] == list(range(2000))
    finally:
        connection.close()


def _git(repo: Path, *args: str) -> str:
    environment = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(repo),
    }
    result = subprocess.run(["git", *args], cwd=repo, env=environment, check=True, capture_output=True, text=True)
    return result.stdout


def test_git_init_commit_gc_fsck(volume):
    repo = volume.mountpoint / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for i in range(30):
        (repo / f"file{i % 7}.txt").write_text(f"revision {i}\n" * (i + 1))
        (repo / "sub").mkdir(exist_ok=True)
        (repo / "sub" / f"data{i}.bin").write_bytes(os.urandom(5000))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"commit {i}")

    _git(repo, "gc", "-q", "--aggressive")
    volume.remount()

    assert _git(repo, "fsck", "--full", "--strict") == ""
    assert _git(repo, "rev-list", "--count", "HEAD").strip() == "30"
    assert _git(repo, "status", "--porcelain") == ""


def test_untar_source_tree_and_verify(volume, tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        for package in ("asyncio", "email", "json", "xml", "unittest"):
            tar.add(stdlib / package, arcname=package, filter=lambda info: None if "__pycache__" in info.name else info)
    extracted = tmp_path / "plain"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(extracted)], check=True)

    subprocess.run(["tar", "-xf", str(archive), "-C", str(volume.mountpoint)], check=True)
    volume.remount()

    assert tree_snapshot(volume.mountpoint) == tree_snapshot(extracted)
    digest = subprocess.run(
        ["sh", "-c", "find . -type f -print0 | sort -z | xargs -0 sha256sum"],
        cwd=volume.mountpoint, check=True, capture_output=True, text=True,
    ).stdout
    expected = subprocess.run(
        ["sh", "-c", "find . -type f -print0 | sort -z | xargs -0 sha256sum"],
        cwd=extracted, check=True, capture_output=True, text=True,
    ).stdout
    assert digest.count("\n") > 20
    assert digest == expected
