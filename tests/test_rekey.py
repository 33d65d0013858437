"""Tests of key rotation: ``securevol rekey`` with the local provider, and with a running daemon.

The Transit provider's rotation is tested against a real OpenBao server in
tests/test_keys_transit.py. Here the CLI runs as a subprocess on private
state directories with volumes made by the real driver. The daemon test mounts
real FUSE filesystems through ``securevol serve``.
"""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.plugin_server import PluginServer
from tests.test_protocol import create, mount, needs_fuse, unmount

from securevol import config
from securevol.cli import _describe_os_error
from securevol.crypto import DataKey
from securevol.driver import VolumeDriver
from securevol.errors import KeyProviderError
from securevol.keys import local
from securevol.keys.local import LocalKeyProvider, load_master_key, previous_key_path
from securevol.registry import Registry
from securevol.rekey import rekey

VOLUMES = ("alpha", "beta", "gamma")


def settings_for(state_dir: Path, master_key: Path | None = None) -> config.Settings:
    values = {"state_dir": str(state_dir), "socket": str(state_dir.parent / "unused.sock")}
    if master_key is not None:
        values["master_key"] = str(master_key)
    return config.resolve(values)


@pytest.fixture
def state_dir(tmp_path) -> Path:
    """A state directory with three volumes created by the driver under a new master key."""
    state = tmp_path / "state"
    driver = VolumeDriver.from_settings(settings_for(state))
    for name in VOLUMES:
        driver.create(name, {})
    return state


def record_of(state: Path, name: str) -> dict:
    return json.loads((state / "volumes" / name / "dek.json").read_text())


def volume_id_of(state: Path, name: str) -> bytes:
    return bytes.fromhex(json.loads((state / "volumes" / name / "volume.json").read_text())["volume_id"])


def deks(state: Path, master_key: bytes) -> dict[str, bytes]:
    """Unwrap every volume's DEK with *master_key* alone."""
    provider = LocalKeyProvider(master_key)
    return {
        name: provider.unwrap(record_of(state, name), volume_id_of(state, name)).raw() for name in VOLUMES
    }


def run_rekey(state: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "securevol.cli", "rekey", "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=60,
    )


def encodings(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
            base64.urlsafe_b64encode(secret).decode()]


def test_rekey_rewraps_every_dek(state_dir):
    key_file = state_dir / "master.key"
    old_key = load_master_key(key_file)
    before = deks(state_dir, old_key)

    result = run_rekey(state_dir)

    assert result.returncode == 0, result.stderr
    new_key = load_master_key(key_file)
    assert new_key != old_key
    assert deks(state_dir, new_key) == before
    new_id, old_id = local.key_id_of(new_key), local.key_id_of(old_key)
    assert {record_of(state_dir, name)["key_id"] for name in VOLUMES} == {new_id}
    assert f"Rewrapped 3 volume(s) under master key {new_id} (was {old_id})." in result.stdout
    assert f"key rotated provider=local old_key_id={old_id} key_id={new_id} volumes=3" in result.stderr
    assert not previous_key_path(key_file).exists()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(KeyProviderError, match="wrapped with master key"):
        deks(state_dir, old_key)


def test_rekey_prints_and_logs_no_key_material(state_dir):
    old_key = load_master_key(state_dir / "master.key")
    old_deks = deks(state_dir, old_key)

    result = run_rekey(state_dir)

    assert result.returncode == 0, result.stderr
    new_key = load_master_key(state_dir / "master.key")
    secrets = [old_key, new_key, *old_deks.values()]
    output = result.stdout + result.stderr
    for secret in secrets:
        for text in encodings(secret):
            assert text not in output


def test_rekey_with_explicit_master_key_file(tmp_path):
    key_file = write_key_file(tmp_path / "keys" / "kek")
    state = tmp_path / "state"
    VolumeDriver.from_settings(settings_for(state, key_file)).create("alpha", {})
    old_key = key_file.read_bytes()

    result = run_rekey(state, "--master-key", str(key_file))

    assert result.returncode == 0, result.stderr
    new_key = key_file.read_bytes()
    assert new_key != old_key
    assert record_of(state, "alpha")["key_id"] == local.key_id_of(new_key)
    assert not (state / "master.key").exists()
    assert sorted(path.name for path in key_file.parent.iterdir()) == ["kek"]


