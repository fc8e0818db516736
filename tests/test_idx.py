import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idx_files import idx_bytes
from weightlapse.pipeline.idx import IdxError, parse_idx, read_idx_file


def test_real_mnist_test_split_parses(shared_mnist):
    images = read_idx_file(shared_mnist / "t10k-images-idx3-ubyte.gz")
    labels = read_idx_file(shared_mnist / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    # The first test digit is a 7, drawn in the middle of the frame.
    assert labels[0] == 7
    assert images[0, :4].sum() == 0 and images[0, 10:20, 10:20].max() > 200


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_round_trip_every_idx_type(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(array))
    parsed = read_idx_file(path)
    assert parsed.dtype == np.dtype(dtype) and np.array_equal(parsed, array)
    gz = tmp_path / "a.idx.gz"
    gz.write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(read_idx_file(gz), array)


def header(type_code, *dims):
    return struct.pack(">BBBB", 0, 0, type_code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"PK\x03\x04rest", "bad magic number"),
        (header(0x07, 2), "unknown IDX type code 0x07"),
        (struct.pack(">BBBB", 0, 0, 8, 0), "0 dimensions"),
        (struct.pack(">BBBB", 0, 0, 8, 3) + b"\x00\x00", "ends after 6 bytes"),
        (header(0x08, 2, 3) + b"\x01" * 5, "truncated or corrupt"),
        (header(0x08, 2, 3) + b"\x01" * 7, "6 data bytes"),
        (header(0x0C, 5) + b"\x00" * 19, "int32"),
    ],
)
def test_malformed_bytes_give_clear_errors(data, message):
    with pytest.raises(IdxError, match=message):
        parse_idx(data)


def test_lying_header_is_refused_without_allocating_what_it_declares(tmp_path, peak_memory):
    # A 1 KB gzip file whose header claims 60000 x 28 x 28 x 4 bytes (188 MB).
    path = tmp_path / "liar.gz"
    path.write_bytes(gzip.compress(header(0x0C, 60000, 28, 28) + b"\x00" * 1000))
    with peak_memory, pytest.raises(IdxError, match="truncated or corrupt"):
        read_idx_file(path)
    assert peak_memory.peak_bytes < 8 * 1024 * 1024


def test_header_beyond_the_size_limit_is_refused(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(header(0x0E, 2**31, 2**31))
    with pytest.raises(IdxError, match="limit"):
        read_idx_file(path)


def test_truncated_gzip_is_an_idx_error(tmp_path):
    data = gzip.compress(idx_bytes(np.arange(5000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdxError, match="cannot decompress|truncated"):
        read_idx_file(path)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_give_an_array_or_idx_error(data):
    try:
        array = parse_idx(data)
    except IdxError:
        return
    assert array.nbytes <= len(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([8, 9, 0x0B, 0x0C, 0x0D, 0x0E]),
       st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4), st.binary(max_size=64))
def test_random_headers_give_an_array_or_idx_error(type_code, dims, body):
    try:
        array = parse_idx(header(type_code, *dims) + body)
    except IdxError:
        return
    assert array.nbytes == len(body)


def test_a_zero_dimension_beside_huge_ones_is_refused():
    # Declares no data bytes, but no array can have this shape (found by hypothesis).
    with pytest.raises(IdxError, match="limit"):
        parse_idx(header(0x0C, 0, 2**32 - 1, 2**32 - 1))
    assert parse_idx(header(0x08, 0, 28, 28)).shape == (0, 28, 28)


def test_a_gzip_bomb_is_refused_at_the_callers_bound_before_decompressing(tmp_path, peak_memory):
    # 55 MB of zeros in 53 KB; the header says so honestly, but it is more than the caller allows.
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(header(0x08, 70_000, 28, 28) + bytes(70_000 * 784)))
    with peak_memory, pytest.raises(IdxError, match=r"\(54,880,016 bytes with its header\), more than the "
                                                   r"1,000,000-byte limit"):
        read_idx_file(path, max_bytes=1_000_000)
    assert peak_memory.peak_bytes < 1 << 20
    assert read_idx_file(path).shape == (70_000, 28, 28)  # within the default bound


def test_the_bound_counts_the_header(tmp_path):
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(np.zeros(10, np.uint8)))  # 8 header bytes + 10
    assert read_idx_file(path, max_bytes=18).shape == (10,)
    with pytest.raises(IdxError, match="more than the 17-byte limit"):
        read_idx_file(path, max_bytes=17)
