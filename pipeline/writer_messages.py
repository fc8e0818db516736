"""What the training side (:class:`~weightlapse.pipeline.writer.TrajectoryWriter`) and the
store writer (:class:`~weightlapse.pipeline.store_writer.StoreWriter`) say to each other.

Messages travel through :mod:`weightlapse.pipeline.handoff` (a pipe to a forked process,
or a queue to a thread); the rows themselves stay in the shared block buffers ("slots")
the messages name. Each message gets one reply, in order: :class:`Written`, or the
transport's :class:`~weightlapse.pipeline.handoff.WriterFailed`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WriteRows:
    """Rows ``first_row .. first_row + n_rows - 1`` of the block in ``slot`` (whose row 0 is
    step ``block_start``), for the big per-step arrays: written while the block fills."""

    slot: int
    block_start: int
    first_row: int
    n_rows: int


@dataclass(frozen=True, slots=True)
class WriteBlock:
    """A block is complete (or flushed): the rest of its rows (from ``rows_handed`` of
    ``n_rows``), its small arrays, the evaluations ``first_eval ..`` and, with
    ``has_checkpoint``, the optimizer state in the slot; then the progress marker moves.
    ``slot`` is None when only evaluations are sent (``n_rows`` 0)."""

    slot: int | None
    block_start: int
    rows_handed: int
    n_rows: int
    first_eval: int
    evals: tuple[tuple[float, float], ...]  # (accuracy, loss) per evaluation
    has_checkpoint: bool


@dataclass(frozen=True, slots=True)
class Finish:
    """The last message: write the final marker, finished unless ``error`` says why not."""

    error: str | None = None


@dataclass(frozen=True, slots=True)
class Written:
    """The reply to every message: what the marker on disk says now."""

    steps_done: int
    finished: bool


Message = WriteRows | WriteBlock | Finish
