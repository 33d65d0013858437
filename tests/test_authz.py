"""Authorization plugin decisions (securevol.authz) and Go-style JSON reading (securevol.gojson).

The registry and the audit log are real files under a temp dir. Tests that
need dockerd's responses (VolumesFrom, rename, exec, docker cp, and whether
dockerd reads a body the way securevol does) use a real private dockerd.
"""

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from securevol import gojson
from securevol.audit import AuditLog
from securevol.authz import (
    Authorizer,
    CreateSpec,
    VolumeCatalog,
    older_api_version,
    parse_bind,
    split_request_uri,
)
from securevol.engine import EngineClient
from securevol.registry import Registry, VolumeRecord
from tests.dockerd import PrivateDockerd, build_busybox_image, plugin_socket_path, unique_driver_name
from tests.plugin_server import PluginServer, plugin_request

DRIVER = "securevol-unit"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    (state_dir / "mnt").mkdir(parents=True)
    Registry(state_dir).ensure_layout()
    return state_dir


def add_volume(state_dir: Path, name: str, allow: str | None = None) -> None:
    """Write a volume record the way the driver does; the wrapped DEK is never read here."""
    options = {"allow": allow} if allow is not None else {}
    record = VolumeRecord(name=name, volume_id="00" * 16, created_at="2026-01-01T00:00:00Z", options=options,
                          key_provider="local")
    registry = Registry(state_dir)
    with registry.creating_or_removing():
        registry.create(record, {"provider": "local"}, (0, 0, 0o755))


def make_authorizer(state_dir: Path, *, engine: EngineClient | None = None, deny_by_default: bool = False,
                    audit_path: Path | None = None) -> Authorizer:
    catalog = VolumeCatalog.from_registry(Registry(state_dir), deny_by_default=deny_by_default)
    return Authorizer(
        catalog,
        driver_names=[DRIVER],
        protected_paths=[state_dir, state_dir / "mnt"],
        engine=engine,
        audit=AuditLog(audit_path or state_dir.parent / "audit.jsonl"),
    )


def request(method: str, uri: str, body: bytes | dict | None = None) -> dict:
    payload = {"User": "", "UserAuthNMethod": "", "RequestMethod": method, "RequestUri": uri,
               "RequestHeaders": {"Content-Type": "application/json"}}
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    if body is not None:
        payload["RequestBody"] = base64.b64encode(body).decode()
    return payload


def create(authorizer: Authorizer, body: bytes | dict | None, name: str = "web",
           uri: str = "/v1.41/containers/create"):
    query = f"?name={name}" if name else ""
    return authorizer.authorize_request(request("POST", uri + query, body))


def audit_records(state_dir: Path) -> list[dict]:
    path = state_dir.parent / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- request URIs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "path", "query"),
    [
        ("/v1.41/containers/create?name=web", "/containers/create", {"name": "web"}),
        ("/containers/create", "/containers/create", {}),
        ("/v1.41/containers%2Fcreate", "/containers/create", {}),
        ("/v1.41/containers%2fcreate?name=a", "/containers/create", {"name": "a"}),
        ("/v1.41/%63ontainers/create", "/containers/create", {}),
        ("/v1.4.1/containers/create", "/containers/create", {}),
        ("/v1/containers/create", "/containers/create", {}),
        ("//containers/create", "/containers/create", {}),
        ("/v1.41//containers/./create", "/containers/create", {}),
        ("/v1.41/x/../containers/create", "/containers/create", {}),
        ("/vx/containers/create", "/vx/containers/create", {}),
        ("/v1.41", "/v1.41", {}),
        ("http://docker/v1.41/containers/create?name=a", "/containers/create", {"name": "a"}),
        ("/containers/create?name=a&name=b", "/containers/create", {"name": "a"}),
        ("/containers/c1/rename?name=new+name%21", "/containers/c1/rename", {"name": "new name!"}),
        ("/containers/create?name=", "/containers/create", {"name": ""}),
    ],
)
def test_split_request_uri(uri, path, query):
    assert split_request_uri(uri) == (path, query)


@pytest.mark.parametrize(
    ("spec", "source", "target"),
    [
        ("db:/data", "db", "/data"),
        ("db:/data:ro,z", "db", "/data"),
        ("/host/dir:/data", "/host/dir", "/data"),
        ("/data", "", "/data"),
    ],
)
def test_parse_bind(spec, source, target):
    bind = parse_bind(spec)

    assert bind is not None
    assert (bind.source, bind.target) == (source, target)


@pytest.mark.parametrize("spec", [":/data", "a:/b:c:d", ""])
def test_parse_bind_rejects_what_dockerd_rejects(spec):
    assert parse_bind(spec) is None


# -- Go JSON rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "folded"),
    [
        ("Binds", "binds"),
        ("BINDS", "binds"),
        ("Bind\u017f", "binds"),  # long s folds to s
        ("\u212aey", "key"),  # Kelvin sign folds to k
        ("B\u0131nds", "b\u0131nds"),  # dotless i has no simple fold to i
        ("B\u0130nds", "b\u0130nds"),  # nor does dotted capital I
    ],
)
def test_fold_key(key, folded):
    assert gojson.fold_key(key) == folded


SCHEMA = gojson.GoStruct({
    "Name": gojson.GoString(),
    "List": gojson.GoSlice(gojson.GoString()),
    "Items": gojson.GoSlice(gojson.GoStruct({"A": gojson.GoString(), "B": gojson.GoString()})),
    "Map": gojson.GoMap(gojson.GoString()),
    "Inner": gojson.GoPointer(gojson.GoStruct({"X": gojson.GoString(), "Y": gojson.GoString()})),
})


def decode(text: str) -> dict:
    return gojson.decode(SCHEMA, text.encode())


def test_go_exact_key_before_folded():
    assert decode('{"name": "a"}')["Name"] == "a"
    assert decode('{"NAME": "a", "Name": "b"}')["Name"] == "b"
    assert decode('{"Name": "b", "nAmE": "a"}')["Name"] == "a"


def test_go_unknown_and_non_folding_keys_ignored():
    assert decode('{"N\u0430me": "cyrillic a", "Other": 1}') == {}


