"""Tests of names.py: encrypted names, directory IVs, long names and symlink targets.

Everything runs against real directories on the test's tmp_path, through O_PATH directory
descriptors like those of the FUSE layer.
"""

import errno
import logging
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securevol import names
from securevol.crypto import DataKey, derive_volume_keys
from securevol.errors import IntegrityError, InvalidName

BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# Maximum length of a plaintext name whose encrypted name still fits in one backing name:
# 175 + 16 bytes of SIV tag encode to exactly 255 base64url characters.
MAX_SHORT_NAME = 175
# Maximum length of a symlink target whose encoded ciphertext fits in a backing symlink.
MAX_SHORT_TARGET = 3039


@pytest.fixture
def cipher() -> names.NameCipher:
    keys = derive_volume_keys(DataKey(bytes(range(32))), bytes(16))
    return names.NameCipher(keys.name_key)


@pytest.fixture
def other_cipher() -> names.NameCipher:
    keys = derive_volume_keys(DataKey(bytes(range(32))), b"\x01" * 16)
    return names.NameCipher(keys.name_key)


def open_dir(path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY)


@pytest.fixture
def backing_dir(tmp_path):
    """An O_PATH descriptor of a backing directory with an IV, its path and its IV."""
    path = tmp_path / "dir"
    path.mkdir()
    dir_fd = open_dir(path)
    dir_iv = names.write_dir_iv(dir_fd)
    yield dir_fd, path, dir_iv
    os.close(dir_fd)


def create_entry(cipher, dir_fd, path, plain, dir_iv) -> names.BackingName:
    """Create an empty file named *plain* the way the FUSE layer does."""
    backing = cipher.backing_name_for(plain, dir_iv)
    if backing.is_long:
        names.write_side_record(dir_fd, backing)
    (path / backing.name).touch()
    return backing


def stored_bytes(link_path) -> bytes:
    """Return what the backing store keeps for a symlink of either form."""
    if link_path.is_symlink():
        return os.readlink(link_path).encode()
    return link_path.read_bytes()


def replace_char(text: str, index: int, char: str) -> str:
    return text[:index] + char + text[index + 1 :]


# Round trips


@pytest.mark.parametrize(
    "plain",
    [
        b"a",
        b"README.md",
        "Grüße, 世界 🌍.txt".encode(),
        b"\xff\xfe not UTF-8 \x80",
        b"x" * MAX_SHORT_NAME,
        b"x" * (MAX_SHORT_NAME + 1),
        b"y" * 254,
        b"z" * 255,
        "é".encode() * 127,
    ],
    ids=["one-byte", "ascii", "utf8", "not-utf8", "max-short", "first-long", "254", "255", "utf8-254"],
)
def test_name_round_trip(cipher, plain):
    dir_iv = names.new_dir_iv()

    cipher_name = cipher.encrypt_name(plain, dir_iv)

    assert cipher.decrypt_name(cipher_name, dir_iv) == plain


@settings(max_examples=300, deadline=None)
@given(plain=st.binary(min_size=1, max_size=255).filter(lambda b: b not in (b".", b"..")))
def test_name_round_trip_any_bytes(plain):
    plain = plain.replace(b"/", b"_").replace(b"\0", b"_")
    cipher = names.NameCipher(bytes(64))
    dir_iv = bytes(16)

    backing = cipher.backing_name_for(plain, dir_iv)

    assert cipher.decrypt_name(backing.cipher_name, dir_iv) == plain
    assert len(backing.name.encode()) <= names.MAX_NAME_BYTES
    assert set(backing.cipher_name) <= set(BASE64URL)
    assert not names.is_reserved(backing.cipher_name)
    assert backing.is_long == (len(plain) > MAX_SHORT_NAME)


def test_long_name_threshold(cipher):
    dir_iv = names.new_dir_iv()

    short = cipher.backing_name_for(b"x" * MAX_SHORT_NAME, dir_iv)
    long = cipher.backing_name_for(b"x" * (MAX_SHORT_NAME + 1), dir_iv)

    assert not short.is_long
    assert len(short.name) == 255
    assert long.is_long
    assert len(long.cipher_name) == 256
    assert long.name.startswith(names.LONG_NAME_PREFIX)
    assert len(long.name + names.SIDE_RECORD_SUFFIX) <= names.MAX_NAME_BYTES


