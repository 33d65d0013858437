"""Tests of the plugin daemon through its real gunicorn socket: every endpoint, bad requests, mounts.

Each test talks to ``securevol serve`` started by tests/plugin_server.py with
two workers on private directories. Mount tests start real FUSE processes
and check the ciphertext on disk.
"""

import base64
import contextlib
import http.client
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import securevol
from securevol import cli, config
from securevol.crypto import DataKey
from securevol.keys.local import LocalKeyProvider, load_master_key
from securevol.options import allowlist_supported
from tests.plugin_server import PluginResponse, PluginServer, UnixHTTPConnection, mounts_under, plugin_request
from tests.test_access import wait_until

MEDIA_TYPE = "application/vnd.docker.plugins.v1.1+json"

needs_fuse = pytest.mark.skipif(
    importlib.util.find_spec("securevol.mount") is None or not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="mounting needs securevol.mount, /dev/fuse and root",
)

PLAINTEXT = b"protocol test plaintext marker 0123456789abcdef " * 300
SECRET_FILE_NAME = "plaintext-name-marker.txt"


@pytest.fixture(scope="module")
def server():
    with PluginServer(workers=2) as plugin:
        yield plugin


@pytest.fixture
def fresh_server():
    with PluginServer(workers=2) as plugin:
        yield plugin


def new_name() -> str:
    return f"vol-{secrets.token_hex(4)}"


def create(server, name=None, **opts) -> str:
    name = name or new_name()
    response = server.call("Create", {"Name": name, "Opts": opts})
    assert (response.status, response.err) == (200, ""), response.body
    return name


def mount(server, name, mount_id) -> str:
    response = server.call("Mount", {"Name": name, "ID": mount_id})
    assert (response.status, response.err) == (200, ""), response.body
    return response.json["Mountpoint"]


def unmount(server, name, mount_id) -> None:
    response = server.call("Unmount", {"Name": name, "ID": mount_id})
    assert (response.status, response.err) == (200, ""), response.body


def get(server, name) -> dict:
    response = server.call("Get", {"Name": name})
    assert (response.status, response.err) == (200, ""), response.body
    return response.json["Volume"]


def assert_one_sentence_error(response, *fragments: str) -> None:
    """Check that *response* is a JSON plugin error of one line that contains every fragment."""
    assert response.content_type == MEDIA_TYPE
    assert response.status >= 400
    err = response.json["Err"]
    assert set(response.json) == {"Err"}
    assert err and "\n" not in err
    assert "Traceback" not in err
    assert "<html" not in response.body.decode(errors="replace").lower()
    for fragment in fragments:
        assert fragment in err, err


def fuse_pid(server, name) -> int:
    return json.loads((server.volume_dir(name) / "mounts.json").read_text())["pid"]


def pid_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def wait_for_exit(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout} s"
        time.sleep(0.05)


def key_material(server, name) -> list[bytes]:
    master_key = load_master_key(server.state_dir / "master.key")
    volume_dir = server.volume_dir(name)
    record = json.loads((volume_dir / "dek.json").read_text())
    volume_id = bytes.fromhex(json.loads((volume_dir / "volume.json").read_text())["volume_id"])
    return [master_key, LocalKeyProvider(master_key).unwrap(record, volume_id).raw()]


def encodings(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()]


def backing_bytes(server, name) -> bytes:
    chunks = []
    for root, dirs, files in os.walk(server.volume_dir(name) / "data"):
        chunks += [entry.encode() for entry in dirs + files]
        chunks += [Path(root, entry).read_bytes() for entry in files]
    return b"\n".join(chunks)


# -- endpoints without a mount -------------------------------------------------


def test_activate_announces_volume_driver(server):
    response = server.request("/Plugin.Activate")

    assert response.status == 200
    assert response.content_type == MEDIA_TYPE
    # "authz" is used only by a dockerd started with --authorization-plugin.
    assert response.json == {"Implements": ["VolumeDriver", "authz"]}


def test_capabilities_scope_local(server):
    response = server.call("Capabilities")

    assert response.content_type == MEDIA_TYPE
    assert response.json == {"Capabilities": {"Scope": "local"}}


def test_list_with_empty_and_null_body(server):
    name = create(server)

    for body in (None, b"", b"null", b"{}"):
        response = server.request("/VolumeDriver.List", body)
        assert (response.status, response.err) == (200, ""), body
        assert name in [volume["Name"] for volume in response.json["Volumes"]]


def test_create_get_list_path_remove(server):
    name = create(server, mode="750", uid="1000", gid="1000")

    volume = get(server, name)
    assert set(volume) == {"Name", "CreatedAt", "Status"}
    assert volume["Name"] == name
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", volume["CreatedAt"])
    assert volume["Status"]["mounted"] is False
    assert volume["Status"]["key_provider"] == "local"
    listed = {v["Name"]: v for v in server.call("List").json["Volumes"]}
    assert listed[name] == volume
    assert server.call("Path", {"Name": name}).json == {"Mountpoint": "", "Err": ""}

    assert server.call("Remove", {"Name": name}).json == {"Err": ""}

    assert name not in [v["Name"] for v in server.call("List").json["Volumes"]]
    assert not server.volume_dir(name).exists()
    assert_one_sentence_error(server.call("Get", {"Name": name}), "does not exist")


def test_responses_carry_no_key_material(server):
    name = create(server)
    texts = [
        server.call("Get", {"Name": name}).body.decode(),
        server.call("List").body.decode(),
        server.call("Path", {"Name": name}).body.decode(),
        server.log_text(),
    ]

    for secret in key_material(server, name):
        for encoded in encodings(secret):
            for text in texts:
                assert encoded not in text


