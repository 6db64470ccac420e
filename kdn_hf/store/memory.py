"""MemoryTier: an in-process LRU of encoded entries under a byte budget.

The fastest tier and the one to put in front of a disk or remote tier. It
holds ``bytes`` (encoded entries), so a hit still pays one decode; it is
private to the process and empty after a restart. Thread-safe: one lock
guards the OrderedDict (least recently used first) and the counters.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Iterator

from kdn_hf.store.base import StorageTier, TierStats, check_budget, check_key, check_value


class MemoryTier(StorageTier):
    """LRU dict of ``key -> bytes`` holding at most ``byte_budget`` bytes of values."""

    name = "memory"

    def __init__(self, byte_budget: int) -> None:
        self.byte_budget = check_budget(byte_budget, "memory")
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._stats = TierStats(name=self.name, byte_budget=self.byte_budget)

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self._stats.misses += 1
                return None
            self._data.move_to_end(key)
            self._stats.hits += 1
            self._stats.bytes_read += len(value)
            return value

    def put(self, key: str, value: bytes) -> None:
        check_key(key)
        value = check_value(value)
        with self._lock:
            self._remove(key)
            if len(value) > self.byte_budget:
                self._stats.rejected_puts += 1
                return
            self._data[key] = value
            self._used += len(value)
            self._stats.puts += 1
            self._stats.bytes_written += len(value)
            while self._used > self.byte_budget:
                _, old = self._data.popitem(last=False)
                self._used -= len(old)
                self._stats.evictions += 1

    def contains(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return key in self._data

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return self._remove(key)

    def peek(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            return self._data.get(key)

    def note_corrupt(self, key: str) -> None:
        with self._lock:
            self._stats.corrupt += 1
        self.delete(key)

    def keys(self) -> Iterator[str]:
        with self._lock:
            snapshot = list(self._data)
        return iter(snapshot)

    def stats(self) -> TierStats:
        with self._lock:
            return dataclasses.replace(self._stats, bytes_used=self._used, entries=len(self._data))

    def close(self) -> None:
        with self._lock:
            self._data.clear()
            self._used = 0

    def _remove(self, key: str) -> bool:
        """Drop ``key`` (lock held)."""
        old = self._data.pop(key, None)
        if old is None:
            return False
        self._used -= len(old)
        return True
