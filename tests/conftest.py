"""Fixtures shared by the test modules: a private dockerd, its busybox image and a securevol plugin.

The dockerd fixtures start real daemons. They need root, /dev/fuse and the
Debian packages that scripts/setup.sh installs. Every test that uses one of
them, directly or through another fixture, gets the ``docker`` and ``slow``
markers here, so ``-m "not slow"`` skips it.
"""

import logging
import os
from collections.abc import Callable, Iterator

import pytest

from tests.dockerd import PLUGIN_DIR, PrivateDockerd, build_busybox_image, plugin_socket_path, unique_driver_name
from tests.plugin_server import PluginServer

log = logging.getLogger(__name__)

BUSYBOX_IMAGE = "securevol-test-busybox"


DOCKERD_FIXTURES = {"dockerd", "dockerd_factory"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: the markers must be set before ``-m`` deselects by them.
    for item in items:
        if DOCKERD_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)
            item.add_marker(pytest.mark.slow)


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


# The dockerd fixtures are per module, not per session, because a dockerd
# keeps every v1 plugin it has used. Once a module's plugin stops and its
# socket is gone, dockerd 20.10 retries that plugin with backoff whenever it
# looks up a volume name it does not know; in one run that added about 10
# minutes to the next module. A fresh dockerd and image take a few seconds.
@pytest.fixture(scope="module")
def dockerd() -> Iterator[PrivateDockerd]:
    """A private dockerd shared by the tests of one module, stopped by PID at the end."""
    daemon = _start_dockerd()
    yield daemon
    _stop_dockerd(daemon)


@pytest.fixture(scope="module")
def busybox_image(dockerd: PrivateDockerd) -> str:
    """The name of a busybox image in the module's dockerd, built offline."""
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


@pytest.fixture(scope="module")
def _module_plugin(dockerd: PrivateDockerd) -> Iterator[PluginServer]:
    # dockerd finds v1 plugins only in the host-wide /run/docker/plugins, so the
    # socket and driver name are unique to this run to keep other runs apart.
    PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
    # The allowlist checks ask the Engine API which container mounts a volume,
    # so the plugin talks to the module's dockerd, not the host's.
    server = PluginServer(
        socket_path=plugin_socket_path(unique_driver_name()), extra_args=("--docker-host", dockerd.host)
    )
    try:
        server.start()
    except Exception:
        # Leave no socket in the shared plugin directory for other dockerds to try.
        server.cleanup()
        raise
    log.info("plugin started driver=%s state=%s", server.driver, server.state_dir)
    yield server

    # Containers first, then volumes, while the plugin still runs to unmount and remove them.
    try:
        dockerd.remove_all_containers()
        listing = dockerd.docker("volume", "ls", "-q", "--filter", f"driver={server.driver}", check=False)
        for volume in listing.stdout.split():
            dockerd.docker("volume", "rm", "--force", volume, check=False)
    finally:
        server.cleanup()


@pytest.fixture
def securevol_plugin(_module_plugin: PluginServer) -> PluginServer:
    """The module's `securevol serve` on a unique socket in /run/docker/plugins, known to ``dockerd``.

    Its ``driver`` is the name for ``docker volume create -d``. A test that
    stopped the daemon and failed before starting it again must not break the
    tests after it, so the daemon is started again here when it is not running.
    """
    process = _module_plugin.process
    if process is None or process.poll() is not None:
        log.warning("plugin was not running; starting it again driver=%s", _module_plugin.driver)
        _module_plugin.start()
    return _module_plugin
