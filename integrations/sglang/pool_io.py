"""Copying KV between SGLang's token pool and kdn_hf's entry layout.

SGLang's ``MHATokenToKVPool`` keeps, per layer, ``k_buffer[l]`` and ``v_buffer[l]`` of shape
[slots, kv_heads, head_dim]; a kdn_hf entry holds kv [layers, 2, kv_heads, tokens, head_dim]
(``kdn_hf.kv``). K is post-RoPE in both, at the same positions, so a copy is a transpose.
"""

from __future__ import annotations

import torch


def pool_geometry(pool) -> tuple[int, int, int, torch.dtype]:
    """(layers, kv_heads, head_dim, dtype) of the pool's layers."""
    return pool.layer_num, pool.head_num, pool.head_dim, pool.dtype


def read_pool_kv(pool, slots: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """The KV in ``slots`` ([tokens] int64 slot ids) as [layers, 2, kv_heads, tokens, head_dim] on ``device``."""
    layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
    slots = slots.to(device=pool.device, dtype=torch.int64)
    # buffers: [slots, kv_heads, head_dim] -> gathered [tokens, kv_heads, head_dim] -> [kv_heads, tokens, head_dim]
    k = torch.stack([pool.get_key_buffer(l)[slots].transpose(0, 1) for l in layers])
    v = torch.stack([pool.get_value_buffer(l)[slots].transpose(0, 1) for l in layers])
    return torch.stack([k, v], dim=1).to(device)


def write_pool_kv(pool, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write kv [layers, 2, kv_heads, tokens, head_dim] into ``slots`` ([tokens]) of every layer,
    through the pool's own ``set_kv_buffer`` (its layout and store dtype)."""
    slots = slots.to(device=pool.device, dtype=torch.int64)
    kv = kv.to(pool.device)
    for i in range(pool.layer_num):
        # [kv_heads, tokens, head_dim] -> [tokens, kv_heads, head_dim], as the attention layers hand it over
        k, v = kv[i, 0].transpose(0, 1).contiguous(), kv[i, 1].transpose(0, 1).contiguous()
        pool.set_kv_buffer(None, slots, k, v, layer_id_override=pool.start_layer + i)
