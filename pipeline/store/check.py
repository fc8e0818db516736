"""The validating reader: what a store must be before anything trusts it.

Every consumer of a run (``open_run``, the viewer, the runs index, statistics, comparisons,
publishing) reads it through :func:`check_store`, which checks, before any chunk is read:

- the group's ``weightlapse`` attributes name this schema and version;
- the progress marker has the right types and ranges (whole numbers, ``-1 <= steps_done <=
  n_steps``, ``evals_done`` within the planned evaluations, a finished run complete), so a
  marker saying ``Infinity`` or ``"5"`` is an error here, not a crash later;
- every array has weightlapse's dtype, dimensions and shape (``n_steps + 1`` rows; 10 classes
  by 784 pixels today), a chunking that bounds one chunk to ``MAX_CHUNK_BYTES``, and one of
  the codec chains weightlapse writes (``format.codec_chain_problem``);
- every chunk holding a committed row is a file in the store (a missing one would read as
  NaN rows), and no path that is read goes through a symbolic link;
- a network store (schema version 2) has a valid parameter list (names, shapes, roles,
  dims, bounded sizes: ``network.parse_parameters``) and one array per parameter as listed,
  and a planned one (the train stage's) version 1's held-out scores and checkpoints.

Each array is read from its own ``zarr.json``, never from the consolidated copy in the
group's (kept for plain ``xarray.open_zarr``), so what is checked is what is read.

Anything else is a :class:`TrajectoryError` (a ``ValueError``) that names the store, what
is wrong and what to do. A chunk that passes these checks but cannot be decoded, or holds
values that are not finite, raises the same error when its steps are read
(``steps.CheckedSteps``), and the rest of the run stays readable.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import zarr

from weightlapse.pipeline.locations import Location, as_location
from weightlapse.pipeline.store.attributes import Progress, RunMetadata
from weightlapse.pipeline.store.format import (
    ARRAYS,
    MAX_CHUNK_BYTES,
    MAX_METADATA_BYTES,
    MAX_STEPS,
    N_CLASSES,
    N_PIXELS,
    REQUIRED_ARRAYS,
    SCHEMA,
    SCHEMA_VERSION,
    STORE_NAME,
    StoreBeingCreatedError,
    TrajectoryError,
    TrajectoryNotFoundError,
    codec_chain_problem,
    quiet_numcodecs,
    shown,
)
from weightlapse.pipeline.store.links import NoFollowStore, refuse_links
from weightlapse.pipeline.store.network import NETWORK_SCHEMA_VERSION, RUN_ARRAYS, NetworkLayout, parse_parameters


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
    # A network store's parameters (schema version 2); None for a softmax-regression run (version 1).
    network: NetworkLayout | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The ``weightlapse`` attribute as written (``metadata`` has what is validated)."""
        return self.metadata.raw

    def array(self, name: str) -> zarr.Array:
        with quiet_numcodecs():  # a compact array's metadata names pcodec, which zarr warns of
            return self.group[name]

    def require_matrix(self, reader: str) -> None:
        """Raise a :class:`TrajectoryError` if this store records a network, which ``reader``
        (a reader of softmax-regression runs' (step, class, pixel) weights, with its verb:
        "the viewer shows") cannot read."""
        if self.network is not None:
            raise TrajectoryError(f"{self.location}: this run records a network (layers {self.network.describe()}); "
                                  f"{reader} softmax-regression runs so far: read it with "
                                  "weightlapse.open_run, which gives every parameter's steps")


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
            refuse_links(location.local_path, "zarr.json")
            _refuse_unmade(location)
        _check_metadata_size(location, "zarr.json")
        store = NoFollowStore(location.local_path) if location.local else location.zarr_store()
        group = zarr.open_group(store, mode="r", use_consolidated=False)
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
            f"{location}: a Zarr store, but not a weightlapse trajectory (schema {shown(schema)}); "
            "point at a runs/<run>/trajectory.zarr written by `dvc repro`"
        )
    if version not in (SCHEMA_VERSION, NETWORK_SCHEMA_VERSION) or isinstance(version, bool):
        raise TrajectoryError(
            f"{location}: written with store schema version {shown(version)}, this weightlapse reads versions "
            f"{SCHEMA_VERSION} and {NETWORK_SCHEMA_VERSION}; retrain the run (`dvc repro`) or use the weightlapse "
            "version that wrote it"
        )
    return group


