"""The allowlist at mount time and on each access inside a volume's FUSE process.

Mount time (``MountGuard``, in the daemon). dockerd's Mount request carries a
random ID, not the container, so the guard queries the Engine API for the
containers that use the volume (``EngineClient.mount_candidates``):

- none: the container is still being created, and dockerd itself copies the
  image's files into the new volume; the mount is allowed, and the FUSE
  process lets only dockerd in until a container is approved;
- all of them allowed: the mount is allowed, whichever one is starting;
- otherwise each candidate is inspected again with a short timeout.
  dockerd holds a container's lock while it starts it or runs ``docker cp``
  on it (dockerd 20.10 ``containerStart``, ``containerArchivePath``), so the
  inspect of the container being mounted for gets no response until the
  Mount returns. If every candidate that timed out is allowed, the mount is
  allowed. If a disallowed one timed out, or none did, it is refused;
- dockerd accepts the request but does not respond: the mount is allowed,
  and the approvals of the volume's last mount that the rules still contain
  are carried over as unverified (``MountGuard._approve_without_engine``).

The guard writes the volume's access file (``access.json`` next to the
record, mode 0600) before the FUSE process starts or the mount is counted:
the allowlist, the daemon's default, dockerd's socket, the audit log and the
containers approved at mount time.

Each access (``AccessChecker``, in the FUSE process). A request carries the
caller's PID; its cgroup names the container (``securevol.containers``).
Approved containers pass at once, other containers are looked up through the
Engine API and matched. A container with an unverified approval passes for a
few seconds at a time while dockerd does not respond at all (its inspect and
GET /version both time out), and is looked up and matched like any other once
it does. Host processes pass if the allowlist has ``host``,
and dockerd always passes, because it copies image files into a new volume
and serves ``docker cp``. Kernel threads pass: they write back pages of files
that were opened after a check. Decisions are cached per container (per PID
with its start time, so a reused PID is not mistaken for the old process),
so a long read or write pays nothing per block.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from securevol.audit import AuditLog
from securevol.containers import (
    UnknownProcess,
    identify_process,
    is_docker_daemon,
    process_start_time,
)
from securevol.engine import EngineClient, EngineError, EngineTimeout, VolumeUser, socket_path_from_host
from securevol.errors import AccessDenied
from securevol.policy import Allowlist, AllowlistError, ContainerInfo, Rule, resolve_allowlist
from securevol.syscalls import replace_file

log = logging.getLogger(__name__)

ACCESS_FILE = "access.json"
# Next to it, written by the FUSE process: the IDs of containers whose unverified approval it
# checked against the rules once dockerd responded, and refused. The daemon carries no
# approval of these over again (previous_policy).
REVOKED_FILE = "revoked.json"

# In the state directory: the --default-policy of the daemon that last started
# on it, for the allow commands, which run without the daemon's settings.
DEFAULT_POLICY_FILE = "default-policy"
ACCESS_FILE_VERSION = 1

# How long the mount-time guard waits for an inspect before it counts the
# container as locked by dockerd, that is, as the one being started.
PROBE_TIMEOUT = 1.0
# Engine API timeout inside the FUSE process, which serves no other request meanwhile.
FUSE_ENGINE_TIMEOUT = 2.0
# A refusal is remembered this long, so a failing container does not make a
# request to dockerd (and an audit record) per file operation.
DENY_CACHE_SECONDS = 2.0
# How long an unverified approval lets its container in before dockerd is asked again.
UNVERIFIED_RECHECK_SECONDS = 5.0
# How often a cached decision looks at the access file for a changed allowlist.
RELOAD_SECONDS = 1.0
_MAX_CACHED_PIDS = 4096

_PF_KTHREAD = 0x00200000

_HOST = "host"
_DOCKERD = "dockerd"
_KERNEL = "kernel"
_SELF = "self"


# -- the access file -------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessPolicy:
    """The contents of a volume's access file, which the FUSE process reads."""

    volume: str
    allow: str | None  # the volume's allow option, None if it has none
    deny_by_default: bool
    docker_socket: str
    audit_log: str | None
    approved: dict[str, str] = field(default_factory=dict)  # container ID -> rule text
    # Approvals carried over from the last mount while dockerd did not respond: container ID -> rule
    # text. The FUSE process checks these containers again as soon as dockerd responds.
    unverified: dict[str, str] = field(default_factory=dict)

    def allowlist(self) -> Allowlist:
        return resolve_allowlist(self.allow, deny_by_default=self.deny_by_default)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": ACCESS_FILE_VERSION,
            "volume": self.volume,
            "allow": self.allow,
            "deny_by_default": self.deny_by_default,
            "docker_socket": self.docker_socket,
            "audit_log": self.audit_log,
            "approved": dict(sorted(self.approved.items())),
            "unverified": dict(sorted(self.unverified.items())),
        }

    @classmethod
    def from_json(cls, data: Any) -> "AccessPolicy":
        if not isinstance(data, dict) or data.get("version") != ACCESS_FILE_VERSION:
            raise ValueError(f"not an access file of version {ACCESS_FILE_VERSION}")
        allow = data.get("allow")
        approved = data.get("approved") or {}
        unverified = data.get("unverified") or {}
        return cls(
            volume=str(data["volume"]),
            allow=None if allow is None else str(allow),
            deny_by_default=bool(data["deny_by_default"]),
            docker_socket=str(data["docker_socket"]),
            audit_log=None if data.get("audit_log") is None else str(data["audit_log"]),
            approved={str(key): str(value) for key, value in dict(approved).items()},
            unverified={str(key): str(value) for key, value in dict(unverified).items()},
        )