def test_go_null_semantics():
    decoded = decode('{"Name": "a", "Name": null, "List": ["x"], "List": null, '
                     '"Map": {"k": "v"}, "Map": null, "Inner": {"X": "1"}, "Inner": null}')

    assert decoded["Name"] == "a"
    assert decoded["List"] is None
    assert decoded["Map"] is None
    assert decoded["Inner"] is None


def test_go_repeated_slice_last_wins():
    decoded = decode('{"List": ["a", "b"], "List": ["c"]}')

    assert gojson.items(decoded["List"]) == ["c"]


def test_go_repeated_slice_reuses_elements():
    # A null element decodes into the string already at that index.
    decoded = decode('{"List": ["a", "b"], "List": [null, null, "z"]}')

    assert gojson.items(decoded["List"]) == ["a", "b", "z"]


def test_go_slice_reuses_elements_past_its_length():
    decoded = decode('{"Items": [{"A": "1", "B": "1"}, {"A": "2", "B": "2"}], "Items": [{"A": "x"}], '
                     '"Items": [{"A": "y"}, {"A": "z"}]}')

    assert gojson.items(decoded["Items"]) == [{"A": "y", "B": "1"}, {"A": "z", "B": "2"}]


def test_go_empty_array_drops_old_elements():
    decoded = decode('{"Items": [{"A": "1", "B": "1"}], "Items": [], "Items": [{"A": "x"}]}')

    assert gojson.items(decoded["Items"]) == [{"A": "x"}]


def test_go_repeated_map_and_pointer_merge():
    decoded = decode('{"Map": {"a": "1", "b": "1"}, "map": {"b": "2", "c": null}, '
                     '"Inner": {"X": "1"}, "INNER": {"Y": "2"}}')

    assert decoded["Map"] == {"a": "1", "b": "2", "c": ""}
    assert decoded["Inner"] == {"X": "1", "Y": "2"}


def test_go_reads_first_value_only():
    assert decode('{"Name": "a"} {"Name": "b"} trailing') == {"Name": "a"}


def test_go_invalid_utf8_and_lone_surrogates_become_replacement():
    decoded = gojson.decode(SCHEMA, b'{"Name": "a\xffb", "List": ["\\ud800x"]}')

    assert decoded["Name"] == "a\ufffdb"
    assert gojson.items(decoded["List"]) == ["\ufffdx"]


@pytest.mark.parametrize(
    "text",
    ['{"Name": 5}', '{"List": "a"}', '{"Map": []}', '{"Inner": "x"}', '{"Items": [1]}', '[]', '"x"', "",
     "\ufeff{}", "{"],
)
def test_go_rejects_what_dockerd_rejects(text):
    with pytest.raises(ValueError):
        decode(text)


# -- create: the body ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [None, b""])
def test_create_without_body_denied(state, body):
    authorizer = make_authorizer(state)

    verdict = create(authorizer, body)

    assert not verdict.allow
    assert "without its body" in verdict.message
    assert audit_records(state)[-1]["reason"] == "create without body"


def test_create_with_invalid_base64_denied(state):
    authorizer = make_authorizer(state)
    payload = request("POST", "/containers/create")
    payload["RequestBody"] = "not base64!"

    assert not authorizer.authorize_request(payload).allow


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"HostConfig": {"Binds": "db:/x"}}', b'{"Image": 5}'])
def test_create_with_unreadable_body_denied(state, body):
    verdict = create(make_authorizer(state), body)

    assert not verdict.allow
    assert "cannot be read" in verdict.message


@pytest.mark.parametrize(
    "uri",
    ["/v1.41/containers/create", "/containers/create", "/v1.41/containers%2Fcreate",
     "/v1.41/containers%2fcreate", "//v1.41/containers/create", "/v1.41/./containers/create",
     "http://docker/containers/create"],
)
def test_create_path_variants_are_checked(state, uri):
    verdict = create(make_authorizer(state), None, uri=uri)

    assert not verdict.allow


def test_create_method_variants_are_checked(state):
    verdict = make_authorizer(state).authorize_request(request("post", "/containers/create"))

    assert not verdict.allow


# -- create: volumes and the allowlist -----------------------------------------------------------


def test_create_allowed_by_name_is_audited(state):
    add_volume(state, "db", "name:web")

    verdict = create(make_authorizer(state), {"Image": "busybox", "HostConfig": {"Binds": ["db:/data"]}})

    assert verdict.allow
    record = audit_records(state)[-1]
    assert record["decision"] == "allow"
    assert record["point"] == "authz"
    assert record["action"] == "create"
    assert record["volume"] == "db"
    assert record["container_name"] == "web"
    assert record["image"] == "busybox"
    assert record["rule"] == "name:web"


def test_create_denied_names_volume_and_rules(state):
    add_volume(state, "db", "name:web,service:db")

    verdict = create(make_authorizer(state), {"Image": "busybox", "HostConfig": {"Binds": ["db:/data"]}},
                     name="evil")

    assert not verdict.allow
    assert "'db'" in verdict.message
    assert "'evil'" in verdict.message
    assert "name:web,service:db" in verdict.message
    record = audit_records(state)[-1]
    assert record["decision"] == "deny"
    assert record["volume"] == "db"
    assert record["container_name"] == "evil"
    assert record["rule"] == ""


def test_create_without_name_denied_by_name_rule(state):
    add_volume(state, "db", "name:*")

    body = {"Image": "busybox", "HostConfig": {"Binds": ["db:/data"]}}

    verdict = create(make_authorizer(state), body, name="")

    assert not verdict.allow
    assert "without a name" in verdict.message


def test_create_name_with_leading_slash(state):
    add_volume(state, "db", "name:web")

    verdict = create(make_authorizer(state), {"HostConfig": {"Binds": ["db:/data"]}}, name="/web")

    assert verdict.allow


def test_create_first_name_query_value_counts(state):
    add_volume(state, "db", "name:web")
    body = {"HostConfig": {"Binds": ["db:/data"]}}

    assert not create(make_authorizer(state), body, name="evil&name=web").allow
    assert create(make_authorizer(state), body, name="web&name=evil").allow


