"""FALLOCATE requests, which pyfuse3 3.5 does not hand to the filesystem.

pyfuse3 registers no fallocate handler with libfuse, so libfuse replies to the
kernel's first FALLOCATE request with ENOSYS. From then on the kernel fails
every fallocate(2) on the mount with EOPNOTSUPP, so holes cannot be punched or
ranges zeroed, and posix_fallocate(3) writes zeros itself instead of
reserving space.

After pyfuse3.init(), install() writes a handler of its own into the table of
request handlers that libfuse keeps in its session. The handler calls the
Operations object's ``fallocate`` coroutine and replies with fuse_reply_err.

Finding that table takes two values that pyfuse3 keeps in module variables:
the session pointer and pyfuse3's own handler table, which libfuse copied
into the session. Neither is exported, but pyfuse3's shared object keeps its
symbol table, so their addresses come from there. The session's first fields
changed between libfuse releases, so the copy is found by comparing, not by a
fixed offset. If anything is not as expected (a stripped build, another
pyfuse3 or libfuse), nothing is written, one warning is logged, and fallocate
stays unsupported as before.

The handler runs inside pyfuse3's request loop, which holds the GIL while
libfuse dispatches a request, so it is called like any other handler: one
request at a time, never alongside one.
"""

import ctypes
import ctypes.util
import errno
import logging
import struct
from typing import Any

import pyfuse3

log = logging.getLogger(__name__)

# Layout of struct fuse_lowlevel_ops (fuse_lowlevel.h). libfuse 3 only appends
# handlers, so the slot of fallocate is fixed. The table contains 44 in 3.14.
_POINTER_SIZE = 8
_FALLOCATE_SLOT = 40
_LOOKUP_SLOT = 2
_MIN_TABLE_SIZE = 44 * _POINTER_SIZE

# How far into struct fuse_session the copy of the table is searched for. The
# fields before it take 32 bytes in libfuse 3.10 and 40 bytes in 3.14.
_SESSION_SEARCH_BYTES = 128

# Offset of ``fh`` in struct fuse_file_info (fuse_common.h): an int and two
# 32-bit bit-field words come first.
_FILE_INFO_FH_OFFSET = 16

_SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
_TABLE_SYMBOL = b"__pyx_v_7pyfuse3_fuse_ops"
_EXPORTED_SYMBOL = b"PyInit_pyfuse3"

_FallocateHandler = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p
)

# The ctypes callback must live as long as libfuse may call it.
_installed: list[Any] = []


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def install(operations: Any) -> bool:
    """Register *operations*.fallocate with libfuse's session; tell whether it worked.

    Call it after pyfuse3.init() and before the request loop starts.
    """
    try:
        slot = _fallocate_slot()
    except (OSError, ValueError, struct.error) as exc:
        log.warning(
            "fallocate handler not installed vol=%s error=%s; fallocate(2) fails with EOPNOTSUPP on this mount",
            operations.volume,
            exc,
        )
        return False

    libfuse = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")
    reply_err = libfuse.fuse_reply_err
    reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    reply_err.restype = ctypes.c_int

    def handle(req: int, ino: int, mode: int, offset: int, length: int, file_info: int) -> None:
        fh = ctypes.c_uint64.from_address(file_info + _FILE_INFO_FH_OFFSET).value
        reply_err(req, _run(operations.fallocate(fh, mode, offset, length)))

    callback = _FallocateHandler(handle)
    _installed.append(callback)
    ctypes.c_void_p.from_address(slot).value = ctypes.cast(callback, ctypes.c_void_p).value
    return True


