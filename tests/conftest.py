"""Fixtures shared by every test directory (no model needed)."""

from __future__ import annotations

import pytest
import torch

from kdn_hf.kv import ChunkKV


@pytest.fixture
def make_chunk():
    """Factory of small random ChunkKV: kv [layers, 2, kv_heads, tokens, head_dim] of ``dtype``,
    positions ``start .. start+tokens-1``, random token ids, optional meta."""

    def make(
        tokens: int = 5,
        dtype: torch.dtype = torch.float16,
        layers: int = 2,
        kv_heads: int = 2,
        head_dim: int = 4,
        start: int = 0,
        seed: int = 0,
        meta: dict[str, str] | None = None,
    ) -> ChunkKV:
        g = torch.Generator().manual_seed(seed)
        kv = torch.randn(layers, 2, kv_heads, tokens, head_dim, generator=g).to(dtype)
        positions = torch.arange(start, start + tokens, dtype=torch.int64)
        token_ids = torch.randint(0, 50_000, (tokens,), generator=g, dtype=torch.int64)
        return ChunkKV(kv=kv, positions=positions, token_ids=token_ids, meta=dict(meta or {}))

    return make
