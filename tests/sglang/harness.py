"""A simulated SGLang server for CPU tests: real pools, allocators, Req objects and KDNRadixCache,
driven the way SGLang's scheduler drives them (init_next_round_input, the admission's init_load_back,
alloc + row write, checkpoint_kv_cache, release_kv_cache); only the model forward is replaced by
``kv_fn``, which returns the KV the model would write at the given positions."""

from __future__ import annotations

from array import array
from typing import Callable

import torch
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.allocation import alloc_paged_token_slots_extend, alloc_token_slots
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.sampling.sampling_params import SamplingParams

from kdn_hf.integrations.sglang.cache import KDNRadixCache
from kdn_hf.integrations.sglang.settings import KDNSettings

KVFn = Callable[[list[int], torch.Tensor], torch.Tensor]  # (prompt ids, positions [T]) -> [L, 2, H, T, D]


class SimServer:
    def __init__(self, store, fingerprint: str, *, page_size: int, layers: int, heads: int, head_dim: int,
                 dtype=torch.float32, size: int = 1024, settings: KDNSettings | None = None, rope_spec=None) -> None:
        self.pool = MHATokenToKVPool(size=size, page_size=page_size, dtype=dtype, head_num=heads, head_dim=head_dim,
                                     layer_num=layers, device="cpu", enable_memory_saver=False)
        if page_size == 1:
            self.alloc = TokenToKVPoolAllocator(size, dtype, "cpu", self.pool, need_sort=False)
        else:
            self.alloc = PagedTokenToKVPoolAllocator(size, page_size, dtype, "cpu", self.pool, need_sort=False)
        self.req_to_token = ReqToTokenPool(size=16, max_context_len=2048, device="cpu", enable_memory_saver=False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.req_to_token,
                                 token_to_kv_pool_allocator=self.alloc, page_size=page_size)
        self.cache = KDNRadixCache(params, store=store, fingerprint=fingerprint,
                                   settings=settings or KDNSettings(block_tokens=32), rope_spec=rope_spec)
        self.page_size = page_size
        self.size = size

    def request(self, rid: str, ids, *, custom_params=None, extra_key=None, cache_salt=None) -> Req:
        sp = SamplingParams(max_new_tokens=4, custom_params=custom_params)
        sp.normalize(None)
        return Req(rid, "", array("q", ids), sp, extra_key=extra_key, cache_salt=cache_salt)

    def admit(self, req: Req) -> int:
        """Match (as Req.init_next_round_input does) and admit (the scheduler's load-back): returns the
        number of tokens loaded from the store."""
        req.init_next_round_input(self.cache)
        loaded = 0
        if req.host_hit_length > 0:
            pin = self.cache.lock(req.last_node)  # the admission pins the match while it loads
            try:
                promised = req.host_hit_length
                loaded, req.last_node = self.cache.init_load_back(
                    InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=promised, req=req))
            finally:
                self.cache.unlock(pin)
            assert loaded in (0, promised), "SGLang's admission raises unless all or nothing is loaded"
            req.host_loaded_length = loaded
            req.prefix_len += loaded
            if self.cache.load_back_is_cache_owned():
                req.kv.cache_protected_len = req.prefix_len
        req.extend_end = len(req.full_untruncated_fill_ids)
        req.lock = self.cache.lock(req.last_node)
        return loaded

    def prefill(self, req: Req, kv_fn: KVFn) -> torch.Tensor:
        """Allocate the row and the extend slots as alloc_for_extend does, have ``kv_fn`` write the
        extend's KV into the pool, then checkpoint (a prefilled, unfinished request). Returns the row."""
        prefix = self.cache.prefix_device_indices(req).to(torch.int64) if req.prefix_len else torch.empty(0, dtype=torch.int64)
        (row_idx,) = self.req_to_token.alloc([req])
        seq_len, pre = req.extend_end, req.prefix_len
        if self.page_size == 1:
            out = alloc_token_slots(self.cache, seq_len - pre)
        else:
            last = prefix[-1:] if len(prefix) else torch.full((1,), -1, dtype=torch.int64)
            out = alloc_paged_token_slots_extend(
                tree_cache=self.cache, prefix_lens=torch.tensor([pre]), prefix_lens_cpu=torch.tensor([pre]),
                seq_lens=torch.tensor([seq_len]), seq_lens_cpu=torch.tensor([seq_len]), last_loc=last,
                extend_num_tokens=seq_len - pre)
        row = self.req_to_token.req_to_token[row_idx]
        row[:pre] = prefix.to(row.dtype)
        row[pre:seq_len] = out.to(row.dtype)
        req.kv.kv_allocated_len = req.kv.kv_committed_len = seq_len
        ids = list(req.origin_input_ids)
        kv = kv_fn(ids, torch.arange(pre, seq_len))
        for layer in range(self.pool.layer_num):
            self.pool.set_kv_buffer(None, out, kv[layer, 0].transpose(0, 1), kv[layer, 1].transpose(0, 1),
                                    layer_id_override=layer)
        checkpoint_kv_cache(req, self.cache)
        return row[:seq_len].clone()

    def finish(self, req: Req) -> None:
        req.finished_reason = FINISH_LENGTH(length=0)
        release_kv_cache(req, self.cache, checkpoint=True)

    def serve(self, rid: str, ids, kv_fn: KVFn, **kw) -> tuple[int, torch.Tensor]:
        """One whole request: admit, prefill, finish. Returns (tokens loaded, the prompt's row of slots)."""
        req = self.request(rid, ids, **kw)
        loaded = self.admit(req)
        row = self.prefill(req, kv_fn)
        self.finish(req)
        return loaded, row

    def pool_kv(self, slots: torch.Tensor) -> torch.Tensor:
        from kdn_hf.integrations.sglang.pool_io import read_pool_kv

        return read_pool_kv(self.pool, slots)

    def free_slots(self) -> int:
        return self.alloc.available_size()