def test_create_checks_every_volume(state):
    add_volume(state, "db", "name:web")
    add_volume(state, "secrets", "name:vault")
    body = {"HostConfig": {"Binds": ["db:/data", "secrets:/s"]}}

    verdict = create(make_authorizer(state), body)

    assert not verdict.allow
    assert "'secrets'" in verdict.message
    # The allow for db is not audited, because the request as a whole was denied.
    assert [record["decision"] for record in audit_records(state)] == ["deny"]


def test_create_open_volume_allowed(state):
    add_volume(state, "shared")

    verdict = create(make_authorizer(state), {"HostConfig": {"Binds": ["shared:/data"]}}, name="anyone")

    assert verdict.allow
    assert audit_records(state)[-1]["rule"] == "no allowlist"


def test_create_volume_without_allowlist_denied_by_default_setting(state):
    add_volume(state, "shared")

    body = {"HostConfig": {"Binds": ["shared:/data"]}}

    verdict = create(make_authorizer(state, deny_by_default=True), body)

    assert not verdict.allow
    assert "no allowlist" in verdict.message


def test_create_other_volumes_pass_without_audit(state):
    add_volume(state, "db", "name:web")

    verdict = create(make_authorizer(state), {"HostConfig": {"Binds": ["other:/data", "/srv/www:/www"]}},
                     name="evil")

    assert verdict.allow
    assert audit_records(state) == []


def test_create_labels_and_service(state):
    add_volume(state, "db", "service:shop/db,label:role=db")
    authorizer = make_authorizer(state)
    compose_labels = {"com.docker.compose.service": "db", "com.docker.compose.project": "shop"}

    host_config = {"Binds": ["db:/d"]}

    assert create(authorizer, {"Labels": compose_labels, "HostConfig": host_config}, name="x").allow
    assert create(authorizer, {"Labels": {"role": "db"}, "HostConfig": host_config}, name="x").allow
    assert not create(authorizer, {"Labels": {"role": "web"}, "HostConfig": host_config}, name="x").allow


def test_create_image_rule_by_configured_reference(state):
    add_volume(state, "db", "image:postgres:16")
    authorizer = make_authorizer(state)

    body = {"Image": "docker.io/library/postgres:16", "HostConfig": {"Binds": ["db:/d"]}}

    assert create(authorizer, body).allow


def test_create_image_rule_needs_engine_when_reference_differs(state):
    add_volume(state, "db", "image:postgres:16")

    verdict = create(make_authorizer(state), {"Image": "busybox", "HostConfig": {"Binds": ["db:/d"]}})

    assert not verdict.allow
    assert "Engine API" in verdict.message


def test_create_mounts_volume(state):
    add_volume(state, "db", "name:web")
    body = {"HostConfig": {"Mounts": [{"Type": "volume", "Source": "db", "Target": "/d"}]}}

    assert not create(make_authorizer(state), body, name="evil").allow
    assert create(make_authorizer(state), body, name="web").allow


def test_create_new_volume_with_driver_and_allow_option(state):
    mount = {"Type": "volume", "Source": "fresh", "Target": "/d",
             "VolumeOptions": {"DriverConfig": {"Name": DRIVER, "Options": {"allow": "name:web"}}}}
    authorizer = make_authorizer(state)

    assert create(authorizer, {"HostConfig": {"Mounts": [mount]}}, name="web").allow
    assert not create(authorizer, {"HostConfig": {"Mounts": [mount]}}, name="evil").allow


def test_create_new_volume_with_invalid_allow_option(state):
    mount = {"Type": "volume", "Target": "/d",
             "VolumeOptions": {"DriverConfig": {"Name": f"{DRIVER}:latest", "Options": {"allow": "nam:web"}}}}

    verdict = create(make_authorizer(state), {"HostConfig": {"Mounts": [mount]}})

    assert not verdict.allow
    assert "invalid allowlist" in verdict.message


def test_create_anonymous_volumes_of_driver(state):
    body = {"Volumes": {"/a": {}}, "HostConfig": {"VolumeDriver": DRIVER, "Binds": ["/b", "named:/c"]}}

    assert create(make_authorizer(state), body).allow
    verdict = create(make_authorizer(state, deny_by_default=True), body)
    assert not verdict.allow
    assert "no allowlist" in verdict.message


def test_create_volume_driver_does_not_apply_to_mounts(state):
    # dockerd creates a Mounts volume without DriverConfig with the local driver.
    body = {"HostConfig": {"VolumeDriver": DRIVER, "Mounts": [{"Type": "volume", "Target": "/d"}]}}

    assert create(make_authorizer(state, deny_by_default=True), body).allow


# -- create: read as dockerd reads it -------------------------------------------------------------

DENIED_BODIES = {
    "top-level Binds without HostConfig": b'{"Binds": ["db:/d"]}',
    "top-level Binds with HostConfig null": b'{"HostConfig": {"Binds": ["x:/x"]}, "HostConfig": null, '
                                            b'"Binds": ["db:/d"]}',
    "lowercase keys": b'{"hostconfig": {"binds": ["db:/d"]}}',
    "uppercase keys": b'{"HOSTCONFIG": {"BINDS": ["db:/d"]}}',
    "long s in key": '{"HostConfig": {"Bind\u017f": ["db:/d"]}}'.encode(),
    "long s in HostConfig": '{"Ho\u017ftConfig": {"Binds": ["db:/d"]}}'.encode(),
    "escaped key": b'{"HostConfig": {"\\u0042inds": ["db:/d"]}}',
    "repeated HostConfig merges": b'{"HostConfig": {"Binds": ["db:/d"]}, "HostConfig": {"Memory": 1}}',
    "null Binds element reuses": b'{"HostConfig": {"Binds": ["db:/d"], "Binds": [null]}}',
    "Mounts element reuses Source": b'{"HostConfig": {"Mounts": [{"Type": "volume", "Source": "db", '
                                    b'"Target": "/d"}], "mounts": [{"type": "volume", "target": "/e"}]}}',
    "last Binds wins": b'{"HostConfig": {"Binds": ["other:/d"], "Binds": ["db:/d"]}}',
    "trailing garbage": b'{"HostConfig": {"Binds": ["db:/d"]}} {"HostConfig": {}}',
    "bind with mode": b'{"HostConfig": {"Binds": ["db:/d:ro,z"]}}',
}

