"""Allowlist syntax, image reference normalisation and matching (securevol.policy)."""

import pytest

from securevol.errors import InvalidOption
from securevol.policy import (
    DENY_ALL,
    MAX_ALLOWLIST_LEN,
    OPEN,
    OPEN_RULE,
    AllowlistError,
    ContainerInfo,
    ImageReferenceError,
    image_refs_of,
    normalize_image_reference,
    normalize_image_refs,
    parse_allowlist,
    resolve_allowlist,
)

HEX_A = "a" * 64
HEX_B = "b" * 64


def container(**fields) -> ContainerInfo:
    defaults = {
        "id": "c" * 64, "name": "web", "image": "busybox", "image_id": f"sha256:{HEX_A}", "labels": {},
    }
    defaults.update(fields)
    return ContainerInfo(**defaults)


# -- parsing: accepted ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kinds", "values"),
    [
        ("name:web", ["name"], ["web"]),
        ("name:/web", ["name"], ["web"]),
        ("name:web-*", ["name"], ["web-*"]),
        ("name:db?_1.x", ["name"], ["db?_1.x"]),
        ("image:postgres:16", ["image"], ["docker.io/library/postgres:16"]),
        ("image:postgres", ["image"], ["docker.io/library/postgres:latest"]),
        (f"image:sha256:{HEX_A}", ["image"], [f"sha256:{HEX_A}"]),
        (f"image:{HEX_A}", ["image"], [f"sha256:{HEX_A}"]),
        ("label:com.example.role=db", ["label"], ["com.example.role=db"]),
        ("label:empty=", ["label"], ["empty="]),
        ("label:k=a=b c", ["label"], ["k=a=b c"]),
        ("service:db", ["service"], ["db"]),
        ("service:shop/db", ["service"], ["shop/db"]),
        ("host", ["host"], [""]),
        (
            "name:web,image:postgres:16,label:com.example.role=db,service:db",
            ["name", "image", "label", "service"],
            ["web", "docker.io/library/postgres:16", "com.example.role=db", "db"],
        ),
        (" name:web , host ", ["name", "host"], ["web", ""]),
    ],
)
def test_parse_accepts(text, kinds, values):
    allowlist = parse_allowlist(text)

    assert [rule.kind for rule in allowlist.rules] == kinds
    assert [rule.value for rule in allowlist.rules] == values
    assert not allowlist.open


def test_parse_keeps_text_as_written():
    allowlist = parse_allowlist(" name:web ,image:postgres:16")

    assert allowlist.text == "name:web,image:postgres:16"
    assert str(allowlist.rules[1]) == "image:postgres:16"


def test_parse_error_is_invalid_option():
    # options.py and the driver turn InvalidOption into the Err of Create.
    with pytest.raises(InvalidOption):
        parse_allowlist("bogus")


# -- parsing: rejected, with the position -----------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        ("", 1, "empty"),
        ("   ", 1, "empty"),
        ("name:web,", 10, "empty rule"),
        ("name:web,,host", 10, "empty rule"),
        (",name:web", 1, "empty rule"),
        ("nam:web", 1, "unknown rule 'nam'"),
        ("Name:web", 1, "unknown rule 'Name'"),
        ("name:web,bogus", 10, "unknown rule 'bogus'"),
        ("name", 1, "needs a value"),
        ("name:", 6, "empty value"),
        ("name:/", 6, "name is empty"),
        ("name:we b", 8, "' ' cannot appear"),
        ("name:web,name:a/b", 16, "'/' cannot appear"),
        ("name:[ab]", 6, "'[' cannot appear"),
        ("host:x", 1, "takes no value"),
        ("host:", 1, "takes no value"),
        ("image:Postgres", 7, "lowercase"),
        ("image:localhost:5000/App", 22, "lowercase"),
        ("image:postgres:", 16, "invalid image tag"),
        ("image:postgres:bad tag", 16, "invalid image tag"),
        ("image:postgres@sha256:abc", 16, "invalid image digest"),
        ("image:postgres@md5:" + HEX_A, 16, "invalid image digest"),
        ("image:a//b", 9, "invalid image name part"),
        ("image:-x", 7, "invalid image name part"),
        ("image:bad_host./x", 7, "invalid registry host"),
        ("label:x", 8, "needs '='"),
        ("label:=v", 7, "key is empty"),
        ("label:k=\x00", 9, "cannot appear in a label rule"),
        ("service:Proj/db", 9, "invalid Compose project"),
        ("service:shop/", 14, "service name is empty"),
        ("service:d b", 10, "' ' cannot appear"),
        ("host,  name:a b", 14, "' ' cannot appear"),
    ],
)
def test_parse_rejects_with_position(text, position, words):
    with pytest.raises(AllowlistError) as caught:
        parse_allowlist(text)

    assert caught.value.position == position
    assert f"character {position}:" in str(caught.value)
    assert words in str(caught.value)


