"""The store writer: writes what the training side hands over into the store, progress marker last.

It runs beside training (a forked child process or a thread, :mod:`weightlapse.pipeline.handoff`),
never on the training thread, and it alone writes the store once it is created. It is
told what to write in :mod:`weightlapse.pipeline.writer_messages`; the rows are in the
shared block buffers those messages name.
"""

from __future__ import annotations

import numpy as np
import zarr

from weightlapse.pipeline.checkpoints import ExtrasWriter
from weightlapse.pipeline.chunkwriter import ChunkWriter
from weightlapse.pipeline.resume import ResumePoint
from weightlapse.pipeline.store import Progress, StoreLayout, marker_time
from weightlapse.pipeline.writer_messages import Finish, Message, WriteBlock, WriteRows, Written


class StoreWriter:
    """Carries out :class:`WriteRows`, :class:`WriteBlock` and :class:`Finish` in order,
    answering each with :class:`Written`; a failure is recorded in the marker, then raised."""

    def __init__(self, group: zarr.Group, layout: StoreLayout, slots: list[dict[str, np.ndarray]],
                 resume_from: ResumePoint | None) -> None:
        self.group, self.layout, self.slots = group, layout, slots
        self.arrays = {name: ChunkWriter.wrap(group[name]) for name in group.array_keys()}
        self.step_arrays = [name for name in ("weights", "gradients") if name in slots[0]]
        self.scalar_arrays = [name for name in ("loss", "bias") if name in slots[0]]
        self.steps_done = -1 if resume_from is None else resume_from.step
        self.extras = ExtrasWriter(layout.resume_size, resume_from)
        self.finished = False

    def handle(self, messages: list[Message]) -> list[Written]:
        try:
            return self._handle(messages)
        except Exception as error:
            # A full disk, a read-only one: the marker still covers only whole blocks on disk,
            # and says why the run stopped, if there is room left for that.
            try:
                self._write_progress(error=f"writing the store failed: {type(error).__name__}: {error}")
            except Exception:  # noqa: BLE001, S110 - the first failure is the one reported
                pass
            raise

    def _handle(self, messages: list[Message]) -> list[Written]:
        replies = []
        for index, message in enumerate(messages):
            if isinstance(message, WriteRows):
                self._write_rows(message.slot, message.block_start, message.first_row, message.n_rows)
            elif isinstance(message, WriteBlock):
                self._write_block(message)
                if not (index + 1 < len(messages) and isinstance(messages[index + 1], Finish)):
                    self._write_progress()  # else the finish writes it, once
            elif isinstance(message, Finish):
                self.finished = message.error is None and self.steps_done == self.layout.n_steps
                self._write_progress(error=message.error)
            else:
                raise TypeError(f"the store writer got a {type(message).__name__}, not a writer message")
            replies.append(Written(steps_done=self.steps_done, finished=self.finished))
        return replies

    def _write_rows(self, slot: int, block_start: int, first_row: int, n_rows: int) -> None:
        rows = slice(first_row, first_row + n_rows)
        for name in self.step_arrays:  # a chunk's rows may come in pieces (pipeline.chunkwriter keeps it)
            self.arrays[name][block_start + first_row:block_start + first_row + n_rows] = self.slots[slot][name][rows]

    def _write_block(self, block: WriteBlock) -> None:
        # Data first, progress marker after: a reader trusting the marker never sees a row
        # that is not on disk yet.
        start, n_rows = block.block_start, block.n_rows
        if n_rows:
            buffers = self.slots[block.slot]
            self._write_rows(block.slot, start, block.rows_handed, n_rows - block.rows_handed)
            for name in self.scalar_arrays:
                self.arrays[name][start:start + n_rows] = buffers[name][:n_rows]
            self.steps_done = start + n_rows - 1
        self.extras.write(self.arrays, block, None if block.slot is None else self.slots[block.slot], self.steps_done)

    def _write_progress(self, *, error: str | None = None) -> None:
        # Only for telling a live run from a stale one; a finished store carries no
        # timestamp, so a resumed run ends byte for byte as an uninterrupted one.
        updated = None if self.finished else marker_time()
        progress = Progress(steps_done=self.steps_done, n_steps=self.layout.n_steps,
                            evals_done=self.extras.evals_written, finished=self.finished, updated=updated,
                            error=error or None, resume=self.extras.resume)
        self.group.attrs["progress"] = progress.as_dict()
