"""Recording a network store (schema version 2, pipeline/store/network.py) with the same
crash-safe machinery as a softmax-regression run.

:class:`NetworkWriter` is the training side: the caller (:class:`~weightlapse.Recorder`)
fills one row of the current block buffer per step and calls :meth:`NetworkWriter.commit_row`;
whole chunks of rows go to the store writer as they fill, through the same transport
(pipeline/handoff.py: a forked process on Linux), messages (pipeline/writer_messages.py)
and chunk files (pipeline/chunkwriter.py: temporary file, then rename) as
:class:`~weightlapse.pipeline.writer.TrajectoryWriter`'s. :class:`NetworkStoreWriter` is the
other side: it writes a block's rows, grows the arrays when rows reach their end, and moves
the progress marker after the data, never before.

A planned run (the train stage's network runs: ``layout.n_steps`` known) has its arrays at
their final length from the start, and each block also carries its held-out scores and an
optimizer checkpoint (pipeline.checkpoints, as a softmax-regression run's blocks do), so
that it resumes (``resume_from``) as pipeline.writer's runs do.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from weightlapse.pipeline.checkpoints import BlockExtras, ExtrasWriter
from weightlapse.pipeline.chunkwriter import ChunkWriter
from weightlapse.pipeline.handoff import WriterProcess, WriterThread, shared_buffers
from weightlapse.pipeline.resume import ResumePoint, remove_partial_files
from weightlapse.pipeline.store import (
    RUN_ARRAYS,
    NetworkLayout,
    Progress,
    RunMetadata,
    consolidate,
    create_network_store,
    marker_time,
)

# The v1 writer's channel, target preparation and exit, shared as they are: one protocol, one
# rule for what may be written over.
from weightlapse.pipeline.writer import TrajectoryWriter, _Channel, _prepare_target
from weightlapse.pipeline.writer_messages import Finish, Message, WriteBlock, WriteRows, Written

log = logging.getLogger(__name__)


class NetworkWriter:
    """Record a network's parameters step by step into a new store at ``path``.

    Fill row :attr:`row` of the buffers in ``slots[slot]`` (one float32 array per parameter,
    (block rows, *shape), and ``loss``), then call :meth:`commit_row`. ``before_send(slot,
    first_row, stop_row)``, if given, is called before rows go to the store writer and must
    leave them in the slot's buffers (a recorder on a GPU copies them from the device there).
    ``store_id``: the store's (a new random one by default). A planned ``layout`` also takes
    ``checkpoint`` (called after each block, as :class:`~weightlapse.pipeline.writer.TrajectoryWriter`
    does), :meth:`record_eval` and ``resume_from`` (carry on in the store after that point).
    """

    N_SLOTS = 3
    BLOCK_BYTES = 16 * 2**20   # per block: the marker moves once a block
    HANDOFF_BYTES = 2 * 2**20  # inside a block, the big parameters' rows go every this many bytes

    def __init__(self, path: str | Path, layout: NetworkLayout, metadata: RunMetadata, *, overwrite: bool = False,
                 before_send: Callable[[int, int, int], None] | None = None, store_id: str | None = None,
                 checkpoint: Callable[[], np.ndarray | None] | None = None,
                 resume_from: ResumePoint | None = None) -> None:
        self.path, self.layout = Path(path), layout
        # Hand-offs and blocks are whole chunks of the biggest parameter (the smallest chunk_steps).
        base = min(spec.chunk_steps for spec in layout.parameters)
        self.handoff_steps = base * max(1, self.HANDOFF_BYTES // (base * layout.row_bytes))
        self.block_steps = self.handoff_steps * max(1, self.BLOCK_BYTES // (self.handoff_steps * layout.row_bytes))
        if resume_from is None:
            _prepare_target(self.path, overwrite=overwrite)
            rows = self.block_steps if layout.n_steps is None else layout.n_steps + 1
            group = create_network_store(self.path, layout, metadata, rows=rows, store_id=store_id or uuid.uuid4().hex)
        else:
            remove_partial_files(self.path)
            group = zarr.open_group(self.path, mode="r+")
        self.group = group  # for reading back committed rows (a resumed run's); only the store writer writes
        in_process = WriterProcess.available()
        shapes = {spec.name: (self.block_steps, *spec.shape) for spec in layout.parameters}
        shapes["loss"] = (self.block_steps,)
        if layout.resume_size:
            shapes["resume_state"] = (layout.resume_size,)
        self.slots = shared_buffers(shapes, self.N_SLOTS, shared=in_process)
        streamed = [spec.name for spec in layout.parameters if self.handoff_steps % spec.chunk_steps == 0]
        store_writer = NetworkStoreWriter(group, layout, self.slots, streamed=streamed, resume_from=resume_from)
        name = f"network-writer:{self.path.parent.name}"
        self._worker = WriterProcess(store_writer.handle, name) if in_process \
            else WriterThread(store_writer.handle, name)
        first = 0 if resume_from is None else resume_from.step + 1  # carrying on: rows from there are written again
        self._channel = _Channel(self._worker, self.path, free_slots=list(range(self.N_SLOTS - 1, 0, -1)),
                                 steps_done=first - 1)
        self._before_send = before_send
        self.slot, self.row = 0, 0  # where the next step's row goes
        self._block_start = first   # the step in row 0 of the current block
        self._rows_handed = 0
        self._extras = BlockExtras(layout.eval_steps, checkpoint, resume_from)
        self.record_eval = self._extras.record_eval
        self._closed = False

    @property
    def steps_done(self) -> int:
        """The last step whose row is on disk, as the store writer last said."""
        return self._channel.steps_done

    @property
    def next_step(self) -> int:
        return self._block_start + self.row

    def commit_row(self) -> None:
        """The row at :attr:`row` is filled: it belongs to the run now."""
        self.row += 1
        if self.row == self.block_steps:
            self._hand_over()
        elif self.row % self.handoff_steps == 0:
            self._channel.take_arrived()
            self._channel.raise_failure()
            self._send_rows()
            self._channel.send(WriteRows(self.slot, self._block_start, self._rows_handed, self.row - self._rows_handed))
            self._rows_handed = self.row

    def drop_last_step_unless_finite(self) -> None:
        """Forget the last row if a parameter in it is not finite and it is not handed over as
        part of a finished block yet (training diverged: it must not become a committed row)."""
        row, buffers = self.row - 1, self.slots[self.slot]
        if row < 0 or all(np.isfinite(buffers[name][row]).all() for name in self.layout.names):
            return
        self.row = row
        self._rows_handed = min(self._rows_handed, row)

    def send_recorded(self) -> None:
        """Hand everything recorded so far to the store writer now, without waiting for it."""
        self._hand_over()

    def close(self, *, error: str | None = None) -> None:
        """Write every row recorded, cut a recorder's arrays to them and mark the run finished,
        or unfinished with ``error``."""
        if self._closed:
            return
        self._closed = True
        try:
            # Stopped by an error, the model's state is no checkpoint: the last block's stays.
            self._hand_over(check=False, checkpoint=error is None)
            self._channel.send(Finish(error))
            self._channel.wait_all()
        finally:
            self._worker.close()

    __enter__ = TrajectoryWriter.__enter__
    __exit__ = TrajectoryWriter.__exit__  # the rows so far written, the run marked unfinished with the error

    def _send_rows(self) -> None:
        if self._before_send is not None and self.row > self._rows_handed:
            self._before_send(self.slot, self._rows_handed, self.row)

    def _hand_over(self, *, check: bool = True, checkpoint: bool = True) -> None:
        self._channel.take_arrived()
        if check:
            self._channel.raise_failure()
        if not self.row and not self._extras.pending:
            return
        slot = self.slot if self.row else None
        self._send_rows()
        self._channel.send(self._extras.block(slot, self._block_start, self._rows_handed, self.row,
                                              self.slots[self.slot], checkpoint=checkpoint), frees_slot=slot)
        if self.row:
            self.slot = self._channel.free_slot()
            self._block_start += self.row
            self.row = self._rows_handed = 0


class NetworkStoreWriter:
    """Carries out :class:`WriteRows`, :class:`WriteBlock` and :class:`Finish` for a network
    store, in order, answering each with :class:`Written`; a failure goes in the marker, then is raised.

    ``streamed``: the parameters whose rows are written as they come (:class:`WriteRows`,
    whole chunks); the others, and the loss, once per block."""

    def __init__(self, group: zarr.Group, layout: NetworkLayout, slots: list[dict[str, np.ndarray]], *,
                 streamed: list[str], resume_from: ResumePoint | None = None) -> None:
        self.group, self.layout, self.slots = group, layout, slots
        self.streamed = streamed
        self.per_block = [name for name in (*layout.names, "loss") if name not in streamed]
        self.capacity = group["loss"].shape[0]
        self.arrays = self._wrap()
        self.steps_done = -1 if resume_from is None else resume_from.step
        self.extras = ExtrasWriter(layout.resume_size, resume_from)
        self.finished = False

    def _wrap(self) -> dict[str, ChunkWriter | zarr.Array]:
        names = (*self.layout.names, "loss", *(name for name in RUN_ARRAYS if name in self.group))
        return {name: ChunkWriter.wrap(self.group[name]) for name in names}

    def handle(self, messages: list[Message]) -> list[Written]:
        try:
            return self._handle(messages)
        except Exception as error:
            try:  # the marker still covers only whole blocks on disk, and says why the run stopped
                self._write_progress(error=f"writing the store failed: {type(error).__name__}: {error}")
            except Exception:  # noqa: BLE001, S110 - the first failure is the one reported
                pass
            raise

    def _handle(self, messages: list[Message]) -> list[Written]:
        replies = []
        for index, message in enumerate(messages):
            if isinstance(message, WriteRows):
                self._write(message.slot, message.block_start, message.first_row, message.n_rows, self.streamed)
            elif isinstance(message, WriteBlock):
                start, handed, n_rows = message.block_start, message.rows_handed, message.n_rows
                if n_rows:
                    self._write(message.slot, start, handed, n_rows - handed, self.streamed)
                    self._write(message.slot, start, 0, n_rows, self.per_block)
                    self.steps_done = start + n_rows - 1
                buffers = None if message.slot is None else self.slots[message.slot]
                self.extras.write(self.arrays, message, buffers, self.steps_done)
                if not (index + 1 < len(messages) and isinstance(messages[index + 1], Finish)):
                    self._write_progress()  # else the finish writes it, once
            elif isinstance(message, Finish):
                planned = self.layout.n_steps
                self.finished = message.error is None and (self.steps_done >= 0 if planned is None
                                                           else self.steps_done == planned)
                if planned is None:
                    # The arrays end at the last row recorded, so plain Zarr and xarray readers see the run's length.
                    self._resize(self.steps_done + 1)
                self._write_progress(error=message.error)
            else:
                raise TypeError(f"the store writer got a {type(message).__name__}, not a writer message")
            replies.append(Written(steps_done=self.steps_done, finished=self.finished))
        return replies

    def _write(self, slot: int, block_start: int, first_row: int, n_rows: int, names: list[str]) -> None:
        if n_rows <= 0:
            return
        start = block_start + first_row
        if start + n_rows > self.capacity:
            # Arrays grow (every one, whole blocks, doubling) before any row past their end
            # is written; the marker has not moved yet, so a reader never misses a row.
            block, needed = len(self.slots[slot]["loss"]), max(start + n_rows, 2 * self.capacity)
            self._resize(-(-needed // block) * block)
        buffers = self.slots[slot]
        for name in names:
            self.arrays[name][start:start + n_rows] = buffers[name][first_row:first_row + n_rows]

    def _resize(self, rows: int) -> None:
        if rows == self.capacity:
            return
        for spec in self.layout.parameters:
            self.group[spec.name].resize((rows, *spec.shape))
        self.group["loss"].resize((rows,))
        step = self.group["step"]
        step.resize((rows,))
        if rows > self.capacity:
            step[self.capacity:rows] = np.arange(self.capacity, rows, dtype=np.int64)
        self.capacity = rows
        # The consolidated copy (for plain xarray.open_zarr) follows, in one atomic rewrite of the group's zarr.json.
        self.group = consolidate(self.group)
        self.arrays = self._wrap()

    def _write_progress(self, *, error: str | None = None) -> None:
        # A recorder's run has no planned length: n_steps is the steps recorded so far. A finished
        # store carries no timestamp, so a resumed run ends byte for byte as an uninterrupted one.
        updated = None if self.finished else marker_time()
        n_steps = max(self.steps_done, 0) if self.layout.n_steps is None else self.layout.n_steps
        progress = Progress(steps_done=self.steps_done, n_steps=n_steps, evals_done=self.extras.evals_written,
                            finished=self.finished, updated=updated, error=error or None, resume=self.extras.resume)
        self.group.attrs["progress"] = progress.as_dict()
