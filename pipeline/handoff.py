"""Handing recorded rows from the training thread to the store writer, which runs beside it.

The training thread records a row of weights every step and must not wait for the store.
On Linux the store writer is a forked child process (:class:`WriterProcess`): compressing,
writing chunk files and zarr's own Python then run on another core, under another
interpreter lock. On a thread of the training process, the same Python work took the GIL
from training for milliseconds at a time: recording cost a numpy step about half its
speed (docs/benchmarks.md). Where no child process can be started (not Linux, or inside a
daemonic Dask worker) the same code runs on a thread (:class:`WriterThread`).

Rows travel in block buffers in shared memory (:func:`shared_buffers`), made before the
fork; messages name them. Both workers take every message waiting at once, so the writer
can write several blocks' worth at a time when it is behind, and answer each message in
order.
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
from typing import Any

import numpy as np

# The store writer yields the CPU to training: it only has to keep up on average (block
# buffers absorb its delays, and training waits for a free one if it falls behind). Four
# runs trained as a stack, with four writers on a 2-core machine, recorded 8,300-8,800
# run-steps/s at the default priority and 10,200-10,500 at this one: the writers' bursts
# had taken turns on the training core.
WRITER_NICENESS = 10

# The parent's ends of the pipes to this process's live writer processes. A writer forked
# later inherits them and must close its copies: an open copy would keep an earlier writer
# from seeing its end of file (several runs trained together each have a writer).
_parent_ends: set = set()


def shared_buffers(shapes: dict[str, tuple[int, ...]], n_slots: int, *, shared: bool) -> list[dict[str, np.ndarray]]:
    """``n_slots`` dicts of float32 arrays of ``shapes``: block buffers, reused for the whole run.

    ``shared`` puts them in one anonymous shared mapping, which a forked :class:`WriterProcess`
    sees too. Every page is touched now: a first write to a fresh page costs a page fault,
    and copying a step's 31 KB row into fresh pages took 17.7 microseconds against 2.7
    into touched ones (2-core VM).
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
    messages are small picklable values naming them (the store's are in
    :mod:`weightlapse.pipeline.writer_messages`). ``handle`` gets every message waiting at once (so
    it can, say, write one progress marker for a block and the close right behind it) and
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
        _parent_ends.add(self._connection)
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
        _parent_ends.discard(self._connection)
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
    os.nice(WRITER_NICENESS)
    # Our copy of the parent's end would keep the pipe open after the parent closed it, and
    # so would our copies of the parent's ends to other writers.
    parent_end.close()
    for other in _parent_ends:
        other.close()
    import numcodecs

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
        try:
            for reply in replies:
                connection.send(reply)
        except OSError:
            return  # the parent stopped listening: it gave up on the run


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
