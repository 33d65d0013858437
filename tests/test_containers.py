"""Container identity from /proc (securevol.containers) and the Engine API client (securevol.engine).

Layouts this host does not have (cgroup v2, systemd scopes, Kubernetes,
Podman) are tested on recorded /proc/PID/cgroup contents, named
``recorded_*``. Real processes, a real container and a real dockerd cover
the rest.
"""

import os
import socket
import subprocess
import sys
import threading

import pytest

from securevol.containers import (
    HOST_PROCESS,
    ProcessIdentity,
    UnknownProcess,
    identify_cgroup,
    identify_process,
    is_docker_daemon,
    process_start_time,
)
from securevol.engine import EngineClient, EngineError, socket_path_from_host

ID_A = "e87c5a6425c070b4b2097e92684c3eb48a08621ee4239f1ca256fdb174b7b5eb"
ID_B = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

V1_CONTROLLERS = ["name=systemd", "pids", "blkio", "freezer", "devices", "memory", "cpuset", "cpuacct", "cpu"]


def v1_lines(path: str, unified: str | None = None) -> str:
    lines = [f"{len(V1_CONTROLLERS) - i}:{controller}:{path}" for i, controller in enumerate(V1_CONTROLLERS)]
    if unified is not None:
        lines.append(f"0::{unified}")
    return "\n".join(lines) + "\n"


# -- recorded cgroup files ---------------------------------------------------------------------

RECORDED = {
    "recorded_v1_cgroupfs": (v1_lines(f"/docker/{ID_A}"), ProcessIdentity("docker", ID_A)),
    "recorded_v1_hybrid_unified_root": (v1_lines(f"/docker/{ID_A}", "/"), ProcessIdentity("docker", ID_A)),
    "recorded_v1_systemd_driver": (
        v1_lines(f"/system.slice/docker-{ID_A}.scope"), ProcessIdentity("docker", ID_A)),
    "recorded_v2_systemd_driver": (
        f"0::/system.slice/docker-{ID_A}.scope\n", ProcessIdentity("docker", ID_A)),
    "recorded_v2_cgroupfs_driver": (f"0::/docker/{ID_A}\n", ProcessIdentity("docker", ID_A)),
    "recorded_v2_rootless": (
        f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID_A}.scope\n",
        ProcessIdentity("docker", ID_A)),
    "recorded_v2_systemd_in_container": (
        f"0::/system.slice/docker-{ID_A}.scope/init.scope\n", ProcessIdentity("docker", ID_A)),
    "recorded_v2_cri_containerd": (
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c.slice/"
        f"cri-containerd-{ID_A}.scope\n",
        ProcessIdentity("containerd", ID_A)),
    "recorded_v1_kubepods_cgroupfs": (
        v1_lines(f"/kubepods/burstable/pod1b2c3d4e-0000-4000-8000-000000000000/{ID_A}"),
        ProcessIdentity("unknown", ID_A)),
    "recorded_v2_crio": (f"0::/kubepods.slice/crio-{ID_A}.scope\n", ProcessIdentity("cri-o", ID_A)),
    "recorded_v2_podman": (
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID_A}.scope/container\n",
        ProcessIdentity("podman", ID_A)),
    "recorded_v2_custom_cgroup_parent": (f"0::/batch/{ID_A}\n", ProcessIdentity("unknown", ID_A)),
    "recorded_v2_seen_from_plugin_cgroupns": (
        f"0::/../docker-{ID_A}.scope\n", ProcessIdentity("docker", ID_A)),
    "recorded_v2_buildkit_step": (
        "0::/docker/buildkit/q8ne0nn7p7vjb2qt4xkfzmzvb\n", ProcessIdentity("buildkit")),
    "recorded_v2_host_session": ("0::/user.slice/user-0.slice/session-3.scope\n", HOST_PROCESS),
    "recorded_v2_dockerd_itself": ("0::/system.slice/docker.service\n", HOST_PROCESS),
    "recorded_v2_conmon_is_host": (f"0::/machine.slice/libpod-conmon-{ID_A}.scope\n", HOST_PROCESS),
    "recorded_v2_init": ("0::/init.scope\n", HOST_PROCESS),
    "recorded_v1_host_root": (v1_lines("/", "/"), HOST_PROCESS),
    "recorded_v1_sandbox_32_hex_is_host": (
        "4:memory:/process_api/30ac8ffa52a2f523a4fce678fb45e24d\n0::/\n", HOST_PROCESS),
    "recorded_empty": ("", HOST_PROCESS),
    "recorded_malformed_lines_ignored": (
        f"garbage\n0::/docker-{ID_A}.scope\n", ProcessIdentity("docker", ID_A)),
    "recorded_uppercase_id_is_not_an_id": (f"0::/docker/{ID_A.upper()}\n", HOST_PROCESS),
    "recorded_short_id_is_not_an_id": (f"0::/docker/{ID_A[:63]}\n", HOST_PROCESS),
}


