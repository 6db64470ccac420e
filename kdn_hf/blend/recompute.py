"""Selective recompute: fix the composed KV of a prompt by re-running a few tokens.

Given the naively composed (re-rotated) KV of a context, ``recompute``:

1. runs layers ``< check_layer`` fresh for every token (layer 0 is cheap and,
   run on everything, exact), writing their KV;
2. at the check layer, runs only the K/V projections for every token (the
   attention is cut off right after ``cache.update``), which gives each token's
   exact K/V there and its deviation from the reused K/V;
3. asks the :class:`~kdn_hf.blend.selection.Selection` for the tokens to keep
   and pushes only those through the remaining layers, each attending to the
   whole context (fresh rows where recomputed, reused rows elsewhere).

It is a manual loop over the model's own decoder layers (stock modules, stock
attention kernels), with three ingredients:

- :class:`_ScatterCache`: its ``update`` writes the new rows into their slots of
  the full-length K/V and returns the full K/V, so the attention sees the whole
  context;
- explicit positions (the rotary cos/sin of each row's own slot);
- a 4D float additive mask [1, 1, rows, tokens]: row at position i sees keys at
  positions <= i only (a bool mask breaks the eager path; SDPA takes either).
  The CacheBlend and LMCache reference code let earlier selected tokens see
  later ones; this one does not.

Works for decoder-only HF models whose base model exposes ``embed_tokens``,
``rotary_emb`` and ``layers`` (Llama, Mistral, Qwen2/3, SmolLM, Gemma-style
without per-layer masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdn_hf.blend.selection import Selection, SelectionInput
from kdn_hf.compat import cache_kwarg
from kdn_hf.errors import ConfigError


class _Probed(Exception):
    """Raised by the cache to stop a layer right after its K/V projections (control flow only)."""


class _ScatterCache:
    """Full-length K/V that the attention of a layer reads, with the current rows scattered in.

    kv: [layers, 2, kv_heads, tokens, head_dim], updated in place.
    """

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.rows: torch.Tensor | None = None  # [n] slots of the rows being run
        self.probe = False
        self.measure = True  # compute dev_k/dev_v on update
        self.dev_k: torch.Tensor | None = None  # [n] float32, set by each update
        self.dev_v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states/value_states: [1, kv_heads, n, head_dim] for self.rows
        k_all, v_all = self.kv[layer_idx, 0], self.kv[layer_idx, 1]  # [kv_heads, tokens, head_dim]
        k_new, v_new = key_states[0].to(k_all.dtype), value_states[0].to(v_all.dtype)
        if self.measure:
            old_k, old_v = k_all[:, self.rows].float(), v_all[:, self.rows].float()
            self.dev_k = (k_new.float() - old_k).pow(2).sum(dim=(0, 2))
            self.dev_v = (v_new.float() - old_v).pow(2).sum(dim=(0, 2))
        k_all.index_copy_(1, self.rows, k_new)
        v_all.index_copy_(1, self.rows, v_new)
        if self.probe:
            raise _Probed
        return k_all[None], v_all[None]


def causal_mask(rows: torch.Tensor, num_keys: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, n, num_keys] additive mask: 0 where key position <= the row's position, else -inf.

    rows: [n] int64 positions (= slots) of the query rows.
    """
    keys = torch.arange(num_keys, device=device)
    allowed = keys[None, :] <= rows.to(device)[:, None]  # [n, num_keys]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@dataclass
class RecomputeResult:
    """selected: [n] int64 slots recomputed past the check layer (sorted).
    dev_k, dev_v: [tokens] float32 check-layer deviations (what selection saw)."""

    selected: torch.Tensor
    dev_k: torch.Tensor
    dev_v: torch.Tensor


