"""Decisions of the Docker authorization plugin: no API request gives a container a volume it may not see.

With ``dockerd --authorization-plugin=NAME``, dockerd sends each API request to
``/AuthZPlugin.AuthZReq`` before it acts on it, and its response to
``/AuthZPlugin.AuthZRes`` before it returns that response. This module reads
each request exactly as dockerd will act on it, or the check could be walked
around:

- the path is URL-decoded (dockerd routes ``/containers%2Fcreate`` as a
  create), cleaned, and read with or without its ``/v1.NN`` prefix; the
  query string is parsed like Go's ``url.ParseQuery``, first value wins;
- the body is read with Go's JSON rules (``securevol.gojson``), and the
  HostConfig is taken the way dockerd 20.10 takes it: the ``HostConfig``
  object if present, else the deprecated HostConfig fields at the top level;
- a container create whose body did not reach the plugin is refused, because
  dockerd forwards only JSON bodies under 1 MiB (an empty-body bypass of
  authorization plugins was CVE-2024-41110).

Requests checked, and why:

``POST /containers/create``
    every securevol volume the container would mount (``Binds``, ``Mounts``,
    ``VolumesFrom`` of another container, anonymous volumes of the
    ``VolumeDriver``) must allow it, and so must every securevol volume of a
    container whose PID or IPC namespace it would join (``PidMode`` or
    ``IpcMode`` ``container:NAME``). No host bind mount may reach the state
    directory or the mount root.
``POST /containers/{id}/rename``
    the new name must still be allowed by every securevol volume the
    container mounts, or a rename would carry a container past a ``name:`` rule.
``GET|HEAD|PUT /containers/{id}/archive``, ``POST /containers/{id}/copy``, ``POST /containers/{id}/exec``
    ``docker cp`` and ``docker exec`` act on an existing container, which was
    allowed when it was created; the allowlist may have changed since, so the
    container is checked again against the current allowlist of every
    securevol volume it mounts or reaches through a shared PID or IPC
    namespace.
``POST /volumes/create``
    a ``local`` volume whose ``device`` reaches the state directory or the
    mount root is refused, since mounting it would bypass the bind check.
``POST /v1.NN/containers/{id}/start`` with NN below 24
    these old API versions still take a HostConfig in the start body, which
    dockerd applies to the container: its mounts are checked as a create's.
``POST /containers/{id}/start`` and ``/restart``
    a container that joins another's PID or IPC namespace is checked again
    against that container's volumes, because the rules may have changed
    since its create was checked.

Every other request is allowed at once, without an Engine API call or a
disk read. When the plugin cannot decide (dockerd does not respond, a
registry file is unreadable), it refuses only requests that may touch
securevol volumes.
"""

import base64
import binascii
import dataclasses
import logging
import os
import posixpath
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securevol import gojson
from securevol.audit import AuditLog
from securevol.engine import EngineClient, EngineError, info_from_inspect, mounts_of, socket_path_from_host
from securevol.errors import SecurevolError
from securevol.policy import Allowlist, AllowlistError, ContainerInfo, Rule, resolve_allowlist

log = logging.getLogger(__name__)

ANONYMOUS = "(anonymous)"

# -- the create body, as far as securevol reads it (Docker API types, 20.10) ---------

_DRIVER_CONFIG = gojson.GoStruct({"Name": gojson.GoString(), "Options": gojson.GoMap(gojson.GoString())})
_VOLUME_OPTIONS = gojson.GoStruct({"DriverConfig": gojson.GoPointer(_DRIVER_CONFIG)})
_MOUNT = gojson.GoStruct({
    "Type": gojson.GoString(),
    "Source": gojson.GoString(),
    "Target": gojson.GoString(),
    "VolumeOptions": gojson.GoPointer(_VOLUME_OPTIONS),
})
_HOST_CONFIG_FIELDS: dict[str, gojson.GoType] = {
    "Binds": gojson.GoSlice(gojson.GoString()),
    "Mounts": gojson.GoSlice(_MOUNT),
    "VolumesFrom": gojson.GoSlice(gojson.GoString()),
    "VolumeDriver": gojson.GoString(),
    "PidMode": gojson.GoString(),
    "IpcMode": gojson.GoString(),
}
# runconfig.ContainerConfigWrapper on Linux: the Config fields, the HostConfig
# object, and (deprecated) the HostConfig fields once more at the top level.
_CREATE_BODY = gojson.GoStruct({
    "Image": gojson.GoString(),
    "Labels": gojson.GoMap(gojson.GoString()),
    "Volumes": gojson.GoMap(gojson.GoAny()),
    "HostConfig": gojson.GoPointer(gojson.GoStruct(_HOST_CONFIG_FIELDS)),
    **_HOST_CONFIG_FIELDS,
})
_VOLUME_CREATE_BODY = gojson.GoStruct({
    "Name": gojson.GoString(),
    "Driver": gojson.GoString(),
    "DriverOpts": gojson.GoMap(gojson.GoString()),
})

