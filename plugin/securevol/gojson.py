"""Read a JSON request body the way dockerd's Go ``encoding/json`` decoder does.

An authorization plugin that reads a body differently from dockerd can be
walked around: the plugin checks one set of mounts, dockerd creates another.
Python's ``json`` differs from Go's decoder (Go 1.19, which Debian's
dockerd 20.10 is built with) in ways a hostile client can use:

- Go matches an object key to a struct field exactly or, failing that,
  case-insensitively with Unicode simple folding: ``binds``, ``BINDS`` and
  ``Bindſ`` (U+017F LATIN SMALL LETTER LONG S) all fill ``Binds``, and
  U+212A KELVIN SIGN folds to ``k``. ``Bınds`` (dotless i) matches nothing.
- A repeated key decodes again into the same field: the last string or array
  wins, but a repeated object (``HostConfig``) or map (``Labels``) is merged
  into the first one.
- An array decoded into a slice that is already filled reuses its elements:
  a ``Mounts`` entry that leaves out ``Source`` keeps the ``Source`` of the
  entry at that index in an earlier ``Mounts``.
- ``null`` sets a pointer, slice or map to nil but leaves a string unchanged.
- The decoder reads the first JSON value and ignores what follows it.
  Invalid UTF-8 and lone surrogates inside strings become U+FFFD.

``decode(schema, body)`` applies these rules for the fields securevol needs,
described with the ``GoString``, ``GoSlice``, ``GoMap``, ``GoStruct`` and
``GoPointer`` types. Fields outside the schema are skipped, as are unknown
keys in Go. A value of the wrong type raises GoTypeError, which makes
dockerd reject the whole request too.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any

_KELVIN_SIGN = "\u212a"
_LONG_S = "\u017f"
_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class GoTypeError(ValueError):
    """A JSON value whose type does not fit the Go field it decodes into."""


class GoObject:
    """A JSON object as its (key, value) pairs in document order, duplicates kept."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def __repr__(self) -> str:
        return f"GoObject({self.pairs!r})"


def loads(body: bytes) -> Any:
    """Parse the first JSON value of *body*, objects as GoObject; raise ValueError if it is not JSON."""
    text = body.decode("utf-8", errors="replace")
    decoder = json.JSONDecoder(object_pairs_hook=GoObject)
    value, _end = decoder.raw_decode(text, _skip_whitespace(text))
    return value


def _skip_whitespace(text: str) -> int:
    # JSON whitespace only; Go rejects a leading byte order mark, and so does raw_decode.
    index = 0
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def fold_key(key: str) -> str:
    """Return the form in which Go compares *key* with an ASCII field name, case-insensitively.

    Under Unicode simple folding only two non-ASCII characters fold to ASCII
    letters: the Kelvin sign to k and the long s to s.
    """
    return key.replace(_KELVIN_SIGN, "k").replace(_LONG_S, "s").translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class GoType:
    """A Go type, which decodes a JSON value into the field's current value."""

    def zero(self) -> Any:
        return None

    def decode(self, value: Any, current: Any) -> Any:
        raise NotImplementedError


class GoString(GoType):
    def zero(self) -> str:
        return ""

    def decode(self, value: Any, current: Any) -> Any:
        if value is None:
            return current
        if not isinstance(value, str):
            raise GoTypeError(f"expected a string, got {type(value).__name__}")
        return _LONE_SURROGATE_RE.sub("\ufffd", value)


class GoAny(GoType):
    """A field whose value securevol does not read (for example the ``struct{}`` of ``Volumes``)."""

    def decode(self, value: Any, current: Any) -> Any:
        return None


@dataclass
class SliceValue:
    """A decoded Go slice: its visible ``items`` and the backing array behind them.

    The backing array keeps elements past the slice's length, which a later
    array of the same field decodes into.
    """

    items: list[Any]
    backing: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class GoSlice(GoType):
    element: GoType

    def decode(self, value: Any, current: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            raise GoTypeError(f"expected an array, got {type(value).__name__}")
        if not value:
            # Go replaces the slice with a new empty one, dropping the old elements.
            return SliceValue([], [])

        backing = list(current.backing) if isinstance(current, SliceValue) else []
        for index, item in enumerate(value):
            if index < len(backing):
                backing[index] = self.element.decode(item, backing[index])
            else:
                backing.append(self.element.decode(item, self.element.zero()))
        return SliceValue(backing[: len(value)], backing)


@dataclass(frozen=True)
class GoMap(GoType):
    """A ``map[string]T``: keys match exactly, a repeated map merges into the existing one."""

    element: GoType

    def decode(self, value: Any, current: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, GoObject):
            raise GoTypeError(f"expected an object, got {type(value).__name__}")
        merged = dict(current) if isinstance(current, dict) else {}
        for key, item in value.pairs:
            # Each map element decodes into a fresh zero value, not the old one.
            merged[key] = self.element.decode(item, self.element.zero())
        return merged


@dataclass(frozen=True)
class GoStruct(GoType):
    """A struct value; *fields* maps Go field names (as JSON names them) to their types."""

    fields: dict[str, GoType]

    def zero(self) -> dict[str, Any]:
        return {}

    def field_for(self, key: str) -> str | None:
        """Return the field that JSON key *key* fills: an exact match first, then a folded one."""
        if key in self.fields:
            return key
        folded = fold_key(key)
        for name in self.fields:
            if fold_key(name) == folded:
                return name
        return None

    def decode(self, value: Any, current: Any) -> Any:
        if value is None:
            return current  # null leaves a struct value unchanged
        if not isinstance(value, GoObject):
            raise GoTypeError(f"expected an object, got {type(value).__name__}")
        result = dict(current) if isinstance(current, dict) else {}
        for key, item in value.pairs:
            name = self.field_for(key)
            if name is None:
                continue
            field_type = self.fields[name]
            result[name] = field_type.decode(item, result.get(name, field_type.zero()))
        return result


@dataclass(frozen=True)
class GoPointer(GoType):
    """A pointer to a struct: ``null`` sets it to nil, an object decodes into the struct it points to."""

    target: GoStruct

    def decode(self, value: Any, current: Any) -> Any:
        if value is None:
            return None
        return self.target.decode(value, current if current is not None else {})


def decode(schema: GoStruct, body: bytes) -> dict[str, Any]:
    """Decode *body* into *schema* as Go would; raise ValueError if it is not JSON or not an object."""
    value = loads(body)
    if not isinstance(value, GoObject):
        raise GoTypeError("the body is not a JSON object")
    return schema.decode(value, {})


def items(value: Any) -> list[Any]:
    """Return the elements of a decoded slice (an empty list for nil)."""
    return value.items if isinstance(value, SliceValue) else []
