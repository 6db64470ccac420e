"""Causal attention for whole sequences: flash-attn where it is installed, SDPA otherwise.

Two masks kdn_hf needs fit flash-attn (>= 2.1, whose causal mask is aligned bottom-right): a
chunk's own prefill (queries = keys, causal) and a question over cached KV (the queries are the
last ``rows`` positions of the keys). :func:`causal_attention` takes both; which implementation
runs is :func:`kdn_hf.kernels.dispatch.attention_backend`, decided once per process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdn_hf.errors import ConfigError, InputError
from kdn_hf.kernels.dispatch import attention_backend, flash_attn_available

ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Causal attention with the queries at the last positions of the keys (bottom-right aligned).

    q:    [B, Hq, rows, D]; k, v: [B, Hkv, keys, D] with keys >= rows and Hq a multiple of Hkv.
          Query i sits at position keys - rows + i and sees keys 0 .. keys - rows + i.
    scale: softmax scale, default 1/sqrt(D).
    backend: "auto" (flash_attn where ``attention_backend`` says so, else SDPA) | "sdpa" | "flash_attn".
    Returns [B, Hq, rows, D] in q's dtype.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise InputError(f"q must be [B, Hq, rows, D] and k, v [B, Hkv, keys, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    rows, keys = q.shape[2], k.shape[2]
    if rows > keys or q.shape[1] % k.shape[1]:
        raise InputError(f"need rows <= keys and Hq a multiple of Hkv, got rows {rows}, keys {keys}, "
                         f"Hq {q.shape[1]}, Hkv {k.shape[1]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    which = attention_backend(q.device, q.dtype) if backend == "auto" else backend
    if which == "flash_attn":
        if not flash_attn_available() or q.device.type != "cuda":
            raise ConfigError("backend='flash_attn' needs flash-attn >= 2.1 and CUDA tensors; use 'auto' or 'sdpa'")
        from flash_attn import flash_attn_func

        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                            causal=True)  # [B, rows, Hq, D]
        return o.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if rows == keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if 2 * rows >= keys:
        # SDPA's is_causal is aligned top-left, and with a mask its kernels compute the whole rows x keys
        # rectangle. Where the queries are at least half the keys, a causal square is cheaper: zero
        # queries in the first slots (their rows are dropped), the real ones in the last: each row's
        # result is what a full causal prefill computes there (its keys and its weights are the same).
        padded = q.new_zeros(*q.shape[:2], keys, q.shape[3])
        padded[:, :, keys - rows:] = q
        o = F.scaled_dot_product_attention(padded, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return o[:, :, keys - rows:]
    # few queries: the rectangle with an offset mask that says where the queries sit
    j = torch.arange(keys, device=q.device)
    mask = j[None, :] <= (keys - rows + torch.arange(rows, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
