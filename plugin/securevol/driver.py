"""The volume lifecycle: create, remove, mount, unmount, path, get and list.

Every change goes through the registry's locks, because several gunicorn
workers serve dockerd at once and keep nothing in memory between requests.
Path, Get and List only read, without taking a lock, because dockerd calls
them often and they must not wait for a mount in progress.
"""

import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from securevol.access import (
    ACCESS_FILE,
    AccessPolicy,
    MountGuard,
    apply_default_policy,
    previous_policy,
    record_default_policy,
    write_access_file,
)
from securevol.audit import AuditLog
from securevol.config import Settings
from securevol.crypto import VOLUME_ID_LEN, DataKey
from securevol.engine import EngineClient, socket_path_from_host
from securevol.errors import KeyProviderError, MountFailed, SecurevolError, VolumeExists, VolumeInUse
from securevol.keys import KeyProvider, check_record_provider, create_provider
from securevol.mounter import FuseLaunch, Mounter, fuse_mountpoints, is_mounted
from securevol.options import parse_options, root_attributes, validate_name
from securevol.registry import FORMAT_VERSION, MountState, Registry, VolumeRecord, now_rfc3339

log = logging.getLogger(__name__)

# dockerd gives a volume plugin 2 minutes for a Create (longTimeout in moby's
# volume/drivers/proxy.go). A Create that waited this long for the registry lock
# and the key provider makes nothing, so that Docker's failure and the state agree.
CREATE_DEADLINE_SECONDS = 100


