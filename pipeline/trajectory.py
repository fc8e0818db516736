"""Writing trajectory stores, resuming them, and opening them for analysis (:func:`open_run`).

The format (arrays, dims, the progress marker) and the validating reader are in
:mod:`weightlapse.pipeline.store`. Here: :class:`TrajectoryWriter` records a run step by
step through the store writer (:mod:`weightlapse.pipeline.handoff`), progress marker last;
:func:`find_resume_point` says where an interrupted run carries on; :func:`open_run` gives
a checked store's valid steps as a lazy xarray Dataset.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, TransposeCodec

from weightlapse.pipeline.chunkwriter import ChunkWriter
from weightlapse.pipeline.handoff import WriterFailed, WriterProcess, WriterThread, shared_buffers
from weightlapse.pipeline.locations import Location
from weightlapse.pipeline.store import (  # noqa: F401 - the store format's names, re-exported for existing callers
    IMAGE_SIDE,
    REQUIRED_ARRAYS,
    SCHEMA,
    SCHEMA_VERSION,
    STORE_NAME,
    WEIGHT_DIMS,
    CheckedSteps,
    Progress,
    TrajectoryError,
    TrajectoryNotFoundError,
    check_store,
    open_store,
    store_location,
)

log = logging.getLogger(__name__)

# Coordinates and per-step scalars are tiny; one chunk holds many steps.
SCALAR_CHUNK = 16384
# Steps per dask task when reading weights for analysis (16 MB of float32 weights).
DASK_BLOCK_STEPS = 512


@dataclass(frozen=True)
class StoreLayout:
    n_steps: int                 # optimizer steps planned; arrays hold n_steps + 1 rows
    eval_steps: tuple[int, ...]  # steps at which held-out data is scored, ascending
    n_classes: int = 10
    n_pixels: int = IMAGE_SIDE * IMAGE_SIDE
    chunk_steps: int = 64
    bias: bool = False
    gradients: bool = False
    resume_size: int = 0         # length of the optimizer state saved for resuming (0: none kept)


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run can carry on: its state after ``step`` steps, read from its store."""
    step: int
    weight: np.ndarray            # (class, pixel) after ``step`` steps
    bias: np.ndarray | None
    optimizer_state: np.ndarray   # the vector saved with the checkpoint
    row: int                      # resume_state row holding it
    losses: np.ndarray            # loss of steps 1 .. step
    heldout: np.ndarray           # (evals_done, 2): accuracy and loss of the evaluations written