def write_access_file(path: str | os.PathLike[str], policy: AccessPolicy) -> None:
    """Replace the access file atomically and durably, mode 0600.

    A policy without unverified approvals also removes the revoked file, which only
    filters unverified approvals; its IDs could otherwise refuse a later, verified approval.
    """
    replace_file(path, json.dumps(policy.to_json(), indent=2).encode() + b"\n")
    if not policy.unverified:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(path).parent / REVOKED_FILE)


def update_access_file(path: str | os.PathLike[str], allow: str | None) -> bool:
    """Put a new allowlist into an existing access file; False if there is none.

    Approvals by a rule that the new allowlist still contains are kept, because the container
    still matches that rule. The FUSE process checks every other container again against the
    new rules. The kept approvals also count at a mount while dockerd does not respond
    (``MountGuard._approve_without_engine``).
    """
    try:
        policy = read_access_file(path)
    except FileNotFoundError:
        return False
    updated = dataclasses.replace(policy, allow=allow)
    revoked = read_revoked(Path(path).parent / REVOKED_FILE)
    try:
        allowlist = updated.allowlist()
    except AllowlistError:
        allowlist = None
    if allowlist is None or revoked is None:
        write_access_file(path, dataclasses.replace(updated, approved={}, unverified={}))
        return True

    unverified = {key: rule for key, rule in policy.unverified.items() if key not in revoked}
    write_access_file(path, dataclasses.replace(updated, approved=_approvals_kept(policy.approved, allowlist),
                                                unverified=_approvals_kept(unverified, allowlist)))
    return True


def _approvals_kept(approved: dict[str, str], allowlist: Allowlist) -> dict[str, str]:
    """Return the approvals in *approved* whose rule is still one of *allowlist*'s rules."""
    rules = {rule.text for rule in allowlist.rules}
    return {container_id: rule for container_id, rule in approved.items() if rule in rules}


def apply_default_policy(path: str | os.PathLike[str], deny_by_default: bool) -> bool:
    """Give an existing access file the daemon's default policy and drop its approvals; True if it changed.

    A FUSE process outlives a daemon restart, and its access file keeps the
    policy of the daemon that last mounted the volume until it is rewritten.
    """
    try:
        policy = read_access_file(path)
    except FileNotFoundError:
        return False
    if policy.deny_by_default == deny_by_default:
        return False
    write_access_file(path, dataclasses.replace(policy, deny_by_default=deny_by_default, approved={}, unverified={}))
    return True


