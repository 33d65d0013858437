"""Fixtures shared by the test modules: a private dockerd and its busybox image.

The dockerd fixtures start real daemons. They need root, /dev/fuse and the
Debian packages that scripts/setup.sh installs. Tests that use them carry the
``docker`` marker (and ``slow``), so ``-m "not slow"`` skips them.
"""

import logging
import os
from collections.abc import Callable, Iterator

import pytest

from tests.dockerd import PrivateDockerd, build_busybox_image

log = logging.getLogger(__name__)

BUSYBOX_IMAGE = "securevol-test-busybox"


def _require_root() -> None:
    # Outside CI, a developer without root gets a skip with the reason. In CI the
    # same case fails, because a run that skipped everything would look green.
    if os.geteuid() == 0:
        return
    message = "these tests start dockerd and FUSE mounts, which needs root"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _start_dockerd(extra_args: list[str] | tuple[str, ...] = ()) -> PrivateDockerd:
    _require_root()
    daemon = PrivateDockerd(extra_args)
    try:
        daemon.start()
    except Exception:
        daemon.stop()
        raise
    return daemon


def _stop_dockerd(daemon: PrivateDockerd) -> None:
    try:
        daemon.remove_all_containers()
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def dockerd() -> Iterator[PrivateDockerd]:
    """A private dockerd shared by the whole session, stopped by PID at the end."""
    daemon = _start_dockerd()
    yield daemon
    _stop_dockerd(daemon)


@pytest.fixture(scope="session")
def busybox_image(dockerd: PrivateDockerd) -> str:
    """The name of a busybox image in the session's dockerd, built offline."""
    return build_busybox_image(dockerd, BUSYBOX_IMAGE)


@pytest.fixture
def dockerd_factory() -> Iterator[Callable[..., PrivateDockerd]]:
    """A function that starts another private dockerd with extra flags; all are stopped after the test.

    Call it as ``dockerd_factory("--authorization-plugin=NAME")``. Each daemon
    is empty: build an image in it with ``tests.dockerd.build_busybox_image``.
    """
    started: list[PrivateDockerd] = []

    def start(*extra_args: str) -> PrivateDockerd:
        daemon = _start_dockerd(extra_args)
        started.append(daemon)
        return daemon

    yield start

    for daemon in reversed(started):
        _stop_dockerd(daemon)