def _step_series_codecs(ndim: int) -> dict[str, Any]:
    """Codecs for a (step, ...) float32 array: lossless, in the Zarr v3 spec, fast to write.

    The transpose puts each weight's consecutive steps next to each other inside a chunk.
    A weight moves by a small fraction of itself per step, so its high bytes repeat along
    the run; byte-shuffling groups those bytes and LZ4 removes the repeats. On a
    Fashion-MNIST run this stores 1.41x smaller than the raw floats and compresses at
    about 900 MB/s on one core; zstd with bit-shuffling in step order, used before, gave
    1.21x and was about three times slower (docs/benchmarks.md). Readers see the usual
    (step, ...) order: zarr undoes the transpose when it reads a chunk.
    """
    return {"filters": [TransposeCodec(order=(*range(1, ndim), 0))] if ndim > 1 else [],
            "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]}


def check_schema(path: str | Path | Location) -> None:
    """Raise TrajectoryError unless ``path`` is a store this version can read."""
    open_store(path)


class TrajectoryWriter:
    """Record a run step by step, in blocks of whole chunks, with the progress marker after each.

    Rows are copied into a block buffer and handed to the store writer, which compresses
    and writes them; after each full block it writes the block's small arrays and
    checkpoint, then moves the progress marker. On Linux the store writer is a forked
    process (:class:`~pipeline.handoff.WriterProcess`), so the training thread does
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
    # chunks), so that it compresses while training goes on and little is left to write
    # after the last step: a message costs the training thread about 20 microseconds.
    HANDOFF_BYTES = 2 * 2**20

    def __init__(self, path: str | Path, layout: StoreLayout, metadata: dict[str, Any], *,
                 overwrite: bool = False, block_steps: int | None = None,
                 checkpoint: Callable[[], np.ndarray | None] | None = None,
                 resume_from: ResumePoint | None = None) -> None:
        """Create the store at ``path``, or with ``resume_from`` carry on in the existing one.

        ``checkpoint()``, if given, returns the optimizer state (a float32 vector of
        ``layout.resume_size``); it is called after the last step of each block and saved
        with the block, so that an interrupted run can resume (:func:`find_resume_point`).
        It may return None when it has no state for that step; the last checkpoint then stays.
        """
        self.path = Path(path)
        self.layout = layout
        self._checkpoint = checkpoint
        self.block_steps = block_steps or self.default_block_steps(layout)
        if self.block_steps % layout.chunk_steps:
            raise ValueError(f"block_steps ({self.block_steps}) must be a multiple of chunk_steps "
                             f"({layout.chunk_steps})")
        chunk_bytes = layout.chunk_steps * layout.n_classes * layout.n_pixels * 4
        self._handoff_steps = min(self.block_steps, layout.chunk_steps * max(1, self.HANDOFF_BYTES // chunk_bytes))
        if resume_from is None:
            _prepare_target(self.path, overwrite=overwrite)
            self.group = _create_store(self.path, layout, metadata)
        else:
            _remove_partial_files(self.path)
            self.group = zarr.open_group(self.path, mode="r+")
        in_process = WriterProcess.available()
        # Block buffers ("slots") are reused: the store writer frees each once it is written.
        self._slots = shared_buffers(self._block_shapes(), self.N_SLOTS, shared=in_process)
        self._store_writer = _StoreWriter(self.group, layout, self._slots, resume_from)
        name = f"trajectory-writer:{self.path.name}"
        self._worker = WriterProcess(self._store_writer.handle, name) if in_process \
            else WriterThread(self._store_writer.handle, name)
        self._free_slots = list(range(self.N_SLOTS - 1, 0, -1))
        self._slots_in_flight: deque[int | None] = deque()  # per message sent, in order: the slot it frees
        self._slot = 0
        self._buffers = self._slots[0]
        # Carrying on after step s: rows from s + 1 are written again, whatever is there.
        first = 0 if resume_from is None else resume_from.step + 1
        self._block_start = first  # step held in buffer row 0
        self._next_step = first
        self._rows_handed = 0  # rows of this block already sent to the store writer
        self._next_handoff = self._handoff_steps  # buffer row count at which rows go next
        self._evals: list[tuple[float, float]] = []
        self._evals_handed = 0 if resume_from is None else len(resume_from.heldout)
        self.steps_done = first - 1  # last step whose row is on disk (as the store writer last said)
        self.finished = False
        self._failure: str | None = None
        self._closed = False

    @classmethod
    def default_block_steps(cls, layout: StoreLayout) -> int:
        """Rows per block: whole chunks, about ``BLOCK_BYTES`` of weights, no more than the run."""
        chunk_bytes = layout.chunk_steps * layout.n_classes * layout.n_pixels * 4
        run_chunks = -(-(layout.n_steps + 1) // layout.chunk_steps)
        return layout.chunk_steps * min(run_chunks, max(1, cls.BLOCK_BYTES // chunk_bytes))

    # Only the rows recorded in a block are ever written, so block buffers need no filling.
    def _block_shapes(self) -> dict[str, tuple[int, ...]]:
        layout, rows = self.layout, self.block_steps
        shapes: dict[str, tuple[int, ...]] = {"weights": (rows, layout.n_classes, layout.n_pixels),
                                              "loss": (rows,)}
        if layout.bias:
            shapes["bias"] = (rows, layout.n_classes)
        if layout.gradients:
            shapes["gradients"] = (rows, layout.n_classes, layout.n_pixels)
        if layout.resume_size:
            shapes["resume_state"] = (layout.resume_size,)
        return shapes

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

    def record_steps(self, first_step: int, weights: np.ndarray, losses: np.ndarray, *,
                     biases: np.ndarray | None = None, gradients: np.ndarray | None = None) -> None:
        """Record consecutive steps ``first_step ..`` at once: ``weights`` (n, class, pixel),
        ``losses`` (n,), and (n, class) ``biases`` / (n, class, pixel) ``gradients`` where the
        layout has them. The same rows as n calls of :meth:`record_step`, with one copy per block."""
        n_rows = len(weights)
        if first_step != self._next_step or first_step + n_rows - 1 > self.layout.n_steps:
            self._refuse_steps(first_step, first_step + n_rows - 1)
        done = 0
        while done < n_rows:
            row = self._next_step - self._block_start
            take = min(n_rows - done, self._next_handoff - row)
            rows, given = slice(row, row + take), slice(done, done + take)
            self._buffers["weights"][rows] = weights[given]
            self._buffers["loss"][rows] = losses[given]
            if self.layout.bias:
                self._buffers["bias"][rows] = biases[given]
            if self.layout.gradients:
                self._buffers["gradients"][rows] = gradients[given]
                if self._next_step == 0:  # step 0 has no gradient: NaN, like a row never written
                    self._buffers["gradients"][row] = np.nan
            self._next_step += take
            done += take
            if row + take == self._next_handoff:
                self._hand_off_rows()

    def _refuse_steps(self, first: int, last: int) -> None:
        self._raise_failure()
        if first != self._next_step:
            raise ValueError(f"steps must be recorded in order: expected {self._next_step}, got {first}")
        raise ValueError(f"step {last} is past the planned {self.layout.n_steps} steps")

    def record_eval(self, step: int, accuracy: float, loss: float) -> None:
        index = self._evals_handed + len(self._evals)
        planned = self.layout.eval_steps
        if index >= len(planned) or planned[index] != step:
            raise ValueError(f"evaluation at step {step} was not planned (planned: {planned[index:index + 3]}...)")
        self._evals.append((accuracy, loss))

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
        while self._worker.pending:
            self._take_reply(self._next_reply())
        self._raise_failure()

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
            self._send(("close", error), None)
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
            if self._failure is None:  # else the store writer's own failure is that exception, and says it
                log.warning("%s: the failure could not be recorded in the store either (%s)", self.path, error)

    def _hand_off_rows(self) -> None:
        """The buffer holds another hand-off's worth of rows: send them, or the whole block if full."""
        n_rows = self._next_step - self._block_start
        if n_rows == self.block_steps:
            self._hand_over()
            return
        self._take_arrived_replies()
        self._raise_failure()
        self._send(("rows", self._slot, self._block_start, self._rows_handed, n_rows - self._rows_handed), None)
        self._rows_handed = n_rows
        self._next_handoff = min(self.block_steps, n_rows + self._handoff_steps)

    def _hand_over(self, *, check: bool = True, checkpoint: bool = True) -> None:
        """Send the block recorded so far (its rows not handed off yet, its small arrays, a
        checkpoint) and the evaluations since the last hand-over; the store writer then moves the marker."""
        self._take_arrived_replies()
        if check:
            self._raise_failure()
        n_rows = self._next_step - self._block_start
        if not n_rows and not self._evals:
            return
        slot = self._slot if n_rows else None
        has_state = False
        if n_rows and checkpoint and self._checkpoint:
            state = self._checkpoint()
            if state is not None:
                if len(state):
                    self._buffers["resume_state"][:] = state
                has_state = True
        self._send(("block", slot, self._block_start, self._rows_handed, n_rows, self._evals_handed,
                    list(self._evals), has_state), slot)
        self._evals_handed += len(self._evals)
        self._evals.clear()
        if n_rows:
            while not self._free_slots:  # wait for the store writer to free one
                self._take_reply(self._next_reply())
            self._slot = self._free_slots.pop()
            self._buffers = self._slots[self._slot]
            self._block_start = self._next_step
            self._rows_handed = 0
            self._next_handoff = self._handoff_steps

    def _send(self, message: tuple, frees_slot: int | None) -> None:
        try:
            self._worker.submit(message)
        except OSError as error:
            self._failure = self._failure or str(error)
            self._raise_failure()
        self._slots_in_flight.append(frees_slot)

    def _take_arrived_replies(self) -> None:
        """Take the replies in so far, without waiting: a failure is noticed early and slots freed."""
        for reply in self._worker.replies():
            self._take_reply(reply)

    def _next_reply(self) -> Any:
        try:
            return self._worker.next_reply()
        except OSError as error:
            self._failure = self._failure or str(error)
            self._raise_failure()

    def _take_reply(self, reply: Any) -> None:
        slot = self._slots_in_flight.popleft()
        if slot is not None:
            self._free_slots.append(slot)
        if isinstance(reply, WriterFailed):
            self._failure = self._failure or reply.reason
            return
        self.steps_done = reply["steps_done"]
        self.finished = reply["finished"]

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise TrajectoryError(f"{self.path}: writing the store failed: {self._failure}. Committed steps are kept: "
                                  "fix the cause, then run the stage again (`dvc repro` or --resume carries it on)")


class _StoreWriter:
    """Writes what the training side hands over into the store, progress marker last.

    It runs in the store writer (a child process or a thread), never on the training
    thread, and it alone writes the store once it is created. Messages, in order:

    - ``("rows", slot, block_start, first_row, n_rows)``: rows of a block being filled, for
      the big per-step arrays;
    - ``("block", slot, block_start, rows_handed, n_rows, first_eval, evals, has_state)``: a
      block is complete (or flushed): the rest of its rows, its small arrays, evaluations
      and checkpoint, then the marker;
    - ``("close", error)``: the final marker.
    """

    def __init__(self, group: zarr.Group, layout: StoreLayout, slots: list[dict[str, np.ndarray]],
                 resume_from: ResumePoint | None) -> None:
        self.group, self.layout, self.slots = group, layout, slots
        self.arrays = {name: ChunkWriter.wrap(group[name]) for name in group.array_keys()}
        self.step_arrays = [name for name in ("weights", "gradients") if name in slots[0]]
        self.scalar_arrays = [name for name in ("loss", "bias") if name in slots[0]]
        self.steps_done = -1 if resume_from is None else resume_from.step
        self.evals_written = 0 if resume_from is None else len(resume_from.heldout)
        # The checkpoint the marker names, and the resume_state row the next one goes to:
        # never the row the marker names, so a crash mid-write leaves that one intact.
        self.resume = None if resume_from is None else {"step": resume_from.step, "row": resume_from.row}
        self.next_checkpoint_row = 0 if resume_from is None else 1 - resume_from.row
        self.finished = False

    def handle(self, messages: list[tuple]) -> list[dict[str, Any]]:
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

    def _handle(self, messages: list[tuple]) -> list[dict[str, Any]]:
        replies = []
        for index, (kind, *details) in enumerate(messages):
            if kind == "rows":
                self._write_rows(*details)
            elif kind == "block":
                self._write_block(*details)
                if not (index + 1 < len(messages) and messages[index + 1][0] == "close"):
                    self._write_progress()  # else the close writes it, once
            else:
                error = details[0]
                self.finished = error is None and self.steps_done == self.layout.n_steps
                self._write_progress(error=error)
            replies.append({"steps_done": self.steps_done, "finished": self.finished})
        return replies

    def _write_rows(self, slot: int, block_start: int, first_row: int, n_rows: int) -> None:
        rows = slice(first_row, first_row + n_rows)
        for name in self.step_arrays:  # a chunk's rows may come in pieces (pipeline.chunkwriter keeps it)
            self.arrays[name][block_start + first_row:block_start + first_row + n_rows] = self.slots[slot][name][rows]

    def _write_block(self, slot: int | None, start: int, rows_handed: int, n_rows: int, first_eval: int,
                     evals: list[tuple[float, float]], has_state: bool) -> None:
        # Data first, progress marker after: a reader trusting the marker never sees a row
        # that is not on disk yet.
        if n_rows:
            buffers = self.slots[slot]
            self._write_rows(slot, start, rows_handed, n_rows - rows_handed)
            for name in self.scalar_arrays:
                self.arrays[name][start:start + n_rows] = buffers[name][:n_rows]
            self.steps_done = start + n_rows - 1
        if evals:
            done = slice(first_eval, first_eval + len(evals))
            values = np.asarray(evals, dtype=np.float32)
            self.arrays["heldout_accuracy"][done] = values[:, 0]
            self.arrays["heldout_loss"][done] = values[:, 1]
            self.evals_written = first_eval + len(evals)
        if has_state:
            row = self.next_checkpoint_row
            if self.layout.resume_size:  # plain SGD keeps no optimizer state: the weights are all it needs
                self.arrays["resume_state"][row] = self.slots[slot]["resume_state"]
            self.resume = {"step": self.steps_done, "row": row}
            self.next_checkpoint_row = 1 - row

    def _write_progress(self, *, error: str | None = None) -> None:
        progress = {
            "steps_done": self.steps_done,
            "n_steps": self.layout.n_steps,
            "evals_done": self.evals_written,
            "finished": self.finished,
        }
        if not self.finished:
            # Only for telling a live run from a stale one; a finished store carries no
            # timestamp, so a resumed run ends byte for byte as an uninterrupted one.
            progress["updated"] = _now()
        if self.resume:
            progress["resume"] = self.resume
        if error:
            progress["error"] = error
        self.group.attrs["progress"] = progress


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
            check_schema(path)
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


def _create_store(path: Path, layout: StoreLayout, metadata: dict[str, Any]) -> zarr.Group:
    # The group's attributes are written with the group itself, in one atomic write of its
    # zarr.json: a reader polling a new run sees either no store or one whose marker says
    # "no steps yet", never a group without its marker.
    group = zarr.open_group(path, mode="w-", zarr_format=3, attributes={
        "weightlapse": {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **metadata},
        "progress": {"steps_done": -1, "n_steps": layout.n_steps, "evals_done": 0,
                     "finished": False, "updated": _now()},
    })
    rows = layout.n_steps + 1
    per_step = (layout.chunk_steps, layout.n_classes, layout.n_pixels)

    def floats(name, shape, chunks, dims):
        group.create_array(name, shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                           dimension_names=dims, **_step_series_codecs(len(shape)))

    floats("weights", (rows, layout.n_classes, layout.n_pixels), per_step, WEIGHT_DIMS)
    floats("loss", (rows,), (min(rows, SCALAR_CHUNK),), ("step",))
    if layout.bias:
        floats("bias", (rows, layout.n_classes), (SCALAR_CHUNK // 16, layout.n_classes), ("step", "class"))
    if layout.gradients:
        floats("gradients", (rows, layout.n_classes, layout.n_pixels), per_step, WEIGHT_DIMS)
    if layout.resume_size:
        # Two rows, written in turn: the progress marker names the one that is complete.
        group.create_array("resume_state", shape=(2, layout.resume_size), chunks=(1, layout.resume_size),
                           dtype="float32", fill_value=np.nan, dimension_names=("checkpoint", "value"),
                           compressors=_step_series_codecs(1)["compressors"])
    n_evals = len(layout.eval_steps)
    floats("heldout_accuracy", (n_evals,), (max(n_evals, 1),), ("eval_step",))
    floats("heldout_loss", (n_evals,), (max(n_evals, 1),), ("eval_step",))
    # Coordinates are known up front: write them whole now.
    step = group.create_array("step", shape=(rows,), chunks=(min(rows, SCALAR_CHUNK),), dtype="int64",
                              fill_value=-1, dimension_names=("step",))
    step[:] = np.arange(rows, dtype=np.int64)
    eval_step = group.create_array("eval_step", shape=(n_evals,), chunks=(max(n_evals, 1),), dtype="int64",
                                   fill_value=-1, dimension_names=("eval_step",))
    eval_step[:] = np.asarray(layout.eval_steps, dtype=np.int64)
    return group


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# What must be the same for a run to carry on in an existing store.
RESUME_MUST_MATCH = ("model", "params", "dataset", "engine")


def find_resume_point(path: str | Path, layout: StoreLayout, metadata: dict[str, Any]) -> ResumePoint | str:
    """Where the unfinished run in the store at ``path`` can carry on, or why it cannot.

    It can when the store was started with the same model, params, dataset and engine as
    ``metadata`` describes and holds a checkpoint: the step the progress marker names, its
    weights and its optimizer state.
    """
    path = Path(path)
    links = _links_in(path)
    if links:
        return f"it holds a symbolic link ({links[0]}), which the writer would write through"
    try:
        group = open_store(path)
        meta, progress = dict(group.attrs["weightlapse"]), dict(group.attrs["progress"])
    except (TrajectoryError, KeyError, TypeError) as error:
        return f"it is not a readable trajectory ({error})"
    if progress.get("finished"):
        return "it is finished"
    for key in RESUME_MUST_MATCH:
        if meta.get(key) != json.loads(json.dumps(metadata.get(key))):
            return f"it was started with other {key}"
    resume = progress.get("resume")
    if not isinstance(resume, dict):
        return "it has no checkpoint yet"
    try:
        step, row = int(resume["step"]), int(resume["row"])
        if not (0 <= step <= int(progress["steps_done"]) and row in (0, 1)):
            raise ValueError(f"checkpoint {resume} beyond the marker {progress['steps_done']}")
        if group["weights"].shape[0] != layout.n_steps + 1 or (
                layout.resume_size and group["resume_state"].shape != (2, layout.resume_size)):
            raise ValueError("array shapes differ from this run's")
        weight = group["weights"][step]
        bias = group["bias"][step] if layout.bias else None
        state = group["resume_state"][row] if layout.resume_size else np.zeros(0, np.float32)
        evals_done = sum(1 for e in layout.eval_steps[:int(progress["evals_done"])] if e <= step)
        heldout = np.stack([group["heldout_accuracy"][:evals_done], group["heldout_loss"][:evals_done]], axis=1)
        losses = group["loss"][1:step + 1]
    except (KeyError, ValueError, TypeError) as error:
        return f"its checkpoint cannot be used ({error})"
    if not (np.isfinite(weight).all() and np.isfinite(state).all() and np.isfinite(losses).all()):
        return "its checkpoint holds values that are not finite"
    return ResumePoint(step=step, weight=weight, bias=bias, optimizer_state=state, row=row, losses=losses,
                       heldout=heldout)


def _links_in(path: Path) -> list[str]:
    """Symbolic links at or below ``path`` (not followed), relative to it."""
    if path.is_symlink():
        return ["."]
    found = []
    for directory, subdirectories, files in os.walk(path):
        found += [os.path.relpath(os.path.join(directory, name), path) for name in subdirectories + files
                  if os.path.islink(os.path.join(directory, name))]
    return found


def _remove_partial_files(path: Path) -> None:
    """Temporary files a killed writer left (ours and zarr's): never data, and no part of a clean store."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


# -- reading -------------------------------------------------------------------------

def read_progress(path: str | Path | Location, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's progress marker, validated: steps_done, n_steps, evals_done, finished (and resume, error).

    Only the marker is read: a store still being created (no arrays yet) has one saying -1."""
    location = store_location(path, storage_options)
    return Progress.parse(open_store(location).attrs.get("progress"), str(location)).as_dict()


def open_run(path: str | Path | Location, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open a run's trajectory as a lazy (dask-backed) xarray Dataset of its valid steps.

    ``path`` is a run directory (``runs/<run>``) or its ``trajectory.zarr``, as a local
    path or an fsspec URL (``s3://bucket/runs/<run>``, reached with ``storage_options``).
    The store is checked first (:func:`pipeline.store.check_store`); only steps up to the
    progress marker are included, so a run still being written reads as the shorter run it
    is so far. Weights are read only when computed; a damaged chunk raises TrajectoryError
    for its steps.
    """
    checked = check_store(path, storage_options)
    group, progress = checked.group, checked.progress
    try:
        ds = xr.open_zarr(group.store, consolidated=False, zarr_format=3, chunks={})
    except Exception as error:  # noqa: BLE001
        raise TrajectoryError(f"{checked.location}: cannot be read as a trajectory: {error}") from None
    ds = ds.drop_vars("resume_state", errors="ignore")  # the writer's, for resuming; no data
    ds = ds.isel(step=slice(0, progress.steps_done + 1), eval_step=slice(0, progress.evals_done))
    for name in ("weights", "gradients"):
        if name in ds:
            ds[name] = ds[name].copy(data=dask_steps(group[name], n_rows=progress.steps_done + 1,
                                                     where=str(checked.location), finite=name == "weights"))
    ds.attrs["progress"] = progress.as_dict()
    return ds.assign_coords({"class": np.arange(ds.sizes["class"]), **pixel_coords(ds.sizes["pixel"])})


def dask_steps(array: zarr.Array, *, n_rows: int | None = None, where: str | None = None,
               finite: bool = True) -> da.Array:
    """A (step, ...) store array as a dask array of about ``DASK_BLOCK_STEPS`` steps per task.

    Whole store chunks per task, several of them: zarr reads a task's chunks concurrently,
    and a cluster schedules eight times fewer tasks than one per 64-step chunk. Per-task
    overhead on a Dask cluster had made a plain sum over a run 3.5x slower than reading it.
    Reads go through :class:`~pipeline.store.CheckedSteps`: a damaged chunk raises
    TrajectoryError naming its steps (``finite``: NaN or infinite values count as damage).
    ``n_rows``: only the first rows (the committed steps), so no task reads past the marker.
    """
    per_chunk = array.chunks[0]
    steps = per_chunk * max(1, DASK_BLOCK_STEPS // per_chunk)
    checked = CheckedSteps(array, where or str(array.store), n_rows=n_rows, finite=finite)
    return da.from_array(checked, chunks=(steps, *checked.shape[1:]), asarray=True, lock=False, fancy=False,
                         name=f"{array.basename}-{uuid.uuid4().hex}", meta=np.empty((0,) * checked.ndim, array.dtype))


def pixel_coords(n_pixels: int) -> dict[str, Any]:
    """xarray coordinates of the pixel dimension: its index and the image row and column."""
    pixel = np.arange(n_pixels)
    return {"pixel": pixel, "row": ("pixel", pixel // IMAGE_SIDE), "col": ("pixel", pixel % IMAGE_SIDE)}
