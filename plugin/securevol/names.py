"""On-disk format of names: encrypted file names, directory IVs, long names and symlink targets.

docs/format.md ("Names") describes the bytes; this docstring is the contract for the FUSE layer.

Every function that touches the backing store works relative to a directory file descriptor,
which may be an O_PATH descriptor, and takes one backing name, never a path. None of them follows
a symlink.

Layout of one backing directory::

    securevol.diriv               the directory IV: 16 random bytes
    <encrypted name>              an entry whose encrypted name fits in 255 bytes
    securevol.long.<hash>         an entry with a long name (hash of its encrypted name)
    securevol.long.<hash>.name    the side record of that entry: its full encrypted name
    securevol.tmp.<random>        a file being written by this module (left over only by a crash)

Every backing name that starts with ``securevol.`` is reserved. An encrypted name is unpadded
base64url, which has no '.', so no plaintext name can map to a reserved name, and ``list_dir``
never shows one.

What the FUSE layer does with this module:

- mkdir: ``make_dir(parent_fd, backing.name, mode)`` creates the directory with its IV. The root
  of the backing store needs an IV too: ``write_dir_iv(root_fd)`` when the volume is created.
- Any operation on a name in a directory: ``dir_iv = read_dir_iv(dir_fd)`` (cache it per
  directory inode), then ``backing = cipher.backing_name_for(plain, dir_iv)``. Lookups use
  ``backing.name`` and need no side record.
- Creating an entry (create, mknod, mkdir, symlink, link) whose ``backing.is_long``: call
  ``write_side_record(dir_fd, backing)`` first, then create ``backing.name``.
- unlink: remove ``backing.name``, then ``remove_side_record(dir_fd, backing.name)``.
- rmdir: ``remove_dir(parent_fd, backing.name)``, because a plain rmdir fails on the reserved
  files that every backing directory contains.
- rename: write the new name's side record, rename, then remove the old name's side record.
- readdir: ``list_dir(dir_fd, dir_iv)`` returns (plaintext name, backing name) pairs. It skips
  reserved names and logs and skips entries that fail authentication.
- symlink / readlink: ``write_symlink`` and ``read_symlink``. A target whose encrypted form fits
  in 4095 bytes is a backing symlink. A longer one is a backing regular file with mode 0o1600
  (sticky bit set) that contains the encrypted target. ``is_symlink(st)`` recognises both forms from
  an lstat result, and ``symlink_size(st)`` is the plaintext target length for ``st_size``.
  Linux ignores the sticky bit on regular files, so the FUSE layer must never set S_ISVTX on the
  backing file of a plaintext regular file: otherwise it would read back as a symlink.

Errors: a name or target that cannot be stored raises ``errors.InvalidName`` (with ``errno``);
a name, side record, directory IV or target that fails authentication raises
``errors.IntegrityError``, whose message names backing (ciphertext) names only. OSErrors from
the backing store pass through unchanged.

Caveats: names are bound to their directory, but an entry's contents are not bound to its name,
so an attacker who can write the backing store can swap whole entries, or whole directories
(together with their IVs), without detection here. The backing filesystem must be
case-sensitive, because base64url names differ by case only.
"""

import base64
import binascii
import errno
import hashlib
import hmac
import logging
import os
import secrets
import stat
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from securevol.errors import IntegrityError, InvalidName

log = logging.getLogger(__name__)

NAME_KEY_LEN = 64
DIR_IV_LEN = 16
SIV_TAG_LEN = 16
SYMLINK_NONCE_LEN = 16

# Limits of Linux: NAME_MAX for one name, PATH_MAX - 1 for a symlink target.
MAX_NAME_BYTES = 255
MAX_SYMLINK_TARGET_BYTES = 4095

# Backing names kept by NameCipher.backing_name_for; about 6 MiB when full.
BACKING_NAME_CACHE_SIZE = 16384

RESERVED_PREFIX = "securevol."
DIR_IV_NAME = "securevol.diriv"
LONG_NAME_PREFIX = "securevol.long."
SIDE_RECORD_SUFFIX = ".name"
TEMP_PREFIX = "securevol.tmp."

# Mode of the backing regular file that contains a long symlink target (see is_symlink).
LONG_SYMLINK_MODE = stat.S_ISVTX | 0o600

