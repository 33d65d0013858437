"""Exceptions that cross module boundaries.

Every message is one sentence a user can act on, because the protocol layer
returns ``str(exc)`` to Docker as the ``Err`` field. Messages name volumes,
options and paths inside the backing store, never key material or plaintext
file names.
"""


class SecurevolError(Exception):
    """Base class for errors that are reported to the user as they are."""


class InvalidVolumeName(SecurevolError):
    """A volume name that is empty, too long or contains characters other than [A-Za-z0-9_.-]."""


class InvalidOption(SecurevolError):
    """An unknown volume option or an option with a bad value."""


class VolumeNotFound(SecurevolError):
    """No volume of that name exists."""


class VolumeExists(SecurevolError):
    """A volume of that name exists already with different options."""


class VolumeInUse(SecurevolError):
    """The volume is mounted, so it cannot be removed."""


class MountFailed(SecurevolError):
    """The FUSE filesystem for a volume did not come up."""


class KeyProviderError(SecurevolError):
    """The key provider could not wrap or unwrap a data key."""


class KeyProviderTimeout(KeyProviderError):
    """A request to a key server timed out; the server may still carry it out."""


class AccessDenied(SecurevolError):
    """A container is not on a volume's allowlist."""


class InvalidName(SecurevolError):
    """A file name or symlink target that the filesystem cannot store.

    ``errno`` is the error number the FUSE layer returns for it (EINVAL or ENAMETOOLONG).
    """

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class IntegrityError(SecurevolError):
    """Ciphertext failed authentication: it was modified, moved, truncated or read with the wrong key.

    Carries identifiers only (volume, backing path, block number), never data.
    """
