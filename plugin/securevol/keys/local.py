"""The local key provider: a master key file on the host is the KEK.

The master key file contains exactly 32 random bytes, is owned by the daemon's
user and readable by it alone (mode 0600 or stricter). Unless an explicit
path is configured, it is created in the state directory on first start.

A DEK is wrapped with AES-256-GCM under the master key, with a fresh random
96-bit nonce per wrap. The associated data binds the record to its volume ID,
so a ``dek.json`` copied into another volume's directory does not unwrap. The
record carries a short key ID (a hash of the master key, which reveals
nothing about it) so that a daemon started with the wrong master key says so
instead of reporting a damaged record.

A provider made from a key file follows that file. It reads the file again
before each wrap, and before it unwraps a record of another key ID. Then it
also tries the previous master key, which a rotation keeps next to the file
(``master.key.previous``) until every record is wrapped anew.
``securevol rekey`` (rekey.py) drives a rotation; the steps on the key files
are here.

Keeping the master key on the same disk as the ciphertext protects against
copies of the backing store alone (backups that skip it), not against a
thief of the whole disk; an external KMS (``transit``) covers that case.
"""

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securevol.crypto import DEK_LEN, DataKey
from securevol.errors import KeyProviderError
from securevol.keys import KeyProvider, check_record_provider
from securevol.registry import DEK_FILE, VOLUME_FILE
from securevol.syscalls import fsync_dir, replace_file, temporary_files_of

log = logging.getLogger(__name__)

MASTER_KEY_LEN = 32
MASTER_KEY_FILE = "master.key"
PREVIOUS_SUFFIX = ".previous"
RECORD_VERSION = 1

_NONCE_LEN = 12
_TAG_LEN = 16
_WRAP_AAD_PREFIX = b"securevol local wrap v1\0"
_KEY_ID_PREFIX = b"securevol local KEK id v1\0"


