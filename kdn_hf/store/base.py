"""The StorageTier contract: a byte store keyed by hex strings.

A tier stores opaque ``bytes`` (encoded entries, see ``kdn_hf.store.entry``)
under keys that are lowercase hex digests (``kdn_hf.keys``). Tiers know
nothing about tensors, models or checksums: validation happens once, when
``KVStore`` decodes an entry, and a bad entry is deleted from the tier that
served it.

Contract, for every implementation:

- ``get(key)`` returns the bytes last put under ``key``, or ``None`` on a
  miss. It never raises for a missing, evicted or unreadable entry (a tier
  that cannot read logs and returns ``None``); a hit refreshes the entry's
  recency for LRU eviction.
- ``put(key, value)`` stores ``value``, replacing any previous one, then
  evicts least-recently-used entries until the tier is within its byte
  budget. A value larger than the whole budget is not stored (counted as a
  rejected put). A failed write (disk full, server down) is logged and
  counted, never raised, and never leaves a partial entry readable.
- ``contains(key)`` is a cheap existence check (no recency update).
- ``delete(key)`` removes the entry, returning whether it existed.
- ``get_many`` / ``put_many`` are the batched forms; the defaults loop.
- ``stats()`` returns a :class:`TierStats` snapshot.
- ``keys()`` iterates stored keys (for ``kdn store ls`` / ``verify``).
- ``note_corrupt(key)`` is called by ``KVStore`` when bytes this tier served
  failed validation: the tier counts it (``stats().corrupt``) and deletes it.

Keys are checked with :func:`check_key` (2 to 128 lowercase hex digits) by
every tier, so a key can never name a path outside a disk tier's root.
Values are ``bytes`` (``bytearray`` / ``memoryview`` are copied to bytes).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from kdn_hf.errors import ConfigError, InputError

_KEY_RE = re.compile(r"[0-9a-f]{2,128}")


def check_key(key: str) -> str:
    """Return ``key`` if it is 2 to 128 lowercase hex digits, else raise InputError."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise InputError(
            f"store keys are 2 to 128 lowercase hex digits (as kdn_hf.keys makes them), got {key!r}; "
            "derive keys with kdn_hf.keys instead of building them by hand"
        )
    return key


def check_value(value: bytes | bytearray | memoryview) -> bytes:
    """Return ``value`` as immutable ``bytes``, or raise InputError for any other type."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise InputError(f"store values are bytes (an encoded entry), got {type(value).__name__}")


def check_budget(byte_budget: int, tier: str) -> int:
    """Return ``byte_budget`` if it is a positive int, else raise ConfigError."""
    if isinstance(byte_budget, bool) or not isinstance(byte_budget, int) or byte_budget <= 0:
        raise ConfigError(f"the {tier} tier's byte_budget must be a positive int (bytes), got {byte_budget!r}")
    return byte_budget


@dataclass
class TierStats:
    """Counters of one tier. ``bytes_used``/``entries`` describe the tier now;
    the others count events since the tier object was opened."""

    name: str
    bytes_used: int = 0
    byte_budget: int = 0
    entries: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    rejected_puts: int = 0
    evictions: int = 0
    corrupt: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    repairs: int = 0  # damage to the tier's own structure fixed on open (a disk store's marker)

    def as_dict(self) -> dict[str, int | str]:
        return dict(self.__dict__)


class StorageTier(ABC):
    """One level of the store (memory, disk, redis, ...). See the module docstring."""

    #: short name used in stats ("memory", "disk", "redis")
    name: str = "tier"
    #: True when the tier itself enforces ``byte_budget`` with exact LRU order
    #: (memory, disk); False when a server does its own eviction (redis)
    exact_budget: bool = True
    #: why the tier serves nothing and stores nothing (a disk store written by a newer kdn_hf),
    #: None when it works; set when the tier is opened
    unreadable: str | None = None

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put(self, key: str, value: bytes) -> None: ...

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> bool: ...

    @abstractmethod
    def stats(self) -> TierStats: ...

    @abstractmethod
    def keys(self) -> Iterator[str]: ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        for k, v in items:
            self.put(k, v)

    def peek(self, key: str) -> bytes | None:
        """``get`` without counting a hit or refreshing recency (for ``kdn store ls/verify``)."""
        return self.get(key)

    def trim(self) -> int:
        """Evict down to the byte budget now (``kdn store gc``); returns entries evicted."""
        return 0

    def note_corrupt(self, key: str) -> None:
        """Called by KVStore when an entry this tier served failed validation:
        count it and delete it."""
        self.delete(key)

    def close(self) -> None:
        """Release resources (connections, file handles). Idempotent."""
