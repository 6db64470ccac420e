"""KDNRadixCache over real SGLang pools, allocators and Req objects (synthetic KV, no model)."""

from __future__ import annotations

import threading

import pytest
import torch

from kdn_hf.store import open_store

from harness import SimServer

LAYERS, HEADS, HEAD_DIM = 3, 2, 8
FP = "f" * 32  # a model fingerprint digest


def kv_fn(ids, positions):
    """KV that depends on each token and its position (what a model writes), [L, 2, H, T, D] fp32."""
    tok = torch.tensor([ids[p] for p in positions.tolist()], dtype=torch.float32)
    pos = positions.to(torch.float32)
    grid = (torch.arange(LAYERS)[:, None, None, None, None] * 1.0 + torch.arange(2)[None, :, None, None, None] * 0.5
            + torch.arange(HEADS)[None, None, :, None, None] * 0.25 + torch.arange(HEAD_DIM)[None, None, None, None, :] * 0.125)
    return torch.sin(grid + tok[None, None, None, :, None] * 0.01 + pos[None, None, None, :, None] * 0.1)


def server(store, page_size, **kw):
    return SimServer(store, FP, page_size=page_size, layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, **kw)


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 30_000, (n,), generator=g).tolist()


@pytest.fixture(params=[1, 16], ids=["page1", "page16"])
def page_size(request):
    return request.param


def test_stored_prompt_is_loaded_by_a_second_server(page_size):
    store = open_store("memory://")
    ids = prompt(100)
    a = server(store, page_size)
    loaded, _ = a.serve("a1", ids, kv_fn)
    assert loaded == 0
    a.cache.wait_for_stores()
    assert a.cache.kdn_stats.stored_entries == 3  # 32-token blocks: 3 whole blocks of 100 ids

    b = server(store, page_size)
    req = b.request("b1", ids)
    loaded = b.admit(req)
    assert loaded == 96  # whole blocks within the match limit (99 = prompt - 1), page-aligned
    slots = b.cache.prefix_device_indices(req)
    assert len(slots) == 96
    assert torch.equal(b.pool_kv(slots), kv_fn(ids, torch.arange(96)))
    row = b.prefill(req, kv_fn)  # the rest (4 ids) is computed after the loaded prefix
    assert torch.equal(b.pool_kv(row), kv_fn(ids, torch.arange(100)))
    b.finish(req)


def test_chunk_hints_make_one_entry_per_chunk_and_exact_chunk_entries(page_size):
    store = open_store("memory://")
    opener, chunks = [1], [prompt(40, 1), prompt(23, 2), prompt(9, 3)]
    ids = opener + [i for c in chunks for i in c]
    hints = {"kdn_opener": 1, "kdn_chunks": [len(c) for c in chunks]}
    a = server(store, page_size)
    a.serve("a1", ids, kv_fn, custom_params=hints)
    a.cache.wait_for_stores()
    # prefix entries for the opener and the 3 chunks, plus chunk entries where exact: the opener, the first chunk
    assert a.cache.kdn_stats.stored_entries == 6
    units = a.cache.units_of(ids, hints, None, None)
    assert [len(u.ids) for u in units.prefix] == [1, 40, 23, 9]
    assert [u.exact for u in units.chunk] == [True, True, False, False]

    b = server(store, page_size)
    req = b.request("b1", ids, custom_params=hints)
    expected = (len(ids) - 1) // page_size * page_size  # the last id is never matched
    assert b.admit(req) == expected
    assert torch.equal(b.pool_kv(b.cache.prefix_device_indices(req)), kv_fn(ids, torch.arange(expected)))
    b.prefill(req, kv_fn)
    b.finish(req)


def test_namespaces_isolate(page_size):
    store = open_store("memory://")
    ids = prompt(70)
    a = server(store, page_size)
    a.serve("a1", ids, kv_fn, cache_salt="tenant-a")
    a.cache.wait_for_stores()
    b = server(store, page_size)
    for i, kw in enumerate([{}, {"cache_salt": "tenant-b"}, {"extra_key": "tenant-a"},
                            {"extra_key": "lora-1", "cache_salt": "tenant-a"}]):
        assert b.admit(b.request(f"miss{i}", ids, **kw)) == 0, kw
    assert b.admit(b.request("hit", ids, cache_salt="tenant-a")) == 64
    ns = {b.cache.units_of(ids, None, e, s).prefix[0].key for e, s in
          [(None, None), ("", None), (None, ""), ("a", None), (None, "a"), ("a", "b"), ("ab", None), ("a", "")]}
    # an empty cache_salt is none (as Req and RadixKey treat it); an empty extra_key is not, and "a"+"b" is not "ab"+none
    assert len(ns) == 6


