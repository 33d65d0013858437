"""Extended attributes of a volume, stored encrypted as ``user.*`` attributes of the backing inode.

Every plaintext attribute, whatever its namespace (``user.``, ``security.``,
``system.posix_acl_access`` ...), becomes one backing attribute::

    name:  "user.securevol." + base64url(AES-SIV(xattr_key, name, ad=["securevol v1 xattr name"]))
    value: nonce (16 random bytes) || AES-SIV(xattr_key, value, ad=["securevol v1 xattr value", name, nonce])

Names are deterministic, so an attribute is found by name without a listing.
Values get a random nonce and are bound to their attribute's name, so two
values of one inode cannot be swapped. They are not bound to the inode:
someone who can write the backing store can copy an attribute from one file to
another (like whole files, see "What names do not protect" in docs/format.md).

Limits: a plaintext name has at most MAX_NAME_BYTES bytes, because the backing
name must fit in Linux's 255-byte limit, and a value at most MAX_VALUE_BYTES.
Linux allows user.* attributes on regular files and directories only, so other
file types (symlinks, devices, FIFOs, sockets) get EPERM for every attribute.
"""

import errno
import logging
import os
import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from securevol.errors import IntegrityError
from securevol.names import decode_base64url, encode_base64url

log = logging.getLogger(__name__)

BACKING_PREFIX = "user.securevol."
XATTR_NAME_MAX = 255  # Linux limit for a whole attribute name
XATTR_SIZE_MAX = 65536  # Linux limit for one value
NONCE_LEN = 16
SIV_TAG_LEN = 16
# The largest plaintext name whose backing name fits: base64 makes 3 bytes into 4 characters.
MAX_NAME_BYTES = (XATTR_NAME_MAX - len(BACKING_PREFIX)) * 3 // 4 - SIV_TAG_LEN
MAX_VALUE_BYTES = XATTR_SIZE_MAX - NONCE_LEN - SIV_TAG_LEN

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"

# Linux's xattr format for POSIX ACLs: a little-endian u32 version 2, then
# entries of (u16 tag, u16 perm, u32 id).
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

NAME_AD_LABEL = b"securevol v1 xattr name"
VALUE_AD_LABEL = b"securevol v1 xattr value"


class XattrError(Exception):
    """A request the extended attribute store rejects; ``errno`` is the error to return."""

    def __init__(self, message: str, errno_value: int) -> None:
        super().__init__(message)
        self.errno = errno_value


class ExtendedAttributes:
    """Reads and writes the encrypted extended attributes of backing inodes with one volume's xattr key."""

    def __init__(self, xattr_key: bytes, volume: str = "-") -> None:
        if len(xattr_key) != 64:
            raise ValueError(f"an xattr key has 64 bytes, not {len(xattr_key)}")
        self._siv = AESSIV(xattr_key)
        self._volume = volume  # for log lines
        # The kernel requests security.capability before every write(2), so
        # each attribute name is encrypted once.
        self._backing_names: dict[bytes, str] = {}

    def __repr__(self) -> str:
        return "ExtendedAttributes(<redacted>)"

    # --- operations on a backing inode, given as a path that os.*xattr follows ---------------

    def get(self, path: str, name: bytes) -> bytes:
        """Return the plaintext value of attribute *name*; raise XattrError(ENODATA) if it is not set."""
        backing_name = self.backing_name(name)
        try:
            sealed = os.getxattr(path, backing_name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise XattrError("attribute not set", errno.ENODATA) from None
            raise
        return self.open_value(name, sealed)

    def set(self, path: str, name: bytes, value: bytes) -> None:
        if len(value) > MAX_VALUE_BYTES:
            raise XattrError(f"attribute value is {len(value)} bytes, the maximum is {MAX_VALUE_BYTES}", errno.E2BIG)
        os.setxattr(path, self.backing_name(name), self.seal_value(name, value))

    def remove(self, path: str, name: bytes) -> None:
        try:
            os.removexattr(path, self.backing_name(name))
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise XattrError("attribute not set", errno.ENODATA) from None
            raise

    def list_names(self, path: str, damaged: list[tuple[str, IntegrityError]] | None = None) -> list[bytes]:
        """Return the plaintext names of all attributes.

        Names that fail authentication are skipped: each is added with its error to *damaged*
        if that is given, and logged as one ERROR line otherwise.
        """
        names = []
        for backing_name in os.listxattr(path):
            if not backing_name.startswith(BACKING_PREFIX):
                continue  # set on the backing file by someone else, e.g. security.selinux
            try:
                names.append(self.plain_name(backing_name))
            except IntegrityError as exc:
                if damaged is not None:
                    damaged.append((backing_name, exc))
                else:
                    # %r, because anyone with write access to the backing store can choose these names.
                    log.error("attribute name unreadable vol=%s backing=%r error=%s", self._volume, backing_name, exc)
        return names

    # --- encryption ------------------------------------------------------------------------------

    def backing_name(self, name: bytes) -> str:
        """Return the backing attribute name of plaintext attribute *name*."""
        backing_name = self._backing_names.get(name)
        if backing_name is None:
            backing_name = self._encrypt_name(name)
            if len(self._backing_names) < 4096:
                self._backing_names[name] = backing_name
        return backing_name

    def _encrypt_name(self, name: bytes) -> str:
        if not name or b"\0" in name:
            raise XattrError("attribute name is empty or contains NUL", errno.EINVAL)
        if len(name) > MAX_NAME_BYTES:
            raise XattrError(f"attribute name is {len(name)} bytes, the maximum is {MAX_NAME_BYTES}", errno.ERANGE)
        return BACKING_PREFIX + encode_base64url(self._siv.encrypt(name, [NAME_AD_LABEL]))

    def plain_name(self, backing_name: str) -> bytes:
        sealed = decode_base64url(backing_name[len(BACKING_PREFIX) :])
        if sealed is None or len(sealed) <= SIV_TAG_LEN:
            raise IntegrityError(f"backing attribute {backing_name!r} is not an encrypted name")
        try:
            return self._siv.decrypt(sealed, [NAME_AD_LABEL])
        except InvalidTag:
            raise IntegrityError(f"backing attribute {backing_name!r} failed authentication") from None

    def seal_value(self, name: bytes, value: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_LEN)
        return nonce + self._siv.encrypt(value, [VALUE_AD_LABEL, name, nonce])

    def open_value(self, name: bytes, sealed: bytes) -> bytes:
        if len(sealed) < NONCE_LEN + SIV_TAG_LEN:
            raise IntegrityError("attribute value is truncated")
        nonce = sealed[:NONCE_LEN]
        try:
            return self._siv.decrypt(sealed[NONCE_LEN:], [VALUE_AD_LABEL, name, nonce])
        except InvalidTag:
            raise IntegrityError("attribute value failed authentication") from None


# --- POSIX ACLs ----------------------------------------------------------------------------------


def parse_acl(value: bytes) -> list[tuple[int, int, int]]:
    """Return the (tag, perm, id) entries of an ACL in Linux's xattr format; raise XattrError(EINVAL) if malformed."""
    body_len = len(value) - _ACL_HEADER.size
    if body_len < 0 or body_len % _ACL_ENTRY.size or _ACL_HEADER.unpack_from(value)[0] != _ACL_VERSION:
        raise XattrError("ACL is not in the version 2 xattr format", errno.EINVAL)
    return [entry for entry in _ACL_ENTRY.iter_unpack(value[_ACL_HEADER.size :])]


def format_acl(entries: list[tuple[int, int, int]]) -> bytes:
    return _ACL_HEADER.pack(_ACL_VERSION) + b"".join(_ACL_ENTRY.pack(*entry) for entry in entries)


def mode_of_acl(entries: list[tuple[int, int, int]], mode: int) -> int:
    """Return *mode* with its permission bits taken from an access ACL.

    Owner and other bits come from their entries. The group bits come from the
    mask entry if there is one, else from the owning group's entry.
    """
    perms = {tag: perm & 0o7 for tag, perm, _ in entries if tag in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER)}
    group = perms.get(ACL_MASK, perms.get(ACL_GROUP_OBJ, 0))
    return (mode & ~0o777) | perms.get(ACL_USER_OBJ, 0) << 6 | group << 3 | perms.get(ACL_OTHER, 0)