ALLOWED_BODIES = {
    "top-level Binds ignored with HostConfig": b'{"Binds": ["db:/d"], "HostConfig": {}}',
    "dotless i is not i": '{"HostConfig": {"B\u0131nds": ["db:/d"]}}'.encode(),
    "last Binds wins": b'{"HostConfig": {"Binds": ["db:/d"], "Binds": ["other:/d"]}}',
    "empty array drops": b'{"HostConfig": {"Binds": ["db:/d"], "Binds": []}}',
    "unknown mount type": b'{"HostConfig": {"Mounts": [{"Type": "VOLUME", "Source": "db", "Target": "/d"}]}}',
}


@pytest.mark.parametrize("body", DENIED_BODIES.values(), ids=DENIED_BODIES.keys())
def test_create_body_variants_denied(state, body):
    add_volume(state, "db", "name:web")

    assert not create(make_authorizer(state), body, name="evil").allow


@pytest.mark.parametrize("body", ALLOWED_BODIES.values(), ids=ALLOWED_BODIES.keys())
def test_create_body_variants_allowed(state, body):
    add_volume(state, "db", "name:web")

    assert create(make_authorizer(state), body, name="evil").allow


def test_create_labels_merge_across_repeated_keys(state):
    add_volume(state, "db", "label:b=2")
    body = b'{"Labels": {"a": "1"}, "labels": {"b": "2"}, "HostConfig": {"Binds": ["db:/d"]}}'

    assert create(make_authorizer(state), body).allow


def test_create_top_level_volume_driver_fills_empty_inner(state):
    body = {"VolumeDriver": DRIVER, "Volumes": {"/a": {}}, "HostConfig": {}}

    assert not create(make_authorizer(state, deny_by_default=True), body).allow


# -- create: host paths -------------------------------------------------------------------------------


def host_path_cases(state: Path) -> dict[str, tuple[str, bool]]:
    return {
        "state dir": (str(state), False),
        "mount root": (str(state / "mnt"), False),
        "a live mountpoint": (str(state / "mnt" / "db"), False),
        "backing store": (str(state / "volumes" / "db" / "data"), False),
        "parent": (str(state.parent), False),
        "root": ("/", False),
        "dot-dot": (f"{state}/../{state.name}", False),
        "double slash": ("/" + str(state), False),
        "trailing slash": (f"{state}/", False),
        "sibling with same prefix": (f"{state}x", True),
        "unrelated": ("/srv/www", True),
    }


@pytest.mark.parametrize("case", ["state dir", "mount root", "a live mountpoint", "backing store",
                                  "parent", "root", "dot-dot", "double slash", "trailing slash",
                                  "sibling with same prefix", "unrelated"])
def test_create_bind_of_host_path(state, case):
    source, allowed = host_path_cases(state)[case]
    authorizer = make_authorizer(state)

    bind = create(authorizer, {"HostConfig": {"Binds": [f"{source}:/x"]}})
    bind_mount = {"Type": "bind", "Source": source, "Target": "/x"}
    mount = create(authorizer, {"HostConfig": {"Mounts": [bind_mount]}})

    assert bind.allow is allowed
    assert mount.allow is allowed
    if not allowed:
        assert "bind a path outside it" in bind.message


def test_create_bind_through_symlink_denied(state, tmp_path):
    link = tmp_path / "innocent"
    link.symlink_to(state / "mnt")

    verdict = create(make_authorizer(state), {"HostConfig": {"Binds": [f"{link}/db:/x"]}})

    assert not verdict.allow


def test_create_local_volume_with_device_denied(state):
    mount = {"Type": "volume", "Target": "/x", "VolumeOptions": {
        "DriverConfig": {"Name": "local", "Options": {"type": "none", "o": "bind", "device": str(state)}}}}

    assert not create(make_authorizer(state), {"HostConfig": {"Mounts": [mount]}}).allow


@pytest.mark.parametrize("driver", ["", "local"])
def test_volume_create_with_device_denied(state, driver):
    options = {"type": "none", "o": "bind", "device": f"{state}/mnt"}
    body = {"Name": "sneaky", "Driver": driver, "DriverOpts": options}

    verdict = make_authorizer(state).authorize_request(request("POST", "/v1.41/volumes/create", body))

    assert not verdict.allow


def test_volume_create_elsewhere_allowed(state):
    body = {"Name": "ok", "DriverOpts": {"type": "none", "o": "bind", "device": "/srv/data"}}

    assert make_authorizer(state).authorize_request(request("POST", "/volumes/create", body)).allow
    assert make_authorizer(state).authorize_request(request("POST", "/volumes/create")).allow


# -- other requests -----------------------------------------------------------------------------------


def _catalog_after_same_tick_change(tmp_path: Path) -> tuple[VolumeCatalog, Path, os.stat_result]:
    """Scan a volumes directory with volume 'old', then replace it by 'new' as a coarse clock would show it.

    A coarse clock gives the directory the same mtime again, so the catalog's
    stamp (inode and mtime) does not change.
    """
    volumes = tmp_path / "volumes"
    (volumes / "old").mkdir(parents=True)
    catalog = VolumeCatalog(volumes, lambda name: None)
    assert catalog.names() == {"old"}
    before = os.stat(volumes)

    (volumes / "old").rmdir()
    (volumes / "new").mkdir()
    os.utime(volumes, ns=(before.st_atime_ns, before.st_mtime_ns))
    return catalog, volumes, before


def test_catalog_sees_volume_created_in_same_clock_tick(tmp_path):
    catalog, _, _ = _catalog_after_same_tick_change(tmp_path)

    # The last scan came too soon after the mtime to be trusted, so the directory is scanned again.
    assert catalog.names() == {"new"}


def test_catalog_sees_same_tick_volume_after_quiet_time(tmp_path):
    catalog, volumes, before = _catalog_after_same_tick_change(tmp_path)

    # No request comes while the change is recent. The directory's time and
    # the time of the last scan are moved a minute back, one millisecond
    # apart, as if the next request came a minute after both.
    minute_earlier = before.st_mtime_ns - 60_000_000_000
    os.utime(volumes, ns=(minute_earlier, minute_earlier))
    catalog._stamp = (before.st_ino, minute_earlier)
    catalog._scanned_at_ns = minute_earlier + 1_000_000

    assert catalog.names() == {"new"}


