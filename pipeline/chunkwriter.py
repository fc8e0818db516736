"""Writing the chunks of a trajectory's float32 (step, ...) arrays straight into their files.

Each chunk is encoded here with the array's own codec settings (an optional transpose,
then little-endian bytes and Blosc, or numcodecs' pcodec) and written to a temporary file
renamed over the chunk's key, so a chunk file is never seen half-written. For Blosc the
bytes are what zarr itself writes (tests/test_store_writer.py compares them), so any zarr
reader reads the store. zarr-python cannot write the pcodec chain at all (pcodec needs the
transposed chunk contiguous, which zarr's write path does not make it): here the chunk is
transposed, made contiguous and encoded, with the settings its metadata names, and zarr
reads it back bit for bit (tests). Arrays this module cannot write (other stores, other
codecs) are written through zarr.

Why not zarr's own write path: each write reads the chunk back, merges and re-encodes it,
through enough Python that a block's small arrays (512 losses, a checkpoint, a few
evaluations) took 10.3 ms, against 2.7 ms here, mostly the four files' writes. The store
writer (pipeline.store_writer) must keep pace with a training step every 100 microseconds.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numcodecs.pcodec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, TransposeCodec
from zarr.codecs.bytes import Endian
from zarr.codecs.numcodecs import PCodec
from zarr.storage import LocalStore

_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ChunkWriter:
    """Writes rows of one float32 (step, ...) array straight into its chunk files.

    Each chunk is encoded as its codecs say (an optional transpose, then little-endian
    bytes and Blosc, or pcodec) and written whole, so any zarr reader reads it. A chunk being filled a few rows
    at a time is kept in memory and written whole again each time: its rows before the
    first ones written here are read from the store once (a resumed run), its rows not
    written yet hold the fill value, as zarr would store them. Only one writer may write an
    array, which the store writer is.
    """

    def __init__(self, array: zarr.Array, directory: Path, encode: Callable[[np.ndarray], bytes], *,
                 transposed: bool, side_by_side: bool = False) -> None:
        self.array, self._directory, self._encode = array, directory, encode
        self._side_by_side = side_by_side  # encode a hand-off's whole chunks on the pool
        self.chunk_steps = array.chunks[0]
        self._n_rows = array.shape[0]
        self._order = (*range(1, array.ndim), 0) if transposed else None
        self._other_chunk_coords = (0,) * (array.ndim - 1)
        self._fill = np.float32(array.fill_value)
        self._open_index: int | None = None  # the chunk kept in memory, and its rows
        self._open_rows = np.empty((0,), np.float32)

    @classmethod
    def wrap(cls, array: zarr.Array, directory: Path | None = None) -> ChunkWriter | zarr.Array:
        """A direct writer for ``array`` when its store and codecs allow one, else the array itself.

        ``directory``: write the chunk files there instead of the array's own directory (a
        compaction writes the new chunks of an array before its metadata names them)."""
        if not (isinstance(array.store, LocalStore) or directory is not None) or array.dtype != np.float32 \
                or array.chunks[1:] != array.shape[1:] or array.metadata.zarr_format != 3:
            return array
        codecs = list(array.metadata.codecs)
        transposed = bool(codecs) and isinstance(codecs[0], TransposeCodec) \
            and tuple(codecs[0].order) == (*range(1, array.ndim), 0)
        if transposed:
            codecs.pop(0)
        encode = chunk_encoder(codecs)
        if encode is None:
            return array
        # pcodec is what limits a compact run's steps/s (about 110 microseconds a step on one
        # core); Blosc already compresses a chunk on several threads of its own, and on the
        # pool it ran 5% slower (docs/benchmarks.md).
        return cls(array, directory or Path(array.store.root) / array.path, encode, transposed=transposed,
                   side_by_side=isinstance(codecs[0], PCodec))

    def __setitem__(self, rows: slice | int, values: np.ndarray) -> None:
        if isinstance(rows, int):
            rows, values = slice(rows, rows + 1), np.asarray(values)[None]
        start, stop = rows.start, rows.stop
        chunk = self.chunk_steps
        at = start
        whole = []
        while at < stop:
            index = at // chunk
            chunk_start = index * chunk
            end = min(stop, chunk_start + chunk, self._n_rows)
            given = values[at - start:end - start]
            if at == chunk_start and end == chunk_start + chunk:  # a whole chunk: no need to keep it
                if self._open_index == index:
                    self._open_index = None
                whole.append((index, given))
            else:
                buffer = self._open(index, at)
                buffer[at - chunk_start:end - chunk_start] = given
                self._write_chunk(index, buffer)
            at = end
        self._write_whole_chunks(whole)

    def _write_whole_chunks(self, chunks: list[tuple[int, np.ndarray]]) -> None:
        """Write these chunks, with pcodec several at once (it releases the interpreter lock
        while it encodes). All are written (or failed) when this returns, so the marker
        written next covers them."""
        if len(chunks) < 2 or ENCODING_THREADS < 2 or not self._side_by_side:
            for index, rows in chunks:
                self._write_chunk(index, rows)
            return
        jobs = []
        try:
            for index, rows in chunks:
                jobs.append(_encoding_pool().submit(self._write_chunk, index, rows))
        finally:
            concurrent.futures.wait(jobs)  # none still reads the rows when this returns or raises
        for job in jobs:
            job.result()  # the first failure, raised once none is still writing

    def _open(self, index: int, first_row: int) -> np.ndarray:
        """The rows of chunk ``index`` in memory, the ones before ``first_row`` as the store has them."""
        if self._open_index != index:
            chunk_start = index * self.chunk_steps
            self._open_rows = np.full((self.chunk_steps, *self.array.shape[1:]), self._fill, np.float32)
            if first_row > chunk_start:
                self._open_rows[:first_row - chunk_start] = self.array[chunk_start:first_row]
            self._open_index = index
        return self._open_rows

    def _write_chunk(self, index: int, rows_of_chunk: np.ndarray) -> None:
        ordered = rows_of_chunk.transpose(self._order) if self._order else rows_of_chunk
        key = self.array.metadata.encode_chunk_key((index, *self._other_chunk_coords))
        _write_atomically(self._directory / key, self._encode(np.ascontiguousarray(ordered)))


# Chunks encoded at once by one writer: one per core, up to 4 (a writer shares the machine
# with the training thread, and with the other runs' writers in a sweep).
ENCODING_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _encoding_pool() -> concurrent.futures.ThreadPoolExecutor:
    """This process's pool of chunk encoders, made when first needed."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(ENCODING_THREADS, thread_name_prefix="chunk-encoder")
        return _pool


def _forget_pool_in_child() -> None:
    # A forked store writer has none of its parent's threads (and perhaps a lock taken by one).
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def chunk_encoder(codecs: list) -> Callable[[np.ndarray], bytes] | None:
    """The encoder of a contiguous chunk for these codecs (after any transpose), or None if
    this module does not write them: little-endian bytes then Blosc, or pcodec alone."""
    if len(codecs) == 1 and isinstance(codecs[0], PCodec):
        # zarr's wrapper keeps the numcodecs configuration; the wrapped codec is made from it.
        config = {key: value for key, value in codecs[0].codec_config.items() if key != "id"}
        return numcodecs.pcodec.PCodec(**config).encode
    if len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and codecs[0].endian in (None, Endian.little) \
            and isinstance(codecs[1], BloscCodec):
        config = codecs[1]
        return numcodecs.Blosc(cname=config.cname.value, clevel=config.clevel, shuffle=_BLOSC_SHUFFLE[config.shuffle.value],
                               blocksize=config.blocksize, typesize=config.typesize).encode
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk gets its space back, for the marker at least
        raise
