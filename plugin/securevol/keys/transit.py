"""The transit key provider: an OpenBao or HashiCorp Vault Transit key is the KEK.

The KEK never leaves the Transit server. ``wrap`` sends the DEK to the server's encrypt
endpoint and stores the returned ciphertext (``vault:vN:...``) in the record. ``unwrap``
sends that ciphertext back to the decrypt endpoint. So the server sees each DEK while it wraps or unwraps it,
and whoever holds a token with decrypt permission on the key can unwrap every volume's DEK.

Binding to the volume: the plaintext sent to Transit is an envelope
``b"securevol transit v1\\0" || volume ID (16 bytes) || DEK (32 bytes)``, and ``unwrap``
checks the volume ID inside it. Every request also carries the Transit ``context``
``b"securevol v1 volume " || volume ID``. A key created with ``derived=true`` derives a separate
key from that context on the server, so a record of another volume fails authentication there
already; a key without derivation ignores the context, and the envelope check catches it.

Rotation: ``rotate_key`` adds a new version of the Transit key, and ``rewrap`` re-encrypts a
record under the newest version on the server, without the DEK ever reaching securevol. Records
of older versions unwrap as long as the key's ``min_decryption_version`` allows them.
``securevol rekey`` (rekey.py) calls both for every volume.

Settings, all from environment variables:

========================================  =====================================================
``SECUREVOL_TRANSIT_ADDR``                server URL, e.g. ``https://bao.example:8200`` (required)
``SECUREVOL_TRANSIT_TOKEN_FILE``          file that contains the token, read on every request
                                          so that an agent can renew it (preferred)
``SECUREVOL_TRANSIT_TOKEN``               the token itself, if no token file is set
``SECUREVOL_TRANSIT_MOUNT``               mount path of the Transit engine (default ``transit``)
``SECUREVOL_TRANSIT_KEY``                 name of the Transit key (default ``securevol``)
``SECUREVOL_TRANSIT_CA_FILE``             CA certificate that signed the server's certificate
                                          (default: the system's CA bundle)
``SECUREVOL_TRANSIT_NAMESPACE``           namespace, on servers that have namespaces
``SECUREVOL_TRANSIT_TIMEOUT``             maximum seconds for each request, from connecting until
                                          the whole response has arrived (default 10, at most 60)
========================================  =====================================================

The token needs this policy, with MOUNT and KEY replaced (``rotate_key`` also needs ``update``
on ``MOUNT/keys/KEY/rotate``)::

    path "MOUNT/encrypt/KEY" { capabilities = ["update"] }
    path "MOUNT/decrypt/KEY" { capabilities = ["update"] }
    path "MOUNT/rewrap/KEY"  { capabilities = ["update"] }

Create the key once, as an administrator: ``bao write -f MOUNT/keys/KEY derived=true``. A token
that also has ``create`` on ``MOUNT/encrypt/KEY`` makes Transit create a missing key on the first
wrap, as a derived key because every request carries a context (checked with OpenBao 2.7).

The token never appears in a log line, a repr or an error, nor does a user name or password in
``SECUREVOL_TRANSIT_ADDR``. Errors name the HTTP method and URL of the failed request, never a
request or response body.
"""

import base64
import binascii
import concurrent.futures
import errno
import hmac
import logging
import math
import os
import re
import ssl
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import hvac
import hvac.exceptions
import requests

from securevol.crypto import DEK_LEN, VOLUME_ID_LEN, DataKey
from securevol.errors import KeyProviderError, KeyProviderTimeout
from securevol.keys import KeyProvider, check_record_provider

log = logging.getLogger(__name__)

