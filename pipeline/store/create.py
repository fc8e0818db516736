"""Creating a run's store: the group with its attributes, then every array at its final length.

The group's attributes are written with the group itself, in one atomic write of its
zarr.json: a reader polling a new run sees either no store or one whose marker says "no
steps yet", never a group without its marker. Once the arrays exist, their metadata is
consolidated into that zarr.json (rewritten atomically, attributes unchanged), so that a
plain ``xarray.open_zarr(path)`` opens the run without a warning; the writer keeps it
there each time it moves the marker.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import zarr

from weightlapse.pipeline.store.attributes import Progress, RunMetadata, marker_time
from weightlapse.pipeline.store.network import NETWORK_SCHEMA_VERSION, NetworkLayout
from weightlapse.pipeline.store.format import (
    SCALAR_CHUNK,
    SCHEMA,
    SCHEMA_VERSION,
    WEIGHT_DIMS,
    StoreLayout,
    quiet_numcodecs,
    step_series_codecs,
)


def create_store(path: str | Path, layout: StoreLayout, metadata: RunMetadata) -> zarr.Group:
    """Create the store of a run of ``layout`` at ``path`` (which must not exist), no step committed yet."""
    if not isinstance(metadata, RunMetadata):
        raise TypeError(f"a store's metadata is a RunMetadata, got {type(metadata).__name__}")
    group = zarr.open_group(path, mode="w-", zarr_format=3, attributes={
        "weightlapse": {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **metadata.to_attributes()},
        "progress": Progress(steps_done=-1, n_steps=layout.n_steps, evals_done=0, finished=False,
                             updated=marker_time()).as_dict(),
    })
    rows = layout.n_steps + 1
    per_step = (layout.chunk_steps, layout.n_classes, layout.n_pixels)

    def floats(name, shape, chunks, dims, codec="fast"):
        with quiet_numcodecs():
            group.create_array(name, shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                               dimension_names=dims,
                               **step_series_codecs(len(shape), codec, smooth=name != "gradients"))

    # The codec choice is for the big per-step arrays; the small ones are always "fast".
    floats("weights", (rows, layout.n_classes, layout.n_pixels), per_step, WEIGHT_DIMS, layout.codec)
    floats("loss", (rows,), (min(rows, SCALAR_CHUNK),), ("step",))
    if layout.bias:
        floats("bias", (rows, layout.n_classes), (SCALAR_CHUNK // 16, layout.n_classes), ("step", "class"))
    if layout.gradients:
        floats("gradients", (rows, layout.n_classes, layout.n_pixels), per_step, WEIGHT_DIMS, layout.codec)
    _create_resume_state(group, layout.resume_size)
    _create_evaluations(group, layout.eval_steps)
    # Coordinates are known up front: write them whole now.
    step = group.create_array("step", shape=(rows,), chunks=(min(rows, SCALAR_CHUNK),), dtype="int64",
                              fill_value=-1, dimension_names=("step",))
    step[:] = np.arange(rows, dtype=np.int64)
    _write_eval_steps(group, layout.eval_steps)
    return consolidate(group)


def _create_resume_state(group: zarr.Group, size: int) -> None:
    if size:
        # Two rows, written in turn: the progress marker names the one that is complete.
        group.create_array("resume_state", shape=(2, size), chunks=(1, size), dtype="float32", fill_value=np.nan,
                           dimension_names=("checkpoint", "value"), compressors=step_series_codecs(1)["compressors"])


def _create_evaluations(group: zarr.Group, eval_steps: tuple[int, ...]) -> None:
    n_evals = len(eval_steps)
    for name in ("heldout_accuracy", "heldout_loss"):
        with quiet_numcodecs():
            group.create_array(name, shape=(n_evals,), chunks=(max(n_evals, 1),), dtype="float32", fill_value=np.nan,
                               dimension_names=("eval_step",), **step_series_codecs(1))


def _write_eval_steps(group: zarr.Group, eval_steps: tuple[int, ...]) -> None:
    eval_step = group.create_array("eval_step", shape=(len(eval_steps),), chunks=(max(len(eval_steps), 1),),
                                   dtype="int64", fill_value=-1, dimension_names=("eval_step",))
    eval_step[:] = np.asarray(eval_steps, dtype=np.int64)


def create_network_store(path: str | Path, layout: NetworkLayout, metadata: RunMetadata, *, rows: int,
                         store_id: str) -> zarr.Group:
    """Create a network store (schema version 2) at ``path`` (which must not exist), its arrays
    ``rows`` long to begin with, no step committed yet. ``store_id`` tells this store from one
    created in its place later (its arrays' metadata changes as they grow, unlike version 1's).
    A planned run's layout (the train stage's) adds the held-out scores and the checkpoints."""
    if not isinstance(metadata, RunMetadata):
        raise TypeError(f"a store's metadata is a RunMetadata, got {type(metadata).__name__}")
    group = zarr.open_group(path, mode="w-", zarr_format=3, attributes={
        "weightlapse": {"schema": SCHEMA, "schema_version": NETWORK_SCHEMA_VERSION, "store_id": store_id,
                        "parameters": [spec.as_dict() for spec in layout.parameters], **metadata.to_attributes()},
        "progress": Progress(steps_done=-1, n_steps=layout.n_steps or 0, evals_done=0, finished=False,
                             updated=marker_time()).as_dict(),
    })
    if layout.n_steps is not None:
        _create_resume_state(group, layout.resume_size)
        _create_evaluations(group, layout.eval_steps)
        _write_eval_steps(group, layout.eval_steps)
    with quiet_numcodecs():
        for spec in layout.parameters:
            group.create_array(spec.name, shape=(rows, *spec.shape), chunks=(spec.chunk_steps, *spec.shape),
                               dtype="float32", fill_value=np.nan, dimension_names=spec.dims,
                               **step_series_codecs(len(spec.shape) + 1, layout.codec))
        group.create_array("loss", shape=(rows,), chunks=(SCALAR_CHUNK,), dtype="float32", fill_value=np.nan,
                           dimension_names=("step",), **step_series_codecs(1))
    step = group.create_array("step", shape=(rows,), chunks=(SCALAR_CHUNK,), dtype="int64", fill_value=-1,
                              dimension_names=("step",))
    step[:] = np.arange(rows, dtype=np.int64)
    return consolidate(group)


def consolidate(group: zarr.Group) -> zarr.Group:
    """Copy the arrays' metadata into the group's zarr.json (one atomic rewrite); the group as it is now."""
    with warnings.catch_warnings():
        # zarr notes that consolidated metadata is not in the Zarr v3 spec yet; xarray and zarr-python
        # read it, and a reader that ignores it reads each array's own zarr.json.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        with quiet_numcodecs():
            return zarr.consolidate_metadata(group.store)
