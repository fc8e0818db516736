"""The data store: the runs of one runs location and everything derived from them, no UI.

One store per runs location for the whole server (:func:`shared_store`), so pages share
open runs, chunk caches, colour scales, curves, statistics and comparisons. Every cached
value is keyed by the identity of the store it came from (and, for a run being written,
its newest step), so a run retrained under the server is read afresh.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightlapse.pipeline.datasets import check_dataset_name
from weightlapse.pipeline.locations import Location, is_url
from weightlapse.pipeline.safe_yaml import UnsafeYamlError, load_yaml, read_bounded
from weightlapse.pipeline.store import STORE_NAME
from weightlapse.viewer.analysis import compare, function_space
from weightlapse.viewer.analysis.frames import centred
from weightlapse.viewer.analysis.run import PixelTrace, Run
from weightlapse.viewer.analysis.runs import RunCatalog, RunInfo
from weightlapse.viewer.analysis.scales import RunScales, sampled_steps
from weightlapse.viewer.analysis.spacing import Travelled, travelled_by
from weightlapse.viewer.analysis.stats import change_statistics
from weightlapse.viewer.cache import BoundedCache
from weightlapse.viewer.network_data import NetworkData

# How long a listing of the runs is reused by every page: pages poll every 2 s.
LISTING_S = {True: 1.5, False: 10.0}      # local runs directory, object storage
MAX_PARAMS_BYTES = 1 << 20
# Pixel histories kept: one is 12 MB at 300,000 steps (10 classes of float32).
PIXEL_CACHE_SIZE = 8


@dataclass(frozen=True)
class Curves:
    """A run's training curves as far as it is written."""

    loss_steps: np.ndarray
    loss: np.ndarray
    eval_steps: np.ndarray
    accuracy: np.ndarray


