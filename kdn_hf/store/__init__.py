"""The storage module: tiers of encoded chunk KV, fastest first.

- ``base``: the StorageTier contract (bytes by hex key) and TierStats.
- ``entry``: the self-checking entry format (encode_entry / decode_entry).
- ``memory`` / ``disk``: the in-process LRU and the embedded default tier.
- ``chain``: KVStore, the tier chain speaking ChunkKV (promotion, write-through).
- ``url``: open_store, from URLs / paths / None.
"""

from kdn_hf.store.base import StorageTier, TierStats
from kdn_hf.store.chain import KVStore, StoreHit
from kdn_hf.store.disk import DiskTier
from kdn_hf.store.entry import decode_entry, encode_entry
from kdn_hf.store.memory import MemoryTier
from kdn_hf.store.url import open_store, parse_size

__all__ = [
    "DiskTier",
    "KVStore",
    "MemoryTier",
    "StorageTier",
    "StoreHit",
    "TierStats",
    "decode_entry",
    "encode_entry",
    "open_store",
    "parse_size",
]