def _run(coroutine: Any) -> int:
    """Run a handler coroutine that never awaits, and return the errno of the reply (0 for success)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return 0
    except pyfuse3.FUSEError as exc:
        return exc.errno
    except BaseException:
        log.exception("fallocate request failed")
        return errno.EIO
    coroutine.close()
    log.error("fallocate handler waited for something, which the request loop cannot serve here")
    return errno.EIO


def _fallocate_slot() -> int:
    """Return the address of the fallocate slot in the handler table of pyfuse3's libfuse session."""
    symbols = _read_symbols(pyfuse3.__file__, {_SESSION_SYMBOL, _TABLE_SYMBOL, _EXPORTED_SYMBOL})
    base = _load_base(pyfuse3.__file__, symbols[_EXPORTED_SYMBOL][0])

    session = ctypes.c_void_p.from_address(base + symbols[_SESSION_SYMBOL][0]).value
    if not session:
        raise ValueError("pyfuse3 has no libfuse session; call pyfuse3.init() first")

    table_address, table_size = symbols[_TABLE_SYMBOL]
    if table_size < _MIN_TABLE_SIZE:
        raise ValueError(f"pyfuse3's handler table has {table_size} bytes, fewer than {_MIN_TABLE_SIZE}")
    table = ctypes.string_at(base + table_address, table_size)
    if not _slot(table, _LOOKUP_SLOT) or _slot(table, _FALLOCATE_SLOT):
        raise ValueError("pyfuse3's handler table is not laid out as libfuse 3 declares it")

    copies = [
        offset
        for offset in range(0, _SESSION_SEARCH_BYTES + 1, _POINTER_SIZE)
        if ctypes.string_at(session + offset, table_size) == table
    ]
    if len(copies) != 1:
        raise ValueError(f"found {len(copies)} copies of pyfuse3's handler table in libfuse's session, not 1")
    return session + copies[0] + _FALLOCATE_SLOT * _POINTER_SIZE


def _slot(table: bytes, index: int) -> int:
    return int.from_bytes(table[index * _POINTER_SIZE : (index + 1) * _POINTER_SIZE], "little")


def _load_base(path: str, exported_value: int) -> int:
    """Return where the shared object *path* is loaded, checked against an exported symbol's address."""
    library = ctypes.CDLL(path)
    exported = ctypes.cast(getattr(library, _EXPORTED_SYMBOL.decode()), ctypes.c_void_p).value
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not libc.dladdr(exported, ctypes.byref(info)) or not info.dli_fbase:
        raise ValueError("dladdr(3) does not know pyfuse3's shared object")
    if info.dli_fbase + exported_value != exported:
        raise ValueError("pyfuse3's symbol table does not match the loaded shared object")
    return info.dli_fbase


# ELF64 little-endian: the file header's section table fields, a section header, a symbol.
_ELF_IDENT = b"\x7fELF\x02\x01"
_FILE_HEADER = struct.Struct("<40xQ10xHH2x")
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_SHT_SYMTAB = 2


def _read_symbols(path: str, wanted: set[bytes]) -> dict[bytes, tuple[int, int]]:
    """Return value and size of each symbol in *wanted* from the symbol table (.symtab) of an ELF64 file."""
    with open(path, "rb") as elf:
        header = elf.read(_FILE_HEADER.size)
        if not header.startswith(_ELF_IDENT):
            raise ValueError(f"{path} is not a little-endian ELF64 file")
        section_offset, entry_size, count = _FILE_HEADER.unpack(header)
        table = _read_at(elf, section_offset, count * entry_size)
        sections = [_SECTION_HEADER.unpack_from(table, i * entry_size) for i in range(count)]
        symtab = next((s for s in sections if s[1] == _SHT_SYMTAB), None)
        if symtab is None:
            raise ValueError(f"{path} has no symbol table (a stripped build)")
        symbols = _read_at(elf, symtab[4], symtab[5])
        strtab = sections[symtab[6]]
        names = _read_at(elf, strtab[4], strtab[5])

    found: dict[bytes, tuple[int, int]] = {}
    for name_index, _info, _other, _section, value, size in _SYMBOL.iter_unpack(symbols):
        name = names[name_index : names.index(b"\0", name_index)]
        if name in wanted:
            found[name] = (value, size)
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"{path} lacks the symbols {', '.join(sorted(m.decode() for m in missing))}")
    return found


def _read_at(file: Any, offset: int, size: int) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise ValueError(f"{file.name} ends before offset {offset + size}")
    return data