class DataStore:
    """Runs by name, and what the views draw from them."""

    def __init__(self, runs_dir: str | Path, *, scheduler: str | None = None,
                 data_dir: str | Path | None = None) -> None:
        """``data_dir``: the data stage's directories (data/<dataset>), for comparisons of
        predictions on held-out images; default: ``data`` beside a local runs directory."""
        self.catalog = RunCatalog(runs_dir)
        self.scheduler = scheduler
        if data_dir is None and self.catalog.runs_dir.local:
            data_dir = self.catalog.runs_dir.local_path.absolute().parent / "data"
        self.data_dir = None if data_dir is None else Path(data_dir)
        self._lock = threading.Lock()
        self._infos: dict[str, RunInfo] = {}
        self._fingerprints: dict[str, tuple | None] = {}
        self._listed_at = -float("inf")
        self.scales = RunScales()  # whole-run colour limits
        self._curves = BoundedCache()
        self._stats = BoundedCache()
        self._comparisons = BoundedCache()
        self._predictions = BoundedCache()
        self._heldout = BoundedCache()
        self._pixels = BoundedCache(PIXEL_CACHE_SIZE)
        self._travelled = BoundedCache()
        self._runs: dict[str, Run] = {}
        self.networks = NetworkData(self)  # what the network view draws from network runs

    # -- listing ---------------------------------------------------------------------------
    @property
    def runs_dir(self):
        return self.catalog.runs_dir

    def runs(self, *, fresh: bool = False) -> list[RunInfo]:
        """Every run directory, described; re-described only where its files changed."""
        with self._lock:
            max_age = LISTING_S[self.runs_dir.local]
            if fresh or time.monotonic() - self._listed_at > max_age:
                names = self.catalog.names()
                infos = {}
                for name in names:
                    token = self.catalog.fingerprint(name, listed=names)
                    known = self._infos.get(name)
                    if known is None or token is None or token != self._fingerprints.get(name):
                        known = self.catalog.describe(name, listed=names)
                    infos[name] = known
                    self._fingerprints[name] = token
                self._infos, self._listed_at = infos, time.monotonic()
            return list(self._infos.values())

    def readable(self) -> list[str]:
        return [info.name for info in self.runs() if info.readable]

    def open(self, name: str) -> Run:
        """The listed run ``name``, as last refreshed (a local store replaced since is read
        afresh by the run itself); raises TrajectoryError, OSError or ValueError."""
        run = self._runs.get(name)
        if run is None or name not in self.readable():
            run = self._runs[name] = self.catalog.open(name)
        return run

    def refresh(self, name: str) -> Run:
        """The run ``name`` with its progress marker re-read (and the whole run if its store is new)."""
        run = self._runs[name] = self.catalog.open(name)
        return run

    def default_run(self, preferred: list[str]) -> str:
        """The first of ``preferred`` (params.yaml's runs) that can be read, else the newest run."""
        readable = self.readable()
        for name in preferred:
            if name in readable:
                return name
        if not readable:
            return ""
        if not self.runs_dir.local:
            return readable[-1]

        def modified(name: str) -> float:
            try:
                return os.stat(self.runs_dir.local_path / name / STORE_NAME / "zarr.json").st_mtime
            except OSError:
                return -1.0
        return max(readable, key=modified)

    # -- what the views draw -----------------------------------------------------------------
    def colour_limit(self, run: Run, *, centre: bool = False) -> float:
        """The largest |weight| over the run, for one colour scale over all its steps, sampled
        (viewer/analysis/scales.py). ``centre``: of the centred weights (the class-mean removed)."""
        return self.scales.limit((run.identity, "weights", centre), sampled_steps(run.last_step, run.chunk_steps),
                                 lambda step: run.abs_max(step, centre=centre))

    def change_limit(self, run: Run, from_step: int, *, centre: bool = False) -> float:
        """The largest |weights(t) - weights(from_step)| over the run, sampled as :meth:`colour_limit`:
        one colour scale for Step vs step at every step."""
        origin = functools.cache(lambda: run.read_row(from_step))  # read only if a sample is new
        return self.scales.limit((run.identity, "change", from_step, centre),
                                 sampled_steps(run.last_step, run.chunk_steps),
                                 lambda step: run.abs_max(step, centre=centre, minus=origin()))

    def difference_limit(self, run: Run, other: Run, *, centre: bool = False) -> float:
        """The largest |other(t) - run(t)| over the steps both have, sampled as :meth:`colour_limit`:
        one colour scale for Run vs run at every step."""
        steps = sampled_steps(min(run.last_step, other.last_step), run.chunk_steps)
        return self.scales.limit((run.identity, other.identity, "difference", centre), steps,
                                 lambda step: other.abs_max(step, centre=centre, minus=run.read_row(step)))

    def curves(self, run: Run) -> Curves:
        key = (run.identity, run.last_step, run.progress.evals_done)
        with self._lock:
            cached = self._curves.get(key)
        if cached is None:
            loss_steps, loss = run.loss()
            eval_steps, accuracy = run.accuracy()
            cached = Curves(loss_steps, loss, eval_steps, accuracy)
            with self._lock:
                self._curves.put(key, cached)
        return cached

    def pixel_history(self, run: Run, pixel: int) -> PixelTrace:
        """Every class's weight of ``pixel`` over the run's valid steps (Run.pixel_history), cached
        by the store, its newest step and the pixel."""
        key = (run.identity, run.last_step, pixel)
        with self._lock:
            cached = self._pixels.get(key)
        if cached is None:
            cached = run.pixel_history(pixel)
            with self._lock:
                self._pixels.put(key, cached)
        return cached

    def statistics(self, run: Run, start: int, stop: int, *, centre: bool = False):
        """Statistics of steps start..stop (of the centred weights with ``centre``) if computed
        (None otherwise)."""
        with self._lock:
            return self._stats.get((run.identity, start, stop, centre))

    def compute_statistics(self, run: Run, start: int, stop: int, *, centre: bool = False, progress=None):
        if not 0 <= start <= stop <= run.last_step:
            raise ValueError(f"choose a step range inside 0..{run.last_step:,} with the first step before the last")
        weights = run.weights(start, stop)
        stats = change_statistics(centred(weights) if centre else weights, first_step=start, progress=progress,
                                  scheduler=self.scheduler)
        with self._lock:
            self._stats.put((run.identity, start, stop, centre), stats)
        return stats

    def travelled(self, run: Run, start: int, stop: int) -> Travelled:
        """The distance ``run`` travels over start..stop (as far as it is written), for the
        animation spacing by distance; read with dask once per store and range."""
        stop = min(stop, run.last_step)
        key = (run.identity, start, stop)
        with self._lock:
            cached = self._travelled.get(key)
        if cached is None:
            cached = travelled_by(run, start, stop, scheduler=self.scheduler)
            with self._lock:
                self._travelled.put(key, cached)
        return cached

    def _computed(self, cache: BoundedCache, names: list[str], every: int, centre: bool):
        """What ``cache`` holds for these runs as they are now, or None (also when one is gone)."""
        try:
            key = self._comparison_key(names, every, centre)
        except (ValueError, OSError):
            return None
        with self._lock:
            return cache.get(key)

    def _comparison_key(self, names: list[str], every: int, centre: bool) -> tuple:
        return (tuple((name, self.open(name).identity) for name in names), every, centre)

    def comparison(self, names: list[str], every: int, *, centre: bool = False):
        """The comparison of ``names`` (every ``every``-th step; of the centred weights with
        ``centre``) if computed, else None."""
        return self._computed(self._comparisons, names, every, centre)

    def compute_comparison(self, names: list[str], every: int, *, centre: bool = False, progress=None):
        key = self._comparison_key(names, every, centre)
        runs = compare.open_trajectories(self.catalog, names)
        result = compare.compare_runs(runs, every=every, centre=centre, progress=progress, scheduler=self.scheduler)
        with self._lock:
            self._comparisons.put(key, result)
        return result


    # -- predictions on the held-out images (function space) ------------------------------------
    def held_out(self, dataset: str) -> function_space.HeldOut:
        """The held-out split of ``dataset`` from the data directory, checked as training reads it
        (a declared dataset's declaration from the params.yaml beside the runs); cached by its files."""
        if self.data_dir is None:
            raise FileNotFoundError("no data directory is known for these runs (they are not in a local "
                                    "directory): serve the viewer with --args --data DIR")
        directory = self.data_dir / check_dataset_name(dataset)  # a store's name: never a path of its own
        files = sorted(directory.glob("*")) if directory.is_dir() else []
        key = (dataset, tuple((path.name, path.stat().st_mtime_ns, path.stat().st_size) for path in files))
        with self._lock:
            cached = self._heldout.get(key)
        if cached is None:
            cached = function_space.load_heldout(directory, dataset,
                                                 spec=function_space.declared_spec(dataset, self.params_file()))
            with self._lock:
                self._heldout.put(key, cached)
        return cached

    def params_file(self) -> Path:
        parent = self.data_dir.parent if self.data_dir is not None else Path(".")
        return parent / "params.yaml"

    def _predictions_setup(self, names: list[str]) -> tuple[dict, function_space.HeldOut]:
        datasets = {self.open(name).metadata.dataset for name in names}
        unscored = next((name for name in names if not self.open(name).metadata.dataset), None)
        if unscored is not None:
            raise ValueError(f"{unscored} records no dataset (it was recorded by a training loop of its own): "
                             "predictions are compared on the held-out images of the dataset the runs were "
                             "trained on, so choose runs of the train stage")
        if len(datasets) != 1:
            raise ValueError(f"these runs were trained on {', '.join(sorted(map(str, datasets)))}: predictions are "
                             "compared on one dataset's held-out images, so choose runs of one dataset")
        heldout = self.held_out(datasets.pop())
        models = function_space.open_models(self.catalog, names)
        function_space.check_trained_on(models, heldout)
        return models, heldout

    def predictions(self, names: list[str], every: int):
        """The comparison of the predictions of ``names`` (function_space.compare_predictions)
        if computed, else None."""
        return self._computed(self._predictions, names, every, False)

    def compute_predictions(self, names: list[str], every: int, *, progress=None):
        key = self._comparison_key(names, every, False)
        models, heldout = self._predictions_setup(names)
        result = function_space.compare_predictions(models, heldout, every=every, progress=progress,
                                                    scheduler=self.scheduler)
        with self._lock:
            self._predictions.put(key, result)
        return result

    def confusion(self, name: str, step: int):
        """(true, predicted) counts of run ``name``'s predictions on the held-out images at ``step``."""
        run = self.open(name)
        key = ("confusion", run.identity, step)
        with self._lock:
            cached = self._predictions.get(key)
        if cached is None:
            models, heldout = self._predictions_setup([name])
            cached = function_space.confusion_at(models[name], heldout, step=step)
            with self._lock:
                self._predictions.put(key, cached)
        return cached


