"""A small client of the Docker Engine API over its Unix socket.

securevol queries dockerd about containers at three points: the authorization
plugin (who mounts what with ``VolumesFrom``, ``docker cp``, ``exec``,
``rename``), the mount-time check (which container is starting with this
volume) and the FUSE process (who is this container ID). Each call opens one
connection with a short timeout, so a hung dockerd turns into an EngineError
that the caller turns into a refusal, not into a hung plugin.

Requests go to unversioned paths, which dockerd serves at its own API
version; the fields read here exist from API 1.24 on.
"""

import dataclasses
import http.client
import json
import logging
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from securevol.policy import ContainerInfo, normalize_image_refs

log = logging.getLogger(__name__)

DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
DEFAULT_TIMEOUT = 5.0

# An inspect is a few KiB and a list of a thousand containers a few MiB.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

# States from which a container can be (re)starting or be the target of docker cp.
_GONE_STATES = frozenset({"dead", "removing"})
_STARTING_STATES = frozenset({"created", "restarting"})


class EngineError(Exception):
    """The Engine API could not be reached, timed out or returned an error."""


class EngineTimeout(EngineError):
    """dockerd accepted the request but sent no response within the timeout."""


@dataclass(frozen=True)
class VolumeUser:
    """A container that mounts a given volume, and its state (created, running, exited, ...)."""

    container: ContainerInfo
    state: str


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def socket_path_from_host(docker_host: str) -> str:
    """Return the socket path of a ``unix://PATH`` DOCKER_HOST value (or of a bare path).

    Raises ValueError with a lowercase clause that callers put after the value.
    """
    if docker_host.startswith("unix://"):
        path = docker_host[len("unix://") :]
    elif "://" in docker_host:
        raise ValueError("not a Unix socket address; give unix:///PATH")
    else:
        path = docker_host
    if not path.startswith("/"):
        raise ValueError(f"the socket path {path!r} is not absolute")
    return path