def test_name_is_deterministic_per_directory(cipher):
    dir_iv = names.new_dir_iv()

    assert cipher.encrypt_name(b"data.db", dir_iv) == cipher.encrypt_name(b"data.db", dir_iv)
    assert cipher.encrypt_name(b"data.db", dir_iv) != cipher.encrypt_name(b"data.dc", dir_iv)


def test_format_is_stable():
    # Pinned outputs: a change here means that existing volumes no longer read.
    cipher = names.NameCipher(bytes(range(64)))
    sealed_target = bytes.fromhex(
        "d606adb3b9489af4d9e34621f4da6e56a455bb763a90dd39955f0a0b386a416ffb58bfebcceb225a19fd6f7e7a"
    )

    assert cipher.encrypt_name(b"hello", bytes(16)) == "trCJK_6euYeAOuXc29J5yyQRBbW3"
    assert (
        cipher.backing_name_for(b"h" * 200, bytes(16)).name
        == "securevol.long.NLwDTRFgRCpOWh44ixzbntrZFIhIdB7cwClMBqQN6dA"
    )
    assert cipher.decrypt_symlink_target(sealed_target) == b"/etc/hostname"


# Directory separation and wrong keys


def test_backing_name_cache_bounded_consistent(cipher):
    fresh = names.NameCipher(derive_volume_keys(DataKey(bytes(range(32))), bytes(16)).name_key)
    iv_a, iv_b = b"a" * names.DIR_IV_LEN, b"b" * names.DIR_IV_LEN
    count = names.BACKING_NAME_CACHE_SIZE + 10

    for i in range(count):
        plain = b"file-%d" % i
        assert cipher.backing_name_for(plain, iv_a) == cipher.backing_name_for(plain, iv_a)
        assert cipher.backing_name_for(plain, iv_b) != cipher.backing_name_for(plain, iv_a)
        assert len(cipher._backing_names) <= names.BACKING_NAME_CACHE_SIZE

    for i in (0, count // 2, count - 1):
        plain = b"file-%d" % i
        assert cipher.backing_name_for(plain, iv_a) == fresh.backing_name_for(plain, iv_a)
    with pytest.raises(InvalidName):
        cipher.backing_name_for(b"a/b", iv_a)


def test_equal_names_differ_across_directories(cipher):
    first_iv, second_iv = names.new_dir_iv(), names.new_dir_iv()

    first = cipher.encrypt_name(b"id_rsa", first_iv)
    second = cipher.encrypt_name(b"id_rsa", second_iv)

    assert first != second


def test_wrong_dir_iv_detected(cipher):
    cipher_name = cipher.encrypt_name(b"id_rsa", names.new_dir_iv())

    with pytest.raises(IntegrityError, match="failed authentication"):
        cipher.decrypt_name(cipher_name, names.new_dir_iv())


def test_other_volume_key_detected(cipher, other_cipher):
    dir_iv = names.new_dir_iv()
    cipher_name = cipher.encrypt_name(b"id_rsa", dir_iv)

    with pytest.raises(IntegrityError):
        other_cipher.decrypt_name(cipher_name, dir_iv)


def test_name_key_length_checked():
    with pytest.raises(ValueError, match="64 bytes"):
        names.NameCipher(bytes(32))


# Tampering


def test_tamper_every_character_detected(cipher):
    dir_iv = names.new_dir_iv()
    cipher_name = cipher.encrypt_name(b"secret-plan.txt", dir_iv)

    for index, original in enumerate(cipher_name):
        for char in BASE64URL:
            if char == original:
                continue
            tampered = replace_char(cipher_name, index, char)
            with pytest.raises(IntegrityError):
                cipher.decrypt_name(tampered, dir_iv)


def test_tamper_every_byte_of_long_name_detected(cipher):
    dir_iv = names.new_dir_iv()
    cipher_name = cipher.encrypt_name(b"L" * 200, dir_iv)

    for index, original in enumerate(cipher_name):
        char = "A" if original != "A" else "B"
        with pytest.raises(IntegrityError):
            cipher.decrypt_name(replace_char(cipher_name, index, char), dir_iv)


@pytest.mark.parametrize(
    "edit",
    [
        lambda name: name[:-1],
        lambda name: name + "A",
        lambda name: name[:20],
        lambda name: name + "==",
        lambda name: name.replace(name[3], "+", 1),
        lambda name: name.replace(name[3], ".", 1),
        lambda name: "",
        lambda name: "AAAA",
    ],
    ids=["drop-last", "append", "truncate", "padding", "plus", "dot", "empty", "too-short"],
)
def test_malformed_cipher_name_detected(cipher, edit):
    dir_iv = names.new_dir_iv()
    cipher_name = cipher.encrypt_name(b"secret-plan.txt", dir_iv)

    with pytest.raises(IntegrityError):
        cipher.decrypt_name(edit(cipher_name), dir_iv)


def test_integrity_error_names_ciphertext_only(cipher):
    dir_iv = names.new_dir_iv()
    cipher_name = cipher.encrypt_name(b"secret-plan.txt", dir_iv)

    with pytest.raises(IntegrityError) as caught:
        cipher.decrypt_name(cipher_name, names.new_dir_iv())

    assert cipher_name in str(caught.value)
    assert "secret-plan" not in str(caught.value)


# Hostile plaintext names


@pytest.mark.parametrize(
    ("plain", "expected_errno"),
    [
        (b"", errno.EINVAL),
        (b".", errno.EINVAL),
        (b"..", errno.EINVAL),
        (b"etc/passwd", errno.EINVAL),
        (b"/", errno.EINVAL),
        (b"name\0hidden", errno.EINVAL),
        (b"a" * 256, errno.ENAMETOOLONG),
        ("é".encode() * 128, errno.ENAMETOOLONG),
    ],
    ids=["empty", "dot", "dotdot", "slash", "only-slash", "nul", "256-bytes", "utf8-256-bytes"],
)
def test_hostile_name_rejected(cipher, plain, expected_errno):
    with pytest.raises(InvalidName) as caught:
        cipher.encrypt_name(plain, names.new_dir_iv())

    assert caught.value.errno == expected_errno
    assert "file name" in str(caught.value)
    if len(plain) > 2:
        assert plain.decode(errors="replace") not in str(caught.value)


def test_name_of_type_str_rejected(cipher):
    with pytest.raises(TypeError, match="bytes"):
        cipher.encrypt_name("text", names.new_dir_iv())


def test_dir_iv_length_checked(cipher):
    with pytest.raises(ValueError, match="16 bytes"):
        cipher.encrypt_name(b"a", bytes(15))


@pytest.mark.parametrize(
    "plain",
    [b"securevol.diriv", b"securevol.long.x", b"securevol.tmp.0", b"securevol.long.x.name"],
)
def test_plaintext_never_maps_to_reserved_name(cipher, backing_dir, plain):
    dir_fd, path, dir_iv = backing_dir

    backing = create_entry(cipher, dir_fd, path, plain, dir_iv)

    assert not names.is_reserved(backing.name)
    assert (path / names.DIR_IV_NAME).read_bytes() == dir_iv
    assert [entry.plain_name for entry in cipher.list_dir(dir_fd, dir_iv)] == [plain]


# Directory IVs


def test_dir_iv_round_trip(backing_dir):
    dir_fd, path, dir_iv = backing_dir

    assert names.read_dir_iv(dir_fd) == dir_iv
    assert len(dir_iv) == names.DIR_IV_LEN
    assert stat.S_IMODE((path / names.DIR_IV_NAME).stat().st_mode) == 0o400
    assert os.listdir(path) == [names.DIR_IV_NAME]


def test_dir_iv_is_random():
    assert names.new_dir_iv() != names.new_dir_iv()


def test_dir_iv_never_replaced(backing_dir):
    dir_fd, _, dir_iv = backing_dir

    with pytest.raises(FileExistsError):
        names.write_dir_iv(dir_fd)

    assert names.read_dir_iv(dir_fd) == dir_iv


@pytest.mark.parametrize("content", [b"", bytes(15), bytes(17), bytes(4096)], ids=["0", "15", "17", "4096"])
def test_dir_iv_wrong_length_detected(tmp_path, content):
    (tmp_path / names.DIR_IV_NAME).write_bytes(content)
    dir_fd = open_dir(tmp_path)
    try:
        with pytest.raises(IntegrityError, match="wrong length"):
            names.read_dir_iv(dir_fd)
    finally:
        os.close(dir_fd)


def test_dir_iv_missing_detected(tmp_path):
    dir_fd = open_dir(tmp_path)
    try:
        with pytest.raises(IntegrityError, match="no securevol.diriv"):
            names.read_dir_iv(dir_fd)
    finally:
        os.close(dir_fd)


def test_make_dir_writes_iv(cipher, backing_dir):
    dir_fd, path, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"subdir", dir_iv)

    child_iv = names.make_dir(dir_fd, backing.name)

    child_fd = open_dir(path / backing.name)
    try:
        assert names.read_dir_iv(child_fd) == child_iv
    finally:
        os.close(child_fd)
    assert child_iv != dir_iv
    with pytest.raises(FileExistsError):
        names.make_dir(dir_fd, backing.name)