def test_catalog_caches_names_of_unchanged_directory(tmp_path):
    volumes = tmp_path / "volumes"
    (volumes / "db").mkdir(parents=True)
    minute_ago = time.time_ns() - 60_000_000_000
    os.utime(volumes, ns=(minute_ago, minute_ago))
    catalog = VolumeCatalog(volumes, lambda name: None)
    assert catalog.names() == {"db"}

    # With the old mtime put back after a rename, the stamp is unchanged, so
    # names() returns the cached set without a scan.
    (volumes / "db").rename(volumes / "renamed")
    os.utime(volumes, ns=(minute_ago, minute_ago))

    assert catalog.names() == {"db"}


@pytest.mark.parametrize(
    ("method", "uri"),
    [("GET", "/v1.41/containers/json"), ("GET", "/_ping"), ("POST", "/v1.41/containers/web/start"),
     ("GET", "/v1.41/containers/web/json"), ("POST", "/v1.41/images/create?fromImage=x"),
     ("DELETE", "/v1.41/containers/web"), ("GET", "/v1.41/containers/create"),
     ("POST", "/v1.41/exec/abc/start")],
)
def test_other_requests_pass_without_reading_registry(tmp_path, method, uri):
    # A catalog over a file, not a directory, fails on any read, and no Engine API is configured.
    not_a_dir = tmp_path / "volumes"
    not_a_dir.write_text("")
    catalog = VolumeCatalog(not_a_dir, lambda name: None)
    authorizer = Authorizer(catalog, driver_names=[DRIVER], protected_paths=[tmp_path], engine=None,
                            audit=AuditLog(tmp_path / "audit.jsonl"))

    assert authorizer.authorize_request(request(method, uri, {"Binds": ["db:/x"]})).allow
    assert not (tmp_path / "audit.jsonl").exists()


@pytest.mark.parametrize(
    ("method", "uri"),
    [("POST", "/v1.41/containers/web/rename?name=x"), ("PUT", "/v1.41/containers/web/archive?path=/d"),
     ("GET", "/containers/web/archive?path=/d"), ("HEAD", "/containers/web/archive?path=/d"),
     ("POST", "/v1.41/containers/web/exec"), ("POST", "/v1.24/containers/web/copy")],
)
def test_existing_container_requests(state, method, uri):
    # Without securevol volumes nothing is asked; with one, no Engine API means no decision.
    assert make_authorizer(state).authorize_request(request(method, uri)).allow

    add_volume(state, "db", "name:web")
    verdict = make_authorizer(state).authorize_request(request(method, uri))
    assert not verdict.allow
    assert "Engine API" in verdict.message


@pytest.mark.parametrize(
    ("version", "older"),
    [("1.23", True), ("1.24", False), ("1.41", False), ("1.3", True), ("1.100", False), ("2", False),
     ("1..2", True), (".", True)],
)
def test_older_api_version(version, older):
    assert older_api_version(version, "1.24") is older


def start(authorizer: Authorizer, uri: str, body: bytes | dict | None = None, headers: dict | None = None):
    payload = request("POST", uri, body)
    payload["RequestHeaders"].update(headers or {})
    return authorizer.authorize_request(payload)


def test_start_with_host_config_on_old_api_checked(state):
    add_volume(state, "db", "name:web")
    authorizer = make_authorizer(state)

    # No Engine API here, so the container cannot be identified: refused.
    verdict = start(authorizer, "/v1.23/containers/web/start", {"Binds": ["db:/d"]})

    assert not verdict.allow
    assert "Engine API" in verdict.message


def test_start_body_on_old_api_must_arrive(state):
    authorizer = make_authorizer(state)

    assert not start(authorizer, "/v1.23/containers/web/start", None, {"Content-Length": "120"}).allow
    assert not start(authorizer, "/v1.23/containers/web/start", None, {"Transfer-Encoding": "chunked"}).allow
    assert start(authorizer, "/v1.23/containers/web/start", None, {"Content-Length": "0"}).allow
    assert start(authorizer, "/v1.23/containers/web/start").allow


def test_old_api_start_bind_of_state_denied(state):
    verdict = start(make_authorizer(state), "/v1.20/containers/web/start", {"Binds": [f"{state}:/x"]})

    assert not verdict.allow


@pytest.mark.parametrize("uri", ["/v1.24/containers/web/start", "/v1.41/containers/web/start",
                                 "/containers/web/start"])
def test_start_body_ignored_where_dockerd_refuses_it(state, uri):
    add_volume(state, "db", "name:web")

    assert start(make_authorizer(state), uri, {"Binds": ["db:/d"]}).allow


def test_response_always_allowed(state):
    payload = request("POST", "/containers/create")
    payload["ResponseStatusCode"] = 201

    assert make_authorizer(state).authorize_response(payload).allow


def test_unreadable_authz_request_denied(state):
    verdict = make_authorizer(state).authorize_request({"RequestUri": "/containers/json"})

    assert not verdict.allow
    assert verdict.message.startswith("securevol cannot read")


def test_response_shape(state):
    add_volume(state, "db", "name:web")
    authorizer = make_authorizer(state)

    assert authorizer.authorize_request(request("GET", "/_ping")).to_response() == {"Allow": True, "Msg": ""}
    denied = create(authorizer, {"HostConfig": {"Binds": ["db:/d"]}}, name="evil").to_response()
    assert denied["Allow"] is False
    assert denied["Msg"]


def test_catalog_sees_new_volume_at_once(state):
    authorizer = make_authorizer(state)
    body = {"HostConfig": {"Binds": ["db:/d"]}}
    assert create(authorizer, body, name="evil").allow

    add_volume(state, "db", "name:web")

    assert not create(authorizer, body, name="evil").allow


def test_catalog_reads_changed_allowlist(state):
    add_volume(state, "db", "name:web")
    authorizer = make_authorizer(state)
    body = {"HostConfig": {"Binds": ["db:/d"]}}
    assert not create(authorizer, body, name="api").allow

    record_path = state / "volumes" / "db" / "volume.json"
    record = json.loads(record_path.read_text())
    record["options"]["allow"] = "name:web,name:api"
    record_path.write_text(json.dumps(record))

    assert create(authorizer, body, name="api").allow