def test_create_again_with_same_options_succeeds(server):
    name = create(server, mode="0750")
    created_at = get(server, name)["CreatedAt"]
    dek_before = (server.volume_dir(name) / "dek.json").read_bytes()

    create(server, name, mode="750")

    assert get(server, name)["CreatedAt"] == created_at
    assert (server.volume_dir(name) / "dek.json").read_bytes() == dek_before


def test_create_again_with_other_options_fails(server):
    name = create(server, mode="0750")

    response = server.call("Create", {"Name": name, "Opts": {"mode": "0700"}})

    assert_one_sentence_error(response, name, "exists already with other options")


def test_concurrent_creates_of_one_name_make_one_volume(server):
    name = new_name()
    responses = []

    def create_once():
        responses.append(server.call("Create", {"Name": name, "Opts": {"uid": "7"}}))

    threads = [threading.Thread(target=create_once) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [(r.status, r.err) for r in responses] == [(200, "")] * 8
    assert [v["Name"] for v in server.call("List").json["Volumes"]].count(name) == 1
    assert len(json.loads((server.volume_dir(name) / "dek.json").read_text())) > 0


def test_concurrent_creates_of_many_names(server):
    names = [new_name() for _ in range(12)]
    responses = []
    threads = [
        threading.Thread(target=lambda n=n: responses.append(server.call("Create", {"Name": n}))) for n in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(r.err == "" for r in responses)
    listed = {v["Name"] for v in server.call("List").json["Volumes"]}
    assert set(names) <= listed


# -- malformed requests ----------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["Create", "Remove", "Mount", "Unmount", "Path", "Get"])
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"Name": "x"', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'"Name"', "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"{}", "no 'Name' field"),
        (b"null", "no 'Name' field"),
        (b"", "no 'Name' field"),
        (b'{"Name": 42}', "'Name' field must be a string"),
        (b'{"Name": ["a"]}', "'Name' field must be a string"),
        (b'{"Name": {"a": 1}}', "'Name' field must be a string"),
    ],
)
def test_malformed_body_rejected(server, endpoint, body, fragment):
    response = server.request(f"/VolumeDriver.{endpoint}", body)

    assert_one_sentence_error(response, fragment)
    assert response.status == 400


@pytest.mark.parametrize("endpoint", ["List", "Capabilities"])
@pytest.mark.parametrize("body", [b"{oops", b"[1, 2]", b"7"])
def test_malformed_body_rejected_without_fields(server, endpoint, body):
    assert_one_sentence_error(server.request(f"/VolumeDriver.{endpoint}", body))


@pytest.mark.parametrize("endpoint", ["Mount", "Unmount"])
@pytest.mark.parametrize(
    ("payload", "fragment"),
    [({}, "no 'ID' field"), ({"ID": 5}, "'ID' field must be a string"), ({"ID": None}, "no 'ID' field")],
)
def test_mount_id_required(server, endpoint, payload, fragment):
    name = create(server)

    response = server.call(endpoint, {"Name": name, **payload})

    assert_one_sentence_error(response, fragment)


@pytest.mark.parametrize(
    ("opts", "fragment"),
    [
        ("mode=0750", "'Opts' field must be a JSON object"),
        (["mode", "0750"], "'Opts' field must be a JSON object"),
        ({"mode": 750}, "'mode' must have a string value"),
        ({"uid": None}, "'uid' must have a string value"),
    ],
)
def test_create_with_wrongly_typed_opts_rejected(server, opts, fragment):
    name = new_name()

    response = server.call("Create", {"Name": name, "Opts": opts})

    assert_one_sentence_error(response, fragment)
    assert not server.volume_dir(name).exists()


def test_create_with_null_opts_accepted(server):
    name = new_name()

    assert server.call("Create", {"Name": name, "Opts": None}).err == ""
    assert get(server, name)["Name"] == name


def test_unknown_endpoint_and_method(server):
    assert_one_sentence_error(server.request("/VolumeDriver.Explode", b"{}"), "Unknown endpoint")
    assert server.request("/VolumeDriver.Explode", b"{}").status == 404
    assert_one_sentence_error(server.request("/VolumeDriver.List", method="GET"), "use POST")
    assert_one_sentence_error(server.request("/", method="GET"), "Unknown endpoint")


def test_oversized_body_rejected(server):
    # Announce a body over the limit: the daemon must reject it before reading it.
    headers = {"Content-Length": str(2 * 1024 * 1024)}

    response = plugin_request(server.socket, "/VolumeDriver.Create", b'{"Name": "x"}', headers=headers)

    assert_one_sentence_error(response, "larger than")
    assert response.status == 413