def test_parse_rejects_too_long():
    text = "name:" + "a" * MAX_ALLOWLIST_LEN

    with pytest.raises(AllowlistError) as caught:
        parse_allowlist(text)

    assert str(MAX_ALLOWLIST_LEN) in str(caught.value)


def test_parse_rejects_non_string():
    with pytest.raises(AllowlistError):
        parse_allowlist(None)  # type: ignore[arg-type]


def test_parse_error_is_one_sentence():
    with pytest.raises(AllowlistError) as caught:
        parse_allowlist("name:web,,host")

    message = str(caught.value)
    assert message.endswith(".")
    assert "\n" not in message


# -- image references --------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "normalized"),
    [
        ("postgres", "docker.io/library/postgres:latest"),
        ("postgres:16", "docker.io/library/postgres:16"),
        ("library/postgres:16", "docker.io/library/postgres:16"),
        ("docker.io/postgres:16", "docker.io/library/postgres:16"),
        ("docker.io/library/postgres:16", "docker.io/library/postgres:16"),
        ("index.docker.io/postgres", "docker.io/library/postgres:latest"),
        ("index.docker.io/user/app:1", "docker.io/user/app:1"),
        ("user/app", "docker.io/user/app:latest"),
        ("user/sub/app:v1.2_3-x", "docker.io/user/sub/app:v1.2_3-x"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:1", "localhost:5000/app:1"),
        ("registry.example.com/team/app", "registry.example.com/team/app:latest"),
        ("registry.example.com:443/app:2", "registry.example.com:443/app:2"),
        ("Registry/app", "Registry/app:latest"),
        ("a__b-c---d/e.f_g", "docker.io/a__b-c---d/e.f_g:latest"),
        (f"postgres@sha256:{HEX_A}", f"docker.io/library/postgres@sha256:{HEX_A}"),
        (f"postgres:16@sha256:{HEX_A}", f"docker.io/library/postgres@sha256:{HEX_A}"),
        (f"sha256:{HEX_A}", f"sha256:{HEX_A}"),
        (HEX_A, f"sha256:{HEX_A}"),
    ],
)
def test_normalize_image_reference(reference, normalized):
    assert normalize_image_reference(reference) == normalized


@pytest.mark.parametrize(
    "reference",
    ["", ":16", "Postgres", "a/B", "app:", "app:-x", "app:" + "t" * 129, "a..b", "a_-b", "bad_host./x",
     "/app", "app/", "app@sha256:short", "a" * 256, "host:port:5000/app"],
)
def test_normalize_image_reference_rejects(reference):
    with pytest.raises(ImageReferenceError):
        normalize_image_reference(reference)


def test_image_refs_of_skips_id_prefixes():
    # "abc123" may be the prefix of an image ID, which dockerd resolves by ID.
    assert image_refs_of("abc123") == frozenset()
    assert image_refs_of("sha256:abc123") == frozenset()
    assert image_refs_of("postgres") == {"docker.io/library/postgres:latest"}
    assert image_refs_of(HEX_A) == {f"sha256:{HEX_A}"}
    assert image_refs_of("Not Valid") == frozenset()


def test_normalize_image_refs_of_inspect():
    refs = ["postgres:16", f"postgres@sha256:{HEX_B}", "<none>:<none>", "<none>@<none>", 7, "Bad Ref"]

    assert normalize_image_refs(refs) == {
        "docker.io/library/postgres:16",
        f"docker.io/library/postgres@sha256:{HEX_B}",
    }
    assert normalize_image_refs(None) == frozenset()


