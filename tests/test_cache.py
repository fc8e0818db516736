"""The data stores' result cache (viewer/cache.py): bounded, the least recently stored dropped first."""

from weightlapse.viewer.cache import BoundedCache


def test_the_oldest_stored_entry_goes_first_and_storing_again_makes_it_new():
    cache = BoundedCache(size=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)   # stored again: now the newest
    cache.put("c", 4)
    assert dict(cache) == {"a": 3, "c": 4}
    assert cache.get("b") is None