class LocalKeyProvider(KeyProvider):
    """Wraps DEKs under a 32-byte master key, read again from *path* when that file changes."""

    name = "local"

    def __init__(self, master_key: bytes, path: Path | None = None) -> None:
        self._path = path
        # None: the first wrap reads the file again, in case it changed since the caller read it.
        self._file_identity: tuple[int, int, int] | None = None
        self._use(master_key)

    def __repr__(self) -> str:
        return f"LocalKeyProvider(key_id={self.key_id})"

    def wrap(self, dek: DataKey, volume_id: bytes) -> dict[str, Any]:
        # A rotation may have replaced the key file since the last wrap, and a
        # DEK wrapped under the old key would be lost when that key is retired.
        self._follow_key_file()
        nonce = os.urandom(_NONCE_LEN)
        wrapped = self._aead.encrypt(nonce, dek.raw(), _WRAP_AAD_PREFIX + volume_id)
        return {
            "provider": self.name,
            "version": RECORD_VERSION,
            "key_id": self.key_id,
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "wrapped_key": base64.b64encode(wrapped).decode("ascii"),
        }

    def unwrap(self, record: dict[str, Any], volume_id: bytes) -> DataKey:
        check_record_provider(self, record)
        if record.get("version") != RECORD_VERSION:
            raise KeyProviderError(
                f"The wrapped key record has version {record.get('version')!r}; "
                f"this securevol reads version {RECORD_VERSION}."
            )
        aead = self._aead_for(record.get("key_id"))
        if aead is None:
            raise KeyProviderError(
                f"The volume's key was wrapped with master key {record.get('key_id')!r}, but the daemon "
                f"has master key {self.key_id!r}; start the daemon with the master key file that has that ID, "
                "or, for a volume restored from a backup taken before a rekey, see 'Restoring a volume' in "
                "docs/operations.md."
            )

        nonce = _decode_field(record, "nonce", _NONCE_LEN)
        wrapped = _decode_field(record, "wrapped_key", DEK_LEN + _TAG_LEN)
        try:
            raw = aead.decrypt(nonce, wrapped, _WRAP_AAD_PREFIX + volume_id)
        except InvalidTag:
            raise KeyProviderError(
                "The volume's wrapped key failed authentication: the record was modified or "
                "belongs to another volume."
            ) from None
        return DataKey(raw)

    def _use(self, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_LEN:
            raise KeyProviderError(f"A master key has {MASTER_KEY_LEN} bytes, not {len(master_key)}.")
        self._aead = AESGCM(master_key)
        self.key_id = key_id_of(master_key)

    def _follow_key_file(self) -> None:
        """Load the key file again if it is not the file this provider read last."""
        if self._path is None:
            return
        # Taken before the read: if the file is replaced in between, the next call reads it again.
        identity = _file_identity(self._path)
        if identity == self._file_identity:
            return
        previous_key_id = self.key_id
        self._use(load_master_key(self._path))
        self._file_identity = identity
        if self.key_id != previous_key_id:
            log.info("master key reloaded path=%s key_id=%s", self._path, self.key_id)

    def _aead_for(self, key_id: Any) -> AESGCM | None:
        """Return the cipher of master key *key_id*: the current one, or the one a rotation retires."""
        if key_id == self.key_id:
            return self._aead
        if self._path is None:
            return None

        self._follow_key_file()
        if key_id == self.key_id:
            return self._aead
        previous = previous_key_path(self._path)
        if not previous.exists():
            return None
        previous_key = load_master_key(previous)
        return AESGCM(previous_key) if key_id_of(previous_key) == key_id else None


def key_id_of(master_key: bytes) -> str:
    """Return the short public identifier of *master_key* that wrapped records carry."""
    return hashlib.sha256(_KEY_ID_PREFIX + master_key).hexdigest()[:16]


def previous_key_path(path: Path) -> Path:
    """Return where a rotation keeps the master key it retires, until every DEK is wrapped anew.

    It lies next to the file that *path* leads to, so that a daemon given a
    symlink and a rotation given its target agree on it.
    """
    real = key_file_target(path)
    return real.with_name(real.name + PREVIOUS_SUFFIX)


def key_file_target(path: Path) -> Path:
    """Return the file that the key file path *path* leads to, after symlinks."""
    return Path(os.path.realpath(path))


def _file_identity(path: Path) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KeyProviderError(f"Cannot read the master key file {path}: {exc.strerror}.") from None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def create_provider(settings: Any) -> LocalKeyProvider:
    """Build the provider from ``settings.master_key`` or, if unset, STATE/master.key."""
    path = master_key_path(settings)
    if settings.master_key is not None:
        master_key = load_master_key(path)
    else:
        if not path.exists():
            _check_no_volume_needs_key(Path(settings.state_dir), path)
        master_key = load_or_create_master_key(path)
    _check_key_fits_volumes(Path(settings.state_dir), path, key_id_of(master_key))
    return LocalKeyProvider(master_key, path)


def _check_key_fits_volumes(state_dir: Path, path: Path, key_id: str) -> None:
    """Raise KeyProviderError if volumes have local records and none is wrapped with this key.

    A replaced key file would otherwise start a daemon whose new volumes are
    wrapped with a key the administrator will put back. During a rotation the
    records may also name the retired key in path.previous.
    """
    key_ids_in_use = _local_record_key_ids(state_dir)
    if not key_ids_in_use or key_id in key_ids_in_use:
        return
    previous = previous_key_path(path)
    if previous.exists() and key_id_of(load_master_key(previous)) in key_ids_in_use:
        return

    volume_count = sum(len(volumes) for volumes in key_ids_in_use.values())
    example_key, example_volumes = min(key_ids_in_use.items(), key=lambda item: item[1][0])
    raise KeyProviderError(
        f"The master key file {path} contains key {key_id}, but none of the {volume_count} volume(s) with "
        f"local keys was wrapped with it (volume {example_volumes[0]!r} needs key {example_key}); "
        "restore the right file, or give its path with --master-key or SECUREVOL_MASTER_KEY."
    )


def _local_record_key_ids(state_dir: Path) -> dict[str, list[str]]:
    """Return {key ID: volume names} of the readable local-provider records under *state_dir*.

    A record without a volume.json beside it is a Create that did not finish,
    which the next Create of its name replaces and a rotation leaves alone.
    """
    key_ids: dict[str, list[str]] = {}
    for record_path in sorted(state_dir.glob(f"volumes/*/{DEK_FILE}")):
        if not (record_path.parent / VOLUME_FILE).exists():
            continue
        try:
            record = json.loads(record_path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("provider") == LocalKeyProvider.name:
            key_ids.setdefault(str(record.get("key_id")), []).append(record_path.parent.name)
    return key_ids


def master_key_path(settings: Any) -> Path:
    """Return the master key file that *settings* name: ``master_key``, or STATE/master.key."""
    if settings.master_key is not None:
        return Path(settings.master_key)
    return Path(settings.state_dir) / MASTER_KEY_FILE


def _check_no_volume_needs_key(state_dir: Path, path: Path) -> None:
    """Raise KeyProviderError if a volume's DEK is wrapped by a local master key, now missing from *path*.

    A new key would unwrap none of those volumes. It would also put a KEK on the
    state directory's disk for an administrator who moved the old one to other
    storage and forgot to set SECUREVOL_MASTER_KEY.
    """
    wrapped = sorted(record.parent.name for record in state_dir.glob(f"volumes/*/{DEK_FILE}")
                     if _may_be_local_record(record))
    if wrapped:
        raise KeyProviderError(
            f"The master key file {path} is missing, but {len(wrapped)} volume(s), for example "
            f"{wrapped[0]!r}, have keys wrapped by a local master key; restore the file, or give its "
            "path with --master-key or SECUREVOL_MASTER_KEY."
        )


def _may_be_local_record(record: Path) -> bool:
    # A record that cannot be read counts, because its volume may need the missing key.
    try:
        return json.loads(record.read_bytes()).get("provider") == LocalKeyProvider.name
    except (OSError, ValueError, AttributeError):
        return True


def load_or_create_master_key(path: Path) -> bytes:
    """Return the master key in *path*, creating the file with a new random key if it is missing."""
    if not path.exists():
        _create_master_key(path)
    return load_master_key(path)


def load_master_key(path: Path) -> bytes:
    """Read the master key from *path* after checking its type, owner, mode and length."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyProviderError(
            f"The master key file {path} does not exist; give the path that the daemon uses with "
            "--master-key or SECUREVOL_MASTER_KEY, or for a state directory without volumes create "
            f"one with '(umask 077; head -c 32 /dev/urandom > {path})'."
        ) from None
    except OSError as exc:
        raise KeyProviderError(f"Cannot open the master key file {path}: {exc.strerror}.") from None

    try:
        _check_master_key_file(path, os.fstat(fd))
        data = os.read(fd, MASTER_KEY_LEN + 1)
    finally:
        os.close(fd)

    if len(data) != MASTER_KEY_LEN:
        raise KeyProviderError(f"The master key file {path} changed while it was read; start the daemon again.")
    return data


def _check_master_key_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyProviderError(f"The master key file {path} is not a regular file.")
    if st.st_uid != os.geteuid():
        raise KeyProviderError(
            f"The master key file {path} is owned by uid {st.st_uid}; it must belong to uid {os.geteuid()}."
        )
    if st.st_mode & 0o077:
        raise KeyProviderError(
            f"The master key file {path} has mode {stat.S_IMODE(st.st_mode):04o}, so other users "
            f"can reach it; run 'chmod 600 {path}' after checking that it was not copied."
        )
    if st.st_size != MASTER_KEY_LEN:
        raise KeyProviderError(
            f"The master key file {path} is {st.st_size} bytes long, not {MASTER_KEY_LEN}; restore the right "
            "file from your backup, or, if no volume was ever created with it, move it away and start the "
            "daemon again to create a new one."
        )


def _create_master_key(path: Path) -> None:
    # Write a temporary file, then link(2) it into place: the link fails if
    # another process created the key first, and no reader ever sees a
    # partly written key.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, os.urandom(MASTER_KEY_LEN))
        os.fsync(fd)
    finally:
        os.close(fd)

    try:
        os.link(tmp, path)
    except FileExistsError:
        log.info("master key created by another process path=%s", path)
    else:
        log.info("master key created path=%s", path)
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)



def start_rotation(path: Path) -> tuple[bytes, bytes]:
    """Put a new master key into the key file *path*, keep the old one in .previous; return (old, new).

    If an earlier rotation stopped before it finished, return its two keys
    instead, so that it can finish. The key file contains a valid key at every
    moment, so a daemon that starts meanwhile never makes a key of its own.
    A symlink at *path* stays: the file it leads to gets the new key.
    """
    path = key_file_target(path)
    previous = previous_key_path(path)
    current = load_master_key(path)
    _remove_temporary_key_files(path)
    if previous.exists():
        old = load_master_key(previous)
        if old != current:
            return old, current
        # Stopped after saving the old key but before the new one took its place.
        os.unlink(previous)

    replace_file(previous, current)
    replace_file(path, os.urandom(MASTER_KEY_LEN))
    return current, load_master_key(path)


def finish_rotation(path: Path) -> None:
    """Delete the master key that a rotation retired, once no record needs it."""
    path = key_file_target(path)
    previous = previous_key_path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(previous)
    _remove_temporary_key_files(path)
    fsync_dir(previous.parent)


def _remove_temporary_key_files(path: Path) -> None:
    """Remove key copies that a killed rotation left in temporary files next to the key file."""
    for leftover in temporary_files_of(path) + temporary_files_of(previous_key_path(path)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
        log.info("temporary key file removed path=%s", leftover)


def _decode_field(record: dict[str, Any], field: str, length: int) -> bytes:
    value = record.get(field)
    if not isinstance(value, str):
        raise KeyProviderError(f"The wrapped key record has no {field!r} field.")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyProviderError(f"The wrapped key record's {field!r} field is not valid base64.") from None
    if len(raw) != length:
        raise KeyProviderError(f"The wrapped key record's {field!r} field has {len(raw)} bytes, not {length}.")
    return raw
