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

import ctypes
import mmap
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, TransposeCodec
from zarr.codecs.bytes import Endian
from zarr.storage import LocalStore

_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ChunkWriter:
    """Writes rows of one float32 (step, ...) array straight into its chunk files.

    Each chunk is encoded as zarr encodes it (an optional transpose, little-endian bytes,
    Blosc) and written whole, so any zarr reader reads it. A chunk being filled a few rows
    at a time is kept in memory and written whole again each time: its rows before the
    first ones written here are read from the store once (a resumed run), its rows not
    written yet hold the fill value, as zarr would store them. Only one writer may write an
    array, which the store writer is.
    """

    def __init__(self, array: zarr.Array, directory: Path, blosc: numcodecs.Blosc, *, transposed: bool) -> None:
        self.array, self._directory, self._blosc = array, directory, blosc
        self.chunk_steps = array.chunks[0]
        self._n_rows = array.shape[0]
        self._order = (*range(1, array.ndim), 0) if transposed else None
        self._other_chunk_coords = (0,) * (array.ndim - 1)
        self._fill = np.float32(array.fill_value)
        self._open_index: int | None = None  # the chunk kept in memory, and its rows
        self._open_rows = np.empty((0,), np.float32)

    @classmethod
    def wrap(cls, array: zarr.Array) -> ChunkWriter | zarr.Array:
        """A direct writer for ``array`` when its store and codecs allow one, else the array itself."""
        codecs = list(array.metadata.codecs) if array.metadata.zarr_format == 3 else []
        transposed = bool(codecs) and isinstance(codecs[0], TransposeCodec) \
            and tuple(codecs[0].order) == (*range(1, array.ndim), 0)
        if transposed:
            codecs.pop(0)
        if not (isinstance(array.store, LocalStore) and len(codecs) == 2
                and isinstance(codecs[0], BytesCodec) and codecs[0].endian in (None, Endian.little)
                and isinstance(codecs[1], BloscCodec) and array.dtype == np.float32
                and array.chunks[1:] == array.shape[1:]):
            return array
        blosc_config = codecs[1]
        blosc = numcodecs.Blosc(cname=blosc_config.cname.value, clevel=blosc_config.clevel,
                                shuffle=_BLOSC_SHUFFLE[blosc_config.shuffle.value],
                                blocksize=blosc_config.blocksize, typesize=blosc_config.typesize)
        return cls(array, Path(array.store.root) / array.path, blosc, transposed=transposed)

    def __setitem__(self, rows: slice | int, values: np.ndarray) -> None:
        if isinstance(rows, int):
            rows, values = slice(rows, rows + 1), np.asarray(values)[None]
        start, stop = rows.start, rows.stop
        chunk = self.chunk_steps
        at = start
        while at < stop:
            index = at // chunk
            chunk_start = index * chunk
            end = min(stop, chunk_start + chunk, self._n_rows)
            given = values[at - start:end - start]
            if at == chunk_start and end == chunk_start + chunk:  # a whole chunk: no need to keep it
                if self._open_index == index:
                    self._open_index = None
                self._write_chunk(index, given)
            else:
                buffer = self._open(index, at)
                buffer[at - chunk_start:end - chunk_start] = given
                self._write_chunk(index, buffer)
            at = end

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
        _write_atomically(self._directory / key, self._blosc.encode(np.ascontiguousarray(ordered)))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def shared_buffers(shapes: dict[str, tuple[int, ...]], n_slots: int, *, shared: bool) -> list[dict[str, np.ndarray]]:
    """``n_slots`` dicts of float32 arrays of ``shapes``: block buffers, reused for the whole run.

    ``shared`` puts them in one anonymous shared mapping, which a forked :class:`WriterProcess`
    sees too. Every page is touched now: a first write to a fresh page costs a page fault,
    and 16 per 64 KiB written made recording a step six times slower on the training thread.
    """
    slot_bytes = sum(max(1, int(np.prod(shape))) * 4 for shape in shapes.values())
    mapping = mmap.mmap(-1, slot_bytes * n_slots) if shared else bytearray(slot_bytes * n_slots)
    whole = np.frombuffer(mapping, np.uint8)
    whole[::mmap.PAGESIZE] = 0  # bytearray is zeroed already, but in pages not yet touched
    slots = []
    for slot in range(n_slots):
        offset, arrays = slot * slot_bytes, {}
        for name, shape in shapes.items():
            count = int(np.prod(shape))
            arrays[name] = np.frombuffer(mapping, np.float32, count, offset).reshape(shape)
            offset += max(1, count) * 4
        slots.append(arrays)
    return slots