def test_interrupted_rekey_finishes_on_the_next_run(state_dir, monkeypatch):
    key_file = state_dir / "master.key"
    old_key = load_master_key(key_file)
    before = deks(state_dir, old_key)
    stored = []
    original = Registry.replace_wrapped_dek

    def replace_once(self, name, record):
        if stored:
            raise OSError(5, "simulated write error")
        stored.append(name)
        original(self, name, record)

    monkeypatch.setattr(Registry, "replace_wrapped_dek", replace_once)
    with pytest.raises(OSError, match="simulated"):
        rekey(settings_for(state_dir))
    monkeypatch.setattr(Registry, "replace_wrapped_dek", original)

    # Half way: one record under the new key, two under the old one, both keys on disk.
    new_key = load_master_key(key_file)
    assert load_master_key(previous_key_path(key_file)) == old_key
    key_ids = [record_of(state_dir, name)["key_id"] for name in VOLUMES]
    assert sorted(key_ids) == sorted([local.key_id_of(new_key)] + [local.key_id_of(old_key)] * 2)

    # A daemon started now unwraps every volume.
    daemon_provider = local.create_provider(settings_for(state_dir))
    assert {name: daemon_provider.unwrap(record_of(state_dir, name), volume_id_of(state_dir, name)).raw()
            for name in VOLUMES} == before

    result = run_rekey(state_dir)

    assert result.returncode == 0, result.stderr
    assert "Rewrapped 2 volume(s)" in result.stdout
    assert load_master_key(key_file) == new_key
    assert deks(state_dir, new_key) == before
    assert not previous_key_path(key_file).exists()


def test_rekey_stopped_before_the_new_key_starts_over(state_dir):
    key_file = state_dir / "master.key"
    old_key = load_master_key(key_file)
    before = deks(state_dir, old_key)
    # What a stop right after saving the old key leaves: both files hold the same key.
    previous = previous_key_path(key_file)
    previous.write_bytes(old_key)
    previous.chmod(0o600)

    result = run_rekey(state_dir)

    assert result.returncode == 0, result.stderr
    new_key = load_master_key(key_file)
    assert new_key != old_key
    assert deks(state_dir, new_key) == before
    assert not previous.exists()


def test_rekey_refuses_a_record_of_another_master_key(state_dir):
    key_file = state_dir / "master.key"
    old_key = load_master_key(key_file)
    foreign = LocalKeyProvider(os.urandom(local.MASTER_KEY_LEN))
    record = foreign.wrap(DataKey.generate(), volume_id_of(state_dir, "beta"))
    (state_dir / "volumes" / "beta" / "dek.json").write_text(json.dumps(record))

    result = run_rekey(state_dir)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"securevol: Volume 'beta' has its key wrapped with master key '{foreign.key_id}', which is not in "
        "the master key file; nothing was changed. Give the --master-key that the daemon uses"
    )
    assert load_master_key(key_file) == old_key
    assert not previous_key_path(key_file).exists()
    assert record_of(state_dir, "alpha")["key_id"] == local.key_id_of(old_key)


def test_volume_restored_from_before_a_rekey(state_dir):
    # A volume restored from a backup taken before a rotation is wrapped with
    # the old key. Put back as the previous key, it lets rekey rewrap the volume.
    key_file = state_dir / "master.key"
    old_key = load_master_key(key_file)
    before = deks(state_dir, old_key)
    backup_record = (state_dir / "volumes" / "beta" / "dek.json").read_bytes()
    assert run_rekey(state_dir).returncode == 0
    new_key = load_master_key(key_file)
    (state_dir / "volumes" / "beta" / "dek.json").write_bytes(backup_record)

    refused = run_rekey(state_dir)
    assert refused.returncode == 1
    assert "master.key.previous" in refused.stderr

    previous = previous_key_path(key_file)
    previous.write_bytes(old_key)
    previous.chmod(0o600)
    restored = run_rekey(state_dir)

    assert restored.returncode == 0, restored.stderr
    assert load_master_key(key_file) == new_key
    assert deks(state_dir, new_key) == before
    assert not previous.exists()


def test_rekey_refuses_a_damaged_volume_record(state_dir):
    key_file = state_dir / "master.key"
    old_key = load_master_key(key_file)
    (state_dir / "volumes" / "gamma" / "volume.json").write_text("{not json")

    result = run_rekey(state_dir)

    assert result.returncode == 1
    assert "Volume 'gamma' cannot be rewrapped, so nothing was changed" in result.stderr
    assert load_master_key(key_file) == old_key
    assert not previous_key_path(key_file).exists()
    assert record_of(state_dir, "alpha")["key_id"] == local.key_id_of(old_key)