def _decoder(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    for attr in ("embed_tokens", "rotary_emb", "layers"):
        if not hasattr(base, attr):
            raise ConfigError(
                f"{type(model).__name__}: blending needs a decoder with embed_tokens, rotary_emb and layers "
                f"(Llama-style); this one has no {attr!r}. Use mode='reuse' or mode='full'"
            )
    return base


class _Rows:
    """A set of query rows with what every layer needs for them, built once.

    mask is None when the rows are every slot 0..T-1 and the attention is SDPA: its own
    causal path (``is_causal``, top-left aligned, exact for that case) is faster. Eager
    attention applies no causality without a mask, so it always gets one.
    """

    def __init__(self, rows: torch.Tensor, num_keys: int, pos_emb, dtype, own_causal: bool) -> None:
        self.rows = rows
        every = rows.numel() == num_keys
        self.mask = None if every and own_causal else causal_mask(rows, num_keys, dtype, rows.device)
        cos, sin = pos_emb
        self.pos_emb = pos_emb if every else (cos[:, rows], sin[:, rows])


def _run_layer(layer, hidden, rs: _Rows, cache, kv_name):
    cache.rows = rs.rows
    out = layer(
        hidden,
        attention_mask=rs.mask,
        position_ids=rs.rows[None],
        position_embeddings=rs.pos_emb,
        use_cache=True,
        **{kv_name: cache},
    )
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def recompute(
    model,
    kv: torch.Tensor,
    token_ids: torch.Tensor,
    spans,
    ratio: float,
    selection: Selection,
) -> RecomputeResult:
    """Recompute ``ratio`` of the tokens of the composed context ``kv``, in place.

    kv:        [layers, 2, kv_heads, tokens, head_dim] composed KV at positions 0..tokens-1,
               model dtype and device; overwritten with the blended KV.
    token_ids: [tokens] int64 ids of the context.
    spans:     (start, end) slots of each chunk.
    ratio:     fraction of tokens pushed through the layers after the check layer, (0, 1].
    """
    base = _decoder(model)
    layers = base.layers[: kv.shape[0]]
    T = kv.shape[3]
    device = kv.device
    check = selection.check_layer
    if not 1 <= check < len(layers):
        raise ConfigError(f"check_layer must lie in [1, {len(layers)}), got {check}")
    kv_name = cache_kwarg(layers[0])  # `cache` on transformers >= 5.24
    dtype = kv.dtype
    own_causal = getattr(model.config, "_attn_implementation", None) == "sdpa"
    budget = min(T, max(1, round(ratio * T)))

    ids = token_ids.to(device)
    all_rows = torch.arange(T, device=device)
    hidden = base.embed_tokens(ids[None])  # [1, T, hidden]
    pos_emb = base.rotary_emb(hidden, position_ids=all_rows[None])  # cos/sin [1, T, head_dim]
    cache = _ScatterCache(kv)
    every = _Rows(all_rows, T, pos_emb, dtype, own_causal)

    cache.measure = False
    for i in range(check):  # every token, fresh: exact
        hidden = _run_layer(layers[i], hidden, every, cache, kv_name)

    cache.probe = cache.measure = True
    try:
        _run_layer(layers[check], hidden, every, cache, kv_name)
    except _Probed:
        pass
    finally:
        cache.probe = False
    dev_k, dev_v = cache.dev_k.cpu(), cache.dev_v.cpu()
    sel = selection.select(SelectionInput(dev_k, dev_v, tuple(tuple(s) for s in spans), budget))
    if sel.numel() == 0:
        return RecomputeResult(sel, dev_k, dev_v)
    rs = _Rows(sel.to(device), T, pos_emb, dtype, own_causal)
    hidden = hidden[:, rs.rows]
    for i in range(check, len(layers)):
        cache.measure = i in selection.narrow_at
        hidden = _run_layer(layers[i], hidden, rs, cache, kv_name)
        if cache.measure:
            keep = selection.narrow(i, rs.rows.cpu(), cache.dev_k.cpu() + cache.dev_v.cpu()).to(device)
            rs = _Rows(rs.rows[keep], T, pos_emb, dtype, own_causal)
            hidden = hidden[:, keep]
    return RecomputeResult(sel, dev_k, dev_v)
