"""Running the model to produce KV: the one place kdn_hf calls ``forward`` for prefill."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from kdn_hf.compat import cache_kwarg, output_cache
from kdn_hf.kv import ChunkKV


def stack_cache(cache, start: int = 0, end: int | None = None) -> torch.Tensor:
    """[layers, 2, kv_heads, tokens, head_dim] of slots start:end of a batch-1 Cache."""
    return torch.stack(
        [torch.stack([layer.keys[0, :, start:end], layer.values[0, :, start:end]]) for layer in cache.layers]
    )


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, positions: torch.Tensor, cache=None):
    """Forward ``ids`` [tokens] at ``positions`` [tokens] after ``cache`` (or none).

    Returns (cache, logits [vocab] of the last position)."""
    device = model.device
    cache = cache if cache is not None else DynamicCache()
    out = model(
        input_ids=ids.to(device)[None],
        position_ids=positions.to(device)[None],
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg(model): cache},
    )
    return output_cache(out), out.logits[0, -1]


def compute_chunk_kv(model, ids: torch.Tensor, *, context: torch.Tensor | None = None) -> ChunkKV:
    """A chunk's KV computed on its own, after ``context`` (e.g. BOS, or BOS + a lead-in) if given.

    ids: [tokens] int64. context: [l] int64 or None. The chunk's positions are
    l..l+tokens-1; the context's own KV is not part of the result.
    """
    l = 0 if context is None else context.numel()
    full = ids if not l else torch.cat([context, ids])
    cache, _ = prefill(model, full, torch.arange(full.numel()))
    return ChunkKV(
        kv=stack_cache(cache, l).contiguous(),
        positions=torch.arange(l, l + ids.numel()),
        token_ids=ids.clone(),
    )
