"""One store, two engines: KV ingested by the HF path is loaded bit-identically into a real SGLang pool,
and KV in the pool stored back is a hit for the HF path. Real SmolLM2-135M, fp32, CPU."""

from __future__ import annotations

import pytest
import torch

from kdn_hf import KDN
from kdn_hf.compute import prefill, stack_cache
from kdn_hf.integrations.sglang.client import kdn_request
from kdn_hf.store import open_store

from harness import SimServer

DOC_A = "The Lindqvist valve regulates coolant flow in the Mark IV reactor. It opens at 78 degrees Celsius."
DOC_B = "Maintenance crews inspect the valve every 400 operating hours and replace its seal every 2000 hours."
QUESTION = "Question: At what temperature does the valve open?\nAnswer:"


@pytest.fixture(scope="module")
def smol():
    from kdn_hf import models

    return models.load("smollm2-135m")  # fp32; converted once into KDN_HOME


def sim(store, kdn, page_size):
    cfg = kdn.model.config
    return SimServer(store, kdn.fingerprint.digest, page_size=page_size, layers=cfg.num_hidden_layers,
                     heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads, size=512)


def hf_forward(model):
    """kv_fn of the simulated server: what the model writes at ``positions`` (full prefill of the prompt)."""
    memo = {}

    def kv_fn(ids, positions):
        if tuple(ids) not in memo:
            cache, _ = prefill(model, torch.tensor(ids), torch.arange(len(ids)))
            memo[tuple(ids)] = stack_cache(cache)
        return memo[tuple(ids)][:, :, :, positions]

    return kv_fn


@pytest.mark.parametrize("page_size", [1, 16])
def test_hf_ingested_kv_loads_bit_identically_into_the_pool(smol, page_size):
    model, tok = smol
    kdn = KDN(model, tok, store=open_store("memory://"))
    (key,) = kdn.ingest([DOC_A])
    stored = kdn.store.get(key, kdn.fingerprint.digest).chunk
    req = kdn_request(tok, [DOC_A, QUESTION], max_new_tokens=8)
    server = sim(kdn.store, kdn, page_size)
    r = server.request("r", req.input_ids, custom_params=req.sampling_params["custom_params"])
    loaded = server.admit(r)
    start = stored.positions[0].item()  # the chunk sits where it was computed: after the opener
    n = (start + stored.num_tokens) // page_size * page_size
    assert loaded == n and server.cache.kdn_stats.loads == 1
    pool_kv = server.pool_kv(server.cache.prefix_device_indices(r))
    for layer in range(stored.kv.shape[0]):  # per layer, K and V, bit for bit
        assert torch.equal(pool_kv[layer, :, :, start:n], stored.kv[layer, :, :, : n - start]), layer
    server.prefill(r, hf_forward(model))
    server.finish(r)


@pytest.mark.parametrize("page_size", [1, 16])
def test_kv_stored_from_the_pool_is_a_prefix_hit_for_hf(smol, page_size):
    model, tok = smol
    store = open_store("memory://")
    kdn = KDN(model, tok, store=store)
    req = kdn_request(tok, [DOC_A, DOC_B, QUESTION], max_new_tokens=8)
    server = sim(store, kdn, page_size)
    server.serve("r", req.input_ids, hf_forward(model), custom_params=req.sampling_params["custom_params"])
    server.cache.wait_for_stores()
    cache = kdn.prepare([DOC_A, DOC_B], mode="prefix")
    assert cache.stats.misses == 0 and cache.stats.tokens_computed == 0
    assert sum(cache.stats.hits.values()) == len([DOC_A, DOC_B]) + len(kdn.lead_in)
    reuse = kdn.prepare([DOC_A, DOC_B], mode="reuse")  # the first chunk is also stored as a chunk entry
    assert sum(reuse.stats.hits.values()) >= 1 + len(kdn.lead_in)


@pytest.mark.parametrize("page_size", [1, 16])
def test_opt_in_reuse_loads_rerotated_chunks_request_owned(smol, page_size):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    from kdn_hf.integrations.sglang.settings import KDNSettings
    from kdn_hf.rope import rope_spec_from_config

    model, tok = smol
    kdn = KDN(model, tok, store=open_store("memory://"))
    kdn.ingest([DOC_A, DOC_B])
    cfg = model.config
    server = SimServer(kdn.store, kdn.fingerprint.digest, page_size=page_size, layers=cfg.num_hidden_layers,
                       heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads, size=512,
                       settings=KDNSettings(block_tokens=32, reuse=True), rope_spec=rope_spec_from_config(cfg))
    assert not server.cache.load_back_is_cache_owned()
    req = kdn_request(tok, [DOC_B, DOC_A, QUESTION])
    hints = req.sampling_params["custom_params"]
    b_end = len(kdn.lead_in) + hints["kdn_chunks"][0]
    a_end = b_end + hints["kdn_chunks"][1]
    r = server.request("r", req.input_ids, custom_params=hints)
    loaded = server.admit(r)
    n = a_end // page_size * page_size
    assert loaded == n
    # what the HF path composes for the same chunks (its own re-rotation): the pool holds the same KV
    hf = stack_cache(kdn.prepare([DOC_B, DOC_A], mode="reuse"))
    pool = server.pool_kv(server.cache.prefix_device_indices(r))
    torch.testing.assert_close(pool, hf[:, :, :, :n], rtol=0, atol=1e-6)
    assert server.cache.evictable_size() == 0  # nothing loaded joined the shared tree
    server.prefill(r, hf_forward(model))
    server.finish(r)
    server.cache.wait_for_stores()
    # the tree took the exact part only (up to doc_a, which was re-rotated), page-aligned
    assert server.cache.total_size() == b_end // page_size * page_size
    server.cache.evict(EvictParams(num_tokens=10_000))
    assert server.free_slots() == server.size


def test_reuse_load_then_abort_frees_the_private_slots(smol):
    from kdn_hf.integrations.sglang.settings import KDNSettings
    from kdn_hf.rope import rope_spec_from_config

    model, tok = smol
    kdn = KDN(model, tok, store=open_store("memory://"))
    kdn.ingest([DOC_A, DOC_B])
    cfg = model.config
    server = SimServer(kdn.store, kdn.fingerprint.digest, page_size=1, layers=cfg.num_hidden_layers,
                       heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads, size=512,
                       settings=KDNSettings(block_tokens=32, reuse=True), rope_spec=rope_spec_from_config(cfg))
    req = kdn_request(tok, [DOC_B, DOC_A, QUESTION])
    r = server.request("r", req.input_ids, custom_params=req.sampling_params["custom_params"])
    assert server.admit(r) > 0 and server.free_slots() < server.size
    server.cache.release_aborted_request(r.cache_request_handle)
    server.cache.unlock(r.lock)
    assert server.free_slots() == server.size