def test_oversized_chunked_body_rejected(server):
    # Without Content-Length the limit can only be found while reading.
    connection = UnixHTTPConnection(server.socket)
    try:
        body = (b" " * 65536 for _ in range(160))  # 10 MiB of JSON whitespace
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # The daemon replies and closes the connection before the rest of the body is sent.
            connection.request("POST", "/VolumeDriver.Create", body=body, encode_chunked=True)
        response = connection.getresponse()
        answer = PluginResponse(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        connection.close()

    assert_one_sentence_error(answer, "larger than")
    assert answer.status == 413


@pytest.mark.parametrize("endpoint", ["/VolumeDriver.Create", "/AuthZPlugin.AuthZReq"])
def test_deeply_nested_json_rejected(server, endpoint):
    response = server.request(endpoint, b"[" * 5000 + b"]" * 5000)

    assert response.status == 400
    answer = response.json
    assert answer.get("Allow", False) is False
    assert answer["Err"] == "The request body is not valid JSON."
    assert "request crashed" not in server.log_text()


def test_options_method_answered_like_other_methods(server):
    response = server.request("/VolumeDriver.List", method="OPTIONS")

    assert_one_sentence_error(response, "use POST")
    assert response.status == 405


@pytest.mark.parametrize("endpoint", ["Mount", "Unmount"])
def test_empty_mount_id_rejected(server, endpoint):
    name = create(server)

    response = server.call(endpoint, {"Name": name, "ID": ""})

    assert_one_sentence_error(response, "'ID' field is empty")
    assert get(server, name)["Status"]["mount_count"] == 0


def test_content_type_header_ignored(server):
    names = []

    for content_type in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
        names.append(new_name())
        body = json.dumps({"Name": names[-1]}).encode()
        response = plugin_request(server.socket, "/VolumeDriver.Create", body, headers={"Content-Type": content_type})
        assert response.err == "", content_type

    assert [get(server, name)["Name"] for name in names] == names


# -- names and options -------------------------------------------------------------

HOSTILE_NAMES = ["", ".", "..", "../x", "a/b", "/abs", "a\0b", "x" * 300, "-lead", "_lead", "a\nb", "a b", "ümlaut",
                 "a\tb", "..."]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("endpoint", ["Create", "Get", "Path", "Remove", "Mount", "Unmount"])
def test_hostile_name_rejected(server, endpoint, name):
    before = sorted(os.listdir(server.state_dir / "volumes"))

    response = server.call(endpoint, {"Name": name, "ID": "abc"})

    assert_one_sentence_error(response, "name")
    assert sorted(os.listdir(server.state_dir / "volumes")) == before
    assert not (server.state_dir / "x").exists()


def test_name_length_limit(server):
    assert create(server, "n" * 128) == "n" * 128
    assert_one_sentence_error(server.call("Create", {"Name": "n" * 129}), "129 characters", "maximum is 128")


@pytest.mark.parametrize("endpoint", ["Get", "Path", "Remove", "Mount", "Unmount"])
def test_unknown_volume(server, endpoint):
    response = server.call(endpoint, {"Name": "never-created", "ID": "abc"})

    assert_one_sentence_error(response, "'never-created' does not exist")
    # dockerd calls Get before every create, so a missing volume is routine, not a failed request.
    failures = [line for line in server.log_text().splitlines() if "request failed" in line]
    assert not [line for line in failures if "never-created" in line]


@pytest.mark.parametrize("option", ["colour", "size", "Mode", "allowed", "encrypted"])
def test_unknown_option_rejected(server, option):
    name = new_name()

    response = server.call("Create", {"Name": name, "Opts": {option: "x"}})

    assert_one_sentence_error(response, f"Unknown volume option {option!r}", "mode")
    assert not server.volume_dir(name).exists()


@pytest.mark.parametrize(
    "option", ["key", "passphrase", "password", "encryption_key", "secret", "dek", "KEK", "api-token", "master-key"]
)
def test_key_like_option_rejected(server, option):
    name = new_name()

    response = server.call("Create", {"Name": name, "Opts": {option: "hunter2"}})

    assert_one_sentence_error(response, repr(option), "key provider")
    assert "hunter2" not in response.body.decode()
    assert "hunter2" not in server.log_text()
    assert not server.volume_dir(name).exists()


@pytest.mark.parametrize(
    ("opts", "fragment"),
    [
        ({"uid": "-1"}, "decimal ID"),
        ({"uid": "abc"}, "decimal ID"),
        ({"gid": "4294967295"}, "decimal ID"),
        ({"gid": "１２"}, "decimal ID"),
        ({"mode": "999"}, "octal permission bits"),
        ({"mode": "rwx"}, "octal permission bits"),
        ({"mode": "07777"}, "octal permission bits"),
        ({"mode": "4755"}, "setuid"),
        ({"uid": "1" * 5000}, "decimal ID"),
        ({"uid": "1" * 11}, "decimal ID"),
    ],
)
def test_bad_option_value_rejected(server, opts, fragment):
    response = server.call("Create", {"Name": new_name(), "Opts": opts})

    assert_one_sentence_error(response, next(iter(opts)), fragment)
    assert len(response.err) < 200  # a huge value is shortened, not repeated


@pytest.mark.skipif(not allowlist_supported(), reason="the allow option needs securevol.policy")
def test_allow_option_validated(server):
    name = create(server, allow="name:web,image:postgres:16")

    response = server.call("Create", {"Name": new_name(), "Opts": {"allow": "name:web,bogus:x"}})

    assert get(server, name)["Name"] == name
    assert_one_sentence_error(response, "allowlist", "character 10")


def test_options_set_root_directory(server):
    name = create(server, uid="1234", gid="2345", mode="2750")

    st = (server.volume_dir(name) / "data").stat()

    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o2750)


# -- files, modes and the gunicorn set-up ------------------------------------------


