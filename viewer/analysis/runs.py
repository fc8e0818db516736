"""Find the runs under a runs location and read their weights fast enough to replay them.

A runs location is a local directory (``runs/``) or an fsspec URL (``s3://bucket/runs``;
see pipeline/locations.py). :meth:`RunCatalog.index` is the runs index that the viewer and
research scripts share: one row per run with its state, params and metrics.

The only paths this module opens are entries it listed itself: a run is asked for by
name, and a name that is not one of the listed directories is refused before anything
touches the disk. So no string from a URL or a widget can reach a file outside the runs
directory (``../``, absolute paths, symlinks pointing out of it are all refused).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd

from weightlapse.pipeline.locations import Location, as_location
from weightlapse.pipeline.runlock import LOCK_NAME, is_being_written
from weightlapse.pipeline.store import (
    STORE_NAME,
    CheckedStore,
    Progress,
    StoreBeingCreatedError,
    TrajectoryError,
    TrajectoryNotFoundError,
    check_store,
    damaged,
    dask_steps,
    read_identity,
    recheck_store,
    refuse_link_out,
)

log = logging.getLogger(__name__)

# A run whose progress marker was updated this recently and is not finished is
# reported as "being written"; an older unfinished one as "unfinished" (stopped or killed).
WRITING_GRACE_S = 120
# Longest run name the viewer accepts; anything longer is not a run the pipeline wrote.
MAX_NAME_LENGTH = 200
# Decoded chunks kept per open run (each ~2 MB at 64 steps): enough for smooth playback
# forwards and backwards without re-decompressing.
CHUNK_CACHE_SIZE = 8


class RunNotFoundError(TrajectoryNotFoundError):
    """The name is not a run listed in the runs directory."""


@dataclass(frozen=True)
class RunInfo:
    """What the run picker shows about one run directory."""

    name: str
    state: str                        # finished | being written | unfinished | failed | empty | broken
    message: str = ""                 # why a run is broken or failed, in words
    steps_done: int = -1
    n_steps: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""

    @property
    def readable(self) -> bool:
        return self.state not in ("broken", "empty")


# The params a runs index shows as columns, in this order (all of a run's params are in RunInfo.params).
INDEX_PARAMS = ("optimizer", "lr", "batch_size", "seed", "epochs", "momentum", "weight_decay", "bias", "engine")


class RunCatalog:
    """The runs directory: lists run directories and opens them by name only.

    ``runs_dir``: a local directory or an fsspec URL such as ``s3://bucket/runs``, reached
    with ``storage_options`` (credentials, ``endpoint_url``, ...).
    """

    def __init__(self, runs_dir: str | Path | Location, storage_options: dict[str, Any] | None = None) -> None:
        self.runs_dir = as_location(runs_dir, storage_options)
        self._open: dict[str, Run] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Run directory names, sorted; entries that resolve outside the runs directory are skipped."""
        if not self.runs_dir.local:
            try:
                listed = self.runs_dir.directory_names()
            except (OSError, ValueError):
                return []
            return [name for name in listed if not name.startswith(".") and len(name) <= MAX_NAME_LENGTH]
        try:
            root = self.runs_dir.local_path.resolve(strict=True)
            entries = list(root.iterdir())
        except OSError:
            return []
        names = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or len(name) > MAX_NAME_LENGTH:
                continue
            try:
                inside = entry.resolve(strict=True).parent == root and entry.is_dir()
            except OSError:
                continue
            if inside:
                names.append(name)
        return sorted(names)

    def _path(self, name: object, listed: list[str] | None = None) -> Location:
        # The name must be one of the listed entries, compared as a string: it is never
        # joined to a path before this check passes.
        if not isinstance(name, str) or name not in (self.names() if listed is None else listed):
            raise RunNotFoundError(f"no run named {str(name)[:80]!r} in {self.runs_dir}")
        if self.runs_dir.local:
            return Location(self.runs_dir.local_path.resolve() / name)
        return self.runs_dir / name

    def location(self, name: str) -> Location:
        """Where the listed run ``name`` lives (its run directory), if its store lies inside it."""
        run_dir = self._path(name)
        if run_dir.local:
            refuse_link_out(run_dir.local_path, STORE_NAME)
        return run_dir

    def describe(self, name: str, *, listed: list[str] | None = None) -> RunInfo:
        """The run's state, key params and final metrics; never raises for a bad store.

        Each run is described on its own: whatever is wrong with one (a damaged store, a
        marker that cannot be, an unreadable file) makes it "broken" with the reason, and
        never stops the others from being listed.
        """
        run_dir = self._path(name, listed)
        try:
            return self._describe(name, run_dir)
        except TrajectoryError as error:
            return RunInfo(name, "broken", str(error) or type(error).__name__)
        except Exception as error:  # noqa: BLE001 - one bad run must not take the runs index down
            log.warning("run %r could not be described: %s: %s", name[:80], type(error).__name__, error)
            return RunInfo(name, "broken", f"cannot be read ({type(error).__name__}: {str(error)[:300]})")

    def _describe(self, name: str, run_dir: Location) -> RunInfo:
        store = run_dir / STORE_NAME
        if run_dir.local:
            refuse_link_out(run_dir.local_path, STORE_NAME)
        metrics = read_metrics(run_dir)
        if not store.exists():
            return RunInfo(name, "empty", f"no {STORE_NAME} yet: train it with `dvc repro`", metrics=metrics)
        try:
            checked = check_store(store)
        except StoreBeingCreatedError:
            alive = writer_alive(run_dir)
            if alive is False:
                return RunInfo(name, "unfinished", "stopped while its store was being created: train it again")
            return RunInfo(name, "being written" if alive else "empty", "its store is being created")
        metadata, progress = checked.metadata, checked.progress
        state, message = _state(progress, writer_alive=writer_alive(run_dir))
        return RunInfo(name, state, message, steps_done=progress.steps_done, n_steps=progress.n_steps,
                       params=metadata.params, metrics=metrics if state == "finished" else {},
                       dataset=metadata.dataset)

    def list(self) -> list[RunInfo]:
        names = self.names()  # listed once, not once per run
        return [self.describe(name, listed=names) for name in names]

    def index(self, infos: list[RunInfo] | None = None) -> pd.DataFrame:
        """The runs index: one row per run (indexed by name) with its state, steps, dataset,
        the params in ``INDEX_PARAMS`` and its final metrics (``metric.*``, finished runs only).

        ``group`` names the runs that differ in seed alone (same dataset and every other
        param): the runs whose spread the cross-run analytics measure (viewer/analysis/compare.py).
        ``infos``: the runs as :meth:`list` just gave them, to save listing them again.
        """
        rows = []
        for info in self.list() if infos is None else infos:
            row = {"name": info.name, "state": info.state, "steps_done": info.steps_done, "n_steps": info.n_steps,
                   "dataset": info.dataset}
            row.update({key: info.params.get(key) for key in INDEX_PARAMS})
            row.update({f"metric.{key}": value for key, value in info.metrics.items()})
            row["group"] = seed_group(info) if info.readable else ""
            rows.append(row)
        columns = ["name", "state", "steps_done", "n_steps", "dataset", *INDEX_PARAMS, "group"]
        return pd.DataFrame(rows, columns=list(dict.fromkeys(columns + [k for r in rows for k in r]))).set_index("name")

    def open(self, name: str) -> Run:
        """The run called ``name``, opened once and shared (its chunk cache too); a run whose
        store was created anew since (retrained) is read afresh."""
        path = self.location(name) / STORE_NAME
        with self._lock:
            run = self._open.get(name)
            if run is None:
                run = Run(name, path)
                self._open[name] = run
                return run
        run.refresh()
        return run


