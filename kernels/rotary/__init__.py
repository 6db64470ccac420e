"""``rerotate``: move post-RoPE K to new positions (one wrapper over the torch reference and the
Triton kernel; see ``kdn_hf.rope`` for why the rotation is exact)."""

from __future__ import annotations

import operator

import torch

from kdn_hf.errors import InputError
from kdn_hf.kernels.dispatch import check_device, resolve
from kdn_hf.kernels.rotary import reference

LAYOUTS = ("half", "interleaved")


def check_delta(delta: int | torch.Tensor, tokens: int) -> int | torch.Tensor:
    """An int, or a [tokens] int64 tensor; InputError otherwise."""
    if isinstance(delta, torch.Tensor):
        if delta.shape != (tokens,) or delta.is_floating_point() or delta.is_complex() or delta.dtype == torch.bool:
            raise InputError(f"delta must be an int or an integer tensor of shape [{tokens}] (one per token), "
                             f"got shape {tuple(delta.shape)} dtype {delta.dtype}")
        return delta.to(torch.int64)
    try:
        return operator.index(delta)
    except TypeError:
        raise InputError(f"delta must be an int or a [tokens] integer tensor, got {type(delta).__name__}") from None


def check_rope(inv_freq: torch.Tensor, layout: str, head_dim: int, layers: int | None) -> None:
    """inv_freq [n] or [layers, n] with 2n <= head_dim; layout one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.is_floating_point() or inv_freq.dim() not in (1, 2):
        found = f"{tuple(inv_freq.shape)} {inv_freq.dtype}" if isinstance(inv_freq, torch.Tensor) else type(inv_freq)
        raise InputError(f"inv_freq must be a float tensor [rotary_dim // 2] or [layers, rotary_dim // 2], got {found}")
    n = inv_freq.shape[-1]
    if n == 0 or 2 * n > head_dim:
        raise InputError(f"inv_freq has {n} frequencies: rotary_dim = {2 * n} must be in (0, head_dim={head_dim}]")
    if inv_freq.dim() == 2 and inv_freq.shape[0] != layers:
        raise InputError(f"per-layer inv_freq [{inv_freq.shape[0]}, {n}] needs K [layers={inv_freq.shape[0]}, heads, "
                         f"tokens, head_dim]; got {layers} layers")


def rope_table(delta: int | torch.Tensor, inv_freq: torch.Tensor, device: torch.device):
    """For the kernels: cos/sin [Lc, R, n] float32 (one row per distinct delta, Lc = 1 or layers)
    and the [T] int32 row of each token (None for an int delta)."""
    if isinstance(delta, int):
        values, rows = delta, None
    else:
        values, rows = torch.unique(delta.cpu(), return_inverse=True)
        rows = rows.to(device, torch.int32)
    cos, sin = reference.cos_sin(values, inv_freq, device, torch.float32)
    n = inv_freq.shape[-1]
    lc = inv_freq.shape[0] if inv_freq.dim() == 2 else 1
    return cos.reshape(lc, -1, n).contiguous(), sin.reshape(lc, -1, n).contiguous(), rows


def rerotate(k: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor, *, layout: str = "half",
             out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Move K by ``delta`` positions: every token's rotary pairs turn by ``delta * w``.

    k:        [tokens, head_dim], [heads, tokens, head_dim] or [layers, heads, tokens, head_dim]
              post-RoPE K (attention scaling already inside), float16 / bfloat16 / float32
              (float64: torch backend), any strides.
    delta:    an int (every token moves the same), or a [tokens] integer tensor of new - old
              position per token: several chunks, each with its own delta, in one call.
    inv_freq: [rotary_dim // 2] frequencies (``RopeSpec.inv_freq(layer)``, float64), or
              [layers, rotary_dim // 2] one row per ``k[l]`` (per-layer bases; a zero row leaves
              its layer as it is). Only the first ``rotary_dim`` dims of K rotate (partial rotary).
    layout:   "half" (pairs (i, i + n), rotate_half) or "interleaved" (pairs (2i, 2i + 1)).
    out:      None (a new tensor), a tensor of k's shape and dtype that does not overlap k (e.g. the
              prompt buffer's slots), or k itself (in place).
    backend:  "auto" | "torch" | "triton" (see ``kdn_hf.kernels.dispatch``).
    Returns ``out`` (or the new tensor). The torch backend is bit-identical to
    ``kdn_hf.rope.rerotate_layer``; the kernel differs from it by float32 rounding of cos/sin products at most.
    """
    if not isinstance(k, torch.Tensor) or not k.is_floating_point() or not 2 <= k.dim() <= 4:
        found = f"shape {tuple(k.shape)} dtype {k.dtype}" if isinstance(k, torch.Tensor) else type(k).__name__
        raise InputError(f"k must be a float tensor [tokens, head_dim], [heads, tokens, head_dim] or "
                         f"[layers, heads, tokens, head_dim], got {found}")
    delta = check_delta(delta, k.shape[-2])
    check_rope(inv_freq, layout, k.shape[-1], k.shape[0] if k.dim() == 4 else None)
    if out is not None:
        if out.shape != k.shape or out.dtype != k.dtype:
            raise InputError(f"out must match k: {tuple(k.shape)} {k.dtype}, got {tuple(out.shape)} {out.dtype}")
        check_device("out", out, k)
    which = resolve(backend, k)
    if which == "torch" or k.numel() == 0 or (isinstance(delta, int) and delta == 0):
        return reference.rerotate(k, delta, inv_freq, layout, out=out)
    from kdn_hf.kernels.rotary import kernel

    cos, sin, rows = rope_table(delta, inv_freq, k.device)
    lead = (None,) * (4 - k.dim())
    k4 = k[lead]
    src = k4 if k4.stride(-1) == 1 else k4.contiguous()
    if out is None:
        dst = torch.empty_like(src, memory_format=torch.contiguous_format)
    else:
        dst = out[lead]
        if dst.stride(-1) != 1:
            dst = torch.empty_like(src, memory_format=torch.contiguous_format)
    kernel.launch(src, dst, cos, sin, rows, layout == "interleaved")
    if out is None:
        return dst.view(k.shape)
    if dst.data_ptr() != out.data_ptr():
        out.copy_(dst.view(k.shape))
    return out
