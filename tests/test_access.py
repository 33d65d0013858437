"""The access file, the FUSE-side AccessChecker and the mount-time MountGuard (securevol.access).

Processes are real: the test runner (a host process), a kernel thread,
exited children, and containers of a private dockerd.
"""

import errno
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from securevol.access import (
    ACCESS_FILE,
    AccessChecker,
    AccessPolicy,
    MountGuard,
    apply_default_policy,
    previous_policy,
    read_access_file,
    update_access_file,
    write_access_file,
)
from securevol import config
from securevol.audit import AuditLog
from securevol.driver import VolumeDriver, _apply_default_policy
from securevol.engine import EngineClient, EngineTimeout
from securevol.errors import AccessDenied
from securevol.registry import Registry, VolumeRecord
from tests.dockerd import PLUGIN_DIR, PrivateDockerd, build_busybox_image, plugin_socket_path, unique_driver_name
from tests.plugin_server import PluginServer

KTHREADD_PID = 2  # the parent of all kernel threads on Linux


def policy(tmp_path: Path, allow: str | None, *, approved: dict | None = None, deny_by_default: bool = False,
           docker_socket: str = "/nonexistent/docker.sock", unverified: dict | None = None) -> AccessPolicy:
    return AccessPolicy(volume="db", allow=allow, deny_by_default=deny_by_default,
                        docker_socket=f"unix://{docker_socket}", audit_log=str(tmp_path / "audit.jsonl"),
                        approved=approved or {}, unverified=unverified or {})


def unverified_checker(tmp_path: Path, container_id: str, docker_socket: Path) -> AccessChecker:
    """Return a checker whose only rule is name:web, with an unverified approval of *container_id* by that rule."""
    return checker_for(tmp_path, policy(tmp_path, "name:web", docker_socket=str(docker_socket),
                                        unverified={container_id: "name:web"}))


def checker_for(tmp_path: Path, access: AccessPolicy) -> AccessChecker:
    path = tmp_path / "access.json"
    write_access_file(path, access)
    return AccessChecker(path)


def audit_lines(tmp_path: Path) -> list[dict]:
    path = tmp_path / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- the access file ---------------------------------------------------------------------------


