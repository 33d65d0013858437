"""Plaintext reads, writes and truncation on one backing file, in the format of securevol.format.

The FUSE layer calls these with a backing file descriptor open for reading and
writing. Every operation derives the plaintext size from the ciphertext size
(fstat) and reads the file header from the file itself, so open handles and
path-based truncation of the same file never disagree about its state.

A change is first planned as a list of backing writes and truncations, all
computed from the file as it is, and then handed to an *apply* function. The
FUSE layer passes the journal's (securevol.journal), which makes each plan
atomic against the death of the process.

Callers serialise operations on a file: the FUSE process runs each request to
completion before the next one starts.
"""

import errno
import os
from collections.abc import Callable
from typing import NamedTuple

from securevol import format as fmt
from securevol import syscalls
from securevol.errors import IntegrityError


class WriteOp(NamedTuple):
    """Write *data* at *offset* of the backing file."""

    offset: int
    data: bytes | bytearray


class TruncateOp(NamedTuple):
    """Set the backing file's size to *length* bytes."""

    length: int


Op = WriteOp | TruncateOp

# The largest size of a backing file: off_t is a signed 64-bit integer. The
# kernel takes plaintext offsets up to this limit too, and the ciphertext of
# a plaintext that large is about 0.8% larger.
MAX_CIPHER_SIZE = 2**63 - 1
ApplyFunction = Callable[[int, list[Op]], None]


def apply_ops(fd: int, ops: list[Op]) -> None:
    """Carry out *ops* on the backing file *fd* in order, without a journal."""
    for op in ops:
        if isinstance(op, WriteOp):
            pwrite_all(fd, op.data, op.offset)
        else:
            os.ftruncate(fd, op.length)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _check_cipher_size(plain_end: int) -> None:
    """Raise EFBIG if a file of *plain_end* plaintext bytes needs a backing file beyond MAX_CIPHER_SIZE."""
    if fmt.cipher_size(plain_end) > MAX_CIPHER_SIZE:
        raise OSError(errno.EFBIG, f"a file of {plain_end} bytes is too large for the backing filesystem")


