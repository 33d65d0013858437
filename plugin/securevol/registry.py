"""Volume records and mount reference counts, kept on disk so that every gunicorn worker agrees.

Layout under the state directory (see docs/architecture.md)::

    registry.lock             exclusive: a volume is created or removed;
                              shared: one volume's mounts change
    registry.gate             taken exclusively before registry.lock, see below
    volumes/NAME/volume.json  the volume record; its presence means the volume exists
    volumes/NAME/dek.json     the wrapped DEK
    volumes/NAME/mounts.json  mount IDs with counts, FUSE process PID, mountpoint
    volumes/NAME/volume.lock  exclusive while that volume's mounts change
    volumes/NAME/data/        the backing store

Writers hold the locks through ``creating_or_removing()`` or
``changing_mounts(name)``. Two volumes can then mount at the same time, and
a volume directory is deleted only while nobody else holds a lock. Readers take
no lock: every JSON file is replaced atomically, so a reader sees either the
old or the new version.

flock(2) grants a shared lock while an exclusive request waits, so Mounts and
Unmounts that overlap one another would keep a Create or Remove waiting for as
long as they go on. Every taker of registry.lock therefore first takes
registry.gate exclusively. A Mount holds the gate only until it has its shared
lock. A Create or Remove holds it until it is done, so no new Mount gets ahead
of it, and it waits only for the Mounts already in progress.
"""

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from securevol.errors import InvalidVolumeName, SecurevolError, VolumeExists, VolumeNotFound
from securevol.options import validate_name
from securevol.syscalls import fsync_dir, replace_file

log = logging.getLogger(__name__)

# The on-disk format of a volume's backing store (docs/format.md, "Format versions"):
# 1 stored contents in 4 KiB blocks, 2 in 32 KiB blocks.
FORMAT_VERSION = 2

VOLUME_FILE = "volume.json"
DEK_FILE = "dek.json"
MOUNTS_FILE = "mounts.json"
VOLUME_LOCK_FILE = "volume.lock"
DATA_DIR = "data"


@dataclass(frozen=True)
class VolumeRecord:
    """The record of one volume, stored in volume.json."""

    name: str
    volume_id: str  # hex of the 16-byte volume ID
    created_at: str  # RFC 3339, UTC
    options: dict[str, str]
    key_provider: str
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VolumeRecord":
        return cls(
            name=str(data["name"]),
            volume_id=str(data["volume_id"]),
            created_at=str(data["created_at"]),
            options={str(k): str(v) for k, v in dict(data["options"]).items()},
            key_provider=str(data["key_provider"]),
            format_version=int(data["format_version"]),
        )



