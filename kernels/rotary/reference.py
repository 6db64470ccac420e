"""Torch reference of K re-rotation: the CPU path and what the Triton kernel is tested against.

The same operations, in the same order and dtypes, as ``kdn_hf.rope.rerotate_layer``, so the two
are bit-identical (``tests/unit/test_kernels_rotary.py`` checks it): the angle ``delta * w`` in
float64 from the integer delta, cos/sin cast to float32 (float64 for float64 K), the rotation in
that dtype, the result cast back to K's dtype. Why the rotation is exact, the pair layouts and why
the attention scaling is not applied again: see ``kdn_hf.rope``'s docstring.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cos_sin(delta: int | torch.Tensor, inv_freq: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``delta * w``, cast to ``dtype`` on ``device`` (read-only: they may be shared).

    delta:    an int, or [rows] int64 (one delta per token, or per table row).
    inv_freq: [n] or [layers, n] float (float64 preferred: the angle is made in float64).
    Returns [n] / [rows, n] for [n] frequencies, [layers, 1, 1, n] / [layers, 1, rows, n] for
    per-layer ones (broadcasting against K [layers, heads, tokens, head_dim]).

    An int delta with CPU frequencies (a RopeSpec's) is memoized: the layer-wise composer asks for
    the same chunk delta on every layer, and making cos/sin costs more than rotating a small chunk.
    """
    if isinstance(delta, int) and inv_freq.device.type == "cpu":
        w = inv_freq.detach().to(torch.float64).contiguous()
        return _cos_sin_int(delta, w.numpy().tobytes(), tuple(w.shape), torch.device(device), dtype)
    return _make_cos_sin(delta, inv_freq, device, dtype)


@lru_cache(maxsize=1024)
def _cos_sin_int(delta: int, w_bytes: bytes, w_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    w = torch.frombuffer(bytearray(w_bytes), dtype=torch.float64).reshape(w_shape)
    return _make_cos_sin(delta, w, device, dtype)


def _make_cos_sin(delta: int | torch.Tensor, inv_freq: torch.Tensor, device: torch.device, dtype: torch.dtype):
    # float64 is not available on every backend (mps); there the angles are made on CPU.
    where = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    w = inv_freq.to(where, torch.float64)
    if isinstance(delta, int):
        ang = float(delta) * w  # exact: |delta| < 2**53
        if w.dim() == 2:
            ang = ang[:, None, None, :]
    else:
        d = delta.to(where, torch.float64)
        ang = d[:, None] * w if w.dim() == 1 else (d[:, None] * w[:, None, :])[:, None]
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate k [..., tokens, head_dim] by angles whose cos/sin broadcast against its pairs
    ([..., n] with n = rotary_dim // 2; the dims past rotary_dim pass through).

    out: None (a new tensor), a tensor of k's shape and dtype not overlapping k, or k itself (in place).
    """
    n = cos.shape[-1]
    rotary_dim = 2 * n
    same = out is not None and out.data_ptr() == k.data_ptr() and out.stride() == k.stride()
    if (out is not None and layout == "half" and rotary_dim == k.shape[-1] and k.dtype == cos.dtype
            and out.dtype == k.dtype and out.shape == k.shape):
        x1, x2 = k[..., :n], k[..., n:]
        if same:  # in place: both products of a pair are taken before either half is written
            a, b = x1 * sin, x2 * sin
            x1.mul_(cos).sub_(b)  # x1 * cos - x2 * sin
            x2.mul_(cos).add_(a)  # x2 * cos + x1 * sin
            return out
        o1, o2 = out[..., :n], out[..., n:]
        tmp = x2 * sin
        torch.mul(x1, cos, out=o1)
        o1.sub_(tmp)  # x1 * cos - x2 * sin
        torch.mul(x1, sin, out=tmp)
        torch.mul(x2, cos, out=o2)
        o2.add_(tmp)  # x2 * cos + x1 * sin
        return out
    kc = k.to(cos.dtype)
    if layout == "half":
        x1, x2 = kc[..., :n], kc[..., n:rotary_dim]
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        pairs = kc[..., :rotary_dim].unflatten(-1, (n, 2))  # [..., tokens, n, 2]
        a, b = pairs[..., 0], pairs[..., 1]
        rot = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    if rotary_dim < k.shape[-1]:
        rot = torch.cat((rot, kc[..., rotary_dim:]), dim=-1)
    if out is not None:
        return out.copy_(rot)
    return rot.to(k.dtype)


def rerotate(k: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor, layout: str,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The torch path of :func:`kdn_hf.kernels.rerotate` (arguments checked by it)."""
    if isinstance(delta, int) and delta == 0:
        return k.clone() if out is None else (out if out.data_ptr() == k.data_ptr() else out.copy_(k))
    cos, sin = cos_sin(delta, inv_freq, k.device, compute_dtype(k.dtype))
    return rotate(k, cos, sin, layout, out=out)
