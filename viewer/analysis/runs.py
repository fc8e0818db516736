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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from weightlapse.pipeline.locations import Location, as_location
from weightlapse.pipeline.runlock import LOCK_NAME, is_being_written
from weightlapse.pipeline.store import (
    STORE_NAME,
    Progress,
    StoreBeingCreatedError,
    TrajectoryError,
    TrajectoryNotFoundError,
    check_store,
    refuse_link_out,
)
from weightlapse.viewer.analysis.network import NetworkRun
from weightlapse.viewer.analysis.run import Run

log = logging.getLogger(__name__)

# A run whose progress marker was updated this recently and is not finished is
# reported as "being written"; an older unfinished one as "unfinished" (stopped or killed).
WRITING_GRACE_S = 120
# Longest run name the viewer accepts; anything longer is not a run the pipeline wrote.
MAX_NAME_LENGTH = 200


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

    def fingerprint(self, name: str, *, listed: list[str] | None = None) -> tuple | None:
        """A cheap token that changes whenever :meth:`describe` may say something new about a
        local run (a few file stats and its lock); None for runs in object storage."""
        run_dir = self._path(name, listed)
        if not run_dir.local:
            return None
        token: list = []
        for relative in (f"{STORE_NAME}/zarr.json", f"{STORE_NAME}/weights/zarr.json", "metrics.json"):
            try:
                stat = os.stat(run_dir.local_path / relative)
                token.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
            except OSError:
                token.append(None)
        return (*token, writer_alive(run_dir))

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

    def group_members(self, group: str, *, least: int = 1) -> list[str]:
        """The runs of ``group`` in the runs index; ValueError, listing the groups, if it has
        fewer than ``least``."""
        index = self.index()
        names = list(index.index[index.group == group])
        if len(names) < least:
            groups = sorted(set(index.group) - {""})
            raise ValueError(f"group {group!r} has {len(names)} run(s); groups: {'; '.join(groups)}")
        return names

    def open(self, name: str) -> Run | NetworkRun:
        """The run called ``name``, opened once and shared (its chunk cache too): a
        :class:`Run` of softmax regression, or a :class:`NetworkRun` of a recorded network
        (schema version 2). A run whose store was created anew since (retrained) is read afresh,
        and one that became the other kind is opened as that kind."""
        path = self.location(name) / STORE_NAME
        with self._lock:
            run = self._open.get(name)
            if run is None:
                checked = check_store(path)
                kind = Run if checked.network is None else NetworkRun
                run = kind(name, path, checked=checked)
                self._open[name] = run
                return run
        try:
            run.refresh()
        except TrajectoryError:
            checked = check_store(path)
            if (checked.network is None) == isinstance(run, Run):
                raise
            with self._lock:
                self._open.pop(name, None)
            return self.open(name)
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
