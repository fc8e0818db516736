"""The pixel history: a time-major copy of a run's weights beside its store, for reading one
weight over every step.

The store is step-major (a chunk holds 64 steps of the whole 10 x 784 matrix): one weight over
300,000 steps means decompressing all 9.4 GB. The copy holds the same float32 values the
other way round, ``runs/<run>/pixel-history.zarr``, a Zarr v3 group::

    weights  float32 (pixel, class, step)   weights[p, c, t] == trajectory weights[t, c, p]

sharded: one shard file per ``HISTORY_SHARD_STEPS`` steps of every weight, each holding one
inner chunk of (1 pixel, 10 classes, ``HISTORY_SHARD_STEPS`` steps) per pixel, Blosc LZ4 with
byte shuffle (lossless). Reading one pixel's history reads one inner chunk per shard.

It covers steps ``0 .. steps - 1`` of the store it was copied from: every step of a finished
run; of an unfinished one, its complete chunks (a complete chunk never changes again). The
group attribute ``pixel_history`` says so and names its source by content
(:func:`source_digest`: the store's metadata and the bytes of its first and last copied chunk),
so a copy of an older store (retrained, resumed into another run, compacted) never matches:
a reader checks it with :func:`open_history`, and uses the store itself when it does not
match. The copy is built by ``pipeline.history`` (``weightlapse index``) under a dot-named
staging directory renamed into place whole, so a partial copy is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ShardingCodec

from weightlapse.pipeline.store.check import CheckedStore
from weightlapse.pipeline.store.format import (
    MAX_CHUNK_BYTES,
    N_CLASSES,
    N_PIXELS,
    TrajectoryError,
    codec_chain_problem,
    shown,
)
from weightlapse.pipeline.store.links import NoFollowStore, refuse_link_out, refuse_links

HISTORY_NAME = "pixel-history.zarr"
HISTORY_SCHEMA = "weightlapse.pixel-history"
HISTORY_SCHEMA_VERSION = 1
HISTORY_DIMS = ("pixel", "class", "step")
# Steps per shard: one inner chunk is 10 x 8192 float32 (320 KiB) of one pixel; a builder holds
# one shard's steps of the whole matrix (257 MB) at a time.
HISTORY_SHARD_STEPS = 8192


class StaleHistoryError(TrajectoryError):
    """No pixel history beside the store that can be used for it (absent, older, damaged)."""


@dataclass(frozen=True)
class PixelHistory:
    """A checked pixel history: its array and how many steps of the store it holds."""

    array: zarr.Array  # (pixel, class, step)
    steps: int         # store steps 0 .. steps - 1
    path: Path

    def read(self, pixel: int) -> np.ndarray:
        """(class, step) float32: every class's weight of ``pixel`` over the copied steps."""
        try:
            values = np.asarray(self.array[pixel])
        except Exception as error:  # noqa: BLE001 - codecs raise many kinds for a damaged shard
            raise StaleHistoryError(f"{self.path}: pixel {pixel} cannot be read ({type(error).__name__}: "
                                    f"{str(error)[:200]}); rebuild it: weightlapse index RUN_DIR") from None
        if not np.isfinite(values).all():
            raise StaleHistoryError(f"{self.path}: pixel {pixel} holds values that are not finite (a shard is "
                                    "missing or damaged); rebuild it: weightlapse index RUN_DIR")
        return values


def covered_steps(checked: CheckedStore) -> int:
    """How many steps a copy made now would hold: all of a finished run, the complete chunks of another."""
    progress = checked.progress
    if progress.finished:
        return progress.n_steps + 1
    per_chunk = checked.array("weights").chunks[0]
    return (progress.steps_done + 1) // per_chunk * per_chunk


def source_digest(checked: CheckedStore, steps: int) -> str:
    """sha256 naming what a copy of ``steps`` steps was made from: the store's ``weightlapse``
    attribute, its weights' ``zarr.json``, and the bytes of the first and of the last chunk
    copied (immutable once written). A store made anew, or re-encoded, gives another digest."""
    if not checked.location.local or steps < 1:
        raise StaleHistoryError(f"{checked.location}: a pixel history is made of a local store's written steps")
    root = checked.location.local_path
    weights = checked.array("weights")
    digest = hashlib.sha256()
    digest.update(json.dumps(checked.meta, sort_keys=True, default=str).encode())
    keys = ["weights/zarr.json"] + [f"weights/{weights.metadata.encode_chunk_key((index, 0, 0))}"
                                    for index in sorted({0, (steps - 1) // weights.chunks[0]})]
    for key in keys:
        refuse_links(root, key, missing=f"{key}, which the pixel history names, is missing")
        digest.update(key.encode() + b"\0" + (root / key).read_bytes() + b"\0")
    return digest.hexdigest()


def open_history(run_dir: str | os.PathLike, checked: CheckedStore) -> PixelHistory:
    """The pixel history beside ``checked`` (the store of ``run_dir``), checked to be a copy of
    it; raises :class:`StaleHistoryError` saying why it cannot be used (then read the store)."""
    run_dir = Path(run_dir)
    path = run_dir / HISTORY_NAME
    refuse_link_out(run_dir, HISTORY_NAME)
    if not (path / "zarr.json").is_file():
        raise StaleHistoryError(f"{path}: no pixel history (make one: weightlapse index {run_dir})")
    try:
        refuse_links(path, "weights/zarr.json")
        group = zarr.open_group(NoFollowStore(path), mode="r", use_consolidated=False)
        attributes = group.attrs.get("pixel_history")
        array = group["weights"]
    except TrajectoryError:
        raise
    except Exception as error:  # noqa: BLE001 - zarr raises many kinds for a foreign or damaged group
        raise StaleHistoryError(f"{path}: unreadable ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(attributes, dict) or attributes.get("schema") != HISTORY_SCHEMA \
            or attributes.get("schema_version") != HISTORY_SCHEMA_VERSION:
        raise StaleHistoryError(f"{path}: not a pixel history of this version ({shown(attributes)[:80]})")
    steps = attributes.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= checked.progress.steps_done + 1:
        raise StaleHistoryError(f"{path}: it says it holds {shown(steps)} steps; the store has "
                                f"{checked.progress.steps_done + 1:,}")
    _check_array(array, steps, path)
    if attributes.get("source") != source_digest(checked, steps):
        raise StaleHistoryError(f"{path}: a copy of another store (an earlier run, or before compaction); "
                                f"rebuild it: weightlapse index {run_dir}")
    return PixelHistory(array, steps, path)


def _check_array(array: zarr.Array, steps: int, path: Path) -> None:
    if not isinstance(array, zarr.Array) or str(array.dtype) != "float32" \
            or tuple(array.metadata.dimension_names or ()) != HISTORY_DIMS \
            or array.shape != (N_PIXELS, N_CLASSES, steps):
        raise StaleHistoryError(f"{path}: its weights are not a (pixel, class, step) float32 array of "
                                f"{steps:,} steps")
    codecs = tuple(array.metadata.codecs)
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        raise StaleHistoryError(f"{path}: its weights are not sharded as a pixel history is")
    inner = codecs[0]
    problem = codec_chain_problem(tuple(inner.codecs))
    if problem or int(np.prod(inner.chunk_shape)) * 4 > MAX_CHUNK_BYTES:
        raise StaleHistoryError(f"{path}: its weights use {problem or 'chunks over the size limit'}; "
                                "rebuild it: weightlapse index RUN_DIR")
