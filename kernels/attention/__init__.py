"""``selected_attention``: selected query rows at arbitrary (sorted) positions attending over the
whole context, causally by position (one wrapper over SDPA with a mask and the Triton kernel);
``causal_attention``: flash-attn or SDPA for whole sequences."""

from __future__ import annotations

import operator

import torch

from kdn_hf.errors import InputError
from kdn_hf.kernels.attention import reference
from kdn_hf.kernels.attention.flash import causal_attention
from kdn_hf.kernels.dispatch import check_device, resolve

__all__ = ["causal_attention", "selected_attention"]


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, *,
                       scale: float | None = None, window: int | None = None, out: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """Attention of query rows at positions ``q_pos`` over keys at positions 0 .. keys - 1.

    q:      [Hq, rows, D] or [B, Hq, rows, D], the selected rows' queries (RoPE applied).
    k, v:   [Hkv, keys, D] / [B, Hkv, keys, D], the whole context (key j at position j); Hq a
            multiple of Hkv (grouped-query: head h reads kv head h // (Hq // Hkv)); same dtype as q.
    q_pos:  [rows] integer positions in [0, keys), best sorted ascending (the kernel bounds each
            block of rows by its smallest and largest position).
    scale:  softmax scale (the model's ``scaling``), default 1/sqrt(D).
    window: sliding window: the row at p sees keys j with p - window < j <= p; None: all j <= p.
    out:    optional tensor of q's shape and dtype to write into.
    backend: "auto" | "torch" | "triton".
    Returns [.., Hq, rows, D] (q's shape) in q's dtype.
    """
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.shape != k.shape:
        raise InputError(f"q must be [Hq, rows, D] or [B, Hq, rows, D] and k, v [Hkv, keys, D] / [B, Hkv, keys, D], "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    q4, k4, v4 = (q[None], k[None], v[None]) if q.dim() == 3 else (q, k, v)
    B, Hq, rows, D = q4.shape
    if k4.shape[0] != B or k4.shape[3] != D or Hq % k4.shape[1]:
        raise InputError(f"k/v must be [B={B}, Hkv, keys, D={D}] with Hq={Hq} a multiple of Hkv, got {tuple(k.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        check_device(name, t, q)
    keys = k4.shape[2]
    if not isinstance(q_pos, torch.Tensor) or q_pos.shape != (rows,) or q_pos.is_floating_point() \
            or q_pos.dtype == torch.bool:
        raise InputError(f"q_pos must be an integer tensor [{rows}], got "
                         f"{tuple(q_pos.shape) if isinstance(q_pos, torch.Tensor) else type(q_pos).__name__}")
    q_pos = q_pos.to(q.device, torch.int64)
    if rows and (int(q_pos.min()) < 0 or int(q_pos.max()) >= keys):
        raise InputError(f"q_pos must lie in [0, keys={keys}), got [{int(q_pos.min())}, {int(q_pos.max())}]")
    if window is not None and operator.index(window) < 1:
        raise InputError(f"window must be a positive int or None, got {window}")
    scale = D ** -0.5 if scale is None else float(scale)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise InputError(f"out must match q: {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
        check_device("out", out, q)
    which = resolve(backend, q)
    if which == "torch" or rows == 0:
        o = reference.selected_attention(q4, k4, v4, q_pos, scale, window)
        o = o[0] if q.dim() == 3 else o
        return o if out is None else out.copy_(o)
    from kdn_hf.kernels.attention import kernel

    q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))
    o4 = torch.empty_like(q4, memory_format=torch.contiguous_format) if out is None or out.stride(-1) != 1 \
        else (out[None] if out.dim() == 3 else out)
    kernel.launch(q4, k4, v4, o4, q_pos, scale, window)
    o = o4[0] if q.dim() == 3 else o4
    if out is not None and o.data_ptr() != out.data_ptr():
        out.copy_(o)
    return out if out is not None else o
