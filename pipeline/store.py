"""The trajectory store format, the contract between the pipeline and the viewer, and its
validating reader: what a store must be before anything trusts it.

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
when the run starts and filled with NaN; the group attribute ``progress`` says how many
steps (and evaluations) are valid and whether the run finished. Readers must never look
past ``progress["steps_done"]``: the readers built on :func:`check_store` never do.
``progress["resume"]`` names the last checkpoint: ``{"step": s, "row": k}``, the optimizer
state after step s being ``resume_state[k]`` (absent for plain SGD, which keeps none).

Every consumer of a run (``open_run``, the viewer, the runs index, statistics, comparisons,
publishing) reads it through :func:`check_store`, which checks, before any chunk is read:

- the group's ``weightlapse`` attributes name this schema and version;
- the progress marker has the right types and ranges (whole numbers, ``-1 <= steps_done <=
  n_steps``, ``evals_done`` within the planned evaluations, a finished run complete), so a
  marker saying ``Infinity`` or ``"5"`` is an error here, not a crash later;
- every array has weightlapse's dtype, dimensions and shape (``n_steps + 1`` rows; 10 classes
  by 784 pixels today), a chunking that bounds one chunk to ``MAX_CHUNK_BYTES``, and only
  codecs from the Zarr v3 core or Blosc;
- every chunk holding a committed row is a file in the store (a missing one would read as
  NaN rows), and no path that is read goes through a symbolic link.

Anything else is a :class:`TrajectoryError` (a ``ValueError``) that names the store, what
is wrong and what to do. A chunk that passes these checks but cannot be decoded, or holds
values that are not finite, raises the same error when its steps are read
(:class:`CheckedSteps`), and the rest of the run stays readable.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, TransposeCodec, ZstdCodec

from weightlapse.pipeline.locations import Location, as_location

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


class TrajectoryError(ValueError):
    """A path is not a usable weightlapse trajectory store."""


class TrajectoryNotFoundError(TrajectoryError, FileNotFoundError):
    """No store at the given path."""


class StoreBeingCreatedError(TrajectoryError):
    """The store's group exists, with no step committed, but not all its arrays yet."""


@dataclass(frozen=True)
class Progress:
    """The progress marker (group attribute ``progress``), validated."""

    steps_done: int             # last step whose row is committed; -1: none yet
    n_steps: int                # steps planned
    evals_done: int             # held-out evaluations committed
    finished: bool
    updated: str | None = None  # when an unfinished run last moved its marker (ISO 8601)
    error: str | None = None    # why training stopped early
    resume: dict[str, int] | None = None  # the last checkpoint: {"step": s, "row": k}

    @classmethod
    def parse(cls, raw: Any, where: str, *, n_evals: int | None = None) -> Progress:
        if not isinstance(raw, dict):
            raise TrajectoryError(f"{where}: the store has no progress marker; it was not written by weightlapse")

        def whole(key: str, default: int | None = None) -> int:
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TrajectoryError(f"{where}: progress marker: {key} is {_shown(value)}, not a whole number; "
                                      "the store is damaged or not written by weightlapse: retrain the run")
            return value

        steps_done, n_steps, evals_done = whole("steps_done"), whole("n_steps"), whole("evals_done", 0)
        if not 0 <= n_steps <= MAX_STEPS:
            raise TrajectoryError(f"{where}: progress marker plans {n_steps:,} steps; weightlapse writes 0 to "
                                  f"{MAX_STEPS:,}: the store is damaged: retrain the run")
        if not -1 <= steps_done <= n_steps:
            raise TrajectoryError(f"{where}: progress marker says {steps_done:,} of {n_steps:,} steps, which cannot "
                                  "be: the store is damaged: retrain the run")
        if not 0 <= evals_done <= (n_evals if n_evals is not None else n_steps + 1):
            raise TrajectoryError(f"{where}: progress marker says {evals_done:,} evaluations done of "
                                  f"{n_evals if n_evals is not None else n_steps + 1:,} planned: the store is damaged")
        finished = raw.get("finished", False)
        if not isinstance(finished, bool):
            raise TrajectoryError(f"{where}: progress marker: finished is {_shown(finished)}, not true or false")
        if finished and steps_done != n_steps:
            raise TrajectoryError(f"{where}: progress marker says finished at step {steps_done:,} of {n_steps:,}: "
                                  "the store is damaged: retrain the run")
        updated, error = raw.get("updated"), raw.get("error")
        resume = raw.get("resume")
        if resume is not None:
            if not (isinstance(resume, dict) and all(isinstance(resume.get(key), int)
                                                     and not isinstance(resume.get(key), bool)
                                                     for key in ("step", "row"))):
                raise TrajectoryError(f"{where}: progress marker: resume is {_shown(resume)}, not a checkpoint")
            resume = {"step": resume["step"], "row": resume["row"]}
        return cls(steps_done, n_steps, evals_done, finished,
                   updated=updated if isinstance(updated, str) else None,
                   error=None if error is None else str(error)[:2000], resume=resume)

    def as_dict(self) -> dict[str, Any]:
        """The marker as the writer writes it (keys left out when empty)."""
        marker = {"steps_done": self.steps_done, "n_steps": self.n_steps, "evals_done": self.evals_done,
                  "finished": self.finished}
        for key in ("updated", "resume", "error"):
            if getattr(self, key) is not None:
                marker[key] = getattr(self, key)
        return marker