def test_access_file_round_trip_and_mode(tmp_path):
    original = policy(tmp_path, "name:web", approved={"a" * 64: "name:web"})
    path = tmp_path / "access.json"

    write_access_file(path, original)

    assert read_access_file(path) == original
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", ["", "{", "[]", '{"version": 99}', '{"version": 1}'])
def test_access_file_damaged(tmp_path, content):
    path = tmp_path / "access.json"
    path.write_text(content)

    with pytest.raises((ValueError, KeyError)):
        read_access_file(path)


# -- FUSE-side checks on real host processes ---------------------------------------------------------


def test_host_process_denied_without_host_rule(tmp_path):
    checker = checker_for(tmp_path, policy(tmp_path, "name:web"))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not checker.allows(child.pid, "open")
    finally:
        child.kill()
        child.wait()

    record = audit_lines(tmp_path)[-1]
    assert record["decision"] == "deny"
    assert record["point"] == "access"
    assert record["action"] == "open"
    assert record["reason"] == "host process"


def test_host_process_allowed_with_host_rule(tmp_path):
    checker = checker_for(tmp_path, policy(tmp_path, "name:web,host"))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert checker.allows(child.pid, "lookup")
    finally:
        child.kill()
        child.wait()
    assert audit_lines(tmp_path)[-1]["rule"] == "host"


def test_fuse_process_itself_and_kernel_threads_allowed(tmp_path):
    checker = checker_for(tmp_path, policy(tmp_path, "name:web"))

    assert checker.allows(os.getpid(), "lookup")
    assert checker.allows(KTHREADD_PID, "setattr")


def test_open_volume_allows_everyone(tmp_path):
    checker = checker_for(tmp_path, policy(tmp_path, None))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert checker.allows(child.pid, "open")
    finally:
        child.kill()
        child.wait()
    assert audit_lines(tmp_path) == []


def test_deny_by_default_refuses_host(tmp_path):
    checker = checker_for(tmp_path, policy(tmp_path, None, deny_by_default=True))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not checker.allows(child.pid, "open")
    finally:
        child.kill()
        child.wait()


def test_exited_and_invalid_pids_denied(tmp_path):
    checker = checker_for(tmp_path, policy(tmp_path, "name:web,host"))
    child = subprocess.Popen(["true"])
    child.wait()

    assert not checker.allows(child.pid, "open")
    assert not checker.allows(0, "open")


def test_missing_access_file_denies(tmp_path):
    checker = AccessChecker(tmp_path / "missing.json")

    assert not checker.allows(os.getpid(), "open")


def test_changed_access_file_takes_effect(tmp_path):
    checker = checker_for(tmp_path, policy(tmp_path, "name:web"))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not checker.allows(child.pid, "open")

        write_access_file(tmp_path / "access.json", policy(tmp_path, "name:web,host"))

        # The refusal was cached for a moment; a cache miss re-reads the file.
        checker._decisions.clear()
        assert checker.allows(child.pid, "open")
    finally:
        child.kill()
        child.wait()


def test_damaged_access_file_denies_all(tmp_path):
    checker = checker_for(tmp_path, policy(tmp_path, "host"))
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert checker.allows(child.pid, "open")

        (tmp_path / "access.json").write_text("{broken")
        checker._decisions.clear()

        assert not checker.allows(child.pid, "open")
    finally:
        child.kill()
        child.wait()


# -- with a real dockerd ------------------------------------------------------------------------------------


@pytest.fixture
def running(dockerd, busybox_image):
    """Start named busybox containers that sleep; remove them after the test."""
    names = []

    def start(name: str, *args: str) -> tuple[str, int]:
        container_id = dockerd.run("-d", "--name", name, *args, busybox_image, "sleep", "300").stdout.strip()
        names.append(name)
        pid = EngineClient(str(dockerd.socket)).inspect_container(container_id)["State"]["Pid"]
        return container_id, pid

    yield start
    if names:
        dockerd.docker("rm", "-f", *names, check=False)


@pytest.mark.docker
@pytest.mark.slow
def test_container_checked_through_engine(tmp_path, dockerd, running):
    web_id, web_pid = running("access-web", "--label", "role=web")
    other_id, other_pid = running("access-other")
    checker = checker_for(tmp_path, policy(tmp_path, "label:role=web", docker_socket=str(dockerd.socket)))

    assert checker.allows(web_pid, "open")
    assert not checker.allows(other_pid, "open")

    records = audit_lines(tmp_path)
    assert [(r["decision"], r["container_id"], r["container_name"]) for r in records] == [
        ("allow", web_id, "access-web"), ("deny", other_id, "access-other")]


@pytest.mark.docker
@pytest.mark.slow
def test_approved_container_needs_no_engine(tmp_path, running):
    web_id, web_pid = running("access-approved")
    checker = checker_for(tmp_path, policy(tmp_path, "name:web", approved={web_id: "name:web"}))

    # The Engine API socket in the policy does not exist: only the approval can allow.
    assert checker.allows(web_pid, "open")


@pytest.mark.docker
@pytest.mark.slow
def test_unverified_approval_allows_while_engine_silent(tmp_path, running, silent_engine):
    container_id, pid = running("access-unverified")
    checker = checker_for(tmp_path, policy(tmp_path, "name:access-unverified", docker_socket=silent_engine.socket_path,
                                           unverified={container_id: "name:access-unverified"}))

    assert checker.allows(pid, "open")
    assert audit_lines(tmp_path)[-1]["reason"] == "approved at the last mount, dockerd does not respond yet"


@pytest.mark.docker
@pytest.mark.slow
def test_unverified_approval_not_granted_while_container_locked(tmp_path, dockerd, running):
    # dockerd holds a container's lock while it streams a docker cp of it, so only that
    # container's inspect times out; dockerd itself still responds.
    container_id, pid = running("access-locked")
    dockerd.docker("exec", "access-locked", "dd", "if=/dev/zero", "of=/big", "bs=1M", "count=16")
    checker = unverified_checker(tmp_path, container_id, dockerd.socket)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.connect(str(dockerd.socket))
        stream.sendall(f"GET /containers/{container_id}/archive?path=/big HTTP/1.1\r\nHost: docker\r\n\r\n".encode())
        time.sleep(1)  # dockerd fills the socket buffer and then waits, holding the lock
        with pytest.raises(EngineTimeout):
            EngineClient(str(dockerd.socket), timeout=1).inspect_container(container_id)

        assert not checker.allows(pid, "open")

    assert audit_lines(tmp_path)[-1]["reason"] == "engine timed out"


class EngineProxy:
    """A Unix socket in front of a real dockerd that can hold back GET /version, or every request.

    It simulates a loaded dockerd (a slow /version) and a silent one, which a real dockerd
    shows only now and then.
    """

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self.hold_version = False
        self.hold_all = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for connection in self._held:
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        if self.hold_all or (self.hold_version and head.split(b" ", 2)[1].startswith(b"/version")):
            self._held.append(client)  # accepted, with no response
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
            upstream.connect(str(self.target))
            upstream.sendall(head)
            upstream.shutdown(socket.SHUT_WR)
            while chunk := upstream.recv(65536):
                client.sendall(chunk)
        client.close()


@pytest.fixture
def engine_proxy(tmp_path, dockerd):
    proxy = EngineProxy(tmp_path / "proxy.sock", dockerd.socket)
    yield proxy
    proxy.close()


@pytest.mark.docker
@pytest.mark.slow
def test_unverified_slow_version_denied_simulated(tmp_path, running, engine_proxy):
    container_id, pid = running("access-slow-version")
    engine_proxy.hold_version = True
    checker = unverified_checker(tmp_path, container_id, engine_proxy.path)

    assert not checker.allows(pid, "open")
    assert audit_lines(tmp_path)[-1]["reason"] == "not on allowlist"


@pytest.mark.docker
@pytest.mark.slow
def test_revoked_approval_stays_refused_simulated(tmp_path, running, engine_proxy):
    container_id, pid = running("access-revoked")
    checker = unverified_checker(tmp_path, container_id, engine_proxy.path)
    assert not checker.allows(pid, "open")

    engine_proxy.hold_all = True
    time.sleep(2.1)  # past the cached refusal (DENY_CACHE_SECONDS)

    assert not checker.allows(pid, "open")


@pytest.mark.docker
@pytest.mark.slow
def test_unverified_approval_checked_once_engine_responds(tmp_path, dockerd, running):
    # The container was approved as name:web at the last mount and renamed since.
    container_id, pid = running("access-renamed")
    checker = unverified_checker(tmp_path, container_id, dockerd.socket)

    assert not checker.allows(pid, "open")
    assert audit_lines(tmp_path)[-1]["reason"] == "not on allowlist"

    # The daemon no longer carries that approval over at a mount while dockerd is silent.
    assert json.loads((tmp_path / "revoked.json").read_text()) == [container_id]
    assert previous_policy(tmp_path / "access.json").unverified == {}


@pytest.mark.docker
@pytest.mark.slow
def test_container_denied_when_engine_unreachable(tmp_path, running):
    _, pid = running("access-noengine")
    checker = checker_for(tmp_path, policy(tmp_path, "name:access-noengine"))

    assert not checker.allows(pid, "open")
    assert audit_lines(tmp_path)[-1]["reason"] == "engine unavailable"


@pytest.mark.docker
@pytest.mark.slow
def test_dockerd_allowed_as_host_process(tmp_path, dockerd):
    checker = checker_for(tmp_path, policy(tmp_path, "name:web"))

    assert checker.allows(dockerd.pid, "create")


# -- the daemon's default policy ------------------------------------------------------------------------------


def _registry_with_volumes(state_dir: Path, *names: str) -> Registry:
    state_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(state_dir)
    registry.ensure_layout()
    for name in names:
        record = VolumeRecord(name=name, volume_id="00" * 16, created_at="2026-01-01T00:00:00Z", options={},
                              key_provider="local")
        with registry.creating_or_removing():
            registry.create(record, {"provider": "local"}, (0, 0, 0o755))
    return registry


def test_allowlist_change_keeps_approvals_of_remaining_rules(tmp_path):
    path = tmp_path / "access.json"
    write_access_file(path, policy(tmp_path, "name:web,name:db", approved={"a" * 64: "name:web", "b" * 64: "name:db"}))

    assert update_access_file(path, "name:web,host")

    written = read_access_file(path)
    assert written.allow == "name:web,host"
    assert written.approved == {"a" * 64: "name:web"}


def test_apply_default_policy_rewrites_access_file(tmp_path):
    path = tmp_path / "access.json"
    write_access_file(path, policy(tmp_path, None, approved={"c" * 64: "(default policy)"}))

    assert apply_default_policy(path, True)

    written = read_access_file(path)
    assert written.deny_by_default
    assert written.approved == {}
    assert written.allowlist().rules == ()
    assert not written.allowlist().open
    assert not apply_default_policy(path, True)
    assert not apply_default_policy(tmp_path / "missing.json", True)


def test_daemon_start_gives_mounted_volumes_its_policy(tmp_path):
    # The FUSE process of a volume that stayed mounted across a restart from
    # the allow to the deny policy reads the rewritten access file.
    registry = _registry_with_volumes(tmp_path / "state", "mounted", "never-mounted")
    write_access_file(registry.volume_dir("mounted") / ACCESS_FILE, policy(tmp_path, None))

    _apply_default_policy(registry, True)

    assert read_access_file(registry.volume_dir("mounted") / ACCESS_FILE).deny_by_default
    assert not (registry.volume_dir("never-mounted") / ACCESS_FILE).exists()


def test_allow_cli_reports_policy_from_access_file(tmp_path):
    # The daemon runs with the deny policy; the command is given no --default-policy.
    state_dir = tmp_path / "state"
    registry = _registry_with_volumes(state_dir, "db")
    write_access_file(registry.volume_dir("db") / ACCESS_FILE, policy(tmp_path, None, deny_by_default=True))

    show_result = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", "show", "db", "--state-dir",
                                  str(state_dir)], capture_output=True, text=True, timeout=60)
    cleared = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", "clear", "db", "--state-dir",
                              str(state_dir)], capture_output=True, text=True, timeout=60)

    assert show_result.stdout.strip() == "(no allowlist: the daemon's default policy denies every container)"
    assert cleared.returncode == 0, cleared.stderr
    assert "the default policy denies every container" in cleared.stdout