def test_catalog_unreadable_record_denies(state):
    add_volume(state, "db", "name:web")
    (state / "volumes" / "db" / "volume.json").write_text("{broken")

    verdict = create(make_authorizer(state), {"HostConfig": {"Binds": ["db:/d"]}})

    assert not verdict.allow
    assert "cannot be read" in verdict.message


def test_create_spec_reads_fields(state):
    body = (b'{"Image": "busybox", "Labels": {"a": "1"}, "Volumes": {"/v": {}}, "HostConfig": '
            b'{"Binds": ["db:/d"], "VolumesFrom": ["other:ro"], "VolumeDriver": "x", '
            b'"PidMode": "container:db1", "IpcMode": "container:db2", '
            b'"Mounts": [{"Type": "bind", "Source": "/s", "Target": "/t"}]}}')

    spec = CreateSpec.from_body(body, "/web")

    assert spec.name == "web"
    assert spec.image == "busybox"
    assert spec.labels == {"a": "1"}
    assert spec.binds == ["db:/d"]
    assert spec.volumes_from == ["other:ro"]
    assert spec.volume_driver == "x"
    assert spec.pid_mode == "container:db1"
    assert spec.ipc_mode == "container:db2"
    assert spec.mounts == [{"Type": "bind", "Source": "/s", "Target": "/t"}]
    assert spec.anonymous_volumes == ["/v"]


def test_audit_file_mode(state):
    add_volume(state, "db", "name:web")
    create(make_authorizer(state), {"HostConfig": {"Binds": ["db:/d"]}})

    assert os.stat(state.parent / "audit.jsonl").st_mode & 0o777 == 0o600


# -- the same bodies, read by a real dockerd ------------------------------------------------------------

# Body fragments whose reading differs between Go and Python's json; the
# Image and Cmd of the test image are added to each. They bind host paths
# rather than named volumes: creating a named volume makes dockerd ask every
# plugin socket on the host whether the name exists, which is slow while
# other test runs come and go.
AGREEMENT_BODIES = {
    "top-level Binds": b'"Binds": ["/tmp/agree-a:/a"]',
    "top-level Binds ignored": b'"Binds": ["/tmp/agree-a:/a"], "HostConfig": {}',
    "HostConfig null": b'"HostConfig": {"Binds": ["/tmp/agree-b:/b"]}, "HostConfig": null, '
                       b'"Binds": ["/tmp/agree-a:/a"]',
    "HostConfig merged": b'"HostConfig": {"Binds": ["/tmp/agree-a:/a"]}, "HostConfig": {"Memory": 0}',
    "long s": '"HostConfig": {"Bind\u017f": ["/tmp/agree-a:/a"]}'.encode(),
    "dotless i": '"HostConfig": {"B\u0131nds": ["/tmp/agree-a:/a"]}'.encode(),
    "uppercase": b'"HOSTCONFIG": {"BINDS": ["/tmp/agree-a:/a"]}',
    "null element": b'"HostConfig": {"Binds": ["/tmp/agree-a:/a", "/tmp/agree-b:/b"], "Binds": [null]}',
    "last wins": b'"HostConfig": {"Binds": ["/tmp/agree-a:/a"], "binds": ["/tmp/agree-b:/b"]}',
    "empty array": b'"HostConfig": {"Binds": ["/tmp/agree-a:/a"], "Binds": []}',
    "mounts reuse": b'"HostConfig": {"Mounts": [{"Type": "bind", "Source": "/tmp", "Target": "/a"}], '
                    b'"Mounts": [{"Target": "/m"}]}',
    "labels merge": b'"Labels": {"a": "1"}, "labels": {"b": "2", "a": null}',
    "volume driver filled": b'"VolumeDriver": "local", "HostConfig": {}',
    "volume driver kept": b'"VolumeDriver": "other", "HostConfig": {"VolumeDriver": "local"}',
    "escaped key": b'"HostConfig": {"\\u0042inds": ["/tmp/agree-a:/a"]}',
}


def create_in_dockerd(dockerd, image: str, fragment: bytes, name: str) -> tuple[bytes, dict]:
    """Create container *name* from a body fragment through dockerd's API; return the body and inspect."""
    body = b'{"Image": "' + image.encode() + b'", "Cmd": ["true"], ' + fragment + b"}"
    response = plugin_request(dockerd.socket, f"/v1.41/containers/create?name={name}", body,
                              headers={"Content-Type": "application/json"})
    assert response.status == 201, response.body
    return body, EngineClient(str(dockerd.socket)).inspect_container(name)


def dockerd_reading(document: dict) -> dict:
    host_config = document["HostConfig"]
    return {
        "binds": host_config.get("Binds") or [],
        "mounts": [(m.get("Type", ""), m.get("Source", ""), m.get("Target", ""))
                   for m in host_config.get("Mounts") or []],
        "labels": document["Config"].get("Labels") or {},
        "volume_driver": host_config.get("VolumeDriver") or "",
    }


def securevol_reading(spec: CreateSpec) -> dict:
    return {
        "binds": spec.binds,
        "mounts": [(m.get("Type", ""), m.get("Source", ""), m.get("Target", "")) for m in spec.mounts],
        "labels": spec.labels,
        "volume_driver": spec.volume_driver,
    }


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("fragment", AGREEMENT_BODIES.values(), ids=AGREEMENT_BODIES.keys())
def test_create_body_read_as_dockerd_reads_it(dockerd, busybox_image, fragment):
    try:
        body, document = create_in_dockerd(dockerd, busybox_image, fragment, "agreement-probe")

        assert securevol_reading(CreateSpec.from_body(body, "")) == dockerd_reading(document)
    finally:
        dockerd.docker("rm", "-f", "agreement-probe", check=False)


# -- end to end: dockerd --authorization-plugin with the real plugin ----------------------------------


