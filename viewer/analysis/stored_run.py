"""What every run the viewer reads shares, whatever its store's schema: its location, the
store as last checked, and how a refresh tells new steps from a store created anew."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from weightlapse.pipeline.locations import Location, as_location
from weightlapse.pipeline.store import CheckedStore, Progress, check_store, recheck_store


class ChunkCache:
    """Decoded chunks of one store, the least recently used dropped past ``max_bytes`` (the
    newest is always kept). A run makes a new one whenever it takes in a store, so a block
    read from a store since replaced is put into a cache no longer in use. Not locked: the
    run's lock guards it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable, rows: int) -> np.ndarray | None:
        """The block of ``key`` if it holds at least ``rows`` rows (a finished run extended
        has more than when it was read), else None."""
        block = self._blocks.get(key)
        if block is None or len(block) < rows:
            return None
        self._blocks.move_to_end(key)
        return block

    def put(self, key: Hashable, block: np.ndarray) -> None:
        shorter = self._blocks.pop(key, None)  # a block read when the run had fewer rows
        self._bytes -= 0 if shorter is None else shorter.nbytes
        self._blocks[key] = block  # the newest, last to go
        self._bytes += block.nbytes
        while self._bytes > self.max_bytes and len(self._blocks) > 1:
            self._bytes -= self._blocks.popitem(last=False)[1].nbytes


class StoredRun:
    """A run's store, read lazily. Only steps up to the progress marker are ever read.

    :meth:`refresh` re-reads the marker of a run that is still being written, and reads the
    whole run afresh (``_load``) when its store was created anew (a run trained or recorded
    again): what a subclass caches belongs to the store it came from (:attr:`identity`),
    never to the run's name. ``generation`` counts those reloads, so a view can tell that
    what it shows is gone.
    """

    progress: Progress

    def __init__(self, name: str, store: str | Path | Location, *, checked: CheckedStore | None = None) -> None:
        """``checked``: the store as just checked (check_store), so it is not checked twice."""
        self.name = name
        self.store = as_location(store)
        self._lock = threading.Lock()
        self.generation = 0
        self._load(checked if checked is not None else check_store(self.store))

    def _load(self, checked: CheckedStore) -> None:
        """Take in a store as checked: set ``_checked``, ``identity`` and ``progress``, and drop every cache."""
        raise NotImplementedError

    def refresh(self) -> bool:
        """Re-read the progress marker (and the whole run if its store was created anew);
        True when what the run holds changed: new steps, or a new store."""
        checked = recheck_store(self._checked)
        before = self.progress
        # A marker that went back is a store written anew under the same identity (a network
        # store's is derived from its run, so a rerun stage recreates it): a chunk read
        # meanwhile may hold the new store's unwritten rows, so every cache goes.
        went_back = checked.progress.steps_done < before.steps_done or (before.finished
                                                                       and not checked.progress.finished)
        if checked.identity != self.identity or went_back:
            self._load(checked)
            self.generation += 1
            return True
        self._checked, self.progress = checked, checked.progress
        return checked.progress != before

    @property
    def last_step(self) -> int:
        """The newest valid step (-1 when none is written yet)."""
        return self.progress.steps_done

    @property
    def finished(self) -> bool:
        return self.progress.finished
