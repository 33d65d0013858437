"""Identification of a process's container from ``/proc/PID/cgroup``.

The FUSE process learns only the PID of each caller. The container runtime
puts every container in a cgroup named after the container ID, and a process
in a container cannot leave it without privileges (CAP_SYS_ADMIN on the
cgroup filesystem), so the cgroup path identifies the container:

    cgroup v1, cgroupfs driver    4:memory:/docker/<64 hex>
    systemd driver (v1 and v2)    0::/system.slice/docker-<64 hex>.scope
    containerd CRI                0::/kubepods.slice/.../cri-containerd-<64 hex>.scope
    CRI-O, Podman                 crio-<64 hex>.scope, libpod-<64 hex>.scope
    a host process                anything else, for example 0::/user.slice/...

A path that names two different containers is rejected, because neither end
of such a path can be trusted. A process with write access to its cgroup
may create nested cgroups with any name inside its own (Docker in Docker,
systemd in a container). With the cgroupfs driver, the creator of a
container may put it inside another container's cgroup (``--cgroup-parent
/docker/<ID of an allowed container>``).
"""

import os
import re
from dataclasses import dataclass

HOST = "host"

# A systemd scope named after the runtime and the container ID.
_SCOPE_RE = re.compile(r"(docker|cri-containerd|crio|libpod)-([0-9a-f]{64})\.scope")
_ID_RE = re.compile(r"[0-9a-f]{64}")
_RUNTIME_OF_SCOPE = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}
DOCKERD_EXECUTABLES = frozenset({"dockerd"})


class UnknownProcess(Exception):
    """The process has exited, or its cgroups name different containers; the caller must refuse access."""


@dataclass(frozen=True)
class ProcessIdentity:
    """The place a process runs: on the host (``container_id`` None) or in one container.

    ``runtime`` is ``host``, ``docker``, ``containerd``, ``cri-o``, ``podman``,
    ``buildkit`` (a build step, which has no container ID) or ``unknown`` (a
    bare container ID under a custom cgroup parent).
    """

    runtime: str
    container_id: str | None = None

    @property
    def is_host(self) -> bool:
        return self.runtime == HOST


HOST_PROCESS = ProcessIdentity(HOST)


def identify_process(pid: int, proc: str = "/proc") -> ProcessIdentity:
    """Return where process (or thread) *pid* runs; raise UnknownProcess if that cannot be determined."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as cgroup_file:
            text = cgroup_file.read()
    except (FileNotFoundError, ProcessLookupError):
        raise UnknownProcess(f"process {pid} has exited") from None
    return identify_cgroup(text)


def identify_cgroup(text: str) -> ProcessIdentity:
    """Return where a process runs, given the contents of its ``/proc/PID/cgroup``.

    Each line is ``HIERARCHY:CONTROLLERS:PATH``. A process counts as in a
    container if any hierarchy puts it in one; lines that name two different
    containers raise UnknownProcess.
    """
    found = {identity for identity in map(_identify_path, _cgroup_paths(text)) if not identity.is_host}
    if not found:
        return HOST_PROCESS
    if len(found) > 1:
        raise UnknownProcess("the process's cgroups name different containers")
    return found.pop()


def _cgroup_paths(text: str) -> list[str]:
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.append(parts[2])
    return paths


def _identify_path(path: str) -> ProcessIdentity:
    components = path.split("/")
    named = []
    for index in range(len(components)):
        identity = _identify_component(components, index)
        if identity is not None:
            named.append(identity)
    if not named:
        return HOST_PROCESS

    if len({identity.container_id for identity in named}) > 1:
        raise UnknownProcess("the process's cgroup path names more than one container")
    return named[0]


def _identify_component(components: list[str], index: int) -> ProcessIdentity | None:
    """Return the container that path component *index* names, or None if it names none."""
    component = components[index]
    scope = _SCOPE_RE.fullmatch(component)
    if scope:
        return ProcessIdentity(_RUNTIME_OF_SCOPE[scope.group(1)], scope.group(2))

    parent = components[index - 1] if index > 0 else ""
    if _ID_RE.fullmatch(component):
        return ProcessIdentity("docker" if parent == "docker" else "unknown", component)

    if component == "buildkit" and parent == "docker":
        # BuildKit runs each build step under /docker/buildkit/<step ID>.
        return ProcessIdentity("buildkit")
    return None


def is_docker_daemon(pid: int, proc: str = "/proc") -> bool:
    """Tell whether *pid* runs the dockerd executable (dockerd re-executes itself for ``docker cp``).

    Only meaningful for host processes: a dockerd inside a container is that container.
    """
    try:
        executable = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return False
    # After a package upgrade the running binary shows as "/usr/sbin/dockerd (deleted)".
    executable = executable.removesuffix(" (deleted)")
    return os.path.basename(executable) in DOCKERD_EXECUTABLES


def process_start_time(pid: int, proc: str = "/proc") -> int:
    """Return the start time of *pid* in clock ticks since boot, to tell a reused PID from the old one.

    Raises UnknownProcess if the process has exited.
    """
    # os.open and os.read rather than open(): this runs on every checked FUSE
    # request, and a buffered file object costs more than the read itself.
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise UnknownProcess(f"process {pid} has exited") from None
    try:
        stat = os.read(fd, 4096)
    except ProcessLookupError:
        raise UnknownProcess(f"process {pid} has exited") from None
    finally:
        os.close(fd)
    # The command name in field 2 may contain spaces and parentheses, so
    # count fields after its closing parenthesis; starttime is field 22.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])