def record_default_policy(state_dir: str | os.PathLike[str], deny_by_default: bool) -> None:
    """Record the daemon's default policy in its state directory, if it is not recorded there already."""
    text = b"deny\n" if deny_by_default else b"allow\n"
    path = os.path.join(state_dir, DEFAULT_POLICY_FILE)
    try:
        with open(path, "rb") as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    replace_file(path, text)


def recorded_default_policy(state_dir: str | os.PathLike[str]) -> bool | None:
    """Return whether the daemon last started on *state_dir* denies by default; None if it is not recorded."""
    try:
        with open(os.path.join(state_dir, DEFAULT_POLICY_FILE), "rb") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return {b"deny": True, b"allow": False}.get(text)


def previous_policy(path: str | os.PathLike[str]) -> AccessPolicy | None:
    """Return the policy in the access file *path* without the approvals its FUSE process revoked.

    Returns None if the access file is missing or unreadable.
    """
    try:
        policy = read_access_file(path)
    except (OSError, ValueError, KeyError):
        return None

    revoked = read_revoked(Path(path).parent / REVOKED_FILE)
    if revoked is None:
        # Any approval may be revoked then. Dropping them all only means that a mount while
        # dockerd is silent carries none over.
        return dataclasses.replace(policy, approved={}, unverified={})
    return dataclasses.replace(
        policy,
        approved={key: rule for key, rule in policy.approved.items() if key not in revoked},
        unverified={key: rule for key, rule in policy.unverified.items() if key not in revoked},
    )


