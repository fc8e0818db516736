"""A small cache of the newest results: the data stores' computed charts, statistics and comparisons.

Each is keyed by what it was computed from (the stores' identities, the steps, the choices),
so an entry is never stale, only old; the oldest stored goes first.
"""

from __future__ import annotations

from collections import OrderedDict

CACHE_SIZE = 16  # results of one kind kept: a page's recent choices, with room for several pages


class BoundedCache(OrderedDict):
    """Up to ``size`` entries, the least recently stored dropped first."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
