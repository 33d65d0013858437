"""End-to-end tests: securevol volumes used by real containers of a private dockerd."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def test_harness_container_runs(dockerd, busybox_image):
    result = dockerd.run("--rm", busybox_image, "sh", "-c", "echo hello")

    assert result.stdout == "hello\n"


def test_harness_container_has_no_network(dockerd, busybox_image):
    result = dockerd.run("--rm", busybox_image, "ls", "/sys/class/net")

    assert result.stdout.split() == ["lo"]
