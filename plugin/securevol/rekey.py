"""Key rotation: wrap every volume's DEK under a new KEK, leaving the ciphertext as it is.

``securevol rekey`` runs this while the daemon may keep running. It holds the
registry lock that Create, Remove and Mount also take, so none of them reads
a wrapped-key record that is being replaced. Mounted volumes keep their DEK
and notice nothing.

Local provider: a new master key replaces the old one in its file, the old
one stays in ``master.key.previous`` while records are rewrapped, and is
deleted last. A daemon unwraps records under either key meanwhile, and a
rotation that stops half way finishes when it runs again. Every record is
unwrapped before anything changes, so a volume that cannot be unwrapped stops
the rotation before it starts.

Transit provider: optionally a new version of the Transit key, then each
record rewrapped on the server under the newest version. The DEK never
reaches securevol, and records stay valid throughout.
"""

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from securevol.crypto import DataKey
from securevol.errors import (
    KeyProviderError,
    KeyProviderTimeout,
    SecurevolError,
    VolumeExists,
    VolumeNotFound,
)
from securevol.keys import create_provider, local
from securevol.registry import DEK_FILE, Registry
from securevol.syscalls import temporary_files_of

log = logging.getLogger(__name__)


@dataclass
class RekeyResult:
    """The outcome of a rotation: the KEK before and after, and the volumes it rewrapped or left alone."""

    provider: str
    old_key: str
    new_key: str
    rewrapped: list[str] = field(default_factory=list)
    other_provider: list[str] = field(default_factory=list)


@dataclass
class _WrappedVolume:
    name: str
    volume_id: bytes
    record: dict[str, Any]


def rekey(settings: Any, rotate_transit_key: bool = False) -> RekeyResult:
    """Rewrap the DEK of every volume in ``settings.state_dir`` under the newest KEK of its provider."""
    registry = Registry(settings.state_dir)
    if settings.key_provider == local.LocalKeyProvider.name:
        if rotate_transit_key:
            raise KeyProviderError("--rotate-transit-key applies to the transit key provider only.")
        return _rekey_local(registry, local.master_key_path(settings))
    return _rekey_with_provider(registry, create_provider(settings), rotate_transit_key)


def _rekey_local(registry: Registry, path) -> RekeyResult:
    if not registry.volumes_dir.is_dir():
        # Checked before the lock, whose file would otherwise be left in a wrong directory.
        raise _no_local_volumes(registry)
    with registry.creating_or_removing():
        volumes, others = _wrapped_volumes(registry, local.LocalKeyProvider.name)
        if not volumes:
            # A mistyped --state-dir would otherwise pass every check, and the rotation
            # would retire the key of the volumes in the right one.
            raise _no_local_volumes(registry)
        current = local.LocalKeyProvider(local.load_master_key(path))
        previous_path = local.previous_key_path(path)
        if previous_path.exists():
            previous = local.LocalKeyProvider(local.load_master_key(previous_path))
            deks = _unwrap_all(volumes, {previous.key_id: previous, current.key_id: current})
        else:
            deks = _unwrap_all(volumes, {current.key_id: current})

        try:
            old_key, new_key = local.start_rotation(path)
        except OSError as exc:
            # Only a copy of the current key may be left in .previous, which the next run removes.
            raise KeyProviderError(
                f"Cannot write the new master key next to {path} ({exc.strerror}); the key file's "
                "directory must be writable during a rotation. Nothing was changed."
            ) from exc
        old, new = local.LocalKeyProvider(old_key), local.LocalKeyProvider(new_key)
        result = RekeyResult(local.LocalKeyProvider.name, old.key_id, new.key_id, other_provider=others)
        for volume in volumes:
            if volume.record.get("key_id") == new.key_id:
                continue  # rewrapped by a rotation that stopped half way
            _store(registry, volume, new.wrap(deks[volume.name], volume.volume_id), new.key_id)
            result.rewrapped.append(volume.name)

        local.finish_rotation(path)
    log.info("key rotated provider=local old_key_id=%s key_id=%s volumes=%d", old.key_id, new.key_id,
             len(result.rewrapped))
    return result


def _no_local_volumes(registry: Registry) -> KeyProviderError:
    return KeyProviderError(
        f"No volume in {registry.volumes_dir} has its key wrapped by a local master key, so nothing "
        "was changed; give the --state-dir that the daemon uses."
    )


