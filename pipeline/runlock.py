"""One writer per run directory: an advisory lock that the operating system releases when its holder dies.

Two processes appending to one store would interleave rows and progress markers. That
happens when a stage is started by hand while `dvc repro` runs it, or when `dvc` dies and
leaves its stage running. The train stage holds ``runs/<run>/.writer.lock`` (``flock``)
for as long as it writes. A second writer fails at once and names the first. A killed
writer's lock goes away with its process, so a crash never leaves a run locked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".writer.lock"
# Lock files this process holds. A forked child (the trajectory's store writer) inherits
# them, and an inherited copy would keep the lock after this process died.
_held_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_fds:
        os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLockedError(RuntimeError):
    """Another live process is writing this run."""


@contextlib.contextmanager
def exclusive_writer(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's writer lock for the duration of the block, or raise RunLockedError."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The file is never deleted: unlinking a lock file lets a third process lock a fresh
    # file while a second still holds the old one.
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise RunLockedError(f"{run_dir / LOCK_NAME} is a symbolic link; the writer lock is never written through "
                             "a link: remove the link and run again") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{run_dir}: {_describe_holder(fd)} is writing this run. Two writers would mix their "
                "steps in one store: wait for it to finish, or stop it first"
            ) from None
        _held_fds.add(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        _held_fds.discard(fd)
        os.close(fd)


def is_being_written(run_dir: str | Path) -> bool:
    """Whether a live process holds the run's writer lock (False if it never had one)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a shared lock we may have taken
    return False


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"process {int(holder['pid'])} on {holder['host']} (since {holder['since']}: "
                f"{holder['command'][:200]})")
    except (ValueError, KeyError, TypeError, OSError):
        return "another process"
