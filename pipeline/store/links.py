"""Reading a run's files only from inside its own directory: a symbolic link on the way is
refused with a :class:`TrajectoryError`, never followed (a planted link could show another
user's files, or a DVC cache's, as this run's). Writing without following links is
:mod:`weightlapse.pipeline.run_files`'s.

The store is checked when it is opened (:func:`refuse_links`), and every chunk is read
through :class:`NoFollowStore`, which opens each part of its path without following a link:
a link planted after the check (while the viewer has the run open) is refused too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from weightlapse.pipeline.store.format import TrajectoryError


def refuse_links(root: str | os.PathLike, relative: str, *, missing: str | None = None,
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


class NoFollowStore(LocalStore):
    """A read-only local Zarr store whose reads never follow a symbolic link below its root."""

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root, read_only=True)

    async def get(self, key: str, prototype: BufferPrototype | None = None, byte_range=None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        try:
            return _read_inside(self.root, key, prototype or default_buffer_prototype(), byte_range)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def _read_inside(root: Path, key: str, prototype: BufferPrototype, byte_range) -> Buffer:
    """The bytes of ``root/key``, each directory on the way and the file opened without following a link."""
    parts = key.split("/")
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = _open_part(part, directory, key, os.O_RDONLY | os.O_DIRECTORY)
            os.close(directory)
            directory = inner
        descriptor = _open_part(parts[-1], directory, key, os.O_RDONLY)
    finally:
        os.close(directory)
    with os.fdopen(descriptor, "rb") as file:
        if isinstance(byte_range, RangeByteRequest):
            file.seek(byte_range.start)
            return prototype.buffer.from_bytes(file.read(byte_range.end - byte_range.start))
        if isinstance(byte_range, OffsetByteRequest):
            file.seek(byte_range.offset)
        elif isinstance(byte_range, SuffixByteRequest):
            file.seek(max(0, file.seek(0, os.SEEK_END) - byte_range.suffix))
        return prototype.buffer.from_bytes(file.read())


def _open_part(part: str, directory: int, key: str, flags: int) -> int:
    if part in ("", ".", ".."):
        raise FileNotFoundError(key)
    try:
        return os.open(part, flags | os.O_NOFOLLOW, dir_fd=directory)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK) or (error.errno == errno.ENOTDIR and _is_link(part, directory)):
            raise OSError(f"{key}: {part} is a symbolic link; a run is read only from files inside its own "
                          "directory") from None
        raise


def _is_link(part: str, directory: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(part, dir_fd=directory).st_mode)
    except OSError:
        return False
