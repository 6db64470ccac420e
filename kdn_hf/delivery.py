"""Delivery: load a request's chunks from the store while the engine composes them.

As soon as a request's chunk list is known, :func:`start_loading` starts one
fetch per distinct key (tier reads, checksum, codec decode) on a small thread
pool, in prompt order. The engine then takes the chunks in order
(:meth:`ChunkLoader.get`) and re-rotates / concatenates chunk i while chunks
i+1, i+2, ... are still being read and decoded: file reads, Redis round
trips, zstd and most torch kernels release the GIL, so loading overlaps with
compute and a disk or Redis store costs little more than a memory store.

The unit of overlap is a chunk (an entry is one chunk's KV for all layers);
with 512-token chunks and ``workers=2`` the next chunk is ready before the
current one is re-rotated on a 2-core CPU.

A failed fetch (any tier error, a corrupt entry) is a miss, as everywhere in
the store: ``get`` returns ``StoreHit(None, None)`` and the engine recomputes.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from kdn_hf.store import KVStore, StoreHit

log = logging.getLogger("kdn_hf")

DEFAULT_WORKERS = 2
_MISS = StoreHit(None, None)


class ChunkLoader:
    """Fetches of ``keys`` in flight; ``get(key)`` waits for one. Close it (or use ``with``) when done."""

    def __init__(self, store: KVStore, keys: Sequence[str], fingerprint: str,
                 device: str | torch.device = "cpu", workers: int = DEFAULT_WORKERS) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.device = device
        distinct = list(dict.fromkeys(keys))
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(distinct))), thread_name_prefix="kdn-load")
        self._futures: dict[str, Future] = {k: self._pool.submit(self._load, k) for k in distinct}

    def _load(self, key: str) -> StoreHit:
        return self.store.get(key, self.fingerprint, self.device)

    def get(self, key: str) -> StoreHit:
        """The verified chunk under ``key`` (waiting for its fetch), or a miss."""
        fut = self._futures.get(key)
        if fut is None:  # not announced: fetch now
            return self._load(key)
        try:
            return fut.result()
        except Exception:  # a tier broke the never-raise contract: degrade to a miss, loudly
            log.exception("loading store entry %s failed; recomputing it", key)
            return _MISS

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ChunkLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_loading(store: KVStore, keys: Sequence[str], fingerprint: str,
                  device: str | torch.device = "cpu", workers: int = DEFAULT_WORKERS) -> ChunkLoader:
    """Start fetching ``keys`` (in order, duplicates once) in the background; see ChunkLoader."""
    return ChunkLoader(store, keys, fingerprint, device, workers)