@pytest.fixture(scope="module")
def authz_docker():
    """A private dockerd that sends every API request to a real `securevol serve` for authorization.

    The plugin starts first: dockerd refuses every request while its
    authorization plugin cannot be reached.
    """
    if os.geteuid() != 0:
        pytest.skip("starting dockerd needs root")
    driver = unique_driver_name()
    daemon = PrivateDockerd([f"--authorization-plugin={driver}"])
    plugin = PluginServer(socket_path=plugin_socket_path(driver), env={"SECUREVOL_DOCKER_HOST": daemon.host})
    plugin.start()
    try:
        daemon.start()
        image = build_busybox_image(daemon, "authz-busybox")
        yield daemon, plugin, image
    finally:
        try:
            daemon.remove_all_containers()
            # Every dockerd on the host lists the volumes of every plugin in
            # /run/docker/plugins, so remove only this plugin's.
            listing = daemon.docker("volume", "ls", "-q", "--filter", f"driver={driver}", check=False)
            for name in listing.stdout.split():
                daemon.docker("volume", "rm", "--force", name, check=False)
        finally:
            daemon.stop()
            plugin.cleanup()


@pytest.fixture
def authz_volume(authz_docker):
    daemon, plugin, _ = authz_docker
    created = []

    def create(allow: str) -> str:
        name = f"az-{secrets.token_hex(4)}"
        daemon.docker("volume", "create", "-d", plugin.driver, "-o", f"allow={allow}", name)
        created.append(name)
        return name

    yield create
    daemon.remove_all_containers()
    for name in created:
        daemon.docker("volume", "rm", "--force", name, check=False)


def container_names(daemon) -> list[str]:
    return daemon.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()


