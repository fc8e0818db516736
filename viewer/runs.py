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
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from pipeline.locations import Location, as_location
from pipeline.runlock import LOCK_NAME, is_being_written
from pipeline.trajectory import (
    IMAGE_SIDE,
    STORE_NAME,
    TrajectoryError,
    TrajectoryNotFoundError,
    dask_steps,
    open_store,
)

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
        """Where the listed run ``name`` lives (its run directory)."""
        return self._path(name)

    def describe(self, name: str, *, listed: list[str] | None = None) -> RunInfo:
        """The run's state, key params and final metrics; never raises for a bad store."""
        run_dir = self._path(name, listed)
        store = run_dir / STORE_NAME
        metrics = _read_metrics(run_dir / "metrics.json")
        if not store.exists():
            return RunInfo(name, "empty", f"no {STORE_NAME} yet: train it with `dvc repro`", metrics=metrics)
        try:
            group = open_store(store)
            meta = dict(group.attrs["weightlapse"])
            progress = _progress(group)
        except (TrajectoryError, KeyError, TypeError, ValueError) as error:
            return RunInfo(name, "broken", str(error) or type(error).__name__, metrics=metrics)
        params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
        dataset = meta.get("dataset", {}).get("name", "") if isinstance(meta.get("dataset"), dict) else ""
        state, message = _state(progress, writer_alive=writer_alive(run_dir))
        return RunInfo(name, state, message, steps_done=progress["steps_done"], n_steps=progress["n_steps"],
                       params=params, metrics=metrics if state == "finished" else {}, dataset=str(dataset))

    def list(self) -> list[RunInfo]:
        names = self.names()  # listed once, not once per run
        return [self.describe(name, listed=names) for name in names]

    def index(self, infos: list[RunInfo] | None = None) -> pd.DataFrame:
        """The runs index: one row per run (indexed by name) with its state, steps, dataset,
        the params in ``INDEX_PARAMS`` and its final metrics (``metric.*``, finished runs only).

        ``group`` names the runs that differ in seed alone (same dataset and every other
        param): the runs whose spread the cross-run analytics measure (viewer/compare.py).
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
        """The run called ``name``, opened once and shared (its chunk cache too)."""
        path = self._path(name) / STORE_NAME
        with self._lock:
            run = self._open.get(name)
            if run is None:
                run = Run(name, path)
                self._open[name] = run
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


def _read_metrics(path: Location) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _progress(group: zarr.Group) -> dict[str, Any]:
    progress = group.attrs.get("progress")
    if not isinstance(progress, dict):
        raise TrajectoryError("the store has no progress marker; it was not written by weightlapse")
    try:
        steps_done, n_steps = int(progress["steps_done"]), int(progress["n_steps"])
        evals_done = int(progress.get("evals_done", 0))
    except (KeyError, TypeError, ValueError):
        raise TrajectoryError(f"unreadable progress marker: {str(progress)[:200]}") from None
    if not -1 <= steps_done <= n_steps:
        raise TrajectoryError(f"progress marker says {steps_done} of {n_steps} steps, which cannot be")
    return {**progress, "steps_done": steps_done, "n_steps": n_steps, "evals_done": evals_done}


def _state(progress: dict[str, Any], *, writer_alive: bool | None = None) -> tuple[str, str]:
    """``writer_alive``: whether the train stage's writer lock is held, None when the run has no lock file."""
    if progress.get("finished"):
        return "finished", ""
    if progress.get("error"):
        return "failed", str(progress["error"])
    if writer_alive is False:  # its writer is gone: killed, or the machine went down
        if progress["steps_done"] < 0:
            return "unfinished", "stopped before its first steps were written"
        return "unfinished", f"stopped at step {progress['steps_done']} of {progress['n_steps']}"
    if writer_alive:
        return "being written", "" if progress["steps_done"] >= 0 else "no step written yet"
    if progress["steps_done"] < 0:
        return "empty", "no step written yet"
    # No lock file (a store written by other code): judge by the marker's age.
    try:
        updated = dt.datetime.fromisoformat(str(progress.get("updated")))
        age = (dt.datetime.now(dt.UTC) - updated).total_seconds()
    except (TypeError, ValueError):
        age = float("inf")
    if age <= WRITING_GRACE_S:
        return "being written", ""
    return "unfinished", f"stopped at step {progress['steps_done']} of {progress['n_steps']}"


