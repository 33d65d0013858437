"""Tests of the local key provider: master key file handling and DEK wrapping."""

import base64
import json
import multiprocessing
import os
import stat
from types import SimpleNamespace

import pytest

from securevol.crypto import DataKey
from securevol.errors import KeyProviderError
from securevol.keys import create_provider
from securevol.keys.local import MASTER_KEY_LEN, LocalKeyProvider, load_master_key

VOLUME_ID = bytes(range(16))
OTHER_VOLUME_ID = bytes(range(1, 17))


def _settings(state_dir, master_key=None):
    return SimpleNamespace(key_provider="local", state_dir=str(state_dir), master_key=master_key)


def _provider(tmp_path):
    return create_provider(_settings(tmp_path))


def test_master_key_created_on_first_start(tmp_path):
    _provider(tmp_path)

    key_file = tmp_path / "master.key"
    st = key_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == MASTER_KEY_LEN
    assert st.st_uid == os.geteuid()
    assert list(tmp_path.iterdir()) == [key_file]


def test_master_key_reused_across_starts(tmp_path):
    dek = DataKey.generate()
    record = _provider(tmp_path).wrap(dek, VOLUME_ID)

    assert _provider(tmp_path).unwrap(record, VOLUME_ID) == dek


def test_wrap_round_trip_and_record_shape(tmp_path):
    provider = _provider(tmp_path)
    dek = DataKey.generate()

    record = provider.wrap(dek, VOLUME_ID)

    assert record["provider"] == "local"
    assert record["key_id"] == provider.key_id
    assert provider.unwrap(record, VOLUME_ID) == dek
    assert dek.raw() not in json.dumps(record).encode()
    assert dek.raw() not in base64.b64decode(record["wrapped_key"])


def test_wraps_of_same_key_differ(tmp_path):
    provider = _provider(tmp_path)
    dek = DataKey.generate()

    assert provider.wrap(dek, VOLUME_ID)["nonce"] != provider.wrap(dek, VOLUME_ID)["nonce"]


def test_wrong_master_key_rejected(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    record = _provider(tmp_path / "a").wrap(DataKey.generate(), VOLUME_ID)

    with pytest.raises(KeyProviderError, match="master key"):
        _provider(tmp_path / "b").unwrap(record, VOLUME_ID)


def test_wrong_master_key_with_forged_key_id_rejected(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    record = _provider(tmp_path / "a").wrap(DataKey.generate(), VOLUME_ID)
    other = _provider(tmp_path / "b")
    record["key_id"] = other.key_id

    with pytest.raises(KeyProviderError, match="failed authentication"):
        other.unwrap(record, VOLUME_ID)


def test_wrong_volume_id_rejected(tmp_path):
    provider = _provider(tmp_path)
    record = provider.wrap(DataKey.generate(), VOLUME_ID)

    with pytest.raises(KeyProviderError, match="another volume"):
        provider.unwrap(record, OTHER_VOLUME_ID)


def test_every_tampered_byte_rejected(tmp_path):
    provider = _provider(tmp_path)
    record = provider.wrap(DataKey.generate(), VOLUME_ID)

    for field in ("nonce", "wrapped_key"):
        raw = base64.b64decode(record[field])
        for i in range(len(raw)):
            tampered = bytearray(raw)
            tampered[i] ^= 0x01
            forged = dict(record, **{field: base64.b64encode(bytes(tampered)).decode()})
            with pytest.raises(KeyProviderError, match="failed authentication"):
                provider.unwrap(forged, VOLUME_ID)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"provider": "transit"}, "key provider 'transit'"),
        ({"provider": None}, "key provider None"),
        ({"version": 2}, "version 2"),
        ({"nonce": None}, "no 'nonce' field"),
        ({"wrapped_key": "not base64!"}, "not valid base64"),
        ({"wrapped_key": base64.b64encode(b"short").decode()}, "has 5 bytes"),
        ({"nonce": base64.b64encode(bytes(16)).decode()}, "has 16 bytes"),
    ],
)
def test_malformed_record_rejected(tmp_path, change, message):
    provider = _provider(tmp_path)
    record = dict(provider.wrap(DataKey.generate(), VOLUME_ID), **change)

    with pytest.raises(KeyProviderError, match=message):
        provider.unwrap(record, VOLUME_ID)