def test_allow_cli_state_dir_before_or_after_action(tmp_path):
    state_dir = tmp_path / "state"
    _registry_with_volumes(state_dir, "db")

    for args in (["--state-dir", str(state_dir), "set", "db", "name:web"],
                 ["show", "db", "--state-dir", str(state_dir)],
                 ["--state-dir", str(state_dir), "show", "db"],
                 ["--state-dir", "/nonexistent", "show", "--state-dir", str(state_dir), "db"]):
        result = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
        if "show" in args:
            assert result.stdout.strip() == "name:web", args


def test_allow_cli_records_changes_in_audit_log(tmp_path):
    # The volume's access file names the audit log of the daemon that mounted it.
    state_dir = tmp_path / "state"
    registry = _registry_with_volumes(state_dir, "db")
    write_access_file(registry.volume_dir("db") / ACCESS_FILE, policy(tmp_path, None))

    for args in (["set", "db", "name:web"], ["set", "db", "name:web,host"], ["clear", "db"]):
        result = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", *args, "--state-dir", str(state_dir)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr

    changes = [record for record in audit_lines(tmp_path) if record["decision"] == "change"]
    assert [(r["action"], r["rule"]) for r in changes] == [
        ("allow set", "name:web"), ("allow set", "name:web,host"), ("allow clear", "")]
    assert {r["point"] for r in changes} == {"cli"}
    assert changes[0]["reason"].startswith("previous rules: (none); by uid ")
    assert changes[2]["reason"].startswith("previous rules: name:web,host; by uid ")
    assert all(r["volume"] == "db" for r in changes)


