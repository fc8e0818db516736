"""A network run (schema version 2, recorded by ``weightlapse.Recorder``), read lazily per parameter.

Headless use, for research scripts::

    from weightlapse.viewer.analysis.runs import RunCatalog
    from weightlapse.viewer.analysis.network import layer_statistics, layer_distances
    run = RunCatalog("runs").open("my-mlp")                  # a NetworkRun
    run.values_at("0.weight", 300)                           # (32, 784) float32, as stored
    steps, values = run.weight_history("0.weight", (5, 400))  # one weight over every step
    layer_statistics(run, "0.weight", 0, 300).path_length   # (32, 784), per weight
    layer_distances(run, RunCatalog("runs").open("my-mlp-seed1"))  # (parameter, step) L2 distances

Every parameter is its own array with its own chunks (pipeline/store/network.py); a step of
one parameter costs one chunk decompression at most, and a weight over every step reads
one column of each chunk through dask, never the whole run. Caches belong to the store's
identity (its ``store_id``), never to the run's name.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr

from weightlapse.pipeline.cluster import compute
from weightlapse.viewer.analysis.stored_run import ChunkCache, StoredRun
from weightlapse.pipeline.store import (
    CheckedStore,
    CheckedSteps,
    ParameterSpec,
    Progress,
    TrajectoryError,
    damaged,
    dask_steps,
)
from weightlapse.viewer.analysis.scales import largest_magnitude
from weightlapse.viewer.analysis.stats import parameter_statistics

# Decoded chunks kept per open run, over all its parameters, by their bytes: a chunk is a
# bias's few kilobytes or a big layer's 8 MiB (pipeline.store.network.CHUNK_BYTES), and Run
# vs run reads every parameter of both runs at each frame. A count of chunks (8 were kept)
# left a network of more parameters decompressing some at every frame; 64 MiB keeps a chunk
# of each of the layers of a model that size, as 8 chunks did of the largest kind.
CHUNK_CACHE_BYTES = 64 * 2**20
# How often serving a step from memory checks the store again (the viewer also refreshes its
# runs every second).
RECHECK_S = 1.0
# Chunks decompressed at most to follow one weight over the steps (a chunk holds whole steps of
# its parameter): past it, evenly spaced chunks are read.
HISTORY_BYTES = 256 * 2**20


class NetworkRun(StoredRun):
    """One network store, read lazily: ``values_at`` serves a parameter's step from a small
    chunk cache (the store's, :class:`StoredRun`); ``values`` and ``weight_history`` read through dask."""

    def _load(self, checked: CheckedStore) -> None:
        if checked.network is None:
            raise TrajectoryError(f"{checked.location}: this is a softmax-regression run, not a network run: "
                                  "open it with the catalog (RunCatalog.open), which gives a Run")
        with self._lock:
            self._checked = checked
            self.identity = checked.identity
            self.metadata = checked.metadata
            self.progress: Progress = checked.progress
            self.parameters: tuple[ParameterSpec, ...] = checked.network.parameters
            self._specs = {spec.name: spec for spec in self.parameters}
            # Each parameter's array, opened once per store (a group lookup costs about a millisecond).
            self._arrays = {spec.name: checked.array(spec.name) for spec in self.parameters}
            self._chunks = ChunkCache(CHUNK_CACHE_BYTES)
            self._checked_at = time.monotonic()

    def _check_current(self) -> None:
        """Before serving a step from memory: a store replaced since is read afresh. A network
        store has no file written once at creation (its arrays grow), so this is the full
        check, at most every RECHECK_S: per frame it took playback from 4 to 25 ms."""
        now = time.monotonic()
        if self.store.local and now - self._checked_at > RECHECK_S:
            self._checked_at = now
            self.refresh()

    @property
    def class_names(self) -> list[str]:
        """The names of the classes it was trained on, as recorded ([] for a run recorded by a
        training loop of its own, which names none)."""
        return list(self.metadata.class_names or [])

    @property
    def names(self) -> list[str]:
        """The parameters' names in the model's order."""
        return [spec.name for spec in self.parameters]

    def spec(self, name: str) -> ParameterSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"{self.name} has no parameter {name[:80]!r}; it has {', '.join(self.names[:8])}"
                             + (" ..." if len(self.names) > 8 else ""))
        return spec

    def chunk_steps(self, name: str) -> int:
        return int(self._array(name).chunks[0])

    def _array(self, name: str):
        return self._arrays[self.spec(name).name]

    def check_step(self, step: int) -> int:
        if not 0 <= step <= self.last_step:
            raise IndexError(f"step {step} is outside this run's valid steps 0..{self.last_step}")
        return step

    # -- data ---------------------------------------------------------------------------
    def values_at(self, name: str, step: int) -> np.ndarray:
        """Parameter ``name`` after ``step`` optimizer steps, in its own shape, exactly as stored."""
        self._check_current()
        spec = self.spec(name)
        self.check_step(step)
        per_chunk = self.chunk_steps(name)
        chunk, row = divmod(step, per_chunk)
        return self._chunk(spec.name, chunk, per_chunk)[row]

    def _chunk(self, name: str, chunk: int, per_chunk: int) -> np.ndarray:
        key = (name, chunk)
        start = chunk * per_chunk
        with self._lock:
            progress = self.progress  # one marker: the rows there are, and whether more will come
            stop = min(start + per_chunk, progress.steps_done + 1)
            block = self._chunks.get(key, stop - start)
            if block is not None:
                return block
            array, cache = self._arrays[name], self._chunks
        block = CheckedSteps(array, f"{self.store} ({name})", n_rows=stop, finite=False)[start:stop]
        # The chunk at the frontier of a run being written still changes; a finished run's does not
        # (a bias's chunk holds 256 steps: a shorter run is all frontier).
        if stop - start == per_chunk or progress.finished:
            with self._lock:
                cache.put(key, block)
        return block

    def read_row(self, name: str, step: int) -> np.ndarray:
        """Parameter ``name`` at ``step``, in its own shape, read past the chunk cache: sampling a
        run for its colour scale must not evict the chunks being replayed."""
        self.check_step(step)
        array = self._array(name)
        return np.asarray(CheckedSteps(array, f"{self.store} ({name})", n_rows=step + 1, finite=False)[step:step + 1])[0]

    def abs_max(self, name: str, step: int, *, minus: np.ndarray | None = None) -> float:
        """The largest finite |value| of parameter ``name`` at ``step`` (of ``values - minus``
        with ``minus``), read past the chunk cache."""
        row = self.read_row(name, step)
        return largest_magnitude(row if minus is None else row - minus)

    def values(self, name: str, start: int = 0, stop: int | None = None) -> da.Array:
        """Parameter ``name`` over steps ``start..stop`` (inclusive): a lazy dask array (step, *shape)."""
        stop = self.last_step if stop is None else stop
        self.check_step(start)
        self.check_step(stop)
        if stop < start:
            raise ValueError(f"step range {start}..{stop} is empty: the first step must not be after the last")
        array = self._array(name)
        return dask_steps(array, n_rows=self.last_step + 1, where=f"{self.store} ({name})", finite=False)[start:stop + 1]

    def weight_history(self, name: str, index: tuple[int, ...], *,
                       max_bytes: int = HISTORY_BYTES) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one weight of parameter ``name`` (``index`` into its shape) over
        the valid steps. A chunk holds whole steps of the parameter, so reading one
        weight decompresses its chunks whole: beyond ``max_bytes`` of them, only the steps of
        evenly spaced chunks are read (every step of each), and ``steps`` says which."""
        spec = self.spec(name)
        index = tuple(int(i) for i in index)
        if len(index) != len(spec.shape) or not all(0 <= i < n for i, n in zip(index, spec.shape)):
            raise IndexError(f"{index} is not an index into {name} of shape {spec.shape}")
        if self.last_step < 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        rows, per_chunk = self.last_step + 1, self.chunk_steps(name)
        chunks = -(-rows // per_chunk)
        every = max(1, -(-chunks * per_chunk * spec.size * 4 // max_bytes))
        if every == 1:
            values = np.asarray(self.values(name)[(slice(None), *index)].compute(scheduler="threads"))
            return np.arange(rows, dtype=np.int64), values
        picked = sorted({*range(0, chunks, every), chunks - 1})  # the newest steps always
        steps = np.concatenate([np.arange(chunk * per_chunk, min((chunk + 1) * per_chunk, rows)) for chunk in picked])
        # Chunk by chunk, not through dask: a dask task spans several chunks (DASK_BLOCK_BYTES),
        # and each chunk's slice was computed by reading its whole task (a big layer's 128-step
        # run is one task of 65 chunks: 9.8 s against 0.37 s, docs/benchmarks.md).
        checked = CheckedSteps(self._array(name), f"{self.store} ({name})", n_rows=rows, finite=False)
        values = np.concatenate([checked[chunk * per_chunk:min((chunk + 1) * per_chunk, rows)][(slice(None), *index)]
                                 for chunk in picked])
        return steps.astype(np.int64), values

    def loss(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, training loss) over the valid steps; step 0 (before training) is left out."""
        n = self.last_step + 1
        if n <= 1:
            return np.arange(1, 1), np.empty(0, np.float32)
        values = CheckedSteps(self._checked.array("loss"), f"{self.store} (loss)", n_rows=n, finite=False)[1:n]
        return np.arange(1, n), np.asarray(values)

    def accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        """(eval steps, held-out accuracy) when the store has evaluations (runs the pipeline trains), else empty."""
        group, n = self._checked.group, self.progress.evals_done
        if n <= 0 or "eval_step" not in group or "heldout_accuracy" not in group:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        try:
            return np.asarray(group["eval_step"][:n]), np.asarray(group["heldout_accuracy"][:n])
        except Exception as error:  # noqa: BLE001 - codecs raise many kinds for a damaged chunk
            raise damaged(f"{self.store} (evaluations)", slice(0, n), f"{type(error).__name__}: {str(error)[:200]}")


