"""Damaged names, directory IVs and side records in the backing store, seen through a real mount.

Anyone with write access to the backing store can put anything under a reserved name or an entry's
name. The mount must answer EIO or skip the one damaged entry, with one ERROR log line that
names ciphertext paths only, never hang, and never let a backing name forge a log line.
"""

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.fs_helpers import expect_errno, volume  # noqa: F401 (fixture)

LONG_NAME = "L" * 200  # its encrypted form is over 255 bytes, so it gets a side record
LIST_TIMEOUT = 20  # seconds; a blocked FUSE process would hang the listing for good


def _only_entry(backing_dir: Path) -> Path:
    entries = [path for path in backing_dir.iterdir() if not path.name.startswith("securevol.")]
    assert len(entries) == 1, entries
    return entries[0]


def _side_record(backing_dir: Path) -> Path:
    records = list(backing_dir.glob("securevol.long.*.name"))
    assert len(records) == 1, records
    return records[0]


def _list_with_timeout(path: Path, fifo: Path) -> subprocess.CompletedProcess:
    """List *path* in a child process; fail the test, rather than hang, if the FUSE process blocks on *fifo*."""
    process = subprocess.Popen(["ls", "-1", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=LIST_TIMEOUT)
    except subprocess.TimeoutExpired:
        # Opening the FIFO for writing ends the FUSE process's blocked open, and so the hang.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        process.kill()
        process.communicate()
        pytest.fail(f"listing {path} hung: the FUSE process blocked opening the FIFO {fifo.name}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _make_dir_with_files(volume, names: list[str]) -> Path:
    """Make directory d with *names* through the mount, remount so no IV is cached, and return d's backing directory."""
    directory = volume.mountpoint / "d"
    directory.mkdir()
    for name in names:
        (directory / name).write_text(name)
    volume.remount()
    return _only_entry(volume.backing)


def test_fifo_as_directory_iv_gives_eio(volume):
    backing_dir = _make_dir_with_files(volume, ["a"])
    (backing_dir / "securevol.diriv").unlink()
    os.mkfifo(backing_dir / "securevol.diriv")
    volume.expected_errors.append("integrity check failed vol=testvol")

    listing = _list_with_timeout(volume.mountpoint / "d", backing_dir / "securevol.diriv")

    assert listing.returncode != 0
    assert "Input/output error" in listing.stderr
    (volume.mountpoint / "other").write_text("still served")
    assert (volume.mountpoint / "other").read_text() == "still served"
    errors = volume.log_lines("ERROR")
    assert any(f"path={backing_dir.name} " in line and "is not a regular file" in line for line in errors)


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_directory_iv_of_wrong_type_gives_eio(volume, kind):
    backing_dir = _make_dir_with_files(volume, ["a"])
    iv_file = backing_dir / "securevol.diriv"
    iv_file.unlink()
    if kind == "symlink":
        iv_file.symlink_to(volume.backing / "securevol.diriv")
    else:
        iv_file.mkdir()
    volume.expected_errors.append("integrity check failed vol=testvol")

    expect_errno(errno.EIO, os.listdir, volume.mountpoint / "d")
    expect_errno(errno.EIO, os.stat, volume.mountpoint / "d" / "a")


def test_missing_directory_iv_logged_once_with_path(volume):
    backing_dir = _make_dir_with_files(volume, ["a"])
    (backing_dir / "securevol.diriv").unlink()
    volume.expected_errors.append("integrity check failed vol=testvol")

    for _ in range(3):
        expect_errno(errno.EIO, os.listdir, volume.mountpoint / "d")

    errors = [line for line in volume.log_lines("ERROR") if "integrity check failed" in line]
    assert len(errors) == 1, errors
    assert f"path={backing_dir.name} " in errors[0]
    assert "has no securevol.diriv file" in errors[0]


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_side_record_of_wrong_type_skips_one_entry(volume, kind):
    backing_dir = _make_dir_with_files(volume, ["good", LONG_NAME])
    record = _side_record(backing_dir)
    record.unlink()
    if kind == "fifo":
        os.mkfifo(record)
    elif kind == "directory":
        record.mkdir()
    else:
        record.symlink_to("/dev/zero")
    volume.expected_errors.append("name unreadable vol=testvol")

    listing = _list_with_timeout(volume.mountpoint / "d", record)

    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == ["good"]
    errors = [line for line in volume.log_lines("ERROR") if "name unreadable" in line]
    assert len(errors) == 1, errors
    assert f"path={backing_dir.name}/securevol.long." in errors[0]
    assert "is not a regular file" in errors[0]


def test_unlink_succeeds_when_side_record_cannot_be_removed(volume):
    backing_dir = _make_dir_with_files(volume, [LONG_NAME])
    record = _side_record(backing_dir)
    record.unlink()
    record.mkdir()
    volume.expected_errors.append("name unreadable vol=testvol")

    os.unlink(volume.mountpoint / "d" / LONG_NAME)

    assert not (volume.mountpoint / "d" / LONG_NAME).exists()
    assert [path.name for path in backing_dir.iterdir() if path.name != "securevol.diriv"] == [record.name]
    warnings = volume.log_lines("WARNING")
    assert any("removing a side record failed vol=testvol" in line for line in warnings), warnings


def test_backing_name_cannot_forge_log_line(volume):
    backing_dir = _make_dir_with_files(volume, ["good"])
    forged = "x\n2026-12-06T00:00:00Z INFO securevol.mount[1]: volume unmounted vol=testvol"
    (backing_dir / forged).write_bytes(b"")
    volume.expected_errors.append("name unreadable vol=testvol")

    assert os.listdir(volume.mountpoint / "d") == ["good"]

    lines = volume.log_lines()
    assert not any(line.startswith("2026-12-06T00:00:00Z") for line in lines), lines
    errors = [line for line in volume.log_lines("ERROR") if "name unreadable" in line]
    assert len(errors) == 1, errors
    assert "\\n2026-12-06T00:00:00Z INFO" in errors[0]


def test_non_utf8_backing_name_logged_as_one_line(volume):
    backing_dir = _make_dir_with_files(volume, ["good"])
    os.close(os.open(os.path.join(os.fsencode(backing_dir), b"garbage\xff"), os.O_CREAT | os.O_WRONLY, 0o600))
    volume.expected_errors.append("name unreadable vol=testvol")

    assert os.listdir(volume.mountpoint / "d") == ["good"]

    log_text = volume.log_file.read_text(errors="replace")
    assert "Logging error" not in log_text
    errors = [line for line in volume.log_lines("ERROR") if "name unreadable" in line]
    assert len(errors) == 1, errors
    assert "garbage\\udcff" in errors[0]


def test_damaged_name_logged_once_per_mount(volume):
    backing_dir = _make_dir_with_files(volume, ["good"])
    (backing_dir / "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").write_bytes(b"")
    volume.expected_errors.append("name unreadable vol=testvol")

    for _ in range(4):
        assert os.listdir(volume.mountpoint / "d") == ["good"]

    errors = [line for line in volume.log_lines("ERROR") if "name unreadable" in line]
    assert len(errors) == 1, errors
    repeats = [line for line in volume.log_lines("DEBUG") if "name unreadable" in line]
    assert len(repeats) == 3, repeats


def test_damaged_attribute_name_logged_once(volume):
    path = volume.mountpoint / "f"
    path.write_text("data")
    os.setxattr(path, "user.good", b"1")
    volume.remount()
    backing_file = _only_entry(volume.backing)
    os.setxattr(backing_file, b"user.securevol.\xff\xfe", b"junk")
    volume.expected_errors.append("attribute name unreadable vol=testvol")

    for _ in range(3):
        assert os.listxattr(path) == ["user.good"]

    errors = [line for line in volume.log_lines("ERROR") if "attribute name unreadable" in line]
    assert len(errors) == 1, errors
    assert f"path={backing_file.name} attribute='user.securevol.\\udcff\\udcfe'" in errors[0]