def mode_without_acl(entries: list[tuple[int, int, int]], mode: int) -> int:
    """Return *mode* with permission bits that grant each class what the access ACL *entries* grant it.

    For an entry that cannot store the ACL, the mode bits alone decide. The
    owning group then gets its own entry limited by the mask, not the mask
    as in mode_of_acl(), which other group entries would need. Named users
    and groups get nothing beyond the other bits.
    """
    perms = {tag: perm & 0o7 for tag, perm, _ in entries if tag in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER)}
    group = perms.get(ACL_GROUP_OBJ, 0) & perms.get(ACL_MASK, 0o7)
    return (mode & ~0o777) | perms.get(ACL_USER_OBJ, 0) << 6 | group << 3 | perms.get(ACL_OTHER, 0)


def chmod_acl(entries: list[tuple[int, int, int]], mode: int) -> list[tuple[int, int, int]]:
    """Return an access ACL whose owner, other and mask (or, lacking one, owning group) entries follow *mode*.

    This is what chmod(2) does to an access ACL on ext4. The kernel checks
    those entries and not the mode, so an ACL left alone would keep granting
    what chmod took away.
    """
    has_mask = any(tag == ACL_MASK for tag, _, _ in entries)
    bits = {ACL_USER_OBJ: (mode >> 6) & 0o7, ACL_OTHER: mode & 0o7}
    bits[ACL_MASK if has_mask else ACL_GROUP_OBJ] = (mode >> 3) & 0o7
    return [(tag, bits.get(tag, perm), ident) for tag, perm, ident in entries]


def is_minimal_acl(entries: list[tuple[int, int, int]]) -> bool:
    """Tell whether an ACL grants nothing beyond the permission bits (owner, group and other entries only)."""
    return all(tag in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER) for tag, _, _ in entries)


def inherit_acl(default_entries: list[tuple[int, int, int]], mode: int) -> tuple[list[tuple[int, int, int]], int]:
    """Return the access ACL and mode of a new entry whose directory has the default ACL *default_entries*.

    The requested *mode* limits the owner, other and mask (or, without a mask,
    owning group) entries, and the mode's permission bits then follow the
    resulting ACL. tests/test_fs_posix.py compares the result with ext4's.
    """
    has_mask = any(tag == ACL_MASK for tag, _, _ in default_entries)
    limit = {ACL_USER_OBJ: (mode >> 6) & 0o7, ACL_OTHER: mode & 0o7}
    limit[ACL_MASK if has_mask else ACL_GROUP_OBJ] = (mode >> 3) & 0o7

    entries = [(tag, perm & limit.get(tag, 0o7), ident) for tag, perm, ident in default_entries]
    return entries, mode_of_acl(entries, mode)
