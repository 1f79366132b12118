import threading
import time

import pytest

from gen.adapter_cache import AdapterCache


class Blob:
    def __init__(self, name, size, where="host"):
        self.name, self.size, self.where = name, size, where

    def nbytes(self):
        return self.size


def test_lru_bounded_in_bytes_with_counters():
    cache = AdapterCache(100, Blob.nbytes)
    loads = []

    def get(name, size=40):
        return cache.get(name, lambda: loads.append(name) or Blob(name, size))

    get("a"), get("b"), get("a")  # a is now the most recent
    get("c")  # 120 bytes > 100: evicts b, the least recent
    get("a"), get("b")
    assert loads == ["a", "b", "c", "b"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (2, 4, 2)
    assert stats.entries == 2 and stats.bytes == 80 and stats.hit_rate == pytest.approx(2 / 6)


def test_a_value_larger_than_the_cache_is_served_but_not_kept():
    cache = AdapterCache(100, Blob.nbytes)
    assert cache.get("big", lambda: Blob("big", 500)).name == "big"
    assert cache.stats().entries == 0


def test_a_failed_load_is_not_cached():
    cache = AdapterCache(100, Blob.nbytes)
    with pytest.raises(KeyError):
        cache.get("x", lambda: {}["missing"])
    assert cache.get("x", lambda: Blob("x", 1)).name == "x"


def test_concurrent_misses_on_one_key_load_once():
    cache = AdapterCache(100, Blob.nbytes)
    calls = []

    def slow_load():
        calls.append(1)
        time.sleep(0.2)
        return Blob("x", 10)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("x", slow_load))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1
    assert (cache.stats().misses, cache.stats().hits) == (1, 7)


def test_device_tier_keeps_a_copy_on_the_device():
    copies = []

    def to_device(blob):
        copies.append(blob.name)
        return Blob(blob.name, blob.size, "device")

    cache = AdapterCache(100, Blob.nbytes, device_max_bytes=50, to_device=to_device)
    assert cache.get("a", lambda: Blob("a", 30)).where == "device"
    assert cache.get("a", lambda: Blob("a", 30)).where == "device"
    cache.get("b", lambda: Blob("b", 30))  # evicts a from the device tier only
    assert cache.get("a", lambda: Blob("a", 30)).where == "device"
    assert copies == ["a", "b", "a"]  # a came back up from the host tier, not from its source
    stats = cache.stats()
    assert (stats.misses, stats.hits, stats.entries, stats.device_entries, stats.device_bytes) == (2, 2, 2, 1, 30)
