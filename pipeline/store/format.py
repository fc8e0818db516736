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

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, TransposeCodec, ZstdCodec
from zarr.codecs.numcodecs import PCodec

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
# The codec chains a reader accepts, as (array -> array, array -> bytes, bytes -> bytes)
# codec types: an optional transpose, then either bytes and a Zarr v3 core or Blosc
# compressor (the "fast" codec and the small arrays), or numcodecs' pcodec with nothing
# after it (the "compact" codec). Any other numcodecs codec (BitRound is lossy, for one)
# is refused: a store using one was not written by weightlapse.
ALLOWED_CODECS = {
    "array": (TransposeCodec,),
    "serializer": (BytesCodec, PCodec),
    "bytes": (BloscCodec, ZstdCodec, GzipCodec, Crc32cCodec),
}
# How the (step, class, pixel) arrays are encoded, by params.yaml's train.capture.codec.
CODECS = ("fast", "compact")
# pcodec's settings for "compact": delta order 2 along each weight's steps (after the
# transpose), the "classic" mode (the automatic one finds nothing more in weights and
# costs time), level 7, pages of 2**17 values (half a 64-step chunk; pages that fit the
# CPU's cache encode faster). docs/store.md has the measurements of the others. A gradient
# is not close to the step before's: gradients are coded without deltas (order 0).
PCODEC_CONFIG = {"level": 7, "mode_spec": "classic", "delta_spec": "try_consecutive", "delta_encoding_order": 2,
                 "equal_pages_up_to": 2**17}
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
    codec: str = "fast"          # how weights and gradients are encoded: one of CODECS


def step_series_codecs(ndim: int, codec: str = "fast", *, smooth: bool = True) -> dict[str, Any]:
    """Codecs for a (step, ...) float32 array, lossless both: ``fast`` (in the Zarr v3 spec,
    fast to write) or ``compact`` (about 1.3 times smaller again, slower to write).

    The transpose puts each weight's consecutive steps next to each other inside a chunk.
    A weight moves by a small fraction of itself per step, so its high bytes repeat along
    the run: ``fast`` byte-shuffles them together and LZ4 removes the repeats; ``compact``
    codes each step's difference from the last two (pcodec). Readers see the usual
    (step, ...) order: zarr undoes the transpose when it reads a chunk. zarr-python cannot
    write the ``compact`` chain itself (pcodec wants the transposed chunk contiguous):
    pipeline.chunkwriter encodes its chunks. ``smooth``: the values change little from step
    to step (weights, not gradients).
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    filters = [TransposeCodec(order=(*range(1, ndim), 0))] if ndim > 1 else []
    if codec == "compact":
        return {"filters": filters, "serializer": pcodec_codec(smooth=smooth), "compressors": None}
    return {"filters": filters, "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]}


def pcodec_codec(*, smooth: bool = True) -> PCodec:
    """zarr's wrapper of numcodecs' pcodec with the ``compact`` settings."""
    with quiet_numcodecs():
        return PCodec(**(PCODEC_CONFIG if smooth else PCODEC_CONFIG | {"delta_encoding_order": 0}))


@contextlib.contextmanager
def quiet_numcodecs() -> Iterator[None]:
    """A block without zarr's warning that numcodecs codecs are outside the Zarr v3 spec:
    docs/store.md says which readers read ``numcodecs.pcodec``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield


def codec_chain_problem(codecs: tuple) -> str | None:
    """Why an array's codec chain is not one weightlapse writes, or None if it is."""
    at = 0
    while at < len(codecs) and isinstance(codecs[at], ALLOWED_CODECS["array"]):
        at += 1
    if at == len(codecs) or not isinstance(codecs[at], ALLOWED_CODECS["serializer"]):
        return f"the codec {type(codecs[at]).__name__ if at < len(codecs) else None} where bytes or pcodec belongs"
    serializer = codecs[at]
    for codec in codecs[at + 1:]:
        if isinstance(serializer, PCodec) or not isinstance(codec, ALLOWED_CODECS["bytes"]):
            return f"the codec {type(codec).__name__} after {type(serializer).__name__}"
    return None


def shown(value: Any) -> str:
    """``value`` for an error message: its repr, cut short (it comes from a file on disk)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