def seed_group(info: RunInfo) -> str:
    """A label shared by the runs that differ only in their seed, e.g. ``mnist adam lr=0.001 b=20``."""
    params = {key: value for key, value in info.params.items() if key not in ("seed", "device", "engine")}
    if not params:
        return ""
    shown = " ".join(f"{key}={params[key]}" for key in ("lr", "batch_size", "epochs") if key in params)
    rest = {key: params[key] for key in sorted(params) if key not in ("optimizer", "lr", "batch_size", "epochs")}
    # Two groups that differ elsewhere (momentum, capture options, ...) must not share a label.
    digest = hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:6] if rest else ""
    return " ".join(part for part in (info.dataset, str(params.get("optimizer", "")), shown, digest) if part)


def writer_alive(run_dir: Location) -> bool | None:
    """Whether the train stage is writing this run now; None for a run written without its lock
    (and for runs in object storage, whose writers hold no lock there)."""
    if not run_dir.local or not (run_dir.local_path / LOCK_NAME).exists():
        return None
    return is_being_written(run_dir.local_path)


# metrics.json is a few hundred bytes; anything much bigger is not ours.
MAX_METRICS_BYTES = 64 * 2**10


def read_metrics(run_dir: Location) -> dict[str, Any]:
    """The run's metrics.json, or {} when it is missing, unreadable, a symbolic link or not ours."""
    path = run_dir / "metrics.json"
    try:
        if run_dir.local:
            refuse_link_out(run_dir.local_path, "metrics.json")  # a TrajectoryError: a ValueError
            if os.path.getsize(path.local_path) > MAX_METRICS_BYTES:
                return {}
        metrics = json.loads(path.read_text()[:MAX_METRICS_BYTES])
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(metrics, dict):
        return {}
    # Only numbers: a metric is shown, compared and summed.
    return {str(key)[:100]: value for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _state(progress: Progress, *, writer_alive: bool | None = None) -> tuple[str, str]:
    """``writer_alive``: whether the train stage's writer lock is held, None when the run has no lock file."""
    if progress.finished:
        return "finished", ""
    if progress.error:
        return "failed", progress.error
    if writer_alive is False:  # its writer is gone: killed, or the machine went down
        if progress.steps_done < 0:
            return "unfinished", "stopped before its first steps were written"
        return "unfinished", f"stopped at step {progress.steps_done} of {progress.n_steps}"
    if writer_alive:
        return "being written", "" if progress.steps_done >= 0 else "no step written yet"
    if progress.steps_done < 0:
        return "empty", "no step written yet"
    # No lock file (a store written by other code): judge by the marker's age.
    try:
        updated = dt.datetime.fromisoformat(str(progress.updated))
        age = (dt.datetime.now(dt.UTC) - updated).total_seconds()
    except (TypeError, ValueError, OverflowError):
        age = float("inf")
    if age <= WRITING_GRACE_S:
        return "being written", ""
    return "unfinished", f"stopped at step {progress.steps_done} of {progress.n_steps}"


class Run:
    """One run's store, read lazily: a step's weights cost one chunk decompression at most.

    Only steps up to the progress marker are ever read. :meth:`refresh` re-reads the marker
    of a run that is still being written, and reads the whole run afresh when its store was
    created anew (a retrained run): cached chunks belong to the store they came from
    (:attr:`identity`), never to the run's name. ``generation`` counts those reloads, so
    a view can tell that what it shows is gone.
    """

    def __init__(self, name: str, store: str | Path | Location) -> None:
        self.name = name
        self.store = as_location(store)
        self._lock = threading.Lock()
        self.generation = 0
        self._load(check_store(self.store))

    def _load(self, checked: CheckedStore) -> None:
        weights = checked.array("weights")
        with self._lock:
            self._checked = checked
            self.identity = checked.identity
            self.metadata = checked.metadata
            self.meta: dict[str, Any] = checked.meta
            self._weights = weights
            self._loss = checked.array("loss")
            self._eval_step = checked.array("eval_step")
            self._accuracy = checked.array("heldout_accuracy")
            self.n_classes = int(weights.shape[1])
            self.chunk_steps = int(weights.chunks[0])
            self.progress: Progress = checked.progress
            self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- state --------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the progress marker (and the whole run if its store was created anew);
        True when what the run holds changed: new steps, or a new store."""
        checked = recheck_store(self._checked)
        if checked.identity != self.identity:
            self._load(checked)
            self.generation += 1
            return True
        before = self.progress
        self._checked, self.progress = checked, checked.progress
        return checked.progress != before

    def _check_current(self) -> None:
        """Before serving a step from memory: a local store replaced since is read afresh
        (one stat); object storage is checked at :meth:`refresh`."""
        if self.store.local and read_identity(self.store) != self.identity:
            self.refresh()

    @property
    def last_step(self) -> int:
        """The newest valid step (-1 when none is written yet)."""
        return self.progress.steps_done

    @property
    def finished(self) -> bool:
        return self.progress.finished

    @property
    def class_names(self) -> list[str]:
        names = self.metadata.class_names
        return list(names) if names else [str(index) for index in range(self.n_classes)]

    # -- data ---------------------------------------------------------------------------
    def check_step(self, step: int) -> int:
        if not 0 <= step <= self.last_step:
            raise IndexError(f"step {step} is outside this run's valid steps 0..{self.last_step}")
        return step

    def weights_at(self, step: int) -> np.ndarray:
        """Weights after ``step`` optimizer steps, (class, pixel) float32, exactly as stored."""
        self._check_current()
        self.check_step(step)
        chunk, row = divmod(step, self.chunk_steps)
        return self._chunk(chunk)[row]

    def _chunk(self, chunk: int) -> np.ndarray:
        with self._lock:
            block = self._chunks.get(chunk)
            if block is not None:
                self._chunks.move_to_end(chunk)
                return block
            identity, weights, cache = self.identity, self._weights, self._chunks
        start = chunk * self.chunk_steps
        stop = min(start + self.chunk_steps, self.last_step + 1)
        try:
            block = weights[start:stop]  # (step, class, pixel): one chunk, one decompression
        except Exception as error:  # noqa: BLE001 - zarr/numcodecs raise many kinds for a corrupt chunk
            raise damaged(str(self.store), slice(start, stop), f"{type(error).__name__}: {str(error)[:200]}") from None
        if not np.isfinite(block).all():
            # A chunk file that went missing reads as NaN, as does a store replaced under us.
            if self.store.local and read_identity(self.store) != identity:
                raise TrajectoryError(f"{self.store}: the run was replaced while step {start} was read; read it again")
            raise damaged(str(self.store), slice(start, stop), "it holds values that are not finite (NaN or infinite)")
        if stop - start == self.chunk_steps:
            # Only complete chunks are cached: the chunk at the frontier of a run being
            # written still changes.
            with self._lock:
                if cache is self._chunks:  # not a chunk of a store replaced meanwhile
                    cache[chunk] = block
                    while len(cache) > CHUNK_CACHE_SIZE:
                        cache.popitem(last=False)
        return block

    def weights(self, start: int = 0, stop: int | None = None) -> da.Array:
        """Weights of steps ``start..stop`` (inclusive) as a lazy dask array (step, class, pixel)."""
        stop = self.last_step if stop is None else stop
        self.check_step(start)
        self.check_step(stop)
        if stop < start:
            raise ValueError(f"step range {start}..{stop} is empty: the first step must not be after the last")
        return dask_steps(self._weights, n_rows=self.last_step + 1, where=str(self.store))[start:stop + 1]

    def loss(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, training batch loss) over the valid steps; step 0 has no loss and is left out."""
        n = self.last_step + 1
        values = self._read(self._loss, 1, n) if n > 1 else np.empty(0, np.float32)
        return np.arange(1, max(n, 1)), np.asarray(values)

    def accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        """(eval steps, held-out accuracy) of the evaluations done so far."""
        n = self.progress.evals_done
        return np.asarray(self._read(self._eval_step, 0, n)), np.asarray(self._read(self._accuracy, 0, n))

    def _read(self, array, start: int, stop: int) -> np.ndarray:
        try:
            return array[start:stop]
        except Exception as error:  # noqa: BLE001
            raise damaged(f"{self.store} ({array.basename})", slice(start, stop),
                          f"{type(error).__name__}: {str(error)[:200]}") from None


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """``python -m weightlapse.viewer.analysis.runs [RUNS_DIR] [--csv FILE]``: print the runs index
    (or write it as CSV)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog,
                                     description="The runs index: each run's state, params and final metrics")
    parser.add_argument("runs_dir", nargs="?", default="runs", help="a runs directory or an fsspec URL (default runs/)")
    parser.add_argument("--csv", help="write the index to this CSV file instead of printing it")
    args = parser.parse_args(argv)
    index = RunCatalog(args.runs_dir).index()
    if args.csv:
        index.to_csv(args.csv)
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
            print(index if len(index) else f"no runs in {args.runs_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
