"""Tests of the volume driver called in-process, for cases that the daemon tests cannot time."""

import pytest

from securevol import config
from securevol import driver as driver_module
from securevol.driver import VolumeDriver
from securevol.errors import SecurevolError


def test_create_past_its_deadline_creates_nothing(tmp_path, monkeypatch):
    """A Create that dockerd has given up on leaves no volume. A negative deadline simulates a slow one."""
    settings = config.resolve({"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "unused.sock")})
    driver = VolumeDriver.from_settings(settings)
    monkeypatch.setattr(driver_module, "CREATE_DEADLINE_SECONDS", -1)

    with pytest.raises(SecurevolError, match="so nothing was created; try again."):
        driver.create("late", {})

    assert not driver.registry.exists("late")
    assert list((tmp_path / "state" / "volumes").iterdir()) == []