def _unwrap_all(
    volumes: list[_WrappedVolume], providers: dict[str, local.LocalKeyProvider]
) -> dict[str, DataKey]:
    """Return each volume's DEK; raise for the first record that none of *providers* unwraps."""
    deks = {}
    for volume in volumes:
        provider = providers.get(volume.record.get("key_id"))
        if provider is None:
            raise KeyProviderError(
                f"Volume {volume.name!r} has its key wrapped with master key {volume.record.get('key_id')!r}, "
                f"which is not in the master key file; nothing was changed. Give the --master-key that the "
                "daemon uses, or, for a volume restored from a backup taken before a rekey, put the master key "
                "file of that backup at master.key.previous beside the key file (mode 0600) and run rekey again."
            )
        try:
            deks[volume.name] = provider.unwrap(volume.record, volume.volume_id)
        except KeyProviderError as exc:
            raise KeyProviderError(
                f"Volume {volume.name!r} cannot be unlocked, so nothing was changed: {exc}"
            ) from exc
    return deks


def _rekey_with_provider(registry: Registry, provider: Any, rotate: bool) -> RekeyResult:
    """Rewrap on the server: the Transit provider's rewrap never returns the DEK."""
    with registry.creating_or_removing():
        volumes, others = _wrapped_volumes(registry, provider.name)
        old_versions = sorted({str(volume.record.get("key_version")) for volume in volumes})
        if rotate:
            _rotate_provider_key(provider)

        result = RekeyResult(provider.name, ",".join(old_versions), "", other_provider=others)
        for volume in volumes:
            try:
                new_record = provider.rewrap(volume.record, volume.volume_id)
            except KeyProviderError as exc:
                raise KeyProviderError(
                    f"Volume {volume.name!r} was not rewrapped ({exc}); its record still works, and "
                    f"{len(result.rewrapped)} volume(s) before it were rewrapped."
                ) from exc
            result.new_key = str(new_record.get("key_version"))
            _store(registry, volume, new_record, f"{provider.key_id} version {result.new_key}")
            result.rewrapped.append(volume.name)
    log.info("key rotated provider=%s key=%s key_version=%s volumes=%d", provider.name, provider.key_id,
             result.new_key or "-", len(result.rewrapped))
    return result


def _rotate_provider_key(provider: Any) -> None:
    try:
        provider.rotate_key()
    except KeyProviderTimeout as exc:
        # The server may have added the version: a second --rotate-transit-key would add another.
        raise KeyProviderError(
            f"The rotation may have happened on the server although its response timed out ({exc}) "
            "Check the key's latest_version there, then run 'securevol rekey' without "
            "--rotate-transit-key to rewrap the records."
        ) from exc


def _wrapped_volumes(registry: Registry, provider_name: str) -> tuple[list[_WrappedVolume], list[str]]:
    """Return the volumes whose DEK *provider_name* wraps, and the names of those another provider wraps.

    A volume whose record cannot be read stops the rotation: its DEK would stay
    wrapped under a KEK that the rotation deletes. A wrapped key without a
    volume record is a Create that did not finish, whose next Create replaces it.
    """
    volumes, others = [], []
    for name in registry.volume_names():
        _remove_temporary_records(registry, name)
        try:
            record = registry.read_volume(name)
        except VolumeNotFound:
            _check_unfinished_create(registry, name)
            log.warning("rekey skips an unfinished create vol=%s", name)
            continue
        except SecurevolError as exc:
            raise SecurevolError(
                f"Volume {name!r} cannot be rewrapped, so nothing was changed: {exc}"
            ) from exc

        if record.key_provider != provider_name:
            others.append(name)
            continue
        if not (registry.volume_dir(name) / DEK_FILE).exists():
            # A Remove that stopped after destroying the key: nothing is left to rewrap.
            log.warning("rekey skips a volume without wrapped key vol=%s", name)
            continue
        wrapped = registry.read_wrapped_dek(name)
        volumes.append(_WrappedVolume(name, bytes.fromhex(record.volume_id), wrapped))
    return volumes, others


def _check_unfinished_create(registry: Registry, name: str) -> None:
    """Raise unless volume *name*, which has no record, is a Create that did not finish."""
    try:
        registry.check_leftover(name)
    except VolumeExists as exc:
        raise SecurevolError(f"{exc} Nothing was changed.") from exc


def _remove_temporary_records(registry: Registry, name: str) -> None:
    """Remove wrapped-key records that a killed rotation or Create left in temporary files."""
    for leftover in temporary_files_of(registry.volume_dir(name) / DEK_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)


def _store(registry: Registry, volume: _WrappedVolume, record: dict[str, Any], key: str) -> None:
    registry.replace_wrapped_dek(volume.name, record)
    log.info("wrapped key rewrapped vol=%s provider=%s key=%s", volume.name, record.get("provider"), key)
