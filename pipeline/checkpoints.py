"""What a block carries besides its rows, for both kinds of store (pipeline.writer's and
pipeline.network_writer's): the held-out scores since the last block and the optimizer
checkpoint after it. :class:`BlockExtras` gathers them on the training side,
:class:`ExtrasWriter` writes them on the store writer's, and both give the marker's
``evals_done`` and ``resume`` (pipeline/store/format.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from weightlapse.pipeline.resume import ResumePoint
from weightlapse.pipeline.writer_messages import WriteBlock


class BlockExtras:
    """The training side: evaluations recorded since the last block, and the checkpoint.

    ``checkpoint()`` returns the optimizer state (a float32 vector of the layout's
    ``resume_size``), or None when it has no state for that step: the last checkpoint then stays."""

    def __init__(self, eval_steps: tuple[int, ...], checkpoint: Callable[[], np.ndarray | None] | None,
                 resume_from: ResumePoint | None) -> None:
        self.eval_steps, self._checkpoint = eval_steps, checkpoint
        self._evals: list[tuple[float, float]] = []
        self._evals_handed = 0 if resume_from is None else len(resume_from.heldout)

    @property
    def pending(self) -> bool:
        return bool(self._evals)

    def record_eval(self, step: int, accuracy: float, loss: float) -> None:
        index = self._evals_handed + len(self._evals)
        planned = self.eval_steps
        if index >= len(planned) or planned[index] != step:
            raise ValueError(f"evaluation at step {step} was not planned (planned: {planned[index:index + 3]}...)")
        self._evals.append((accuracy, loss))

    def block(self, slot: int | None, block_start: int, rows_handed: int, n_rows: int,
              buffers: dict[str, np.ndarray], *, checkpoint: bool) -> WriteBlock:
        """The message for this block, its state put in ``buffers["resume_state"]`` (with
        ``checkpoint``, when the block has rows); the evaluations count as handed over."""
        has_state = False
        if n_rows and checkpoint and self._checkpoint:
            state = self._checkpoint()
            if state is not None:
                if len(state):
                    buffers["resume_state"][:] = state
                has_state = True
        message = WriteBlock(slot, block_start, rows_handed, n_rows, self._evals_handed, tuple(self._evals), has_state)
        self._evals_handed += len(self._evals)
        self._evals.clear()
        return message


class ExtrasWriter:
    """The store writer's side: writes a block's evaluations and checkpoint, and keeps what
    the progress marker says of them."""

    def __init__(self, resume_size: int, resume_from: ResumePoint | None) -> None:
        self.resume_size = resume_size
        self.evals_written = 0 if resume_from is None else len(resume_from.heldout)
        # The checkpoint the marker names, and the resume_state row the next one goes to:
        # never the row the marker names, so a crash mid-write leaves that one intact.
        self.resume = None if resume_from is None else {"step": resume_from.step, "row": resume_from.row}
        self.next_checkpoint_row = 0 if resume_from is None else 1 - resume_from.row

    def write(self, arrays: dict, block: WriteBlock, buffers: dict[str, np.ndarray] | None, steps_done: int) -> None:
        """After the block's rows (up to ``steps_done``) are written, before the marker moves."""
        if block.evals:
            done = slice(block.first_eval, block.first_eval + len(block.evals))
            values = np.asarray(block.evals, dtype=np.float32)
            arrays["heldout_accuracy"][done] = values[:, 0]
            arrays["heldout_loss"][done] = values[:, 1]
            self.evals_written = block.first_eval + len(block.evals)
        if block.has_checkpoint:
            row = self.next_checkpoint_row
            if self.resume_size:  # plain SGD keeps no optimizer state: the weights are all it needs
                arrays["resume_state"][row] = buffers["resume_state"]
            self.resume = {"step": steps_done, "row": row}
            self.next_checkpoint_row = 1 - row