def test_socket_and_state_modes(server):
    name = create(server)

    socket_stat = server.socket.stat()
    assert stat.S_ISSOCK(socket_stat.st_mode)
    assert stat.S_IMODE(socket_stat.st_mode) == 0o660
    assert (socket_stat.st_uid, socket_stat.st_gid) == (0, 0)
    for directory in (server.state_dir, server.state_dir / "volumes", server.mount_root, server.state_dir / "log",
                      server.volume_dir(name)):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for path in (server.state_dir / "master.key", server.volume_dir(name) / "volume.json",
                 server.volume_dir(name) / "dek.json", server.volume_dir(name) / "mounts.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_loose_state_dir_tightened(fresh_server):
    fresh_server.stop()
    os.chmod(fresh_server.state_dir, 0o755)

    fresh_server.start()

    assert stat.S_IMODE(fresh_server.state_dir.stat().st_mode) == 0o700
    assert "directory mode tightened" in fresh_server.log_text()


def test_bad_master_key_stops_start(fresh_server):
    fresh_server.stop()
    os.chmod(fresh_server.state_dir / "master.key", 0o644)

    with pytest.raises(RuntimeError, match="exited with status 1"):
        fresh_server.start()

    assert "mode 0644" in fresh_server.log_text()


def _unix_socket_paths(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    paths = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[6] in inodes and len(fields) > 7:
                paths.add(fields[7])
    return paths


def test_no_control_socket_and_workers(server):
    master = server.process.pid

    assert _unix_socket_paths(master) == {str(server.socket)}
    assert len(server.wait_for_workers(2)) == 2


def test_serve_help_names_settings():
    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "serve", "--help"], capture_output=True, text=True, check=True
    )

    for flag, env in [("--socket", "SECUREVOL_SOCKET"), ("--state-dir", "SECUREVOL_STATE_DIR"),
                      ("--mount-root", "SECUREVOL_MOUNT_ROOT"), ("--log-level", "SECUREVOL_LOG_LEVEL"),
                      ("--workers", "SECUREVOL_WORKERS"), ("--master-key", "SECUREVOL_MASTER_KEY"),
                      ("--key-provider", "SECUREVOL_KEY_PROVIDER"), ("--mount-timeout", "SECUREVOL_MOUNT_TIMEOUT")]:
        assert flag in result.stdout
        assert env in result.stdout


def test_version_flag_prints_package_version():
    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "--version"], capture_output=True, text=True, check=True
    )

    assert result.stdout == f"securevol {securevol.__version__}\n"


def test_unknown_flag_shows_command_usage():
    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "serve", "--bogus"], capture_output=True, text=True
    )

    assert result.returncode == 2
    assert result.stderr.startswith("usage: securevol serve ")
    assert "securevol serve: error: unrecognized arguments: --bogus" in result.stderr


def test_settings_from_environment():
    plugin = PluginServer(workers=None)
    mount_root = plugin.base_dir / "mounts"
    plugin.env = {"SECUREVOL_WORKERS": "3", "SECUREVOL_MOUNT_ROOT": str(mount_root)}
    try:
        plugin.start()

        assert len(plugin.wait_for_workers(3)) == 3
        assert stat.S_IMODE(mount_root.stat().st_mode) == 0o700
    finally:
        plugin.cleanup()


def test_flag_wins_over_environment():
    environ = {"SECUREVOL_WORKERS": "3", "SECUREVOL_STATE_DIR": "/srv/env-state", "SECUREVOL_LOG_LEVEL": "debug"}

    settings = config.resolve({"workers": "5", "log_level": None}, environ)

    assert settings.workers == 5
    assert settings.log_level == "DEBUG"
    assert settings.state_dir == Path("/srv/env-state")
    assert settings.mount_root == Path("/srv/env-state/mnt")
    assert settings.socket == Path(config.DEFAULT_SOCKET)
    assert settings.master_key is None


def test_socket_path_too_long_rejected():
    with pytest.raises(config.ConfigError, match="Unix sockets allow at most 107"):
        config.resolve({"socket": "/tmp/" + "s" * 120}, {})


def test_invalid_setting_reported():
    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "serve", "--workers", "0"], capture_output=True, text=True,
    )

    assert result.returncode == 2
    assert result.stderr.strip() == "securevol: Invalid value '0' for --workers: must be at least 1."


@pytest.mark.parametrize(("setting", "raw", "reason"), [
    ("workers", "abc", "must be a whole number"),
    ("mount_timeout", "soon", "must be a number of seconds"),
    ("mount_timeout", "-1", "must be greater than 0"),
])
def test_non_numeric_setting_rejected(setting, raw, reason):
    flag = "--" + setting.replace("_", "-")

    with pytest.raises(config.ConfigError) as caught:
        config.resolve({setting: raw}, {})

    assert str(caught.value) == f"Invalid value {raw!r} for {flag}: {reason}."


def test_second_daemon_on_one_state_dir_rejected(server, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "serve",
         "--socket", str(tmp_path / "second.sock"), "--state-dir", str(server.state_dir)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    expected = (f"securevol: Another securevol daemon (PID {server.process.pid}) uses the state directory "
                f"{server.state_dir}; stop it first, or give this daemon another --state-dir.")
    assert result.stderr.strip().endswith(expected)
    assert not (tmp_path / "second.sock").exists()
    assert server.call("List", {}).status == 200


@pytest.mark.parametrize(("path", "found"), [
    ("/run/docker/plugins/securevol.sock", True),
    ("/run/docker/plugins/sv/sv.sock", True),
    ("/run/docker/plugins/securevol", False),
    ("/run/docker/plugins/sv/other.sock", False),
    ("/tmp/securevol.sock", False),
])
def test_socket_discoverable_by_dockerd(path, found):
    assert cli._discoverable(Path(path)) is found


def test_undiscoverable_socket_warned(server):
    # The test daemon's socket is in a temporary directory, where dockerd does not look.
    warnings = [line for line in server.log_text().splitlines() if "socket outside dockerd's plugin directory" in line]
    assert len(warnings) == 1
    assert str(server.socket) in warnings[0]


def test_serve_as_non_root_rejected(tmp_path):
    # The child imports securevol as root, then drops to nobody, because the
    # virtualenv's interpreter need not be executable by nobody.
    state_dir = tmp_path / "state"
    drop_to_nobody = (
        "import os, sys; from securevol import cli; "
        "os.setgid(65534); os.setuid(65534); sys.exit(cli.main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", drop_to_nobody, "serve",
         "--socket", str(tmp_path / "svtest.sock"), "--state-dir", str(state_dir)],
        capture_output=True, text=True,
    )

    assert result.returncode == 1
    expected = "securevol: securevol serve needs root to mount FUSE filesystems for dockerd, so run it with sudo."
    assert result.stderr.strip().endswith(expected)
    assert not state_dir.exists()
    assert not (tmp_path / "svtest.sock").exists()