def test_remove_dir_removes_reserved_files(cipher, backing_dir):
    dir_fd, path, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"subdir", dir_iv)
    names.make_dir(dir_fd, backing.name)
    (path / backing.name / (names.TEMP_PREFIX + "leftover")).touch()

    names.remove_dir(dir_fd, backing.name)

    assert not (path / backing.name).exists()


@pytest.mark.parametrize("child", [b"file", b"f" * 200], ids=["short", "long"])
def test_remove_dir_rejects_non_empty(cipher, backing_dir, child):
    dir_fd, path, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"subdir", dir_iv)
    child_iv = names.make_dir(dir_fd, backing.name)
    child_fd = open_dir(path / backing.name)
    create_entry(cipher, child_fd, path / backing.name, child, child_iv)

    with pytest.raises(OSError) as caught:
        names.remove_dir(dir_fd, backing.name)

    assert caught.value.errno == errno.ENOTEMPTY
    assert names.read_dir_iv(child_fd) == child_iv
    assert [entry.plain_name for entry in cipher.list_dir(child_fd, child_iv)] == [child]
    os.close(child_fd)


# Long names and side records


def test_list_dir_maps_short_and_long_names(cipher, backing_dir):
    dir_fd, path, dir_iv = backing_dir
    plains = [b"a", b"x" * MAX_SHORT_NAME, b"x" * (MAX_SHORT_NAME + 1), b"z" * 255]
    for plain in plains:
        create_entry(cipher, dir_fd, path, plain, dir_iv)
    (path / (names.TEMP_PREFIX + "leftover")).touch()

    entries = cipher.list_dir(dir_fd, dir_iv)

    assert sorted(entry.plain_name for entry in entries) == sorted(plains)
    for entry in entries:
        assert entry.backing_name == cipher.backing_name_for(entry.plain_name, dir_iv).name


