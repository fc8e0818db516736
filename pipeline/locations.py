"""Where runs live: a local directory (the default) or an fsspec URL such as ``s3://bucket/runs``.

A :class:`Location` names a directory and opens what is in it: file text, the directory
names below it, and Zarr stores, read-only when remote. Object stores are reached through
fsspec, so whatever fsspec can open works (``s3://`` with s3fs, ``gs://`` with gcsfs,
``memory://`` for tests). Credentials and endpoints come from ``storage_options`` or the
usual places: AWS's environment variables and config files for S3, and fsspec's
``FSSPEC_S3_ENDPOINT_URL``-style variables for any protocol's options.

Training writes runs locally (its writer needs atomic renames, which object stores lack);
:func:`publish_run` then copies a run to any location, data first and its progress
marker last, so a reader of the copy never sees a step the marker does not cover.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import zarr
import zarr.storage

LOCAL_PROTOCOLS = ("file", "local")


class LocationError(OSError):
    """A runs location cannot be reached or read."""


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names a non-local fsspec location (``s3://...``), not a path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


class Location:
    """A directory named by a path or an fsspec URL, with the fsspec options to reach it."""

    def __init__(self, location: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        text = os.fspath(location)
        if is_url(text):
            self.url = text.rstrip("/")
            try:
                self.fs, self.path = fsspec.core.url_to_fs(self.url, **self.storage_options)
            except (ImportError, ValueError) as error:
                protocol = self.url.split("://")[0]
                raise LocationError(f"{self.url}: cannot open {protocol}:// locations ({error}); install the "
                                    f"fsspec driver for it (s3fs for s3://, gcsfs for gs://)") from None
        else:
            local = Path(text.removeprefix("file://")).expanduser()
            self.url, self.fs, self.path = str(local), fsspec.filesystem("file"), str(local)

    @property
    def local(self) -> bool:
        protocol = self.fs.protocol
        return (protocol if isinstance(protocol, str) else protocol[0]) in LOCAL_PROTOCOLS

    @property
    def local_path(self) -> Path:
        if not self.local:
            raise LocationError(f"{self.url} is not on this machine's file system")
        return Path(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, name: str) -> Location:
        child = Location.__new__(Location)
        child.storage_options, child.fs = self.storage_options, self.fs
        child.url, child.path = f"{self.url}/{name}", f"{self.path.rstrip('/')}/{name}"
        if self.local:
            child.url = str(Path(self.path) / name)
        return child

    def __truediv__(self, name: str) -> Location:
        return self.join(name)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    # -- reading -----------------------------------------------------------------------------
    def exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.path))
        except OSError:
            return False

    def is_dir(self) -> bool:
        try:
            return bool(self.fs.isdir(self.path))
        except OSError:
            return False

    def read_text(self) -> str:
        with self.fs.open(self.path, "r", encoding="utf-8") as file:
            return file.read()

    def directory_names(self) -> list[str]:
        """Names of the directories directly inside this one (in object stores: prefixes)."""
        if self.local:
            raise LocationError("local directories are listed with their own checks (viewer.runs)")
        self.fs.invalidate_cache(self.path)  # a listing must show runs added since the last one
        entries = self.fs.ls(self.path, detail=True)
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries
                      if entry.get("type") == "directory")

    def put_file(self, source: Path) -> None:
        """Copy the local file ``source`` to this location."""
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.fs.put_file(str(source), self.path)

    def zarr_store(self, *, read_only: bool = True) -> Path | zarr.storage.StoreLike:
        """What ``zarr.open_group`` and ``xarray.open_zarr`` take for the store at this location."""
        if self.local:
            return Path(self.path)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options or None,
                                                 read_only=read_only)


# Written into the attributes of what `viewer.stats` and `viewer.compare` write, so that a
# later run of them may replace it, and nothing else.
OUTPUT_MARK = "weightlapse_output"


def check_output_target(out: str | Path, *, inputs: list[str | Path | Location], kind: str) -> None:
    """Refuse to write a Zarr output (``kind``: "change-statistics", "comparison") where it would
    destroy something: over or inside an input run (or runs directory), or over any existing
    path that is not an earlier output of the same kind. Raises FileExistsError."""
    if is_url(out):
        return  # object storage: nothing there is deleted by a write of fresh keys
    target = Path(out).expanduser().resolve()
    for given in inputs:
        location = as_location(given)
        if not location.local:
            continue
        source = location.local_path.expanduser().resolve()
        if target == source or source in target.parents or target in source.parents:
            raise FileExistsError(f"--out {out}: that is {'inside ' if source in target.parents else ''}"
                                  f"{source}, which this command reads; writing there would destroy it: "
                                  "choose a path outside the runs")
    if not os.path.lexists(target):
        return
    try:
        attrs = zarr.open_group(target, mode="r").attrs.asdict()
    except Exception:  # noqa: BLE001 - not a Zarr group at all
        attrs = {}
    if attrs.get(OUTPUT_MARK) != kind:
        raise FileExistsError(f"--out {out} already exists and is not an earlier {kind} output of weightlapse; "
                              "it would be deleted: choose a new path, or remove it yourself first")


def as_location(location: str | Path | Location, storage_options: dict[str, Any] | None = None) -> Location:
    return location if isinstance(location, Location) else Location(location, storage_options)


def publish_run(run_dir: str | Path, target: str | Path | Location,
                storage_options: dict[str, Any] | None = None) -> Location:
    """Copy a run directory (its store, metrics and history) to ``target``, e.g. ``s3://bucket/runs/NAME``.

    The group's own ``zarr.json``, which holds the progress marker, goes last: a reader
    of the copy sees either no run or every row the marker covers. A run being trained is
    refused, since its store changes under the copy; publish it when its stage is done.
    """
    from weightlapse.pipeline.runlock import RunLockedError, exclusive_writer

    run_dir = Path(run_dir)
    if not (run_dir / "trajectory.zarr").is_dir():
        raise FileNotFoundError(f"{run_dir}: no trajectory.zarr here; train the run first (`dvc repro`)")
    destination = as_location(target, storage_options)
    try:
        with exclusive_writer(run_dir):
            links = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_symlink())
            if links:
                raise LocationError(f"{run_dir}: {links[0]} is a symbolic link; a run is published only from files "
                                    "inside its own directory: replace the link by the file itself")
            # dot-named files and folders are work in progress (a chunk being written, an
            # interrupted compaction's staging folder), never part of the run
            files = sorted(path for path in run_dir.rglob("*") if path.is_file() and not path.name.endswith(".partial")
                           and not any(part.startswith(".") for part in path.relative_to(run_dir).parts))
            marker = run_dir / "trajectory.zarr" / "zarr.json"
            for path in [path for path in files if path != marker] + [marker]:
                relative = path.relative_to(run_dir).as_posix()
                (destination / relative).put_file(path)
    except RunLockedError as error:
        raise RunLockedError(f"{run_dir} is being trained ({error}); publish it once its stage has finished") from None
    return destination
