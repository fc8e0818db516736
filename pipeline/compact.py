"""Compacting a finished run in place: its weights (and gradients; a network run's every
parameter) re-encoded with the ``compact`` codec (pcodec, pipeline.store.format), with no moment at which the store is not
a valid, equal copy of the run.

    weightlapse compact runs/original

For each array, the new chunks are written under the other chunk-key separator (``c.0.0.0``
beside ``c/0/0/0``) into a staging array beside the store (``.trajectory.zarr.compacting/``),
read back there by a fresh zarr reader and compared bit for bit with the old chunks, then
moved into the array's directory, where the old metadata does not name them. One atomic
replace of the array's ``zarr.json`` switches it to the new chunks, the group's consolidated
metadata follows (one atomic write of the group's ``zarr.json``, as the writer makes it),
and only then are the old chunks deleted. Killed at any moment, the store opens and reads
the same values: before the switch the old metadata and chunks are intact, after it the new
ones are complete. Running it again carries on from where it stopped (an array already
switched is only cleaned up; one not switched yet is done again from the start).

A run being trained (its writer lock held) and a run reached through, or holding, a
symbolic link are refused. Under DVC the run directory is a stage's output: `dvc commit`
records the compacted store.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs.numcodecs import PCodec

from weightlapse.pipeline.chunkwriter import ENCODING_THREADS, ChunkWriter
from weightlapse.pipeline.runlock import RunLockedError, exclusive_writer
from weightlapse.pipeline.store import (
    STORE_NAME,
    TrajectoryError,
    check_store,
    quiet_numcodecs,
    step_series_codecs,
)

log = logging.getLogger(__name__)

# The (step, class, pixel) arrays a compaction re-encodes (a network run's: every parameter's
# (step, ...) array); the small ones stay as they are.
COMPACTED_ARRAYS = ("weights", "gradients")
STAGING_SUFFIX = ".compacting"


def compact_run(run_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Re-encode the finished run at ``run_dir`` (a run directory or its store) with the
    ``compact`` codec, in place; returns each array's (bytes before, bytes after).

    Raises :class:`~weightlapse.pipeline.runlock.RunLockedError` while the run is being
    trained, and :class:`~weightlapse.pipeline.store.TrajectoryError` for a run that is not
    finished, not a valid store, or reached through or holding a symbolic link."""
    run_dir = Path(run_dir)
    if run_dir.name == STORE_NAME:
        run_dir = run_dir.parent
    store = run_dir / STORE_NAME
    _refuse_links(run_dir, store)
    try:
        with exclusive_writer(run_dir):
            checked = check_store(store)
            if not checked.progress.finished:
                raise TrajectoryError(f"{store}: the run is not finished (steps done {checked.progress.steps_done:,} of "
                                      f"{checked.progress.n_steps:,}); finish or resume it (`dvc repro`), then compact it")
            staging = run_dir / f".{STORE_NAME}{STAGING_SUFFIX}"
            names = (COMPACTED_ARRAYS if checked.network is None else
                     tuple(spec.name for spec in checked.network.parameters))
            sizes = {name: _compact_array(store, name, staging / name)
                     for name in names if (store / name / "zarr.json").is_file()}
            shutil.rmtree(staging, ignore_errors=True)
    except RunLockedError as error:
        raise RunLockedError(f"{run_dir} is being trained ({error}); compact it once its stage has finished") from None
    check_store(store)
    return sizes


def _refuse_links(run_dir: Path, store: Path) -> None:
    for path in (run_dir, store):
        if path.is_symlink():
            raise TrajectoryError(f"{path} is a symbolic link; a run is compacted only in its own directory: "
                                  "compact the directory it points to")
    if not store.is_dir():
        raise TrajectoryError(f"{run_dir}: no {STORE_NAME} here; train the run first (`dvc repro`)")
    links = sorted(str(path.relative_to(run_dir)) for path in store.rglob("*") if path.is_symlink())
    if links:
        raise TrajectoryError(f"{run_dir}: {links[0]} is a symbolic link; a store is compacted only when all its "
                              "files are its own: replace the link by the file itself")


