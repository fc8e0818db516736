"""Writing a run directory's own files without ever following a symbolic link out of it.

A run directory can hold links nobody meant to be written through: a `metrics.json`
linked to a user's file, a store that DVC checked out as a link into its cache, a planted
`loss.csv -> ~/.bashrc`. Writing through such a link would change the file it points to.
So the files of a run are replaced, never written through: a link in their place is
removed (the link, not what it points to) and a new file is made in the run directory.
Reading a run refuses links the same way (:mod:`weightlapse.pipeline.store.links`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO


def drop_link(path: Path) -> None:
    """Remove ``path`` if it is a symbolic link (only the link), so a new file takes its place."""
    if path.is_symlink():
        path.unlink()


def open_new(path: Path, mode: str = "w", **options) -> IO:
    """Open ``path`` for writing from scratch, never through a link (O_NOFOLLOW)."""
    drop_link(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, mode, **options)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` as a new file, atomically: a temporary file in its directory, then a
    rename, which replaces a link rather than following it."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def links_in(path: Path) -> list[str]:
    """Symbolic links at or below ``path`` (not followed), relative to it: what a writer
    carrying on in ``path`` would write through."""
    if path.is_symlink():
        return ["."]
    found = []
    for directory, subdirectories, files in os.walk(path):
        found += [os.path.relpath(os.path.join(directory, name), path) for name in subdirectories + files
                  if os.path.islink(os.path.join(directory, name))]
    return found