def test_allow_cli_unwritable_audit_log_changes_nothing(tmp_path):
    # As for a managed plugin's state directory seen from the host: the audit log's path is the plugin's.
    state_dir = tmp_path / "state"
    registry = _registry_with_volumes(state_dir, "db")
    elsewhere = policy(tmp_path, "name:web")
    write_access_file(registry.volume_dir("db") / ACCESS_FILE,
                      AccessPolicy(**{**elsewhere.__dict__, "audit_log": str(tmp_path / "absent" / "audit.jsonl")}))

    for args in (["set", "db", "host"], ["clear", "db"]):
        result = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", *args, "--state-dir", str(state_dir)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert f"The audit log {tmp_path / 'absent' / 'audit.jsonl'} cannot be written" in result.stderr
        assert "was not changed" in result.stderr

    assert read_access_file(registry.volume_dir("db") / ACCESS_FILE).allow == "name:web"
    assert "allow" not in registry.read_volume("db").options


def test_allow_cli_reports_policy_recorded_by_daemon_start(tmp_path):
    # A volume never mounted has no access file; the daemon's start recorded its policy in the state directory.
    state_dir = tmp_path / "state"
    settings = config.resolve({"state_dir": str(state_dir), "socket": str(tmp_path / "unused.sock"),
                               "default_policy": "deny"})
    VolumeDriver.from_settings(settings).create("never-mounted", {})

    show_result = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", "show", "never-mounted",
                                  "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=60)

    assert show_result.stdout.strip() == "(no allowlist: the daemon's default policy denies every container)"
    assert not (state_dir / "volumes" / "never-mounted" / ACCESS_FILE).exists()


# -- mount time ---------------------------------------------------------------------------------------------


def guard(tmp_path: Path, engine: EngineClient | None, deny_by_default: bool = False) -> MountGuard:
    return MountGuard(engine, AuditLog(tmp_path / "audit.jsonl"), deny_by_default=deny_by_default,
                      docker_socket="unix:///var/run/docker.sock", probe_timeout=0.5)


def test_mount_guard_open_volume_needs_no_engine(tmp_path):
    access_file = tmp_path / "access.json"

    guard(tmp_path, None).check_mount("db", None, access_file)

    written = read_access_file(access_file)
    assert written.allow is None
    assert written.allowlist().open


def test_mount_guard_without_engine_refuses(tmp_path):
    with pytest.raises(AccessDenied, match="no Docker Engine API"):
        guard(tmp_path, None).check_mount("db", "name:web", tmp_path / "access.json")


def test_mount_guard_invalid_allowlist_refuses(tmp_path):
    with pytest.raises(AccessDenied, match="invalid allowlist"):
        guard(tmp_path, None).check_mount("db", "nam:web", tmp_path / "access.json")


@pytest.fixture
def silent_engine(tmp_path):
    """An Engine API socket that accepts connections and never responds, like dockerd while it restores containers."""
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    yield EngineClient(str(path), timeout=0.5)
    listener.close()


def test_mount_guard_engine_timeout_keeps_approvals_simulated(tmp_path, silent_engine):
    # dockerd's silence during its start is simulated by a socket that never responds;
    # test_e2e_restored_container_mounts_allowlisted_volume covers a real dockerd.
    access_file = tmp_path / "access.json"
    previous = policy(tmp_path, "name:web,name:old", approved={"a" * 64: "name:web", "b" * 64: "name:old"})
    write_access_file(access_file, previous)

    guard(tmp_path, silent_engine).check_mount("db", "name:web", access_file)

    written = read_access_file(access_file)
    assert written.approved == {}
    assert written.unverified == {"a" * 64: "name:web"}
    record = audit_lines(tmp_path)[-1]
    assert record["decision"] == "allow"
    assert record["reason"].startswith("engine timed out: 1 container(s) approved before keep access")


def test_revoked_file_filters_and_is_cleared(tmp_path):
    access_file = tmp_path / "access.json"
    write_access_file(access_file, policy(tmp_path, "name:web", unverified={"a" * 64: "name:web", "b" * 64: "name:web"}))
    (tmp_path / "revoked.json").write_text(json.dumps(["a" * 64]))

    assert previous_policy(access_file).unverified == {"b" * 64: "name:web"}

    (tmp_path / "revoked.json").write_text("not json")
    assert previous_policy(access_file).unverified == {}

    # A policy without unverified approvals, as a mount while dockerd responds writes, clears it.
    write_access_file(access_file, policy(tmp_path, "name:web", approved={"a" * 64: "name:web"}))
    assert not (tmp_path / "revoked.json").exists()
    assert previous_policy(access_file).approved == {"a" * 64: "name:web"}


def test_mount_guard_engine_timeout_without_previous_mount_simulated(tmp_path, silent_engine):
    access_file = tmp_path / "access.json"

    guard(tmp_path, silent_engine).check_mount("db", "name:web", access_file)

    written = read_access_file(access_file)
    assert written.approved == {}
    assert written.unverified == {}