RECORD_VERSION = 1
DEFAULT_MOUNT = "transit"
DEFAULT_KEY_NAME = "securevol"
DEFAULT_TIMEOUT = 10.0
# The largest SECUREVOL_TRANSIT_TIMEOUT in seconds. dockerd gives a volume plugin 2 minutes for a
# Create or Mount (longTimeout in moby's volume/drivers/proxy.go), and the daemon holds its
# registry lock while it waits for a wrap, so a longer wait would stall every Create and Remove.
MAX_TIMEOUT = 60.0
# Requests to the Transit server that may run at once in a process, counting those that timed
# out and still wait for the server. Each runs on its own thread.
MAX_REQUESTS_IN_FLIGHT = 8
_request_slots = threading.BoundedSemaphore(MAX_REQUESTS_IN_FLIGHT)

# Both are part of the record format: changing one makes every wrapped DEK unreadable.
ENVELOPE_MAGIC = b"securevol transit v1\0"
CONTEXT_PREFIX = b"securevol v1 volume "

_ENVELOPE_LEN = len(ENVELOPE_MAGIC) + VOLUME_ID_LEN + DEK_LEN
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
_MOUNT_PATTERN = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
_KEY_NAME_PATTERN = re.compile(_SEGMENT)
# A host name, IPv4 or IPv6 address, as urlsplit returns it without brackets.
_HOST_PATTERN = re.compile(r"[A-Za-z0-9.:-]+")

# Error texts of the Transit engine for the causes of an HTTP 400 that the user can fix, as
# OpenBao 2.7 returns them in the "errors" list of the response.
_AUTHENTICATION_FAILED = "message authentication failed"
_VERSION_TOO_OLD = "disallowed by policy (too old)"
_KEY_NOT_FOUND = "encryption key not found"
_KEY_TYPE_CANNOT_ENCRYPT = "not supported for key type"
# Maximum length of a server error text that a message repeats.
_MAX_REASON_LEN = 200

# HTTP status of each hvac exception, for error messages.
_HTTP_STATUS = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}