class VolumeDriver:
    """The eight operations of the Docker volume plugin protocol, on volumes kept in the state directory."""

    def __init__(self, settings: Settings, registry: Registry, key_provider: KeyProvider, mounter: Mounter,
                 guard: MountGuard | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.key_provider = key_provider
        self.mounter = mounter
        # Without a guard no allowlist is enforced at mount time or by the FUSE process.
        self.guard = guard

    @classmethod
    def from_settings(cls, settings: Settings) -> "VolumeDriver":
        """Prepare the state directory, load the key provider and return a driver."""
        prepare_state_dir(settings)
        registry = Registry(settings.state_dir)
        registry.ensure_layout()
        # First, so that a daemon refused for its key provider changes nothing.
        key_provider = create_provider(settings)
        registry.remove_incomplete()
        record_default_policy(settings.state_dir, settings.deny_by_default)
        _apply_default_policy(registry, settings.deny_by_default)
        return cls(settings, registry, key_provider, Mounter(settings.mount_timeout), mount_guard(settings))

    # -- changes -------------------------------------------------------------

    def create(self, name: str, opts: Any) -> None:
        """Create volume *name*; succeed without change if it exists with the same options."""
        validate_name(name)
        options = parse_options(opts)
        started = time.monotonic()

        with self.registry.creating_or_removing():
            if self.registry.exists(name):
                self._check_same_options(name, options)
                return

            volume_id = os.urandom(VOLUME_ID_LEN)
            wrapped_dek = self.key_provider.wrap(DataKey.generate(), volume_id)
            if time.monotonic() - started > CREATE_DEADLINE_SECONDS:
                # dockerd has given up on this request by now, so a volume made here would exist
                # although `docker volume create` reported a failure.
                log.warning("volume create abandoned vol=%s reason=deadline seconds=%.0f", name,
                            time.monotonic() - started)
                raise SecurevolError(
                    f"Creating volume {name!r} took longer than {CREATE_DEADLINE_SECONDS} s while other "
                    "volumes were created or the key provider was slow, so nothing was created; try again."
                )
            record = VolumeRecord(
                name=name,
                volume_id=volume_id.hex(),
                created_at=now_rfc3339(),
                options=options,
                key_provider=self.key_provider.name,
            )
            self.registry.create(record, wrapped_dek, root_attributes(options))

        log.info("volume created vol=%s provider=%s", name, self.key_provider.name)

    def _check_same_options(self, name: str, options: dict[str, str]) -> None:
        existing = self.registry.read_volume(name)
        if existing.options != options:
            raise VolumeExists(
                f"Volume {name!r} exists already with other options; "
                "create it with the same options or remove it first."
            )
        log.debug("volume exists with the same options vol=%s", name)

    def remove(self, name: str) -> None:
        """Remove volume *name*: destroy its wrapped DEK first, then its ciphertext."""
        validate_name(name)

        with self.registry.creating_or_removing():
            self.registry.read_volume(name)  # raises VolumeNotFound
            state = self._current_mounts(name)
            mountpoint = self._mountpoint(name)
            self._check_not_in_use(name, state, mountpoint)
            self.mounter.clear_stale(state.pid, mountpoint)

            # Once the wrapped DEK is gone, the ciphertext left on this disk
            # cannot be decrypted, even if the removal stops half way.
            self.registry.destroy_wrapped_dek(name)
            try:
                self.registry.remove(name)
            except OSError as exc:
                log.error("volume ciphertext not deleted vol=%s error=%s", name, exc)
                raise SecurevolError(
                    f"The key of volume {name!r} was destroyed, so its data is unreadable, but deleting its "
                    f"ciphertext failed ({exc.strerror}); delete {self.registry.volume_dir(name)} by hand."
                ) from exc
            _remove_if_empty(mountpoint)
            _remove_file(self._log_file(name))

        log.info("volume removed vol=%s", name)

    def _check_not_in_use(self, name: str, state: MountState, mountpoint: Path) -> None:
        if state.total == 0:
            return
        if self.mounter.is_serving(state.pid, mountpoint) or is_mounted(mountpoint):
            raise VolumeInUse(
                f"Volume {name!r} is still mounted ({state.total} mount(s)); stop the containers that "
                f"use it, or if none does, unmount it with 'fusermount3 -u {mountpoint}', then remove it."
            )
        # Docker only removes volumes that no container uses, and nothing is
        # mounted: the counts are left over from a lost Unmount.
        log.warning("stale mount counts dropped vol=%s count=%d", name, state.total)

    def mount(self, name: str, mount_id: str) -> str:
        """Count one more mount of *name* under *mount_id*, starting its FUSE process if needed."""
        validate_name(name)

        with self.registry.changing_mounts(name) as record:
            # Raises AccessDenied. The access file is written only once the mount can go ahead.
            policy = None
            if self.guard is not None:
                previous = previous_policy(self._access_file(name))
                policy = self.guard.mount_policy(name, record.options.get("allow"), previous)
            state = self._current_mounts(name)
            mountpoint = self._mountpoint(name)
            if self.mounter.is_serving(state.pid, mountpoint):
                self._write_access_file(name, policy)
            else:
                self._start_fuse(record, state, mountpoint, policy)
            state.add(mount_id)
            self.registry.write_mounts(name, state)

        log.info("volume mounted vol=%s id=%s count=%d pid=%d", name, mount_id, state.total, state.pid)
        return str(mountpoint)

    def _start_fuse(
        self, record: VolumeRecord, state: MountState, mountpoint: Path, policy: AccessPolicy | None
    ) -> None:
        # A volume that cannot be unlocked fails here, before anything of it changes on disk.
        self._check_format(record)
        dek = self._unwrap_dek(record)

        name = record.name
        if state.pid is not None or state.total:
            log.warning("fuse process not serving, replacing it vol=%s pid=%s count=%d", name, state.pid, state.total)
        self.mounter.clear_stale(state.pid, mountpoint)
        self._record_no_fuse_process(name, state)
        self._write_access_file(name, policy)

        launch = FuseLaunch(
            volume=name,
            volume_id=record.volume_id,
            backing=self.registry.data_dir(name),
            mountpoint=mountpoint,
            log_file=self._log_file(name),
            log_level=self.settings.log_level,
            access_file=self._access_file(name) if self.guard is not None else None,
        )
        try:
            state.pid = self.mounter.start(launch, dek)
        except MountFailed as exc:
            log.error("volume mount failed vol=%s error=%s", name, exc)
            raise
        state.mountpoint = str(mountpoint)
        log.info("fuse process started vol=%s pid=%d", name, state.pid)

    def _write_access_file(self, name: str, policy: AccessPolicy | None) -> None:
        """Write the policy that the volume's FUSE process reads (securevol.fuse_access)."""
        if policy is not None:
            write_access_file(self._access_file(name), policy)

    def _check_format(self, record: VolumeRecord) -> None:
        """Reject a volume whose backing store this release cannot read, before its key is unwrapped."""
        if record.format_version == FORMAT_VERSION:
            return
        log.error(
            "volume mount rejected vol=%s reason=unsupported_format format=%d supported=%d",
            record.name, record.format_version, FORMAT_VERSION,
        )
        raise MountFailed(
            f"Volume {record.name!r} uses on-disk format {record.format_version}, which this securevol "
            f"cannot read (it reads format {FORMAT_VERSION}); mount it with the release that created it "
            f"and copy its files to a new volume."
        )

    def _unwrap_dek(self, record: VolumeRecord) -> DataKey:
        try:
            wrapped = self.registry.read_wrapped_dek(record.name)
            check_record_provider(self.key_provider, wrapped)
            return self.key_provider.unwrap(wrapped, bytes.fromhex(record.volume_id))
        except KeyProviderError as exc:
            log.error("volume key unwrap failed vol=%s error=%s", record.name, exc)
            raise KeyProviderError(f"Volume {record.name!r} cannot be unlocked: {exc}") from exc

    def unmount(self, name: str, mount_id: str) -> None:
        """Count one mount of *name* under *mount_id* less, stopping its FUSE process at zero."""
        validate_name(name)

        with self.registry.changing_mounts(name):
            state = self._current_mounts(name)
            if not state.discard(mount_id):
                # A repeated Unmount, or one for counts dropped earlier, must
                # not take away the mount of another container.
                log.warning("unmount of unknown mount id ignored vol=%s id=%s", name, mount_id)
                self._stop_orphan(name, state)
                return
            # Recorded before the FUSE process is stopped, which can take
            # longer than a stopping daemon waits for this request. A process
            # left running stays recorded: the Unmount that dockerd sends
            # again stops it (_stop_orphan), a Mount adopts it, Remove stops it.
            self.registry.write_mounts(name, state)
            if state.total == 0:
                self.mounter.stop(state.pid, self._mountpoint(name))
                log.info("fuse process stopped vol=%s pid=%s", name, state.pid)
                self._record_no_fuse_process(name, state)

        log.info("volume unmounted vol=%s id=%s count=%d", name, mount_id, state.total)

    def _current_mounts(self, name: str) -> MountState:
        """Read the mount state of *name*, without counts that no container of this boot can hold.

        Nothing is mounted after a reboot, and dockerd never unmounts what it
        mounted before. Kept, those counts would hold the volume mounted for
        good once it is mounted again. A state is kept when it was written in
        this boot, or when a FUSE mount, even a dead one, is still at the
        mountpoint, because no mount survives a boot. A state without a boot
        ID (from an older release) and no mount counts as an earlier boot's.
        """
        state = self.registry.read_mounts(name)
        if state.written_this_boot or is_mounted(self._mountpoint(name)):
            return state
        if state.total or state.pid is not None:
            log.debug("mount state of an earlier boot ignored vol=%s count=%d", name, state.total)
        return MountState()

    def _stop_orphan(self, name: str, state: MountState) -> None:
        """Stop a FUSE process that serves no counted mount, left by an Unmount cut short after its write."""
        if state.total or state.pid is None:
            return
        mountpoint = self._mountpoint(name)
        if self.mounter.is_serving(state.pid, mountpoint):
            log.warning("fuse process without mounts stopped vol=%s pid=%d", name, state.pid)
            self.mounter.stop(state.pid, mountpoint)
        self._record_no_fuse_process(name, state)

    def _record_no_fuse_process(self, name: str, state: MountState) -> None:
        state.pid = None
        state.mountpoint = None
        self.registry.write_mounts(name, state)

    # -- reads, without the lock -----------------------------------------------

    def path(self, name: str) -> str:
        """Return the mountpoint of *name* if it is mounted, else ""."""
        validate_name(name)
        self.registry.read_volume(name)  # raises VolumeNotFound
        return self._mounted_path(self._current_mounts(name))

    def get(self, name: str) -> dict[str, Any]:
        """Return the protocol's description of volume *name*."""
        validate_name(name)
        return self._describe(self.registry.read_volume(name))

    def list(self) -> list[dict[str, Any]]:
        """Return the protocol's description of every volume."""
        mounted = fuse_mountpoints()  # read once, not once per volume
        return [self._describe(record, mounted) for record in self.registry.list_volumes()]

    @staticmethod
    def capabilities() -> dict[str, str]:
        # Volumes live on this host's disk, so Docker must not expect another
        # node of a swarm to have them.
        return {"Scope": "local"}

    def _describe(self, record: VolumeRecord, mounted: set[bytes] | None = None) -> dict[str, Any]:
        """Return the protocol's description of *record*; *mounted* is ``fuse_mountpoints()`` if already read."""
        state = self._current_mounts(record.name)
        description: dict[str, Any] = {"Name": record.name, "CreatedAt": record.created_at}
        mountpoint = self._mounted_path(state)
        if mountpoint:
            description["Mountpoint"] = mountpoint
        # Mountpoint follows the mount counts, which dockerd relies on. "mounted" is whether the
        # FUSE process still serves it, because a killed one leaves counts and containers get ENOTCONN.
        serving = bool(mountpoint) and self.mounter.is_serving(state.pid, Path(mountpoint), mounted)
        description["Status"] = {
            "volume_id": record.volume_id,
            "key_provider": record.key_provider,
            "format_version": record.format_version,
            "mounted": serving,
            "mount_count": state.total,
        }
        return description

    @staticmethod
    def _mounted_path(state: MountState) -> str:
        if state.total > 0 and state.mountpoint:
            return state.mountpoint
        return ""

    def _mountpoint(self, name: str) -> Path:
        return self.settings.mount_root / name

    def _log_file(self, name: str) -> Path:
        return self.settings.log_dir / f"{name}.log"

    def _access_file(self, name: str) -> Path:
        return self.registry.volume_dir(name) / ACCESS_FILE


def mount_guard(settings: Settings) -> MountGuard:
    """Build the mount-time allowlist check from the daemon's settings."""
    engine = EngineClient(socket_path_from_host(settings.docker_host))
    return MountGuard(engine, AuditLog(settings.audit_log_path), deny_by_default=settings.deny_by_default,
                      docker_socket=settings.docker_host, allow_set_command=settings.allow_set_command)


def prepare_state_dir(settings: Settings) -> None:
    """Create the state, mount root and log directories with mode 0700 and check who owns them.

    A directory that exists with a looser mode is tightened, with a warning.
    One owned by another user is rejected, because that user could read the
    wrapped keys or the plaintext mounts.
    """
    for path in (settings.state_dir, settings.mount_root, settings.log_dir):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_uid != os.geteuid():
            raise SecurevolError(f"The directory {path} is owned by uid {st.st_uid}; it must belong to uid {os.geteuid()}.")
        if stat.S_IMODE(st.st_mode) != 0o700:
            log.warning("directory mode tightened path=%s mode=%04o", path, stat.S_IMODE(st.st_mode))
            os.chmod(path, 0o700)


def _apply_default_policy(registry: Registry, deny_by_default: bool) -> None:
    """Give the access files of mounted volumes this daemon's --default-policy.

    Without it, a volume without an allowlist that stayed mounted across a
    restart from the allow to the deny policy would stay open to every container.
    """
    policy = "deny" if deny_by_default else "allow"
    for name in registry.volume_names():
        try:
            if not registry.exists(name):
                continue  # a directory whose record is missing, logged by remove_incomplete
            with registry.changing_mounts(name):
                changed = apply_default_policy(registry.volume_dir(name) / ACCESS_FILE, deny_by_default)
        except (SecurevolError, OSError, ValueError) as exc:
            log.warning("default policy not applied vol=%s error=%s", name, exc)
            continue
        if changed:
            log.info("default policy applied to mounted volume vol=%s policy=%s", name, policy)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("mountpoint not removed path=%s error=%s", path, exc.strerror)


def _remove_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