@pytest.mark.parametrize(("text", "identity"), RECORDED.values(), ids=RECORDED.keys())
def test_identify_cgroup(text, identity):
    assert identify_cgroup(text) == identity


# Paths that name two containers: the outer one may be an allowed container
# whose ID an attacker gave as --cgroup-parent, and the inner one may be a
# cgroup that a process in the outer container named after another container.
TWO_CONTAINERS = {
    "recorded_v2_nested_scope_spoof": f"0::/system.slice/docker-{ID_A}.scope/system.slice/docker-{ID_B}.scope\n",
    "recorded_v1_docker_in_docker": v1_lines(f"/docker/{ID_A}/docker/{ID_B}"),
    "recorded_v1_cgroup_parent_of_another": v1_lines(f"/docker/{ID_A}/{ID_B}"),
    "recorded_v2_cgroup_parent_of_another": f"0::/docker/{ID_A}/{ID_B}\n",
    "recorded_v2_scope_under_bare_id": f"0::/docker/{ID_A}/docker-{ID_B}.scope\n",
}


@pytest.mark.parametrize("text", TWO_CONTAINERS.values(), ids=TWO_CONTAINERS.keys())
def test_path_naming_two_containers_is_unknown(text):
    with pytest.raises(UnknownProcess):
        identify_cgroup(text)


def test_path_naming_one_container_twice():
    assert identify_cgroup(f"0::/docker/{ID_A}/docker-{ID_A}.scope\n").container_id == ID_A


def test_recorded_lines_naming_two_containers():
    text = f"4:memory:/docker/{ID_A}\n0::/system.slice/docker-{ID_B}.scope\n"

    with pytest.raises(UnknownProcess):
        identify_cgroup(text)


def test_recorded_identity_is_host_property():
    assert HOST_PROCESS.is_host
    assert not ProcessIdentity("docker", ID_A).is_host
    assert not ProcessIdentity("buildkit").is_host


# -- real processes -----------------------------------------------------------------------------


def test_own_process_matches_own_cgroup_file():
    with open("/proc/self/cgroup") as cgroup_file:
        expected = identify_cgroup(cgroup_file.read())

    assert identify_process(os.getpid()) == expected


def test_own_process_is_host():
    # The tests start their own dockerd, whose containers must be distinguished
    # from the test runner, so the runner must not run in a container cgroup.
    assert identify_process(os.getpid()).is_host


def test_child_and_thread_share_identity():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert identify_process(child.pid) == identify_process(os.getpid())
    finally:
        child.kill()
        child.wait()

    # FUSE reports the calling thread's ID, which /proc also has an entry for.
    thread_ids = []
    worker = threading.Thread(target=lambda: thread_ids.append(threading.get_native_id()))
    worker.start()
    worker.join()
    main_thread_id = threading.get_native_id()
    assert identify_process(main_thread_id) == identify_process(os.getpid())


def test_exited_process_is_unknown():
    child = subprocess.Popen(["true"])
    child.wait()

    with pytest.raises(UnknownProcess):
        identify_process(child.pid)
    with pytest.raises(UnknownProcess):
        process_start_time(child.pid)


