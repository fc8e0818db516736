"""Which steps an animation shows: evenly spaced, logarithmic, or by distance travelled.

Training moves the weights most in its first steps: an animation of 3,000 steps spaced
evenly spends one frame on the first 30 and shows the picture form in a blink. Each
spacing here picks ``n_frames`` steps of ``start..stop`` (both kept, sorted, unique):

- ``even``: equal steps between frames;
- ``log``: equal ratios of (step - start + 1) between frames: every step at first, then ever
  further apart (the default: it needs no reading of the run);
- ``distance``: a frame per equal weight-space distance travelled (L2, summed along the
  path), so a frame is shown where the weights change.

The distance is measured on the run itself (:func:`path_length`, with dask, out of core):
between consecutive steps for a range of up to ``MAX_DISTANCE_SAMPLES`` steps, else between
that many evenly spaced steps, which counts the straight-line change from one sampled step
to the next (the change a frame can show) rather than the noise in between. The spacing
functions themselves are pure: numbers in, steps out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dask.array as da
import numpy as np

from weightlapse.pipeline.cluster import compute

MAX_DISTANCE_SAMPLES = 1024  # 44 s for 4,096 of a 300,000-step run (docs/benchmarks.md)


@dataclass(frozen=True)
class Travelled:
    """Cumulative weight-space distance along a run: at ``steps[i]`` it has travelled ``distance[i]``."""

    steps: np.ndarray     # (sample,) int64, increasing
    distance: np.ndarray  # (sample,) float64, non-decreasing, 0 at steps[0]


def _check(start: int, stop: int, n_frames: int) -> None:
    if stop < start:
        raise ValueError(f"step range {start}..{stop} is empty: the first step must not be after the last")
    if n_frames < 1:
        raise ValueError(f"an animation needs at least one frame, not {n_frames}")


def even_steps(start: int, stop: int, n_frames: int) -> np.ndarray:
    """``n_frames`` steps (fewer if the range is shorter) at equal intervals, both ends kept."""
    _check(start, stop, n_frames)
    count = min(stop - start + 1, n_frames)
    if count == 1:
        return np.array([start], np.int64)
    return np.unique(np.linspace(start, stop, count).round().astype(np.int64))


def log_steps(start: int, stop: int, n_frames: int) -> np.ndarray:
    """``n_frames`` steps (fewer if the range is shorter), ``start + u - 1`` for u spaced
    geometrically over 1..stop-start+1, but never closer than one step: every step at first."""
    _check(start, stop, n_frames)
    top = stop - start + 1                 # u runs over 1..top
    count = min(top, n_frames)
    if count == 1:
        return np.array([start], np.int64)
    offsets = [1]
    for index in range(1, count - 1):
        current, left = offsets[-1], count - index   # frames still to place, the last included
        wanted = round(current * (top / current) ** (1 / left))
        # at least one step on, and room left for the frames after it (one step apart at least)
        offsets.append(min(max(current + 1, wanted), top - (left - 1)))
    offsets.append(top)
    return start + np.asarray(offsets, np.int64) - 1


def distance_steps(start: int, stop: int, n_frames: int, travelled: Travelled) -> np.ndarray:
    """Up to ``n_frames`` steps a frame's share of the distance apart, both ends kept.

    ``travelled`` must cover start..stop. Where one step travels further than a frame's share
    it gets one frame (frames are never repeated), so there can be fewer than ``n_frames``;
    a range that does not move at all is spaced evenly.
    """
    _check(start, stop, n_frames)
    steps, distance = np.asarray(travelled.steps, np.float64), np.asarray(travelled.distance, np.float64)
    if steps.size == 0 or steps[0] > start or steps[-1] < stop:
        raise ValueError(f"the distance travelled covers steps {_span(travelled)}, not {start}..{stop}")
    low, high = np.interp([start, stop], steps, distance)
    if not high > low:
        return even_steps(start, stop, n_frames)
    count = min(stop - start + 1, n_frames)
    targets = np.linspace(low, high, count)
    # each target's step, inside the sample interval where the distance rises past it
    # (the distance is taken to grow evenly between two samples)
    after = np.clip(np.searchsorted(distance, targets, side="left"), 1, len(distance) - 1)
    before = after - 1
    rise = distance[after] - distance[before]
    fraction = np.where(rise > 0, (targets - distance[before]) / np.where(rise > 0, rise, 1), 1.0)
    chosen = np.ceil(steps[before] + np.clip(fraction, 0, 1) * (steps[after] - steps[before]) - 1e-9).astype(np.int64)
    chosen = np.clip(chosen, start, stop)
    chosen[0], chosen[-1] = start, stop
    return np.unique(chosen)


def _span(travelled: Travelled) -> str:
    return f"{travelled.steps[0]}..{travelled.steps[-1]}" if len(travelled.steps) else "(none)"


def distance_samples(start: int, stop: int, *, max_samples: int = MAX_DISTANCE_SAMPLES) -> np.ndarray:
    """The steps whose weights :func:`path_length` reads: every step, or ``max_samples`` evenly spaced."""
    return even_steps(start, stop, max(2, max_samples))


def path_length(weights: da.Array, steps: np.ndarray, *, scheduler=None) -> Travelled:
    """Cumulative L2 distance between consecutive ``steps`` of ``weights`` (step, ...: a softmax
    run's (class, pixel), or any parameter's shape), indexed from ``steps[0]``: ``weights[i]``
    are the values of step ``steps[0] + i``. ``scheduler``: a Dask scheduler address (default:
    threads in this process)."""
    steps = np.asarray(steps, np.int64)
    sampled = weights[steps - steps[0]].astype(np.float64)   # (sample, ...); reads those chunks only
    if len(steps) < 2:
        return Travelled(steps, np.zeros(len(steps)))
    change = sampled[1:] - sampled[:-1]
    (lengths,) = compute([da.sqrt((change ** 2).sum(axis=tuple(range(1, change.ndim))))], scheduler=scheduler)
    return Travelled(steps, np.concatenate([[0.0], np.cumsum(lengths)]))


def combined(travels: list[Travelled]) -> Travelled:
    """Several runs' distances summed on the union of their sample steps (a run that has ended
    travels no further), for one spacing of runs shown side by side."""
    steps = np.unique(np.concatenate([travelled.steps for travelled in travels]))
    total = sum(np.interp(steps, travelled.steps, travelled.distance) for travelled in travels)
    return Travelled(steps, np.asarray(total, np.float64))


# name -> (label in the page, function); the default first
SPACINGS: dict[str, tuple[str, Callable]] = {
    "log": ("Logarithmic (dense early)", log_steps),
    "even": ("Even", even_steps),
    "distance": ("By distance travelled", distance_steps),
}
DEFAULT_SPACING = "log"


def spaced_steps(spacing: str, start: int, stop: int, n_frames: int,
                 travelled: Callable[[], Travelled] | None = None) -> np.ndarray:
    """The steps of an animation of start..stop spaced by ``spacing`` (a name of SPACINGS);
    ``travelled()`` gives the distance travelled, asked for only by the distance spacing."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown frame spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if spacing == "distance":
        if travelled is None:
            raise ValueError("the distance spacing needs the run's distance travelled")
        return distance_steps(start, stop, n_frames, travelled())
    return SPACINGS[spacing][1](start, stop, n_frames)


def travelled_by(run, start: int, stop: int, *, scheduler=None,
                 max_samples: int = MAX_DISTANCE_SAMPLES) -> Travelled:
    """The distance ``run`` (a viewer.analysis.run.Run) travels over start..stop, or up to its
    last step if it ends sooner; a run that has not reached ``start`` travels nowhere."""
    return travelled_along(run.weights, run.last_step, start, stop, scheduler=scheduler, max_samples=max_samples)


def travelled_along(values: Callable[[int, int], da.Array], last_step: int, start: int, stop: int, *,
                    scheduler=None, max_samples: int = MAX_DISTANCE_SAMPLES) -> Travelled:
    """The distance travelled over start..stop (up to ``last_step``) by what ``values(first, last)``
    gives as a lazy (step, ...) array: a softmax run's weights, or one parameter of a network."""
    stop = min(stop, last_step)
    if stop <= start:
        return Travelled(np.array([start], np.int64), np.zeros(1))
    samples = distance_samples(start, stop, max_samples=max_samples)
    return path_length(values(start, stop), samples, scheduler=scheduler)