# The first associated-data element of each kind of ciphertext. They separate names from
# symlink targets, and both from any later format version. Changing one makes every existing
# volume unreadable.
NAME_AD_LABEL = b"securevol v1 name"
SYMLINK_AD_LABEL = b"securevol v1 symlink target"

# Maximum side record length: the encrypted form of a 255-byte name.
_MAX_SIDE_RECORD_LEN = len(base64.urlsafe_b64encode(bytes(MAX_NAME_BYTES + SIV_TAG_LEN)))


class BackingName(NamedTuple):
    """The on-disk name of one plaintext name in one directory."""

    name: str
    cipher_name: str

    @property
    def is_long(self) -> bool:
        """True when the entry needs a side record that contains ``cipher_name``."""
        return self.name != self.cipher_name


class DirEntry(NamedTuple):
    """One entry of a backing directory that decrypted to a plaintext name."""

    plain_name: bytes
    backing_name: str


class NameCipher:
    """Encrypts names (deterministic per directory) and symlink targets (randomised) of one volume.

    *name_key* is the 64-byte ``name_key`` from ``crypto.derive_volume_keys``: AES-SIV with
    AES-256 in both of its halves.
    """

    def __init__(self, name_key: bytes, volume: str = "-") -> None:
        if len(name_key) != NAME_KEY_LEN:
            raise ValueError(f"a name key has {NAME_KEY_LEN} bytes, not {len(name_key)}")
        self._siv = AESSIV(name_key)
        self._volume = volume  # for log lines
        # (plaintext name, directory IV) -> BackingName; cleared when full.
        self._backing_names: dict[tuple[bytes, bytes], BackingName] = {}

    def __repr__(self) -> str:
        return "NameCipher(<redacted>)"

    # Names

    def encrypt_name(self, plain: bytes, dir_iv: bytes) -> str:
        """Encrypt the plaintext name *plain* of an entry in the directory with IV *dir_iv*.

        Equal names in one directory give equal results, so a lookup needs no listing. The
        result may be longer than 255 bytes: ``backing_name_for`` maps it to a backing name.
        """
        validate_name(plain)
        _check_dir_iv(dir_iv)
        return encode_base64url(self._siv.encrypt(plain, [NAME_AD_LABEL, dir_iv]))

    def decrypt_name(self, cipher_name: str, dir_iv: bytes) -> bytes:
        """Decrypt an encrypted name read from the directory with IV *dir_iv*.

        Raises IntegrityError when *cipher_name* was modified, belongs to another directory or
        volume, or is not an encrypted name at all.
        """
        _check_dir_iv(dir_iv)
        sealed = decode_base64url(cipher_name)
        if sealed is None or len(sealed) <= SIV_TAG_LEN:
            raise IntegrityError(f"backing name {cipher_name!r} is not an encrypted name")

        try:
            return self._siv.decrypt(sealed, [NAME_AD_LABEL, dir_iv])
        except InvalidTag:
            raise IntegrityError(f"encrypted name {cipher_name!r} failed authentication") from None

    def backing_name_for(self, plain: bytes, dir_iv: bytes) -> BackingName:
        """Return the backing name of *plain* in the directory with IV *dir_iv*.

        Results are cached, because most names are requested twice in a row:
        a lookup that misses and then the create, or a stat and then the
        unlink. AES-SIV costs more than the rest of a lookup.
        """
        key = (plain, dir_iv)
        backing = self._backing_names.get(key)
        if backing is not None:
            return backing

        cipher_name = self.encrypt_name(plain, dir_iv)
        if len(cipher_name) <= MAX_NAME_BYTES:
            backing = BackingName(cipher_name, cipher_name)
        else:
            backing = BackingName(_long_name_for(cipher_name), cipher_name)
        if len(self._backing_names) >= BACKING_NAME_CACHE_SIZE:
            self._backing_names.clear()
        self._backing_names[key] = backing
        return backing

    def plain_name_for(self, dir_fd: int, backing_name: str, dir_iv: bytes) -> bytes:
        """Return the plaintext name of the entry *backing_name* in *dir_fd*.

        Reads the side record of a long name. Raises IntegrityError for a reserved name that is
        not a long name, a missing or swapped side record, or a name that fails authentication.
        """
        if not is_reserved(backing_name):
            return self.decrypt_name(backing_name, dir_iv)
        if not is_long_name(backing_name):
            raise IntegrityError(f"backing name {backing_name!r} is reserved, not an entry")

        cipher_name = read_side_record(dir_fd, backing_name)
        if len(cipher_name) <= MAX_NAME_BYTES:
            # A short encrypted name under a long backing name would show one entry twice.
            raise IntegrityError(f"side record of {backing_name!r} contains a short name")
        return self.decrypt_name(cipher_name, dir_iv)

    def list_dir(
        self,
        dir_fd: int,
        dir_iv: bytes,
        temporary: list[str] | None = None,
        damaged: list[tuple[str, IntegrityError]] | None = None,
    ) -> list[DirEntry]:
        """List the entries of the backing directory *dir_fd* with their plaintext names.

        Reserved names are skipped, and temporary ones are added to *temporary* if it is given.
        An entry that fails authentication is skipped too, so that one damaged name does not
        hide the rest of the directory: it is added with its error to *damaged* if that is
        given, and logged as one ERROR line otherwise.
        """
        entries = []
        for backing_name in _list_backing_names(dir_fd):
            if is_reserved(backing_name) and not is_long_name(backing_name):
                if temporary is not None and backing_name.startswith(TEMP_PREFIX):
                    temporary.append(backing_name)
                continue

            try:
                plain = self.plain_name_for(dir_fd, backing_name, dir_iv)
            except IntegrityError as exc:
                if damaged is not None:
                    damaged.append((backing_name, exc))
                else:
                    # %r, because anyone with write access to the backing store can choose these names.
                    log.error("name unreadable vol=%s backing=%r error=%s", self._volume, backing_name, exc)
                continue
            entries.append(DirEntry(plain, backing_name))
        return entries

    # Symlink targets

    def encrypt_symlink_target(self, target: bytes) -> bytes:
        """Encrypt a symlink target with a random nonce: nonce, SIV tag, ciphertext.

        Equal targets give unrelated results. A target is bound to neither its symlink's name
        nor its directory, so renames and hard links need no rewrite.
        """
        validate_symlink_target(target)
        nonce = secrets.token_bytes(SYMLINK_NONCE_LEN)
        return nonce + self._siv.encrypt(target, [SYMLINK_AD_LABEL, nonce])

    def decrypt_symlink_target(self, sealed: bytes, backing_name: str | None = None) -> bytes:
        """Decrypt the output of ``encrypt_symlink_target``.

        Raises IntegrityError, naming *backing_name* if given, when *sealed* was modified or
        truncated or comes from another volume.
        """
        where = "symlink target" if backing_name is None else f"symlink target of {backing_name!r}"
        if len(sealed) <= SYMLINK_NONCE_LEN + SIV_TAG_LEN:
            raise IntegrityError(f"{where} is truncated")

        nonce = sealed[:SYMLINK_NONCE_LEN]
        try:
            return self._siv.decrypt(sealed[SYMLINK_NONCE_LEN:], [SYMLINK_AD_LABEL, nonce])
        except InvalidTag:
            raise IntegrityError(f"{where} failed authentication") from None

    def write_symlink(self, dir_fd: int, backing_name: str, target: bytes) -> None:
        """Create the symlink *backing_name* in *dir_fd* that stores *target* encrypted.

        Raises FileExistsError when *backing_name* exists, like symlink(2).
        """
        sealed = self.encrypt_symlink_target(target)
        encoded = encode_base64url(sealed)
        if len(encoded) <= MAX_SYMLINK_TARGET_BYTES:
            os.symlink(encoded, backing_name, dir_fd=dir_fd)
        else:
            _create_file(dir_fd, backing_name, sealed, LONG_SYMLINK_MODE)

    def read_symlink(self, dir_fd: int, backing_name: str) -> bytes:
        """Return the plaintext target of the symlink *backing_name* in *dir_fd*.

        Raises IntegrityError when the entry is not a symlink of either form or its target
        fails authentication.
        """
        st = os.stat(backing_name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            encoded = os.readlink(backing_name, dir_fd=dir_fd)
            sealed = decode_base64url(encoded)
            if sealed is None:
                raise IntegrityError(f"symlink target of {backing_name!r} is not base64url")
            return self.decrypt_symlink_target(sealed, backing_name)

        if not is_symlink(st):
            raise IntegrityError(f"backing entry {backing_name!r} is not a symlink")
        sealed = _read_file(dir_fd, backing_name, _sealed_target_len(MAX_SYMLINK_TARGET_BYTES))
        return self.decrypt_symlink_target(sealed, backing_name)

    def read_symlink_fd(self, fd: int) -> bytes:
        """Like ``read_symlink``, for an O_PATH descriptor of the backing symlink entry itself.

        The FUSE layer holds such a descriptor for each inode, and a hard-linked symlink has no
        single parent directory to name it from.
        """
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            # readlinkat(2) with an empty path reads the symlink an O_PATH descriptor refers to.
            sealed = decode_base64url(os.readlink("", dir_fd=fd))
            if sealed is None:
                raise IntegrityError("symlink target is not base64url")
            return self.decrypt_symlink_target(sealed)

        if not is_symlink(st):
            raise IntegrityError("backing entry is not a symlink")
        # O_NOFOLLOW would refuse the /proc magic link, so this reopen cannot use _read_file.
        read_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sealed = os.pread(read_fd, _sealed_target_len(MAX_SYMLINK_TARGET_BYTES) + 1, 0)
        finally:
            os.close(read_fd)
        return self.decrypt_symlink_target(sealed)


# Validation of plaintext


def validate_name(plain: bytes) -> None:
    """Raise InvalidName unless *plain* is a storable file name: 1 to 255 bytes, no '/' or NUL,
    not '.' or '..'. The message never contains the name."""
    if not isinstance(plain, bytes):
        raise TypeError(f"a file name is bytes, not {type(plain).__name__}")
    if len(plain) > MAX_NAME_BYTES:
        raise InvalidName(
            f"file name is {len(plain)} bytes long, but the maximum is {MAX_NAME_BYTES}", errno.ENAMETOOLONG
        )
    if plain in (b"", b".", b".."):
        raise InvalidName("file name is empty, '.' or '..', so choose another name", errno.EINVAL)
    if b"/" in plain or b"\0" in plain:
        raise InvalidName("file name contains '/' or a NUL byte, which are invalid in a name", errno.EINVAL)


def validate_symlink_target(target: bytes) -> None:
    """Raise InvalidName unless *target* is a storable symlink target: 1 to 4095 bytes, no NUL."""
    if not isinstance(target, bytes):
        raise TypeError(f"a symlink target is bytes, not {type(target).__name__}")
    if len(target) > MAX_SYMLINK_TARGET_BYTES:
        raise InvalidName(
            f"symlink target is {len(target)} bytes long, but the maximum is {MAX_SYMLINK_TARGET_BYTES}",
            errno.ENAMETOOLONG,
        )
    if not target:
        raise InvalidName("symlink target is empty, so give a non-empty target", errno.ENOENT)
    if b"\0" in target:
        raise InvalidName("symlink target contains a NUL byte, which is invalid in a path", errno.EINVAL)


# Reserved names


def is_reserved(backing_name: str) -> bool:
    """True for names this module writes for itself, which never appear in a plaintext listing."""
    return backing_name.startswith(RESERVED_PREFIX)


def is_long_name(backing_name: str) -> bool:
    """True for the backing name of an entry with a long name (not for its side record)."""
    return backing_name.startswith(LONG_NAME_PREFIX) and not backing_name.endswith(SIDE_RECORD_SUFFIX)


# Directory IVs


def new_dir_iv() -> bytes:
    """Return a new random directory IV."""
    return secrets.token_bytes(DIR_IV_LEN)


def write_dir_iv(dir_fd: int, dir_iv: bytes | None = None, fsync: bool = True) -> bytes:
    """Store a directory IV (a new one unless *dir_iv* is given) in *dir_fd* and return it.

    Raises FileExistsError when the directory has an IV already: replacing it would make every
    name in the directory unreadable. With *fsync* false the IV survives the death of the process
    but not a power loss until the caller fsyncs the IV file.
    """
    dir_iv = new_dir_iv() if dir_iv is None else dir_iv
    _check_dir_iv(dir_iv)
    _create_file(dir_fd, DIR_IV_NAME, dir_iv, 0o400, fsync)
    return dir_iv


def read_dir_iv(dir_fd: int) -> bytes:
    """Return the IV of the backing directory *dir_fd*.

    Raises IntegrityError when the IV file is missing or not exactly 16 bytes.
    """
    try:
        dir_iv = _read_file(dir_fd, DIR_IV_NAME, DIR_IV_LEN)
    except FileNotFoundError:
        raise IntegrityError(f"backing directory has no {DIR_IV_NAME} file") from None

    if len(dir_iv) != DIR_IV_LEN:
        raise IntegrityError(f"{DIR_IV_NAME} has the wrong length, expected {DIR_IV_LEN} bytes")
    return dir_iv


def make_dir(parent_fd: int, backing_name: str, mode: int = 0o700, fsync: bool = True) -> bytes:
    """Create the backing directory *backing_name* in *parent_fd* with a new IV; return the IV.

    Raises FileExistsError like mkdir(2). If the IV cannot be written, the new directory is
    removed again, so no directory without an IV is left behind (unless the process dies).
    *fsync* is passed on to write_dir_iv.
    """
    os.mkdir(backing_name, mode, dir_fd=parent_fd)
    try:
        child_fd = os.open(backing_name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            return write_dir_iv(child_fd, fsync=fsync)
        finally:
            os.close(child_fd)
    except BaseException:
        os.rmdir(backing_name, dir_fd=parent_fd)
        raise


def new_temp_name() -> str:
    """Return a new reserved name for an entry that is made first and renamed into place when complete."""
    return TEMP_PREFIX + secrets.token_hex(8)


def remove_temporary_entry(dir_fd: int, backing_name: str) -> None:
    """Remove the temporary file or directory *backing_name* that a killed process left in *dir_fd*."""
    try:
        os.unlink(backing_name, dir_fd=dir_fd)
    except IsADirectoryError:
        remove_dir(dir_fd, backing_name)


def remove_dir(parent_fd: int, backing_name: str) -> None:
    """Remove the empty backing directory *backing_name* in *parent_fd* and its reserved files.

    Raises OSError(ENOTEMPTY) when it contains any entry other than reserved files; nothing is
    removed then. The caller must keep other operations out of the directory meanwhile (the
    kernel does so for an rmdir through FUSE).
    """
    child_fd = os.open(backing_name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        names = _list_backing_names(child_fd)
        if any(not is_reserved(name) or is_long_name(name) for name in names):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), backing_name)

        # The IV goes last, so an interrupted removal leaves a directory that still reads.
        for name in sorted(names, key=lambda name: name == DIR_IV_NAME):
            remove_temporary_entry(child_fd, name)
    finally:
        os.close(child_fd)
    os.rmdir(backing_name, dir_fd=parent_fd)


# Long names and their side records


def write_side_record(dir_fd: int, backing: BackingName) -> None:
    """Store the side record of the long name *backing* in *dir_fd*, replacing any old one.

    Replacing is safe because the side record of a backing name has one valid content only.
    """
    if not backing.is_long:
        raise ValueError("only a long name has a side record")
    _replace_file(dir_fd, backing.name + SIDE_RECORD_SUFFIX, backing.cipher_name.encode("ascii"))


def read_side_record(dir_fd: int, backing_name: str) -> str:
    """Return the encrypted name stored in the side record of the long name *backing_name*.

    Raises IntegrityError when it is missing, malformed or belongs to another long name.
    """
    record_name = backing_name + SIDE_RECORD_SUFFIX
    try:
        content = _read_file(dir_fd, record_name, _MAX_SIDE_RECORD_LEN + 1)
    except FileNotFoundError:
        raise IntegrityError(f"long name {backing_name!r} has no side record") from None

    try:
        cipher_name = content.decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError(f"side record {record_name!r} is not ASCII") from None

    # The hash in the backing name binds the side record to its entry: a swapped or edited
    # record fails here even before decryption.
    expected = _long_name_for(cipher_name).encode("ascii")
    actual = backing_name.encode("utf-8", "surrogateescape")
    if len(content) > _MAX_SIDE_RECORD_LEN or not hmac.compare_digest(expected, actual):
        raise IntegrityError(f"side record {record_name!r} does not match its long name")
    return cipher_name


def remove_side_record(dir_fd: int, backing_name: str) -> None:
    """Remove the side record of *backing_name* if it is a long name. A missing record is no error."""
    if not is_long_name(backing_name):
        return
    try:
        os.unlink(backing_name + SIDE_RECORD_SUFFIX, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


# Symlinks in the backing store


def is_symlink(st: os.stat_result) -> bool:
    """True when the lstat result *st* of a backing entry is a plaintext symlink of either form."""
    if stat.S_ISLNK(st.st_mode):
        return True
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & stat.S_ISVTX)


def symlink_size(st: os.stat_result) -> int:
    """Return the plaintext target length of the symlink whose backing lstat result is *st*."""
    sealed_len = st.st_size
    if stat.S_ISLNK(st.st_mode):
        # Unpadded base64 turns every 4 characters into 3 bytes, and a tail of 2 or 3 into 1 or 2.
        sealed_len = st.st_size * 3 // 4
    return max(sealed_len - SYMLINK_NONCE_LEN - SIV_TAG_LEN, 0)


# Encoding and file helpers


def encode_base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode_base64url(text: str) -> bytes | None:
    """Decode unpadded base64url, or return None unless *text* is the canonical encoding of its bytes.

    Refusing non-canonical forms (stray characters, padding, non-zero trailing bits) keeps two
    backing names from decrypting to one plaintext name.
    """
    if len(text) % 4 == 1 or not text.isascii():
        return None
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error:
        return None

    if encode_base64url(data) != text:
        return None
    return data


def _long_name_for(cipher_name: str) -> str:
    digest = hashlib.sha256(cipher_name.encode("ascii")).digest()
    return LONG_NAME_PREFIX + encode_base64url(digest)


def _sealed_target_len(target_len: int) -> int:
    return SYMLINK_NONCE_LEN + SIV_TAG_LEN + target_len


def _check_dir_iv(dir_iv: bytes) -> None:
    if len(dir_iv) != DIR_IV_LEN:
        raise ValueError(f"a directory IV has {DIR_IV_LEN} bytes, not {len(dir_iv)}")


def _list_backing_names(dir_fd: int) -> list[str]:
    # os.listdir needs a readable descriptor, and dir_fd may be O_PATH.
    list_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        return os.listdir(list_fd)
    finally:
        os.close(list_fd)


def _read_file(dir_fd: int, name: str, max_len: int) -> bytes:
    """Read at most *max_len* + 1 bytes of the regular file *name*, so callers see oversize.

    Raises IntegrityError when *name* is anything but a regular file. The type is checked on an
    O_PATH descriptor before the file is opened for reading, because opening a FIFO blocks the
    FUSE process and opening a device node can have side effects.
    """
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            raise IntegrityError(f"{name!r} is not a regular file")
        # The reopen through /proc opens the inode that was checked, even if the name has changed.
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(path_fd)

    try:
        chunks = []
        remaining = max_len + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_temp_file(dir_fd: int, data: bytes, mode: int, fsync: bool = True) -> str:
    """Write *data* to a new reserved temporary file in *dir_fd*, fsync it unless told not to, return its name."""
    temp_name = new_temp_name()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp_name, flags, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        # fchmod after open, because the umask would drop bits from open's mode.
        os.fchmod(fd, mode)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp_name, dir_fd=dir_fd)
        raise
    os.close(fd)
    return temp_name


def _create_file(dir_fd: int, name: str, data: bytes, mode: int, fsync: bool = True) -> None:
    """Create *name* with *data* atomically: it appears complete or not at all.

    Raises FileExistsError when *name* exists (linkat never replaces).
    """
    temp_name = _write_temp_file(dir_fd, data, mode, fsync)
    try:
        os.link(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.unlink(temp_name, dir_fd=dir_fd)


def _replace_file(dir_fd: int, name: str, data: bytes) -> None:
    """Replace *name* atomically with a file that contains *data*."""
    temp_name = _write_temp_file(dir_fd, data, 0o600)
    try:
        os.replace(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(temp_name, dir_fd=dir_fd)
        raise
