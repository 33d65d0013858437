"""The data-encryption key (DEK) of a volume and the sub-keys derived from it.

Each volume has one random 256-bit DEK. It is stored only wrapped by a key
provider's KEK (see ``securevol.keys``). The FUSE process derives one sub-key
per purpose with HKDF-SHA256, so that the key that encrypts file contents is
never the key that encrypts names.
"""

import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DEK_LEN = 32
VOLUME_ID_LEN = 16

# HKDF "info" strings. They are part of the on-disk format: changing one makes
# every existing volume unreadable.
CONTENT_KEY_INFO = b"securevol v1 file contents"
NAME_KEY_INFO = b"securevol v1 file names"
XATTR_KEY_INFO = b"securevol v1 extended attributes"


class DataKey:
    """A volume's DEK: 32 secret bytes that never appear in a repr, a log line or an error."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != DEK_LEN:
            raise ValueError(f"a data key has {DEK_LEN} bytes, not {len(key)}")
        self._key = bytes(key)

    @classmethod
    def generate(cls) -> "DataKey":
        """Return a new random DEK from the operating system's CSPRNG."""
        return cls(os.urandom(DEK_LEN))

    def raw(self) -> bytes:
        """Return the key bytes, for wrapping and for handing to a FUSE process only."""
        return self._key

    def __repr__(self) -> str:
        return "DataKey(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return id(self)


@dataclass(frozen=True, repr=False)
class VolumeKeys:
    """The sub-keys of one volume, each for one purpose only."""

    content_key: bytes
    name_key: bytes
    xattr_key: bytes

    def __repr__(self) -> str:
        return "VolumeKeys(<redacted>)"


def derive_volume_keys(dek: DataKey, volume_id: bytes) -> VolumeKeys:
    """Derive the content, name and extended attribute sub-keys of the volume *volume_id* from its DEK.

    The volume ID is the HKDF salt, so two volumes never share sub-keys even if
    a DEK were ever reused.
    """
    if len(volume_id) != VOLUME_ID_LEN:
        raise ValueError(f"a volume ID has {VOLUME_ID_LEN} bytes, not {len(volume_id)}")

    content_key = _hkdf(dek, volume_id, CONTENT_KEY_INFO, 32)
    # AES-SIV with a 512-bit key is AES-256 for both its MAC and its cipher half.
    name_key = _hkdf(dek, volume_id, NAME_KEY_INFO, 64)
    xattr_key = _hkdf(dek, volume_id, XATTR_KEY_INFO, 64)  # AES-SIV as well
    return VolumeKeys(content_key=content_key, name_key=name_key, xattr_key=xattr_key)


def _hkdf(dek: DataKey, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(dek.raw())