class Run:
    """One run's store, read lazily: a step's weights cost one chunk decompression at most.

    Only steps up to the progress marker are ever read; :meth:`refresh` re-reads the marker
    of a run that is still being written.
    """

    def __init__(self, name: str, store: str | Path | Location) -> None:
        self.name = name
        self.store = as_location(store)
        group = open_store(store)
        self.meta: dict[str, Any] = dict(group.attrs["weightlapse"])
        try:
            self._weights = group["weights"]
            self._loss = group["loss"]
            self._eval_step = group["eval_step"]
            self._accuracy = group["heldout_accuracy"]
        except KeyError as error:
            raise TrajectoryError(f"{store}: array {error} is missing; the store is incomplete") from None
        if self._weights.ndim != 3 or self._weights.shape[2] != IMAGE_SIDE * IMAGE_SIDE:
            raise TrajectoryError(f"{store}: weights have shape {self._weights.shape}, expected (step, class, 784)")
        self.n_classes = int(self._weights.shape[1])
        self.chunk_steps = int(self._weights.chunks[0])
        self._group = group
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.progress: dict[str, Any] = {}
        self.refresh()

    # -- state --------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the progress marker; True when new steps became valid."""
        group = zarr.open_group(self._group.store, mode="r")
        before = self.progress.get("steps_done")
        self.progress = _progress(group)
        return self.progress["steps_done"] != before

    @property
    def last_step(self) -> int:
        """The newest valid step (-1 when none is written yet)."""
        return self.progress["steps_done"]

    @property
    def finished(self) -> bool:
        return bool(self.progress.get("finished"))

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("dataset", {}).get("class_names") if isinstance(self.meta.get("dataset"), dict) else None
        if isinstance(names, list) and len(names) == self.n_classes:
            return [str(name) for name in names]
        return [str(index) for index in range(self.n_classes)]

    # -- data ---------------------------------------------------------------------------
    def check_step(self, step: int) -> int:
        if not 0 <= step <= self.last_step:
            raise IndexError(f"step {step} is outside this run's valid steps 0..{self.last_step}")
        return step

    def weights_at(self, step: int) -> np.ndarray:
        """Weights after ``step`` optimizer steps, (class, pixel) float32, exactly as stored."""
        self.check_step(step)
        chunk, row = divmod(step, self.chunk_steps)
        return self._chunk(chunk)[row]

    def _chunk(self, chunk: int) -> np.ndarray:
        with self._lock:
            block = self._chunks.get(chunk)
            if block is not None:
                self._chunks.move_to_end(chunk)
                return block
        start = chunk * self.chunk_steps
        stop = min(start + self.chunk_steps, self.last_step + 1)
        try:
            block = self._weights[start:stop]  # (step, class, pixel): one chunk, one decompression
        except Exception as error:  # noqa: BLE001 - zarr/numcodecs raise many kinds for a corrupt chunk
            raise TrajectoryError(
                f"{self.store}: steps {start}..{stop - 1} cannot be read ({type(error).__name__}: {error}); "
                "the store is damaged: retrain the run (`dvc repro`)"
            ) from None
        if stop - start == self.chunk_steps:
            # Only complete chunks are cached: the chunk at the frontier of a run being
            # written still changes.
            with self._lock:
                self._chunks[chunk] = block
                while len(self._chunks) > CHUNK_CACHE_SIZE:
                    self._chunks.popitem(last=False)
        return block

    def weights(self, start: int = 0, stop: int | None = None) -> da.Array:
        """Weights of steps ``start..stop`` (inclusive) as a lazy dask array (step, class, pixel)."""
        stop = self.last_step if stop is None else stop
        self.check_step(start)
        self.check_step(stop)
        if stop < start:
            raise ValueError(f"step range {start}..{stop} is empty: the first step must not be after the last")
        return dask_steps(self._weights)[start:stop + 1]

    def loss(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, training batch loss) over the valid steps; step 0 has no loss and is left out."""
        n = self.last_step + 1
        values = self._loss[1:n] if n > 1 else np.empty(0, np.float32)
        return np.arange(1, max(n, 1)), np.asarray(values)

    def accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        """(eval steps, held-out accuracy) of the evaluations done so far."""
        n = int(self.progress.get("evals_done", 0))
        return np.asarray(self._eval_step[:n]), np.asarray(self._accuracy[:n])


def main(argv: list[str] | None = None) -> int:
    """``python -m viewer.runs [RUNS_DIR] [--csv FILE]``: print the runs index (or write it as CSV)."""
    import argparse

    parser = argparse.ArgumentParser(description="The runs index: each run's state, params and final metrics")
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
