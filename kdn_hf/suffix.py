"""Prefilling the tokens that follow cached KV, written into the cache's own buffer.

    prefill_into(model, buf, start, ids)    # buf[:, :, :, start:start + len(ids)] = their KV

``prefix`` mode loads the KV of a prompt's leading tokens and computes the rest after it. Stock
transformers runs such a suffix through a materialised mask, and SDPA with a mask computes the
whole ``rows x keys`` rectangle, twice a causal prefill's work when the suffix is most of the
prompt: slower than not caching at all. Here the decoder layers run through the layer runner
(``kdn_hf.blend.runner``): a Llama-style layer attends with
:func:`kdn_hf.kernels.causal_attention` (bottom-right causal: the causal square where the suffix
is at least half the keys, flash-attn where installed); any other layer the runner knows gets the
runner's causal mask. The K/V go straight into the buffer's slots (no cache grows, nothing is
stacked or copied). A model the runner cannot run exactly goes through its own forward over a
:class:`~kdn_hf.cache.KDNCache` on the same buffer (in place as well; the masked path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdn_hf.blend.runner import ScatterCache, _grouped_layer, causal_mask, layer_runner
from kdn_hf.cache import KDNCache
from kdn_hf.compute import prefill
from kdn_hf.kernels import causal_attention


@dataclass(frozen=True)
class _Suffix:
    """The rows a layer runs: ``rows`` [n] int64, the slots (= positions) start..start+n-1."""

    rows: torch.Tensor


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Bottom-right causal attention of the last rows of the keys: [1, rows, heads * head_dim].

    q: [1, heads, rows, head_dim]; keys, values: [1, kv_heads, tokens, head_dim] (the rows' own last)."""
    o = causal_attention(q, keys, values, scale=scale)  # [1, heads, rows, head_dim]
    return o.transpose(1, 2).reshape(1, q.shape[2], -1)


@torch.inference_mode()
def prefill_into(model, buf: torch.Tensor, start: int, ids: torch.Tensor,
                 last_hidden: bool = False) -> torch.Tensor | None:
    """Compute the KV of ``ids`` at positions ``start..start+n-1``, after the KV in ``buf``'s first
    ``start`` slots, and write it into slots ``start..start+n-1`` of ``buf``.

    buf: [layers, 2, kv_heads, slots, head_dim], the model's dtype and device; slots 0..start-1 hold
         the KV of the tokens before (at positions 0..start-1), and slots >= start + n are untouched.
    ids: [n] int64.
    last_hidden: also return the last layer's output [hidden] for the last of ``ids`` (its next-token
         logits are ``LayerRunner.logits`` of it); needs a model the runner runs
         (``layer_runner(model).blend_error is None``), else a ValueError. Otherwise returns None.
    """
    n = ids.numel()
    end = start + n
    if end > buf.shape[3]:
        raise ValueError(f"buf has {buf.shape[3]} slots, {start} cached + {n} new tokens do not fit")
    if n == 0:
        if last_hidden:
            raise ValueError("last_hidden needs at least one new token")
        return None
    runner = layer_runner(model)
    runner.check()  # once per model (KDN construction has usually run it)
    if runner.blend_error is not None:  # not a model the runner runs exactly: its own forward
        if last_hidden:
            raise ValueError(f"last_hidden needs a model the layer runner runs: {runner.blend_error}")
        cache = KDNCache(buf[:, :, :, :start], torch.arange(start), torch.zeros(start, dtype=torch.long),
                         capacity=buf)
        prefill(model, ids, torch.arange(start, end), cache=cache)
        return None
    device = buf.device
    rows = torch.arange(start, end, device=device)
    hidden = runner.embed(ids.to(device))  # [1, n, hidden]
    tables = runner.position_tables(hidden, rows)  # {rope_key: (cos, sin) [1, n, head_dim]}
    cache = ScatterCache(buf[:, :, :, :end])
    cache.measure = False
    cache.first_row = start  # the rows are contiguous: their K/V go in by slice
    suffix = _Suffix(rows)
    masks: dict = {}
    last = len(runner.layers) - 1
    for i, (layer, plan) in enumerate(zip(runner.layers, runner.plans)):
        pos_emb = tables[plan.rope_key]
        if plan.grouped:
            h_in = hidden
            hidden = _grouped_layer(layer, hidden, suffix, pos_emb, cache, kv_only=i == last, attend=_attend)
            if i == last and last_hidden:  # the whole layer for the last row only (its K/V rewritten, the same)
                one = (pos_emb[0][:, -1:], pos_emb[1][:, -1:])
                cache.first_row = end - 1
                hidden = _grouped_layer(layer, h_in[:, -1:], _Suffix(rows[-1:]), one, cache, attend=_attend)
            continue
        if plan.window not in masks:
            masks[plan.window] = causal_mask(rows, end, hidden.dtype, device, plan.window)
        cache.rows = rows
        out = layer(hidden, attention_mask=masks[plan.window], position_ids=rows[None], position_embeddings=pos_emb,
                    use_cache=True, **{runner.kv_name: cache})
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden[0, -1] if last_hidden else None