def test_rekey_refuses_a_state_dir_without_volumes(tmp_path):
    key_file = tmp_path / "kek"
    key_file.write_bytes(os.urandom(local.MASTER_KEY_LEN))
    key_file.chmod(0o600)
    old_key = key_file.read_bytes()
    (tmp_path / "mistyped").mkdir()

    result = run_rekey(tmp_path / "mistyped", "--master-key", str(key_file))

    assert result.returncode == 1
    assert "has its key wrapped by a local master key, so nothing was changed" in result.stderr
    assert key_file.read_bytes() == old_key
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kek", "mistyped"]
    assert list((tmp_path / "mistyped").iterdir()) == []


def test_rekey_refuses_ciphertext_without_volume_record(state_dir):
    key_file = state_dir / "master.key"
    old_key = load_master_key(key_file)
    volume_dir = state_dir / "volumes" / "beta"
    (volume_dir / "data" / "ciphertext").write_bytes(os.urandom(64))
    (volume_dir / "volume.json").unlink()

    result = run_rekey(state_dir)

    assert result.returncode == 1
    assert "Volume 'beta' has ciphertext and a wrapped key but no volume.json" in result.stderr
    assert "Nothing was changed." in result.stderr
    assert load_master_key(key_file) == old_key
    assert record_of(state_dir, "beta")["key_id"] == local.key_id_of(old_key)


def test_rekey_skips_an_unfinished_create(state_dir):
    (state_dir / "volumes" / "beta" / "volume.json").unlink()

    result = run_rekey(state_dir)

    assert result.returncode == 0, result.stderr
    assert "Rewrapped 2 volume(s)" in result.stdout
    assert "rekey skips an unfinished create vol=beta" in result.stderr


def write_key_file(path: Path) -> Path:
    """Write a new master key to *path* in a new directory, mode 0600, and return *path*."""
    path.parent.mkdir()
    path.write_bytes(os.urandom(local.MASTER_KEY_LEN))
    path.chmod(0o600)
    return path


def test_rekey_through_a_symlinked_key_file(tmp_path):
    store = tmp_path / "store"
    target = write_key_file(store / "kek")
    link = tmp_path / "master.key"
    link.symlink_to(target)
    state = tmp_path / "state"
    VolumeDriver.from_settings(settings_for(state, link)).create("alpha", {})
    daemon_provider = local.create_provider(settings_for(state, target))

    result = run_rekey(state, "--master-key", str(link))

    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    new_id = local.key_id_of(target.read_bytes())
    assert record_of(state, "alpha")["key_id"] == new_id
    assert sorted(path.name for path in store.iterdir()) == ["kek"]
    assert daemon_provider.wrap(DataKey.generate(), bytes(range(16)))["key_id"] == new_id


def test_rekey_removes_leftover_temporary_files(state_dir):
    key_file = state_dir / "master.key"
    old_key = load_master_key(key_file)
    leftovers = [
        state_dir / ".master.key.999.0badc0de.tmp",
        state_dir / ".master.key.previous.999.0badc0de.tmp",
        state_dir / "volumes" / "alpha" / ".dek.json.999.0badc0de.tmp",
    ]
    for path in leftovers:
        path.write_bytes(old_key)

    result = run_rekey(state_dir)

    assert result.returncode == 0, result.stderr
    for path in leftovers:
        assert not path.exists(), path


def test_rekey_refuses_transit_flag_with_local_provider(state_dir):
    result = run_rekey(state_dir, "--rotate-transit-key")

    assert result.returncode == 1
    assert "--rotate-transit-key applies to the transit key provider only." in result.stderr


def test_rekey_of_missing_state_dir(tmp_path):
    result = run_rekey(tmp_path / "nowhere")

    assert result.returncode == 1
    assert "does not exist; give the --state-dir that the daemon uses." in result.stderr


def test_provider_follows_a_replaced_key_file(tmp_path):
    key_file = tmp_path / "master.key"
    key_file.write_bytes(os.urandom(local.MASTER_KEY_LEN))
    key_file.chmod(0o600)
    provider = LocalKeyProvider(load_master_key(key_file), key_file)
    volume_id = bytes(range(16))
    old_record = provider.wrap(DataKey.generate(), volume_id)

    old_key, new_key = local.start_rotation(key_file)

    new_record = provider.wrap(DataKey.generate(), volume_id)
    assert new_record["key_id"] == local.key_id_of(new_key) != old_record["key_id"]
    # The retired key still unwraps until the rotation finishes.
    provider.unwrap(old_record, volume_id)
    local.finish_rotation(key_file)
    with pytest.raises(KeyProviderError, match="wrapped with master key"):
        provider.unwrap(old_record, volume_id)


