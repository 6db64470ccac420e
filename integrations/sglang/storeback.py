"""Store-back off the scheduler thread: prompt KV from the pool to the KDN store.

The scheduler thread (``KDNRadixCache.checkpoint``) hands a :class:`StoreTask`
over and goes on; one writer thread gathers the KV of the task's locked slots
from the pool, encodes every entry and puts it, then reports the task done.
Only the scheduler thread touches the radix tree: it releases a task's lock
when it drains the done queue (``drain``), from ``match_prefix``,
``checkpoint`` and ``evict``, because SGLang never calls
``check_hicache_events`` for a backend registered by name.

Nothing is dropped: a full queue makes the scheduler wait for a free place
(``max_inflight`` bounds the slots held by stores in flight), a failing put is
logged (the store itself never raises), and ``flush`` waits for everything.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from kdn_hf.kv import ChunkKV
from kdn_hf.plan import Unit
from kdn_hf.store import KVStore

from kdn_hf.integrations.sglang.pool_io import read_pool_kv

log = logging.getLogger("kdn_hf.sglang")


@dataclass
class StoreTask:
    """One request's prompt KV to store.

    entries:    (key, unit) pairs; unit.start .. unit.end are prompt positions.
    slots:      [locked_len] int64 pool slots of prompt positions 0 .. locked_len-1, locked in the tree
                until the task is drained; read by the writer thread.
    tail_kv:    [layers, 2, kv_heads, tail, head_dim] KV of positions locked_len .. locked_len+tail-1,
                copied on the scheduler thread (those slots are the request's, freed when it is released).
    """

    entries: list[tuple[str, Unit]]
    slots: torch.Tensor
    tail_kv: torch.Tensor
    id: int = 0
    stored: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)

    @property
    def locked_len(self) -> int:
        return self.slots.numel()


class StoreBackWriter:
    """A daemon thread writing :class:`StoreTask` entries; see the module docstring."""

    def __init__(self, store: KVStore, fingerprint: str, codec: str, pool, max_inflight: int) -> None:
        self.store, self.fingerprint, self.codec, self.pool = store, fingerprint, codec, pool
        self._todo: queue.Queue[StoreTask | None] = queue.Queue()
        self._done: queue.SimpleQueue[StoreTask] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._next_id = 0
        self._thread = threading.Thread(target=self._run, name="kdn-sglang-store-back", daemon=True)
        self._thread.start()

    def submit(self, task: StoreTask, wait: Callable[[], None]) -> int:
        """Queue ``task``; when ``max_inflight`` tasks are in flight, call ``wait()`` (which drains done
        tasks on the caller's thread) until one finishes. Returns the task id."""
        while not self._slots.acquire(timeout=0.05):
            wait()
        self._next_id += 1
        task.id = self._next_id
        self._todo.put(task)
        return task.id

    def done(self) -> list[StoreTask]:
        """Tasks finished since the last call (their entries are in the store, or logged as failed)."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def flush(self) -> None:
        """Wait until every queued task has finished (then ``done()`` returns them)."""
        self._todo.join()

    def close(self) -> None:
        self.flush()
        self._todo.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            task = self._todo.get()
            try:
                if task is None:
                    return
                self._write(task)
            except Exception:  # keep the thread alive: a failed store-back is a lost cache entry, not a crash
                log.exception("store-back task %s failed; its entries are not stored", getattr(task, "id", "?"))
            finally:
                if task is not None:
                    self._slots.release()
                    self._done.put(task)
                self._todo.task_done()

    def _write(self, task: StoreTask) -> None:
        n = task.locked_len
        for key, unit in task.entries:
            if self.store.contains(key):
                task.skipped += 1
                continue
            parts = []
            if unit.start < n:  # positions in locked slots
                parts.append(read_pool_kv(self.pool, task.slots[unit.start : min(unit.end, n)]))
            if unit.end > n:
                parts.append(task.tail_kv[:, :, :, max(unit.start - n, 0) : unit.end - n])
            kv = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
            chunk = ChunkKV(kv=kv.contiguous(), positions=torch.arange(unit.start, unit.end),
                            token_ids=torch.tensor(unit.ids, dtype=torch.int64))
            self.store.put(key, chunk, self.fingerprint, codec=self.codec)
            task.stored += 1
