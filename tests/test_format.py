"""Tests of the file contents format: header, offset arithmetic, block encryption and tamper detection."""

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from securevol import format as fmt
from securevol.errors import IntegrityError

KEY = bytes(range(32))
FILE_ID = bytes(range(100, 116))
# Plaintext and ciphertext bytes per full block, spelled short so that sizes read as block arithmetic.
B = fmt.BLOCK_SIZE
C = fmt.CIPHER_BLOCK_SIZE
BOUNDARY_SIZES = [0, 1, B - 1, B, B + 1, 2 * B - 1, 2 * B, 2 * B + 1, 10 * B + 17]


def encrypt_file(cipher: fmt.ContentCipher, plaintext: bytes, file_id: bytes = FILE_ID) -> bytes:
    """Return the whole ciphertext file (header and blocks) for *plaintext*."""
    if not plaintext:
        return b""
    return fmt.FileHeader(file_id).to_bytes() + bytes(cipher.encrypt_blocks(file_id, 0, plaintext))


def decrypt_file(cipher: fmt.ContentCipher, ciphertext: bytes) -> bytes:
    """Decrypt a whole ciphertext file, checking its size and header as the FUSE layer does."""
    fmt.plain_size(len(ciphertext))
    if len(ciphertext) == 0:
        return b""
    header = fmt.FileHeader.parse(ciphertext[: fmt.HEADER_LEN])
    return bytes(cipher.decrypt_blocks(header.file_id, 0, ciphertext[fmt.HEADER_LEN :]))


# --- header --------------------------------------------------------------------------------------


def test_header_round_trip():
    header = fmt.FileHeader.new()
    data = header.to_bytes()

    assert len(data) == fmt.HEADER_LEN == 24
    assert data.startswith(b"SVCF\x00\x02\x00\x00")
    assert fmt.FileHeader.parse(data) == header


def test_header_new_ids_differ():
    assert fmt.FileHeader.new().file_id != fmt.FileHeader.new().file_id


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SVCF\x00\x02\x00\x00" + bytes(15), "want 24 bytes, have 23"),
        (b"XVCF\x00\x02\x00\x00" + bytes(16), "bad magic: want 53564346, have 58564346"),
        (b"SVCF\x00\x01\x00\x00" + bytes(16), "unsupported version: want 2, have 1"),
        (b"SVCF\x00\x03\x00\x00" + bytes(16), "unsupported version: want 2, have 3"),
        (b"SVCF\x00\x02\x00\x07" + bytes(16), "reserved field: want 0, have 7"),
    ],
)
def test_header_parse_strict(data, message):
    with pytest.raises(IntegrityError, match=message):
        fmt.FileHeader.parse(data)


def test_header_rejects_bad_file_id_length():
    with pytest.raises(ValueError, match="16 bytes, not 3"):
        fmt.FileHeader(b"abc")


# --- offset arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plain", "cipher"),
    [
        (0, 0),
        (1, 24 + 1 + 32),
        (B - 1, 24 + B - 1 + 32),
        (B, 24 + C),
        (B + 1, 24 + C + 1 + 32),
        (3 * B, 24 + 3 * C),
    ],
)
def test_sizes_known_values(plain, cipher):
    assert fmt.cipher_size(plain) == cipher
    assert fmt.plain_size(cipher) == plain


@given(st.integers(min_value=0, max_value=2**44))
def test_sizes_round_trip(plain):
    assert fmt.plain_size(fmt.cipher_size(plain)) == plain


def test_header_only_file_is_empty():
    assert fmt.plain_size(fmt.HEADER_LEN) == 0


@pytest.mark.parametrize(
    "cipher",
    [1, 23, 24 + 1, 24 + 32, 24 + C + 1, 24 + C + 32, 24 + 5 * C + 32],
)
def test_plain_size_rejects_impossible_lengths(cipher):
    with pytest.raises(IntegrityError, match="ciphertext size is impossible"):
        fmt.plain_size(cipher)


@pytest.mark.parametrize(
    ("cipher", "reported"),
    [(10, 1), (24 + 32, 1), (24 + C + 5, B + 1), (24 + C + 40, B + 8)],
)
def test_readable_plain_size_never_raises(cipher, reported):
    assert fmt.readable_plain_size(cipher) == reported


