"""Decoders that never inflate a chunk past its size: a store's compressors, checked before they allocate.

A compressor's output size comes from the chunk file itself (Blosc's and zstd's headers
declare it, pcodec's counts its values, gzip simply runs on), so a store made to harm its
reader can hold a chunk of a few kilobytes that decodes into gigabytes: zarr's own
decoders would allocate them all before the chunk's shape is compared. The chunk's shape
is known from the array's metadata (and :mod:`.check` bounds it), so each decoder here
refuses, before allocating, to produce more than that chunk holds: Blosc and zstd by their
headers, gzip by decompressing at most that much, pcodec by decoding into a buffer of the
chunk's size. Valid chunks decode exactly as zarr's own decoders decode them.

:func:`install` makes zarr choose these for the codec names weightlapse reads (the Zarr v3
config's ``codecs`` entries); it is called when :mod:`weightlapse.pipeline.store` is imported.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import zarr
from pcodec import standalone
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec
from zarr.codecs.numcodecs import PCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

# A compressed stream decoded into another stream (one compressor after another) may be a
# little larger than the bytes it holds: the bound allows for that, no more.
SLACK = 1 / 8
SLACK_BYTES = 4096
ZSTD_MAGIC = 0xFD2FB528


class ChunkTooLarge(ValueError):
    """A chunk whose data would decode to more than its array's chunk holds."""


def chunk_size(spec: ArraySpec) -> int:
    """Bytes of a decoded chunk of ``spec``."""
    return math.prod(spec.shape) * spec.dtype.to_native_dtype().itemsize


def bound(spec: ArraySpec) -> int:
    """The most bytes a compressor's output may hold for a chunk of ``spec``."""
    size = chunk_size(spec)
    return size + int(size * SLACK) + SLACK_BYTES


def _refuse(codec: str, declared: int | str, spec: ArraySpec) -> ChunkTooLarge:
    return ChunkTooLarge(f"a {codec} chunk that would decode to {declared} bytes, more than its array's chunk of "
                         f"{chunk_size(spec):,} bytes; the file is not a chunk this array wrote")


class BoundedBlosc(BloscCodec):
    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        data = chunk_bytes.as_numpy_array()
        if data.nbytes >= 16:  # Blosc's header: uncompressed size at bytes 4..8 (shorter: Blosc refuses it)
            declared = struct.unpack_from("<I", data[:16].tobytes(), 4)[0]
            if declared > bound(chunk_spec):
                raise _refuse("Blosc", f"{declared:,}", chunk_spec)
        return super()._decode_sync(chunk_bytes, chunk_spec)


class BoundedZstd(ZstdCodec):
    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        declared = zstd_content_size(chunk_bytes.as_numpy_array().tobytes())
        if declared is None:
            raise _refuse("zstd", "an undeclared number of", chunk_spec)
        if declared > bound(chunk_spec):
            raise _refuse("zstd", f"{declared:,}", chunk_spec)
        return super()._decode_sync(chunk_bytes, chunk_spec)


def zstd_content_size(data: bytes) -> int | None:
    """The bytes a zstd stream decodes to, as its frames' headers declare them (RFC 8878:
    the decoder decodes every frame of a chunk, one after another), or None if a frame
    declares none or the stream cannot be walked (the decoder then refuses it too)."""
    total, at = 0, 0
    while at < len(data):
        if len(data) < at + 8:
            return None
        magic = int.from_bytes(data[at:at + 4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: no content
            at += 8 + int.from_bytes(data[at + 4:at + 8], "little")
            continue
        if magic != ZSTD_MAGIC:
            return None
        descriptor = data[at + 4]
        single_segment = bool(descriptor & 0x20)
        field = (0, 2, 4, 8)[descriptor >> 6] or (1 if single_segment else 0)
        if field == 0:
            return None
        at += 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 0x03]
        size = int.from_bytes(data[at:at + field], "little")
        total += size + 256 if field == 2 else size
        at += field
        while True:  # the frame's blocks: a 3-byte header each, then its bytes (one for a repeated byte)
            if len(data) < at + 3:
                return None
            header = int.from_bytes(data[at:at + 3], "little")
            kind = (header >> 1) & 3
            if kind == 3:
                return None
            at += 3 + (1 if kind == 1 else header >> 3)
            if header & 1:
                break
        at += 4 if descriptor & 0x04 else 0  # the frame's checksum
    return total


class BoundedGzip(GzipCodec):
    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        limit = bound(chunk_spec)
        data, out = chunk_bytes.as_numpy_array().tobytes(), []
        while data:  # every gzip member, one after another, as gzip.decompress reads them
            decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                out.append(decoder.decompress(data, limit + 1 - sum(map(len, out))))
            except zlib.error as error:
                raise ValueError(f"a gzip chunk that cannot be decompressed: {error}") from None
            if sum(map(len, out)) > limit or decoder.unconsumed_tail:
                raise _refuse("gzip", f"more than {limit:,}", chunk_spec)
            if not decoder.eof:
                raise ValueError("a gzip chunk that ends before its stream does")
            data = decoder.unused_data
        return chunk_spec.prototype.buffer.from_bytes(b"".join(out))


class BoundedPCodec(PCodec):
    async def _decode_single(self, chunk_data: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        out = np.empty(math.prod(chunk_spec.shape), dtype=chunk_spec.dtype.to_native_dtype())
        progress = standalone.simple_decompress_into(chunk_data.to_bytes(), out)
        if not progress.finished or progress.n_processed != out.size:
            raise ChunkTooLarge(f"a pcodec chunk of {'more' if not progress.finished else 'fewer'} values than its "
                                f"array's chunk of {out.size:,}; the file is not a chunk this array wrote")
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(out.reshape(chunk_spec.shape))


BOUNDED = {"blosc": BoundedBlosc, "zstd": BoundedZstd, "gzip": BoundedGzip, "numcodecs.pcodec": BoundedPCodec}


def install() -> None:
    """Make zarr decode the compressors weightlapse reads with the bounded decoders."""
    for name, codec in BOUNDED.items():
        register_codec(name, codec)
    # One "codecs" entry: a dotted key ("codecs.numcodecs.pcodec") would be read as nested ones.
    chosen = dict(zarr.config.get("codecs"))
    chosen.update({name: f"{codec.__module__}.{codec.__qualname__}" for name, codec in BOUNDED.items()})
    zarr.config.set({"codecs": chosen})
