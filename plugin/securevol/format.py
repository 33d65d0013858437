"""On-disk format of file contents: file header, blocks, offset arithmetic, block encryption.

A regular file's ciphertext in the backing store is either empty (an empty
plaintext file) or a file header followed by ciphertext blocks::

    file header   magic "SVCF" | version u16 | reserved u16 = 0 | file ID (16 random bytes)
    block 0       nonce (16) | AES-256-GCM ciphertext of up to 32768 plaintext bytes | tag (16)
    block 1       ...

Every block but the last holds exactly BLOCK_SIZE plaintext bytes, so the
plaintext size follows from the ciphertext size alone. Each block's associated
data binds it to its place: format version, file ID and block number. A block
moved to another offset or another file, or left over from another file ID,
fails authentication.

A ciphertext block of all zero bytes (nonce, body and tag) reads as zero
plaintext. Such blocks appear when a file grows through a hole (ftruncate or a
write past the end), because the backing filesystem fills the gap with zeros.
The trade-off, the same as gocryptfs makes: someone who can write the backing
store can zero a whole aligned block, and it reads as zeros rather than as an error.
docs/format.md describes the format and its limits in full.
"""

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securevol.errors import IntegrityError

MAGIC = b"SVCF"
FORMAT_VERSION = 2
FILE_ID_LEN = 16
_HEADER_STRUCT = struct.Struct(">4sHH16s")
HEADER_LEN = _HEADER_STRUCT.size  # 24

# 32 KiB: the per-block cost of a cipher call and the Python around it, not
# AES itself, bounded sequential reads with 4 KiB blocks (docs/format.md, "Blocks").
BLOCK_SIZE = 32768
# 128-bit random nonces, as gocryptfs uses. Random 96-bit nonces collide with
# probability about q**2 / 2**97 after q block writes, 2**-32 at 128 TiB written,
# which a busy database volume can reach. A 128-bit nonce is hashed by GHASH
# into the initial counter; docs/format.md ("Nonces") gives the estimate.
NONCE_LEN = 16
TAG_LEN = 16
BLOCK_OVERHEAD = NONCE_LEN + TAG_LEN
CIPHER_BLOCK_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD

_AAD_STRUCT = struct.Struct(">H16sQ")
_ZERO_NONCE = bytes(NONCE_LEN)
_ZERO_CIPHER_BLOCK = bytes(CIPHER_BLOCK_SIZE)


class BlockIntegrityError(IntegrityError):
    """A ciphertext block failed authentication; ``block_no`` names it."""

    def __init__(self, block_no: int) -> None:
        super().__init__(f"ciphertext block {block_no} failed authentication")
        self.block_no = block_no


# --- file header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileHeader:
    """The header at the start of every non-empty ciphertext file."""

    file_id: bytes

    def __post_init__(self) -> None:
        if len(self.file_id) != FILE_ID_LEN:
            raise ValueError(f"a file ID has {FILE_ID_LEN} bytes, not {len(self.file_id)}")

    @classmethod
    def new(cls, random_bytes: Callable[[int], bytes] = os.urandom) -> "FileHeader":
        """Return a header with a fresh random file ID."""
        return cls(random_bytes(FILE_ID_LEN))

    def to_bytes(self) -> bytes:
        return _HEADER_STRUCT.pack(MAGIC, FORMAT_VERSION, 0, self.file_id)

    @classmethod
    def parse(cls, data: bytes) -> "FileHeader":
        """Parse the first HEADER_LEN bytes of a ciphertext file.

        Raises IntegrityError naming the wrong field with the expected and the
        found value. The file ID is random, so only the blocks can check it.
        """
        if len(data) < HEADER_LEN:
            raise IntegrityError(f"file header too short: want {HEADER_LEN} bytes, have {len(data)}")

        magic, version, reserved, file_id = _HEADER_STRUCT.unpack_from(data)
        if magic != MAGIC:
            raise IntegrityError(f"file header has a bad magic: want {MAGIC.hex()}, have {magic.hex()}")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"file header has an unsupported version: want {FORMAT_VERSION}, have {version}")
        if reserved != 0:
            raise IntegrityError(f"file header has a bad reserved field: want 0, have {reserved}")
        return cls(file_id)


# --- offset arithmetic ---------------------------------------------------------------------------


def cipher_size(plain_size: int) -> int:
    """Return the ciphertext file size that stores *plain_size* plaintext bytes."""
    if plain_size < 0:
        raise ValueError(f"a size cannot be negative: {plain_size}")
    if plain_size == 0:
        return 0
    return HEADER_LEN + cipher_run_size(plain_size)


def cipher_run_size(plain_len: int) -> int:
    """Return the ciphertext length of *plain_len* plaintext bytes that start at a block boundary."""
    full_blocks, remainder = divmod(plain_len, BLOCK_SIZE)
    size = full_blocks * CIPHER_BLOCK_SIZE
    if remainder:
        size += remainder + BLOCK_OVERHEAD
    return size


def plain_size(cipher_size: int) -> int:
    """Return the plaintext size stored in a ciphertext file of *cipher_size* bytes.

    Raises IntegrityError for a size no writer produces: a partial header, or a
    last block too short to hold a nonce, a tag and at least one plaintext byte.
    A file that holds only a header (a write interrupted after the header) is
    empty.
    """
    if cipher_size == 0:
        return 0
    if cipher_size < HEADER_LEN:
        raise IntegrityError(
            f"ciphertext size is impossible: want 0 or at least {HEADER_LEN} bytes, have {cipher_size}"
        )

    full_blocks, remainder = divmod(cipher_size - HEADER_LEN, CIPHER_BLOCK_SIZE)
    if remainder == 0:
        return full_blocks * BLOCK_SIZE
    if remainder <= BLOCK_OVERHEAD:
        raise IntegrityError(
            f"ciphertext size is impossible: last block want more than {BLOCK_OVERHEAD} bytes, "
            f"have {remainder}"
        )
    return full_blocks * BLOCK_SIZE + remainder - BLOCK_OVERHEAD