# -- matching --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "allowed"),
    [
        ("name:web", "web", True),
        ("name:web", "/web", True),
        ("name:/web", "web", True),
        ("name:web", "web2", False),
        ("name:web", "Web", False),
        ("name:web", "", False),
        ("name:web-*", "web-1", True),
        ("name:web-*", "web-", True),
        ("name:web-*", "web", False),
        ("name:web-?", "web-1", True),
        ("name:web-?", "web-12", False),
        ("name:*", "anything_1", True),
        ("name:*", "", False),
        ("name:a.b", "axb", False),
    ],
)
def test_match_name(text, name, allowed):
    rule = parse_allowlist(text).match(container(name=name))

    assert (rule is not None) is allowed


@pytest.mark.parametrize(
    ("text", "image", "refs", "allowed"),
    [
        ("image:postgres:16", "postgres:16", None, True),
        ("image:postgres:16", "docker.io/library/postgres:16", None, True),
        ("image:postgres:16", "postgres", None, False),
        ("image:postgres", "postgres", None, True),
        ("image:postgres", "postgres:latest", None, True),
        ("image:postgres", "postgres:16", None, False),
        ("image:postgres", "user/postgres", None, False),
        # dockerd resolves a hex string as an ID prefix when no such repository exists.
        ("image:abc123", "abc123", None, False),
        ("image:postgres:16", f"sha256:{HEX_A}", None, False),
        ("image:postgres:16", f"sha256:{HEX_A}", frozenset({"docker.io/library/postgres:16"}), True),
        ("image:postgres:16", "postgres:16", frozenset(), True),
        (f"image:postgres@sha256:{HEX_B}", "postgres:16",
         frozenset({f"docker.io/library/postgres@sha256:{HEX_B}"}), True),
        (f"image:postgres@sha256:{HEX_B}", "postgres:16",
         frozenset({"docker.io/library/postgres:16"}), False),
        (f"image:sha256:{HEX_A}", "anything", None, True),
        (f"image:sha256:{HEX_B}", "anything", None, False),
        # An image ID rule never matches a configured reference, only the ID.
        (f"image:sha256:{HEX_B}", f"sha256:{HEX_B}", None, False),
    ],
)
def test_match_image(text, image, refs, allowed):
    rule = parse_allowlist(text).match(container(image=image, image_refs=refs))

    assert (rule is not None) is allowed


@pytest.mark.parametrize(
    ("text", "labels", "allowed"),
    [
        ("label:role=db", {"role": "db"}, True),
        ("label:role=db", {"role": "db2"}, False),
        ("label:role=db", {"Role": "db"}, False),
        ("label:role=db", {}, False),
        ("label:role=", {"role": ""}, True),
        ("label:role=", {}, False),
        ("label:k=a=b", {"k": "a=b"}, True),
        ("service:db", {"com.docker.compose.service": "db"}, True),
        ("service:db", {"com.docker.compose.service": "web"}, False),
        ("service:db", {"role": "db"}, False),
        ("service:shop/db", {"com.docker.compose.service": "db", "com.docker.compose.project": "shop"}, True),
        ("service:shop/db",
         {"com.docker.compose.service": "db", "com.docker.compose.project": "blog"}, False),
        ("service:shop/db", {"com.docker.compose.service": "db"}, False),
    ],
)
def test_match_labels_and_services(text, labels, allowed):
    rule = parse_allowlist(text).match(container(labels=labels))

    assert (rule is not None) is allowed


def test_match_returns_first_matching_rule():
    allowlist = parse_allowlist("name:db,label:role=web,name:web")

    rule = allowlist.match(container(name="web", labels={"role": "web"}))

    assert rule is not None
    assert rule.text == "label:role=web"


def test_host_rule_never_matches_a_container():
    allowlist = parse_allowlist("host")

    assert allowlist.match(container()) is None
    assert allowlist.match_host() is not None
    assert parse_allowlist("name:web").match_host() is None


def test_open_and_deny_all():
    assert OPEN.match(container()) is OPEN_RULE
    assert OPEN.match_host() is OPEN_RULE
    assert DENY_ALL.match(container()) is None
    assert DENY_ALL.match_host() is None


def test_resolve_allowlist_default():
    assert resolve_allowlist(None) is OPEN
    assert resolve_allowlist(None, deny_by_default=True) is DENY_ALL
    assert resolve_allowlist("name:web", deny_by_default=True).rules[0].value == "web"
    with pytest.raises(AllowlistError):
        resolve_allowlist("")