def test_side_record_content(cipher, backing_dir):
    dir_fd, path, dir_iv = backing_dir

    backing = create_entry(cipher, dir_fd, path, b"q" * 250, dir_iv)

    record = path / (backing.name + names.SIDE_RECORD_SUFFIX)
    assert record.read_bytes() == backing.cipher_name.encode()
    assert names.read_side_record(dir_fd, backing.name) == backing.cipher_name
    assert cipher.plain_name_for(dir_fd, backing.name, dir_iv) == b"q" * 250


def test_side_record_only_for_long_names(cipher):
    backing = cipher.backing_name_for(b"short", names.new_dir_iv())

    with pytest.raises(ValueError, match="long name"):
        names.write_side_record(-1, backing)


def test_swapped_side_records_detected(cipher, backing_dir, caplog):
    dir_fd, path, dir_iv = backing_dir
    first = create_entry(cipher, dir_fd, path, b"1" * 200, dir_iv)
    second = create_entry(cipher, dir_fd, path, b"2" * 200, dir_iv)
    first_record = path / (first.name + names.SIDE_RECORD_SUFFIX)
    second_record = path / (second.name + names.SIDE_RECORD_SUFFIX)
    first_content, second_content = first_record.read_bytes(), second_record.read_bytes()
    first_record.write_bytes(second_content)
    second_record.write_bytes(first_content)

    with pytest.raises(IntegrityError, match="does not match"):
        cipher.plain_name_for(dir_fd, first.name, dir_iv)
    with caplog.at_level(logging.ERROR, logger="securevol.names"):
        assert cipher.list_dir(dir_fd, dir_iv) == []
    assert len(caplog.records) == 2
    assert "1" * 20 not in caplog.text