def test_serve_on_socket_in_use_rejected(server, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "serve",
         "--socket", str(server.socket), "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"securevol: Another process already listens on {server.socket}; stop it first, "
        "or give this daemon another --socket."
    )
    assert not (tmp_path / "state").exists()
    assert server.call("/Plugin.Activate").status == 200


def test_restart_at_once_after_main_process_killed(tmp_path):
    # The workers of a killed main process keep the socket until they notice,
    # which takes a second or two; a restart meanwhile waits for them. The
    # workers are stopped (SIGSTOP) while the main process dies, so that they
    # are still there when the new daemon starts, whatever the timing.
    first = PluginServer(workers=2)
    orphans = []
    second = None
    second_log = tmp_path / "second.log"
    try:
        first.start()
        orphans = first.wait_for_workers(2)
        for pid in orphans:
            os.kill(pid, signal.SIGSTOP)
        first.process.kill()
        first.process.wait(60)

        with open(second_log, "wb") as log_file:
            second = subprocess.Popen(
                [sys.executable, "-m", "securevol.cli", "serve", "--socket", str(first.socket),
                 "--state-dir", str(first.state_dir), "--workers", "1"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        waiting = "waiting for a stopped daemon's workers to release the socket"
        wait_until(lambda: waiting in second_log.read_text(), "the new daemon waiting for the old workers")
        for pid in orphans:
            os.kill(pid, signal.SIGCONT)

        wait_until(lambda: "plugin listening socket=" in second_log.read_text(), "the new daemon listening")
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in orphans), "the old workers leaving")
        assert second.poll() is None, second_log.read_text()
        assert plugin_request(first.socket, "/Plugin.Activate").status == 200
    finally:
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if second is not None and second.poll() is None:
            second.terminate()
            second.wait(60)
        first.cleanup()


def test_stop_logs_no_errors(tmp_path):
    plugin = PluginServer(workers=2)
    try:
        plugin.start()
        assert plugin.stop() == 0

        log_text = plugin.log_text()
        assert "Traceback" not in log_text
        assert "[ERROR]" not in log_text
        assert " ERROR " not in log_text
        # Run as 'python -m securevol.cli', the daemon's own lines are logged too.
        assert "daemon starting state_dir=" in log_text
        assert "default_policy=allow" in log_text
        assert "plugin listening socket=" in log_text
    finally:
        plugin.cleanup()