def test_inflight_store_keeps_its_slots_locked_and_eviction_returns_every_slot(page_size):
    store = open_store("memory://")
    gate = threading.Event()
    put = store.put

    def slow_put(*args, **kwargs):
        gate.wait(timeout=30)
        put(*args, **kwargs)

    store.put = slow_put
    s = server(store, page_size)
    ids = prompt(100)
    _, row = s.serve("r1", ids, kv_fn)
    tree_slots = row[:96]  # page-aligned part the tree took over (the whole prompt with page size 1)
    if page_size == 1:
        tree_slots = row
    assert s.cache.protected_size() >= len(tree_slots)  # the store-back holds a lock on the prompt's path
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    s.cache.evict(EvictParams(num_tokens=10_000))
    assert s.free_slots() == s.size - len(tree_slots)  # nothing the store still reads was freed
    assert torch.equal(s.pool_kv(tree_slots), kv_fn(ids, torch.arange(len(tree_slots))))
    gate.set()
    s.cache.wait_for_stores()
    assert s.cache.protected_size() == 0
    s.cache.evict(EvictParams(num_tokens=10_000))
    assert s.free_slots() == s.size and s.cache.evictable_size() == 0
    assert s.cache.kdn_stats.stored_entries == 3


def test_loaded_slots_are_evictable_and_returned(page_size):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    store = open_store("memory://")
    ids = prompt(100)
    server(store, page_size).serve("a", ids, kv_fn)
    b = server(store, page_size)
    b.cache.wait_for_stores()
    b.serve("b", ids, kv_fn)
    b.cache.wait_for_stores()
    b.cache.evict(EvictParams(num_tokens=10_000))
    assert b.free_slots() == b.size


def test_a_corrupt_entry_is_a_miss(page_size):
    store = open_store("memory://")
    ids = prompt(100)
    a = server(store, page_size)
    a.serve("a", ids, kv_fn)
    a.cache.wait_for_stores()
    units = a.cache.units_of(ids, None, None, None)
    tier = store.tiers[0]
    data = bytearray(tier.get(units.prefix[1].key))
    data[-5] ^= 0xFF  # a bit flip in the tensor bytes
    tier.put(units.prefix[1].key, bytes(data))

    b = server(store, page_size)
    req = b.request("b", ids)
    assert b.admit(req) == 0  # planned 96 tokens (contains() is unverified), loaded none
    assert req.prefix_len == 0 and b.cache.kdn_stats.failed_loads == 1
    assert b.free_slots() == b.size  # nothing allocated for the failed load
    assert tier.stats().corrupt == 1 and not store.contains(units.prefix[1].key)
    b.prefill(req, kv_fn)
    b.finish(req)
    b.cache.wait_for_stores()
    assert store.contains(units.prefix[1].key)  # recomputed and stored again


def test_an_entry_with_other_ids_is_counted_corrupt(page_size):
    from kdn_hf.kv import ChunkKV

    store = open_store("memory://")
    ids = prompt(64)
    s = server(store, page_size)
    unit = s.cache.units_of(ids, None, None, None).prefix[0]
    wrong = ChunkKV(kv_fn(ids, torch.arange(32)), torch.arange(32), torch.tensor(prompt(32, 9)))
    store.put(unit.key, wrong, FP)
    assert s.admit(s.request("r", ids)) == 0
    assert s.cache.kdn_stats.corrupt == 1 and not store.contains(unit.key)


def test_all_or_nothing_when_an_entry_vanishes_after_the_match(page_size):
    store = open_store("memory://")
    ids = prompt(100)
    a = server(store, page_size)
    a.serve("a", ids, kv_fn)
    a.cache.wait_for_stores()
    units = a.cache.units_of(ids, None, None, None)

    b = server(store, page_size)
    req = b.request("b", ids)
    req.init_next_round_input(b.cache)
    assert req.host_hit_length == 96
    store.delete(units.prefix[2].key)  # evicted by another server between match and admission
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams

    loaded, node = b.cache.init_load_back(InitLoadBackParams(req.best_match_node, req.host_hit_length, req=req))
    assert loaded == 0 and node is req.best_match_node
    assert b.free_slots() == b.size


def test_storing_waits_instead_of_dropping_when_the_writer_is_behind(page_size):
    from kdn_hf.integrations.sglang.settings import KDNSettings

    store = open_store("memory://")
    s = server(store, page_size, settings=KDNSettings(block_tokens=32, max_inflight=1))
    for i in range(4):
        s.serve(f"r{i}", prompt(70, seed=10 + i), kv_fn)
    s.cache.wait_for_stores()
    assert s.cache.kdn_stats.store_tasks == 4 and s.cache.kdn_stats.stored_entries == 8