@dataclass(frozen=True)
class RunMetadata:
    """How a run was made (group attribute ``weightlapse``, written by the train stage's
    ``run_metadata``), validated on read: what a reader relies on has its type, and anything
    else of the attribute stays in ``raw``. Values of the wrong type read as absent."""

    run: str = ""
    model: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""                        # the dataset's name
    class_names: tuple[str, ...] | None = None  # one per class, when the store says
    engine: str = ""
    device: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any, *, n_classes: int = N_CLASSES) -> RunMetadata:
        raw = raw if isinstance(raw, dict) else {}
        dataset = raw.get("dataset") if isinstance(raw.get("dataset"), dict) else {}
        names = dataset.get("class_names")
        class_names = (tuple(str(name)[:100] for name in names)
                       if isinstance(names, list) and len(names) == n_classes else None)

        def text(value: Any) -> str:
            return value[:200] if isinstance(value, str) else ""

        return cls(run=text(raw.get("run")), model=text(raw.get("model")),
                   params=raw["params"] if isinstance(raw.get("params"), dict) else {},
                   dataset=text(dataset.get("name")), class_names=class_names, engine=text(raw.get("engine")),
                   device=text(raw.get("device")), raw=raw)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class CheckedStore:
    """A store that passed :func:`check_store`: its group, metadata and marker, and what it is."""

    location: Location
    group: zarr.Group
    metadata: RunMetadata
    progress: Progress
    # Changes whenever the store is created anew (a retrained run), never while it is
    # written: caches of its chunks are keyed by it.
    identity: tuple

    @property
    def meta(self) -> dict[str, Any]:
        """The ``weightlapse`` attribute as written (``metadata`` has what is validated)."""
        return self.metadata.raw

    def array(self, name: str) -> zarr.Array:
        return self.group[name]


def store_location(path: str | os.PathLike | Location, storage_options: dict[str, Any] | None = None) -> Location:
    """The store of a run: ``path`` itself if it is a store, else ``path/trajectory.zarr`` when that exists."""
    location = as_location(path, storage_options)
    if location.name != STORE_NAME and (location / STORE_NAME).exists():
        return location / STORE_NAME
    return location