def check_store(path: str | os.PathLike | Location, storage_options: dict[str, Any] | None = None) -> CheckedStore:
    """Open the store at ``path`` (a store, or a run directory holding one) and check all of it
    that can be checked without reading chunks; raise :class:`TrajectoryError` if it is unusable."""
    location = store_location(path, storage_options)
    group = open_store(location)
    where = str(location)
    check = _check_network if group.attrs["weightlapse"].get("schema_version") == NETWORK_SCHEMA_VERSION \
        else _check_softmax
    try:
        return check(location, group, where)
    except StoreBeingCreatedError:
        raise
    except TrajectoryError as error:
        # The writer creates the arrays one by one (and some of their chunks) before it
        # commits a step: until then an incomplete store is one being created, or one whose
        # creation was killed, never one to call damaged.
        if not _nothing_committed(group, where):
            raise
        raise StoreBeingCreatedError(f"{where}: no step is committed yet and the store is incomplete "
                                     f"({str(error).removeprefix(where + ': ')}): it is still being created (try "
                                     "again in a moment), or its creation was interrupted: retrain the run") from None


def _nothing_committed(group: zarr.Group, where: str) -> bool:
    try:
        progress = Progress.parse(group.attrs.get("progress"), where)
    except TrajectoryError:
        return False
    return progress.steps_done < 0 and not progress.finished


def _check_softmax(location: Location, group: zarr.Group, where: str) -> CheckedStore:
    """:func:`check_store` for a softmax-regression store (schema version 1)."""
    progress = Progress.parse(group.attrs.get("progress"), where)
    arrays = {}
    for name in ARRAYS:
        if name in REQUIRED_ARRAYS or _has_member(group, name):
            arrays[name] = _open_array(group, name, where)
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
    if previous.network is not None or read_identity(location) != previous.identity:
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


def _open_array(group: zarr.Group, name: str, where: str) -> zarr.Array:
    location = where
    try:
        if isinstance(group.store, zarr.storage.LocalStore):
            root = os.fspath(group.store.root)
            refuse_links(root, f"{name}/zarr.json")
            metadata = os.path.join(root, name, "zarr.json")
            if not os.path.exists(metadata):
                raise KeyError(name)
            if os.path.getsize(metadata) > MAX_METADATA_BYTES:
                raise TrajectoryError(f"{location}: {name}/zarr.json is larger than {MAX_METADATA_BYTES:,} bytes")
        with quiet_numcodecs():
            array = group[name]
    except TrajectoryError:
        raise
    except KeyError:
        raise TrajectoryError(f"{location}: array {name!r} is missing: the store is damaged: retrain the run "
                              "(`dvc repro`)") from None
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
    _check_encoding(array, name, where, steps_only=name != "resume_state")