def test_provider_without_key_file_keeps_its_key(tmp_path):
    provider = LocalKeyProvider(os.urandom(local.MASTER_KEY_LEN))
    other = LocalKeyProvider(os.urandom(local.MASTER_KEY_LEN))
    record = other.wrap(DataKey.generate(), bytes(range(16)))

    with pytest.raises(KeyProviderError, match="wrapped with master key"):
        provider.unwrap(record, bytes(range(16)))


@needs_fuse
def test_rekey_while_the_daemon_runs(tmp_path):
    """Volumes mounted before, during and after a rotation keep their data; a restart needs no old key."""
    with PluginServer(workers=2) as server:
        mounted, idle = create(server), create(server)
        mountpoint = Path(mount(server, mounted, "m1"))
        (mountpoint / "kept.txt").write_text("written before the rotation\n")
        Path(mount(server, idle, "i1"), "idle.txt").write_text("idle volume\n")
        unmount(server, idle, "i1")

        result = run_rekey(server.state_dir)
        assert result.returncode == 0, result.stderr
        new_id = local.key_id_of(load_master_key(server.state_dir / "master.key"))

        # The mounted volume's FUSE process keeps its DEK; the daemon unwraps under the new key.
        (mountpoint / "after.txt").write_text("written after the rotation\n")
        unmount(server, mounted, "m1")
        assert Path(mount(server, idle, "i2"), "idle.txt").read_text() == "idle volume\n"
        unmount(server, idle, "i2")
        created_after = create(server)
        assert json.loads((server.volume_dir(created_after) / "dek.json").read_text())["key_id"] == new_id

        server.stop()
        server.start()
        again = Path(mount(server, mounted, "m2"))
        assert (again / "kept.txt").read_text() == "written before the rotation\n"
        assert (again / "after.txt").read_text() == "written after the rotation\n"
        unmount(server, mounted, "m2")
        mount(server, created_after, "c1")
        unmount(server, created_after, "c1")
        assert "volume key unwrap failed" not in server.log_text()


def test_os_error_messages_name_the_cause():
    assert _describe_os_error(OSError(28, "No space left on device", "/state/x")) == \
        "No space left on device on /state/x."
    assert _describe_os_error(OSError(13, "Permission denied", "/state/x")) == \
        "Permission denied on /state/x; run it as the daemon's user (root)."


def test_rekey_missing_key_file_message(state_dir, tmp_path):
    result = run_rekey(state_dir, "--master-key", str(tmp_path / "absent.key"))

    assert result.returncode == 1
    assert "does not exist; give the path that the daemon uses with --master-key or SECUREVOL_MASTER_KEY" \
        in result.stderr
    assert f"create one with '(umask 077; head -c 32 /dev/urandom > {tmp_path / 'absent.key'})'" in result.stderr


def test_rekey_with_read_only_key_directory(tmp_path):
    key_dir = tmp_path / "keys"
    key_file = write_key_file(key_dir / "kek")
    state = tmp_path / "state"
    VolumeDriver.from_settings(settings_for(state, key_file)).create("alpha", {})
    old_key = key_file.read_bytes()
    subprocess.run(["mount", "--bind", str(key_dir), str(key_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(key_dir)], check=True)

        result = run_rekey(state, "--master-key", str(key_file))
    finally:
        subprocess.run(["umount", str(key_dir)], check=True)

    assert result.returncode == 1
    assert "the key file's directory must be writable during a rotation. Nothing was changed." in result.stderr
    assert key_file.read_bytes() == old_key
    assert record_of(state, "alpha")["key_id"] == local.key_id_of(old_key)


def test_rekey_help_describes_its_own_use():
    result = subprocess.run([sys.executable, "-m", "securevol.cli", "rekey", "--help"],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ("--state-dir", "--key-provider", "--master-key", "--log-level", "--rotate-transit-key"):
        assert flag in text
    for daemon_flag in ("--socket", "--workers", "--docker-host", "--mount-root"):
        assert daemon_flag not in text
    assert "the master key file that the daemon uses, which gets the new key" in text
    assert "made mode 0700" not in text
    assert "FUSE process" not in text