@dataclass(frozen=True, repr=False)
class TransitSettings:
    """Address of the Transit server, the key to use and the credentials for it."""

    address: str
    mount: str = DEFAULT_MOUNT
    key_name: str = DEFAULT_KEY_NAME
    token: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    namespace: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __repr__(self) -> str:
        return (
            f"TransitSettings(address={_redact_url(self.address)!r}, mount={self.mount!r}, "
            f"key_name={self.key_name!r}, token_file={self.token_file}, ca_file={self.ca_file})"
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "TransitSettings":
        """Read the ``SECUREVOL_TRANSIT_*`` variables; raise KeyProviderError on a missing or bad one."""

        def get(name: str) -> str | None:
            return environ.get(name) or None

        timeout_text = get("SECUREVOL_TRANSIT_TIMEOUT")
        settings = cls(
            address=get("SECUREVOL_TRANSIT_ADDR") or "",
            mount=(get("SECUREVOL_TRANSIT_MOUNT") or DEFAULT_MOUNT).strip("/"),
            key_name=get("SECUREVOL_TRANSIT_KEY") or DEFAULT_KEY_NAME,
            token=get("SECUREVOL_TRANSIT_TOKEN"),
            token_file=_optional_path(get("SECUREVOL_TRANSIT_TOKEN_FILE")),
            ca_file=_optional_path(get("SECUREVOL_TRANSIT_CA_FILE")),
            namespace=get("SECUREVOL_TRANSIT_NAMESPACE"),
            timeout=_parse_timeout(timeout_text) if timeout_text else DEFAULT_TIMEOUT,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise KeyProviderError, naming the environment variable, for an invalid setting."""
        # The messages never repeat the address, because it may contain a password.
        if not self.address.lower().startswith(("http://", "https://")):
            raise KeyProviderError(
                "SECUREVOL_TRANSIT_ADDR must be the Transit server's http:// or https:// URL."
            )
        if not all("!" <= char <= "~" for char in self.address):
            raise KeyProviderError(
                "SECUREVOL_TRANSIT_ADDR contains a space, a control character or a non-ASCII character; "
                "percent-encode them in a user name or password."
            )
        if not _userinfo_fits_basic_auth(self.address):
            raise KeyProviderError(
                "The user name and password in SECUREVOL_TRANSIT_ADDR must decode to Latin-1 characters, "
                "which HTTP basic authentication can send."
            )
        if "@" in _after_host(self.address):
            raise KeyProviderError(
                "SECUREVOL_TRANSIT_ADDR contains '@' after the host; percent-encode '/', '?', '#' and '@' "
                "in a user name or password."
            )
        if not _has_host_and_port(self.address):
            raise KeyProviderError(
                "SECUREVOL_TRANSIT_ADDR is not a valid URL; give the server's URL with a host name or "
                "IP address and an optional port from 1 to 65535, without a query or fragment."
            )
        if not _MOUNT_PATTERN.fullmatch(self.mount):
            raise KeyProviderError(
                f"SECUREVOL_TRANSIT_MOUNT {self.mount!r} is invalid; use letters, digits, '_', '-', '.' and '/'."
            )
        if not _KEY_NAME_PATTERN.fullmatch(self.key_name):
            raise KeyProviderError(
                f"SECUREVOL_TRANSIT_KEY {self.key_name!r} is invalid; use letters, digits, '_', '-' and '.'."
            )
        if (self.token is None) == (self.token_file is None):
            raise KeyProviderError(
                "Set exactly one of SECUREVOL_TRANSIT_TOKEN_FILE and SECUREVOL_TRANSIT_TOKEN."
            )
        if self.token is not None:
            _check_token(self.token, "SECUREVOL_TRANSIT_TOKEN")
        if self.ca_file is not None:
            _check_ca_file(self.ca_file)
        if self.namespace is not None and not _is_header_value(self.namespace):
            raise KeyProviderError(
                "SECUREVOL_TRANSIT_NAMESPACE must contain only printable ASCII characters and no leading or "
                "trailing space, because it is sent in an HTTP header."
            )
        if not (math.isfinite(self.timeout) and 0 < self.timeout <= MAX_TIMEOUT):
            raise KeyProviderError(
                f"SECUREVOL_TRANSIT_TIMEOUT must be a number of seconds greater than 0 and at most "
                f"{MAX_TIMEOUT:g}, not {self.timeout:g}."
            )


def _system_ca_bundle() -> str | bool:
    """Return OpenSSL's default CA file (SSL_CERT_FILE, else the system's bundle), or True if there is none.

    requests would otherwise trust certifi's bundle inside the virtualenv,
    which does not contain a CA added with update-ca-certificates.
    """
    return ssl.get_default_verify_paths().cafile or True


class TransitKeyProvider(KeyProvider):
    """Wraps DEKs with a key of an OpenBao or Vault Transit engine."""

    name = "transit"

    def __init__(self, settings: TransitSettings) -> None:
        settings.validate()
        self.settings = settings
        self._verify = str(settings.ca_file) if settings.ca_file else _system_ca_bundle()
        # The address for messages and logs, without a user name and password.
        self._address = _redact_url(settings.address.rstrip("/"))

    def __repr__(self) -> str:
        return f"TransitKeyProvider(address={self._address!r}, key={self.key_id!r})"

    @property
    def key_id(self) -> str:
        """The Transit key as MOUNT/keys/NAME: the identifier stored in every record."""
        return f"{self.settings.mount}/keys/{self.settings.key_name}"

    def wrap(self, dek: DataKey, volume_id: bytes) -> dict[str, Any]:
        _check_volume_id(volume_id)
        envelope = ENVELOPE_MAGIC + volume_id + dek.raw()

        data = self._request(
            "encrypt",
            "encrypt",
            lambda transit: transit.encrypt_data(
                self.settings.key_name,
                _b64(envelope),
                context=_context(volume_id),
                mount_point=self.settings.mount,
            ),
        )
        record = self._record(data)
        log.info("dek wrapped key=%s key_version=%s volume_id=%s", self.key_id, record["key_version"],
                 volume_id.hex())
        return record

    def unwrap(self, record: dict[str, Any], volume_id: bytes) -> DataKey:
        _check_volume_id(volume_id)
        ciphertext = self._check_record(record)

        data = self._request(
            "decrypt",
            "decrypt",
            lambda transit: transit.decrypt_data(
                self.settings.key_name,
                ciphertext,
                context=_context(volume_id),
                mount_point=self.settings.mount,
            ),
            record=record,
        )
        envelope = _unb64(data.get("plaintext"), "decrypt")
        return _open_envelope(envelope, volume_id)

    def rewrap(self, record: dict[str, Any], volume_id: bytes) -> dict[str, Any]:
        """Return *record* re-encrypted under the newest version of the Transit key.

        The DEK stays on the server. ``securevol rekey`` calls it for every volume after
        ``rotate_key``; then the old key versions can be retired with ``min_decryption_version``.
        """
        _check_volume_id(volume_id)
        ciphertext = self._check_record(record)

        data = self._request(
            "rewrap",
            "rewrap",
            lambda transit: transit.rewrap_data(
                self.settings.key_name,
                ciphertext,
                context=_context(volume_id),
                mount_point=self.settings.mount,
            ),
            record=record,
        )
        new_record = self._record(data)
        log.info("dek rewrapped key=%s key_version=%s old_key_version=%s volume_id=%s", self.key_id,
                 new_record["key_version"], record.get("key_version"), volume_id.hex())
        return new_record

    def rotate_key(self) -> int | None:
        """Add a new version of the Transit key; return its number if the server reports it.

        New wraps use the new version at once. Existing records keep unwrapping until they are
        rewrapped and the old versions are retired.
        """
        response = self._request(
            "rotate",
            "keys",
            lambda transit: transit.rotate_key(self.settings.key_name, mount_point=self.settings.mount),
            suffix="/rotate",
        )
        latest_version = response.get("latest_version") if isinstance(response, dict) else None
        log.info("transit key rotated key=%s key_version=%s", self.key_id, latest_version)
        return latest_version

    # Records

    def _record(self, data: Mapping[str, Any]) -> dict[str, Any]:
        ciphertext = data.get("ciphertext")
        key_version = data.get("key_version")
        if not isinstance(ciphertext, str) or not isinstance(key_version, int):
            raise KeyProviderError(
                f"The Transit server at {self._address} returned no ciphertext; check that "
                f"{self.key_id} is an encryption key."
            )
        return {
            "provider": self.name,
            "version": RECORD_VERSION,
            "key": self.key_id,
            "key_version": key_version,
            "ciphertext": ciphertext,
        }

    def _check_record(self, record: dict[str, Any]) -> str:
        """Return the ciphertext of *record* after checking that this provider can unwrap it."""
        check_record_provider(self, record)
        if record.get("version") != RECORD_VERSION:
            raise KeyProviderError(
                f"The wrapped key record has version {record.get('version')!r}; "
                f"this securevol reads version {RECORD_VERSION}."
            )
        if record.get("key") != self.key_id:
            raise KeyProviderError(
                f"The volume's key was wrapped with Transit key {record.get('key')!r}, but the daemon uses "
                f"{self.key_id!r}; set SECUREVOL_TRANSIT_MOUNT and SECUREVOL_TRANSIT_KEY to match."
            )

        ciphertext = record.get("ciphertext")
        if not isinstance(ciphertext, str) or not ciphertext.startswith("vault:v"):
            raise KeyProviderError("The wrapped key record has no valid 'ciphertext' field.")
        return ciphertext

    # Requests

    def _request(
        self,
        action: str,
        endpoint: str,
        call: Callable[[Any], Any],
        suffix: str = "",
        record: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run *call* with the Transit API and return the response's ``data``.

        *endpoint* and *suffix* rebuild the URL that *call* requests, and *record* is the wrapped
        key that it sends, both for error messages. Every failure becomes a KeyProviderError that
        names the method and URL. It contains no request or response body, only the server's
        error text in a few cases.
        SECUREVOL_TRANSIT_TIMEOUT bounds the whole request (see ``_run_with_deadline``).
        """
        url = f"{self._address}/v1/{self.settings.mount}/{endpoint}/{self.settings.key_name}{suffix}"
        if self.settings.ca_file is not None:
            # requests raises a bare OSError for a missing CA file, so check it here.
            _check_ca_file(self.settings.ca_file)
        token = self._read_token()
        # The error is raised outside the except clauses, so that it carries no __context__:
        # hvac's and requests' exceptions name the URL with the address's user name and password.
        error: KeyProviderError | None = None
        try:
            response = self._run_with_deadline(url, call, token)
        except hvac.exceptions.VaultError as exc:
            error = self._server_error(action, url, exc, record)
        except requests.exceptions.SSLError:
            error = KeyProviderError(
                f"TLS verification failed for POST {url}; set SECUREVOL_TRANSIT_CA_FILE to the CA "
                "certificate that signed the server's certificate."
            )
        except requests.exceptions.Timeout:
            error = self._timeout_error(url)
        except requests.exceptions.RequestException as exc:
            error = KeyProviderError(
                f"POST {url} failed ({type(exc).__name__}): the Transit server is unreachable; check "
                "SECUREVOL_TRANSIT_ADDR and that the server is running."
            )
        if error is not None:
            raise error

        if isinstance(response, requests.Response) and 300 <= response.status_code < 400:
            raise KeyProviderError(
                f"POST {url} returned HTTP {response.status_code}, a redirect to "
                f"{_describe_location(url, response.headers.get('Location'))}, which securevol does not "
                "follow; set SECUREVOL_TRANSIT_ADDR to the address of the Transit server itself."
            )
        if isinstance(response, requests.Response) and response.status_code == 204 and action == "rotate":
            return None  # servers that return no body for a rotation
        if not isinstance(response, dict):
            status = response.status_code if isinstance(response, requests.Response) else 200
            raise KeyProviderError(
                f"POST {url} returned HTTP {status} without a JSON object; check that SECUREVOL_TRANSIT_ADDR "
                "names the OpenBao or Vault API, not a web page or another service."
            )
        data = response.get("data")
        if not isinstance(data, dict):
            raise KeyProviderError(f"POST {url} returned a response without data; check the Transit server.")
        return data

    def _run_with_deadline(self, url: str, call: Callable[[Any], Any], token: str) -> Any:
        """Run *call* on a worker thread; raise KeyProviderError unless it returns within the timeout.

        requests' own timeout bounds only each wait for the next bytes. A server that sends its
        response one byte at a time could therefore block the caller without limit, and with it
        the registry lock that the daemon holds during a wrap. Here the timeout bounds the whole
        request: connecting, sending and reading the full response. Exceptions of *call* are
        re-raised here.

        A request that times out keeps its thread until the server finishes or closes the
        connection, or until one read waits longer than the timeout. Its result is discarded,
        but the server may still carry the request out (a rotation, for example). Each request
        uses its own hvac client and requests session, so a late request shares no state with
        later ones. At most MAX_REQUESTS_IN_FLIGHT requests run at once in a process, counting
        those that timed out, so the threads that a slow server keeps busy are bounded.
        """
        deadline = time.monotonic() + self.settings.timeout
        slots = _request_slots
        if not slots.acquire(timeout=self.settings.timeout):
            raise KeyProviderError(
                f"POST {url} was not sent, because {MAX_REQUESTS_IN_FLIGHT} other requests to the Transit "
                "server, counting those that timed out, are still running; check the Transit server and "
                "the network path to it."
            )

        future: concurrent.futures.Future = concurrent.futures.Future()
        timed_out = threading.Event()
        worker = threading.Thread(
            target=self._run_request,
            args=(call, token, future, slots, timed_out, url),
            name="securevol-transit-request",
            daemon=True,
        )
        try:
            worker.start()
        except BaseException:
            slots.release()
            raise

        concurrent.futures.wait([future], timeout=max(0.0, deadline - time.monotonic()))
        if not future.done():
            timed_out.set()
            raise self._timeout_error(url)
        return future.result()

    def _run_request(
        self,
        call: Callable[[Any], Any],
        token: str,
        future: concurrent.futures.Future,
        slots: threading.BoundedSemaphore,
        timed_out: threading.Event,
        url: str,
    ) -> None:
        """Run *call* with a new hvac client and store its result or exception in *future*."""
        started = time.monotonic()
        outcome = "response"
        try:
            session = requests.Session()
            # Proxy variables (HTTP_PROXY, ALL_PROXY) would hand the token, and on encrypt the
            # DEK, to the proxy of a plain http:// address, so only the address itself is used.
            session.trust_env = False
            # hvac takes verify from a session it is given, not from its own argument.
            session.verify = self._verify
            client = hvac.Client(
                url=self.settings.address.rstrip("/"),
                token=token,
                verify=self._verify,
                timeout=self.settings.timeout,
                namespace=self.settings.namespace,
                # requests would send the token, and on encrypt the DEK, to wherever a redirect points.
                allow_redirects=False,
                session=session,
            )
            try:
                result = call(client.secrets.transit)
            finally:
                client.adapter.close()
        except BaseException as exc:
            outcome = type(exc).__name__
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            slots.release()
            if timed_out.is_set():
                log.warning("transit request ended after its timeout, result discarded url=%s outcome=%s "
                            "seconds=%.1f", url, outcome, time.monotonic() - started)

    def _timeout_error(self, url: str) -> KeyProviderError:
        return KeyProviderTimeout(
            f"POST {url} timed out after {self.settings.timeout:g} s; check that the Transit server "
            "is up, or raise SECUREVOL_TRANSIT_TIMEOUT."
        )

    def _server_error(
        self, action: str, url: str, exc: hvac.exceptions.VaultError, record: Mapping[str, Any] | None
    ) -> KeyProviderError:
        status = _HTTP_STATUS.get(type(exc))
        where = f"POST {url} failed with HTTP {status}" if status else f"POST {url} failed"
        reason = _server_reason(exc)
        if status == 400:
            return self._bad_request_error(action, where, reason, record)
        if status in (401, 403) and action == "encrypt":
            # Transit returns 403, not 404, when a token without "create" encrypts with a missing key.
            return KeyProviderError(
                f"{where}: the token is invalid, expired or lacks permission to encrypt with {self.key_id}, "
                "or that key does not exist."
            )
        if status in (401, 403):
            return KeyProviderError(
                f"{where}: the token is invalid, expired or lacks permission to {action} with {self.key_id}."
            )
        if status == 404:
            return KeyProviderError(
                f"{where}: no Transit engine is mounted at {self.settings.mount!r} or the key does not exist."
            )
        if status == 503:
            return KeyProviderError(f"{where}: the Transit server is sealed or in standby; unseal it.")
        if reason:
            return KeyProviderError(f"{where}: the server reported {reason!r}.")
        return KeyProviderError(f"{where}; check the Transit server's log for the reason.")

    def _bad_request_error(
        self, action: str, where: str, reason: str, record: Mapping[str, Any] | None
    ) -> KeyProviderError:
        """Explain an HTTP 400 from its error text, which OpenBao sets for each cause."""
        mount, key_name = self.settings.mount, self.settings.key_name
        if _KEY_TYPE_CANNOT_ENCRYPT in reason:
            return KeyProviderError(
                f"{where}: {self.key_id} is not an encryption key, because its key type cannot encrypt; set "
                f"SECUREVOL_TRANSIT_KEY to a key created with 'bao write -f {mount}/keys/NAME derived=true'."
            )
        if action not in ("decrypt", "rewrap"):
            return KeyProviderError(
                f"{where}: the server rejected the request ({reason or 'no reason given'})."
            )

        if _VERSION_TOO_OLD in reason:
            key_version = record.get("key_version") if record else None
            version = key_version if isinstance(key_version, int) else "N"
            return KeyProviderError(
                f"{where}: the record was wrapped with version {version} of {self.key_id}, which the key's "
                f"min_decryption_version no longer allows. Lower it with 'bao write {mount}/keys/{key_name}"
                f"/config min_decryption_version={version}' to unlock this volume. Run 'securevol rekey', "
                "which rewraps every record under the newest version, before retiring old versions."
            )
        if _KEY_NOT_FOUND in reason:
            return KeyProviderError(
                f"{where}: the Transit key {self.key_id} does not exist on the server, so it was deleted; "
                "restore it there, for example from a backup of the key, to unlock this volume."
            )
        if _AUTHENTICATION_FAILED in reason:
            return KeyProviderError(
                f"{where}: the wrapped key failed authentication, so the record was modified, belongs "
                "to another volume or was wrapped with another key."
            )
        return KeyProviderError(
            f"{where}: the server rejected the wrapped key ({reason or 'no reason given'}), so the record "
            "was modified or wrapped with another key."
        )

    def _read_token(self) -> str:
        if self.settings.token is not None:
            return self.settings.token
        return read_token_file(self.settings.token_file)


def create_provider(settings: Any) -> TransitKeyProvider:
    """Build the provider from the ``SECUREVOL_TRANSIT_*`` environment variables.

    *settings* (the daemon's settings) carries nothing for this provider.
    """
    return TransitKeyProvider(TransitSettings.from_environ())


def read_token_file(path: Path) -> str:
    """Return the token in *path*, which must be a regular file that other users cannot read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyProviderError(f"The Transit token file {path} does not exist; write the token there.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            # O_NOFOLLOW fails with ELOOP when the last component is a symbolic link.
            raise KeyProviderError(
                f"The Transit token file {path} is a symbolic link, and the token file must not be a "
                "symlink; set SECUREVOL_TRANSIT_TOKEN_FILE to the file itself."
            ) from None
        raise KeyProviderError(f"Cannot open the Transit token file {path}: {exc.strerror}.") from None

    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyProviderError(f"The Transit token file {path} is not a regular file.")
        # Group access is allowed, so that a token agent of the same group can own the file.
        if st.st_mode & 0o007:
            raise KeyProviderError(
                f"The Transit token file {path} has mode {stat.S_IMODE(st.st_mode):04o}, so every user can "
                f"reach it; run 'chmod o-rwx {path}' and revoke the token if it may have been read."
            )
        content = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)

    token = content.decode("utf-8", "replace").strip()
    if not token:
        raise KeyProviderError(f"The Transit token file {path} is empty; write the token there.")
    _check_token(token, f"The Transit token file {path}")
    return token


def _check_token(token: str, source: str) -> None:
    """Raise KeyProviderError, naming *source* but not the token, unless *token* fits an HTTP header."""
    if "\n" in token or "\r" in token:
        raise KeyProviderError(f"{source} contains more than one line; it must contain only the token.")
    if not _is_header_value(token):
        raise KeyProviderError(
            f"{source} contains characters other than printable ASCII, or spaces around the token; it "
            "must contain only the token."
        )


def _check_ca_file(path: Path) -> None:
    if not (path.is_file() and os.access(path, os.R_OK)):
        raise KeyProviderError(
            f"SECUREVOL_TRANSIT_CA_FILE {path} does not exist or is not a readable file; set it to the CA "
            "certificate that signed the Transit server's certificate."
        )


def _after_host(url: str) -> str:
    """Return the path, query and fragment of *url*, or "" if it cannot be split."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    return parts.path + parts.query + parts.fragment


def _has_host_and_port(url: str) -> bool:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # brackets that do not match, or a port outside 0-65535
        return False
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return False
    if parts.netloc.endswith(":"):  # an empty port
        return False
    return bool(parts.hostname) and port != 0


def _userinfo_fits_basic_auth(url: str) -> bool:
    """Return whether the user name and password of *url* decode to Latin-1, as requests sends them."""
    try:
        parts = urlsplit(url)
        userinfo = [unquote(part) for part in (parts.username, parts.password) if part]
    except ValueError:
        return True  # the host and port check reports such a URL
    try:
        for part in userinfo:
            part.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _open_envelope(envelope: bytes, volume_id: bytes) -> DataKey:
    """Return the DEK in *envelope* after checking its format and its volume ID."""
    magic_len = len(ENVELOPE_MAGIC)
    if len(envelope) != _ENVELOPE_LEN or not hmac.compare_digest(envelope[:magic_len], ENVELOPE_MAGIC):
        raise KeyProviderError("The Transit key decrypted data that is not a securevol wrapped key.")

    wrapped_for = envelope[magic_len : magic_len + VOLUME_ID_LEN]
    if not hmac.compare_digest(wrapped_for, volume_id):
        raise KeyProviderError(
            "The wrapped key belongs to another volume, so the record was copied or swapped; "
            "restore the volume's own dek.json."
        )
    return DataKey(envelope[magic_len + VOLUME_ID_LEN :])


def _check_volume_id(volume_id: bytes) -> None:
    if len(volume_id) != VOLUME_ID_LEN:
        raise ValueError(f"a volume ID has {VOLUME_ID_LEN} bytes, not {len(volume_id)}")


def _context(volume_id: bytes) -> str:
    return _b64(CONTEXT_PREFIX + volume_id)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, operation: str) -> bytes:
    if not isinstance(value, str):
        raise KeyProviderError(f"The Transit {operation} response has no plaintext; check the Transit server.")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise KeyProviderError(f"The Transit {operation} response is not valid base64.") from None