def test_mount_guard_unreachable_engine_refuses(tmp_path):
    engine = EngineClient(str(tmp_path / "missing.sock"), timeout=0.5)

    with pytest.raises(AccessDenied, match="cannot ask dockerd which container is starting"):
        guard(tmp_path, engine).check_mount("db", "name:web", tmp_path / "access.json")

    assert audit_lines(tmp_path)[-1]["reason"] == "engine unavailable"


@pytest.mark.docker
@pytest.mark.slow
def test_mount_guard_with_candidates(tmp_path, dockerd, busybox_image):
    engine = EngineClient(str(dockerd.socket))
    access_file = tmp_path / "access.json"
    volume = "guard-probe"
    try:
        # No container uses the volume yet: dockerd copying image files.
        guard(tmp_path, engine).check_mount(volume, "name:guard-web", access_file)
        assert read_access_file(access_file).approved == {}

        web_id = dockerd.docker("create", "--name", "guard-web", "-v", f"{volume}:/d", busybox_image,
                                "true").stdout.strip()
        guard(tmp_path, engine).check_mount(volume, "name:guard-web", access_file)
        assert read_access_file(access_file).approved == {web_id: "name:guard-web"}

        # A disallowed container that is not being started (its inspect returns at
        # once): securevol cannot rule out that the mount is for it, so it refuses.
        dockerd.docker("create", "--name", "guard-evil", "-v", f"{volume}:/d", busybox_image, "true")
        with pytest.raises(AccessDenied, match="cannot tell which container") as refused:
            guard(tmp_path, engine).check_mount(volume, "name:guard-web", access_file)
        assert audit_lines(tmp_path)[-1]["container_name"] == "guard-evil"
        assert f"'securevol allow set {volume} RULES'" in str(refused.value)

        # Under the deny policy, a volume without an allowlist: the refusal names the policy.
        with pytest.raises(AccessDenied, match="has no allowlist and this securevol daemon denies") as refused:
            guard(tmp_path, engine, deny_by_default=True).check_mount(volume, None, access_file)
        assert f"'securevol allow set {volume} RULES'" in str(refused.value)
    finally:
        dockerd.docker("rm", "-f", "guard-web", "guard-evil", check=False)
        dockerd.docker("volume", "rm", volume, check=False)


class AllBusyGuard(MountGuard):
    """A MountGuard that takes every candidate for one being started, as if dockerd held each one's lock."""

    def _busy(self, volume, candidates):
        return list(candidates)


@pytest.mark.docker
@pytest.mark.slow
def test_mount_guard_starting_together_simulated_locks(tmp_path, dockerd, busybox_image):
    # Which containers dockerd is starting is simulated: a real race of two
    # starts is needed to lock both, and it does not happen on demand.
    engine = EngineClient(str(dockerd.socket))
    volume = "guard-together"
    together = AllBusyGuard(engine, AuditLog(tmp_path / "audit.jsonl"), deny_by_default=False,
                            docker_socket="unix:///var/run/docker.sock", probe_timeout=0.5)
    try:
        dockerd.docker("create", "--name", "guard-ok", "-v", f"{volume}:/d", busybox_image, "true")
        dockerd.docker("create", "--name", "guard-no", "-v", f"{volume}:/d", busybox_image, "true")

        with pytest.raises(AccessDenied) as refused:
            together.check_mount(volume, "name:guard-ok", tmp_path / "access.json")

        message = str(refused.value)
        assert "container 'guard-no'" in message
        assert "was starting too" in message
        assert "start the allowed container again" in message
        assert "matches none of the rules" not in message
        assert audit_lines(tmp_path)[-1]["reason"] == "allowed and disallowed containers start together"
    finally:
        dockerd.docker("rm", "-f", "guard-ok", "guard-no", check=False)
        dockerd.docker("volume", "rm", volume, check=False)


# -- end to end: a real plugin and dockerd, without the authorization plugin --------------------------
#
# With no authorization plugin, the mount-time check and the FUSE process are
# all that stand between a container and the plaintext.


@pytest.fixture(scope="module")
def guarded_plugin(dockerd):
    """`securevol serve` for the session's dockerd, with the Engine API socket for the allowlist."""
    PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
    server = PluginServer(socket_path=plugin_socket_path(unique_driver_name()),
                          env={"SECUREVOL_DOCKER_HOST": dockerd.host})
    server.start()
    yield server
    try:
        dockerd.remove_all_containers()
        listing = dockerd.docker("volume", "ls", "-q", "--filter", f"driver={server.driver}", check=False)
        for volume in listing.stdout.split():
            dockerd.docker("volume", "rm", "--force", volume, check=False)
    finally:
        server.cleanup()


@pytest.fixture
def volume(dockerd, guarded_plugin):
    """Create allowlisted volumes of the guarded plugin: ``volume("name:web")`` returns a fresh name."""
    created = []

    def create(allow: str | None) -> str:
        name = f"acc-{secrets.token_hex(4)}"
        options = ["-o", f"allow={allow}"] if allow is not None else []
        dockerd.docker("volume", "create", "-d", guarded_plugin.driver, *options, name)
        created.append(name)
        return name

    yield create
    dockerd.remove_all_containers()
    for name in created:
        dockerd.docker("volume", "rm", "--force", name, check=False)


def allow_cli(plugin: PluginServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "securevol.cli", "allow", *args, "--state-dir", str(plugin.state_dir)],
        capture_output=True, text=True, timeout=60,
    )


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


