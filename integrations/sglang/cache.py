"""KDNRadixCache: SGLang's radix cache with a KDN store behind it.

Why ``RadixCache`` and not ``UnifiedRadixCache`` (SGLang 0.5.23's default): the
plain tree's contract is small and public (``TreeNode.value`` holds slot ids,
``match_prefix``/``checkpoint``/``evict``/``init_load_back``), which is what an
external tier needs; the unified tree exists for per-component state (SWA,
Mamba, HiCache host pools, sessions), all of which this backend refuses
(``settings.unsupported``). SGLang's in-tree FlexKV backend makes the same choice.

Contract with SGLang's scheduler (who calls what, when):

- ``match_prefix(params)`` (scheduler thread, ``Req.init_next_round_input``):
  the device match as usual, then, for a request (``params.req``; SGLang's own
  ``checkpoint`` calls it with ``req=None`` and gets the device match only),
  the request's units (``units.request_units``) past the device match are
  looked up in the store, in order, up to the first miss. An entry counts
  only if it is *exact* here: a prefix entry for this very prefix, or a chunk
  entry computed after exactly the ids before it (the opener, the first chunk
  after it). The hit, page-aligned and within the scheduler's key limit, is
  reported as ``host_hit_length``; the plan is kept per ``cache_request_handle``.
- ``init_load_back(params)`` (scheduler thread, admission): reads and verifies
  every planned entry (checksum and fingerprint by the store; ids, positions
  and geometry here) before allocating; then allocates the slots (evicting if
  needed), writes the KV into the pool and grafts one node under the matched
  node. All or nothing: any failure loads 0 tokens (the request recomputes).
- ``checkpoint(req, up_to)`` (scheduler thread, after each prefill chunk and
  at finish): the usual tree insert; once the prompt is prefilled, its units
  are stored back (``storeback``): the tree-owned slots are locked until the
  writer thread has read them, the request-owned tail is copied at once
  (``release_kv_cache`` frees it right after ``checkpoint`` returns).
- ``on_release`` / ``release_aborted_request``: drop the request's plan.
  Stores in flight finish and unlock on their own.

Non-prefix reuse (``KDNSettings(reuse=True)``, opt-in, needs chunk hints): after
the exact span, further chunks whose chunk entry is stored are loaded too, K
re-rotated to their new positions (``kdn_hf.rope.rerotate_layer``). That KV is
approximate (no cross-chunk attention), so it never joins the shared tree:
every load is then request-owned (``load_back_is_cache_owned()`` is False;
``prefix_device_indices`` appends the private slots), the tree insert of such a
request stops at its first approximate token, and only units before it are
stored back. Released requests free the approximate slots like computed ones.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from typing import Optional

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    CacheRequestHandle,
    EvictParams,
    EvictResult,
    InitLoadBackParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from kdn_hf.errors import ConfigError
from kdn_hf.plan import KeyPolicy, Unit
from kdn_hf.resolve import Geometry, entry_mismatch, expected_positions
from kdn_hf.rope import RopeSpec, rerotate_layer
from kdn_hf.store import KVStore

from kdn_hf.integrations.sglang.pool_io import pool_geometry, read_pool_kv, write_pool_kv
from kdn_hf.integrations.sglang.settings import KDNSettings, request_namespace
from kdn_hf.integrations.sglang.storeback import StoreBackWriter, StoreTask
from kdn_hf.integrations.sglang.units import RequestUnits, request_units

log = logging.getLogger("kdn_hf.sglang")


@dataclass
class KDNCacheStats:
    """Counters since the cache was built (scheduler thread)."""

    lookups: int = 0          # match_prefix calls for a request that looked into the store
    planned_tokens: int = 0   # tokens reported as host hits
    loaded_tokens: int = 0    # tokens loaded into the pool by init_load_back
    loads: int = 0
    failed_loads: int = 0     # planned loads that loaded nothing (miss, bad entry, no memory, tree moved)
    corrupt: int = 0          # entries that verified but did not hold what their key promises
    store_tasks: int = 0
    stored_entries: int = 0
    skipped_entries: int = 0  # already in the store


@dataclass
class _LoadPlan:
    """What ``match_prefix`` found for one request, for ``init_load_back``."""

    key: RadixKey            # detached snapshot of the matched ids (the live key aliases fill ids)
    node: TreeNode           # the device match's last node
    device_len: int
    end: int                 # load positions device_len .. end-1
    entries: list[tuple[str, Unit]] = field(default_factory=list)
    approx_from: int | None = None  # first position loaded re-rotated (reuse); None: every entry is exact
    approx: list[tuple[str, Unit]] = field(default_factory=list)  # chunk entries to re-rotate (reuse)


@dataclass
class _Private:
    """Request-owned slots loaded by ``init_load_back`` in reuse mode (positions device_len .. end-1)."""

    slots: torch.Tensor
    approx_from: int | None
    in_row: bool = False  # handed out by prefix_device_indices (the row owns them from then on)


class KDNRadixCache(RadixCache):
    """A RadixCache whose misses look into a KDN store and whose prefilled prompts are stored back.

    params:      SGLang's CacheInitParams (the real pools).
    store:       the KDN store (``kdn_hf.store.open_store``).
    fingerprint: the served model's fingerprint digest (model, dtype, geometry, RoPE), as
                 ``kdn_hf.fingerprint.fingerprint_from_checkpoint`` makes it for the served dtype.
    settings:    namespace, codec, block size, ... (``KDNSettings``).
    """

    def __init__(self, params, *, store: KVStore, fingerprint: str, settings: KDNSettings | None = None,
                 rope_spec: RopeSpec | None = None) -> None:
        super().__init__(params)
        self.settings = settings or KDNSettings()
        if self.settings.reuse and rope_spec is None:
            raise ConfigError("KDNSettings(reuse=True) re-rotates stored K: pass the model's rope_spec "
                              "(kdn_hf.rope.rope_spec_from_config(hf_config))")
        self.rope_spec = rope_spec
        if self.settings.block_tokens % self.page_size:
            raise ConfigError(f"block_tokens={self.settings.block_tokens} must be a multiple of the page size "
                              f"{self.page_size}")
        self.store = store
        self.fingerprint = fingerprint
        self.kvcache = self.token_to_kv_pool_allocator.get_kvcache()
        self.kdn_stats = KDNCacheStats()
        self._plans: dict[CacheRequestHandle, _LoadPlan] = {}
        self._private: dict[CacheRequestHandle, _Private] = {}
        self._stored: set[CacheRequestHandle] = set()
        self._inflight: dict[int, TreeNode] = {}
        self._policies: dict[tuple[str, tuple[int, ...]], KeyPolicy] = {}
        self._writer = StoreBackWriter(store, fingerprint, self.settings.codec, self.kvcache,
                                       self.settings.max_inflight)

    # ---------------------------------------------------------------- keys
    def _policy(self, namespace: str, opener: tuple[int, ...]) -> KeyPolicy:
        policy = self._policies.get((namespace, opener))
        if policy is None:
            policy = KeyPolicy(fingerprint=self.fingerprint, codec=self.settings.codec, namespace=namespace,
                               opener=opener)
            self._policies[(namespace, opener)] = policy
        return policy

    def units_of(self, prompt_ids, custom_params, extra_key: str | None, cache_salt: str | None) -> RequestUnits:
        """The units (and keys) of a prompt for a request with these hints and namespace fields."""
        namespace = request_namespace(self.settings.namespace, extra_key, cache_salt)
        return request_units(lambda opener: self._policy(namespace, opener), prompt_ids, custom_params,
                             self.settings.block_tokens)

    def _req_units(self, req) -> RequestUnits:
        return self.units_of(req.origin_input_ids, getattr(req.sampling_params, "custom_params", None),
                             req.extra_key, req.cache_salt)

    # ---------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        if hasattr(self, "_writer"):  # RadixCache.__init__ calls reset() before ours has run
            self.wait_for_stores()
            self._plans.clear()
            self._stored.clear()
        super().reset()

    def shutdown(self) -> None:
        """Finish every store-back (SGLang does not call this; the writer is a daemon thread)."""
        self.wait_for_stores()
        self._writer.close()

    def wait_for_stores(self) -> None:
        """Block until every store-back has been written, and release their locks."""
        self._writer.flush()
        self._drain()

    def _drain(self) -> None:
        for task in self._writer.done():
            node = self._inflight.pop(task.id, None)
            if node is not None:
                self.dec_lock_ref(node)
            self.kdn_stats.stored_entries += task.stored
            self.kdn_stats.skipped_entries += task.skipped

    def on_release(self, req, *, checkpointed: bool) -> None:
        self._plans.pop(req.cache_request_handle, None)
        self._stored.discard(req.cache_request_handle)
        self._drop_private(req.cache_request_handle)

    def release_aborted_request(self, handle: CacheRequestHandle) -> None:
        self._plans.pop(handle, None)
        self._stored.discard(handle)
        self._drop_private(handle)

    def _drop_private(self, handle: CacheRequestHandle) -> None:
        private = self._private.pop(handle, None)
        if private is not None and not private.in_row:  # loaded, then aborted before its row was allocated
            self.token_to_kv_pool_allocator.free(private.slots)

    def load_back_is_cache_owned(self) -> bool:
        return not self.settings.reuse

    def prefix_device_indices(self, req) -> torch.Tensor:
        private = self._private.get(req.cache_request_handle)
        path = self.path_device_indices(req.last_node)
        if private is not None:  # alloc_for_extend copies these into the request's row, which frees them
            private.in_row = True
            path = torch.cat([path, private.slots.to(path.dtype)])
        if len(path) < req.prefix_len:
            raise RuntimeError(f"{req.rid}: prefix of {req.prefix_len} tokens but {len(path)} slots")
        return path[: req.prefix_len]

    def evict(self, params: EvictParams) -> EvictResult:
        self._drain()
        return super().evict(params)

    # ---------------------------------------------------------------- lookup
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        self._drain()
        base = super().match_prefix(params)
        req = params.req
        if req is None or self.disable:
            return base
        self._plans.pop(req.cache_request_handle, None)  # a new round replaces an old plan
        limit = len(params.key) // self.page_size * self.page_size
        if base.device_prefix_len >= limit:
            return base
        plan = self._plan_exact(req, params.key, base, limit)
        if plan is None:
            return base
        self._plans[req.cache_request_handle] = plan
        self.kdn_stats.planned_tokens += plan.end - plan.device_len
        return base._replace(host_hit_length=plan.end - plan.device_len)

    def _plan_exact(self, req, key: RadixKey, base: MatchResult, limit: int) -> Optional[_LoadPlan]:
        self.kdn_stats.lookups += 1
        units = self._req_units(req)
        device_len = base.device_prefix_len
        entries: list[tuple[str, Unit]] = []
        end = 0
        for i, unit in enumerate(units.prefix):
            if unit.start >= limit:
                break
            if unit.end <= device_len:  # the tree has it already
                end = unit.end
                continue
            hit = next((k for k in units.exact_keys(i) if self.store.contains(k)), None)
            if hit is None:
                break
            entries.append((hit, unit))
            end = unit.end
        approx: list[tuple[str, Unit]] = []
        exact_end = end
        if self.settings.reuse and units.hinted:
            for i in range(len(entries) + sum(u.end <= device_len for u in units.prefix), len(units.prefix)):
                chunk = units.chunk[i]
                if chunk is None or chunk.start >= limit or not self.store.contains(chunk.key):
                    break
                approx.append((chunk.key, chunk))
                end = chunk.end
        end = min(end, limit) // self.page_size * self.page_size
        if end <= device_len:
            return None
        token_ids = key.raw_token_ids()[:end]
        snapshot = RadixKey(array("q", token_ids), key.extra_key, cache_salt=key.cache_salt)
        approx = [(k, u) for k, u in approx if u.start < end]
        return _LoadPlan(snapshot, base.last_device_node, device_len, end,
                         [(k, u) for k, u in entries if u.start < end],
                         approx_from=max(exact_end, device_len) if approx else None, approx=approx)

    # ---------------------------------------------------------------- load
    def init_load_back(self, params: InitLoadBackParams):
        req = params.req
        node = params.best_match_node
        plan = self._plans.pop(req.cache_request_handle, None) if req is not None else None
        if plan is None:
            return 0, node
        n = plan.end - plan.device_len
        loaded = self._load(plan, node, params.host_hit_length, private=req.cache_request_handle
                            if self.settings.reuse else None)
        if loaded is None:
            self.kdn_stats.failed_loads += 1
            return 0, node
        self.kdn_stats.loads += 1
        self.kdn_stats.loaded_tokens += n
        return n, loaded

    def _load(self, plan: _LoadPlan, node: TreeNode, promised: int,
              private: CacheRequestHandle | None = None) -> Optional[TreeNode]:
        """Load the plan into new slots: grafted under ``node`` (exact loads), or kept for request
        ``private`` (reuse mode). Returns the request's new last node; None when nothing was loaded."""
        n = plan.end - plan.device_len
        if promised != n or node is not plan.node or len(self.path_device_indices(node)) != plan.device_len:
            log.info("the tree changed since match_prefix; not loading %d stored tokens", n)
            return None
        rest = plan.key[plan.device_len : plan.end]
        if rest.child_key(self.page_size) in node.children:  # another request inserted these meanwhile
            return None
        kv = self._read(plan)
        if kv is None:
            return None
        if self.token_to_kv_pool_allocator.available_size() < n:
            self.evict(EvictParams(num_tokens=n))
        slots = self.token_to_kv_pool_allocator.alloc(n)
        if slots is None:
            log.info("no room for %d stored tokens after eviction; recomputing them", n)
            return None
        write_pool_kv(self.kvcache, slots, kv)
        if private is not None:
            self._drop_private(private)
            self._private[private] = _Private(slots.to(torch.int64), plan.approx_from)
            return node
        new = TreeNode(priority=node.priority)
        new.key = rest
        new.value = slots.to(torch.int64)
        new.parent = node
        node.children[rest.child_key(self.page_size)] = new
        self.evictable_size_ += n
        self._update_leaf_status(node)
        self._update_leaf_status(new)
        self.kv_events.record_store(new)
        return new

    def _verified(self, key: str, unit: Unit, geometry: Geometry):
        """The ChunkKV under ``key`` if it holds ``unit`` (ids, positions after its context, the pool's
        geometry: ``kdn_hf.resolve.entry_mismatch``, the check the HF path makes); else None, and an
        entry that does not is counted corrupt and removed."""
        chunk, _tier = self.store.get(key, self.fingerprint)
        if chunk is None:
            return None
        why = entry_mismatch(chunk, unit.ids, expected_positions(unit), geometry)
        if why is not None:
            log.warning("entry %s does not hold what its key promises (%s); removed", key, why)
            self.store.note_corrupt(key)
            self.kdn_stats.corrupt += 1
            return None
        return chunk

    def _read(self, plan: _LoadPlan) -> Optional[torch.Tensor]:
        """The planned KV [layers, 2, kv_heads, end - device_len, head_dim], every entry verified; None if any fails."""
        layers, heads, head_dim, dtype = pool_geometry(self.kvcache)
        geometry = Geometry(layers, heads, head_dim, dtype)
        parts = []
        for key, unit in plan.entries:
            chunk = self._verified(key, unit, geometry)
            if chunk is None:
                return None
            lo, hi = max(unit.start, plan.device_len), min(unit.end, plan.end)
            parts.append(chunk.kv[:, :, :, lo - unit.start : hi - unit.start])
        for key, unit in plan.approx:
            chunk = self._verified(key, unit, geometry)
            if chunk is None:
                return None
            p0 = unit.context_start
            lo, hi = max(unit.start, plan.device_len), min(unit.end, plan.end)
            kv = chunk.kv[:, :, :, lo - unit.start : hi - unit.start].clone()
            for layer in range(layers):  # K from its stored positions p0.. to its prompt positions unit.start..
                kv[layer, 0] = rerotate_layer(kv[layer, 0], unit.start - p0, self.rope_spec, layer)
            parts.append(kv)
        kv = torch.cat(parts, dim=3) if len(parts) > 1 else parts[0]
        if kv.shape[3] != plan.end - plan.device_len:  # units do not tile the planned span: a bug, not a miss
            raise RuntimeError(f"planned {plan.end - plan.device_len} tokens but the entries hold {kv.shape[3]}")
        return kv

    # ---------------------------------------------------------------- store-back
    def checkpoint(self, req, *, up_to: int) -> None:
        private = self._private.get(req.cache_request_handle)
        approx_from = private.approx_from if private is not None else None
        if approx_from is None:
            super().checkpoint(req, up_to=up_to)
        else:
            self._checkpoint_exact(req, up_to=up_to, exact_len=approx_from)
        if self.disable:
            return
        self._drain()
        prompt_len = len(req.origin_input_ids)
        if up_to < prompt_len or req.cache_request_handle in self._stored:
            return
        self._stored.add(req.cache_request_handle)
        self._store_prompt(req, prompt_len if approx_from is None else approx_from)

    def _checkpoint_exact(self, req, *, up_to: int, exact_len: int) -> None:
        """RadixCache.checkpoint with the tree insert cut at ``exact_len``: tokens from there on
        were loaded re-rotated (or computed after such tokens) and stay the request's."""
        if self.disable:
            return
        limit = exact_len // self.page_size * self.page_size
        if req.kv.swa_evict_floor > 0:
            raise RuntimeError("sliding-window state under the kdn backend (refused at start-up)")
        radix_key, _, _ = self._insert_cache(req, req.full_untruncated_fill_ids[:up_to], key_limit=limit)
        new_last_node = self.match_prefix(MatchPrefixParams(key=radix_key)).last_device_node
        new_indices = self.path_device_indices(new_last_node)
        if len(new_indices) > req.kv.cache_protected_len:
            self.req_to_token_pool.write(
                (req.kv.req_pool_idx, slice(req.kv.cache_protected_len, len(new_indices))),
                new_indices[req.kv.cache_protected_len :],
            )
        req.kv.cache_protected_len = max(req.kv.cache_protected_len, len(new_indices))
        self.unlock(req.lock)
        req.lock = self.lock(new_last_node)
        req.last_node = new_last_node

    def _store_prompt(self, req, prompt_len: int) -> None:
        """Store the units of the prompt's first ``prompt_len`` ids (those before any approximate token)."""
        units = self._req_units(req)
        entries = [(key, unit) for i, unit in enumerate(units.prefix) if unit.end <= prompt_len
                   for key in units.exact_keys(i)]
        if not entries:
            return
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :prompt_len].to(torch.int64).clone()
        locked = min(req.kv.cache_protected_len, prompt_len)  # tree-owned: on the path to req.last_node
        tail = read_pool_kv(self.kvcache, row[locked:])       # the request's own slots: copy them now
        node = req.last_node
        self.inc_lock_ref(node)
        task = StoreTask(entries, row[:locked], tail)
        task_id = self._writer.submit(task, wait=self._drain)
        self._inflight[task_id] = node
        self.kdn_stats.store_tasks += 1
