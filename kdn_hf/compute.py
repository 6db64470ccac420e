"""Running the model to produce KV: where kdn_hf calls ``forward`` for prefill (a suffix after cached KV
runs layer by layer in ``kdn_hf.suffix``)."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache

from kdn_hf.compat import cache_kwarg, output_cache
from kdn_hf.kv import ChunkKV


def stack_cache(cache, start: int = 0, end: int | None = None, row: int = 0) -> torch.Tensor:
    """[layers, 2, kv_heads, tokens, head_dim] of slots start:end of batch row ``row`` of a Cache."""
    return torch.stack(
        [torch.stack([layer.keys[row, :, start:end], layer.values[row, :, start:end]]) for layer in cache.layers]
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


#: a batch of chunks computed in one forward holds at most this many slots (padding included)
BATCH_TOKENS = 8192
#: and at most this share of its slots is padding (chunks of unequal length go to separate forwards)
BATCH_PADDING = 0.125


def batches(lengths: Sequence[int], max_tokens: int = BATCH_TOKENS, max_padding: float = BATCH_PADDING
            ) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first: each batch's rows padded to its
    longest fit ``max_tokens`` slots with at most ``max_padding`` of them padding (a sequence longer
    than ``max_tokens`` goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out:
            batch = out[-1]
            longest = lengths[batch[0]]
            used = sum(lengths[j] for j in batch) + lengths[i]
            slots = longest * (len(batch) + 1)
            if slots <= max_tokens and slots - used <= max_padding * slots:
                batch.append(i)
                continue
        out.append([i])
    return out


@torch.inference_mode()
def compute_chunks_kv(model, chunks: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[ChunkKV]:
    """Each chunk's KV computed on its own after its context, as :func:`compute_chunk_kv`, in as few
    forwards as lengths allow (``batches``): the sequences ``context + ids`` of a batch are padded at
    the end to its longest and run as one causal batch. Causal attention keeps every real token from
    seeing the padding after it, so each row's KV is its own prefill's (up to float rounding of the
    batched matmuls); the padding rows are dropped.

    chunks: ``(ids [tokens] int64, context [l] int64 or None)`` per chunk. Returns their ChunkKV, in order.
    """
    seqs = [ids if context is None or not context.numel() else torch.cat([context, ids]) for ids, context in chunks]
    kvs: list[ChunkKV | None] = [None] * len(chunks)
    for batch in batches([s.numel() for s in seqs]):
        if len(batch) == 1:
            ids, context = chunks[batch[0]]
            kvs[batch[0]] = compute_chunk_kv(model, ids, context=context)
            continue
        width = seqs[batch[0]].numel()
        rows = torch.zeros(len(batch), width, dtype=torch.long)  # padding id 0: its rows are dropped
        for r, i in enumerate(batch):
            rows[r, :seqs[i].numel()] = seqs[i]
        device = model.device
        out = model(input_ids=rows.to(device),
                    position_ids=torch.arange(width, device=device).expand(len(batch), width),
                    use_cache=True, logits_to_keep=1, **{cache_kwarg(model): DynamicCache()})
        cache = output_cache(out)
        for r, i in enumerate(batch):
            ids = chunks[i][0]
            l = seqs[i].numel() - ids.numel()
            kvs[i] = ChunkKV(kv=stack_cache(cache, l, l + ids.numel(), row=r).contiguous(),
                             positions=torch.arange(l, l + ids.numel()), token_ids=ids.clone())
    return kvs