def can_read(path: Path) -> bool:
    try:
        path.read_bytes()
    except PermissionError:
        return False
    return True


def written_and_readable(path: Path) -> bool:
    """Tell whether *path* exists and this process can read it; a container may not have written it yet."""
    try:
        return can_read(path)
    except FileNotFoundError:
        return False


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_allowed_container_uses_volume(dockerd, busybox_image, volume, guarded_plugin):
    name = volume("name:acc-web")

    dockerd.run("--rm", "--name", "acc-web", "-v", f"{name}:/d", busybox_image, "sh", "-c", "echo hi > /d/f")
    result = dockerd.run("--rm", "--name", "acc-web", "-v", f"{name}:/d", busybox_image, "cat", "/d/f")

    assert result.stdout == "hi\n"
    records = audit_lines(guarded_plugin.state_dir / "log")
    mount_allows = [r for r in records if r["point"] == "mount" and r["decision"] == "allow"]
    assert "acc-web" in {r["container_name"] for r in mount_allows}


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_mount_refused_for_other_container(dockerd, busybox_image, volume, guarded_plugin):
    name = volume("name:acc-web")

    refused = dockerd.run("--rm", "--name", "acc-evil", "-v", f"{name}:/d", busybox_image, "true",
                          check=False)

    assert refused.returncode != 0
    assert f"Volume '{name}' does not allow container 'acc-evil'" in refused.stderr
    assert "name:acc-web" in refused.stderr
    # The daemon runs on a state directory of its own, so the command must name it.
    assert (f"change them with 'securevol allow --state-dir {guarded_plugin.state_dir} set {name} RULES'"
            in refused.stderr)


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_deny_policy_refusal_names_policy(dockerd, busybox_image):
    PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
    server = PluginServer(socket_path=plugin_socket_path(unique_driver_name()),
                          env={"SECUREVOL_DOCKER_HOST": dockerd.host, "SECUREVOL_DEFAULT_POLICY": "deny"})
    server.start()
    name = f"acc-{secrets.token_hex(4)}"
    try:
        dockerd.docker("volume", "create", "-d", server.driver, name)

        refused = dockerd.run("--rm", "--name", "acc-nolist", "-v", f"{name}:/d", busybox_image, "true",
                              check=False)

        assert refused.returncode != 0
        assert f"Volume '{name}' has no allowlist and this securevol daemon denies such volumes" in refused.stderr
        assert "container 'acc-nolist'" in refused.stderr
        assert f"'securevol allow --state-dir {server.state_dir} set {name} RULES'" in refused.stderr
    finally:
        dockerd.docker("volume", "rm", "--force", name, check=False)
        server.cleanup()


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_idle_disallowed_container_does_not_block(dockerd, busybox_image, volume):
    name = volume("name:acc-web")
    dockerd.docker("create", "--name", "acc-idle", "-v", f"{name}:/d", busybox_image, "true")

    # Both containers use the volume; dockerd holds only acc-web's lock while starting it.
    result = dockerd.run("--rm", "--name", "acc-web", "-v", f"{name}:/d", busybox_image, "echo", "started")
    refused = dockerd.docker("start", "-a", "acc-idle", check=False)

    assert result.stdout == "started\n"
    assert refused.returncode != 0
    assert "does not allow container 'acc-idle'" in refused.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_fuse_refuses_host_and_other_containers(dockerd, busybox_image, volume, guarded_plugin):
    name = volume("name:acc-web")
    dockerd.run("-d", "--name", "acc-web", "-v", f"{name}:/d", busybox_image, "sh", "-c",
                "echo secret > /d/f; sleep 300")
    mountpoint = guarded_plugin.mount_root / name
    wait_until(lambda: dockerd.docker("exec", "acc-web", "cat", "/d/f", check=False).stdout == "secret\n",
               "the container writing its file")

    # The test runner is a host process, and the allowlist has no 'host' rule.
    with pytest.raises(PermissionError):
        (mountpoint / "f").read_bytes()
    with pytest.raises(PermissionError):
        os.listdir(mountpoint)

    # A container that reaches the mountpoint through a bind of the mount root.
    sneaky = dockerd.run("--rm", "--name", "acc-sneaky", "-v", f"{guarded_plugin.mount_root}:/m",
                         busybox_image, "cat", f"/m/{name}/f", check=False)
    assert sneaky.returncode != 0
    assert "Permission denied" in sneaky.stderr

    # exec runs in the allowed container; docker cp is done by dockerd itself.
    assert dockerd.docker("exec", "acc-web", "cat", "/d/f").stdout == "secret\n"
    copied = dockerd.docker("cp", "acc-web:/d/f", "-").stdout
    assert "secret" in copied

    records = audit_lines(guarded_plugin.state_dir / "log")
    denied = [r for r in records
              if r["point"] == "access" and r["decision"] == "deny" and r["volume"] == name]
    assert {r["container_name"] for r in denied} >= {"", "acc-sneaky"}


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_cgroup_parent_inside_allowed_container(dockerd, busybox_image, volume, guarded_plugin):
    # With the cgroupfs driver, --cgroup-parent may name another container's
    # cgroup, so the new container's path starts with the allowed one's ID.
    name = volume("name:acc-web")
    dockerd.run("-d", "--name", "acc-web", "-v", f"{name}:/d", busybox_image, "sh", "-c",
                "echo secret > /d/f; sleep 300")
    wait_until(lambda: dockerd.docker("exec", "acc-web", "cat", "/d/f", check=False).stdout == "secret\n",
               "the container writing its file")
    pid = dockerd.docker("inspect", "--format", "{{.State.Pid}}", "acc-web").stdout.strip()
    allowed_cgroup = Path(f"/proc/{pid}/cgroup").read_text().splitlines()[0].split(":", 2)[2]
    if allowed_cgroup.endswith(".scope"):
        pytest.skip("dockerd uses the systemd cgroup driver, whose --cgroup-parent must be a slice")

    nested = dockerd.run("--rm", "--name", "acc-nested", "--cgroup-parent", allowed_cgroup,
                         "-v", f"{guarded_plugin.mount_root}:/m", busybox_image, "sh", "-c",
                         f"cat /proc/self/cgroup; cat /m/{name}/f", check=False)

    assert allowed_cgroup in nested.stdout  # the new container runs inside the allowed one's cgroup
    assert "secret" not in nested.stdout
    assert "Permission denied" in nested.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_allow_set_applies_to_running_volume(dockerd, busybox_image, volume, guarded_plugin):
    name = volume("name:acc-web")
    dockerd.run("-d", "--name", "acc-web", "-v", f"{name}:/d", busybox_image, "sh", "-c",
                "echo secret > /d/f; sleep 300")
    path = guarded_plugin.mount_root / name / "f"
    wait_until(lambda: dockerd.docker("exec", "acc-web", "cat", "/d/f", check=False).stdout == "secret\n",
               "the container writing its file")
    assert not can_read(path)

    changed = allow_cli(guarded_plugin, "set", name, "name:acc-web,host")
    assert changed.returncode == 0, changed.stderr
    wait_until(lambda: can_read(path), "the host rule taking effect")

    shown = allow_cli(guarded_plugin, "show", name)
    assert shown.stdout.strip() == "name:acc-web,host"

    # Taking the container off the list reaches the running container too.
    assert allow_cli(guarded_plugin, "set", name, "host").returncode == 0
    wait_until(lambda: dockerd.docker("exec", "acc-web", "cat", "/d/f", check=False).returncode != 0,
               "the container losing access")

    # Without an allowlist the daemon's default policy (allow) lets every container in again.
    cleared = allow_cli(guarded_plugin, "clear", name)
    assert cleared.returncode == 0, cleared.stderr
    assert "every container may use it" in cleared.stdout
    wait_until(lambda: dockerd.docker("exec", "acc-web", "cat", "/d/f", check=False).stdout == "secret\n",
               "the container regaining access")
    assert allow_cli(guarded_plugin, "show", name).stdout.strip() == "(no allowlist: every container may use the volume)"


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_restored_container_mounts_allowlisted_volume(tmp_path):
    """A dockerd restart brings back containers with a restart policy, and only the allowed one reads the volume."""
    restarting = PrivateDockerd()
    plugin = None
    try:
        restarting.start()
        image = build_busybox_image(restarting, "securevol-restore-busybox")
        PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
        plugin = PluginServer(socket_path=plugin_socket_path(unique_driver_name()),
                              env={"SECUREVOL_DOCKER_HOST": restarting.host})
        plugin.start()
        name = f"acc-{secrets.token_hex(4)}"
        restarting.docker("volume", "create", "-d", plugin.driver, "-o", "allow=name:db,name:other,name:spare", name)

        restarting.run("-d", "--restart", "always", "--name", "db", "-v", f"{name}:/d", image, "sh", "-c",
                       "echo started >> /d/starts; sleep 300")
        reader = "while :; do cat /d/starts > /dev/null 2>&1 && echo READ; sleep 0.2; done"
        for reader_name in ("other", "spare"):
            restarting.run("-d", "--restart", "always", "--name", reader_name, "-v", f"{name}:/d", image,
                           "sh", "-c", reader)
            wait_until(lambda: "READ" in restarting.docker("logs", reader_name).stdout, f"{reader_name} reading")
        # Renamed, spare no longer matches its rule, which stays in the allowlist.
        restarting.docker("rename", "spare", "renamed")
        assert allow_cli(plugin, "set", name, "name:db,name:spare").returncode == 0
        wait_until(lambda: restarting.docker("exec", "other", "cat", "/d/starts", check=False).returncode != 0,
                   "the other container losing access")

        restarting.restart()

        try:
            wait_until(lambda: restarting.docker("exec", "db", "cat", "/d/starts", check=False).stdout
                       == "started\nstarted\n", "the restored container writing to its volume", timeout=60)
        except AssertionError as exc:
            seen = restarting.docker("exec", "db", "cat", "/d/starts", check=False)
            mount_lines = [line for line in plugin.log_text().splitlines() if "mount" in line]
            raise AssertionError(f"{exc}\nseen: {seen}\nplugin log:\n" + "\n".join(mount_lines[-30:])) from None
        assert restarting.docker("inspect", "--format", "{{.State.Running}}", "other").stdout.strip() == "true"
        reads_before = restarting.docker("logs", "other").stdout.count("READ")
        time.sleep(2)
        assert restarting.docker("logs", "other").stdout.count("READ") == reads_before
        assert restarting.docker("exec", "other", "cat", "/d/starts", check=False).returncode != 0

        # The renamed container's approval was carried over unverified, and dockerd now responds.
        wait_until(lambda: restarting.docker("exec", "renamed", "cat", "/d/starts", check=False).returncode != 0,
                   "the renamed container losing access once dockerd responds")
        reads_before = restarting.docker("logs", "renamed").stdout.count("READ")
        time.sleep(2)
        assert restarting.docker("logs", "renamed").stdout.count("READ") == reads_before
        renamed_id = restarting.docker("inspect", "--format", "{{.Id}}", "renamed").stdout.strip()
        revoked = json.loads((plugin.state_dir / "volumes" / name / "revoked.json").read_text())
        assert renamed_id in revoked
    finally:
        try:
            restarting.remove_all_containers()
            if plugin is not None:
                listing = restarting.docker("volume", "ls", "-q", "--filter", f"driver={plugin.driver}", check=False)
                for volume_name in listing.stdout.split():
                    restarting.docker("volume", "rm", "--force", volume_name, check=False)
        finally:
            if plugin is not None:
                plugin.cleanup()
            restarting.stop()


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_revoked_handle_cannot_fallocate(dockerd, busybox_image, volume, guarded_plugin):
    name = volume("name:acc-web,host")
    dockerd.run("-d", "--name", "acc-web", "-v", f"{name}:/d", busybox_image, "sh", "-c",
                "echo secret > /d/f; sleep 300")
    path = guarded_plugin.mount_root / name / "f"
    wait_until(lambda: written_and_readable(path), "the container writing its file")
    fd = os.open(path, os.O_RDWR)
    try:
        # The host loses access while it keeps a handle open.
        assert allow_cli(guarded_plugin, "set", name, "name:acc-web").returncode == 0
        wait_until(lambda: not can_read(path), "the host losing access")

        with pytest.raises(PermissionError):
            os.posix_fallocate(fd, 0, 1 << 20)
    finally:
        # Before sending FALLOCATE the kernel updated the file's times, and
        # close(2) writes them back with a setattr that the revoked host may not make.
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.EIO

    assert dockerd.docker("exec", "acc-web", "cat", "/d/f").stdout == "secret\n"
    assert dockerd.docker("exec", "acc-web", "stat", "-c", "%s", "/d/f").stdout.strip() == "7"