@functools.cache
def current_boot_id() -> str:
    """Return the kernel's boot ID, which changes with every boot (the same inside containers)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()

@dataclass
class MountState:
    """The mount state of one volume, stored in mounts.json: Docker mount IDs as a multiset and the FUSE process.

    Docker reuses a mount ID for ``docker cp`` into a running container, so
    an ID can be mounted more than once and must be counted. *boot_id* is the
    kernel's boot ID when the state was last written (None if the release that
    wrote it did not record one).
    """

    counts: dict[str, int] = field(default_factory=dict)
    pid: int | None = None
    mountpoint: str | None = None
    boot_id: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MountState":
        counts = {str(k): int(v) for k, v in dict(data.get("counts", {})).items() if int(v) > 0}
        pid = data.get("pid")
        boot_id = data.get("boot_id")
        return cls(
            counts=counts,
            pid=int(pid) if pid is not None else None,
            mountpoint=data.get("mountpoint"),
            boot_id=str(boot_id) if boot_id is not None else None,
        )

    @property
    def written_this_boot(self) -> bool:
        return self.boot_id == current_boot_id()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, mount_id: str) -> None:
        self.counts[mount_id] = self.counts.get(mount_id, 0) + 1

    def discard(self, mount_id: str) -> bool:
        """Remove one occurrence of *mount_id*; return False if it was not mounted."""
        count = self.counts.get(mount_id, 0)
        if count == 0:
            return False
        if count == 1:
            del self.counts[mount_id]
        else:
            self.counts[mount_id] = count - 1
        return True


class Registry:
    """The volumes and mounts recorded under one state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.volumes_dir = self.state_dir / "volumes"
        self._lock_path = self.state_dir / "registry.lock"
        self._gate_path = self.state_dir / "registry.gate"

    def ensure_layout(self) -> None:
        """Create the volumes directory (mode 0700) if it is missing."""
        self.volumes_dir.mkdir(mode=0o700, exist_ok=True)

    # -- locks ---------------------------------------------------------------

    @contextlib.contextmanager
    def creating_or_removing(self) -> Iterator[None]:
        """Hold the registry lock exclusively, as creating or removing a volume needs."""
        with _flock(self._gate_path, fcntl.LOCK_EX), _flock(self._lock_path, fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def changing_mounts(self, name: str) -> Iterator[VolumeRecord]:
        """Hold the lock of volume *name* and yield its record; raise VolumeNotFound if it does not exist."""
        with self._shared_registry_lock():
            record = self.read_volume(name)
            with _flock(self.volume_dir(name) / VOLUME_LOCK_FILE, fcntl.LOCK_EX):
                yield record

    @contextlib.contextmanager
    def _shared_registry_lock(self) -> Iterator[None]:
        with _flock(self._gate_path, fcntl.LOCK_EX):
            fd = _open_lock_file(self._lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
        try:
            yield
        finally:
            os.close(fd)

    # -- reading -------------------------------------------------------------

    def volume_dir(self, name: str) -> Path:
        return self.volumes_dir / validate_name(name)

    def data_dir(self, name: str) -> Path:
        return self.volume_dir(name) / DATA_DIR

    def exists(self, name: str) -> bool:
        return (self.volume_dir(name) / VOLUME_FILE).is_file()

    def read_volume(self, name: str) -> VolumeRecord:
        data = _read_json(self.volume_dir(name) / VOLUME_FILE)
        if data is None:
            raise VolumeNotFound(f"Volume {name!r} does not exist.")
        return _parse(VolumeRecord.from_json, data, name, VOLUME_FILE)

    def read_wrapped_dek(self, name: str) -> dict[str, Any]:
        data = _read_json(self.volume_dir(name) / DEK_FILE)
        if not isinstance(data, dict):
            # Remove destroys the wrapped key first, so this is most often a Remove that was cut short.
            raise SecurevolError(
                f"Volume {name!r} has no wrapped key, so its data cannot be decrypted; if it was being "
                f"removed, run 'docker volume rm {name}' again, else restore its dek.json from a backup."
            )
        return data

    def read_mounts(self, name: str) -> MountState:
        data = _read_json(self.volume_dir(name) / MOUNTS_FILE)
        if data is None:
            return MountState()
        return _parse(MountState.from_json, data, name, MOUNTS_FILE)

    def volume_names(self) -> list[str]:
        """Return the names of the volume directories, complete or not, sorted."""
        try:
            return sorted(entry.name for entry in os.scandir(self.volumes_dir) if entry.is_dir())
        except FileNotFoundError:
            return []

    def list_volumes(self) -> list[VolumeRecord]:
        """Return every complete volume record, sorted by name, skipping damaged ones with a warning."""
        records = []
        for name in self.volume_names():
            try:
                records.append(self.read_volume(name))
            except VolumeNotFound:
                continue  # a Create that did not finish
            except SecurevolError as exc:
                log.warning("volume record unreadable vol=%s error=%s", name, exc)
        return records

    # -- writing (callers hold the right lock) -------------------------------

    def remove_incomplete(self) -> None:
        """Remove the volume directories that an interrupted Create or Remove left behind.

        Such a directory has no record, and it has either no wrapped DEK (Remove destroys it
        first) or no ciphertext (a volume is never mounted before its Create ends), so none of
        its data can be read. A directory with both has lost only its record. It is kept and logged,
        because its wrapped DEK is the only key to its data. Takes the registry lock itself.
        """
        with self.creating_or_removing():
            removed = False
            for name in self.volume_names():
                try:
                    volume_dir = self.volume_dir(name)
                except InvalidVolumeName:
                    continue  # not made by securevol
                if (volume_dir / VOLUME_FILE).exists():
                    continue
                try:
                    _check_leftover(volume_dir, name)
                except VolumeExists as exc:
                    log.warning("volume record missing, directory kept vol=%s error=%s", name, exc)
                    continue
                _remove_leftover(volume_dir, name)
                removed = True
            if removed:
                fsync_dir(self.volumes_dir)

    def create(self, record: VolumeRecord, wrapped_dek: dict[str, Any], root_attributes: tuple[int, int, int]) -> None:
        """Write a new volume's directories, wrapped DEK and record, the record last.

        *root_attributes* are (uid, gid, mode) of the backing store's root
        directory, which the FUSE process shows as the volume's root.
        """
        volume_dir = self.volume_dir(record.name)
        if volume_dir.exists():
            _check_leftover(volume_dir, record.name)
            _remove_leftover(volume_dir, record.name)

        volume_dir.mkdir(mode=0o700)
        data_dir = volume_dir / DATA_DIR
        data_dir.mkdir(mode=0o700)
        uid, gid, mode = root_attributes
        os.chown(data_dir, uid, gid)
        os.chmod(data_dir, mode)

        _write_json(volume_dir / DEK_FILE, wrapped_dek)
        _write_json(volume_dir / MOUNTS_FILE, asdict(MountState()))
        _write_json(volume_dir / VOLUME_FILE, asdict(record))
        fsync_dir(self.volumes_dir)

    def update_options(self, name: str, options: dict[str, str]) -> VolumeRecord:
        """Replace the options in the record of volume *name* and return the new record.

        The caller holds ``changing_mounts(name)``, so no Mount reads the record meanwhile.
        """
        record = dataclasses.replace(self.read_volume(name), options=dict(options))
        _write_json(self.volume_dir(name) / VOLUME_FILE, asdict(record))
        return record

    def write_mounts(self, name: str, state: MountState) -> None:
        state.boot_id = current_boot_id()
        _write_json(self.volume_dir(name) / MOUNTS_FILE, asdict(state))

    def check_leftover(self, name: str) -> None:
        """Raise VolumeExists if volume *name* has no record but has ciphertext and a wrapped DEK."""
        _check_leftover(self.volume_dir(name), name)

    def replace_wrapped_dek(self, name: str, wrapped_dek: dict[str, Any]) -> None:
        """Store *wrapped_dek* as volume *name*'s record, atomically, inside ``creating_or_removing()``."""
        _write_json(self.volume_dir(name) / DEK_FILE, wrapped_dek)

    def destroy_wrapped_dek(self, name: str) -> None:
        """Delete the wrapped DEK and make the deletion durable, so the ciphertext becomes unreadable."""
        volume_dir = self.volume_dir(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(volume_dir / DEK_FILE)
        fsync_dir(volume_dir)

    def remove(self, name: str) -> None:
        """Delete what is left of the volume: the record first, then the ciphertext and the rest."""
        volume_dir = self.volume_dir(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(volume_dir / VOLUME_FILE)
        fsync_dir(volume_dir)
        shutil.rmtree(volume_dir)
        fsync_dir(self.volumes_dir)


def _check_leftover(volume_dir: Path, name: str) -> None:
    """Raise VolumeExists unless *volume_dir* is what a failed Create or an interrupted Remove leaves.

    A failed Create leaves no ciphertext, because the volume was never mounted.
    An interrupted Remove leaves no wrapped DEK, because Remove destroys it
    first. A directory with both has lost only its record, and replacing it
    would destroy the only key to its data.
    """
    data_dir = volume_dir / DATA_DIR
    if not data_dir.is_dir() or not (volume_dir / DEK_FILE).exists():
        return
    with os.scandir(data_dir) as entries:
        has_ciphertext = any(True for _ in entries)
    if has_ciphertext:
        raise VolumeExists(
            f"Volume {name!r} has ciphertext and a wrapped key but no {VOLUME_FILE}; restore that file "
            f"from a backup, or move {volume_dir} away to reuse the name."
        )


def _remove_leftover(volume_dir: Path, name: str) -> None:
    """Delete what a failed Create or an interrupted Remove left, once _check_leftover passed it."""
    log.warning("incomplete volume removed vol=%s", name)
    shutil.rmtree(volume_dir)


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def _flock(path: Path, operation: int) -> Iterator[None]:
    # A fresh open file description per acquisition: flock(2) locks belong to
    # it, so two threads or processes holding their own descriptors exclude
    # each other.
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SecurevolError(f"The registry file {path} cannot be read ({exc}); restore it from a backup.") from exc


def _parse(parser, data: Any, name: str, file_name: str):
    try:
        return parser(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SecurevolError(
            f"The registry file {file_name} of volume {name!r} is damaged ({exc!r}); restore it from a backup."
        ) from exc


def _write_json(path: Path, data: Any) -> None:
    """Replace *path* atomically and durably with *data* as JSON."""
    replace_file(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")
