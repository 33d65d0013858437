"""libfuse's session behind pyfuse3: the handler table and connection flags that pyfuse3 3.5 does not expose.

pyfuse3 keeps the session pointer and its own table of request handlers in two
module variables. Neither is exported, but pyfuse3's shared object keeps its
symbol table when it is built from source, as pip does here, so their
addresses come from there. libfuse copies the handler table into the session.
The fields before that copy changed between libfuse releases, so the copy is
found by comparing bytes, not by a fixed offset. The connection flags (struct
fuse_conn_info) follow the table after four fields. Those fields and the flags
are checked against what libfuse, pyfuse3 and the kernel put there before
anything is written.

Everything here raises SessionLayoutError when a check fails, so that callers
keep pyfuse3's behaviour instead of writing to memory of unknown layout.
"""

import ctypes
import logging
import os
import struct
from typing import Any

import pyfuse3

log = logging.getLogger(__name__)

POINTER_SIZE = 8

# Slots in struct fuse_lowlevel_ops (fuse_lowlevel.h). libfuse 3 only appends
# handlers, so these numbers are fixed. The table has 44 slots in 3.14.
LOOKUP_SLOT = 2
FALLOCATE_SLOT = 40
_MIN_TABLE_SIZE = 44 * POINTER_SIZE

# How far into struct fuse_session the copy of the table is searched for.
_SESSION_SEARCH_BYTES = 128

# After the table: int got_init, then the pointers cuse_data and userdata,
# then uid_t owner, then struct fuse_conn_info.
_USERDATA_AFTER_TABLE = 16
_OWNER_AFTER_TABLE = 24
_CONN_AFTER_TABLE = 28

# struct fuse_conn_info starts with unsigned proto_major, proto_minor,
# max_write, max_read, max_readahead, capable and want.
_CONN_FIELDS = struct.Struct("<7I")
_WANT_OFFSET = 24
FUSE_PROTOCOL_MAJOR = 7

# Capabilities in fuse_conn_info (fuse_common.h).
CAP_DONT_MASK = 1 << 6
CAP_READDIRPLUS = 1 << 13

_SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
_TABLE_SYMBOL = b"__pyx_v_7pyfuse3_fuse_ops"
_EXPORTED_SYMBOL = b"PyInit_pyfuse3"


class SessionLayoutError(ValueError):
    """pyfuse3's libfuse session is not laid out as this module expects."""


class LibfuseSession:
    """The libfuse session of this process's pyfuse3 mount, at verified addresses."""

    def __init__(self, table_address: int, table_size: int) -> None:
        self._table_address = table_address
        self._table_end = table_address + table_size
        # ctypes callbacks written into the table must live as long as libfuse may call them.
        self._handlers: list[Any] = []

    def set_handler(self, slot: int, handler: Any) -> None:
        """Make libfuse call the ctypes function *handler* for the requests of handler table slot *slot*."""
        self._handlers.append(handler)
        address = self._table_address + slot * POINTER_SIZE
        ctypes.c_void_p.from_address(address).value = ctypes.cast(handler, ctypes.c_void_p).value

    def request_capability(self, capability: int) -> bool:
        """Ask the kernel for *capability* (a CAP_* flag); tell whether it is granted.

        Call it only from Operations.init(), which pyfuse3 runs while libfuse
        handles the kernel's INIT request: libfuse builds its reply from the
        flags afterwards. The kernel grants what it offers in ``capable``.
        """
        address = self._table_end + _CONN_AFTER_TABLE
        major, _minor, _max_write, _max_read, _max_readahead, capable, want = _CONN_FIELDS.unpack(
            ctypes.string_at(address, _CONN_FIELDS.size)
        )
        # pyfuse3 has just checked that the kernel offers READDIRPLUS, and asked
        # for nothing that the kernel does not offer.
        if major != FUSE_PROTOCOL_MAJOR or want & ~capable or not capable & CAP_READDIRPLUS:
            raise SessionLayoutError(
                f"the connection settings read protocol {major}, capable {capable:#x}, want {want:#x}"
            )
        if not capable & capability:
            return False
        ctypes.c_uint.from_address(address + _WANT_OFFSET).value = want | capability
        return True


