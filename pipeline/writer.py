"""The training side of recording a run: :class:`TrajectoryWriter` copies each step's row
into a block buffer and hands whole blocks to the store writer
(:class:`~weightlapse.pipeline.store_writer.StoreWriter`), which runs beside training
(:mod:`weightlapse.pipeline.handoff`) and moves the progress marker after each.
"""

from __future__ import annotations

import logging
import shutil
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from weightlapse.pipeline.checkpoints import BlockExtras
from weightlapse.pipeline.handoff import WriterFailed, WriterProcess, WriterThread, shared_buffers
from weightlapse.pipeline.resume import ResumePoint, remove_partial_files
from weightlapse.pipeline.store import RunMetadata, StoreLayout, TrajectoryError, create_store, open_store
from weightlapse.pipeline.store_writer import StoreWriter
from weightlapse.pipeline.writer_messages import Finish, Message, WriteRows, Written

log = logging.getLogger(__name__)


class TrajectoryWriter:
    """Record a run step by step, in blocks of whole chunks, with the progress marker after each.

    Rows are copied into a block buffer and handed to the store writer, which compresses
    and writes them; after each full block it writes the block's small arrays and
    checkpoint, then moves the progress marker. On Linux the store writer is a forked
    process (:class:`~weightlapse.pipeline.handoff.WriterProcess`), so the training thread does
    nothing but copy rows: compression, files and zarr's Python run on another core under
    another interpreter lock. Elsewhere it is a thread. At most ``N_SLOTS - 1`` blocks are
    being written at a time (the trainer waits if the disk is slower), so memory is a few
    blocks whatever the run's length. Use as a context manager: on an exception the rows
    recorded so far are written and the run is marked unfinished.
    """

    N_SLOTS = 3  # block buffers: one being filled, the others being written or waiting
    # A block is this many bytes of weights, in whole chunks: the progress marker moves,
    # and a checkpoint is saved, once a block. At 10,000 steps/s, 16 MiB blocks move the
    # marker about 20 times a second.
    BLOCK_BYTES = 16 * 2**20
    # Inside a block, rows go to the store writer every this many bytes of weights (whole
    # chunks: 256 steps of 64-step chunks), so that it compresses while training goes on and
    # little is left to write after the last step. A message, which wakes the store writer,
    # costs the training thread about 100 microseconds of CPU on a 2-core VM: at 2 MiB
    # (64 steps) that was 3 microseconds a step (docs/benchmarks.md).
    HANDOFF_BYTES = 8 * 2**20

    def __init__(self, path: str | Path, layout: StoreLayout, metadata: RunMetadata, *,
                 overwrite: bool = False, block_steps: int | None = None,
                 checkpoint: Callable[[], np.ndarray | None] | None = None,
                 resume_from: ResumePoint | None = None) -> None:
        """Create the store at ``path``, or with ``resume_from`` carry on in the existing one.

        ``checkpoint()``, if given, returns the optimizer state (a float32 vector of
        ``layout.resume_size``); it is called after the last step of each block and saved
        with the block, so that an interrupted run can resume
        (:func:`~weightlapse.pipeline.resume.find_resume_point`).
        It may return None when it has no state for that step; the last checkpoint then stays.
        """
        self.path = Path(path)
        self.layout = layout
        self.block_steps = block_steps or self.default_block_steps(layout)
        if self.block_steps % layout.chunk_steps:
            raise ValueError(f"block_steps ({self.block_steps}) must be a multiple of chunk_steps "
                             f"({layout.chunk_steps})")
        chunk_bytes = layout.chunk_steps * layout.n_classes * layout.n_pixels * 4
        self._handoff_steps = min(self.block_steps, layout.chunk_steps * max(1, self.HANDOFF_BYTES // chunk_bytes))
        if resume_from is None:
            _prepare_target(self.path, overwrite=overwrite)
            self.group = create_store(self.path, layout, metadata)
        else:
            remove_partial_files(self.path)
            self.group = zarr.open_group(self.path, mode="r+")
        in_process = WriterProcess.available()
        # Block buffers ("slots") are reused: the store writer frees each once it is written.
        self._slots = shared_buffers(_block_shapes(layout, self.block_steps), self.N_SLOTS, shared=in_process)
        self._store_writer = StoreWriter(self.group, layout, self._slots, resume_from)
        name = f"trajectory-writer:{self.path.name}"
        self._worker = WriterProcess(self._store_writer.handle, name) if in_process \
            else WriterThread(self._store_writer.handle, name)
        # Carrying on after step s: rows from s + 1 are written again, whatever is there.
        first = 0 if resume_from is None else resume_from.step + 1
        self._channel = _Channel(self._worker, self.path, free_slots=list(range(self.N_SLOTS - 1, 0, -1)),
                                 steps_done=first - 1)
        self._slot = 0
        self._buffers = self._slots[0]
        self._block_start = first  # step held in buffer row 0
        self._next_step = first
        self._rows_handed = 0  # rows of this block already sent to the store writer
        self._next_handoff = self._handoff_steps  # buffer row count at which rows go next
        self._extras = BlockExtras(layout.eval_steps, checkpoint, resume_from)
        self.record_eval = self._extras.record_eval
        self._closed = False

    @property
    def steps_done(self) -> int:
        """The last step whose row is on disk, as the store writer last said."""
        return self._channel.steps_done

    @property
    def finished(self) -> bool:
        return self._channel.finished

    @classmethod
    def default_block_steps(cls, layout: StoreLayout) -> int:
        """Rows per block: whole chunks, about ``BLOCK_BYTES`` of weights, no more than the run."""
        chunk_bytes = layout.chunk_steps * layout.n_classes * layout.n_pixels * 4
        run_chunks = -(-(layout.n_steps + 1) // layout.chunk_steps)
        return layout.chunk_steps * min(run_chunks, max(1, cls.BLOCK_BYTES // chunk_bytes))

    # -- recording -------------------------------------------------------------------
    def record_step(self, step: int, weights: np.ndarray, loss: float = float("nan"), *,
                    bias: np.ndarray | None = None, gradient: np.ndarray | None = None) -> None:
        # This runs once per training step: it copies the row into the block buffer and
        # checks one counter; everything else happens a few times per block.
        if step != self._next_step or step > self.layout.n_steps:
            self._refuse_steps(step, step)
        row = step - self._block_start
        buffers = self._buffers
        buffers["weights"][row] = weights
        buffers["loss"][row] = loss
        if self.layout.bias:
            buffers["bias"][row] = bias
        if self.layout.gradients:  # step 0 has no gradient: NaN, like a row never written
            buffers["gradients"][row] = np.nan if gradient is None else gradient
        self._next_step = step + 1
        if row + 1 == self._next_handoff:
            self._hand_off_rows()

    def rows_to_fill(self, first_step: int) -> dict[str, np.ndarray]:
        """The block buffer's rows for steps ``first_step ..`` up to the next hand-off, for an
        engine to write its steps into: "weight" (n, class, pixel), "loss" (n,), and "bias",
        "gradient" where the layout has them; then :meth:`record_steps` records them without
        copying them again, so no Python runs per step (docs/benchmarks.md)."""
        if first_step != self._next_step or first_step > self.layout.n_steps:
            self._refuse_steps(first_step, first_step)
        row = first_step - self._block_start
        rows = slice(row, min(self._next_handoff, row + self.layout.n_steps + 1 - first_step))
        return {name: self._buffers[array][rows] for name, array in _ROW_ARRAYS.items() if array in self._buffers}

    def record_steps(self, first_step: int, weights: np.ndarray, losses: np.ndarray, *,
                     biases: np.ndarray | None = None, gradients: np.ndarray | None = None) -> None:
        """Record consecutive steps ``first_step ..`` at once: ``weights`` (n, class, pixel),
        ``losses`` (n,), and (n, class) ``biases`` / (n, class, pixel) ``gradients`` where the
        layout has them. The same rows as n calls of :meth:`record_step`, with one copy per
        block, or none for rows written in place (:meth:`rows_to_fill`)."""
        n_rows = len(weights)
        if first_step != self._next_step or first_step + n_rows - 1 > self.layout.n_steps:
            self._refuse_steps(first_step, first_step + n_rows - 1)
        done = 0
        while done < n_rows:
            row = self._next_step - self._block_start
            take = min(n_rows - done, self._next_handoff - row)
            rows, given = slice(row, row + take), slice(done, done + take)
            _put(self._buffers["weights"][rows], weights[given])
            _put(self._buffers["loss"][rows], losses[given])
            if self.layout.bias:
                _put(self._buffers["bias"][rows], biases[given])
            if self.layout.gradients:
                _put(self._buffers["gradients"][rows], gradients[given])
                if self._next_step == 0:  # step 0 has no gradient: NaN, like a row never written
                    self._buffers["gradients"][row] = np.nan
            self._next_step += take
            done += take
            if row + take == self._next_handoff:
                self._hand_off_rows()

    def _refuse_steps(self, first: int, last: int) -> None:
        self._channel.raise_failure()
        if first != self._next_step:
            raise ValueError(f"steps must be recorded in order: expected {self._next_step}, got {first}")
        raise ValueError(f"step {last} is past the planned {self.layout.n_steps} steps")

    def drop_last_step_unless_finite(self) -> None:
        """Forget the last recorded step if its weights are not finite and it is not handed over
        as part of a finished block yet (training diverged: it must not become a committed row)."""
        row = self._next_step - 1 - self._block_start
        if row < 0 or np.isfinite(self._buffers["weights"][row]).all():
            return
        self._next_step -= 1
        self._rows_handed = min(self._rows_handed, row)

    def wait_written(self) -> None:
        """Wait until every block handed to the store writer is on disk."""
        self._channel.wait_all()

    def flush(self) -> None:
        """Write everything recorded so far and move the progress marker over it; returns when done."""
        self.send_recorded()
        self.wait_written()

    def send_recorded(self) -> None:
        """Hand everything recorded so far to the store writer now, without waiting for it."""
        self._hand_over()

    def close(self, *, error: str | None = None) -> None:
        """Write what is recorded and mark the run finished, or unfinished with ``error``."""
        if self._closed:
            return
        self._closed = True
        try:
            # Stopped by an error, the model may be a step past the last row recorded, or
            # halfway through one: its state is no checkpoint. The last block's stays.
            self._hand_over(check=False, checkpoint=error is None)
            self._channel.send(Finish(error))
            self.wait_written()
        finally:
            self._worker.close()

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close(error=f"{exc_type.__name__}: {exc}")
        except Exception as error:  # noqa: BLE001 - the original exception is the one to report
            if self._channel.failure is None:  # else the store writer's own failure is that exception, and says it
                log.warning("%s: the failure could not be recorded in the store either (%s)", self.path, error)

    def _hand_off_rows(self) -> None:
        """The buffer holds another hand-off's worth of rows: send them, or the whole block if full."""
        n_rows = self._next_step - self._block_start
        if n_rows == self.block_steps:
            self._hand_over()
            return
        # Replies are taken once a block (_hand_over), not here: each look at the pipe is a
        # system call, and on a VM a hand-off's calls cost the training thread about 100
        # microseconds each. A failure is still raised within a block.
        self._channel.raise_failure()
        self._channel.send(WriteRows(self._slot, self._block_start, self._rows_handed, n_rows - self._rows_handed))
        self._rows_handed = n_rows
        self._next_handoff = min(self.block_steps, n_rows + self._handoff_steps)

    def _hand_over(self, *, check: bool = True, checkpoint: bool = True) -> None:
        """Send the block recorded so far (its rows not handed off yet, its small arrays, a
        checkpoint) and the evaluations since the last hand-over; the store writer then moves the marker."""
        self._channel.take_arrived()
        if check:
            self._channel.raise_failure()
        n_rows = self._next_step - self._block_start
        if not n_rows and not self._extras.pending:
            return
        slot = self._slot if n_rows else None
        self._channel.send(self._extras.block(slot, self._block_start, self._rows_handed, n_rows, self._buffers,
                                              checkpoint=checkpoint), frees_slot=slot)
        if n_rows:
            self._slot = self._channel.free_slot()
            self._buffers = self._slots[self._slot]
            self._block_start = self._next_step
            self._rows_handed = 0
            self._next_handoff = self._handoff_steps


class _Channel:
    """The training side's end of the store writer: sends messages, takes their replies in
    order, lends out block buffers ("slots") and takes them back once written, and keeps the
    store writer's first failure to raise on the training thread."""

    def __init__(self, worker: WriterProcess | WriterThread, path: Path, *, free_slots: list[int],
                 steps_done: int) -> None:
        self._worker, self._path = worker, path
        self._free_slots = free_slots
        self._slots_in_flight: deque[int | None] = deque()  # per message sent, in order: the slot it frees
        self.steps_done = steps_done  # last step whose row is on disk (as the store writer last said)
        self.finished = False
        self.failure: str | None = None

    def send(self, message: Message, *, frees_slot: int | None = None) -> None:
        try:
            self._worker.submit(message)
        except OSError as error:
            self.failure = self.failure or str(error)
            self.raise_failure()
        self._slots_in_flight.append(frees_slot)

    def take_arrived(self) -> None:
        """Take the replies in so far, without waiting: a failure is noticed early and slots freed."""
        for reply in self._worker.replies():
            self._take(reply)

    def free_slot(self) -> int:
        """A block buffer the store writer is done with, waiting for one if need be."""
        while not self._free_slots:
            self._take(self._next_reply())
        return self._free_slots.pop()

    def wait_all(self) -> None:
        """Wait for the replies to every message sent; raise the store writer's failure, if any."""
        while self._worker.pending:
            self._take(self._next_reply())
        self.raise_failure()

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise TrajectoryError(f"{self._path}: writing the store failed: {self.failure}. Committed steps are "
                                  "kept: fix the cause, then run the stage again (`dvc repro` or --resume carries "
                                  "it on)")

    def _next_reply(self) -> Written | WriterFailed:
        try:
            return self._worker.next_reply()
        except OSError as error:
            self.failure = self.failure or str(error)
            self.raise_failure()

    def _take(self, reply: Written | WriterFailed) -> None:
        slot = self._slots_in_flight.popleft()
        if slot is not None:
            self._free_slots.append(slot)
        if isinstance(reply, WriterFailed):
            self.failure = self.failure or reply.reason
            return
        self.steps_done, self.finished = reply.steps_done, reply.finished


# The rows an engine hands over (pipeline.trainer.BlockCallback), by the block buffers' (the arrays') names.
_ROW_ARRAYS = {"weight": "weights", "loss": "loss", "bias": "bias", "gradient": "gradients"}


# Only the rows recorded in a block are ever written, so block buffers need no filling.
def _block_shapes(layout: StoreLayout, rows: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"weights": (rows, layout.n_classes, layout.n_pixels), "loss": (rows,)}
    if layout.bias:
        shapes["bias"] = (rows, layout.n_classes)
    if layout.gradients:
        shapes["gradients"] = (rows, layout.n_classes, layout.n_pixels)
    if layout.resume_size:
        shapes["resume_state"] = (layout.resume_size,)
    return shapes


def _put(target: np.ndarray, rows: np.ndarray) -> None:
    """Copy ``rows`` into ``target``, unless they are already there (written in place)."""
    if rows.__array_interface__["data"][0] != target.__array_interface__["data"][0] or rows.shape != target.shape \
            or rows.strides != target.strides:
        target[...] = rows


def _prepare_target(path: Path, *, overwrite: bool) -> None:
    if path.is_symlink():  # a store is never written through a link (a DVC cache link, say): only the link goes
        if not overwrite:
            raise FileExistsError(f"{path} is a symbolic link; refusing to write through it: remove the link, "
                                  "or pass --overwrite to replace it (only the link) by a new store")
        path.unlink()
        return
    if not path.exists():
        return
    if not overwrite:
        try:
            open_store(path)
        except TrajectoryError as error:
            raise TrajectoryError(
                f"{error}. Refusing to write over it: move it away, or pass --overwrite to replace it"
            ) from None
        raise FileExistsError(
            f"{path} already holds a trajectory; delete it, or pass --overwrite to replace it "
            "(under DVC, `dvc repro` clears a stage's outputs itself)"
        )
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


