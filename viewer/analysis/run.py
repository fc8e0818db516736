"""One run's store, read lazily and fast enough to replay: a step costs one chunk decompression at most.

Runs are opened by name through :class:`~weightlapse.viewer.analysis.runs.RunCatalog`;
every cached chunk belongs to the store it came from (its identity), never to the name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from weightlapse.viewer.analysis.frames import centred
from weightlapse.viewer.analysis.scales import largest_magnitude
from weightlapse.viewer.analysis.stored_run import ChunkCache, StoredRun
from weightlapse.pipeline.store import (
    HISTORY_NAME,
    N_PIXELS,
    CheckedStore,
    CheckedSteps,
    PixelHistory,
    Progress,
    TrajectoryError,
    damaged,
    dask_steps,
    StaleHistoryError,
    open_history,
    quiet_numcodecs,
    read_identity,
)

# Decoded chunks kept per open run (each ~2 MB at 64 steps): enough for smooth playback
# forwards and backwards without re-decompressing.
CHUNK_CACHE_SIZE = 8


@dataclass(frozen=True)
class PixelTrace:
    """One pixel's weight in every class over every valid step, exactly as stored."""

    pixel: int
    steps: np.ndarray   # (step,) int64: 0 .. last_step
    values: np.ndarray  # (class, step) float32
    from_copy: int      # how many of the first steps came from the pixel history (the rest from the store)