def test_socket_kept_by_child_of_exited_listener_rejected(tmp_path):
    # A service whose listening process forked and exited still serves: after
    # the wait, the socket counts as in use.
    path = tmp_path / "svforked.sock"
    pid_file = tmp_path / "service.pid"
    service = subprocess.Popen([sys.executable, "-c", (
        "import os, socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(16)\n"
        "if os.fork(): os._exit(0)\n"
        "open(sys.argv[2], 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    ), str(path), str(pid_file)])
    service.wait(10)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "securevol.cli", "serve", "--socket", str(path),
             "--state-dir", str(tmp_path / "state")],
            capture_output=True, text=True, timeout=60,
        )

        assert result.returncode == 1
        assert "Another process already listens on" in result.stderr
        assert "waiting for a stopped daemon's workers to release the socket" in result.stderr
        assert path.exists()
    finally:
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_lock_file_symlink_not_followed(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    (state_dir / cli.DAEMON_LOCK_FILE).symlink_to(target)

    result = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "serve", "--socket", str(tmp_path / "svlink.sock"),
         "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert "Failed to lock the state directory" in result.stderr
    assert target.read_text() == "keep me\n"


def test_serve_replaces_stale_socket(tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "svstale.sock"))
    stale.close()  # the file stays, but nothing listens on it any more
    plugin = PluginServer(workers=1, socket_path=tmp_path / "svstale.sock")
    try:
        plugin.start()

        assert plugin.call("/Plugin.Activate").status == 200
    finally:
        plugin.cleanup()


# -- mounts --------------------------------------------------------------------------


@needs_fuse
def test_mount_write_unmount_remove(server):
    name = create(server)

    mountpoint = Path(mount(server, name, "m1"))
    (mountpoint / SECRET_FILE_NAME).write_bytes(PLAINTEXT)
    pid = fuse_pid(server, name)

    assert mountpoint == server.mount_root / name
    assert get(server, name)["Mountpoint"] == str(mountpoint)
    assert get(server, name)["Status"]["mounted"] is True
    assert server.call("Path", {"Name": name}).json["Mountpoint"] == str(mountpoint)
    assert str(mountpoint) in mounts_under(mountpoint)

    unmount(server, name, "m1")

    wait_for_exit(pid)
    assert not mounts_under(mountpoint)
    assert "Mountpoint" not in get(server, name)
    assert server.call("Path", {"Name": name}).json["Mountpoint"] == ""
    on_disk = backing_bytes(server, name)
    assert len(on_disk) > len(PLAINTEXT)
    for start in range(0, len(PLAINTEXT) - 16, 16):
        assert PLAINTEXT[start:start + 16] not in on_disk
    assert SECRET_FILE_NAME.encode() not in on_disk
    assert b"plaintext-name-marker" not in on_disk

    remounted = Path(mount(server, name, "m2"))
    assert (remounted / SECRET_FILE_NAME).read_bytes() == PLAINTEXT
    unmount(server, name, "m2")

    assert server.call("Remove", {"Name": name}).err == ""
    assert not server.volume_dir(name).exists()
    assert not mountpoint.exists()


@needs_fuse
def test_mount_counts_are_a_multiset(server):
    name = create(server)
    mountpoint = Path(mount(server, name, "container"))
    pid = fuse_pid(server, name)
    (mountpoint / "f").write_text("kept")

    # docker cp into a running container repeats the container's mount ID.
    assert mount(server, name, "container") == str(mountpoint)
    assert mount(server, name, "other") == str(mountpoint)
    assert fuse_pid(server, name) == pid
    assert get(server, name)["Status"]["mount_count"] == 3

    unmount(server, name, "container")
    unmount(server, name, "container")
    assert (mountpoint / "f").read_text() == "kept"
    assert pid_running(pid)
    unmount(server, name, "container")  # not counted any more: ignored
    assert (mountpoint / "f").read_text() == "kept"

    unmount(server, name, "other")

    wait_for_exit(pid)
    assert not mounts_under(mountpoint)
    assert "unmount of unknown mount id ignored" in server.log_text()


@needs_fuse
def test_mount_of_older_format_rejected(server):
    name = create(server)
    record_file = server.volume_dir(name) / "volume.json"
    record = json.loads(record_file.read_text())
    assert record["format_version"] == 2
    record["format_version"] = 1
    record_file.write_text(json.dumps(record))

    response = server.call("Mount", {"Name": name, "ID": "old"})

    assert_one_sentence_error(response, name, "on-disk format 1", "reads format 2", "copy its files to a new volume")
    assert not mounts_under(server.mount_root / name)
    assert get(server, name)["Status"]["mounted"] is False
    assert f"volume mount rejected vol={name} reason=unsupported_format format=1 supported=2" in server.log_text()
    assert server.call("Remove", {"Name": name}).err == ""


@needs_fuse
def test_remove_refused_while_mounted(server):
    name = create(server)
    mount(server, name, "busy")

    response = server.call("Remove", {"Name": name})

    assert_one_sentence_error(response, name, "still mounted", f"fusermount3 -u {server.mount_root / name}")
    assert (server.volume_dir(name) / "dek.json").exists()
    unmount(server, name, "busy")
    assert server.call("Remove", {"Name": name}).err == ""


def test_remove_destroys_wrapped_key_before_data(server):
    name = create(server)
    data = server.volume_dir(name) / "data"
    (data / "ciphertext").write_bytes(b"c" * 4096)
    pinned = data / "pinned"
    pinned.mkdir()
    # A mount inside the backing store makes deleting the ciphertext fail half way.
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(pinned)], check=True)
    try:
        response = server.call("Remove", {"Name": name})

        assert_one_sentence_error(response, name, "was destroyed", "by hand")
        assert not (server.volume_dir(name) / "dek.json").exists()
        assert pinned.exists()
        assert name not in [v["Name"] for v in server.call("List").json["Volumes"]]
    finally:
        subprocess.run(["umount", str(pinned)], check=True)

    create(server, name)
    assert sorted(os.listdir(server.volume_dir(name) / "data")) == []


@needs_fuse
def test_restart_keeps_volumes_and_mounts(fresh_server):
    server = fresh_server
    names = [create(server) for _ in range(3)]
    mountpoint = Path(mount(server, names[0], "running"))
    (mountpoint / "before").write_text("before restart")
    pid = fuse_pid(server, names[0])

    server.kill()
    (mountpoint / "down").write_text("while down")
    server.start()

    assert (mountpoint / "before").read_text() == "before restart"
    assert {v["Name"] for v in server.call("List").json["Volumes"]} == set(names)
    assert get(server, names[0])["Mountpoint"] == str(mountpoint)
    assert mount(server, names[0], "new") == str(mountpoint)
    assert fuse_pid(server, names[0]) == pid
    unmount(server, names[0], "running")
    unmount(server, names[0], "new")
    wait_for_exit(pid)

    assert (Path(mount(server, names[0], "again")) / "down").read_text() == "while down"
    unmount(server, names[0], "again")


@needs_fuse
@pytest.mark.slow
def test_unmount_cut_short_by_daemon_stop_still_counted(fresh_server):
    # A FUSE process that is slow to exit (stopped here) keeps the Unmount
    # waiting longer than the stopping daemon gives its requests.
    server = fresh_server
    name = create(server)
    mountpoint = Path(mount(server, name, "first"))
    (mountpoint / "kept").write_bytes(PLAINTEXT)
    pid = fuse_pid(server, name)
    os.kill(pid, signal.SIGSTOP)
    unmount_errors: list[Exception] = []

    def call_unmount() -> None:
        try:
            server.call("Unmount", {"Name": name, "ID": "first"})
        except http.client.HTTPException as exc:
            unmount_errors.append(exc)  # the stopping daemon drops the connection

    unmount_thread = threading.Thread(target=call_unmount)
    unmount_thread.start()
    time.sleep(1)

    try:
        server.stop()
    finally:
        os.kill(pid, signal.SIGCONT)
        unmount_thread.join()
    wait_for_exit(pid)

    assert unmount_errors, "the Unmount finished before the daemon stopped, so nothing was cut short"
    assert json.loads((server.volume_dir(name) / "mounts.json").read_text())["counts"] == {}
    server.start()
    unmount(server, name, "first")  # dockerd sends a failed Unmount again later
    assert (Path(mount(server, name, "second")) / "kept").read_bytes() == PLAINTEXT
    unmount(server, name, "second")
    assert not mounts_under(mountpoint)
    assert server.call("Remove", {"Name": name}).err == ""