def test_side_record_from_other_directory_detected(cipher, backing_dir, tmp_path):
    dir_fd, path, dir_iv = backing_dir
    backing = create_entry(cipher, dir_fd, path, b"m" * 200, dir_iv)
    other_path = tmp_path / "other"
    other_path.mkdir()
    other_fd = open_dir(other_path)
    other_iv = names.write_dir_iv(other_fd)
    for name in (backing.name, backing.name + names.SIDE_RECORD_SUFFIX):
        os.rename(path / name, other_path / name)

    with pytest.raises(IntegrityError, match="failed authentication"):
        cipher.plain_name_for(other_fd, backing.name, other_iv)
    os.close(other_fd)


def test_tampered_side_record_detected(cipher, backing_dir):
    dir_fd, path, dir_iv = backing_dir
    backing = create_entry(cipher, dir_fd, path, b"t" * 200, dir_iv)
    record = path / (backing.name + names.SIDE_RECORD_SUFFIX)
    content = record.read_bytes()

    for index in range(len(content)):
        record.write_bytes(content[:index] + bytes([content[index] ^ 0x01]) + content[index + 1 :])
        with pytest.raises(IntegrityError):
            cipher.plain_name_for(dir_fd, backing.name, dir_iv)


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff" * 300, b"A" * 5000],
    ids=["empty", "not-ascii", "oversize"],
)
def test_malformed_side_record_detected(cipher, backing_dir, content):
    dir_fd, path, dir_iv = backing_dir
    backing = create_entry(cipher, dir_fd, path, b"t" * 200, dir_iv)
    (path / (backing.name + names.SIDE_RECORD_SUFFIX)).write_bytes(content)

    with pytest.raises(IntegrityError):
        cipher.plain_name_for(dir_fd, backing.name, dir_iv)


def test_missing_side_record_detected(cipher, backing_dir):
    dir_fd, path, dir_iv = backing_dir
    backing = create_entry(cipher, dir_fd, path, b"t" * 200, dir_iv)

    names.remove_side_record(dir_fd, backing.name)
    names.remove_side_record(dir_fd, backing.name)

    with pytest.raises(IntegrityError, match="no side record"):
        cipher.plain_name_for(dir_fd, backing.name, dir_iv)


def test_short_name_under_long_name_detected(cipher, backing_dir):
    # A forged long entry that contains a valid short encrypted name would list one name twice.
    dir_fd, path, dir_iv = backing_dir
    short = create_entry(cipher, dir_fd, path, b"short", dir_iv)
    forged = names.BackingName(names._long_name_for(short.cipher_name), short.cipher_name)
    (path / (forged.name + names.SIDE_RECORD_SUFFIX)).write_text(short.cipher_name)
    (path / forged.name).touch()

    with pytest.raises(IntegrityError, match="short name"):
        cipher.plain_name_for(dir_fd, forged.name, dir_iv)
    assert [entry.plain_name for entry in cipher.list_dir(dir_fd, dir_iv)] == [b"short"]


