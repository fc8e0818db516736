"""A checked store as a lazy xarray Dataset of its valid steps (:func:`open_run`), and its
(step, ...) arrays as dask arrays whose reads check every chunk (:func:`dask_steps`).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from weightlapse.pipeline.locations import Location
from weightlapse.pipeline.store.attributes import Progress
from weightlapse.pipeline.store.check import CheckedStore, check_store, open_store, store_location
from weightlapse.pipeline.store.steps import CheckedSteps
from weightlapse.pipeline.store.format import IMAGE_SIDE, TrajectoryError, quiet_numcodecs

# Bytes of an array's steps per dask task when reading for analysis, at most (or one store
# chunk, if larger): 512 steps of softmax regression's weights. A network layer's row can be
# a hundred times a softmax row, and tasks of 512 of its steps took gigabytes.
DASK_BLOCK_BYTES = 16 * 2**20


def read_progress(path: str | Path | Location, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's progress marker, validated: steps_done, n_steps, evals_done, finished (and resume, error).

    Only the marker is read: a store still being created (no arrays yet) has one saying -1."""
    location = store_location(path, storage_options)
    return Progress.parse(open_store(location).attrs.get("progress"), str(location)).as_dict()


def open_run(path: str | Path | Location, storage_options: dict[str, Any] | None = None, *,
             matrix_for: str | None = None) -> xr.Dataset:
    """Open a run's trajectory as a lazy (dask-backed) xarray Dataset of its valid steps.

    ``path`` is a run directory (``runs/<run>``) or its ``trajectory.zarr``, as a local
    path or an fsspec URL (``s3://bucket/runs/<run>``, reached with ``storage_options``).
    The store is checked first (:func:`~weightlapse.pipeline.store.check_store`); only steps up to the
    progress marker are included, so a run still being written reads as the shorter run it
    is so far. Weights are read only when computed; a damaged chunk raises TrajectoryError
    for its steps. A network run (schema version 2, recorded by ``Recorder``) has one
    variable per parameter (``fc1.weight`` with dims ``(step, fc1.weight.out, fc1.weight.in)``)
    and ``loss``, in the model's order, and a train stage's network run its held-out scores too. ``matrix_for``: a reader of softmax-regression runs
    only, with its verb ("per-pixel statistics cover"): a network run is then refused with a
    TrajectoryError saying so.
    """
    checked = check_store(path, storage_options)
    if matrix_for is not None:
        checked.require_matrix(matrix_for)
    if checked.network is not None:
        return _open_network(checked)
    group, progress = checked.group, checked.progress
    try:
        with quiet_numcodecs():
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


def _open_network(checked: CheckedStore) -> xr.Dataset:
    """A network store (schema version 2) as a Dataset: one variable per parameter, each with
    its own dimensions, and the loss, over its committed steps. Built from each array's own
    metadata (an array may be longer than the committed rows while the run grows)."""
    rows, where = checked.progress.steps_done + 1, str(checked.location)
    # A parameter may legitimately hold NaN (a diverged loop): only undecodable chunks are damage.
    variables = {spec.name: (spec.dims, dask_steps(checked.array(spec.name), n_rows=rows, where=where, finite=False))
                 for spec in checked.network.parameters}
    variables["loss"] = (("step",), dask_steps(checked.array("loss"), n_rows=rows, where=where, finite=False))
    coords = {"step": np.arange(rows, dtype=np.int64)}
    if "eval_step" in checked.group:  # a planned run's (the train stage's) held-out scores: small, read now
        evals = checked.progress.evals_done
        coords["eval_step"] = checked.array("eval_step")[:evals]
        for name in ("heldout_accuracy", "heldout_loss"):
            variables[name] = (("eval_step",), checked.array(name)[:evals])
    ds = xr.Dataset(variables, coords=coords)
    ds.attrs["weightlapse"] = checked.meta
    ds.attrs["progress"] = checked.progress.as_dict()
    return ds


def dask_steps(array: zarr.Array, *, n_rows: int | None = None, where: str | None = None,
               finite: bool = True) -> da.Array:
    """A (step, ...) store array as a dask array of about ``DASK_BLOCK_BYTES`` per task.

    Whole store chunks per task, several of them: zarr reads a task's chunks concurrently,
    and a cluster schedules eight times fewer tasks than one per 64-step chunk. Per-task
    overhead on a Dask cluster had made a plain sum over a run 3.5x slower than reading it.
    Reads go through :class:`~weightlapse.pipeline.store.CheckedSteps`: a damaged chunk raises
    TrajectoryError naming its steps (``finite``: NaN or infinite values count as damage).
    ``n_rows``: only the first rows (the committed steps), so no task reads past the marker.
    """
    per_chunk = array.chunks[0]
    chunk_bytes = per_chunk * math.prod(array.shape[1:]) * array.dtype.itemsize
    steps = per_chunk * max(1, DASK_BLOCK_BYTES // max(chunk_bytes, 1))
    checked = CheckedSteps(array, where or str(array.store), n_rows=n_rows, finite=finite)
    return da.from_array(checked, chunks=(steps, *checked.shape[1:]), asarray=True, lock=False, fancy=False,
                         name=f"{array.basename}-{uuid.uuid4().hex}", meta=np.empty((0,) * checked.ndim, array.dtype))


def pixel_coords(n_pixels: int) -> dict[str, Any]:
    """xarray coordinates of the pixel dimension: its index and the image row and column."""
    pixel = np.arange(n_pixels)
    return {"pixel": pixel, "row": ("pixel", pixel // IMAGE_SIDE), "col": ("pixel", pixel % IMAGE_SIDE)}