@needs_fuse
def test_killed_fuse_process_replaced_on_next_mount(server):
    name = create(server)
    mountpoint = Path(mount(server, name, "first"))
    (mountpoint / "kept").write_bytes(PLAINTEXT)
    old_pid = fuse_pid(server, name)

    os.kill(old_pid, signal.SIGKILL)
    wait_for_exit(old_pid)
    with pytest.raises(OSError):
        (mountpoint / "kept").read_bytes()
    status = get(server, name)["Status"]
    assert status["mounted"] is False
    assert status["mount_count"] == 1
    listed = {volume["Name"]: volume for volume in server.call("List").json["Volumes"]}
    assert listed[name]["Status"]["mounted"] is False

    assert mount(server, name, "second") == str(mountpoint)
    assert get(server, name)["Status"]["mounted"] is True
    listed = {volume["Name"]: volume for volume in server.call("List").json["Volumes"]}
    assert listed[name]["Status"]["mounted"] is True

    new_pid = fuse_pid(server, name)
    assert new_pid != old_pid
    assert (mountpoint / "kept").read_bytes() == PLAINTEXT
    assert f"pid={old_pid}" in server.log_text()
    assert "fuse process not serving, replacing it" in server.log_text()
    unmount(server, name, "first")
    assert (mountpoint / "kept").read_bytes() == PLAINTEXT
    unmount(server, name, "second")
    wait_for_exit(new_pid)
    assert not mounts_under(mountpoint)


def rewrite_mounts(server, name, **changes) -> None:
    """Change fields of a volume's mounts.json, as a crash or a reboot leaves it."""
    mounts_file = server.volume_dir(name) / "mounts.json"
    state = json.loads(mounts_file.read_text())
    state.update(changes)
    mounts_file.write_text(json.dumps(state))


def end_fuse_process_and_mount(server, name, mountpoint: Path) -> None:
    """Kill a volume's FUSE process and detach its mount, as a reboot ends both."""
    pid = fuse_pid(server, name)
    os.kill(pid, signal.SIGKILL)
    wait_for_exit(pid)
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=True)


def drop_boot_id(server, name) -> None:
    """Rewrite a volume's mounts.json as the release before the boot ID wrote it."""
    mounts_file = server.volume_dir(name) / "mounts.json"
    state = json.loads(mounts_file.read_text())
    del state["boot_id"]
    mounts_file.write_text(json.dumps(state))


def crash_then_copy_into_container(server, name, mountpoint: Path) -> int:
    """Kill the FUSE process that container C mounted, then play Docker's calls; return the new PID.

    Container D mounts the volume, a docker cp into C mounts it again under
    C's mount ID and writes a file, then C and D stop. The copy still holds
    its mount afterwards.
    """
    old_pid = fuse_pid(server, name)
    os.kill(old_pid, signal.SIGKILL)
    wait_for_exit(old_pid)

    mount(server, name, "container-d")
    mount(server, name, "container-c")  # docker cp into container C
    new_pid = fuse_pid(server, name)
    (mountpoint / "copied").write_bytes(PLAINTEXT)
    unmount(server, name, "container-c")  # C stops
    unmount(server, name, "container-d")  # D stops
    return new_pid


@needs_fuse
def test_counts_from_earlier_boot_dropped(server):
    name = create(server)
    mountpoint = Path(mount(server, name, "before-reboot"))
    # What a reboot leaves: no FUSE process, no mount, counts of another boot.
    end_fuse_process_and_mount(server, name, mountpoint)
    rewrite_mounts(server, name, boot_id="an-earlier-boot")

    mount(server, name, "after-reboot")
    new_pid = fuse_pid(server, name)
    unmount(server, name, "after-reboot")

    wait_for_exit(new_pid)
    assert not mounts_under(mountpoint)
    assert json.loads((server.volume_dir(name) / "mounts.json").read_text())["counts"] == {}
    assert server.call("Remove", {"Name": name}).err == ""


@needs_fuse
def test_counts_without_boot_id_dropped_after_reboot(server):
    # The same, when the release before this one wrote mounts.json last: it
    # recorded no boot ID.
    name = create(server)
    mountpoint = Path(mount(server, name, "container-c"))
    end_fuse_process_and_mount(server, name, mountpoint)
    drop_boot_id(server, name)

    mount(server, name, "container-c")  # dockerd restarts the container under its old mount ID
    new_pid = fuse_pid(server, name)
    unmount(server, name, "container-c")

    wait_for_exit(new_pid)
    assert not mounts_under(mountpoint)
    assert server.call("Remove", {"Name": name}).err == ""


@needs_fuse
def test_crash_after_upgrade_keeps_counts(server):
    # Container C was mounted in this boot by the release before the boot ID,
    # the package was upgraded in place (FUSE processes survive that), and
    # then the FUSE process crashed. Its dead mount shows the counts are of
    # this boot, so a docker cp into C keeps its mount after C stops.
    name = create(server)
    mountpoint = Path(mount(server, name, "container-c"))
    drop_boot_id(server, name)
    new_pid = crash_then_copy_into_container(server, name, mountpoint)

    assert pid_running(new_pid)
    assert (mountpoint / "copied").read_bytes() == PLAINTEXT
    unmount(server, name, "container-c")  # docker cp ends
    wait_for_exit(new_pid)


@needs_fuse
def test_stale_boot_id_beside_live_process_kept(server):
    # A mounts.json restored from a backup of an earlier boot while this
    # boot's FUSE process serves container C: a live process cannot predate
    # the boot, so its counts still hold.
    name = create(server)
    mountpoint = Path(mount(server, name, "container-c"))
    pid = fuse_pid(server, name)
    (mountpoint / "kept").write_bytes(PLAINTEXT)
    rewrite_mounts(server, name, boot_id="an-earlier-boot")

    assert get(server, name)["Status"]["mounted"]
    mount(server, name, "container-d")
    assert fuse_pid(server, name) == pid
    assert server.call("Remove", {"Name": name}).err != ""
    assert (mountpoint / "kept").read_bytes() == PLAINTEXT
    unmount(server, name, "container-d")
    unmount(server, name, "container-c")
    wait_for_exit(pid)