def layout_of(run: NetworkRun) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((spec.name, spec.shape) for spec in run.parameters)


def layout_problem(run: NetworkRun, other: NetworkRun) -> str | None:
    """Why two network runs cannot be compared parameter by parameter, in one line, or None."""
    if layout_of(run) == layout_of(other):
        return None
    mine, theirs = dict(layout_of(run)), dict(layout_of(other))
    for name, shape in mine.items():
        if name not in theirs:
            return f"{other.name} has no parameter {name} ({run.name} has it): the runs record different models"
        if theirs[name] != shape:
            return (f"{name} is {shape} in {run.name} but {theirs[name]} in {other.name}: the runs record "
                    "different models")
    return f"{other.name} has parameters {run.name} lacks: the runs record different models"


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer of a network: y = x @ weight.T + bias."""

    weight: str              # its (out, in) weight's parameter name
    bias: str | None         # its (out,) bias's, if it has one
    units: int               # out


def linear_chain(parameters: Sequence[ParameterSpec]) -> tuple[LinearLayer, ...] | str:
    """A network's ``parameters`` (in the model's order) as linear layers from input to output,
    each feeding the next, or why they are not such a chain (in words). The train stage's MLPs
    and a recorded ``nn.Sequential`` of ``Linear`` layers are chains."""
    layers: list[LinearLayer] = []
    by_module: dict[str, dict[str, ParameterSpec]] = {}
    for spec in parameters:
        if spec.module != "Linear" or spec.role not in ("weight", "bias"):
            return f"{spec.name} is a {spec.role} of a {spec.module or 'module'}, not of a Linear layer"
        by_module.setdefault(spec.name.rpartition(".")[0], {})[spec.role] = spec
    for module, parts in by_module.items():
        weight, bias = parts.get("weight"), parts.get("bias")
        if weight is None or len(weight.shape) != 2:
            return f"the Linear layer {module or '(the model)'} has no (out, in) weight"
        units = weight.shape[0]
        if bias is not None and bias.shape != (units,):
            return f"{bias.name} has shape {bias.shape}, not ({units},)"
        if layers and weight.shape[1] != layers[-1].units:
            return (f"{weight.name} takes {weight.shape[1]} inputs but the layer before it has {layers[-1].units} "
                    "units: the layers do not form one chain")
        layers.append(LinearLayer(weight.name, None if bias is None else bias.name, units))
    if not layers:
        return "the run records no layers"
    return tuple(layers)


def layer_statistics(run: NetworkRun, name: str, start: int, stop: int, *, progress=None,
                     scheduler=None) -> xr.Dataset:
    """The per-weight change statistics (viewer/analysis/stats.py) of parameter ``name`` over
    steps start..stop, computed with dask; each statistic has the parameter's own shape."""
    spec = run.spec(name)
    if not 0 <= start < stop <= run.last_step:
        raise ValueError(f"choose a step range inside 0..{run.last_step:,} with the first step before the last")
    values = xr.DataArray(run.values(name, start, stop), dims=spec.dims, name=name,
                          coords={"step": np.arange(start, stop + 1)})
    return parameter_statistics(values, progress=progress, scheduler=scheduler)


def layer_distances(run: NetworkRun, other: NetworkRun, *, every: int = 1, scheduler=None) -> xr.DataArray:
    """L2 distance between the two runs' values of each parameter at every ``every``-th shared
    step: (parameter, step), computed with dask. Runs of different layouts are refused."""
    problem = layout_problem(run, other)
    if problem:
        raise ValueError(problem)
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    last = min(run.last_step, other.last_step)
    if last < 0:
        raise ValueError(f"{run.name if run.last_step < 0 else other.name} has no step written yet")
    steps = np.arange(0, last + 1, every)
    lazy = []
    for name in run.names:
        a, b = run.values(name, 0, last)[::every], other.values(name, 0, last)[::every]
        delta = (a.astype(np.float64) - b.astype(np.float64)).reshape(len(steps), -1)
        lazy.append(da.sqrt((delta ** 2).sum(axis=1)))
    distances = compute(lazy, scheduler=scheduler)
    return xr.DataArray(np.stack(distances), dims=("parameter", "step"),
                        coords={"parameter": run.names, "step": steps}, name="distance",
                        attrs={"runs": f"{run.name} vs {other.name}"})