# -- routes (api/server/router/container and volume, dockerd 20.10) ------------------

_VERSION_PREFIX_RE = re.compile(r"/v[0-9.]+(?=/)")
_ROUTES: tuple[tuple[frozenset[str], re.Pattern[str], str], ...] = (
    (frozenset({"POST"}), re.compile(r"/containers/create"), "create"),
    (frozenset({"POST"}), re.compile(r"/containers/(.*)/rename"), "rename"),
    (frozenset({"GET", "HEAD", "PUT"}), re.compile(r"/containers/(.*)/archive"), "archive"),
    (frozenset({"POST"}), re.compile(r"/containers/(.*)/copy"), "copy"),
    (frozenset({"POST"}), re.compile(r"/containers/(.*)/exec"), "exec"),
    (frozenset({"POST"}), re.compile(r"/containers/(.*)/start"), "start"),
    (frozenset({"POST"}), re.compile(r"/containers/(.*)/restart"), "restart"),
    (frozenset({"POST"}), re.compile(r"/volumes/create"), "volume-create"),
)


@dataclass(frozen=True)
class AuthzRequest:
    """An API request as dockerd will route it: method, decoded path, query and body.

    ``api_version`` is the ``/vN.NN`` prefix of the path without the v, or ""
    when the request names none and so gets dockerd's own version.
    ``headers`` are the request headers with lowercase names.
    """

    method: str
    path: str
    query: dict[str, str]
    body: bytes | None
    user: str = ""
    api_version: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> "AuthzRequest":
        """Read the AuthZReq fields RequestMethod, RequestUri, RequestBody (base64) and User."""
        method = payload.get("RequestMethod")
        uri = payload.get("RequestUri")
        if not isinstance(method, str) or not isinstance(uri, str):
            raise ValueError("the request has no RequestMethod or RequestUri string")
        path, api_version, query = parse_request_uri(uri)
        user = payload.get("User")
        headers = payload.get("RequestHeaders")
        return cls(
            method=method.upper(),
            path=path,
            query=query,
            body=_request_body(payload.get("RequestBody")),
            user=user if isinstance(user, str) else "",
            api_version=api_version,
            headers={str(k).lower(): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {},
        )

    def declares_body(self) -> bool:
        """Tell whether the headers announce a body of more than 7 bytes (dockerd's start handler test)."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return True
        length = self.headers.get("content-length", "0").strip()
        return not length.isdigit() or int(length) > 7

    def route(self) -> tuple[str, str]:
        """Return (action, container reference) for a checked route, or ("", "") for any other."""
        for methods, pattern, action in _ROUTES:
            match = pattern.fullmatch(self.path)
            if match and self.method in methods:
                return action, match.group(1) if pattern.groups else ""
        return "", ""


def split_request_uri(uri: str) -> tuple[str, dict[str, str]]:
    """Return the path dockerd routes (decoded, cleaned, without /vN.NN) and the query of *uri*."""
    path, _version, query = parse_request_uri(uri)
    return path, query


def parse_request_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """Return the routed path, the API version ("" if none) and the query of *uri*."""
    target = uri
    if not target.startswith("/"):
        # An absolute-form request target: http://host/path?query.
        parts = urllib.parse.urlsplit(target)
        target = parts.path + ("?" + parts.query if parts.query else "")
    raw_path, _, raw_query = target.partition("?")

    path = _clean_path(urllib.parse.unquote(raw_path, errors="surrogateescape"))
    api_version = ""
    version = _VERSION_PREFIX_RE.match(path)
    if version:
        api_version = version.group(0)[2:]
        path = path[version.end() :]

    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(raw_query, keep_blank_values=True):
        query.setdefault(key, value)
    return path, api_version, query


def older_api_version(version: str, than: str) -> bool:
    """Compare dot-separated API versions as dockerd does; a version that is not numbers counts as older."""
    try:
        have = [int(part) for part in version.split(".")]
    except ValueError:
        return True
    want = [int(part) for part in than.split(".")]
    return have < want


def _clean_path(path: str) -> str:
    # dockerd's router redirects a path that is not clean instead of serving
    # it; cleaning here can only make a request look like a checked one.
    cleaned = posixpath.normpath("/" + path.lstrip("/"))
    return "/" + cleaned.lstrip("/")


def _request_body(value: Any) -> bytes | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class Verdict:
    """The response to an AuthZ request: allow, or deny with a message that dockerd shows to the user."""

    allow: bool
    message: str = ""

    def to_response(self) -> dict[str, Any]:
        return {"Allow": self.allow, "Msg": self.message}


ALLOW = Verdict(True)


class Denied(Exception):
    """A refusal; the message is one sentence for the user, *reason* a few words for the audit log."""

    def __init__(
        self, message: str, reason: str, volume: str = "", container: ContainerInfo | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.volume = volume
        self.container = container


@dataclass(frozen=True)
class VolumeUse:
    """One securevol volume that a request would give a container, and the allowlist it enforces."""

    volume: str
    allowlist: Allowlist
    via: str  # how the container gets it: "Binds", "Mounts", "VolumesFrom web", "PID namespace of web", ...


# -- the registry ----------------------------------------------------------------------------


# A scan made less than this after the volumes directory's mtime is repeated at the next
# request. A clock tick of directory times is at most 10 ms (CONFIG_HZ is 100 or more), and
# the rest leaves room for a scan delayed by a busy machine.
_RESCAN_WINDOW_NS = 2_000_000_000


class VolumeCatalog:
    """Names and allowlists of the volumes in the registry's ``volumes/`` directory.

    The names are cached until the directory changes, which one stat(2)
    per checked request detects. An allowlist is read from the volume's record
    on each use, because ``securevol allow set`` changes it.
    """

    def __init__(self, volumes_dir: str | os.PathLike[str], read_allow_option: Callable[[str], str | None],
                 *, deny_by_default: bool = False) -> None:
        self.volumes_dir = Path(volumes_dir)
        self.read_allow_option = read_allow_option
        self.deny_by_default = deny_by_default
        self._stamp: tuple[int, int] | None = None
        self._scanned_at_ns = 0  # when the cached names were read (time.time_ns)
        self._names: frozenset[str] = frozenset()

    @classmethod
    def from_registry(cls, registry: Any, *, deny_by_default: bool = False) -> "VolumeCatalog":
        """Build a catalog over a ``securevol.registry.Registry``."""

        def read_allow_option(name: str) -> str | None:
            return registry.read_volume(name).options.get("allow")

        return cls(registry.volumes_dir, read_allow_option, deny_by_default=deny_by_default)

    def names(self) -> frozenset[str]:
        """Return the names of all volumes, including one whose Create has not finished."""
        try:
            st = os.stat(self.volumes_dir)
        except FileNotFoundError:
            return frozenset()
        stamp = (st.st_ino, st.st_mtime_ns)
        # Kernels that take directory times from a clock tick of several
        # milliseconds give a volume created in the tick of the last scan the
        # same mtime. So a scan made soon after the mtime is not trusted, and
        # the directory is scanned again until a scan comes well after it.
        scan_too_early = st.st_mtime_ns + _RESCAN_WINDOW_NS > self._scanned_at_ns
        if stamp != self._stamp or scan_too_early:
            self._scanned_at_ns = time.time_ns()
            self._names = frozenset(entry.name for entry in os.scandir(self.volumes_dir) if entry.is_dir())
            self._stamp = stamp
        return self._names

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def allowlist(self, name: str) -> Allowlist:
        """Return the allowlist volume *name* enforces now; raise Denied if it cannot be read."""
        try:
            return self.new_volume_allowlist(self.read_allow_option(name))
        except AllowlistError as exc:
            raise Denied(
                f"Volume {name!r} has an invalid allowlist ({exc}); fix it with 'securevol allow set'.",
                "invalid allowlist",
                name,
            ) from None
        except SecurevolError as exc:
            raise Denied(f"The allowlist of volume {name!r} cannot be read: {exc}", "registry unreadable",
                         name) from None

    def new_volume_allowlist(self, option: str | None) -> Allowlist:
        """Return the allowlist of a volume with ``allow`` option *option* (None when it has none)."""
        return resolve_allowlist(option, deny_by_default=self.deny_by_default)


# -- the create request -------------------------------------------------------------------


@dataclass(frozen=True)
class CreateSpec:
    """The name, image, labels and mounts of a container create request, read as dockerd reads them."""

    name: str
    image: str
    labels: dict[str, str]
    binds: list[str]
    mounts: list[dict[str, Any]]
    volumes_from: list[str]
    volume_driver: str
    pid_mode: str
    ipc_mode: str
    anonymous_volumes: list[str]  # destinations in Config.Volumes

    @classmethod
    def from_body(cls, body: bytes, name: str) -> "CreateSpec":
        """Decode a create body; raise ValueError (GoTypeError) where dockerd would fail too."""
        top = gojson.decode(_CREATE_BODY, body)
        host_config = effective_host_config(top)
        return cls(
            name=name.removeprefix("/"),
            image=top.get("Image") or "",
            labels=dict(top.get("Labels") or {}),
            binds=gojson.items(host_config.get("Binds")),
            mounts=gojson.items(host_config.get("Mounts")),
            volumes_from=gojson.items(host_config.get("VolumesFrom")),
            volume_driver=host_config.get("VolumeDriver") or "",
            pid_mode=host_config.get("PidMode") or "",
            ipc_mode=host_config.get("IpcMode") or "",
            anonymous_volumes=sorted(top.get("Volumes") or {}),
        )

    def container(self) -> ContainerInfo:
        """Return the allowlist's view of the container, without an ID, which dockerd assigns later."""
        return ContainerInfo(id="", name=self.name, image=self.image, labels=self.labels)


def effective_host_config(top: Mapping[str, Any]) -> dict[str, Any]:
    """Return the HostConfig dockerd 20.10 uses (runconfig ContainerConfigWrapper.getHostConfig).

    The ``HostConfig`` object wins when present; only its empty VolumeDriver is
    filled from the top level. Without it, the top-level fields are the HostConfig.
    """
    top_level = {key: top[key] for key in _HOST_CONFIG_FIELDS if key in top}
    inner = top.get("HostConfig")
    if inner is None:
        return top_level
    host_config = dict(inner)
    if top_level.get("VolumeDriver") and not host_config.get("VolumeDriver"):
        host_config["VolumeDriver"] = top_level["VolumeDriver"]
    return host_config


@dataclass(frozen=True)
class Bind:
    """One ``Binds`` entry as dockerd's Linux parser splits it; ``source`` is "" for an anonymous volume."""

    source: str
    target: str

    @property
    def is_host_path(self) -> bool:
        return self.source.startswith("/")


def parse_bind(spec: str) -> Bind | None:
    """Split ``SOURCE:TARGET[:MODE]`` or ``TARGET``; None for a spec that dockerd rejects."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        return None
    if len(parts) == 1:
        return Bind("", parts[0])
    return Bind(parts[0], parts[1])


# -- decisions -----------------------------------------------------------------------------


class Authorizer:
    """Decides the AuthZReq and AuthZRes requests of one securevol daemon.

    *driver_names* are the names under which dockerd knows this plugin;
    *protected_paths* the host directories no container may bind (the state
    directory and the mount root); *engine* the Engine API client used for
    requests about existing containers.
    """

    def __init__(
        self,
        catalog: VolumeCatalog,
        *,
        driver_names: Iterable[str],
        protected_paths: Iterable[str | os.PathLike[str]],
        engine: EngineClient | None,
        audit: AuditLog,
        allow_set_command: str = "securevol allow set",
    ) -> None:
        self.catalog = catalog
        self.driver_names = frozenset(_plugin_name(name) for name in driver_names)
        self.protected_paths = _protected_forms(protected_paths)
        self.engine = engine
        self.audit = audit
        self.allow_set_command = allow_set_command  # quoted in refusals (config.Settings.allow_set_command)

    # -- protocol entry points -------------------------------------------------------------

    def authorize_request(self, payload: Mapping[str, Any]) -> Verdict:
        """Decide one AuthZReq."""
        try:
            request = AuthzRequest.from_payload(payload)
        except ValueError as exc:
            log.warning("authz request unreadable error=%s", exc)
            return Verdict(False, f"securevol cannot read this authorization request: {exc}.")

        action, reference = request.route()
        if not action:
            return ALLOW
        try:
            self._check(request, action, reference)
        except Denied as exc:
            self.audit.record(allowed=False, point="authz", action=action, volume=exc.volume,
                              container=exc.container, reason=exc.reason)
            log.info("request denied action=%s path=%s reason=%s", action, request.path, exc.reason)
            return Verdict(False, str(exc))
        return ALLOW

    def authorize_response(self, payload: Mapping[str, Any]) -> Verdict:
        """Decide one AuthZRes: the decision was made on the request, so every response passes."""
        return ALLOW

    def _check(self, request: AuthzRequest, action: str, reference: str) -> None:
        if action == "create":
            self._check_create(request)
        elif action == "volume-create":
            self._check_volume_create(request)
        elif action == "rename":
            self._check_existing(action, reference, new_name=request.query.get("name", ""))
        elif action == "start":
            self._check_start(request, reference)
            self._check_joined_namespaces(action, reference)
        elif action == "restart":
            self._check_joined_namespaces(action, reference)
        else:
            self._check_existing(action, reference)

    # -- container create -------------------------------------------------------------------

    def _check_create(self, request: AuthzRequest) -> None:
        if not request.body:
            raise Denied(
                "The container create request reached securevol without its body (dockerd forwards only "
                "JSON bodies under 1 MiB), so its mounts cannot be checked; send a smaller JSON body.",
                "create without body",
            )
        try:
            spec = CreateSpec.from_body(request.body, request.query.get("name", ""))
        except ValueError as exc:
            raise Denied(
                f"The container create request body cannot be read as dockerd would read it ({exc}), so "
                "securevol cannot check its mounts; send a valid JSON object.",
                "create body unreadable",
            ) from None

        for path in self._create_host_paths(spec):
            self._check_host_path(path)
        uses = [
            *self._create_volume_uses(spec),
            *self._volumes_from_uses(spec),
            *self._shared_namespace_uses(spec.pid_mode, spec.ipc_mode),
            *self._image_volume_uses(spec),
        ]
        self._check_uses("create", spec.container(), uses)

    def _create_host_paths(self, spec: CreateSpec) -> Iterator[str]:
        for raw in spec.binds:
            bind = parse_bind(raw)
            if bind is not None and bind.is_host_path:
                yield bind.source
        for mount in spec.mounts:
            if mount.get("Type") == "bind":
                yield mount.get("Source") or ""
            elif mount.get("Type") == "volume":
                driver, options = _driver_config(mount)
                if _plugin_name(driver or "local") == "local" and options.get("device", "").startswith("/"):
                    yield options["device"]

    def _create_volume_uses(self, spec: CreateSpec) -> Iterator[VolumeUse]:
        ours = self._is_ours(spec.volume_driver)
        for raw in spec.binds:
            bind = parse_bind(raw)
            if bind is None or bind.is_host_path:
                continue
            if bind.source in self.catalog:
                yield VolumeUse(bind.source, self.catalog.allowlist(bind.source), "Binds")
            elif ours:
                # A new volume created by this request, without options.
                yield VolumeUse(bind.source or ANONYMOUS, self.catalog.new_volume_allowlist(None), "Binds")

        for mount in spec.mounts:
            if mount.get("Type") == "volume":
                yield from self._mount_volume_uses(mount)

        if ours:
            for target in spec.anonymous_volumes:
                yield VolumeUse(ANONYMOUS, self.catalog.new_volume_allowlist(None), f"Volumes {target}")

    def _mount_volume_uses(self, mount: Mapping[str, Any]) -> Iterator[VolumeUse]:
        # Mounts ignore HostConfig.VolumeDriver: a new volume gets DriverConfig.Name, or local.
        source = mount.get("Source") or ""
        driver, options = _driver_config(mount)
        if source and source in self.catalog:
            yield VolumeUse(source, self.catalog.allowlist(source), "Mounts")
        elif self._is_ours(driver):
            volume = source or ANONYMOUS
            try:
                allowlist = self.catalog.new_volume_allowlist(options.get("allow"))
            except AllowlistError as exc:
                raise Denied(
                    f"The new volume {volume!r} has an invalid allowlist: {exc}", "invalid allowlist", volume
                ) from None
            yield VolumeUse(volume, allowlist, "Mounts")

    def _volumes_from_uses(self, spec: CreateSpec) -> Iterator[VolumeUse]:
        for entry in spec.volumes_from:
            reference = entry.split(":", 1)[0]
            document = self._inspect(reference, f"the container {reference!r} named in VolumesFrom")
            if document is None:
                continue  # dockerd refuses the create: no such container
            for mount in mounts_of(document):
                if mount.get("Type") == "bind":
                    self._check_host_path(str(mount.get("Source") or ""))
            yield from self._mounted_volume_uses(document, f"VolumesFrom {reference}")

    def _shared_namespace_uses(self, pid_mode: str, ipc_mode: str) -> Iterator[VolumeUse]:
        """Yield the volumes of a container whose PID or IPC namespace the new one would join.

        A process in another container's PID namespace can write to the memory
        of that container's processes through /proc/PID/mem if it runs as the
        same user and Yama's ptrace_scope allows it. It can then run code in a
        process that the FUSE check allows. A shared IPC namespace shares
        /dev/shm, where programs may keep data read from the volume.
        """
        for namespace, mode in (("PID", pid_mode), ("IPC", ipc_mode)):
            kind, _, reference = mode.partition(":")
            if kind != "container" or not reference:
                continue
            document = self._inspect(reference, f"the container {reference!r} named in the {namespace} mode")
            if document is None:
                continue  # dockerd refuses the create: no such container
            yield from self._mounted_volume_uses(document, f"{namespace} namespace of {reference}")

    def _image_volume_uses(self, spec: CreateSpec) -> Iterator[VolumeUse]:
        """Yield the anonymous volumes that the image's VOLUME lines create with this driver.

        Only a daemon that denies volumes without an allowlist needs to look:
        otherwise those new volumes are open to every container.
        """
        if not self._is_ours(spec.volume_driver) or not self.catalog.deny_by_default or not spec.image:
            return
        image = self._engine_call(
            lambda engine: engine.inspect_image(spec.image), f"the image {spec.image!r}"
        )
        if image is None:
            return  # dockerd refuses the create: no such image
        volumes = (image.get("Config") or {}).get("Volumes") or {}
        for target in sorted(volumes):
            yield VolumeUse(ANONYMOUS, self.catalog.new_volume_allowlist(None), f"image VOLUME {target}")

    # -- start with a HostConfig (API before 1.24) ---------------------------------------------

    def _check_start(self, request: AuthzRequest, reference: str) -> None:
        # From API 1.24 on, and without a version prefix, dockerd refuses a start body.
        if not request.api_version or not older_api_version(request.api_version, "1.24"):
            return
        if not request.body:
            if request.declares_body():
                raise Denied(
                    f"The start request (API {request.api_version}) reached securevol without its HostConfig "
                    "body, so its mounts cannot be checked; create the container with its mounts instead.",
                    "start without body",
                )
            return
        try:
            spec = CreateSpec.from_body(request.body, "")
        except ValueError as exc:
            raise Denied(
                f"The start request body cannot be read as dockerd would read it ({exc}), so securevol "
                "cannot check its mounts.",
                "start body unreadable",
            ) from None
        if not (spec.binds or spec.mounts or spec.volumes_from or spec.volume_driver or spec.pid_mode
                or spec.ipc_mode):
            return

        document = self._inspect(reference, f"the container {reference!r}")
        if document is None:
            return  # dockerd returns 404
        for path in self._create_host_paths(spec):
            self._check_host_path(path)
        uses = [
            *self._create_volume_uses(spec),
            *self._volumes_from_uses(spec),
            *self._shared_namespace_uses(spec.pid_mode, spec.ipc_mode),
        ]
        self._check_uses("start", info_from_inspect(document), uses)

    # -- volume create ---------------------------------------------------------------------

    def _check_volume_create(self, request: AuthzRequest) -> None:
        if not request.body:
            return  # no options: nothing that could bind a host path
        try:
            volume = gojson.decode(_VOLUME_CREATE_BODY, request.body)
        except ValueError:
            return  # dockerd rejects the same body
        options = volume.get("DriverOpts") or {}
        is_local = _plugin_name(volume.get("Driver") or "local") == "local"
        if is_local and options.get("device", "").startswith("/"):
            self._check_host_path(options["device"])

    # -- existing containers: rename, docker cp, exec -----------------------------------------

    def _check_joined_namespaces(self, action: str, reference: str) -> None:
        """Check a container that joins another's PID or IPC namespace against that one's volumes.

        The rules may have changed since the create was checked, and dockerd
        looks the other container up again at each start.
        """
        if self.engine is None:
            # The create of such a container needed the Engine API, so it was refused.
            return
        if not self.catalog.names():
            return  # no securevol volume exists, so none can be reached
        document = self._inspect(reference, f"the container {reference!r}")
        if document is None:
            return  # dockerd returns 404
        host_config = document.get("HostConfig") or {}
        pid_mode = str(host_config.get("PidMode") or "")
        ipc_mode = str(host_config.get("IpcMode") or "")
        if not (pid_mode.startswith("container:") or ipc_mode.startswith("container:")):
            return
        uses = list(self._shared_namespace_uses(pid_mode, ipc_mode))
        self._check_uses(action, info_from_inspect(document), uses)

    def _check_existing(self, action: str, reference: str, new_name: str = "") -> None:
        if not self.catalog.names():
            return  # no securevol volume exists, so none can be reached
        document = self._inspect(reference, f"the container {reference!r}")
        if document is None:
            return  # dockerd returns 404
        container = info_from_inspect(document)
        if new_name:
            container = dataclasses.replace(container, name=new_name.removeprefix("/"))
        if action in ("archive", "copy"):
            # dockerd serves docker cp itself, and the FUSE check lets dockerd in, so a
            # bind that reaches the mount root (a symlink swapped in after the create,
            # say) must be refused here.
            for mount in mounts_of(document):
                if mount.get("Type") == "bind":
                    self._check_host_path(str(mount.get("Source") or ""))

        host_config = document.get("HostConfig") or {}
        uses = [
            *self._mounted_volume_uses(document, "mounted"),
            # docker exec in a container that shares an allowed one's PID namespace reaches its processes.
            *self._shared_namespace_uses(str(host_config.get("PidMode") or ""), str(host_config.get("IpcMode") or "")),
        ]
        self._check_uses(action, container, uses)

    def _mounted_volume_uses(self, document: Mapping[str, Any], via: str) -> Iterator[VolumeUse]:
        for mount in mounts_of(document):
            name = str(mount.get("Name") or "")
            if mount.get("Type") == "volume" and name in self.catalog:
                yield VolumeUse(name, self.catalog.allowlist(name), via)

    # -- shared steps ----------------------------------------------------------------------------

    def _check_uses(self, action: str, container: ContainerInfo, uses: Iterable[VolumeUse]) -> None:
        """Raise Denied unless every use allows *container*; audit the allows only once all passed."""
        allowed = []
        for use in uses:
            rule, container = self._match(use, container)
            if rule is None:
                raise Denied(_refusal(use, container, self.allow_set_command), "not on allowlist", use.volume,
                             container)
            allowed.append((use, rule))
        for use, rule in allowed:
            self.audit.record(allowed=True, point="authz", action=action, volume=use.volume,
                              container=container, rule=rule)

    def _match(self, use: VolumeUse, container: ContainerInfo) -> tuple[Rule | None, ContainerInfo]:
        """Match *container* against the use's allowlist; look up its image only if a rule needs it.

        A create request carries only the labels it sets, while the container
        will also have its image's labels, and the mount-time check matches those.
        """
        rule = use.allowlist.match(container)
        if rule is not None or container.image_refs is not None:
            return rule, container

        if use.allowlist.has_kind("image"):
            container = self._engine_call(
                lambda engine: engine.with_image_refs(container), f"the image {container.image!r}"
            )
        elif self.engine is not None and (use.allowlist.has_kind("label") or use.allowlist.has_kind("service")):
            try:
                container = self.engine.with_image_refs(container)
            except EngineError as exc:
                # Without the image's labels, only the request's labels count, so the worst case is a refusal.
                log.warning("image labels not read image=%s error=%s", container.image, exc)
                return None, container
        else:
            return rule, container
        return use.allowlist.match(container), container

    def _check_host_path(self, source: str) -> None:
        reached = self.protected_path_reached(source)
        if reached:
            raise Denied(
                f"The bind mount of {source!r} would give the container securevol's directory {reached}, "
                "which holds keys and plaintext mounts; bind a path outside it.",
                "host path reaches securevol state",
            )

    def protected_path_reached(self, source: str) -> str | None:
        """Return the protected directory that host path *source* is, contains or lies in, or None."""
        candidates = {_lexical(source), _resolved(source)}
        for protected in self.protected_paths:
            for path in candidates:
                if path is None or _overlaps(path, protected):
                    return protected
        return None

    def _inspect(self, reference: str, what: str) -> dict[str, Any] | None:
        return self._engine_call(lambda engine: engine.inspect_container(reference), what)

    def _engine_call(self, call: Callable[[EngineClient], Any], what: str) -> Any:
        if self.engine is None:
            raise Denied(
                f"securevol cannot check {what} because it has no Docker Engine API socket configured.",
                "no engine",
            )
        try:
            return call(self.engine)
        except EngineError as exc:
            raise Denied(f"securevol cannot check {what}: {exc}", "engine unavailable") from None

    def _is_ours(self, driver: str) -> bool:
        return bool(driver) and _plugin_name(driver) in self.driver_names


def build_authorizer(settings: Any, registry: Any) -> Authorizer:
    """Build the Authorizer of a daemon from its ``config.Settings`` and ``registry.Registry``."""
    protected = [settings.state_dir, settings.mount_root]
    if settings.master_key is not None:
        protected.append(settings.master_key)
    return Authorizer(
        VolumeCatalog.from_registry(registry, deny_by_default=settings.deny_by_default),
        driver_names=[settings.socket.name.removesuffix(".sock")],
        protected_paths=protected,
        engine=EngineClient(socket_path_from_host(settings.docker_host)),
        audit=AuditLog(settings.audit_log_path),
        allow_set_command=settings.allow_set_command,
    )


def _refusal(use: VolumeUse, container: ContainerInfo, allow_set_command: str) -> str:
    who = f"container {container.name!r}" if container.name else "a container without a name"
    if container.image:
        who += f" (image {container.image})"
    if " namespace of " in use.via:
        namespace, _, reference = use.via.partition(" namespace of ")
        who += f", which would join the {namespace} namespace of container {reference!r} that mounts it"
    if use.allowlist.rules:
        return (f"Volume {use.volume!r} does not allow {who}: it matches none of the rules "
                f"{use.allowlist.text!r}; change them with '{allow_set_command} {use.volume} RULES'.")
    return (f"Volume {use.volume!r} has no allowlist and this securevol daemon denies such volumes to every "
            f"container, so {who} may not use it; give it one with '{allow_set_command} {use.volume} RULES', "
            "or an 'allow' option when it is created.")


def _driver_config(mount: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    driver_config = (mount.get("VolumeOptions") or {}).get("DriverConfig") or {}
    return driver_config.get("Name") or "", dict(driver_config.get("Options") or {})


def _plugin_name(name: str) -> str:
    # dockerd names a managed plugin NAME:latest when no tag is given.
    return name.removesuffix(":latest")


def _protected_forms(paths: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    # Both the path as configured and with symlinks resolved, so that a bind
    # of either form is caught.
    forms: list[str] = []
    for path in paths:
        for form in (_lexical(os.fspath(path)), _resolved(os.fspath(path))):
            if form is not None and form not in forms:
                forms.append(form)
    return tuple(forms)


def _lexical(path: str) -> str | None:
    if "\x00" in path:
        return None  # cannot be a path; treat as reaching everything
    return "/" + posixpath.normpath("/" + path.lstrip("/")).lstrip("/")


def _resolved(path: str) -> str | None:
    lexical = _lexical(path)
    if lexical is None:
        return None
    try:
        return os.path.realpath(lexical)
    except (OSError, ValueError):
        return None


def _overlaps(path: str, protected: str) -> bool:
    if path == protected or path == "/":
        return True
    return protected.startswith(path + "/") or path.startswith(protected + "/")
