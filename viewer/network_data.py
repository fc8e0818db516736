"""What the network view draws from network runs, cached by the store's identity.

One :class:`NetworkData` per data store (``DataStore.networks``), shared by every page of a
runs location: a parameter's colour limits over the whole run, one weight's history, a
layer's statistics and the distance it travels, and the per-layer distances between two
runs, and the comparison of a group of them. Every key starts with the store's identity (its ``store_id``), so a run recorded
again is read afresh.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from weightlapse.viewer.analysis.network import NetworkRun, layer_distances, layer_statistics, layout_problem
from weightlapse.viewer.analysis.network_compare import compare_networks
from weightlapse.viewer.analysis.scales import RunScales, sampled_steps
from weightlapse.viewer.analysis.spacing import Travelled, travelled_along
from weightlapse.viewer.cache import BoundedCache

class NetworkData:
    """Colour limits, weight histories, statistics and distances of network runs."""

    def __init__(self, store: Any) -> None:
        """``store``: the viewer's DataStore, which opens runs by name and knows the scheduler."""
        self.store = store
        self._lock = threading.Lock()
        self.scales = RunScales()  # whole-run colour limits
        self._histories = BoundedCache()
        self._stats = BoundedCache()
        self._distances = BoundedCache()
        self._travelled = BoundedCache()
        self._comparisons = BoundedCache()

    def network(self, name: str) -> NetworkRun | None:
        """The listed run ``name`` if it records a network, else None (raises as DataStore.open)."""
        run = self.store.open(name)
        return run if isinstance(run, NetworkRun) else None

    def parameter_sizes(self, name: str) -> dict[str, int]:
        """{parameter: number of values} of a network run, in the model's order; {} for any other run."""
        try:
            run = self.network(name)
        except (OSError, ValueError):
            return {}
        return {} if run is None else {spec.name: spec.size for spec in run.parameters}

    def colour_limit(self, run: NetworkRun, name: str) -> float:
        """The largest |value| of parameter ``name`` over the run, sampled
        (viewer/analysis/scales.py): one colour scale for every step."""
        return self.scales.limit((run.identity, name, "values"), sampled_steps(run.last_step, run.chunk_steps(name)),
                                 lambda step: run.abs_max(name, step))

    def change_limit(self, run: NetworkRun, name: str, from_step: int) -> float:
        """The largest |value(t) - value(from_step)| of parameter ``name`` over the run, sampled:
        one colour scale for Step vs step at every step."""
        origin = functools.cache(lambda: run.read_row(name, from_step))  # read only if a sample is new
        return self.scales.limit((run.identity, name, "change", from_step),
                                 sampled_steps(run.last_step, run.chunk_steps(name)),
                                 lambda step: run.abs_max(name, step, minus=origin()))

    def difference_limit(self, run: NetworkRun, other: NetworkRun, name: str) -> float:
        """The largest |other(t) - run(t)| of parameter ``name`` over the steps both have,
        sampled: one colour scale for Run vs run at every step."""
        steps = sampled_steps(min(run.last_step, other.last_step), run.chunk_steps(name))
        return self.scales.limit((run.identity, other.identity, name, "difference"), steps,
                                 lambda step: other.abs_max(name, step, minus=run.read_row(name, step)))

    def weight_history(self, run: NetworkRun, name: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of weight ``index`` (flat) of parameter ``name`` over every valid step."""
        key = (run.identity, run.last_step, name, index)
        with self._lock:
            cached = self._histories.get(key)
        if cached is None:
            spec = run.spec(name)
            if not 0 <= index < spec.size:
                raise IndexError(f"weight {index} is outside {name}'s {spec.size:,} weights")
            cached = run.weight_history(name, np.unravel_index(index, spec.shape) if spec.shape else ())
            with self._lock:
                self._histories.put(key, cached)
        return cached

    def statistics(self, run: NetworkRun, name: str, start: int, stop: int):
        """The statistics of parameter ``name`` over start..stop if computed, else None."""
        with self._lock:
            return self._stats.get((run.identity, name, start, stop))

    def compute_statistics(self, run: NetworkRun, name: str, start: int, stop: int, *, progress=None):
        stats = layer_statistics(run, name, start, stop, progress=progress, scheduler=self.store.scheduler)
        with self._lock:
            self._stats.put((run.identity, name, start, stop), stats)
        return stats

    def travelled(self, run: NetworkRun, name: str, start: int, stop: int) -> Travelled:
        """The distance parameter ``name`` travels over start..stop (as far as it is written), for
        the animation spacing by distance; read with dask once per store, parameter and range."""
        stop = min(stop, run.last_step)
        key = (run.identity, name, start, stop)
        with self._lock:
            cached = self._travelled.get(key)
        if cached is None:
            cached = travelled_along(lambda first, last: run.values(name, first, last), run.last_step, start, stop,
                                     scheduler=self.store.scheduler)
            with self._lock:
                self._travelled.put(key, cached)
        return cached

    def _distance_key(self, run: NetworkRun, other: NetworkRun, every: int) -> tuple:
        return (run.identity, run.last_step, other.identity, other.last_step, every)

    def distances(self, run: NetworkRun, other: NetworkRun, every: int):
        """The per-layer distances of ``run`` and ``other`` as they are now if computed, else None."""
        with self._lock:
            return self._distances.get(self._distance_key(run, other, every))

    def compute_distances(self, run: NetworkRun, other: NetworkRun, every: int):
        problem = layout_problem(run, other)
        if problem:
            raise ValueError(problem)
        result = layer_distances(run, other, every=every, scheduler=self.store.scheduler)
        with self._lock:
            self._distances.put(self._distance_key(run, other, every), result)
        return result

    def _comparison_key(self, runs: list[NetworkRun], every: int, match: bool) -> tuple:
        return (tuple((run.identity, run.last_step) for run in runs), every, match)

    def comparison(self, runs: list[NetworkRun], every: int, match: bool):
        """The comparison of these network runs as they are now (network_compare.compare_networks)
        if computed, else None."""
        with self._lock:
            return self._comparisons.get(self._comparison_key(runs, every, match))

    def compute_comparison(self, runs: list[NetworkRun], every: int, match: bool, *, progress=None):
        result = compare_networks({run.name: run for run in runs}, every=every, match=match,
                                  scheduler=self.store.scheduler, progress=progress)
        with self._lock:
            self._comparisons.put(self._comparison_key(runs, every, match), result)
        return result