@needs_fuse
def test_reused_id_after_crash_keeps_mount(server):
    # dockerd mounts a running container's volumes again under that
    # container's mount ID for 'docker cp'. After a FUSE crash in the same
    # boot, the container's own Unmount must not take the copy's mount away.
    name = create(server)
    mountpoint = Path(mount(server, name, "container-c"))
    new_pid = crash_then_copy_into_container(server, name, mountpoint)

    assert pid_running(new_pid)
    assert (mountpoint / "copied").read_bytes() == PLAINTEXT
    unmount(server, name, "container-c")  # docker cp ends
    wait_for_exit(new_pid)
    assert not mounts_under(mountpoint)


@needs_fuse
def test_repeated_unmount_stops_process_without_mounts(server):
    name = create(server)
    mountpoint = Path(mount(server, name, "only"))
    pid = fuse_pid(server, name)
    # An Unmount whose worker was killed after it wrote mounts.json and before
    # it stopped the FUSE process leaves this; dockerd then sends it again.
    rewrite_mounts(server, name, counts={})

    unmount(server, name, "only")

    wait_for_exit(pid)
    assert not mounts_under(mountpoint)
    assert "fuse process without mounts stopped vol=" in server.log_text()
    assert server.call("Remove", {"Name": name}).err == ""


@needs_fuse
def test_mounts_of_many_volumes_in_parallel(server):
    names = [create(server) for _ in range(4)]
    results = {}

    def mount_one(name):
        results[name] = server.call("Mount", {"Name": name, "ID": "parallel"})

    threads = [threading.Thread(target=mount_one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for name in names:
        assert results[name].err == ""
        Path(results[name].json["Mountpoint"], "x").write_text(name)
    for name in names:
        assert Path(server.mount_root, name, "x").read_text() == name
        unmount(server, name, "parallel")


def test_mount_with_wrong_master_key_fails_clearly(fresh_server):
    server = fresh_server
    name, other = create(server), create(server)
    # The record of one volume under another master key, as one imported from another host would be.
    volume_id = bytes.fromhex(json.loads((server.volume_dir(name) / "volume.json").read_text())["volume_id"])
    foreign = LocalKeyProvider(os.urandom(32))
    (server.volume_dir(name) / "dek.json").write_text(json.dumps(foreign.wrap(DataKey.generate(), volume_id)))
    before = _files_with_times(server.volume_dir(name))

    response = server.call("Mount", {"Name": name, "ID": "x"})

    assert_one_sentence_error(response, name, "cannot be unlocked", "master key")
    assert not mounts_under(server.mount_root)
    assert get(server, other)["Name"] == other
    # Nothing of the volume was written, its access file included.
    assert _files_with_times(server.volume_dir(name)) == before


def _files_with_times(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Return each file's bytes and mtime, lock files left out (the first Mount creates one)."""
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in directory.rglob("*")
        if path.is_file() and path.suffix != ".lock"
    }


def test_daemon_refuses_a_master_key_of_no_volume(fresh_server):
    server = fresh_server
    name = create(server)
    server.stop()
    key_file = server.state_dir / "master.key"
    key_file.write_bytes(os.urandom(32))
    recorded_policy = (server.state_dir / "default-policy").read_bytes()
    server.extra_args += ("--default-policy", "deny")

    with pytest.raises(RuntimeError, match="exited with status 1") as caught:
        server.start()

    message = str(caught.value)
    assert f"but none of the 1 volume(s) with local keys was wrapped with it (volume {name!r} needs key" in message
    assert "restore the right file, or give its path with --master-key or SECUREVOL_MASTER_KEY." in message
    # The refused daemon recorded nothing of its own settings.
    assert (server.state_dir / "default-policy").read_bytes() == recorded_policy == b"allow\n"


@needs_fuse
def test_mount_rejects_records_of_other_data(server):
    """Records saved from a volume and restored over a new volume of the same name must not mount."""
    name = create(server)
    Path(mount(server, name, "a"), "old.txt").write_text("old\n")
    unmount(server, name, "a")
    saved = {file: (server.volume_dir(name) / file).read_bytes() for file in ("volume.json", "dek.json")}
    assert server.call("Remove", {"Name": name}).status == 200
    create(server, name)
    Path(mount(server, name, "b"), "new.txt").write_text("new\n")
    unmount(server, name, "b")
    for file, content in saved.items():
        (server.volume_dir(name) / file).write_bytes(content)

    response = server.call("Mount", {"Name": name, "ID": "c"})

    assert_one_sentence_error(response, f"Volume {name!r} could not be mounted",
                              "decrypts none of the 1 names", "restore the pair that was saved with it")
    assert not mounts_under(server.mount_root / name)


@needs_fuse
def test_mount_error_from_fuse_process_reported(server):
    name = create(server)
    data = server.volume_dir(name) / "data"
    (data / "not-ciphertext").write_text("planted")

    response = server.call("Mount", {"Name": name, "ID": "x"})

    assert_one_sentence_error(response, f"Volume {name!r} could not be mounted", "not a securevol volume")
    assert not mounts_under(server.mount_root / name)
    assert str(server.mount_root / name) not in [mountpoint for _, mountpoint in server.fuse_processes()]
    assert f"volume mount failed vol={name}" in server.log_text()
    assert get(server, name)["Status"]["mount_count"] == 0