def test_cipher_size_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        fmt.cipher_size(-1)


@pytest.mark.parametrize(
    ("offset", "length", "blocks"),
    [
        (0, 0, []),
        (0, 1, [0]),
        (0, B, [0]),
        (0, B + 1, [0, 1]),
        (B - 1, 2, [0, 1]),
        (B, B, [1]),
        (B + 5000, 2 * B + 10000, [1, 2, 3]),
        (2 * B, 0, []),
    ],
)
def test_block_range(offset, length, blocks):
    assert list(fmt.block_range(offset, length)) == blocks


def test_block_offset_and_count():
    assert fmt.block_offset(0) == 24
    assert fmt.block_offset(2) == 24 + 2 * C
    assert [fmt.block_count(n) for n in (0, 1, B, B + 1)] == [0, 1, 1, 2]


def test_block_range_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        fmt.block_range(-1, 5)


# --- block encryption ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_round_trip_at_block_boundaries(size):
    cipher = fmt.ContentCipher(KEY)
    plaintext = os.urandom(size)

    ciphertext = encrypt_file(cipher, plaintext)

    assert len(ciphertext) == fmt.cipher_size(size)
    assert decrypt_file(cipher, ciphertext) == plaintext


def test_run_starting_mid_file_round_trip():
    cipher = fmt.ContentCipher(KEY)
    plaintext = os.urandom(2 * B + 100)

    ciphertext = cipher.encrypt_blocks(FILE_ID, 7, plaintext)

    assert cipher.decrypt_blocks(FILE_ID, 7, ciphertext) == plaintext
    with pytest.raises(fmt.BlockIntegrityError) as info:
        cipher.decrypt_blocks(FILE_ID, 6, ciphertext)
    assert info.value.block_no == 6


def test_plaintext_not_in_ciphertext():
    cipher = fmt.ContentCipher(KEY)
    plaintext = b"secret database row " * 1000

    ciphertext = encrypt_file(cipher, plaintext)

    assert b"secret" not in ciphertext


def test_flip_every_byte_detected():
    cipher = fmt.ContentCipher(KEY)
    plaintext = os.urandom(B + 50)
    ciphertext = encrypt_file(cipher, plaintext)

    for position in range(len(ciphertext)):
        damaged = bytearray(ciphertext)
        damaged[position] ^= 0x01
        with pytest.raises(IntegrityError):
            decrypt_file(cipher, bytes(damaged))


def test_swapped_blocks_within_file_detected():
    cipher = fmt.ContentCipher(KEY)
    ciphertext = bytearray(encrypt_file(cipher, os.urandom(3 * B)))
    first = slice(fmt.block_offset(0), fmt.block_offset(1))
    second = slice(fmt.block_offset(1), fmt.block_offset(2))

    ciphertext[first], ciphertext[second] = ciphertext[second], ciphertext[first]

    with pytest.raises(fmt.BlockIntegrityError) as info:
        decrypt_file(cipher, bytes(ciphertext))
    assert info.value.block_no == 0


def test_block_moved_between_files_detected():
    cipher = fmt.ContentCipher(KEY)
    file_a = bytearray(encrypt_file(cipher, os.urandom(2 * B), file_id=b"A" * 16))
    file_b = encrypt_file(cipher, os.urandom(2 * B), file_id=b"B" * 16)
    block_1 = slice(fmt.block_offset(1), fmt.block_offset(2))

    file_a[block_1] = file_b[block_1]

    with pytest.raises(fmt.BlockIntegrityError) as info:
        decrypt_file(cipher, bytes(file_a))
    assert info.value.block_no == 1


def test_swapped_headers_detected():
    cipher = fmt.ContentCipher(KEY)
    file_a = encrypt_file(cipher, os.urandom(100), file_id=b"A" * 16)
    file_b = encrypt_file(cipher, os.urandom(100), file_id=b"B" * 16)

    a_with_b_header = file_b[: fmt.HEADER_LEN] + file_a[fmt.HEADER_LEN :]

    with pytest.raises(fmt.BlockIntegrityError):
        decrypt_file(cipher, a_with_b_header)


