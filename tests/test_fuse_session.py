"""Finding libfuse's session behind pyfuse3, and refusing layouts that do not match."""

import shutil
import subprocess
import sys

import pytest

from securevol import fuse_session
from tests.fs_helpers import volume  # noqa: F401 (fixture)


def test_stripped_pyfuse3_rejected(tmp_path):
    stripped = tmp_path / "pyfuse3.so"
    shutil.copy(fuse_session.pyfuse3.__file__, stripped)
    subprocess.run(["strip", str(stripped)], check=True)

    with pytest.raises(fuse_session.SessionLayoutError, match="no symbol table"):
        fuse_session._read_symbols(str(stripped), {b"__pyx_v_7pyfuse3_session"})


def test_symbols_of_pyfuse3_found():
    symbols = fuse_session._read_symbols(
        fuse_session.pyfuse3.__file__, {b"__pyx_v_7pyfuse3_session", b"__pyx_v_7pyfuse3_fuse_ops"}
    )

    assert symbols[b"__pyx_v_7pyfuse3_session"][1] == 8
    assert symbols[b"__pyx_v_7pyfuse3_fuse_ops"][1] >= 44 * 8


def test_locate_before_init_rejected():
    # A fresh interpreter, because a test process may have a pyfuse3 session of its own.
    script = "from securevol import fuse_session\nfuse_session.locate()\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "SessionLayoutError: pyfuse3 has no libfuse session" in result.stderr


def test_mount_locates_session(volume):
    located = [line for line in volume.log_lines("DEBUG") if "libfuse session located" in line]

    assert len(located) == 1
    assert volume.log_lines("WARNING") == []