def test_allow_set_command_names_other_state_dir():
    assert config.resolve({}, environ={}).allow_set_command == "securevol allow set"
    other = config.resolve({"state_dir": "/srv/secure vol"}, environ={})
    assert other.allow_set_command == "securevol allow --state-dir '/srv/secure vol' set"


def test_allow_cli_errors(tmp_path):
    state = tmp_path / "state"
    state.mkdir()

    missing = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", "show", "nope", "--state-dir",
                              str(state)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr
    assert str(state) in missing.stderr
    assert "--state-dir" in missing.stderr

    no_state_dir = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", "set", "nope", "host",
                                   "--state-dir", str(tmp_path / "absent")], capture_output=True, text=True,
                                  timeout=60)
    assert no_state_dir.returncode == 1
    assert no_state_dir.stderr.strip() == (
        f"securevol: Volume 'nope' does not exist in {tmp_path / 'absent'}; give the --state-dir that the "
        "daemon uses, or for the managed plugin run this command inside the plugin (docs/install.md, "
        "\"Admin commands\")."
    )
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("action", ["show", "set", "clear"])
def test_allow_cli_help_lists_its_settings(action):
    result = subprocess.run([sys.executable, "-m", "securevol.cli", "allow", action, "--help"],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0
    assert "name of the volume" in result.stdout
    for flag in ("--state-dir", "--default-policy", "--log-level"):
        assert flag in result.stdout
    for daemon_flag in ("--socket", "--workers", "--master-key", "--docker-host"):
        assert daemon_flag not in result.stdout
    if action == "set":
        assert "comma-separated rules" in result.stdout


@pytest.mark.docker
@pytest.mark.slow
def test_allow_cli_rejects_bad_rules(volume, guarded_plugin):
    name = volume("name:acc-web")

    result = allow_cli(guarded_plugin, "set", name, "name:acc-web,,host")

    assert result.returncode == 1
    assert "character 14" in result.stderr
    assert allow_cli(guarded_plugin, "show", name).stdout.strip() == "name:acc-web"


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_image_files_copied_into_new_volume(dockerd, busybox_image, volume, guarded_plugin):
    # dockerd copies the image's /bin into the empty volume before the
    # container exists (no candidate at mount time), then the container runs
    # its shell from the encrypted volume.
    name = volume("name:acc-copy")

    result = dockerd.run("--rm", "--name", "acc-copy", "-v", f"{name}:/bin", busybox_image,
                         "ls", "/bin/busybox")

    assert result.stdout.strip() == "/bin/busybox"
    backing = guarded_plugin.volume_dir(name) / "data"
    sample = distinctive_slice(Path("/bin/busybox").read_bytes())
    files = [path for path in backing.rglob("*") if path.is_file()]
    assert files
    assert all(sample not in path.read_bytes() for path in files)


def distinctive_slice(data: bytes, size: int = 64) -> bytes:
    """Return a slice of *data* varied enough that finding it elsewhere is no accident."""
    for start in range(4096, len(data) - size, size):
        window = data[start:start + size]
        if len(set(window)) >= size // 2:
            return window
    raise AssertionError("no distinctive slice found")
