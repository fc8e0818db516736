"""The trajectory store's format: its names, arrays, codecs, limits and errors.

One Zarr v3 group per run, ``runs/<run>/trajectory.zarr``::

    weights           float32 (step, class, pixel)  index t = weights after t optimizer steps
    step              int64   (step,)               coordinate: 0 .. n_steps
    loss              float32 (step,)               training batch loss of step t (NaN at 0)
    bias              float32 (step, class)         only when the model has a bias
    gradients         float32 (step, class, pixel)  gradient applied at step t, when captured
    eval_step         int64   (eval_step,)          coordinate: steps where held-out data was scored
    heldout_accuracy  float32 (eval_step,)
    heldout_loss      float32 (eval_step,)
    resume_state      float32 (checkpoint, value)   two optimizer-state checkpoints, for resuming

Pixel p is image row p // 28, column p % 28. Arrays are allocated at their final length
when the run starts and filled with NaN; the group attribute ``progress``
(:class:`~weightlapse.pipeline.store.attributes.Progress`) says how many steps (and
evaluations) are valid and whether the run finished, and ``weightlapse``
(:class:`~weightlapse.pipeline.store.attributes.RunMetadata`) how the run was made.
Readers must never look past ``progress["steps_done"]``. ``progress["resume"]`` names the
last checkpoint: ``{"step": s, "row": k}``, the optimizer state after step s being
``resume_state[k]`` (absent for plain SGD, which keeps none). docs/store.md has what a
reader in another language needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, TransposeCodec, ZstdCodec

SCHEMA = "weightlapse.trajectory"
SCHEMA_VERSION = 1
STORE_NAME = "trajectory.zarr"
IMAGE_SIDE = 28
N_CLASSES = 10
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
WEIGHT_DIMS = ("step", "class", "pixel")
REQUIRED_ARRAYS = ("weights", "step", "loss", "eval_step", "heldout_accuracy", "heldout_loss")
# name -> (dtype, dimension names); the step arrays have n_steps + 1 rows.
ARRAYS = {
    "weights": ("float32", WEIGHT_DIMS),
    "gradients": ("float32", WEIGHT_DIMS),
    "bias": ("float32", ("step", "class")),
    "loss": ("float32", ("step",)),
    "step": ("int64", ("step",)),
    "eval_step": ("int64", ("eval_step",)),
    "heldout_accuracy": ("float32", ("eval_step",)),
    "heldout_loss": ("float32", ("eval_step",)),
    "resume_state": ("float32", ("checkpoint", "value")),
}
# The pipeline refuses longer runs (pipeline.params); a store claiming more is not ours.
MAX_STEPS = 10_000_000
# One decoded chunk at most this big: the reader allocates a chunk at a time.
MAX_CHUNK_BYTES = 64 * 2**20
# Metadata documents are a few kilobytes; a bigger one is not read.
MAX_METADATA_BYTES = 1 * 2**20
ALLOWED_CODECS = (BytesCodec, TransposeCodec, BloscCodec, ZstdCodec, GzipCodec, Crc32cCodec)
# Coordinates and per-step scalars are tiny; one chunk holds many steps.
SCALAR_CHUNK = 16384


class TrajectoryError(ValueError):
    """A path is not a usable weightlapse trajectory store."""


class TrajectoryNotFoundError(TrajectoryError, FileNotFoundError):
    """No store at the given path."""


class StoreBeingCreatedError(TrajectoryError):
    """The store's group exists, with no step committed, but not all its arrays yet."""


@dataclass(frozen=True)
class StoreLayout:
    """The shape of one run's store, fixed before it trains."""

    n_steps: int                 # optimizer steps planned; arrays hold n_steps + 1 rows
    eval_steps: tuple[int, ...]  # steps at which held-out data is scored, ascending
    n_classes: int = N_CLASSES
    n_pixels: int = N_PIXELS
    chunk_steps: int = 64
    bias: bool = False
    gradients: bool = False
    resume_size: int = 0         # length of the optimizer state saved for resuming (0: none kept)


def step_series_codecs(ndim: int) -> dict[str, Any]:
    """Codecs for a (step, ...) float32 array: lossless, in the Zarr v3 spec, fast to write.

    The transpose puts each weight's consecutive steps next to each other inside a chunk.
    A weight moves by a small fraction of itself per step, so its high bytes repeat along
    the run; byte-shuffling groups those bytes and LZ4 removes the repeats (docs/store.md
    has the measurements). Readers see the usual (step, ...) order: zarr undoes the
    transpose when it reads a chunk.
    """
    return {"filters": [TransposeCodec(order=(*range(1, ndim), 0))] if ndim > 1 else [],
            "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]}


def shown(value: Any) -> str:
    """``value`` for an error message: its repr, cut short (it comes from a file on disk)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