def readable_plain_size(cipher_size: int) -> int:
    """Return the plaintext size to report for a ciphertext file, even a damaged one.

    Unlike plain_size() this never raises, so that the file can be listed,
    renamed and removed. A partial header, or a last block too short to be
    valid, counts as one plaintext byte: readers then ask for it and get EIO.
    Left out of the size, the damage would read as a shorter, valid file.
    """
    try:
        return plain_size(cipher_size)
    except IntegrityError:
        return intact_plain_size(cipher_size) + 1


def intact_plain_size(cipher_size: int) -> int:
    """Return the plaintext size of the whole blocks of a ciphertext file; 0 for a partial header."""
    if cipher_size < HEADER_LEN:
        return 0
    return (cipher_size - HEADER_LEN) // CIPHER_BLOCK_SIZE * BLOCK_SIZE


def block_offset(block_no: int) -> int:
    """Return the ciphertext file offset at which block *block_no* starts."""
    return HEADER_LEN + block_no * CIPHER_BLOCK_SIZE


def block_range(offset: int, length: int) -> range:
    """Return the numbers of the blocks that plaintext bytes [offset, offset + length) touch."""
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length cannot be negative: offset={offset} length={length}")
    if length == 0:
        return range(offset // BLOCK_SIZE, offset // BLOCK_SIZE)
    return range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1)


def block_count(plain_size: int) -> int:
    """Return how many blocks a file of *plain_size* plaintext bytes has, the partial one included."""
    return -(-plain_size // BLOCK_SIZE)


# --- block encryption ----------------------------------------------------------------------------


class ContentCipher:
    """Encrypts and decrypts runs of consecutive blocks of one file with the volume's content key.

    *random_bytes* supplies the nonces; tests inject a fixed source to pin
    golden vectors, and nothing else should.
    """

    def __init__(self, content_key: bytes, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        if len(content_key) != 32:
            raise ValueError(f"a content key has 32 bytes, not {len(content_key)}")
        self._aead = AESGCM(content_key)
        self._random_bytes = random_bytes

    def __repr__(self) -> str:
        return "ContentCipher(<redacted>)"

    def encrypt_blocks(self, file_id: bytes, first_block: int, plaintext: bytes | bytearray) -> bytearray:
        """Encrypt *plaintext*, which starts at block *first_block*, into consecutive ciphertext blocks.

        Every block but the last must be full; the caller passes whole blocks
        except at the end of the file. Each block gets a fresh random nonce.
        """
        plain_len = len(plaintext)
        out = bytearray(cipher_run_size(plain_len))
        out_view = memoryview(out)
        plain_view = memoryview(plaintext)
        n_blocks = block_count(plain_len)
        nonces = self._random_bytes(NONCE_LEN * n_blocks)

        for i in range(n_blocks):
            p_start = i * BLOCK_SIZE
            p_block = plain_view[p_start : p_start + BLOCK_SIZE]
            c_start = i * CIPHER_BLOCK_SIZE
            c_end = c_start + NONCE_LEN + len(p_block) + TAG_LEN
            nonce = nonces[i * NONCE_LEN : (i + 1) * NONCE_LEN]

            out_view[c_start : c_start + NONCE_LEN] = nonce
            aad = _AAD_STRUCT.pack(FORMAT_VERSION, file_id, first_block + i)
            self._aead.encrypt_into(nonce, p_block, aad, out_view[c_start + NONCE_LEN : c_end])
        return out

    def decrypt_blocks(self, file_id: bytes, first_block: int, ciphertext: bytes | bytearray) -> bytearray:
        """Decrypt consecutive ciphertext blocks that start at block *first_block*.

        Raises BlockIntegrityError for the first block that fails
        authentication, and for a run whose length no writer produces. An
        all-zero block is a hole and decrypts to zeros.
        """
        cipher_len = len(ciphertext)
        full_blocks, remainder = divmod(cipher_len, CIPHER_BLOCK_SIZE)
        if 0 < remainder <= BLOCK_OVERHEAD:
            raise BlockIntegrityError(first_block + full_blocks)

        plain_len = full_blocks * BLOCK_SIZE + (remainder - BLOCK_OVERHEAD if remainder else 0)
        out = bytearray(plain_len)
        out_view = memoryview(out)
        cipher_view = memoryview(ciphertext)

        for i in range(block_count(plain_len)):
            c_start = i * CIPHER_BLOCK_SIZE
            c_block = cipher_view[c_start : c_start + CIPHER_BLOCK_SIZE]
            p_start = i * BLOCK_SIZE
            p_block = out_view[p_start : p_start + len(c_block) - BLOCK_OVERHEAD]
            self._decrypt_block(file_id, first_block + i, c_block, p_block)
        return out

    def _decrypt_block(self, file_id: bytes, block_no: int, c_block: memoryview, p_block: memoryview) -> None:
        nonce = c_block[:NONCE_LEN]
        # A real nonce is all zero with probability 2**-128, so only a zero
        # nonce needs the full comparison that separates a hole from tampering.
        if nonce == _ZERO_NONCE and c_block == _ZERO_CIPHER_BLOCK[: len(c_block)]:
            return  # a hole: *p_block* is already zero

        aad = _AAD_STRUCT.pack(FORMAT_VERSION, file_id, block_no)
        try:
            self._aead.decrypt_into(nonce, c_block[NONCE_LEN:], aad, p_block)
        except InvalidTag:
            raise BlockIntegrityError(block_no) from None
