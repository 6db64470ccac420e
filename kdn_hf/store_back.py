"""Stage 6, store-back: what a request computed goes to the store, once its answer is out.

A :class:`StoreBack` belongs to one request (never to the shared ``KDN``): the
stages hand it every chunk they compute, and ``flush`` writes them all, also
when the request failed part-way (what was computed is still right). With
``deferred=False`` (ingest) each chunk is written as it comes.

Thread safety: a KDN serves many threads at once; each request has its own
StoreBack, so no request's writes can be dropped or flushed by another.
``KVStore.put`` itself is safe to call from many threads.
"""

from __future__ import annotations

from typing import Callable, Iterable

from kdn_hf.kv import ChunkKV
from kdn_hf.store import KVStore


class StoreBack:
    """Pending writes of one request to ``store``, entries under ``fingerprint`` encoded with ``codec``."""

    def __init__(self, store: KVStore, fingerprint: str, codec: str, *, deferred: bool = True) -> None:
        self.store, self.fingerprint, self.codec, self.deferred = store, fingerprint, codec, deferred
        self._pending: list[tuple[str, ChunkKV]] = []
        self._later: list[Callable[[], Iterable[tuple[str, ChunkKV]]]] = []

    def put_later(self, compute: Callable[[], Iterable[tuple[str, ChunkKV]]]) -> None:
        """Compute ``(key, chunk)`` pairs at ``flush`` (after the answer) and write them: work a request
        owes the store but not its answer (a cold blend answered by full prefill computes its chunks
        here)."""
        self._later.append(compute)

    def put(self, key: str, chunk: ChunkKV) -> None:
        """Write ``chunk`` under ``key`` now, or at ``flush`` when deferred."""
        if self.deferred:
            self._pending.append((key, chunk))
        else:
            self.store.put(key, chunk, self.fingerprint, codec=self.codec)

    def put_all(self, items) -> None:
        for key, chunk in items:
            self.put(key, chunk)

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._later)

    def flush(self) -> None:
        """Compute what was put for later, then write every pending chunk (each once)."""
        later, self._later = self._later, []
        for compute in later:
            self._pending.extend(compute())
        pending, self._pending = self._pending, []
        for key, chunk in pending:
            self.store.put(key, chunk, self.fingerprint, codec=self.codec)

    def __enter__(self) -> "StoreBack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