def test_error_messages_carry_no_key_material(tmp_path):
    provider = _provider(tmp_path)
    dek = DataKey.generate()
    record = provider.wrap(dek, VOLUME_ID)
    master_key = (tmp_path / "master.key").read_bytes()

    with pytest.raises(KeyProviderError) as excinfo:
        provider.unwrap(record, OTHER_VOLUME_ID)

    text = str(excinfo.value) + repr(provider)
    for secret in (dek.raw(), master_key):
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602])
def test_master_key_readable_by_others_rejected(tmp_path, mode):
    _provider(tmp_path)
    os.chmod(tmp_path / "master.key", mode)

    with pytest.raises(KeyProviderError, match=f"mode {mode:04o}"):
        _provider(tmp_path)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_master_key_of_wrong_length_rejected(tmp_path, length):
    key_file = tmp_path / "master.key"
    key_file.write_bytes(os.urandom(length))
    key_file.chmod(0o600)

    with pytest.raises(KeyProviderError, match=f"{length} bytes long") as rejected:
        _provider(tmp_path)
    assert "restore the right file from your backup" in str(rejected.value)
    assert "move it away and start the daemon again" in str(rejected.value)


def test_master_key_directory_rejected(tmp_path):
    (tmp_path / "master.key").mkdir(mode=0o700)

    with pytest.raises(KeyProviderError, match="not a regular file"):
        _provider(tmp_path)


def test_explicit_master_key_never_created(tmp_path):
    missing = tmp_path / "elsewhere.key"

    with pytest.raises(KeyProviderError, match="does not exist"):
        create_provider(_settings(tmp_path, master_key=str(missing)))
    assert not missing.exists()
    assert not (tmp_path / "master.key").exists()


def test_explicit_master_key_used(tmp_path):
    key_file = tmp_path / "given.key"
    key_file.write_bytes(os.urandom(MASTER_KEY_LEN))
    key_file.chmod(0o400)

    provider = create_provider(_settings(tmp_path, master_key=str(key_file)))

    assert provider.key_id == LocalKeyProvider(key_file.read_bytes()).key_id
    assert not (tmp_path / "master.key").exists()


def test_unknown_provider_rejected(tmp_path):
    settings = SimpleNamespace(key_provider="kmip", state_dir=str(tmp_path), master_key=None)

    with pytest.raises(KeyProviderError, match="Unknown key provider 'kmip'"):
        create_provider(settings)


def _create_and_report_key_id(state_dir, queue):
    queue.put(_provider(state_dir).key_id)


def test_concurrent_first_starts_agree_on_one_key(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_create_and_report_key_id, args=(tmp_path, queue)) for _ in range(8)]

    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    key_ids = {queue.get(timeout=5) for _ in processes}

    assert all(process.exitcode == 0 for process in processes)
    assert key_ids == {LocalKeyProvider(load_master_key(tmp_path / "master.key")).key_id}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["master.key"]


def test_start_refuses_key_of_no_volume(tmp_path):
    _provider(tmp_path)  # creates the key file
    foreign = LocalKeyProvider(os.urandom(MASTER_KEY_LEN))
    _write_volume(tmp_path, "data", foreign.wrap(DataKey.generate(), VOLUME_ID), with_record=True)

    with pytest.raises(KeyProviderError, match=r"none of the 1 volume\(s\) with local keys was wrapped with it"):
        _provider(tmp_path)


def test_start_ignores_record_of_unfinished_create(tmp_path):
    own = _provider(tmp_path)
    _write_volume(tmp_path, "done", own.wrap(DataKey.generate(), VOLUME_ID), with_record=True)
    foreign = LocalKeyProvider(os.urandom(MASTER_KEY_LEN))
    _write_volume(tmp_path, "unfinished", foreign.wrap(DataKey.generate(), VOLUME_ID), with_record=False)
    (tmp_path / "volumes" / "done" / "dek.json").unlink()

    assert _provider(tmp_path).key_id == own.key_id


def _write_volume(state_dir, name, record, with_record: bool):
    volume_dir = state_dir / "volumes" / name
    volume_dir.mkdir(parents=True)
    (volume_dir / "dek.json").write_text(json.dumps(record))
    if with_record:
        (volume_dir / "volume.json").write_text("{}")
