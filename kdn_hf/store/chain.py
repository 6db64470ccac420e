"""KVStore: a chain of storage tiers, fastest first, speaking ChunkKV.

``get`` looks in each tier in order and decodes (verifies) what it finds; a
hit in a slower tier is promoted: its bytes are put into every faster tier.
An entry that fails verification (checksum, key, fingerprint, shape) is a
logged warning, counted in that tier's ``stats().corrupt``, deleted from the
tier, and the search goes on, so a damaged entry is a miss, never an error.
``put`` encodes once and writes the same bytes through to every tier.

KVStore keeps no state of its own besides the tiers: the stats are theirs.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import torch

from kdn_hf.errors import ConfigError, CorruptEntryError
from kdn_hf.kv import ChunkKV
from kdn_hf.store.base import StorageTier, TierStats
from kdn_hf.store.entry import decode_entry, encode_entry

logger = logging.getLogger("kdn_hf.store")


class StoreHit(NamedTuple):
    """Result of a lookup: ``chunk`` is None on a miss; ``tier`` names the tier that hit (as in ``stats()``)."""

    chunk: ChunkKV | None
    tier: str | None


_MISS = StoreHit(None, None)


class KVStore:
    """A tier chain, ``tiers[0]`` fastest. Use it as a context manager or call ``close()``."""

    def __init__(self, tiers: Sequence[StorageTier]) -> None:
        tiers = list(tiers)
        if not tiers or not all(isinstance(t, StorageTier) for t in tiers):
            raise ConfigError(f"KVStore needs a non-empty list of StorageTier objects, got {tiers!r}")
        self.tiers: list[StorageTier] = tiers
        self.names: list[str] = _unique_names([t.name for t in tiers])

    def get(self, key: str, fingerprint: str, device: str | torch.device = "cpu") -> StoreHit:
        """The verified chunk under ``key`` for model ``fingerprint``, and the tier name that hit."""
        for i, tier in enumerate(self.tiers):
            data = tier.get(key)
            if data is None:
                continue
            chunk = self._decode(i, key, data, fingerprint, device)
            if chunk is not None:
                for faster in self.tiers[:i]:
                    faster.put(key, data)
                return StoreHit(chunk, self.names[i])
        return _MISS

    def get_many(self, keys: Sequence[str], fingerprint: str, device: str | torch.device = "cpu") -> list[StoreHit]:
        """``get`` for several keys, one batched call per tier for the keys still missing."""
        results = [_MISS] * len(keys)
        todo = list(range(len(keys)))
        for i, tier in enumerate(self.tiers):
            if not todo:
                break
            datas = tier.get_many([keys[j] for j in todo])
            promote: list[tuple[str, bytes]] = []
            still = []
            for j, data in zip(todo, datas):
                chunk = None if data is None else self._decode(i, keys[j], data, fingerprint, device)
                if chunk is None:
                    still.append(j)
                else:
                    results[j] = StoreHit(chunk, self.names[i])
                    promote.append((keys[j], data))
            for faster in self.tiers[:i]:
                faster.put_many(promote)
            todo = still
        return results

    def put(self, key: str, chunk: ChunkKV, fingerprint: str, codec: str = "none") -> None:
        """Encode ``chunk`` once and write it to every tier."""
        data = encode_entry(key, chunk, fingerprint, codec)
        for tier in self.tiers:
            tier.put(key, data)

    def contains(self, key: str) -> bool:
        """Whether any tier holds bytes under ``key`` (unverified, no recency update)."""
        return any(t.contains(key) for t in self.tiers)

    def delete(self, key: str) -> bool:
        """Remove ``key`` from every tier; True if any tier held it."""
        found = [t.delete(key) for t in self.tiers]
        return any(found)

    def stats(self) -> dict[str, TierStats]:
        """Per-tier stats, keyed by unique tier name ("disk", "disk#2", ...)."""
        return {name: t.stats() for name, t in zip(self.names, self.tiers)}

    def close(self) -> None:
        for t in self.tiers:
            t.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVStore({self.names})"

    def _decode(self, i: int, key: str, data: bytes, fingerprint: str, device: str | torch.device) -> ChunkKV | None:
        try:
            return decode_entry(data, key=key, fingerprint=fingerprint, device=device)
        except CorruptEntryError as e:
            logger.warning("store tier %s: entry %s is unusable and was removed: %s", self.names[i], key, e)
            self.tiers[i].note_corrupt(key)
            return None


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