def _compact_array(store: Path, name: str, staging: Path) -> tuple[int, int]:
    directory = store / name
    before = _chunk_bytes(directory)
    with quiet_numcodecs():
        old = zarr.open_array(directory, mode="r")
    separator = old.metadata.chunk_key_encoding.separator
    if _is_compact(old):
        # Switched already (an earlier compaction was stopped after the switch): finish it.
        _consolidate(store)
        _remove_chunks(directory, _other(separator))
        shutil.rmtree(staging, ignore_errors=True)
        return before, _chunk_bytes(directory)
    new_separator = _other(separator)
    _remove_chunks(directory, new_separator)  # left by a compaction stopped before its switch
    shutil.rmtree(staging, ignore_errors=True)
    new = _write_staged(old, staging, new_separator)
    _verify(old, staging)
    for chunk in _chunk_files(staging, new_separator):
        target = directory / chunk.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(chunk, target)
    _switch_metadata(directory, (staging / "zarr.json").read_bytes())
    _consolidate(store)
    _remove_chunks(directory, separator)
    shutil.rmtree(staging, ignore_errors=True)
    after = _chunk_bytes(directory)
    log.info("%s/%s: %s bytes -> %s (%.2fx smaller), %d chunks", store, name, f"{before:,}", f"{after:,}",
             before / max(after, 1), -(-new.shape[0] // new.chunks[0]))
    return before, after


def _write_staged(old: zarr.Array, staging: Path, separator: str) -> zarr.Array:
    """The array re-encoded into ``staging``: same shape, chunks, fill, names and attributes."""
    with quiet_numcodecs():
        new = zarr.create_array(staging, shape=old.shape, chunks=old.chunks, dtype=old.dtype,
                                fill_value=old.fill_value, dimension_names=old.metadata.dimension_names,
                                attributes=dict(old.attrs), zarr_format=3,
                                chunk_key_encoding={"name": "default", "separator": separator},
                                **step_series_codecs(old.ndim, "compact", smooth=old.basename != "gradients"))
    writer = ChunkWriter.wrap(new)
    if not isinstance(writer, ChunkWriter):
        raise TrajectoryError(f"{staging}: the compact codec cannot be written here")
    at_once = old.chunks[0] * ENCODING_THREADS  # whole chunks, encoded side by side
    for start in range(0, old.shape[0], at_once):
        rows = slice(start, min(start + at_once, old.shape[0]))
        writer[rows] = old[rows]
    return new


def _verify(old: zarr.Array, staging: Path) -> None:
    """Every value of the staged array, read by a fresh reader, has the old one's bits."""
    with quiet_numcodecs():
        fresh = zarr.open_array(staging, mode="r")
    per_chunk = old.chunks[0]
    for start in range(0, old.shape[0], per_chunk):
        rows = slice(start, min(start + per_chunk, old.shape[0]))
        if not np.array_equal(fresh[rows].view(np.uint32), old[rows].view(np.uint32)):
            raise TrajectoryError(f"{staging}: steps {rows.start}..{rows.stop - 1} do not read back bit for bit "
                                  "after re-encoding; the store is left as it was (please report this)")


def _switch_metadata(directory: Path, metadata: bytes) -> None:
    temporary = directory / f".zarr.json{STAGING_SUFFIX}"
    temporary.write_bytes(metadata)
    os.replace(temporary, directory / "zarr.json")


def _consolidate(store: Path) -> None:
    with quiet_numcodecs(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)  # as create.py
        zarr.consolidate_metadata(zarr.storage.LocalStore(store))


def _is_compact(array: zarr.Array) -> bool:
    return any(isinstance(codec, PCodec) for codec in array.metadata.codecs)


def _other(separator: str) -> str:
    return "." if separator == "/" else "/"


def _chunk_files(directory: Path, separator: str) -> list[Path]:
    """The chunk files of the array in ``directory`` whose keys use ``separator``."""
    if separator == "/":
        root = directory / "c"
        return sorted(path for path in root.rglob("*") if path.is_file()) if root.is_dir() else []
    return sorted(path for path in directory.glob("c.*") if path.is_file())


def _remove_chunks(directory: Path, separator: str) -> None:
    if separator == "/":
        shutil.rmtree(directory / "c", ignore_errors=True)
        return
    for path in _chunk_files(directory, separator):
        path.unlink(missing_ok=True)


def _chunk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and path.name != "zarr.json")


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Re-encode a finished run's weights (and gradients) "
                                     "with the compact lossless codec, in place; safe to interrupt and run again")
    parser.add_argument("run_dir", help="the run directory (runs/<run>) or its trajectory.zarr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sizes = compact_run(args.run_dir)
    except (TrajectoryError, RunLockedError, OSError) as error:
        logging.getLogger("weightlapse").error("%s", error)
        return 1
    for name, (before, after) in sizes.items():
        print(f"{name}: {before:,} -> {after:,} bytes ({before / max(after, 1):.2f}x smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