def _redact_url(url: str) -> str:
    """Return *url* without the user name and password that may precede its host.

    Everything up to the last "@" goes, even past a "/" that an unencoded password may contain.
    The URLs printed here have no "@" in their path, because mount and key names cannot contain it.
    """
    scheme, separator, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{separator}{rest.rpartition('@')[2]}"


def _server_reason(exc: hvac.exceptions.VaultError) -> str:
    """Return the server's error texts from *exc*, or "" if they are missing, long or not printable ASCII.

    These are short fixed texts such as "encryption key not found". A longer or stranger text
    is left out, because it may come from something other than the Transit engine.
    """
    errors = exc.errors if isinstance(exc.errors, list) else []
    reason = "; ".join(error for error in errors if isinstance(error, str))
    if len(reason) > _MAX_REASON_LEN or not _is_printable_ascii(reason):
        return ""
    return reason


def _is_printable_ascii(text: str) -> bool:
    return all(" " <= char <= "~" for char in text)


def _is_header_value(text: str) -> bool:
    """Return whether *text* can be sent as an HTTP header value as it is: printable ASCII, not padded."""
    return _is_printable_ascii(text) and text == text.strip()


def _describe_location(request_url: str, location: str | None) -> str:
    """Return the scheme, host and port that a redirect's Location header points to.

    Nothing else of the header is shown: it comes from the server and may contain anything.
    """
    if not location:
        return "no address (the response has no Location header)"
    invalid = "an address that is not a valid http or https URL"
    try:
        target = urlsplit(urljoin(request_url, location))
        port = target.port or {"http": 80, "https": 443}.get(target.scheme)
    except ValueError:
        return invalid
    host = target.hostname
    if port is None or host is None or target.scheme not in ("http", "https"):
        return invalid
    if not _HOST_PATTERN.fullmatch(host):
        return invalid
    if ":" in host:
        host = f"[{host}]"
    return f"{target.scheme}://{host}:{port}"


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _parse_timeout(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise KeyProviderError(
            f"SECUREVOL_TRANSIT_TIMEOUT {text!r} is not a number; give the timeout in seconds."
        ) from None