class EngineClient:
    """Engine API calls that securevol needs; every method raises EngineError on failure."""

    def __init__(self, socket_path: str = DEFAULT_DOCKER_SOCKET, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"EngineClient(socket_path={self.socket_path!r}, timeout={self.timeout})"

    # -- requests ----------------------------------------------------------------

    def get_json(self, path: str, query: Mapping[str, str] | None = None) -> Any:
        """GET *path* and return the decoded JSON body, or None if dockerd returns 404."""
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        connection = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            connection.request("GET", target, headers={"Accept": "application/json"})
            response = connection.getresponse()
            body = response.read(MAX_RESPONSE_BYTES + 1)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise EngineError(
                f"The Docker Engine API socket {self.socket_path} is not reachable ({exc.strerror}); "
                "check that dockerd runs and that securevol is given its socket (--docker-host, "
                "SECUREVOL_DOCKER_HOST, or docker-socket.source for the managed plugin)."
            ) from None
        except TimeoutError:
            raise EngineTimeout(
                f"The Docker Engine API at {self.socket_path} timed out: no response to GET {path} "
                f"within {self.timeout:g} s."
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"The Docker Engine API request GET {path} failed: {exc!r}.") from None
        finally:
            connection.close()

        return self._decode(path, response.status, body)

    def _decode(self, path: str, status: int, body: bytes) -> Any:
        if status == 404:
            return None
        if len(body) > MAX_RESPONSE_BYTES:
            raise EngineError(
                f"The Docker Engine API response to GET {path} is larger than {MAX_RESPONSE_BYTES} bytes."
            )
        if status >= 300:
            raise EngineError(
                f"The Docker Engine API returned status {status} for GET {path}: {_message(body)}."
            )
        try:
            return json.loads(body)
        except ValueError:
            raise EngineError(
                f"The Docker Engine API returned a body that is not JSON for GET {path}."
            ) from None

    def is_silent(self) -> bool:
        """Tell whether dockerd accepts a request that waits for no container lock but does not respond to it.

        GET /version takes no container lock, so unlike an inspect it is not held up by a start
        or a ``docker cp`` of one container: silence here means dockerd serves no request at all.
        """
        try:
            self.get_json("/version")
        except EngineTimeout:
            return True
        except EngineError:
            return False
        return False

    # -- containers and images ------------------------------------------------------

    def inspect_container(self, reference: str) -> dict[str, Any] | None:
        """Return ``GET /containers/REF/json`` for a container name, ID or ID prefix; None if none exists."""
        document = self.get_json(f"/containers/{_quote(reference)}/json")
        return _expect_object(document, "container inspect")

    def inspect_image(self, reference: str) -> dict[str, Any] | None:
        """Return ``GET /images/REF/json`` for an image reference or ID; None if no such image exists."""
        document = self.get_json(f"/images/{_quote(reference)}/json")
        return _expect_object(document, "image inspect")

    def list_containers(self, filters: Mapping[str, list[str]] | None = None) -> list[dict[str, Any]]:
        """Return ``GET /containers/json?all=1`` (stopped containers included), with optional filters."""
        query = {"all": "1"}
        if filters:
            query["filters"] = json.dumps(dict(filters))
        containers = self.get_json("/containers/json", query)
        if not isinstance(containers, list) or not all(isinstance(item, dict) for item in containers):
            raise EngineError(
                "The Docker Engine API returned a container list that is not a list of objects."
            )
        return containers

    def container_info(self, reference: str, *, with_image_refs: bool = False) -> ContainerInfo | None:
        """Return the allowlist's view of a container, or None if no such container exists.

        With *with_image_refs*, also look up the image's tags and digests,
        which ``image:`` rules need.
        """
        document = self.inspect_container(reference)
        if document is None:
            return None
        info = info_from_inspect(document)
        if with_image_refs:
            info = self.with_image_refs(info)
        return info

    def with_image_refs(self, info: ContainerInfo) -> ContainerInfo:
        """Return *info* with the tags and digests of its image, looked up by image ID (or reference).

        The image's labels are added under the container's own, as dockerd
        does when it creates the container, so that a create request (which
        carries only its own labels) matches label rules as the container will.
        """
        image = self.inspect_image(info.image_id or info.image)
        if image is None:
            return dataclasses.replace(info, image_refs=frozenset())
        refs = normalize_image_refs(image.get("RepoTags")) | normalize_image_refs(image.get("RepoDigests"))
        image_id = info.image_id or str(image.get("Id") or "")
        config = image.get("Config")
        image_labels = _labels(config.get("Labels")) if isinstance(config, dict) else {}
        labels = {**image_labels, **info.labels}
        return dataclasses.replace(info, image_id=image_id, image_refs=refs, labels=labels)

    # -- mount-time identification --------------------------------------------------

    def volume_users(self, volume: str) -> list[VolumeUser]:
        """Return every container that mounts the named volume *volume*, in any state."""
        users = []
        for summary in self.list_containers({"volume": [volume]}):
            # The filter also matches a mount whose destination path equals the
            # value; keep only real uses of the named volume.
            if any(_is_volume_mount(mount, volume) for mount in summary.get("Mounts") or ()):
                users.append(VolumeUser(info_from_summary(summary), str(summary.get("State") or "")))
        return users

    def mount_candidates(self, volume: str) -> list[VolumeUser]:
        """Return the containers that a Mount request for *volume* can be for.

        dockerd sends Mount when a container starts (state created, restarting
        or, for ``docker start``, exited) and for ``docker cp`` (any state), so
        every user counts except a dead container or one being removed.
        """
        return [user for user in self.volume_users(volume) if user.state not in _GONE_STATES]

    def mounting_container(self, volume: str) -> VolumeUser | None:
        """Return the one container that is being started with *volume*, or None if that cannot be determined.

        That is the only user in state created or restarting, or else the only
        user at all (``docker start`` of a stopped container, ``docker cp``).
        """
        candidates = self.mount_candidates(volume)
        starting = [user for user in candidates if user.state in _STARTING_STATES]
        if len(starting) == 1:
            return starting[0]
        if not starting and len(candidates) == 1:
            return candidates[0]
        return None


def info_from_inspect(document: Mapping[str, Any]) -> ContainerInfo:
    """Build the allowlist's view of a container from ``GET /containers/ID/json``."""
    config = document.get("Config") or {}
    return ContainerInfo(
        id=str(document.get("Id") or ""),
        name=str(document.get("Name") or "").removeprefix("/"),
        image=str(config.get("Image") or ""),
        image_id=str(document.get("Image") or ""),
        labels=_labels(config.get("Labels")),
    )


def info_from_summary(summary: Mapping[str, Any]) -> ContainerInfo:
    """Build the allowlist's view of a container from one entry of ``GET /containers/json``."""
    return ContainerInfo(
        id=str(summary.get("Id") or ""),
        name=_primary_name(summary.get("Names")),
        image=str(summary.get("Image") or ""),
        image_id=str(summary.get("ImageID") or ""),
        labels=_labels(summary.get("Labels")),
    )


def mounts_of(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return the ``Mounts`` of a container inspect (Type, Name, Source, Destination, Driver)."""
    mounts = document.get("Mounts") or []
    return [mount for mount in mounts if isinstance(mount, dict)]


def _primary_name(names: Any) -> str:
    # A linked container also appears as "/other/alias"; its own name has one slash.
    for name in names if isinstance(names, list) else ():
        if isinstance(name, str) and "/" not in name.removeprefix("/"):
            return name.removeprefix("/")
    return ""


def _labels(labels: Any) -> dict[str, str]:
    if not isinstance(labels, dict):
        return {}
    return {str(key): str(value) for key, value in labels.items()}


def _is_volume_mount(mount: Any, volume: str) -> bool:
    return isinstance(mount, dict) and mount.get("Type") == "volume" and mount.get("Name") == volume


def _quote(reference: str) -> str:
    # The reference comes from API requests that securevol checks; quoting "/"
    # keeps it one path segment, so it cannot reach another endpoint.
    return urllib.parse.quote(reference, safe="")


def _expect_object(document: Any, what: str) -> dict[str, Any] | None:
    if document is None or isinstance(document, dict):
        return document
    raise EngineError(f"The Docker Engine API returned a {what} that is not a JSON object.")


def _message(body: bytes) -> str:
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    text = str(message) if message else body[:200].decode("utf-8", "replace")
    return text.strip() or "(empty body)"
