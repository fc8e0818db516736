"""One colour scale over a whole run: the steps read for it, and their magnitudes, cached.

Reading a whole run for its largest value is out of the question (300,000 steps are 9 GB),
so a run's scale is sampled: the first step of evenly spaced chunks (the cheapest rows to
read, one chunk each) and the newest step. Weights under training grow, and so do the
differences between steps or between runs, so the newest and the extremes dominate in
practice; a view adds the frame it shows, so a frame is never clipped either way.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

SCALE_SAMPLES = 32  # chunks' first steps sampled at most, besides the newest step
SCALES_KEPT = 64    # scales cached: each is a few dozen numbers


def sampled_steps(last_step: int, chunk_steps: int) -> list[int]:
    """The steps a whole-run scale reads, up to ``last_step``: the first of evenly spaced
    chunks (a power-of-two stride, so the samples of a growing run stay the same ones as it
    grows), and ``last_step``."""
    if last_step < 0:
        return []
    chunks = last_step // chunk_steps + 1
    stride = max(1, 1 << max(0, (chunks - 1) // SCALE_SAMPLES).bit_length())
    return sorted({chunk * chunk_steps for chunk in range(0, chunks, stride)} | {last_step})


def largest_magnitude(values: np.ndarray) -> float:
    """The largest finite |value|; 0.0 if there is none."""
    values = np.asarray(values)
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


class RunScales:
    """Whole-run colour limits, each cached as the magnitudes of its sampled steps under a
    key naming everything it was computed from (the stores' identities, the parameter, the
    step subtracted, the centring), so a run that grows reads only its new samples."""

    def __init__(self, kept: int = SCALES_KEPT) -> None:
        self._kept = kept
        self._lock = threading.Lock()
        self._magnitudes: OrderedDict[Hashable, dict[int, float]] = OrderedDict()

    def limit(self, key: Hashable, steps: list[int], magnitude_at: Callable[[int], float]) -> float:
        """The largest ``magnitude_at(step)`` over ``steps`` (1.0 if there is nothing to scale)."""
        if not steps:
            return 1.0
        with self._lock:
            known = self._magnitudes.setdefault(key, {})
            self._magnitudes.move_to_end(key)
            while len(self._magnitudes) > self._kept:
                self._magnitudes.popitem(last=False)
        for step in steps:
            if step not in known:  # read outside the lock: a sample decodes a chunk
                known[step] = magnitude_at(step)
        limit = max(known[step] for step in steps)
        return limit if limit > 0 else 1.0
