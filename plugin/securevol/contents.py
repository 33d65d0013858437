"""Plaintext reads, writes and truncation on one backing file, in the format of securevol.format.

The FUSE layer calls these with a backing file descriptor open for reading and
writing. Every operation derives the plaintext size from the ciphertext size
(fstat) and reads the file header from the file itself, so open handles and
path-based truncation of the same file never disagree about its state.

Callers serialise operations on a file: the FUSE process runs each request to
completion before the next one starts.
"""

import errno
import os

from securevol import format as fmt
from securevol.errors import IntegrityError


class EncryptedContents:
    """Reads and writes plaintext ranges of ciphertext files with one volume's ContentCipher."""

    def __init__(self, cipher: fmt.ContentCipher) -> None:
        self._cipher = cipher

    # --- public operations -----------------------------------------------------------------------

    def plain_size(self, fd: int) -> int:
        """Return the plaintext size of the file; a damaged tail counts as shown by readable_plain_size."""
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
        """Write *data* at plaintext *offset*, growing the file through a hole if *offset* is past its end."""
        if not data:
            return

        cipher_size = os.fstat(fd).st_size
        plain_size = fmt.plain_size(cipher_size)
        header, new_header = self._header_for_write(fd, cipher_size)

        if offset > plain_size:
            self._extend(fd, header, new_header, plain_size, offset)
            new_header = None
            plain_size = offset
            cipher_size = fmt.cipher_size(offset)

        blocks = fmt.block_range(offset, len(data))
        run = self._merge_run(fd, header, blocks, offset, data, plain_size, cipher_size)
        ciphertext = self._cipher.encrypt_blocks(header.file_id, blocks.start, run)

        self._reserve(fd, cipher_size, fmt.block_offset(blocks.start) + len(ciphertext))
        if new_header is not None:
            # Only an empty file needs a header, and then the write starts at block 0.
            _pwrite_all(fd, new_header + ciphertext, 0)
        else:
            _pwrite_all(fd, ciphertext, fmt.block_offset(blocks.start))

    def truncate(self, fd: int, new_size: int) -> None:
        """Set the plaintext size of the file to *new_size*, re-encrypting a partial last block.

        Truncating to zero removes the header too, so the next write starts a
        new file ID and blocks of the old contents can never be replayed into
        the new ones. It works on a damaged file, so that users can recover.
        """
        if new_size == 0:
            os.ftruncate(fd, 0)
            return

        cipher_size = os.fstat(fd).st_size
        plain_size = fmt.plain_size(cipher_size)
        if new_size == plain_size:
            return

        header, new_header = self._header_for_write(fd, cipher_size)
        if new_size > plain_size:
            self._extend(fd, header, new_header, plain_size, new_size)
        else:
            self._shrink(fd, header, cipher_size, new_size)

    # --- steps -----------------------------------------------------------------------------------

    def _checked_size_for_read(self, cipher_size: int, offset: int, size: int) -> int:
        """Return the plaintext size, raising IntegrityError if the read reaches a damaged tail."""
        try:
            return fmt.plain_size(cipher_size)
        except IntegrityError:
            if cipher_size < fmt.HEADER_LEN:
                raise
            plain_size = fmt.readable_plain_size(cipher_size)
            if offset + size > plain_size:
                raise fmt.BlockIntegrityError(fmt.block_count(plain_size)) from None
            return plain_size

    def _read_header(self, fd: int) -> fmt.FileHeader:
        return fmt.FileHeader.parse(os.pread(fd, fmt.HEADER_LEN, 0))

    def _header_for_write(self, fd: int, cipher_size: int) -> tuple[fmt.FileHeader, bytes | None]:
        """Return the file's header, and its bytes if the file has none yet and the caller must write it."""
        if cipher_size == 0:
            header = fmt.FileHeader.new()
            return header, header.to_bytes()
        return self._read_header(fd), None

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
        old value; the run ends at the end of the file when that is earlier
        than the end of the last block.
        """
        run_start = blocks.start * fmt.BLOCK_SIZE
        end = offset + len(data)
        run_end = max(end, min(blocks.stop * fmt.BLOCK_SIZE, plain_size))
        if offset == run_start and end == run_end:
            return data  # whole blocks, or whole blocks up to the new end of the file

        run = bytearray(run_end - run_start)
        last = blocks.stop - 1
        if offset > run_start:
            head = self._read_blocks(fd, header, blocks.start, blocks.start + 1, cipher_size)
            run[: len(head)] = head
        if run_end > end and (last != blocks.start or offset == run_start):
            tail = self._read_blocks(fd, header, last, last + 1, cipher_size)
            tail_start = last * fmt.BLOCK_SIZE - run_start
            run[tail_start : tail_start + len(tail)] = tail
        run[offset - run_start : end - run_start] = data
        return run

    def _extend(
        self, fd: int, header: fmt.FileHeader, new_header: bytes | None, old_size: int, new_size: int
    ) -> None:
        """Grow the file from *old_size* to *new_size* plaintext bytes; the new bytes read as zeros.

        A partial last block is re-encrypted padded with zeros, up to the end of
        its block or the new size. The backing filesystem fills the rest with
        zeros, which read as holes.
        """
        if new_header is not None:
            _pwrite_all(fd, new_header, 0)

        if old_size % fmt.BLOCK_SIZE:
            last = old_size // fmt.BLOCK_SIZE
            block_start = last * fmt.BLOCK_SIZE
            padded_len = min(new_size, block_start + fmt.BLOCK_SIZE) - block_start
            old_block = self._read_blocks(fd, header, last, last + 1, fmt.cipher_size(old_size))
            padded = bytes(old_block) + bytes(padded_len - len(old_block))
            _pwrite_all(fd, self._cipher.encrypt_blocks(header.file_id, last, padded), fmt.block_offset(last))

        os.ftruncate(fd, fmt.cipher_size(new_size))

    def _shrink(self, fd: int, header: fmt.FileHeader, cipher_size: int, new_size: int) -> None:
        """Cut the file to *new_size* plaintext bytes, re-encrypting the new partial last block."""
        kept = new_size % fmt.BLOCK_SIZE
        if kept:
            last = new_size // fmt.BLOCK_SIZE
            old_block = self._read_blocks(fd, header, last, last + 1, cipher_size)
            ciphertext = self._cipher.encrypt_blocks(header.file_id, last, old_block[:kept])
            _pwrite_all(fd, ciphertext, fmt.block_offset(last))

        os.ftruncate(fd, fmt.cipher_size(new_size))

    def _reserve(self, fd: int, cipher_size: int, new_cipher_size: int) -> None:
        """Allocate backing space for a write past the end, so that a full disk fails it before any byte lands.

        Without this, ENOSPC part way through a write could leave a last block
        of impossible length. Filesystems without fallocate(2) skip the check.
        """
        if new_cipher_size <= cipher_size:
            return
        try:
            os.posix_fallocate(fd, cipher_size, new_cipher_size - cipher_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written