def read_revoked(path: str | os.PathLike[str]) -> set[str] | None:
    """Return the container IDs in the revoked file *path*: empty if it is missing, None if it is unreadable."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return set()
    except (OSError, ValueError):
        return None
    if not isinstance(data, list):
        return None
    return {str(key) for key in data}


def read_access_file(path: str | os.PathLike[str]) -> AccessPolicy:
    """Read an access file; raise ValueError or OSError if it is missing or damaged."""
    with open(path, "rb") as f:
        return AccessPolicy.from_json(json.load(f))


# -- mount time ------------------------------------------------------------------------------


class MountGuard:
    """The mount-time check of the daemon; see the module docstring."""

    def __init__(self, engine: EngineClient | None, audit: AuditLog, *, deny_by_default: bool,
                 docker_socket: str, probe_timeout: float = PROBE_TIMEOUT,
                 allow_set_command: str = "securevol allow set") -> None:
        self.engine = engine
        self.audit = audit
        self.deny_by_default = deny_by_default
        self.docker_socket = docker_socket
        self.probe_timeout = probe_timeout
        self.allow_set_command = allow_set_command  # quoted in refusals (config.Settings.allow_set_command)

    def check_mount(self, volume: str, allow_option: str | None, access_file: str | os.PathLike[str]) -> None:
        """Raise AccessDenied unless the container being mounted for is allowed; write the access file."""
        write_access_file(access_file, self.mount_policy(volume, allow_option, previous_policy(access_file)))

    def mount_policy(self, volume: str, allow_option: str | None,
                     previous: AccessPolicy | None = None) -> AccessPolicy:
        """Raise AccessDenied unless the container being mounted for is allowed; return the policy for the access file.

        *previous* is the policy of the volume's last mount, whose approvals are kept when
        dockerd does not respond (see ``_approve_without_engine``).
        """
        allowlist = self._allowlist(volume, allow_option)
        approved: dict[str, str] = {}
        unverified: dict[str, str] = {}
        if not allowlist.open:
            try:
                approved = self._approve(volume, allowlist)
            except EngineTimeout as exc:
                unverified = self._approve_without_engine(volume, allowlist, previous, exc)

        return AccessPolicy(volume, allow_option, self.deny_by_default, self.docker_socket,
                            self.audit.path, approved, unverified)

    def _allowlist(self, volume: str, allow_option: str | None) -> Allowlist:
        try:
            return resolve_allowlist(allow_option, deny_by_default=self.deny_by_default)
        except AllowlistError as exc:
            self.audit.record(allowed=False, point="mount", action="mount", volume=volume,
                              reason="invalid allowlist")
            raise AccessDenied(f"Volume {volume!r} has an invalid allowlist ({exc}); fix it with "
                               f"'{self.allow_set_command} {volume} RULES'.") from None

    def _approve(self, volume: str, allowlist: Allowlist) -> dict[str, str]:
        """Return the approved containers {ID: rule} of this mount.

        Raises AccessDenied, or EngineTimeout when dockerd accepts the request but does not respond.
        """
        engine = self._require_engine(volume)
        try:
            candidates = engine.mount_candidates(volume)
        except EngineTimeout:
            raise
        except EngineError as exc:
            self._refuse_without_engine(volume, exc)
        if not candidates:
            self.audit.record(allowed=True, point="mount", action="mount", volume=volume,
                              reason="no container registered yet: dockerd copies image files")
            return {}

        verdicts = [(user, self._match(volume, allowlist, user.container)) for user in candidates]
        refused = [user for user, rule in verdicts if rule is None]
        if refused:
            self._check_refused_are_idle(volume, allowlist, candidates, refused)

        approved = {}
        for user, rule in verdicts:
            if rule is not None:
                approved[user.container.id] = rule.text
                self.audit.record(allowed=True, point="mount", action="mount", volume=volume,
                                  container=user.container, rule=rule)
        return approved

    def _check_refused_are_idle(self, volume: str, allowlist: Allowlist, candidates: list[VolumeUser],
                                refused: list[VolumeUser]) -> None:
        """Raise AccessDenied unless the mount is for an allowed container, judged by who is locked."""
        busy = self._busy(volume, candidates)
        busy_refused = [user for user in refused if user in busy]
        if busy and not busy_refused:
            return

        user = busy_refused[0] if busy_refused else refused[0]
        starting_together = len(busy_refused) < len(busy)
        if starting_together:
            reason = "allowed and disallowed containers start together"
        elif busy_refused:
            reason = "container not on allowlist"
        else:
            reason = "cannot tell which container mounts"
        self.audit.record(allowed=False, point="mount", action="mount", volume=volume,
                          container=user.container, reason=reason)
        who = f"container {user.container.name!r} ({user.container.short_id()})"
        if starting_together:
            # The mount may be for the allowed container, so the message must
            # not tell its user that the rules leave their container out.
            raise AccessDenied(
                f"Volume {volume!r} was mounted while {who}, which its allowlist does not allow, was starting "
                "too, and securevol cannot tell which container the mount is for; start the allowed "
                "container again once the other has started or failed."
            )
        if busy_refused and allowlist.rules:
            raise AccessDenied(f"Volume {volume!r} does not allow {who}: it matches none of the rules "
                               f"{allowlist.text!r}; change them with '{self.allow_set_command} {volume} RULES'.")
        if busy_refused:
            raise AccessDenied(f"Volume {volume!r} has no allowlist and this securevol daemon denies such volumes "
                               f"to every container, so {who} may not use it; give it one with "
                               f"'{self.allow_set_command} {volume} RULES'.")
        if allowlist.rules:
            raise AccessDenied(
                f"Volume {volume!r} is used by {who}, which its allowlist does not allow, and securevol "
                "cannot tell which container this mount is for; remove that container or add it with "
                f"'{self.allow_set_command} {volume} RULES'."
            )
        raise AccessDenied(
            f"Volume {volume!r} has no allowlist and this securevol daemon denies such volumes to every "
            f"container, and {who} uses it; give it one with '{self.allow_set_command} {volume} RULES'."
        )

    def _busy(self, volume: str, candidates: list[VolumeUser]) -> list[VolumeUser]:
        """Return the candidates whose inspect gets no response within the probe timeout."""
        engine = self._require_engine(volume)
        prober = EngineClient(engine.socket_path, timeout=self.probe_timeout)

        def probe(user: VolumeUser) -> bool:
            try:
                prober.inspect_container(user.container.id)
            except EngineTimeout:
                return True
            except EngineError:
                return False
            return False

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(candidates), 16)) as pool:
            silent = list(pool.map(probe, candidates))
        busy = [user for user, is_silent in zip(candidates, silent, strict=True) if is_silent]
        log.info("mount candidates probed vol=%s candidates=%d busy=%s", volume, len(candidates),
                 ",".join(user.container.short_id() for user in busy) or "-")
        return busy

    def _match(self, volume: str, allowlist: Allowlist, container: ContainerInfo) -> Rule | None:
        rule = allowlist.match(container)
        if rule is None and allowlist.has_kind("image"):
            container = self._engine_call(volume, lambda engine: engine.with_image_refs(container))
            rule = allowlist.match(container)
        return rule

    def _approve_without_engine(self, volume: str, allowlist: Allowlist, previous: AccessPolicy | None,
                                exc: EngineTimeout) -> dict[str, str]:
        """Allow a mount while dockerd accepts API requests but does not respond; return the unverified approvals.

        dockerd serves no API request until it has started the containers that it restores at
        its own start (restart policies, dockerd 20.10 ``Daemon.restore``), and their Mount
        requests come before that. Refusing them would leave those containers stopped for good.
        So the mount is allowed, and the approvals of the volume's last mount whose rule the
        allowlist still contains are carried over as unverified. The FUSE process lets those
        containers in while dockerd does not respond and checks them against the rules once it
        does, because a container may have been renamed since. It checks every other container
        at each access, and refuses it while dockerd does not respond.
        """
        kept = {}
        if previous is not None and previous.volume == volume:
            kept = _approvals_kept({**previous.approved, **previous.unverified}, allowlist)

        log.warning("mount allowed without the engine vol=%s approved_before=%d error=%s", volume, len(kept), exc)
        self.audit.record(allowed=True, point="mount", action="mount", volume=volume,
                          reason=f"engine timed out: {len(kept)} container(s) approved before keep access until "
                                 "dockerd responds, others are checked at each access")
        return kept

    def _refuse_without_engine(self, volume: str, exc: EngineError) -> NoReturn:
        self.audit.record(allowed=False, point="mount", action="mount", volume=volume, reason="engine unavailable")
        raise AccessDenied(f"Volume {volume!r} may be used only by some containers, and securevol cannot ask "
                           f"dockerd which container is starting: {exc}") from None

    def _engine_call(self, volume: str, call: Any) -> Any:
        engine = self._require_engine(volume)
        try:
            return call(engine)
        except EngineError as exc:
            self._refuse_without_engine(volume, exc)

    def _require_engine(self, volume: str) -> EngineClient:
        if self.engine is None:
            raise AccessDenied(f"Volume {volume!r} may be used only by some containers, but securevol has no "
                               "Docker Engine API socket configured to check which; start it with --docker-host.")
        return self.engine


# -- each access, in the FUSE process ----------------------------------------------------------


@dataclass
class _Decision:
    allowed: bool
    expires: float  # time.monotonic() after which it is decided again


class AccessChecker:
    """Decides whether the process behind a FUSE request may use the volume.

    Not thread-safe: the FUSE process handles one request at a time.
    """

    def __init__(self, access_file: str | os.PathLike[str], proc: str = "/proc") -> None:
        self.access_file = Path(access_file)
        self.proc = proc
        self._stamp: tuple[int, int, int] | None = None
        self._next_reload = 0.0
        self._policy: AccessPolicy | None = None
        self._allowlist: Allowlist | None = None
        self._engine: EngineClient | None = None
        self._audit = AuditLog(None)
        self._pids: dict[int, tuple[int, str]] = {}
        self._decisions: dict[str, _Decision] = {}
        # Containers whose unverified approval this process refused; kept across reloads of the
        # access file, which may still list them (update_access_file keeps approvals by rule).
        self._revoked: set[str] = set()
        self._failing = False
        self._reload(force=True)

    @property
    def volume(self) -> str:
        return self._policy.volume if self._policy else ""

    def allows(self, pid: int, operation: str) -> bool:
        """Tell whether process *pid* may perform *operation* (a FUSE handler name)."""
        self._reload()
        if self._allowlist is None:
            return False  # the access file cannot be read: fail closed
        if self._allowlist.open:
            return True
        return self.still_allows(self.identify(pid), operation)

    def identify(self, pid: int) -> str | None:
        """Return the caller key of *pid*: its container ID, or a key for a host process; None if unknown.

        Handles remember the key of the process that opened them, so that a
        later read can be checked against the rules in force then.
        """
        try:
            return self._identity_key(pid)
        except UnknownProcess:
            return None

    def still_allows(self, key: str | None, operation: str) -> bool:
        """Tell whether the caller with *key* (from ``identify``) may perform *operation* now."""
        self._reload()
        if self._allowlist is None:
            return False
        if self._allowlist.open:
            return True
        if key is None:
            return False

        decision = self._decisions.get(key)
        if decision is None or decision.expires <= time.monotonic():
            # The daemon may have approved this container a moment ago.
            self._reload(force=True)
            if self._allowlist is None:
                return False
            decision = self._decide(key, operation)
            self._decisions[key] = decision
        return decision.allowed

    def _identity_key(self, pid: int) -> str:
        """Return the container ID of *pid*, or a key for a host process: host, dockerd, kernel or self."""
        if pid <= 0:
            raise UnknownProcess("the request has no process ID")
        start_time = process_start_time(pid, self.proc)
        cached = self._pids.get(pid)
        if cached is not None and cached[0] == start_time:
            return cached[1]

        key = self._classify(pid)
        if len(self._pids) >= _MAX_CACHED_PIDS:
            self._pids.clear()
        self._pids[pid] = (start_time, key)
        return key

    def _classify(self, pid: int) -> str:
        if pid == os.getpid():
            return _SELF
        if _is_kernel_thread(pid, self.proc):
            return _KERNEL
        identity = identify_process(pid, self.proc)
        if identity.container_id is not None:
            return identity.container_id
        if not identity.is_host:
            raise UnknownProcess(f"process {pid} runs in a {identity.runtime} container without an ID")
        return _DOCKERD if is_docker_daemon(pid, self.proc) else _HOST

    def _decide(self, key: str, operation: str) -> _Decision:
        forever = float("inf")
        if key in (_SELF, _KERNEL, _DOCKERD):
            return _Decision(True, forever)
        if key == _HOST:
            rule = self._allowlist.match_host()
            self._record(rule, operation, None, "host process")
            return _Decision(rule is not None, forever if rule else time.monotonic() + DENY_CACHE_SECONDS)

        approved_rule = self._policy.approved.get(key)
        if approved_rule is not None:
            # Approved at mount time; nothing to audit again.
            return _Decision(True, forever)

        unverified = key in self._policy.unverified and key not in self._revoked
        if unverified:
            container, rule, reason, silent = self._match_with_silence_probe(key)
        else:
            container, rule, reason = self._match_container(key)
            silent = False

        if unverified and reason == "engine timed out" and silent:
            self._audit.record(allowed=True, point="access", action=operation, volume=self.volume,
                               container=container, reason="approved at the last mount, dockerd does not respond yet")
            return _Decision(True, time.monotonic() + UNVERIFIED_RECHECK_SECONDS)
        if unverified and rule is None and reason in ("not on allowlist", "container unknown to dockerd"):
            self._revoke(key)
        self._record(rule, operation, container, reason)
        if rule is None:
            return _Decision(False, time.monotonic() + DENY_CACHE_SECONDS)
        return _Decision(True, forever)

    def _revoke(self, container_id: str) -> None:
        """Refuse *container_id*'s unverified approval from now on, and add it to the revoked file for the daemon."""
        self._revoked.add(container_id)
        path = self.access_file.parent / REVOKED_FILE
        revoked = read_revoked(path) or set()
        if container_id in revoked:
            return
        try:
            replace_file(path, json.dumps(sorted(revoked | {container_id})).encode() + b"\n")
        except OSError as exc:
            log.warning("revoked file not written vol=%s path=%s error=%s", self.volume, path, exc.strerror)
            return
        log.info("unverified approval revoked vol=%s id=%s", self.volume, container_id[:12])

    def _match_with_silence_probe(self, key: str) -> tuple[ContainerInfo, Rule | None, str, bool]:
        """Match container *key* like ``_match_container``, and tell whether dockerd is silent meanwhile.

        Both must time out for an unverified approval to count. The inspect alone times out
        while dockerd holds the container's lock for a docker cp of it and responds to
        everything else, and GET /version alone is slow on a loaded dockerd that still responds
        to inspects.
        The two run at once, so that the FUSE request loop waits for one timeout, not two.
        """
        if self._engine is None:
            return (*self._match_container(key), False)
        prober = EngineClient(self._engine.socket_path, timeout=FUSE_ENGINE_TIMEOUT)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            silence = pool.submit(prober.is_silent)
            container, rule, reason = self._match_container(key)
            return container, rule, reason, silence.result()

    def _match_container(self, container_id: str) -> tuple[ContainerInfo, Rule | None, str]:
        unknown = ContainerInfo(id=container_id, name="")
        if self._engine is None:
            return unknown, None, "no engine"
        # NOTE: this call blocks the FUSE request loop, up to FUSE_ENGINE_TIMEOUT
        # when dockerd hangs; containers approved at mount time never get here.
        try:
            container = self._engine.container_info(container_id,
                                                    with_image_refs=self._allowlist.has_kind("image"))
        except EngineTimeout as exc:
            log.warning("container lookup failed vol=%s id=%s error=%s", self.volume, container_id[:12], exc)
            return unknown, None, "engine timed out"
        except EngineError as exc:
            log.warning("container lookup failed vol=%s id=%s error=%s", self.volume, container_id[:12], exc)
            return unknown, None, "engine unavailable"
        if container is None:
            return unknown, None, "container unknown to dockerd"
        rule = self._allowlist.match(container)
        return container, rule, "" if rule else "not on allowlist"

    def _record(
        self, rule: Rule | None, operation: str, container: ContainerInfo | None, reason: str
    ) -> None:
        self._audit.record(allowed=rule is not None, point="access", action=operation, volume=self.volume,
                           container=container, rule=rule, reason=reason if rule is None else "")

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_reload:
            return
        self._next_reload = now + RELOAD_SECONDS
        try:
            st = os.stat(self.access_file)
        except OSError as exc:
            self._fail(f"access file unreadable: {exc.strerror}")
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return

        try:
            policy = read_access_file(self.access_file)
            allowlist = policy.allowlist()
            engine = EngineClient(socket_path_from_host(policy.docker_socket), timeout=FUSE_ENGINE_TIMEOUT)
        except (OSError, ValueError, KeyError) as exc:
            self._fail(f"access file damaged: {exc}")
            return
        self._stamp = stamp
        self._policy = policy
        self._allowlist = allowlist
        self._engine = engine
        self._audit = AuditLog(policy.audit_log)
        self._decisions.clear()
        self._failing = False
        log.info("access policy loaded vol=%s rules=%s approved=%d unverified=%d", policy.volume,
                 allowlist.text or ("open" if allowlist.open else "none"), len(policy.approved),
                 len(policy.unverified))

    def _fail(self, why: str) -> None:
        if not self._failing:
            volume = self.volume or self.access_file.parent.name
            log.error("access denied to all vol=%s reason=%s", volume, why)
        self._failing = True
        self._stamp = None
        self._allowlist = None
        self._decisions.clear()


def _is_kernel_thread(pid: int, proc: str) -> bool:
    try:
        with open(f"{proc}/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2 :].split()
    return bool(int(fields[6]) & _PF_KTHREAD)

