"""Reading a checked store's committed steps: a damaged chunk is an error naming its steps.

:func:`~weightlapse.pipeline.store.check_store` checks what can be checked without reading
chunks; :class:`CheckedSteps` checks each chunk as it is read, so the rest of a run stays
readable when one chunk is damaged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from weightlapse.pipeline.store.format import TrajectoryError


class CheckedSteps:
    """A (step, ...) store array whose reads raise :class:`TrajectoryError` for a damaged chunk.

    It stands in for the zarr array under dask (``da.from_array``): a chunk that cannot be
    decoded, or (with ``finite``) holds NaN or infinite values, names its steps and the
    store instead of surfacing a codec's own error or NaN rows as data.
    """

    def __init__(self, array: zarr.Array, where: str, *, n_rows: int | None = None, finite: bool = True) -> None:
        self.array, self.where, self.finite = array, where, finite
        rows = array.shape[0] if n_rows is None else min(n_rows, array.shape[0])
        self.shape, self.dtype, self.ndim = (rows, *array.shape[1:]), array.dtype, array.ndim

    def __getitem__(self, key):
        try:
            block = self.array[key]
        except Exception:  # noqa: BLE001 - codecs and stores raise many kinds for a damaged chunk
            raise self._locate(key) from None
        if self.finite and block.size and not np.isfinite(block).all():
            raise self._locate(key)
        return block

    def _locate(self, key) -> TrajectoryError:
        """The error for the first damaged store chunk among the steps of ``key``."""
        steps = key[0] if isinstance(key, tuple) else key
        first, stop, _ = steps.indices(self.shape[0]) if isinstance(steps, slice) else (steps, steps + 1, 1)
        per_chunk = self.array.chunks[0]
        for start in range(first - first % per_chunk, stop, per_chunk):
            rows = slice(max(start, first), min(start + per_chunk, stop))
            try:
                block = self.array[rows]
            except Exception as error:  # noqa: BLE001
                return damaged(self.where, rows, f"{type(error).__name__}: {str(error)[:200]}")
            if self.finite and not np.isfinite(block).all():
                return damaged(self.where, rows, "it holds values that are not finite (NaN or infinite)")
        return damaged(self.where, steps, "reading failed")


def damaged(where: str, steps: Any, reason: str) -> TrajectoryError:
    span = f"steps {steps.start}..{steps.stop - 1}" if isinstance(steps, slice) else f"step {steps}"
    return TrajectoryError(f"{where}: {span} cannot be read ({reason}); that part of the store is damaged: "
                           "retrain the run (`dvc repro`); other steps can still be read")
