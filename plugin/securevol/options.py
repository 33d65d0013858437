"""Validation of volume names and of the options given to ``docker volume create -o``.

dockerd 20.10 passes volume names to a plugin unchecked, and the name becomes
a directory under the state directory, so a name is accepted only if it
matches ``[A-Za-z0-9][A-Za-z0-9_.-]*`` and is at most ``MAX_NAME_LEN``
characters long. That rules out empty names, ``.``, ``..``, ``/``, NUL and
control characters.

Options are all optional:

``uid``, ``gid``
    owner of the volume's root directory (decimal IDs, default 0).
``mode``
    permission bits of the volume's root directory in octal (default 0755).
``allow``
    the allowlist of containers; accepted only when ``securevol.policy`` is
    installed, which parses and checks it.

No option carries key material: keys come from the daemon's key provider.
"""

import importlib
import importlib.util
import re
from collections.abc import Callable, Mapping
from typing import Any

from securevol.errors import InvalidOption, InvalidVolumeName

MAX_NAME_LEN = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

DEFAULT_UID = 0
DEFAULT_GID = 0
DEFAULT_MODE = 0o755

# Highest ID the kernel accepts: (uid_t)-1 means "unchanged" to chown(2).
_MAX_ID = 2**32 - 2

# Characters of an option's name or value quoted in an error message.
_SHOWN_CHARS = 40
# Permission bits plus setgid and sticky; setuid has no meaning on a directory.
_ALLOWED_MODE_BITS = 0o3777

# Option names that look like an attempt to pass a secret. Compared after
# lower-casing and removing "-" and "_".
_SECRET_WORDS = ("key", "pass", "secret", "token", "credential", "dek", "kek")


def validate_name(name: Any) -> str:
    """Return *name* if it is a valid volume name, else raise InvalidVolumeName."""
    if not isinstance(name, str):
        raise InvalidVolumeName("The volume name must be a string.")
    if name == "":
        raise InvalidVolumeName("The volume name is empty; give a name such as 'db-data'.")
    if len(name) > MAX_NAME_LEN:
        raise InvalidVolumeName(
            f"The volume name is {len(name)} characters long; the maximum is {MAX_NAME_LEN}."
        )
    if not _NAME_RE.fullmatch(name):
        raise InvalidVolumeName(
            f"Invalid volume name {name!r}: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit."
        )
    return name


def parse_options(opts: Any) -> dict[str, str]:
    """Validate the ``Opts`` of a Create request and return them in canonical form.

    The canonical form is a dict of the given options with normalised values
    (for example ``mode=755`` becomes ``0755``), so that two Create requests
    can be compared. Raises InvalidOption naming the first bad option.
    """
    if opts is None:
        return {}
    if not isinstance(opts, Mapping):
        raise InvalidOption("Volume options must be a JSON object of strings.")

    canonical: dict[str, str] = {}
    for name in sorted(opts):
        value = opts[name]
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidOption(f"Volume option {_shown(name)} must have a string value.")
        canonical[name] = _parse_option(name, value)
    return canonical


def root_attributes(options: Mapping[str, str]) -> tuple[int, int, int]:
    """Return (uid, gid, mode) for the volume's root directory from canonical options."""
    uid = int(options.get("uid", DEFAULT_UID))
    gid = int(options.get("gid", DEFAULT_GID))
    mode = int(options.get("mode", f"{DEFAULT_MODE:04o}"), 8)
    return uid, gid, mode


def allowlist_supported() -> bool:
    """Tell whether the ``allow`` option is available, which needs ``securevol.policy``."""
    return importlib.util.find_spec("securevol.policy") is not None


def _parse_option(name: str, value: str) -> str:
    parsers: dict[str, Callable[[str, str], str]] = {
        "uid": _parse_id,
        "gid": _parse_id,
        "mode": _parse_mode,
    }
    if allowlist_supported():
        parsers["allow"] = _parse_allow

    if name in parsers:
        return parsers[name](name, value)
    if _looks_like_secret(name):
        raise InvalidOption(
            f"Volume option {_shown(name)} is not accepted: securevol never takes keys or passwords as "
            "options, because they come from the daemon's key provider."
        )
    known = ", ".join(sorted(parsers))
    raise InvalidOption(f"Unknown volume option {_shown(name)}; known options are: {known}.")


def _shown(text: str) -> str:
    """Quote *text* for an error message, shortened so that a huge value cannot swamp it."""
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}... ({len(text)} characters)"


def _looks_like_secret(name: str) -> bool:
    folded = name.lower().replace("-", "").replace("_", "")
    return any(word in folded for word in _SECRET_WORDS)


def _parse_id(name: str, value: str) -> str:
    # The length check first: int() refuses strings of more than 4,300 digits.
    if not value.isascii() or not value.isdigit() or len(value) > len(str(_MAX_ID)) or int(value) > _MAX_ID:
        raise InvalidOption(
            f"Invalid value {_shown(value)} for volume option {name!r}: give a decimal ID from 0 to {_MAX_ID}."
        )
    return str(int(value))


def _parse_mode(name: str, value: str) -> str:
    if not re.fullmatch(r"[0-7]{3,4}", value):
        raise InvalidOption(
            f"Invalid value {_shown(value)} for volume option {name!r}: give octal permission bits such as 0750."
        )
    mode = int(value, 8)
    if mode & ~_ALLOWED_MODE_BITS:
        raise InvalidOption(
            f"Invalid value {value!r} for volume option {name!r}: the setuid bit has no meaning on a directory."
        )
    return f"{mode:04o}"


def _parse_allow(name: str, value: str) -> str:
    # securevol.policy owns the allowlist syntax; it raises InvalidOption with
    # the position of the first error.
    policy = importlib.import_module("securevol.policy")
    policy.parse_allowlist(value)
    return value
