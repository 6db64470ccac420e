"""KVStore: a chain of storage tiers, fastest first, speaking ChunkKV.

``get`` looks in each tier in order and decodes (verifies) what it finds; a
hit in a slower tier is promoted: its bytes are put into every faster tier.
``open`` does the same but leaves the kv encoded, to be decoded layer by layer.
An entry that fails verification (checksum, key, fingerprint, shape) is a
logged warning, counted in that tier's ``stats().corrupt``, deleted from the
tier, and the search goes on, so a damaged entry is a miss, never an error.

``put`` encodes once. With ``write="through"`` (the default) the same bytes go
to every tier before ``put`` returns. With ``write="back"`` they go to the
fastest tier at once and to the slower ones from a background thread (bounded
queue: a full queue makes ``put`` write synchronously); ``flush()`` waits for
pending writes, ``close()`` flushes, and a ``get`` sees pending entries. Each
tier keeps its own byte budget (see the tiers); the stats are theirs.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from kdn_hf.errors import ConfigError, CorruptEntryError
from kdn_hf.kv import ChunkKV
from kdn_hf.store.base import StorageTier, TierStats
from kdn_hf.store.entry import OpenEntry, decode_entry, encode_entry, open_entry, read_metadata

logger = logging.getLogger("kdn_hf.store")


class StoreHit(NamedTuple):
    """Result of a lookup: ``chunk`` is None on a miss; ``tier`` names the tier that hit (as in ``stats()``)."""

    chunk: ChunkKV | None
    tier: str | None


_MISS = StoreHit(None, None)


WRITE_POLICIES = ("through", "back")


@dataclass
class VerifyReport:
    """What ``KVStore.verify`` found: entries checked and bad ones (tier name, key, reason); tiers whose
    own structure was repaired when opened (tier name, repairs); tiers this version cannot read at all
    (tier name, why: a store of a newer format)."""

    checked: int = 0
    bad: list[tuple[str, str, str]] = None  # type: ignore[assignment]
    repairs: list[tuple[str, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bad = [] if self.bad is None else self.bad


class KVStore:
    """A tier chain, ``tiers[0]`` fastest. Use it as a context manager or call ``close()``.

    write: "through" (every tier before ``put`` returns) or "back" (the fastest
    tier now, the others from a background thread).
    """

    def __init__(self, tiers: Sequence[StorageTier], *, write: str = "through", queue_size: int = 64) -> None:
        tiers = list(tiers)
        if not tiers or not all(isinstance(t, StorageTier) for t in tiers):
            raise ConfigError(f"KVStore needs a non-empty list of StorageTier objects, got {tiers!r}")
        if write not in WRITE_POLICIES:
            raise ConfigError(f"write policy must be one of {WRITE_POLICIES}, got {write!r}")
        self.tiers: list[StorageTier] = tiers
        self.names: list[str] = _unique_names([t.name for t in tiers])
        self.write = write
        self._back = _WriteBack(tiers[1:], queue_size) if write == "back" and len(tiers) > 1 else None

    def get(self, key: str, fingerprint: str, device: str | torch.device = "cpu") -> StoreHit:
        """The verified chunk under ``key`` for model ``fingerprint``, and the tier name that hit."""
        return self._get(key, fingerprint, device, decode_entry)

    def open(self, key: str, fingerprint: str, device: str | torch.device = "cpu") -> StoreHit:
        """``get`` leaving the kv encoded: ``StoreHit.chunk`` is an :class:`~kdn_hf.store.entry.OpenEntry`
        (verified, its codec's per-layer decoder built) for decoding layer by layer (``kdn_hf.delivery``).
        Errors found later, while decoding a layer, are the caller's to report (``note_corrupt``)."""
        return self._get(key, fingerprint, device, _open_for_layers)

    def _get(self, key: str, fingerprint: str, device: str | torch.device, read) -> StoreHit:
        for i, tier in enumerate(self.tiers):
            data = tier.get(key)
            if data is None and i == 0 and self._back is not None:
                data = self._back.pending(key)
            if data is None:
                continue
            chunk = self._decode(i, key, data, fingerprint, device, read)
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
            if i == 0 and self._back is not None:
                datas = [d if d is not None else self._back.pending(keys[j]) for j, d in zip(todo, datas)]
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
        """Encode ``chunk`` once and write it to every tier (now, or later for write-back)."""
        data = encode_entry(key, chunk, fingerprint, codec)
        self.tiers[0].put(key, data)
        if self._back is not None:
            self._back.submit(key, data)
        else:
            for tier in self.tiers[1:]:
                tier.put(key, data)

    def note_corrupt(self, key: str) -> None:
        """A verified entry turned out unusable for its caller (wrong ids or geometry for the
        model): count it as corrupt in every tier holding it, and remove it everywhere."""
        if self._back is not None:
            with self._back.lock:
                self._back.drop(key)
        for tier in self.tiers:
            if tier.contains(key):
                tier.note_corrupt(key)

    def flush(self) -> None:
        """Wait until every write-back put has reached every tier (no-op for write-through)."""
        if self._back is not None:
            self._back.flush()

    def verify(self, fingerprint: str | None = None, *, remove: bool = True) -> VerifyReport:
        """Read every entry of every tier and check it (checksum, key, codec, shapes, and
        ``fingerprint`` when given); bad entries are counted as corrupt and, with
        ``remove``, deleted. Also reports the tiers repaired on open and those this version
        cannot read. For ``kdn store verify``."""
        report = VerifyReport()
        self.flush()
        for name, tier in zip(self.names, self.tiers):
            if tier.unreadable:
                report.unreadable.append((name, tier.unreadable))
            repairs = tier.stats().repairs
            if repairs:
                report.repairs.append((name, repairs))
            for key in list(tier.keys()):
                data = tier.peek(key)
                if data is None:
                    continue  # removed meanwhile
                report.checked += 1
                try:
                    fp = fingerprint if fingerprint is not None else read_metadata(data).get("fingerprint", "")
                    decode_entry(data, key=key, fingerprint=fp)
                except CorruptEntryError as e:
                    report.bad.append((name, key, str(e)))
                    if remove:
                        tier.note_corrupt(key)
        return report

    def trim(self) -> int:
        """Evict from every tier down to its budget (``kdn store gc``); returns entries evicted."""
        self.flush()
        return sum(t.trim() for t in self.tiers)

    def contains(self, key: str) -> bool:
        """Whether any tier holds bytes under ``key`` (unverified, no recency update)."""
        return any(t.contains(key) for t in self.tiers)

    def delete(self, key: str) -> bool:
        """Remove ``key`` from every tier; True if any tier held it."""
        if self._back is not None:
            with self._back.lock:
                pending = self._back.drop(key)
                found = [t.delete(key) for t in self.tiers]
            return pending or any(found)
        found = [t.delete(key) for t in self.tiers]
        return any(found)

    def stats(self) -> dict[str, TierStats]:
        """Per-tier stats, keyed by unique tier name ("disk", "disk#2", ...)."""
        return {name: t.stats() for name, t in zip(self.names, self.tiers)}

    def close(self) -> None:
        if self._back is not None:
            self._back.stop()
            self._back = None
        for t in self.tiers:
            t.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVStore({self.names})"

    def _decode(self, i: int, key: str, data: bytes, fingerprint: str, device: str | torch.device,
                read=None) -> ChunkKV | None:
        try:
            return (read or decode_entry)(data, key=key, fingerprint=fingerprint, device=device)
        except CorruptEntryError as e:
            logger.warning("store tier %s: entry %s is unusable and was removed: %s", self.names[i], key, e)
            self.tiers[i].note_corrupt(key)
            return None


class _WriteBack:
    """A daemon thread writing (key, bytes) to the slower tiers, newest value per key wins."""

    def __init__(self, tiers: list[StorageTier], queue_size: int) -> None:
        self.tiers = tiers
        self.lock = threading.Lock()  # held while an entry is written, so a delete cannot be undone
        self._pending: dict[str, bytes] = {}
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="kdn-write-back", daemon=True)
        self._thread.start()

    def pending(self, key: str) -> bytes | None:
        return self._pending.get(key)

    def drop(self, key: str) -> bool:
        """Forget a pending write (lock held by the caller)."""
        return self._pending.pop(key, None) is not None

    def submit(self, key: str, data: bytes) -> None:
        with self.lock:
            self._pending[key] = data
        try:
            self._queue.put_nowait(key)
        except queue.Full:  # back-pressure: write this one now
            self._write(key)

    def flush(self) -> None:
        self._queue.join()

    def stop(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join()

    def _write(self, key: str) -> None:
        with self.lock:
            data = self._pending.pop(key, None)
            if data is None:  # written already (a newer submit of the same key), or deleted
                return
            for tier in self.tiers:
                try:
                    tier.put(key, data)
                except Exception:  # a tier broke its never-raise contract: keep the thread alive
                    logger.exception("store write-back to tier %s failed for %s", tier.name, key)

    def _run(self) -> None:
        while True:
            key = self._queue.get()
            try:
                if key is None:
                    return
                self._write(key)
            finally:
                self._queue.task_done()


def _open_for_layers(data: bytes, *, key: str, fingerprint: str, device: str | torch.device) -> OpenEntry:
    entry = open_entry(data, key=key, fingerprint=fingerprint, device=device)
    entry.prepare_layers()  # the codec checks its tensors (entropy: runs zstd) here, on the reading thread
    return entry


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