def locate() -> LibfuseSession:
    """Return pyfuse3's libfuse session; call it after pyfuse3.init().

    Raises SessionLayoutError if the session is not where and what it should be.
    """
    try:
        symbols = _read_symbols(pyfuse3.__file__, {_SESSION_SYMBOL, _TABLE_SYMBOL, _EXPORTED_SYMBOL})
    except (OSError, struct.error) as exc:
        raise SessionLayoutError(f"reading pyfuse3's symbol table failed: {exc}") from None
    base = _load_base(pyfuse3.__file__, symbols[_EXPORTED_SYMBOL][0])

    session = ctypes.c_void_p.from_address(base + symbols[_SESSION_SYMBOL][0]).value
    if not session:
        raise SessionLayoutError("pyfuse3 has no libfuse session; call pyfuse3.init() first")

    table = _handler_table(base, *symbols[_TABLE_SYMBOL])
    table_offset = _find_table_copy(session, table)
    table_end = session + table_offset + len(table)

    userdata = ctypes.c_void_p.from_address(table_end + _USERDATA_AFTER_TABLE).value
    owner = ctypes.c_uint.from_address(table_end + _OWNER_AFTER_TABLE).value
    if userdata is not None or owner != os.getuid():
        raise SessionLayoutError("the fields after the handler table are not pyfuse3's user data and this user")
    log.debug("libfuse session located table_offset=%d", table_offset)
    return LibfuseSession(session + table_offset, len(table))


def _handler_table(base: int, address: int, size: int) -> bytes:
    """Return pyfuse3's handler table, checked for the slots this module relies on."""
    if size < _MIN_TABLE_SIZE:
        raise SessionLayoutError(f"pyfuse3's handler table has {size} bytes, fewer than {_MIN_TABLE_SIZE}")
    table = ctypes.string_at(base + address, size)
    if not _slot(table, LOOKUP_SLOT) or _slot(table, FALLOCATE_SLOT):
        raise SessionLayoutError("pyfuse3's handler table is not laid out as libfuse 3 declares it")
    return table


def _find_table_copy(session: int, table: bytes) -> int:
    """Return the offset of libfuse's copy of *table* in the session at address *session*."""
    copies = [
        offset
        for offset in range(0, _SESSION_SEARCH_BYTES + 1, POINTER_SIZE)
        if ctypes.string_at(session + offset, len(table)) == table
    ]
    if len(copies) != 1:
        raise SessionLayoutError(f"found {len(copies)} copies of pyfuse3's handler table in libfuse's session")
    return copies[0]


def _slot(table: bytes, index: int) -> int:
    return int.from_bytes(table[index * POINTER_SIZE : (index + 1) * POINTER_SIZE], "little")


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _load_base(path: str, exported_value: int) -> int:
    """Return the address where the shared object *path* is loaded, checked against an exported symbol."""
    library = ctypes.CDLL(path)
    exported = ctypes.cast(getattr(library, _EXPORTED_SYMBOL.decode()), ctypes.c_void_p).value
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not libc.dladdr(exported, ctypes.byref(info)) or not info.dli_fbase:
        raise SessionLayoutError("dladdr(3) does not know pyfuse3's shared object")
    if info.dli_fbase + exported_value != exported:
        raise SessionLayoutError("pyfuse3's symbol table does not match the loaded shared object")
    return info.dli_fbase


# ELF64 little-endian: the file header's section table fields, a section header, a symbol.
_ELF_IDENT = b"\x7fELF\x02\x01"
_FILE_HEADER = struct.Struct("<40xQ10xHH2x")
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_SHT_SYMTAB = 2


def _read_symbols(path: str, requested: set[bytes]) -> dict[bytes, tuple[int, int]]:
    """Return the value and size of each symbol in *requested* from the symbol table (.symtab) of an ELF64 file."""
    with open(path, "rb") as elf:
        header = elf.read(_FILE_HEADER.size)
        if not header.startswith(_ELF_IDENT):
            raise SessionLayoutError(f"{path} is not a little-endian ELF64 file")
        section_offset, entry_size, count = _FILE_HEADER.unpack(header)
        table = _read_at(elf, section_offset, count * entry_size)
        sections = [_SECTION_HEADER.unpack_from(table, i * entry_size) for i in range(count)]
        symtab = next((s for s in sections if s[1] == _SHT_SYMTAB), None)
        if symtab is None:
            raise SessionLayoutError(f"{path} has no symbol table (a stripped build)")
        symbols = _read_at(elf, symtab[4], symtab[5])
        strtab = sections[symtab[6]]
        names = _read_at(elf, strtab[4], strtab[5])

    found: dict[bytes, tuple[int, int]] = {}
    for name_index, _info, _other, _section, value, size in _SYMBOL.iter_unpack(symbols):
        name = names[name_index : names.index(b"\0", name_index)]
        if name in requested:
            found[name] = (value, size)
    missing = requested - found.keys()
    if missing:
        raise SessionLayoutError(f"{path} lacks the symbols {', '.join(sorted(m.decode() for m in missing))}")
    return found


def _read_at(file: Any, offset: int, size: int) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise SessionLayoutError(f"{file.name} ends before offset {offset + size}")
    return data