def test_list_dir_skips_foreign_entries(cipher, backing_dir, caplog):
    dir_fd, path, dir_iv = backing_dir
    create_entry(cipher, dir_fd, path, b"kept", dir_iv)
    (path / "plain.txt").touch()
    (path / (names.LONG_NAME_PREFIX + "é")).touch()
    (path / "securevol.other").touch()

    with caplog.at_level(logging.ERROR, logger="securevol.names"):
        entries = cipher.list_dir(dir_fd, dir_iv)

    assert [entry.plain_name for entry in entries] == [b"kept"]
    assert "backing='plain.txt'" in caplog.text
    assert len(caplog.records) == 2


def test_plain_name_for_reserved_rejected(cipher, backing_dir):
    dir_fd, _, dir_iv = backing_dir

    with pytest.raises(IntegrityError, match="reserved"):
        cipher.plain_name_for(dir_fd, names.DIR_IV_NAME, dir_iv)


# Symlink targets


@pytest.mark.parametrize(
    "target",
    [b"/", b"../x", b"t" * MAX_SHORT_TARGET, b"t" * (MAX_SHORT_TARGET + 1), b"t" * 4095],
    ids=["1", "relative", "max-short", "first-long", "4095"],
)
def test_symlink_target_round_trip(cipher, target):
    sealed = cipher.encrypt_symlink_target(target)

    assert cipher.decrypt_symlink_target(sealed) == target
    assert len(sealed) == len(target) + 32


def test_symlink_target_is_randomised(cipher):
    assert cipher.encrypt_symlink_target(b"/etc") != cipher.encrypt_symlink_target(b"/etc")


@pytest.mark.parametrize(
    ("target", "expected_form"),
    [
        (b"/", stat.S_IFLNK),
        (b"t" * MAX_SHORT_TARGET, stat.S_IFLNK),
        (b"t" * (MAX_SHORT_TARGET + 1), stat.S_IFREG),
        ("→".encode() * 1365, stat.S_IFREG),
    ],
    ids=["1", "max-short", "first-long", "utf8-4095"],
)
def test_symlink_stored_and_read(cipher, backing_dir, target, expected_form):
    dir_fd, path, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"link", dir_iv)

    cipher.write_symlink(dir_fd, backing.name, target)

    st_link = os.lstat(path / backing.name)
    assert stat.S_IFMT(st_link.st_mode) == expected_form
    assert names.is_symlink(st_link)
    assert names.symlink_size(st_link) == len(target)
    assert cipher.read_symlink(dir_fd, backing.name) == target
    assert target not in stored_bytes(path / backing.name)
    assert sorted(os.listdir(path)) == sorted([names.DIR_IV_NAME, backing.name])


def test_long_symlink_mode(cipher, backing_dir):
    dir_fd, path, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"link", dir_iv)

    cipher.write_symlink(dir_fd, backing.name, b"t" * 4095)

    assert stat.S_IMODE(os.lstat(path / backing.name).st_mode) == 0o1600


def test_regular_file_is_not_symlink(backing_dir):
    _, path, _ = backing_dir
    (path / "file").write_bytes(b"data")

    assert not names.is_symlink(os.lstat(path / "file"))


@pytest.mark.parametrize("target", [b"/", b"t" * 4095], ids=["short", "long"])
def test_symlink_never_replaces_entry(cipher, backing_dir, target):
    dir_fd, path, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"taken", dir_iv)
    (path / backing.name).write_bytes(b"keep")

    with pytest.raises(FileExistsError):
        cipher.write_symlink(dir_fd, backing.name, target)

    assert (path / backing.name).read_bytes() == b"keep"
    assert sorted(os.listdir(path)) == sorted([names.DIR_IV_NAME, backing.name])


def test_tamper_every_byte_of_symlink_target_detected(cipher):
    sealed = cipher.encrypt_symlink_target(b"/var/lib/secret")

    for index in range(len(sealed)):
        tampered = sealed[:index] + bytes([sealed[index] ^ 0x80]) + sealed[index + 1 :]
        with pytest.raises(IntegrityError):
            cipher.decrypt_symlink_target(tampered)


