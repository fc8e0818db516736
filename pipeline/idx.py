"""Parse IDX files (the MNIST format) with validation, from bytes or from a (gzipped) file.

Layout: two zero bytes, a type code, the number of dimensions, then each dimension as a
big-endian uint32, then the data, big-endian, row-major. The parser checks every header
field against the bytes actually present before it allocates anything, so a corrupt or
hostile header yields an :class:`IdxError`, never a huge allocation.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

# IDX type code -> big-endian numpy dtype
DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_DIMS = 8
# Without a bound of the caller's (pipeline.datasets passes each file's published size),
# refuse files that declare more than this much data (MNIST's largest file is 47 MB).
MAX_DATA_BYTES = 1 << 30
GZIP_MAGIC = b"\x1f\x8b"
_READ_BLOCK = 1 << 20


class IdxError(ValueError):
    """The bytes are not a valid IDX file."""


def parse_header(head: bytes, *, source: str = "IDX data") -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, shape, header length) from the first bytes of an IDX file."""
    if len(head) < 4:
        raise IdxError(f"{source}: {len(head)} bytes is too short for an IDX header (needs at least 4)")
    zero0, zero1, type_code, ndim = head[0], head[1], head[2], head[3]
    if zero0 != 0 or zero1 != 0:
        raise IdxError(
            f"{source}: bad magic number {head[:4].hex()} (an IDX file starts with two zero bytes); "
            "is this really an IDX file?"
        )
    if type_code not in DTYPES:
        raise IdxError(f"{source}: unknown IDX type code 0x{type_code:02x}; expected one of "
                       + ", ".join(f"0x{c:02x}" for c in DTYPES))
    if not 1 <= ndim <= MAX_DIMS:
        raise IdxError(f"{source}: {ndim} dimensions declared; expected 1 to {MAX_DIMS}")
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise IdxError(f"{source}: header declares {ndim} dimensions but the data ends after {len(head)} bytes")
    shape = struct.unpack(f">{ndim}I", head[4:header_len])
    return DTYPES[type_code], tuple(int(n) for n in shape), header_len


def _expected_data_bytes(dtype: np.dtype, shape: tuple[int, ...], source: str, max_bytes: int) -> int:
    # Bound the shape's extent with zero dimensions counted as one: (0, 2**32, 2**32)
    # declares no data, but no array can have that shape.
    extent = dtype.itemsize
    for n in shape:
        extent *= max(n, 1)
    header_len = 4 + 4 * len(shape)
    if header_len + extent > max_bytes:
        raise IdxError(
            f"{source}: header declares shape {shape} ({header_len + extent:,} bytes with its header), "
            f"more than the {max_bytes:,}-byte limit; the file is corrupt or not a dataset file"
        )
    return 0 if 0 in shape else extent


def parse_idx(data: bytes, *, source: str = "IDX data", max_bytes: int = MAX_DATA_BYTES) -> np.ndarray:
    """Parse an uncompressed IDX file held in memory into a native-endian array."""
    dtype, shape, header_len = parse_header(data[: 4 + 4 * MAX_DIMS], source=source)
    expected = _expected_data_bytes(dtype, shape, source, max_bytes)
    actual = len(data) - header_len
    if actual != expected:
        raise IdxError(
            f"{source}: header declares shape {shape} of {dtype.name} ({expected:,} data bytes) "
            f"but {actual:,} data bytes follow; the file is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def read_idx_file(path: str | Path, *, max_bytes: int = MAX_DATA_BYTES) -> np.ndarray:
    """Read an IDX file, gzipped or not, of at most ``max_bytes`` once decompressed.

    Decompresses no more than the header declares (plus one byte, to notice trailing
    data), and refuses a header that declares more than ``max_bytes`` before reading on:
    a gzip bomb costs memory in proportion to ``max_bytes``, not to what it declares.
    """
    path = Path(path)
    source = str(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            head = _read_at_most(stream, 4, source)
            if len(head) == 4 and 1 <= head[3] <= MAX_DIMS:
                head += _read_at_most(stream, 4 * head[3], source)
            dtype, shape, header_len = parse_header(head, source=source)
            expected = _expected_data_bytes(dtype, shape, source, max_bytes)
            # Read one byte more than declared to notice trailing garbage.
            body = _read_at_most(stream, expected + 1, source)
        except (EOFError, OSError, zlib.error) as error:
            raise IdxError(f"{source}: cannot decompress: {error}; the file is truncated or corrupt") from None
    return parse_idx(head + body, source=source, max_bytes=max_bytes)


def _read_at_most(stream, n_bytes: int, source: str) -> bytes:
    """Read up to n_bytes in blocks, so memory grows with the data present, not the request."""
    parts = []
    remaining = n_bytes
    while remaining > 0:
        block = stream.read(min(remaining, _READ_BLOCK))
        if not block:
            break
        parts.append(block)
        remaining -= len(block)
    return b"".join(parts)
