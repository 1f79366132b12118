"""Adapters kept in memory after first use: LRU, bounded in bytes, counted, thread-safe.

Reading an adapter (registry index, blob, validation, packing for the LoRA slots) costs
milliseconds; a hot user's next request should cost nothing. Two tiers, each an LRU bounded in
bytes: the host tier keeps what ``load`` returned (in host memory, pinned on CUDA so the copy up
is asynchronous), and, when the serving device is not the CPU, a device tier keeps a copy there
so a switch is a device-to-device copy. Concurrent misses on one key load it once: the other
callers wait for that load and count as hits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made, and what it holds now."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    device_entries: int = 0
    device_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class _Lru(Generic[V]):
    """An ordered map bounded in bytes; the caller holds the lock."""

    def __init__(self, max_bytes: int, nbytes: Callable[[V], int]):
        self.max_bytes = max_bytes
        self._nbytes = nbytes
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def get(self, key: Hashable) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self._nbytes(value)
        if key in self._items or size > self.max_bytes:  # too big to keep: served, not cached
            return
        while self.bytes + size > self.max_bytes:
            _, (_, freed) = self._items.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1
        self._items[key] = (value, size)
        self.bytes += size

    def __len__(self) -> int:
        return len(self._items)


class AdapterCache(Generic[V]):
    """A two-tier LRU cache of loaded adapters (or anything with a byte size).

    ``to_device`` (with ``device_max_bytes`` > 0) enables the device tier: a host-tier value is
    copied with it on first use and kept there as well.
    """

    def __init__(
        self,
        max_bytes: int,
        nbytes: Callable[[V], int],
        *,
        device_max_bytes: int = 0,
        to_device: Callable[[V], V] | None = None,
    ):
        self._host: _Lru[V] = _Lru(max_bytes, nbytes)
        self._device: _Lru[V] | None = _Lru(device_max_bytes, nbytes) if to_device and device_max_bytes > 0 else None
        self._to_device = to_device
        self._lock = threading.Lock()
        self._loading: dict[Hashable, Future] = {}
        self._hits = self._misses = 0

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        """The value for ``key``, calling ``load()`` (outside the lock, once per key at a time) on a miss."""
        with self._lock:
            if self._device is not None and (value := self._device.get(key)) is not None:
                self._hits += 1
                return value
            value = self._host.get(key)
            future = self._loading.get(key) if value is None else None
            owner = value is None and future is None
            if owner:
                future = self._loading[key] = Future()
                self._misses += 1
            else:
                self._hits += 1
        if owner:
            try:
                value = load()
            except BaseException as e:
                with self._lock:
                    del self._loading[key]
                future.set_exception(e)
                raise
            with self._lock:
                self._host.put(key, value)
                del self._loading[key]
            future.set_result(value)
        elif value is None:
            value = future.result()
        if self._device is None:
            return value
        on_device = self._to_device(value)
        with self._lock:
            self._device.put(key, on_device)
        return on_device

    def stats(self) -> CacheStats:
        with self._lock:
            device = self._device
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._host.evictions + (device.evictions if device else 0),
                entries=len(self._host),
                bytes=self._host.bytes,
                device_entries=len(device) if device else 0,
                device_bytes=device.bytes if device else 0,
            )
