"""Building a run's pixel history (pipeline.store.history): its weights copied time-major
beside its store, so one weight over every step reads in milliseconds.

    weightlapse index runs/original

The train stage builds it when a run finishes (and for a kept run that has none, or an
older one). The store is read a shard's steps at a time (8,192 steps of the whole matrix,
257 MB), never whole. The copy is written into ``.pixel-history.zarr.building`` beside the
store, its attribute naming the source last, then renamed into place; an older copy is moved
aside first and deleted after. Killed at any moment, the run has its old copy, none, or the
new one, never a partial one (readers check the source, and never read dot-named folders);
running it again starts afresh and removes what a killed build left. The copy is derived
data: not a DVC output, rebuilt whenever it does not match its store.

A run being trained (its writer lock held) is refused; so is one reached through or holding
a symbolic link.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from weightlapse.pipeline.runlock import RunLockedError, exclusive_writer
from weightlapse.pipeline.store import STORE_NAME, CheckedSteps, TrajectoryError, check_store, quiet_numcodecs
from weightlapse.pipeline.store.history import (
    HISTORY_DIMS,
    HISTORY_NAME,
    HISTORY_SCHEMA,
    HISTORY_SCHEMA_VERSION,
    HISTORY_SHARD_STEPS,
    StaleHistoryError,
    covered_steps,
    open_history,
    source_digest,
)

log = logging.getLogger(__name__)

STAGING = f".{HISTORY_NAME}.building"
RETIRED = f".{HISTORY_NAME}.old"
# Steps read from the store per read (16 MB of weights), transposed into the shard's buffer.
READ_STEPS = 512


@dataclass(frozen=True)
class HistoryBuild:
    """What a build did: the steps the copy holds, its size on disk, and the time it took."""

    steps: int
    bytes: int
    seconds: float
    built: bool  # False: the copy there already matched the store


def build_history(run_dir: str | os.PathLike, *, shard_steps: int = HISTORY_SHARD_STEPS) -> HistoryBuild | None:
    """Build (or keep, when current) the pixel history of the run at ``run_dir``; None when the
    run has no complete chunk to copy yet. Holds the run's writer lock: raises RunLockedError
    while the run is trained, TrajectoryError for a store that cannot be read."""
    run_dir = _run_dir(run_dir)
    try:
        with exclusive_writer(run_dir):
            return build_history_locked(run_dir, shard_steps=shard_steps)
    except RunLockedError as error:
        raise RunLockedError(f"{run_dir} is being trained ({error}); its stage builds the pixel history when the "
                             "run finishes") from None


def build_history_locked(run_dir: Path, *, shard_steps: int = HISTORY_SHARD_STEPS) -> HistoryBuild | None:
    """:func:`build_history` for a caller that holds the run's writer lock (the train stage)."""
    started = time.perf_counter()
    _refuse_links(run_dir)
    checked = check_store(run_dir / STORE_NAME)
    checked.require_matrix("the pixel history covers")
    steps = covered_steps(checked)
    if steps < 1:
        return None
    final = run_dir / HISTORY_NAME
    for leftover in (STAGING, RETIRED):  # what a killed build left
        shutil.rmtree(run_dir / leftover, ignore_errors=True)
    try:
        current = open_history(run_dir, checked)
        if current.steps == steps:
            return HistoryBuild(steps, _size(final), time.perf_counter() - started, built=False)
    except StaleHistoryError as reason:
        log.debug("%s", reason)
    source = source_digest(checked, steps)
    staging = run_dir / STAGING
    with quiet_numcodecs():  # reading a compacted store
        _write_copy(checked, staging, steps, shard_steps)
    if source_digest(check_store(run_dir / STORE_NAME), steps) != source:
        shutil.rmtree(staging, ignore_errors=True)
        raise TrajectoryError(f"{run_dir}: the store changed while its pixel history was built; run it again")
    # The source last: a copy whose attribute says nothing is not one (marker last).
    group = zarr.open_group(staging, mode="r+")
    group.attrs["pixel_history"] = {"schema": HISTORY_SCHEMA, "schema_version": HISTORY_SCHEMA_VERSION,
                                    "steps": steps, "source": source}
    if final.exists():
        os.rename(final, run_dir / RETIRED)
    os.rename(staging, final)
    shutil.rmtree(run_dir / RETIRED, ignore_errors=True)
    build = HistoryBuild(steps, _size(final), time.perf_counter() - started, built=True)
    log.info("%s: pixel history of %s steps, %s bytes, in %.1f s", final, f"{steps:,}", f"{build.bytes:,}",
             build.seconds)
    return build


def index_trained_run(run_dir: Path, *, locked: bool) -> None:
    """The train stage's build, after a run is recorded (``locked``: the stage holds the
    run's writer lock): a failure is logged, not raised, since the copy is derived data and
    the run itself is complete; the viewer then reads the store."""
    try:
        if locked:
            build_history_locked(run_dir)
        else:
            build_history(run_dir)
    except (TrajectoryError, RunLockedError, OSError) as error:
        log.warning("%s: no pixel history built (%s); the viewer reads the store instead, slower on long runs; "
                    "build it later with: weightlapse index %s", run_dir, error, run_dir)


def _write_copy(checked, staging: Path, steps: int, shard_steps: int) -> None:
    weights = checked.array("weights")
    n_classes, n_pixels = weights.shape[1:]
    source = CheckedSteps(weights, str(checked.location), n_rows=steps)
    group = zarr.open_group(staging, mode="w", zarr_format=3)
    copy = group.create_array("weights", shape=(n_pixels, n_classes, steps), dtype="float32",
                              shards=(n_pixels, n_classes, min(shard_steps, steps)),
                              chunks=(1, n_classes, min(shard_steps, steps)), fill_value=np.nan,
                              dimension_names=HISTORY_DIMS,
                              compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")])
    for start in range(0, steps, shard_steps):
        stop = min(start + shard_steps, steps)
        shard = np.empty((n_pixels, n_classes, stop - start), np.float32)  # one shard: every weight's steps
        for at in range(start, stop, READ_STEPS):
            rows = source[at:min(at + READ_STEPS, stop)]  # (step, class, pixel)
            shard[:, :, at - start:at - start + len(rows)] = rows.transpose(2, 1, 0)
        copy[:, :, start:stop] = shard


def _run_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent if path.name == STORE_NAME else path


def _refuse_links(run_dir: Path) -> None:
    for path in (run_dir, run_dir / STORE_NAME, run_dir / HISTORY_NAME):
        if path.is_symlink():
            raise TrajectoryError(f"{path} is a symbolic link; a pixel history is built only in the run's own "
                                  "directory: use the directory it points to")
    if not (run_dir / STORE_NAME).is_dir():
        raise TrajectoryError(f"{run_dir}: no {STORE_NAME} here; train the run first (`dvc repro`)")


def _size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Copy a run's weights time-major beside its store "
                                     "(pixel-history.zarr), so the viewer's pixel inspector reads one weight over "
                                     "every step at once; safe to interrupt and run again")
    parser.add_argument("run_dir", nargs="+", help="run directories (runs/<run>) or their trajectory.zarr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = 0
    for run_dir in args.run_dir:
        try:
            build = build_history(run_dir)
        except (TrajectoryError, RunLockedError, OSError) as error:
            logging.getLogger("weightlapse").error("%s", error)
            failed += 1
            continue
        if build is None:
            print(f"{run_dir}: no complete chunk written yet; nothing to copy")
        else:
            print(f"{run_dir}: {build.steps:,} steps, {build.bytes:,} bytes, "
                  f"{'built' if build.built else 'already current'} in {build.seconds:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