def raw_create(daemon, path: str, body: bytes, content_type: str = "application/json"):
    return plugin_request(daemon.socket, path, body, headers={"Content-Type": content_type})


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_allows_listed_and_refuses_others(authz_docker, authz_volume):
    daemon, plugin, image = authz_docker
    volume = authz_volume("name:az-web,service:db")

    allowed = daemon.run("--rm", "--name", "az-web", "-v", f"{volume}:/d", image, "sh", "-c",
                         "echo ok > /d/f")
    refused = daemon.run("--rm", "--name", "az-evil", "-v", f"{volume}:/d", image, "true", check=False)

    assert allowed.returncode == 0
    assert refused.returncode != 0
    assert f"authorization denied by plugin {plugin.driver}" in refused.stderr
    assert f"Volume '{volume}' does not allow container 'az-evil'" in refused.stderr
    assert "name:az-web,service:db" in refused.stderr
    assert "az-evil" not in container_names(daemon)
    # Requests that touch no securevol volume pass.
    assert daemon.docker("ps").returncode == 0
    assert daemon.run("--rm", "--name", "az-other", image, "true").returncode == 0


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_compose_service_label(authz_docker, authz_volume):
    daemon, _, image = authz_docker
    volume = authz_volume("service:shop/db")
    labels = ["--label", "com.docker.compose.project=shop", "--label", "com.docker.compose.service=db"]

    assert daemon.run("--rm", *labels, "-v", f"{volume}:/d", image, "true").returncode == 0
    assert daemon.run("--rm", "--label", "com.docker.compose.service=db", "-v", f"{volume}:/d", image, "true",
                      check=False).returncode != 0


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_raw_api_bypasses_refused(authz_docker, authz_volume):
    daemon, _, image = authz_docker
    volume = authz_volume("name:az-web")
    bodies = {
        "az-top": ("/v1.41/containers/create?name=az-top",
                   f'{{"Image": "{image}", "Binds": ["{volume}:/d"]}}'),
        "az-fold": ("/v1.41/containers/create?name=az-fold",
                    f'{{"Image": "{image}", "hostconfig": {{"Bind\u017f": ["{volume}:/d"]}}}}'),
        "az-path": ("/v1.41/containers%2Fcreate?name=az-path",
                    f'{{"Image": "{image}", "HostConfig": {{"Binds": ["{volume}:/d"]}}}}'),
        "az-dup": ("/v1.41/containers/create?name=az-dup",
                   f'{{"Image": "{image}", "HostConfig": {{"Binds": ["{volume}:/d"]}}, '
                   '"HostConfig": {"Memory": 0}}'),
        "az-mounts": ("/containers/create?name=az-mounts",
                      f'{{"Image": "{image}", "HostConfig": {{"Mounts": [{{"Type": "volume", '
                      f'"Source": "{volume}", "Target": "/d"}}], "Mounts": [{{"Target": "/e"}}]}}}}'),
    }

    for name, (path, body) in bodies.items():
        response = raw_create(daemon, path, body.encode())
        assert response.status == 403, (name, response.body)
        assert b"does not allow container" in response.body

    # Without a body the plugin cannot see the mounts, so it refuses.
    empty = raw_create(daemon, "/v1.41/containers/create?name=az-empty", b"")
    assert empty.status == 403
    assert b"without its body" in empty.body

    assert not set(bodies) & set(container_names(daemon))


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_refuses_binds_of_securevol_directories(authz_docker, tmp_path):
    daemon, plugin, image = authz_docker

    for source in (plugin.state_dir, plugin.mount_root, plugin.state_dir / "volumes", "/"):
        refused = daemon.run("--rm", "-v", f"{source}:/x", image, "true", check=False)
        assert refused.returncode != 0, source
        assert "bind a path outside it" in refused.stderr
    mount = daemon.run("--rm", "--mount", f"type=bind,source={plugin.state_dir},target=/x", image, "true",
                       check=False)
    assert mount.returncode != 0

    local = daemon.docker("volume", "create", "-o", "type=none", "-o", "o=bind",
                          "-o", f"device={plugin.state_dir}", "az-sneaky", check=False)
    assert local.returncode != 0
    assert "bind a path outside it" in local.stderr

    # The plugin's state lives under /tmp here, so bind a directory beside it.
    assert daemon.run("--rm", "-v", f"{tmp_path}:/x", image, "true").returncode == 0


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_cp_through_swapped_bind(authz_docker, authz_volume, tmp_path):
    # docker cp is served by dockerd, which the FUSE check lets in, so a bind
    # whose source became a symlink to the mount root after the create must
    # be refused by the authorization plugin.
    daemon, plugin, image = authz_docker
    volume = authz_volume("name:az-web")
    daemon.run("-d", "--name", "az-web", "-v", f"{volume}:/d", image, "sh", "-c", "echo secret > /d/f; sleep 300")
    harmless = tmp_path / "harmless"
    harmless.mkdir()
    daemon.docker("create", "--name", "az-cp-evil", "-v", f"{harmless}:/m", image, "true")
    harmless.rmdir()
    harmless.symlink_to(plugin.mount_root)

    copied = daemon.docker("cp", f"az-cp-evil:/m/{volume}/f", "-", check=False)

    assert copied.returncode != 0
    assert "secret" not in copied.stdout
    assert "bind a path outside it" in copied.stderr
    assert daemon.docker("cp", "az-web:/d/f", "-").returncode == 0


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_volumes_from_and_rename(authz_docker, authz_volume):
    daemon, _, image = authz_docker
    volume = authz_volume("name:az-web*")
    daemon.docker("create", "--name", "az-web1", "-v", f"{volume}:/d", image, "true")

    borrowed = daemon.run("--rm", "--name", "az-borrow", "--volumes-from", "az-web1", image, "true",
                          check=False)
    assert borrowed.returncode != 0
    assert f"Volume '{volume}' does not allow container 'az-borrow'" in borrowed.stderr

    renamed = daemon.docker("rename", "az-web1", "az-evil", check=False)
    assert renamed.returncode != 0
    assert "does not allow container 'az-evil'" in renamed.stderr
    assert daemon.docker("rename", "az-web1", "az-web2").returncode == 0


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_shared_pid_and_ipc_namespaces(authz_docker, authz_volume):
    # A process in the PID namespace of an allowed container can write into
    # its memory through /proc/PID/mem and read the volume through it.
    daemon, plugin, image = authz_docker
    volume = authz_volume("name:az-web*")
    daemon.run("-d", "--name", "az-web1", "--ipc", "shareable", "-v", f"{volume}:/d", image, "sleep", "300")

    for option in ("--pid", "--ipc"):
        joined = daemon.run("--rm", "--name", "az-peek", option, "container:az-web1", image, "true", check=False)
        assert joined.returncode != 0, option
        assert f"Volume '{volume}' does not allow container 'az-peek'" in joined.stderr
        assert "namespace of container 'az-web1' that mounts it: it matches none of the rules" in joined.stderr

    sidecar = daemon.run("--name", "az-web-sidecar", "--pid", "container:az-web1", image, "true", check=False)
    assert sidecar.returncode == 0, sidecar.stderr
    assert "az-peek" not in container_names(daemon)
    daemon.run("-d", "--name", "az-web-watcher", "--pid", "container:az-web1", image, "sleep", "300")

    # The rules change after the create: the next start is checked again.
    changed = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "allow", "set", volume, "name:az-web1", "--state-dir",
         str(plugin.state_dir)], capture_output=True, text=True, timeout=60)
    assert changed.returncode == 0, changed.stderr
    for command in ("start", "restart"):
        again = daemon.docker(command, "az-web-sidecar", check=False)
        assert again.returncode != 0, command
        assert f"Volume '{volume}' does not allow container 'az-web-sidecar'" in again.stderr
    entered = daemon.docker("exec", "az-web-watcher", "true", check=False)
    assert entered.returncode != 0
    assert f"Volume '{volume}' does not allow container 'az-web-watcher'" in entered.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_image_labels_count(authz_docker, authz_volume):
    # dockerd gives a container its image's labels, and the mount-time check
    # matches them. The create request carries only the labels it sets.
    daemon, _, image = authz_docker
    volume = authz_volume("label:com.example.role=db")
    daemon.docker("create", "--name", "az-labeler", image, "true")
    labeled = "authz-busybox:role-db"
    daemon.docker("commit", "--change", "LABEL com.example.role=db", "az-labeler", labeled)

    inherited = daemon.run("--rm", "--name", "az-inherits", "-v", f"{volume}:/d", labeled, "true", check=False)
    overridden = daemon.run("--rm", "--name", "az-overrides", "--label", "com.example.role=web",
                            "-v", f"{volume}:/d", labeled, "true", check=False)
    unlabeled = daemon.run("--rm", "--name", "az-plain", "-v", f"{volume}:/d", image, "true", check=False)

    assert inherited.returncode == 0, inherited.stderr
    assert overridden.returncode != 0
    assert "does not allow container 'az-overrides'" in overridden.stderr
    assert unlabeled.returncode != 0
    assert "does not allow container 'az-plain'" in unlabeled.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_cp_and_exec_follow_allowlist(authz_docker, authz_volume, tmp_path):
    daemon, plugin, image = authz_docker
    volume = authz_volume("name:az-web")
    daemon.run("-d", "--name", "az-web", "-v", f"{volume}:/d", image, "sh", "-c", "echo ok > /d/f; sleep 300")
    source = tmp_path / "in.txt"
    source.write_text("copied in\n")

    assert daemon.docker("cp", str(source), "az-web:/d/in.txt").returncode == 0
    assert daemon.docker("exec", "az-web", "cat", "/d/in.txt").stdout == "copied in\n"

    changed = subprocess.run(
        [sys.executable, "-m", "securevol.cli", "allow", "set", volume, "name:az-other", "--state-dir",
         str(plugin.state_dir)], capture_output=True, text=True, timeout=60)
    assert changed.returncode == 0, changed.stderr

    copy = daemon.docker("cp", "az-web:/d/f", str(tmp_path / "out.txt"), check=False)
    exec_ = daemon.docker("exec", "az-web", "cat", "/d/f", check=False)
    assert copy.returncode != 0
    assert "does not allow container 'az-web'" in copy.stderr
    assert exec_.returncode != 0
    assert "does not allow container 'az-web'" in exec_.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_e2e_authz_old_api_start_with_binds(authz_docker, authz_volume):
    daemon, _, image = authz_docker
    volume = authz_volume("name:az-web")
    daemon.docker("create", "--name", "az-plain", image, "sleep", "30")
    daemon.docker("create", "--name", "az-web", image, "sleep", "30")
    body = f'{{"Binds": ["{volume}:/d"]}}'.encode()

    # API 1.23 still applies a HostConfig sent with start; dockerd 20.10 accepts it.
    refused = raw_create(daemon, "/v1.23/containers/az-plain/start", body)
    allowed = raw_create(daemon, "/v1.23/containers/az-web/start", body)

    assert refused.status == 403, refused.body
    assert b"does not allow container 'az-plain'" in refused.body
    assert allowed.status == 204, allowed.body
    mounts = EngineClient(str(daemon.socket)).inspect_container("az-web")["Mounts"]
    assert [mount["Name"] for mount in mounts] == [volume]