def preferred_runs(runs_dir: Location) -> list[str]:
    """The runs listed in the ``params.yaml`` beside the runs directory (or in the working
    directory), in their order; [] when there is none or it cannot be read."""
    candidates = [Path("params.yaml")]
    if runs_dir.local:
        candidates.insert(0, runs_dir.local_path.absolute().parent / "params.yaml")
    for path in candidates:
        try:
            raw = load_yaml(read_bounded(path, MAX_PARAMS_BYTES), source=str(path))
        except (OSError, UnsafeYamlError):
            continue
        runs = raw.get("runs") if isinstance(raw, dict) else None
        return [name for name in runs if isinstance(name, str)] if isinstance(runs, dict) else []
    return []


_stores: dict[Any, DataStore] = {}
_stores_lock = threading.Lock()


def shared_store(runs_dir: str | Path, *, scheduler: str | None = None,
                 data_dir: str | Path | None = None) -> DataStore:
    """One data store per runs location (scheduler and data directory) for the whole server."""
    key = (str(runs_dir) if is_url(runs_dir) else Path(runs_dir).expanduser().absolute(), scheduler,
           None if data_dir is None else Path(data_dir).expanduser().absolute())
    with _stores_lock:
        if key not in _stores:
            _stores[key] = DataStore(key[0], scheduler=scheduler, data_dir=key[2])
        return _stores[key]