def test_process_start_time_tells_processes_apart():
    own = process_start_time(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_start_time(child.pid) >= own
        assert process_start_time(child.pid) == process_start_time(child.pid)
    finally:
        child.kill()
        child.wait()


def test_process_start_time_with_odd_command_name(tmp_path):
    # The command name in /proc/PID/stat may hold spaces and parentheses.
    script = tmp_path / "a) b ("
    script.symlink_to(sys.executable)
    child = subprocess.Popen([str(script), "-c", "import time; time.sleep(30)"])
    try:
        assert process_start_time(child.pid) >= process_start_time(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_test_runner_is_not_dockerd():
    assert not is_docker_daemon(os.getpid())
    assert not is_docker_daemon(2**22 + 1)  # above the kernel's PID limit, so no such process


# -- Engine API client without dockerd --------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "path"),
    [("unix:///var/run/docker.sock", "/var/run/docker.sock"), ("/tmp/d.sock", "/tmp/d.sock")],
)
def test_socket_path_from_host(host, path):
    assert socket_path_from_host(host) == path


@pytest.mark.parametrize("host", ["tcp://127.0.0.1:2375", "unix://relative.sock", "relative.sock"])
def test_socket_path_from_host_rejects(host):
    with pytest.raises(ValueError):
        socket_path_from_host(host)


def test_engine_missing_socket(tmp_path):
    engine = EngineClient(str(tmp_path / "none.sock"), timeout=1)

    with pytest.raises(EngineError, match="not reachable"):
        engine.list_containers()


def test_engine_socket_without_listener(tmp_path):
    path = tmp_path / "dead.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays, with no listener

    with pytest.raises(EngineError, match="not reachable"):
        EngineClient(str(path), timeout=1).inspect_container("web")


def test_engine_silent_peer_times_out(tmp_path):
    # A real socket whose peer accepts the connection and never responds, as a hung dockerd does.
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    try:
        with pytest.raises(EngineError, match="timed out"):
            EngineClient(str(path), timeout=0.5).inspect_container("web")
    finally:
        server.close()


# -- with a real dockerd ---------------------------------------------------------------------------------


@pytest.fixture
def engine(dockerd) -> EngineClient:
    return EngineClient(str(dockerd.socket))


@pytest.mark.docker
@pytest.mark.slow
def test_real_container_process_identified(dockerd, busybox_image, engine):
    container_id = dockerd.run("-d", "--name", "identity-probe", busybox_image, "sleep", "300").stdout.strip()
    try:
        pid = engine.inspect_container("identity-probe")["State"]["Pid"]

        identity = identify_process(pid)

        assert identity == ProcessIdentity("docker", container_id)
        assert not is_docker_daemon(pid)
    finally:
        dockerd.docker("rm", "-f", "identity-probe")


@pytest.mark.docker
@pytest.mark.slow
def test_dockerd_runs_where_the_tests_run(dockerd):
    assert is_docker_daemon(dockerd.pid)
    assert identify_process(dockerd.pid) == identify_process(os.getpid())


@pytest.mark.docker
@pytest.mark.slow
def test_engine_inspect_and_info(dockerd, busybox_image, engine):
    container_id = dockerd.docker("create", "--name", "inspect-probe", "--label", "role=db", busybox_image,
                                  "true").stdout.strip()
    try:
        assert engine.inspect_container("inspect-probe")["Id"] == container_id
        assert engine.inspect_container(container_id[:12])["Id"] == container_id
        assert engine.inspect_container("no-such-container") is None

        info = engine.container_info("inspect-probe", with_image_refs=True)

        assert info.id == container_id
        assert info.name == "inspect-probe"
        assert info.image == busybox_image
        assert info.image_id.startswith("sha256:")
        assert info.labels == {"role": "db"}
        assert info.image_refs == {f"docker.io/library/{busybox_image}:latest"}
    finally:
        dockerd.docker("rm", "-f", "inspect-probe")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("reference", ["../../info", "a/../../info", "..%2F..%2Finfo"])
def test_engine_reference_stays_one_path_segment(dockerd, engine, reference):
    # Unquoted, these references would be GET /info; for a quoted one dockerd
    # returns 404 or a redirect, never the daemon's info.
    try:
        document = engine.inspect_container(reference)
    except EngineError:
        document = None

    assert document is None


@pytest.mark.docker
@pytest.mark.slow
def test_engine_mount_candidates(dockerd, busybox_image, engine):
    volume = "candidates-probe"
    try:
        dockerd.docker("create", "--name", "cand-a", "-v", f"{volume}:/d", busybox_image, "true")
        dockerd.docker("create", "--name", "cand-other", "-v", "/tmp:/candidates-probe", busybox_image,
                       "true")

        users = engine.volume_users(volume)
        assert [user.container.name for user in users] == ["cand-a"]
        assert users[0].state == "created"
        assert engine.mounting_container(volume).container.name == "cand-a"

        dockerd.docker("create", "--name", "cand-b", "-v", f"{volume}:/d", busybox_image, "true")
        assert {user.container.name for user in engine.mount_candidates(volume)} == {"cand-a", "cand-b"}
        assert engine.mounting_container(volume) is None  # two containers could be starting

        dockerd.docker("rm", "cand-b")
        dockerd.docker("start", "-a", "cand-a")
        users = engine.mount_candidates(volume)
        assert [(user.container.name, user.state) for user in users] == [("cand-a", "exited")]
        assert engine.mounting_container(volume).container.name == "cand-a"
    finally:
        dockerd.docker("rm", "-f", "cand-a", "cand-b", "cand-other", check=False)
        dockerd.docker("volume", "rm", volume, check=False)

    assert engine.mounting_container(volume) is None