class Run(StoredRun):
    """A softmax-regression run's store, read lazily: a step's weights cost one chunk
    decompression at most, from a chunk cache that belongs to the store it came from
    (:class:`StoredRun`: a retrained run is read afresh)."""

    def _load(self, checked: CheckedStore) -> None:
        checked.require_matrix("the viewer shows")
        weights = checked.array("weights")
        with self._lock:
            self._checked = checked
            self.identity = checked.identity
            self.metadata = checked.metadata
            self.meta: dict[str, Any] = checked.meta
            self._weights = weights
            self._loss = checked.array("loss")
            self._eval_step = checked.array("eval_step")
            self._accuracy = checked.array("heldout_accuracy")
            self.n_classes = int(weights.shape[1])
            self.chunk_steps = int(weights.chunks[0])
            self.progress: Progress = checked.progress
            self._chunks = ChunkCache(CHUNK_CACHE_SIZE * self.chunk_steps * int(np.prod(weights.shape[1:])) * 4)
            self._history: tuple[tuple, PixelHistory | None] | None = None

    # -- state --------------------------------------------------------------------------
    def _check_current(self) -> None:
        """Before serving a step from memory: a local store replaced since is read afresh
        (one stat); object storage is checked at :meth:`refresh`."""
        if self.store.local and read_identity(self.store) != self.identity:
            self.refresh()

    @property
    def class_names(self) -> list[str]:
        names = self.metadata.class_names
        return list(names) if names else [str(index) for index in range(self.n_classes)]

    # -- data ---------------------------------------------------------------------------
    def check_step(self, step: int) -> int:
        if not 0 <= step <= self.last_step:
            raise IndexError(f"step {step} is outside this run's valid steps 0..{self.last_step}")
        return step

    def weights_at(self, step: int) -> np.ndarray:
        """Weights after ``step`` optimizer steps, (class, pixel) float32, exactly as stored."""
        self._check_current()
        self.check_step(step)
        chunk, row = divmod(step, self.chunk_steps)
        return self._chunk(chunk)[row]

    def _chunk(self, chunk: int) -> np.ndarray:
        start = chunk * self.chunk_steps
        with self._lock:
            progress = self.progress  # one marker: the rows there are, and whether more will come
            stop = min(start + self.chunk_steps, progress.steps_done + 1)
            block = self._chunks.get(chunk, stop - start)
            if block is not None:
                return block
            identity, weights, cache = self.identity, self._weights, self._chunks
        try:
            block = weights[start:stop]  # (step, class, pixel): one chunk, one decompression
        except Exception as error:  # noqa: BLE001 - zarr/numcodecs raise many kinds for a corrupt chunk
            raise damaged(str(self.store), slice(start, stop), f"{type(error).__name__}: {str(error)[:200]}") from None
        if not np.isfinite(block).all():
            # A chunk file that went missing reads as NaN, as does a store replaced under us.
            if self.store.local and read_identity(self.store) != identity:
                raise TrajectoryError(f"{self.store}: the run was replaced while step {start} was read; read it again")
            raise damaged(str(self.store), slice(start, stop), "it holds values that are not finite (NaN or infinite)")
        if stop - start == self.chunk_steps or progress.finished:
            # The chunk at the frontier of a run being written still changes; a finished run's does not.
            with self._lock:
                cache.put(chunk, block)
        return block

    def read_row(self, step: int) -> np.ndarray:
        """The weights of ``step`` (class, pixel), read past the chunk cache: sampling a run
        for its colour scale must not evict the chunks being replayed."""
        self.check_step(step)
        return np.asarray(self._read(self._weights, step, step + 1))[0]

    def abs_max(self, step: int, *, centre: bool = False, minus: np.ndarray | None = None) -> float:
        """The largest |weight| of ``step`` (of ``weights - minus`` with ``minus``; of the
        centred values with ``centre``), read past the chunk cache."""
        row = self.read_row(step)
        if minus is not None:
            row = row - minus
        return largest_magnitude(centred(row) if centre else row)

    def weights(self, start: int = 0, stop: int | None = None) -> da.Array:
        """Weights of steps ``start..stop`` (inclusive) as a lazy dask array (step, class, pixel)."""
        stop = self.last_step if stop is None else stop
        self.check_step(start)
        self.check_step(stop)
        if stop < start:
            raise ValueError(f"step range {start}..{stop} is empty: the first step must not be after the last")
        return dask_steps(self._weights, n_rows=self.last_step + 1, where=str(self.store))[start:stop + 1]

    def pixel_history(self, pixel: int) -> PixelTrace:
        """Every class's weight of ``pixel`` (0..783, row * 28 + column) over every valid step.

        Read from the run's pixel history (pipeline.store.history) for the steps it holds when
        it is a copy of this very store, and from the store for the rest: the steps written
        since, or all of them without a usable copy (300,000 steps then cost minutes, not
        milliseconds: ``weightlapse index`` makes the copy)."""
        self._check_current()
        if isinstance(pixel, bool) or not isinstance(pixel, (int, np.integer)) or not 0 <= pixel < N_PIXELS:
            raise IndexError(f"pixel {pixel!r} is outside 0..{N_PIXELS - 1}")
        n_rows = self.last_step + 1
        parts, copied = [], 0
        history = self._pixel_history_copy()
        if history is not None and n_rows > 0:
            try:
                parts.append(history.read(int(pixel))[:, :n_rows])
                copied = parts[0].shape[1]
            except StaleHistoryError:
                parts, copied = [], 0
        if copied < n_rows:
            with quiet_numcodecs():
                rows = CheckedSteps(self._weights, str(self.store), n_rows=n_rows)[copied:n_rows, :, int(pixel)]
            parts.append(np.asarray(rows).T)
        values = np.concatenate(parts, axis=1) if parts else np.empty((self.n_classes, 0), np.float32)
        return PixelTrace(int(pixel), np.arange(n_rows, dtype=np.int64), values, copied)

    def history_steps(self) -> int:
        """How many of the first steps the run's pixel history holds (0: none that can be used)."""
        self._check_current()
        history = self._pixel_history_copy()
        return 0 if history is None else min(history.steps, self.last_step + 1)

    def _pixel_history_copy(self) -> PixelHistory | None:
        """The run's pixel history if it is a copy of this store, checked once per copy and store."""
        if not self.store.local:
            return None
        store = self._checked.location.local_path  # the store itself, even when opened as its run directory
        run_dir = store.parent
        try:
            stat = os.stat(run_dir / HISTORY_NAME / "zarr.json")
            key = (self.identity, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except OSError:
            return None
        known = self._history
        if known is not None and known[0] == key:
            return known[1]
        try:
            history = open_history(run_dir, self._checked)
        except (TrajectoryError, OSError):
            history = None
        self._history = (key, history)
        return history

    def loss(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, training batch loss) over the valid steps; step 0 has no loss and is left out."""
        n = self.last_step + 1
        values = self._read(self._loss, 1, n) if n > 1 else np.empty(0, np.float32)
        return np.arange(1, max(n, 1)), np.asarray(values)

    def accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        """(eval steps, held-out accuracy) of the evaluations done so far."""
        n = self.progress.evals_done
        return np.asarray(self._read(self._eval_step, 0, n)), np.asarray(self._read(self._accuracy, 0, n))

    def _read(self, array, start: int, stop: int) -> np.ndarray:
        try:
            return array[start:stop]
        except Exception as error:  # noqa: BLE001
            raise damaged(f"{self.store} ({array.basename})", slice(start, stop),
                          f"{type(error).__name__}: {str(error)[:200]}") from None