def test_truncated_symlink_target_detected(cipher):
    sealed = cipher.encrypt_symlink_target(b"/var/lib/secret")

    for length in (0, 16, 32, len(sealed) - 1):
        with pytest.raises(IntegrityError):
            cipher.decrypt_symlink_target(sealed[:length])


def test_symlink_target_from_other_volume_detected(cipher, other_cipher):
    sealed = cipher.encrypt_symlink_target(b"/var/lib/secret")

    with pytest.raises(IntegrityError):
        other_cipher.decrypt_symlink_target(sealed)


def test_symlink_target_is_not_a_name(cipher):
    # Separate associated data keeps a symlink target from passing as a name and back.
    dir_iv = bytes(16)
    cipher_name = cipher.encrypt_name(b"name", dir_iv)

    with pytest.raises(IntegrityError):
        cipher.decrypt_symlink_target(dir_iv + names.decode_base64url(cipher_name))


@pytest.mark.parametrize("target", [b"/", b"t" * 4095], ids=["short", "long"])
def test_tampered_backing_symlink_detected(cipher, backing_dir, target):
    dir_fd, path, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"link", dir_iv)
    cipher.write_symlink(dir_fd, backing.name, target)
    link = path / backing.name

    if stat.S_ISLNK(os.lstat(link).st_mode):
        encoded = os.readlink(link)
        link.unlink()
        os.symlink(replace_char(encoded, 5, "A" if encoded[5] != "A" else "B"), link)
    else:
        content = bytearray(link.read_bytes())
        content[40] ^= 0x01
        link.write_bytes(bytes(content))

    with pytest.raises(IntegrityError, match="failed authentication"):
        cipher.read_symlink(dir_fd, backing.name)


def test_read_symlink_of_regular_file_rejected(cipher, backing_dir):
    dir_fd, path, _ = backing_dir
    (path / "file").write_bytes(b"data")

    with pytest.raises(IntegrityError, match="not a symlink"):
        cipher.read_symlink(dir_fd, "file")


@pytest.mark.parametrize(
    ("target", "expected_errno"),
    [(b"", errno.ENOENT), (b"a\0b", errno.EINVAL), (b"t" * 4096, errno.ENAMETOOLONG)],
    ids=["empty", "nul", "4096"],
)
def test_hostile_symlink_target_rejected(cipher, target, expected_errno):
    with pytest.raises(InvalidName) as caught:
        cipher.encrypt_symlink_target(target)

    assert caught.value.errno == expected_errno
    assert "symlink target" in str(caught.value)


def test_repr_hides_key(cipher):
    assert repr(cipher) == "NameCipher(<redacted>)"


@pytest.mark.parametrize("target", [b"/", b"t" * MAX_SHORT_TARGET, b"t" * 4095], ids=["1", "max-short", "4095"])
def test_read_symlink_fd_both_forms(cipher, backing_dir, target):
    dir_fd, _, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"link", dir_iv)
    cipher.write_symlink(dir_fd, backing.name, target)

    link_fd = os.open(backing.name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        assert cipher.read_symlink_fd(link_fd) == target
    finally:
        os.close(link_fd)


@pytest.mark.parametrize("target", [b"/", b"t" * 4095], ids=["short", "long"])
def test_read_symlink_fd_detects_tamper(cipher, other_cipher, backing_dir, target):
    dir_fd, _, dir_iv = backing_dir
    backing = cipher.backing_name_for(b"link", dir_iv)
    cipher.write_symlink(dir_fd, backing.name, target)

    link_fd = os.open(backing.name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        with pytest.raises(IntegrityError, match="failed authentication"):
            other_cipher.read_symlink_fd(link_fd)
    finally:
        os.close(link_fd)


def test_read_symlink_fd_of_regular_file_rejected(cipher, backing_dir):
    _, path, _ = backing_dir
    (path / "file").write_bytes(b"data")

    file_fd = os.open(path / "file", os.O_PATH | os.O_NOFOLLOW)
    try:
        with pytest.raises(IntegrityError, match="not a symlink"):
            cipher.read_symlink_fd(file_fd)
    finally:
        os.close(file_fd)