def test_truncated_last_block_detected():
    cipher = fmt.ContentCipher(KEY)
    ciphertext = encrypt_file(cipher, os.urandom(B + 500))

    with pytest.raises(IntegrityError):
        decrypt_file(cipher, ciphertext[:-1])
    with pytest.raises(IntegrityError, match="impossible"):
        decrypt_file(cipher, ciphertext[: fmt.block_offset(1) + 20])


def test_decrypt_rejects_run_with_impossible_length():
    cipher = fmt.ContentCipher(KEY)

    with pytest.raises(fmt.BlockIntegrityError) as info:
        cipher.decrypt_blocks(FILE_ID, 4, os.urandom(C + 32))
    assert info.value.block_no == 5


def test_wrong_key_detected():
    ciphertext = encrypt_file(fmt.ContentCipher(KEY), b"data")

    with pytest.raises(fmt.BlockIntegrityError):
        decrypt_file(fmt.ContentCipher(bytes(32)), ciphertext)


def test_zero_blocks_read_as_holes():
    cipher = fmt.ContentCipher(KEY)
    middle = os.urandom(B)
    run = bytes(fmt.CIPHER_BLOCK_SIZE) + bytes(cipher.encrypt_blocks(FILE_ID, 1, middle)) + bytes(40)

    plaintext = cipher.decrypt_blocks(FILE_ID, 0, run)

    assert plaintext == bytes(B) + middle + bytes(8)


def test_zero_nonce_with_data_detected():
    cipher = fmt.ContentCipher(KEY)
    block = bytearray(cipher.encrypt_blocks(FILE_ID, 0, b"x" * B))

    block[: fmt.NONCE_LEN] = bytes(fmt.NONCE_LEN)

    with pytest.raises(fmt.BlockIntegrityError):
        cipher.decrypt_blocks(FILE_ID, 0, bytes(block))


def test_nonces_never_repeat_across_rewrites():
    cipher = fmt.ContentCipher(KEY)
    seen = set()

    for _ in range(2000):
        block = cipher.encrypt_blocks(FILE_ID, 0, b"same plaintext, same block")
        seen.add(bytes(block[: fmt.NONCE_LEN]))

    assert len(seen) == 2000


def test_nonces_differ_between_blocks_of_one_run():
    cipher = fmt.ContentCipher(KEY)
    run = cipher.encrypt_blocks(FILE_ID, 0, bytes(64 * B))

    nonces = {bytes(run[i * C : i * C + 16]) for i in range(64)}

    assert len(nonces) == 64


def test_golden_vector():
    """Pins the format: any change to the header, AAD or block layout breaks this test."""
    cipher = fmt.ContentCipher(KEY, random_bytes=lambda n: bytes([0xAA]) * n)
    plaintext = b"securevol golden vector"

    ciphertext = encrypt_file(cipher, plaintext)

    assert ciphertext.hex() == GOLDEN_CIPHERTEXT_HEX
    assert decrypt_file(cipher, ciphertext) == plaintext


def test_golden_vector_matches_documented_layout():
    """Rebuilds the golden vector with AESGCM directly, from the layout docs/format.md describes."""
    nonce = bytes([0xAA]) * 16
    aad = (2).to_bytes(2, "big") + FILE_ID + (0).to_bytes(8, "big")
    body = AESGCM(KEY).encrypt(nonce, b"securevol golden vector", aad)

    expected = b"SVCF" + (2).to_bytes(2, "big") + bytes(2) + FILE_ID + nonce + body

    assert expected.hex() == GOLDEN_CIPHERTEXT_HEX


def test_repr_hides_key():
    assert repr(fmt.ContentCipher(KEY)) == "ContentCipher(<redacted>)"


# Header "SVCF" 0002 0000 file ID, then nonce 0xAA * 16, the GCM ciphertext and the tag.
GOLDEN_CIPHERTEXT_HEX = (
    "53564346000200006465666768696a6b6c6d6e6f70717273"
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    "59590b5802a49cdf21dd15290bd688e73b30b5117b4015"
    "b32a074e39391573b9a5eea6c26b574e"
)
