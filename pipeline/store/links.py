"""Reading a run's files only from inside its own directory: a symbolic link on the way is
refused with a :class:`TrajectoryError`, never followed (a planted link could show another
user's files, or a DVC cache's, as this run's). Writing without following links is
:mod:`weightlapse.pipeline.run_files`'s.
"""

from __future__ import annotations

import os
import stat

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
