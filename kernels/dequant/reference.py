"""Torch reference of decode + re-rotate + scatter: the CPU path and the kernel's reference.

The same values as ``kdn_hf.codec.quant``'s decoder followed by ``kdn_hf.rope.rerotate_layer``
and a copy into the destination rows, bit for bit: ``code * step + min`` in float32 (a multiply
then an add, as ``dequantize_groups``), cast to the kv dtype, then K rotated by the rotary
reference (which computes in float32 and casts back).
"""

from __future__ import annotations

import torch

from kdn_hf.kernels.dequant.source import QuantKV
from kdn_hf.kernels.rotary import reference as rotary


def _codes(q: torch.Tensor, bits: int, first: int, count: int) -> torch.Tensor:
    """``count`` codes from flat code index ``first`` (int4: unpacked from whole bytes)."""
    if bits == 8:
        return q[first : first + count]
    b0, b1 = first // 2, (first + count + 1) // 2
    nibbles = torch.stack([q[b0:b1] & 0xF, q[b0:b1] >> 4], dim=-1).reshape(-1)
    return nibbles[first - 2 * b0 : first - 2 * b0 + count]


def _values(codes: torch.Tensor, step: torch.Tensor, mn: torch.Tensor, group: int) -> torch.Tensor:
    """codes [..., n] with step / min [..., ceil(n / group)] -> float32 values [..., n]. A partial
    last group is padded with its last code (as the codec does) so every group broadcasts its step."""
    n, groups = codes.shape[-1], step.shape[-1]
    pad = groups * group - n
    if pad:
        codes = torch.cat([codes, codes[..., -1:].expand(*codes.shape[:-1], pad)], dim=-1)
    x = codes.reshape(*codes.shape[:-1], groups, group).float() * step.float()[..., None] + mn.float()[..., None]
    return x.reshape(*codes.shape[:-1], groups * group)[..., :n]


def dequant(src: QuantKV, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers [start, stop) of the entry: (K, V), each [stop - start, H, T, D] contiguous in ``src.dtype``."""
    _, _, H, T, D = src.shape
    n, per_layer = stop - start, H * T * D
    first, count = start * per_layer, n * per_layer
    kc = _codes(src.k_codes, src.bits, first, count).reshape(n, H, D, T)
    k = _values(kc, src.k_step[start:stop], src.k_min[start:stop], src.group_k)  # [n, H, D, T]
    vc = _codes(src.v_codes, src.bits, first, count).reshape(n, H, T, D)
    v = _values(vc, src.v_step[start:stop], src.v_min[start:stop], src.group_v)
    return k.transpose(-1, -2).to(src.dtype, memory_format=torch.contiguous_format), v.to(src.dtype)


def decode_rerotate_scatter(src: QuantKV, k_dst: torch.Tensor, v_dst: torch.Tensor, start: int, stop: int,
                            rows: int | torch.Tensor, delta: int | torch.Tensor | None,
                            inv_freq: torch.Tensor | None, layout: str) -> None:
    """The torch path of :func:`kdn_hf.kernels.decode_rerotate_scatter` (arguments checked by it)."""
    k, v = dequant(src, start, stop)
    T = src.shape[3]
    if isinstance(rows, int):
        kd, vd = k_dst[:, :, rows : rows + T], v_dst[:, :, rows : rows + T]
        if delta is None:
            kd.copy_(k)
        else:
            rotary.rerotate(k, delta, inv_freq, layout, out=kd)
        vd.copy_(v)
        return
    if delta is not None:
        k = rotary.rerotate(k, delta, inv_freq, layout)
    k_dst.index_copy_(2, rows, k)
    v_dst.index_copy_(2, rows, v)
