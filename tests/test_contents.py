"""Tests of plaintext writes, reads and truncation on real backing files, against a bytearray model."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securevol import format as fmt
from securevol.contents import EncryptedContents, apply_ops
from securevol.errors import IntegrityError

KEY = bytes(range(32))
B = fmt.BLOCK_SIZE  # plaintext bytes per full block

offsets = st.one_of(
    st.integers(0, 3 * B + 50),
    st.sampled_from([0, 1, B - 1, B, B + 1, 2 * B]),
    st.integers(0, 40).map(lambda n: n * B),
)
lengths = st.one_of(st.integers(1, 3 * B), st.sampled_from([1, B - 1, B, B + 1, 3 * B]))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, lengths, st.integers(0, 255)),
        st.tuples(st.just("truncate"), offsets),
    ),
    max_size=12,
)


@pytest.fixture
def backing_fd(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_matches_bytearray_model(backing_fd, ops):
    store = EncryptedContents(fmt.ContentCipher(KEY))
    os.ftruncate(backing_fd, 0)
    model = bytearray()

    for op in ops:
        if op[0] == "write":
            _, offset, length, fill = op
            data = bytes([fill]) * length
            store.write(backing_fd, offset, data)
            model.extend(bytes(max(0, offset - len(model))))
            model[offset : offset + length] = data
        else:
            _, size = op
            store.truncate(backing_fd, size)
            del model[size:]
            model.extend(bytes(size - len(model)))

        assert os.fstat(backing_fd).st_size == fmt.cipher_size(len(model))
        assert store.plain_size(backing_fd) == len(model)

    assert bytes(store.read(backing_fd, 0, len(model) + 10)) == bytes(model)
    for offset in (0, 1, B - 1, B, len(model) // 2, len(model)):
        assert bytes(store.read(backing_fd, offset, 5000)) == bytes(model[offset : offset + 5000])


def test_write_into_hole_keeps_file_sparse(backing_fd):
    store = EncryptedContents(fmt.ContentCipher(KEY))

    store.write(backing_fd, 100 * 2**20, b"far away")

    assert os.fstat(backing_fd).st_blocks * 512 < 1 * 2**20
    assert bytes(store.read(backing_fd, 50 * 2**20, B)) == bytes(B)


def test_damaged_tail_read_and_reset(backing_fd):
    store = EncryptedContents(fmt.ContentCipher(KEY))
    store.write(backing_fd, 0, b"x" * (B + 904))
    os.ftruncate(backing_fd, fmt.block_offset(1) + 10)

    assert store.plain_size(backing_fd) == B + 1  # the damaged tail counts as one byte
    assert bytes(store.read(backing_fd, 0, B)) == b"x" * B
    with pytest.raises(fmt.BlockIntegrityError) as info:
        store.read(backing_fd, B - 96, 200)
    assert info.value.block_no == 1
    with pytest.raises(IntegrityError):
        store.write(backing_fd, 0, b"y")

    store.truncate(backing_fd, 0)
    assert os.fstat(backing_fd).st_size == 0


def test_truncate_to_zero_starts_new_file_id(backing_fd):
    store = EncryptedContents(fmt.ContentCipher(KEY))
    store.write(backing_fd, 0, b"first contents")
    first_id = os.pread(backing_fd, fmt.HEADER_LEN, 0)[8:]

    store.truncate(backing_fd, 0)
    store.write(backing_fd, 0, b"second contents")

    assert os.pread(backing_fd, fmt.HEADER_LEN, 0)[8:] != first_id


def test_small_first_write_one_op(backing_fd):
    # The journal keeps no record for a single write within one page, so a
    # small new file costs no journal writes.
    plans = []
    store = EncryptedContents(fmt.ContentCipher(KEY), lambda fd, ops: (plans.append(ops), apply_ops(fd, ops)))

    store.write(backing_fd, 0, b"x" * 1000)
    store.write(backing_fd, 1000, b"y" * 10)

    assert [[(type(op).__name__, op.offset, len(op.data)) for op in ops] for ops in plans] == [
        [("WriteOp", 0, fmt.HEADER_LEN + fmt.BLOCK_OVERHEAD + 1000)],
        [("WriteOp", fmt.HEADER_LEN, fmt.BLOCK_OVERHEAD + 1010)],
    ]
    assert bytes(store.read(backing_fd, 0, 2000)) == b"x" * 1000 + b"y" * 10