def open_store(path: str | os.PathLike | Location, storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Open a store read-only as a Zarr group, checking it is a trajectory of this schema version."""
    location = as_location(path, storage_options)
    try:
        if not location.exists():
            raise TrajectoryNotFoundError(f"{location}: no trajectory store here")
        if location.local:
            _refuse_links(location.local_path, "zarr.json")
        _check_metadata_size(location, "zarr.json")
        group = zarr.open_group(location.zarr_store(), mode="r")
    except TrajectoryError:
        raise
    except Exception as error:  # noqa: BLE001 - zarr and fsspec raise many kinds for a foreign or unreachable store
        raise TrajectoryError(f"{location}: not a Zarr group, or unreadable ({type(error).__name__}: "
                              f"{str(error)[:300]})") from None
    meta = group.attrs.get("weightlapse", {})
    if not isinstance(meta, dict):
        meta = {}
    schema, version = meta.get("schema"), meta.get("schema_version")
    if schema != SCHEMA:
        raise TrajectoryError(
            f"{location}: a Zarr store, but not a weightlapse trajectory (schema {_shown(schema)}); "
            "point at a runs/<run>/trajectory.zarr written by `dvc repro`"
        )
    if version != SCHEMA_VERSION:
        raise TrajectoryError(
            f"{location}: written with store schema version {_shown(version)}, this weightlapse reads version "
            f"{SCHEMA_VERSION}; retrain the run (`dvc repro`) or use the weightlapse version that wrote it"
        )
    return group


def check_store(path: str | os.PathLike | Location, storage_options: dict[str, Any] | None = None) -> CheckedStore:
    """Open the store at ``path`` (a store, or a run directory holding one) and check all of it
    that can be checked without reading chunks; raise :class:`TrajectoryError` if it is unusable."""
    location = store_location(path, storage_options)
    group = open_store(location)
    where = str(location)
    progress = Progress.parse(group.attrs.get("progress"), where)
    arrays = {}
    for name in ARRAYS:
        if name in REQUIRED_ARRAYS or _has_member(group, name):
            arrays[name] = _open_array(group, name, where, being_created=progress.steps_done < 0)
    n_evals = arrays["eval_step"].shape[0]
    progress = Progress.parse(group.attrs.get("progress"), where, n_evals=n_evals)
    rows = progress.n_steps + 1
    for name, array in arrays.items():
        _check_array(array, name, rows, n_evals, where)
    committed = {name: (0, progress.steps_done + 1) for name in ("weights", "gradients", "bias", "loss", "step")}
    committed |= {"eval_step": (0, n_evals), "heldout_accuracy": (0, progress.evals_done),
                  "heldout_loss": (0, progress.evals_done)}
    _check_chunks_present(location, arrays, committed, where)
    identity = _identity(location, where)
    return CheckedStore(location, group, RunMetadata.parse(dict(group.attrs["weightlapse"])), progress, identity)


def recheck_store(previous: CheckedStore) -> CheckedStore:
    """:func:`check_store` again, cheaply: for the same store (same identity), only the new
    marker and the chunks of the steps committed since ``previous`` are checked; a store
    created anew since is checked whole."""
    location, where = previous.location, str(previous.location)
    if read_identity(location) != previous.identity:
        return check_store(location)
    group = open_store(location)
    arrays = {name: group[name] for name in ARRAYS if name in previous.group}
    progress = Progress.parse(group.attrs.get("progress"), where, n_evals=arrays["eval_step"].shape[0])
    if progress.n_steps != previous.progress.n_steps:
        return check_store(location)
    before, after = previous.progress, progress
    new_rows = {name: (before.steps_done + 1, after.steps_done + 1)
                for name in ("weights", "gradients", "bias", "loss")}
    new_rows |= {name: (before.evals_done, after.evals_done) for name in ("heldout_accuracy", "heldout_loss")}
    _check_chunks_present(location, arrays, new_rows, where)
    return CheckedStore(location, group, previous.metadata, progress, previous.identity)


def _has_member(group: zarr.Group, name: str) -> bool:
    try:
        return name in group
    except Exception:  # noqa: BLE001
        return False


def _open_array(group: zarr.Group, name: str, where: str, *, being_created: bool) -> zarr.Array:
    location = where
    try:
        if isinstance(group.store, zarr.storage.LocalStore):
            root = os.fspath(group.store.root)
            _refuse_links(root, f"{name}/zarr.json")
            metadata = os.path.join(root, name, "zarr.json")
            if not os.path.exists(metadata):
                raise KeyError(name)
            if os.path.getsize(metadata) > MAX_METADATA_BYTES:
                raise TrajectoryError(f"{location}: {name}/zarr.json is larger than {MAX_METADATA_BYTES:,} bytes")
        array = group[name]
    except TrajectoryError:
        raise
    except KeyError:
        if being_created:
            raise StoreBeingCreatedError(f"{location}: array {name!r} is missing: the store is still being created "
                                         "(try again in a moment), or its creation was interrupted: retrain the run"
                                         ) from None
        raise TrajectoryError(f"{location}: array {name!r} is missing, though steps are committed: the store is "
                              "damaged: retrain the run (`dvc repro`)") from None
    except Exception as error:  # noqa: BLE001
        raise TrajectoryError(f"{location}: array {name!r} is unreadable ({type(error).__name__}: "
                              f"{str(error)[:200]}): the store is damaged: retrain the run") from None
    if not isinstance(array, zarr.Array):
        raise TrajectoryError(f"{location}: {name!r} is a group, not an array: the store is not weightlapse's")
    return array


def _check_array(array: zarr.Array, name: str, rows: int, n_evals: int, where: str) -> None:
    dtype, dims = ARRAYS[name]
    metadata = array.metadata
    if getattr(metadata, "zarr_format", None) != 3:
        raise TrajectoryError(f"{where}: array {name!r} is not a Zarr v3 array")
    if str(array.dtype) != dtype:
        raise TrajectoryError(f"{where}: array {name!r} holds {array.dtype}, expected {dtype}: the store is "
                              "not weightlapse's or is damaged: retrain the run")
    if tuple(metadata.dimension_names or ()) != dims:
        raise TrajectoryError(f"{where}: array {name!r} has dimensions {metadata.dimension_names}, expected {dims}")
    expected = {
        "weights": (rows, N_CLASSES, N_PIXELS), "gradients": (rows, N_CLASSES, N_PIXELS), "bias": (rows, N_CLASSES),
        "loss": (rows,), "step": (rows,), "eval_step": (n_evals,), "heldout_accuracy": (n_evals,),
        "heldout_loss": (n_evals,),
    }.get(name)
    if name == "resume_state":
        if len(array.shape) != 2 or array.shape[0] != 2 or array.shape[1] > 2**26:
            raise TrajectoryError(f"{where}: array 'resume_state' has shape {array.shape}, expected (2, state size)")
    elif array.shape != expected:
        raise TrajectoryError(f"{where}: array {name!r} has shape {array.shape}, expected {expected} for the "
                              f"{rows - 1:,} steps its progress marker plans: the store is damaged: retrain the run")
    chunks = tuple(array.chunks)
    if any(c < 1 for c in chunks) or chunks[1:] != tuple(array.shape[1:]) and name != "resume_state":
        raise TrajectoryError(f"{where}: array {name!r} is chunked {chunks}; weightlapse chunks along steps only")
    if math.prod(chunks) * array.dtype.itemsize > MAX_CHUNK_BYTES:
        raise TrajectoryError(f"{where}: array {name!r} has chunks of {chunks} ({math.prod(chunks) * 4:,} bytes), "
                              f"over the {MAX_CHUNK_BYTES:,}-byte limit: the store is not weightlapse's")
    for codec in metadata.codecs:
        if not isinstance(codec, ALLOWED_CODECS):
            raise TrajectoryError(f"{where}: array {name!r} uses the codec {type(codec).__name__}; weightlapse "
                                  "reads only Zarr v3 core codecs and Blosc")


def _chunk_keys(array: zarr.Array, name: str, rows: tuple[int, int]) -> list[str]:
    """Store keys of the chunks holding rows ``rows[0] .. rows[1] - 1`` (chunked along the first axis only)."""
    first, stop = rows
    if stop <= first:
        return []
    per_chunk = array.chunks[0]
    encode = array.metadata.chunk_key_encoding.encode_chunk_key
    trailing = (0,) * (array.ndim - 1)
    return [f"{name}/{encode((index, *trailing))}" for index in range(first // per_chunk, -(-stop // per_chunk))]


def _check_chunks_present(location: Location, arrays: dict[str, zarr.Array], committed: dict[str, tuple[int, int]],
                          where: str) -> None:
    """Every chunk holding the ``committed`` rows (name -> (first row, stop)) is a file in the store."""
    expected = [key for name, array in arrays.items() if name in committed
                for key in _chunk_keys(array, name, committed[name])]
    if not expected:
        return
    if location.local:
        root, verified = os.fspath(location.local_path), set()
        for key in expected:
            _refuse_links(root, key, missing=f"chunk {key} of a committed step is missing", verified=verified)
        return
    try:
        listed = {path[len(location.path.rstrip("/")) + 1:] for path in location.fs.find(location.path)}
    except OSError as error:
        raise TrajectoryError(f"{where}: cannot list the store ({error})") from None
    missing = [key for key in expected if key not in listed]
    if missing:
        raise TrajectoryError(f"{where}: chunk {missing[0]} of a committed step is missing: the store was not "
                              "completely copied or is damaged: publish or retrain the run again")


def _refuse_links(root: str | os.PathLike, relative: str, *, missing: str | None = None,
                  verified: set[str] | None = None) -> None:
    """Raise unless ``root/relative`` is reached from the store's root without a symbolic link
    (and, with ``missing``, is a file). The root itself may be reached through links.
    ``verified``: directories (relative) already found to be real ones, shared across calls."""
    verified = set() if verified is None else verified
    parts = relative.split("/")
    for depth in range(1, len(parts) + 1):
        component = "/".join(parts[:depth])
        if component in verified:
            continue
        try:
            mode = os.lstat(os.path.join(root, component)).st_mode
        except FileNotFoundError:
            if missing is None:
                return  # nothing there to follow; whoever reads it says what is missing
            raise TrajectoryError(f"{os.fspath(root)}: {missing}: the store is damaged: retrain the run "
                                  "(`dvc repro`)") from None
        except OSError as error:
            raise TrajectoryError(f"{os.fspath(root)}: {component} cannot be read ({error})") from None
        if stat.S_ISLNK(mode):
            raise TrajectoryError(f"{os.fspath(root)}: {component} is a symbolic link; a run is read only from "
                                  "files inside its own directory: replace the link by what it points to")
        if depth < len(parts):
            verified.add(component)
        elif missing is not None and not stat.S_ISREG(mode):
            raise TrajectoryError(f"{os.fspath(root)}: {missing}: the store is damaged: retrain the run "
                                  "(`dvc repro`)")


def refuse_link_out(run_dir: str | os.PathLike, name: str) -> None:
    """Raise unless ``run_dir/name``, when it exists, lies in ``run_dir`` itself, not through a link."""
    path = os.path.join(os.path.realpath(run_dir), name)
    if os.path.lexists(path) and os.path.realpath(path) != path:
        raise TrajectoryError(f"{os.fspath(run_dir)}: {name} is a symbolic link; a run is read only from files "
                              "inside its own directory: replace the link by what it points to")


def _check_metadata_size(location: Location, key: str) -> None:
    try:
        size = location.fs.size(f"{location.path.rstrip('/')}/{key}")
    except (OSError, ValueError):
        return  # zarr says what is missing
    if size is not None and size > MAX_METADATA_BYTES:
        raise TrajectoryError(f"{location}: {key} is {size:,} bytes, larger than any weightlapse metadata "
                              f"({MAX_METADATA_BYTES:,}): not a weightlapse trajectory")


def _identity(location: Location, where: str) -> tuple:
    """What tells this store from a store created in its place later: the weights array's
    metadata file, written once when the store is created and never again."""
    key = f"{location.path.rstrip('/')}/weights/zarr.json"
    try:
        if location.local:
            stat = os.stat(key)
            return (location.url, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
        location.fs.invalidate_cache(key)
        info = location.fs.info(key)
    except OSError as error:
        raise TrajectoryError(f"{where}: cannot read the store's metadata ({error})") from None
    return (location.url, *(str(info.get(field)) for field in ("ETag", "LastModified", "mtime", "size")))


def read_identity(location: Location) -> tuple | None:
    """The identity :func:`check_store` gives the store at ``location`` now; None if it cannot be read."""
    try:
        return _identity(location, str(location))
    except TrajectoryError:
        return None


class CheckedSteps:
    """A (step, ...) store array whose reads raise :class:`TrajectoryError` for a damaged chunk.

    It stands in for the zarr array under dask (``da.from_array``): a chunk that cannot be
    decoded, or (with ``finite``) holds NaN or infinite values, names its steps and the
    store instead of surfacing a codec's own error or NaN rows as data.
    """

    def __init__(self, array: zarr.Array, where: str, *, n_rows: int | None = None, finite: bool = True) -> None:
        self.array, self.where, self.finite = array, where, finite
        rows = array.shape[0] if n_rows is None else min(n_rows, array.shape[0])
        self.shape, self.dtype, self.ndim = (rows, *array.shape[1:]), array.dtype, array.ndim

    def __getitem__(self, key):
        try:
            block = self.array[key]
        except Exception:  # noqa: BLE001 - codecs and stores raise many kinds for a damaged chunk
            raise self._locate(key) from None
        if self.finite and block.size and not np.isfinite(block).all():
            raise self._locate(key)
        return block

    def _locate(self, key) -> TrajectoryError:
        """The error for the first damaged store chunk among the steps of ``key``."""
        steps = key[0] if isinstance(key, tuple) else key
        first, stop, _ = steps.indices(self.shape[0]) if isinstance(steps, slice) else (steps, steps + 1, 1)
        per_chunk = self.array.chunks[0]
        for start in range(first - first % per_chunk, stop, per_chunk):
            rows = slice(max(start, first), min(start + per_chunk, stop))
            try:
                block = self.array[rows]
            except Exception as error:  # noqa: BLE001
                return damaged(self.where, rows, f"{type(error).__name__}: {str(error)[:200]}")
            if self.finite and not np.isfinite(block).all():
                return damaged(self.where, rows, "it holds values that are not finite (NaN or infinite)")
        return damaged(self.where, steps, "reading failed")


def damaged(where: str, steps: Any, reason: str) -> TrajectoryError:
    span = f"steps {steps.start}..{steps.stop - 1}" if isinstance(steps, slice) else f"step {steps}"
    return TrajectoryError(f"{where}: {span} cannot be read ({reason}); that part of the store is damaged: "
                           "retrain the run (`dvc repro`); other steps can still be read")