class EncryptedContents:
    """Reads and writes plaintext ranges of ciphertext files with one volume's ContentCipher."""

    def __init__(self, cipher: fmt.ContentCipher, apply: ApplyFunction = apply_ops) -> None:
        self._cipher = cipher
        self._apply = apply

    # --- public operations -----------------------------------------------------------------------

    def plain_size(self, fd: int) -> int:
        """Return the plaintext size of the file, a damaged tail counted as readable_plain_size does."""
        return fmt.readable_plain_size(os.fstat(fd).st_size)

    def read(self, fd: int, offset: int, size: int) -> memoryview:
        """Return up to *size* plaintext bytes from *offset*; fewer only at the end of the file.

        Raises IntegrityError if a block in the range, the file header or the
        length of the last block fails its check.
        """
        cipher_size = os.fstat(fd).st_size
        plain_size = self._checked_size_for_read(cipher_size, offset, size)
        end = min(offset + size, plain_size)
        if offset >= end:
            return memoryview(b"")

        header = self._read_header(fd)
        blocks = fmt.block_range(offset, end - offset)
        plaintext = self._read_blocks(fd, header, blocks.start, blocks.stop, cipher_size)

        run_start = blocks.start * fmt.BLOCK_SIZE
        return memoryview(plaintext)[offset - run_start : end - run_start]

    def write(self, fd: int, offset: int, data: bytes) -> None:
        """Write *data* at plaintext *offset*; a gap past the old end of the file reads as zeros."""
        if not data:
            return
        _check_cipher_size(offset + len(data))

        cipher_size = os.fstat(fd).st_size
        plain_size = fmt.plain_size(cipher_size)
        header, ops = self._header_ops(fd, cipher_size)
        blocks = fmt.block_range(offset, len(data))

        if plain_size // fmt.BLOCK_SIZE < blocks.start:
            ops += self._pad_ops(fd, header, plain_size, cipher_size, offset)
        run = self._merge_run(fd, header, blocks, offset, data, plain_size, cipher_size)
        ciphertext = self._cipher.encrypt_blocks(header.file_id, blocks.start, run)
        if cipher_size == 0 and blocks.start == 0:
            # One write of header and blocks: a small new file then fits in
            # one page, which the journal needs no record for.
            ops = [WriteOp(0, header.to_bytes() + ciphertext)]
        else:
            ops.append(WriteOp(fmt.block_offset(blocks.start), ciphertext))
        self._apply(fd, ops)

    def truncate(self, fd: int, new_size: int) -> None:
        """Set the plaintext size of the file to *new_size*, re-encrypting a partial last block.

        Truncating to zero removes the header too, so the next write starts a
        new file ID and blocks of the old contents can never be replayed into
        the new ones. Truncating to zero works on a damaged file, so that users
        can recover.
        """
        if new_size == 0:
            self._apply(fd, [TruncateOp(0)])
            return
        _check_cipher_size(new_size)

        cipher_size = os.fstat(fd).st_size
        plain_size = fmt.plain_size(cipher_size)
        if new_size == plain_size:
            return

        header, ops = self._header_ops(fd, cipher_size)
        if new_size > plain_size:
            ops += self._pad_ops(fd, header, plain_size, cipher_size, new_size)
        else:
            ops += self._shrink_ops(fd, header, cipher_size, new_size)
        ops.append(TruncateOp(fmt.cipher_size(new_size)))
        self._apply(fd, ops)

    def allocate(self, fd: int, offset: int, length: int, keep_size: bool) -> None:
        """Reserve backing space for plaintext [offset, offset + length); grow the file unless *keep_size*.

        The space is reserved first, so a full disk fails before anything
        changes. Reserved ciphertext reads as zeros, which are holes.
        """
        end = offset + length
        _check_cipher_size(end)
        self._reserve(fd, offset, end)
        if not keep_size and end > self.plain_size(fd):
            self.truncate(fd, end)

    def zero_range(self, fd: int, offset: int, length: int, keep_size: bool) -> None:
        """Make plaintext [offset, offset + length) read as zeros, as FALLOC_FL_ZERO_RANGE does.

        Whole blocks become holes with their backing space still reserved,
        and the partial blocks at either end are rewritten with zeros. Unless
        *keep_size*, the file grows to the end of the range.
        """
        end = offset + length
        _check_cipher_size(end)
        self._reserve(fd, offset, end)
        self._zero_within_size(fd, offset, end, reserve=True)
        if not keep_size and end > self.plain_size(fd):
            self.truncate(fd, end)

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        """Make plaintext [offset, offset + length) read as zeros and free the backing space of its whole blocks.

        The file keeps its size, as FALLOC_FL_PUNCH_HOLE requires.
        """
        self._zero_within_size(fd, offset, offset + length, reserve=False)

    # --- planning steps --------------------------------------------------------------------------

    def _reserve(self, fd: int, offset: int, end: int) -> None:
        """Allocate the backing space of the whole ciphertext blocks under plaintext [offset, end)."""
        start = fmt.block_offset(offset // fmt.BLOCK_SIZE)
        stop = fmt.block_offset(fmt.block_count(end))
        syscalls.fallocate(fd, syscalls.FALLOC_FL_KEEP_SIZE, start, stop - start)

    def _zero_within_size(self, fd: int, offset: int, end: int, reserve: bool) -> None:
        """Make plaintext [offset, end), clipped to the file's size, read as zeros.

        The blocks wholly inside the range become holes in the backing file,
        which read as zeros. The last block of the file counts as whole when
        the range reaches the end of the file. A partial block at either end
        is rewritten with zeros through write(), with its journal, unless it
        reads as zeros already. The punch comes before those writes, so that a
        backing filesystem that cannot punch holes fails the request unchanged.
        """
        cipher_size = os.fstat(fd).st_size
        plain_size = fmt.plain_size(cipher_size)
        end = min(end, plain_size)
        if offset >= end:
            return

        first = -(-offset // fmt.BLOCK_SIZE)
        stop = fmt.block_count(plain_size) if end == plain_size else end // fmt.BLOCK_SIZE
        if first >= stop:
            if not self._reads_as_zeros(fd, offset, end):
                self.write(fd, offset, bytes(end - offset))
            return

        head = (offset, first * fmt.BLOCK_SIZE) if offset < first * fmt.BLOCK_SIZE else None
        tail = (stop * fmt.BLOCK_SIZE, end) if stop * fmt.BLOCK_SIZE < end else None
        partial = [edge for edge in (head, tail) if edge is not None and not self._reads_as_zeros(fd, *edge)]

        start = fmt.block_offset(first)
        length = min(fmt.block_offset(stop), cipher_size) - start
        syscalls.fallocate(fd, syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE, start, length)
        if reserve:
            syscalls.fallocate(fd, syscalls.FALLOC_FL_KEEP_SIZE, start, length)

        for edge_start, edge_end in partial:
            self.write(fd, edge_start, bytes(edge_end - edge_start))

    def _reads_as_zeros(self, fd: int, offset: int, end: int) -> bool:
        """Tell whether plaintext [offset, end) is all zeros already, such as in a hole.

        Zeroing calls this for the partial blocks at the ends of a range
        before anything changes, so a damaged block fails the request with
        the file untouched, and zeros need no rewrite that takes disk space.
        """
        plaintext = self.read(fd, offset, end - offset)
        return plaintext == bytes(len(plaintext))

    def _checked_size_for_read(self, cipher_size: int, offset: int, size: int) -> int:
        """Return the plaintext size, raising IntegrityError if the read reaches a damaged tail."""
        try:
            return fmt.plain_size(cipher_size)
        except IntegrityError:
            if cipher_size < fmt.HEADER_LEN:
                raise
            plain_size = fmt.intact_plain_size(cipher_size)
            if offset + size > plain_size:
                raise fmt.BlockIntegrityError(fmt.block_count(plain_size)) from None
            return plain_size

    def _read_header(self, fd: int) -> fmt.FileHeader:
        return fmt.FileHeader.parse(os.pread(fd, fmt.HEADER_LEN, 0))

    def _header_ops(self, fd: int, cipher_size: int) -> tuple[fmt.FileHeader, list[Op]]:
        """Return the file's header, and the op that writes a new one if the file has none yet."""
        if cipher_size == 0:
            header = fmt.FileHeader.new()
            return header, [WriteOp(0, header.to_bytes())]
        return self._read_header(fd), []

    def _read_blocks(
        self, fd: int, header: fmt.FileHeader, first: int, stop: int, cipher_size: int
    ) -> bytearray:
        """Decrypt blocks [first, stop) of a file whose ciphertext is *cipher_size* bytes long."""
        start = fmt.block_offset(first)
        length = min(fmt.block_offset(stop), cipher_size) - start
        ciphertext = os.pread(fd, length, start)
        if len(ciphertext) != length:
            raise IntegrityError(f"ciphertext ended early: want {length} bytes at {start}, have {len(ciphertext)}")
        return self._cipher.decrypt_blocks(header.file_id, first, ciphertext)

    def _pad_ops(
        self, fd: int, header: fmt.FileHeader, plain_size: int, cipher_size: int, new_end: int
    ) -> list[Op]:
        """Return the op that pads a partial last block with zeros when the file grows past its block.

        Growing within the partial last block, or from a block boundary, needs
        no op here. Beyond the padded block, the backing filesystem fills the
        gap with zeros, which read as holes.
        """
        last = plain_size // fmt.BLOCK_SIZE
        partial = plain_size % fmt.BLOCK_SIZE
        if not partial or new_end <= plain_size:
            return []

        block_start = last * fmt.BLOCK_SIZE
        padded_len = min(new_end, block_start + fmt.BLOCK_SIZE) - block_start
        old_block = self._read_blocks(fd, header, last, last + 1, cipher_size)
        padded = bytes(old_block) + bytes(padded_len - len(old_block))
        return [WriteOp(fmt.block_offset(last), self._cipher.encrypt_blocks(header.file_id, last, padded))]

    def _merge_run(
        self,
        fd: int,
        header: fmt.FileHeader,
        blocks: range,
        offset: int,
        data: bytes,
        plain_size: int,
        cipher_size: int,
    ) -> bytes | bytearray:
        """Return the plaintext of whole blocks *blocks* with *data* written at *offset* into them.

        Bytes of the first and last block outside the written range keep their
        old value, or are zeros past the old end of the file. The run ends at
        the end of the file when that is earlier than the end of the last block.
        """
        run_start = blocks.start * fmt.BLOCK_SIZE
        end = offset + len(data)
        run_end = max(end, min(blocks.stop * fmt.BLOCK_SIZE, plain_size))
        if offset == run_start and end == run_end:
            return data  # whole blocks, or whole blocks up to the new end of the file

        run = bytearray(run_end - run_start)
        last = blocks.stop - 1
        head_read = offset > run_start and run_start < plain_size
        if head_read:
            head = self._read_blocks(fd, header, blocks.start, blocks.start + 1, cipher_size)
            run[: len(head)] = head
        if run_end > end and not (head_read and last == blocks.start):
            tail = self._read_blocks(fd, header, last, last + 1, cipher_size)
            tail_start = last * fmt.BLOCK_SIZE - run_start
            run[tail_start : tail_start + len(tail)] = tail
        run[offset - run_start : end - run_start] = data
        return run

    def _shrink_ops(self, fd: int, header: fmt.FileHeader, cipher_size: int, new_size: int) -> list[Op]:
        """Return the op that re-encrypts the block that becomes the new partial last block, if any."""
        kept = new_size % fmt.BLOCK_SIZE
        if not kept:
            return []
        last = new_size // fmt.BLOCK_SIZE
        old_block = self._read_blocks(fd, header, last, last + 1, cipher_size)
        ciphertext = self._cipher.encrypt_blocks(header.file_id, last, old_block[:kept])
        return [WriteOp(fmt.block_offset(last), ciphertext)]

