"""Tests of extended attribute encryption and the POSIX ACL helpers, on real backing files."""

import errno
import os

import pytest

from securevol import xattrs
from securevol.errors import IntegrityError

KEY = bytes(range(64))


@pytest.fixture
def store():
    return xattrs.ExtendedAttributes(KEY)


@pytest.fixture
def backing_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    return str(path)


def test_round_trip_and_listing(store, backing_file):
    store.set(backing_file, b"user.a", b"value a")
    store.set(backing_file, b"security.capability", b"\x01\x02")
    os.setxattr(backing_file, "user.unrelated", b"set by someone else")

    assert store.get(backing_file, b"user.a") == b"value a"
    assert sorted(store.list_names(backing_file)) == [b"security.capability", b"user.a"]


def test_backing_names_and_values_are_encrypted(store, backing_file):
    store.set(backing_file, b"user.colour", b"ultramarine")

    stored = b"".join(name.encode() + os.getxattr(backing_file, name) for name in os.listxattr(backing_file))

    assert b"colour" not in stored
    assert b"ultramarine" not in stored
    assert all(name.startswith(xattrs.BACKING_PREFIX) for name in os.listxattr(backing_file))


def test_same_value_encrypts_differently(store, backing_file):
    store.set(backing_file, b"user.a", b"same")
    first = os.getxattr(backing_file, store.backing_name(b"user.a"))
    store.set(backing_file, b"user.a", b"same")

    assert os.getxattr(backing_file, store.backing_name(b"user.a")) != first


def test_tampered_value_detected(store, backing_file):
    store.set(backing_file, b"user.a", b"value")
    backing_name = store.backing_name(b"user.a")
    sealed = bytearray(os.getxattr(backing_file, backing_name))

    for position in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[position] ^= 0x01
        os.setxattr(backing_file, backing_name, bytes(damaged))
        with pytest.raises(IntegrityError):
            store.get(backing_file, b"user.a")


def test_values_swapped_between_names_detected(store, backing_file):
    store.set(backing_file, b"user.a", b"value of a")
    store.set(backing_file, b"user.b", b"value of b")
    name_a, name_b = store.backing_name(b"user.a"), store.backing_name(b"user.b")
    value_a, value_b = os.getxattr(backing_file, name_a), os.getxattr(backing_file, name_b)

    os.setxattr(backing_file, name_a, value_b)
    os.setxattr(backing_file, name_b, value_a)

    with pytest.raises(IntegrityError):
        store.get(backing_file, b"user.a")
    with pytest.raises(IntegrityError):
        store.get(backing_file, b"user.b")


def test_tampered_name_skipped_in_listing(store, backing_file, caplog):
    store.set(backing_file, b"user.a", b"x")
    os.setxattr(backing_file, xattrs.BACKING_PREFIX + "AAAAAAAAAAAAAAAAAAAAAAAAAAAA", b"forged")

    assert store.list_names(backing_file) == [b"user.a"]
    assert "attribute name unreadable" in caplog.text


def test_missing_and_invalid_names(store, backing_file):
    with pytest.raises(xattrs.XattrError) as missing:
        store.get(backing_file, b"user.none")
    with pytest.raises(xattrs.XattrError) as too_long:
        store.set(backing_file, b"user." + b"n" * xattrs.MAX_NAME_BYTES, b"")
    with pytest.raises(xattrs.XattrError) as too_big:
        store.set(backing_file, b"user.big", bytes(xattrs.MAX_VALUE_BYTES + 1))

    assert missing.value.errno == errno.ENODATA
    assert too_long.value.errno == errno.ERANGE
    assert too_big.value.errno == errno.E2BIG
    assert len(store.backing_name(b"n" * xattrs.MAX_NAME_BYTES)) <= 255


# --- POSIX ACLs ----------------------------------------------------------------------------------

USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = (
    xattrs.ACL_USER_OBJ, xattrs.ACL_USER, xattrs.ACL_GROUP_OBJ, xattrs.ACL_MASK, xattrs.ACL_OTHER,
)
NO_ID = 0xFFFFFFFF


def test_acl_round_trip():
    entries = [(USER_OBJ, 6, NO_ID), (USER, 4, 1234), (GROUP_OBJ, 4, NO_ID), (MASK, 6, NO_ID), (OTHER, 0, NO_ID)]

    assert xattrs.parse_acl(xattrs.format_acl(entries)) == entries


@pytest.mark.parametrize("value", [b"", b"\x02\x00\x00", b"\x01\x00\x00\x00", b"\x02\x00\x00\x00" + bytes(7)])
def test_acl_malformed(value):
    with pytest.raises(xattrs.XattrError) as info:
        xattrs.parse_acl(value)
    assert info.value.errno == errno.EINVAL


def test_mode_follows_mask():
    entries = [(USER_OBJ, 7, NO_ID), (USER, 7, 99), (GROUP_OBJ, 0, NO_ID), (MASK, 5, NO_ID), (OTHER, 1, NO_ID)]

    assert xattrs.mode_of_acl(entries, 0o104000 | 0o600) == 0o104000 | 0o751
    assert not xattrs.is_minimal_acl(entries)
    assert xattrs.is_minimal_acl([(USER_OBJ, 6, NO_ID), (GROUP_OBJ, 4, NO_ID), (OTHER, 4, NO_ID)])


def test_inherit_limits_by_requested_mode():
    default = [(USER_OBJ, 7, NO_ID), (USER, 7, 99), (GROUP_OBJ, 5, NO_ID), (MASK, 7, NO_ID), (OTHER, 5, NO_ID)]

    entries, mode = xattrs.inherit_acl(default, 0o100640)

    assert entries == [(USER_OBJ, 6, NO_ID), (USER, 7, 99), (GROUP_OBJ, 5, NO_ID), (MASK, 4, NO_ID), (OTHER, 0, NO_ID)]
    assert mode == 0o100640
