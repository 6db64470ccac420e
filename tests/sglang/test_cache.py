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