class WriterProcess:
    """Runs ``handle(messages)`` in a forked child process, for messages sent with :meth:`submit`.

    The training process then spends no time on the store: compressing, writing files and
    zarr's own Python all run there, on another core and under another interpreter lock.
    Block data travels in buffers from :func:`shared_buffers` made before this object;
    messages are small tuples naming them. ``handle`` gets every message waiting at once (it
    may write several blocks' small arrays and the progress marker once for all) and
    returns one reply per message; the replies come back in order through :meth:`replies`
    and :meth:`next_reply`. If ``handle`` raises, that message and all later ones are answered
    ``WriterFailed`` and nothing more is written.

    The child is forked, so it starts at once with the parent's objects; zarr resets its I/O
    loop in a forked child. It does not hold the run's writer lock (pipeline.runlock closes
    it in forked children) and is killed when the parent dies, so it never writes after its
    parent is gone.
    """

    def __init__(self, handle: Callable[[list], list], name: str) -> None:
        self._connection, child_end = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("fork").Process(
            target=_serve, args=(child_end, self._connection, handle, os.getpid()), name=name, daemon=True)
        self._process.start()
        child_end.close()
        self.pending = 0  # messages not answered yet

    @classmethod
    def available(cls) -> bool:
        # fork is Linux's cheap start; macOS forks badly with threads, Windows cannot. A
        # daemonic process (a Dask worker training a sweep's run) may not start children:
        # there the store is written on a thread instead (WriterThread).
        return sys.platform.startswith("linux") and not multiprocessing.current_process().daemon

    def submit(self, message: Any) -> None:
        try:
            self._connection.send(message)
        except OSError:
            raise self._stopped() from None
        self.pending += 1

    def replies(self) -> Iterator[Any]:
        """The replies that have arrived, without waiting."""
        while self.pending and self._connection.poll():
            yield self.next_reply()

    def next_reply(self) -> Any:
        """The next reply, waiting for it."""
        try:
            reply = self._connection.recv()
        except (EOFError, OSError):
            raise self._stopped() from None
        self.pending -= 1
        return reply

    def _stopped(self) -> OSError:
        self._process.join(timeout=1)
        return OSError(f"the store writer process stopped (exit code {self._process.exitcode})")

    def close(self) -> None:
        """Let the child finish what it was sent and exit."""
        self._connection.close()  # the child reads to the end, then sees end of file
        if not self.pending:
            # Every reply is in, so nothing is left to write: no need to wait milliseconds
            # for the exit (multiprocessing reaps the process later).
            return
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


class WriterFailed:
    """The reply to a message the writer could not carry out, or did not try after an earlier failure."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _handle_safely(handle: Callable[[list], list], messages: list, failure: WriterFailed | None) -> tuple[list, WriterFailed | None]:
    if failure is None:
        try:
            return handle(messages), None
        except Exception as error:  # noqa: BLE001 - handed to the training side, which raises it
            failure = WriterFailed(f"{type(error).__name__}: {error}")
    return [failure] * len(messages), failure


def _serve(connection, parent_end, handle: Callable[[list], list], parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent decides when to stop, and then
    # this process finishes what it was sent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Our copy of the parent's end would keep the pipe open after the parent closed it.
    parent_end.close()
    numcodecs.blosc.use_threads = False  # no blosc global lock or thread pool inherited mid-use
    failure = None
    while True:
        try:
            messages = [connection.recv()]
            while connection.poll():  # whatever else waits, at once
                messages.append(connection.recv())
        except (EOFError, OSError):
            return  # the parent closed its end, or died
        replies, failure = _handle_safely(handle, messages, failure)
        for reply in replies:
            connection.send(reply)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent dies: an orphan must not write on."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)


class WriterThread:
    """The same service as :class:`WriterProcess` on a thread of this process, where no child
    process can be started. The store's Python then competes with training for the GIL."""

    def __init__(self, handle: Callable[[list], list], name: str) -> None:
        self._handle = handle
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self.pending = 0

    def submit(self, message: Any) -> None:
        self._requests.put(message)
        self.pending += 1

    def replies(self) -> Iterator[Any]:
        while self.pending and not self._replies.empty():
            yield self.next_reply()

    def next_reply(self) -> Any:
        reply = self._replies.get()
        self.pending -= 1
        return reply

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _serve(self) -> None:
        failure = None
        while True:
            messages = [self._requests.get()]
            while not self._requests.empty():
                messages.append(self._requests.get())
            stop = messages[-1] is None
            if stop:
                messages.pop()
            replies, failure = _handle_safely(self._handle, messages, failure) if messages else ([], failure)
            for reply in replies:
                self._replies.put(reply)
            if stop:
                return
