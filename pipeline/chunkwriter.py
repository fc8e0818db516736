"""Writing whole chunks of a trajectory's (step, ...) arrays quickly, off the training thread's back.

The store's weight chunks are encoded here with the array's own codec settings (transpose,
little-endian bytes, Blosc) and written to a temporary file renamed over the chunk's key,
so a chunk file is never seen half-written. The bytes are what zarr itself writes
(tests/test_trajectory.py compares them), so any zarr reader reads the store. Anything
this module cannot do byte-exactly (partial chunks, other stores, other codecs) goes
through zarr.

Why not zarr's own write path: it runs enough Python per chunk that, on a writer thread,
a busy training thread lost a third of its speed to the GIL. Why a process: even GIL-free
work on a thread (transposes, compression, file writes) cost the training thread 30% on a
2-core machine, against 15% for the same work in another process (docs/benchmarks.md).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, TransposeCodec
from zarr.codecs.bytes import Endian
from zarr.storage import LocalStore

_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ChunkWriter:
    """Writes rows of one (step, ...) array: whole chunks directly, the rest through zarr."""

    def __init__(self, array: zarr.Array, directory: Path, blosc: numcodecs.Blosc) -> None:
        self.array, self._directory, self._blosc = array, directory, blosc
        self.chunk_steps = array.chunks[0]
        self._order = (*range(1, array.ndim), 0)
        self._other_chunk_coords = (0,) * (array.ndim - 1)

    @classmethod
    def wrap(cls, array: zarr.Array) -> ChunkWriter | zarr.Array:
        """A direct writer for ``array`` when its store and codecs allow one, else the array itself."""
        codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
        if not (isinstance(array.store, LocalStore) and array.ndim > 1 and len(codecs) == 3
                and isinstance(codecs[0], TransposeCodec) and tuple(codecs[0].order) == (*range(1, array.ndim), 0)
                and isinstance(codecs[1], BytesCodec) and codecs[1].endian in (None, Endian.little)
                and isinstance(codecs[2], BloscCodec) and array.dtype == np.float32
                and array.chunks[1:] == array.shape[1:]):
            return array
        blosc_config = codecs[2]
        blosc = numcodecs.Blosc(cname=blosc_config.cname.value, clevel=blosc_config.clevel,
                                shuffle=_BLOSC_SHUFFLE[blosc_config.shuffle.value],
                                blocksize=blosc_config.blocksize, typesize=blosc_config.typesize)
        return cls(array, Path(array.store.root) / array.path, blosc)

    def split(self, start: int, n_rows: int) -> tuple[int, int]:
        """(head, whole): the first ``head`` rows from step ``start`` end a chunk begun earlier,
        the ``whole`` rows after them fill whole chunks, and any after those begin one."""
        head = min(-start % self.chunk_steps, n_rows)
        return head, (n_rows - head) - (n_rows - head) % self.chunk_steps

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        head, whole = self.split(rows.start, rows.stop - rows.start)
        self.write_partial(rows.start, values[:head])
        self.write_whole_chunks(rows.start + head, values[head:head + whole])
        self.write_partial(rows.start + head + whole, values[head + whole:])

    def write_partial(self, start: int, values: np.ndarray) -> None:
        """Rows that fill part of a chunk: zarr merges them with what the chunk holds."""
        if len(values):
            self.array[start:start + len(values)] = values

    def write_whole_chunks(self, start: int, values: np.ndarray) -> None:
        chunk = self.chunk_steps
        for offset in range(0, len(values), chunk):
            rows_of_chunk = np.ascontiguousarray(values[offset:offset + chunk].transpose(self._order))
            key = self.array.metadata.encode_chunk_key(((start + offset) // chunk, *self._other_chunk_coords))
            _write_atomically(self._directory / key, self._blosc.encode(rows_of_chunk))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class ChunkEncoderProcess:
    """A child process that writes the whole chunks of blocks placed in shared memory.

    The parent fills ``slots[k][name]`` (arrays in an anonymous shared mapping), calls
    :meth:`write` from its writer thread and gets control back once the chunks are on
    disk. The child is forked, so it starts at once, imports nothing and shares the
    mapping; it uses only numpy, numcodecs and the file system, never zarr or torch. It
    does not hold the run's writer lock (pipeline.runlock closes it in forked children).
    If the parent dies, the child's pipe reaches end of file and it exits.
    """

    def __init__(self, writers: dict[str, ChunkWriter], slot_shapes: dict[str, tuple[int, ...]],
                 n_slots: int) -> None:
        slot_bytes = sum(int(np.prod(shape)) * 4 for shape in slot_shapes.values())
        self._mapping = mmap.mmap(-1, slot_bytes * n_slots)
        self.slots: list[dict[str, np.ndarray]] = []
        for slot in range(n_slots):
            offset, arrays = slot * slot_bytes, {}
            for name, shape in slot_shapes.items():
                arrays[name] = np.frombuffer(self._mapping, np.float32, int(np.prod(shape)), offset).reshape(shape)
                offset += arrays[name].nbytes
            self.slots.append(arrays)
        self.names = tuple(slot_shapes)
        self._connection, child_end = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("fork").Process(
            target=_encode_blocks, args=(child_end, self._connection, writers, self.slots),
            name="trajectory-chunk-encoder", daemon=True)
        self._process.start()
        child_end.close()

    @classmethod
    def available(cls) -> bool:
        # fork is Linux's cheap start; macOS forks badly with threads, Windows cannot. A
        # daemonic process (a Dask worker training a sweep's run) may not start children:
        # there the chunks are encoded on the writer thread.
        return sys.platform.startswith("linux") and not multiprocessing.current_process().daemon

    def write(self, slot: int, first_row: int, n_rows: int, start: int) -> None:
        """Write rows ``first_row .. first_row + n_rows`` of ``slot``, whole chunks from step ``start``."""
        try:
            self._connection.send((slot, first_row, n_rows, start))
            status, detail = self._connection.recv()
        except (EOFError, OSError):
            raise OSError(f"the chunk encoder process stopped (exit code {self._process.exitcode})") from None
        if status != "ok":
            raise OSError(detail)

    def close(self) -> None:
        try:
            self._connection.send(None)
        except OSError:
            pass  # it is gone already
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
        self._connection.close()


def _encode_blocks(connection, parent_end, writers: dict[str, ChunkWriter],
                   slots: list[dict[str, np.ndarray]]) -> None:
    # Ctrl-C reaches the whole process group: the parent decides when to stop, and then
    # this process finishes the block it is writing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Our copy of the parent's end would keep the pipe open after the parent died.
    parent_end.close()
    numcodecs.blosc.use_threads = False  # no blosc global lock or thread pool inherited mid-use
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return  # the parent died
        if request is None:
            return
        slot, first_row, n_rows, start = request
        try:
            for name, writer in writers.items():
                writer.write_whole_chunks(start, slots[slot][name][first_row:first_row + n_rows])
            connection.send(("ok", ""))
        except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
            connection.send(("error", f"{type(error).__name__}: {error}"))
            return