def _check_network(location: Location, group: zarr.Group, where: str) -> CheckedStore:
    """:func:`check_store` for a network store (schema version 2, pipeline/store/network.py)."""
    meta = dict(group.attrs["weightlapse"])
    network = parse_parameters(meta.get("parameters"), where)
    store_id = meta.get("store_id")
    if not isinstance(store_id, str) or not 0 < len(store_id) <= 64:
        raise TrajectoryError(f"{where}: the store's store_id is {shown(store_id)}, not an id: the store was not "
                              "written by weightlapse")
    # A planned run (the train stage's) also has version 1's held-out scores and checkpoints.
    planned = any(_has_member(group, name) for name in RUN_ARRAYS)
    runs = {name: _open_array(group, name, where) for name in RUN_ARRAYS
            if (planned and name != "resume_state") or _has_member(group, name)}
    n_evals = runs["eval_step"].shape[0] if planned else 0
    progress = Progress.parse(group.attrs.get("progress"), where, n_evals=n_evals)
    for name, array in runs.items():
        _check_array(array, name, 0, n_evals, where)
    rows, arrays = progress.steps_done + 1, {}
    expected = [(spec.name, "float32", spec.dims, spec.shape) for spec in network.parameters]
    for name, dtype, dims, shape in [*expected, ("loss", "float32", ("step",), ()), ("step", "int64", ("step",), ())]:
        array = arrays[name] = _open_array(group, name, where)
        if getattr(array.metadata, "zarr_format", None) != 3 or str(array.dtype) != dtype \
                or tuple(array.metadata.dimension_names or ()) != dims:
            raise TrajectoryError(f"{where}: array {name!r} is {array.dtype} with dimensions "
                                  f"{array.metadata.dimension_names}, expected Zarr v3 {dtype} {dims}: the store is "
                                  "not weightlapse's or is damaged: record the run again")
        if tuple(array.shape[1:]) != shape or not rows <= array.shape[0] <= MAX_STEPS + 1:
            raise TrajectoryError(f"{where}: array {name!r} has shape {array.shape}, expected at least the {rows:,} "
                                  f"rows its progress marker commits (at most {MAX_STEPS + 1:,}), each of shape "
                                  f"{shape}: the store is damaged: record the run again")
        _check_encoding(array, name, where)
    committed = {name: (0, rows) for name in arrays} | {"eval_step": (0, n_evals),
                                                         "heldout_accuracy": (0, progress.evals_done),
                                                         "heldout_loss": (0, progress.evals_done)}
    _check_chunks_present(location, {**arrays, **runs}, committed, where)
    return CheckedStore(location, group, RunMetadata.parse(meta), progress, (location.url, "store", store_id),
                        network=network)


def _check_encoding(array: zarr.Array, name: str, where: str, *, steps_only: bool = True) -> None:
    """Chunked along steps only (``steps_only``), a bounded chunk, a codec chain weightlapse writes."""
    chunks = tuple(array.chunks)
    if any(c < 1 for c in chunks) or chunks[1:] != tuple(array.shape[1:]) and steps_only:
        raise TrajectoryError(f"{where}: array {name!r} is chunked {chunks}; weightlapse chunks along steps only")
    if math.prod(chunks) * array.dtype.itemsize > MAX_CHUNK_BYTES:
        raise TrajectoryError(f"{where}: array {name!r} has chunks of {chunks} ({math.prod(chunks) * 4:,} bytes), "
                              f"over the {MAX_CHUNK_BYTES:,}-byte limit: the store is not weightlapse's")
    problem = codec_chain_problem(tuple(array.metadata.codecs))
    if problem:
        raise TrajectoryError(f"{where}: array {name!r} uses {problem}; weightlapse reads only the codec chains it "
                              "writes (a transpose, then bytes with Zarr v3 core codecs or Blosc, or numcodecs.pcodec "
                              "alone): the store is not weightlapse's")


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
            refuse_links(root, key, missing=f"chunk {key} of a committed step is missing", verified=verified)
        return
    try:
        listed = {path[len(location.path.rstrip("/")) + 1:] for path in location.fs.find(location.path)}
    except OSError as error:
        raise TrajectoryError(f"{where}: cannot list the store ({error})") from None
    missing = [key for key in expected if key not in listed]
    if missing:
        raise TrajectoryError(f"{where}: chunk {missing[0]} of a committed step is missing: the store was not "
                              "completely copied or is damaged: publish or retrain the run again")


def _refuse_unmade(location: Location) -> None:
    """A store directory holding nothing yet (or a file being written): its creation had only begun."""
    path = location.local_path
    if path.is_dir() and all(entry.name.endswith(".partial") for entry in path.iterdir()):
        raise StoreBeingCreatedError(f"{location}: the store is still being created (try again in a moment), or its "
                                     "creation was interrupted: retrain the run")


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
