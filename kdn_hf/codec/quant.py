"""Group-wise integer quantization of KV: ``int8`` and ``int4`` (KIVI-style).

Following KIVI (arXiv 2402.02750), K is quantized **per channel** (a group is
one channel of one head over ``group`` neighbouring tokens: K has outlier
channels, so a per-channel step adapts to them) and V **per token** (a group
is ``group`` neighbouring channels of one token). Each group stores its
minimum and its step as fp16 and every value as an unsigned code::

    code = round((x - min) / step),  x_hat = code * step + min,  step ~ (max - min) / (2^bits - 1)

- ``int8``: 8-bit codes, K groups span all the chunk's tokens, V groups span
  the whole head_dim (one step per channel / per token).
- ``int4`` (``int4-g<N>``): 4-bit codes packed two per byte, groups of N
  (default 64) tokens for K and N channels for V (capped at the axis length).

Error bound (tested): for every element, ``|x - x_hat| <= step / 2`` where
``step`` is the group's stored fp16 step (the minimum is rounded down and the
step up when they are cast to fp16, so no code is clamped), plus the
rounding of ``x_hat`` to the model dtype. KV must be finite.

Decode is pure torch, on the device the stored tensors are on; a layer range
decodes on its own (``Codec.layers``), bit-identical to the whole decode.
"""

from __future__ import annotations

import re

import torch

from kdn_hf.codec.base import FAMILIES, Codec, register
from kdn_hf.errors import CorruptEntryError

DEFAULT_INT4_GROUP = 64
_TINY_STEP = 2.0**-24  # smallest positive fp16: keeps a constant group's step non-zero


def _to_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[..., N] -> [..., N/group, group] padding N up by repeating the last element (min/max unchanged)."""
    n = x.shape[-1]
    pad = (-n) % group
    if pad and n:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], (n + pad) // group, group)


def _from_groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """[..., G', group] -> [..., n] (drop the padding)."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])[..., :n]


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [..., groups, group] float -> (codes uint8 same shape, step fp16 [..., groups], min fp16 [..., groups])."""
    levels = 2**bits - 1
    x = x.float()
    if x.shape[-1] == 0 or x.numel() == 0:
        empty = torch.zeros(x.shape[:-1], dtype=torch.float16)
        return torch.zeros(x.shape, dtype=torch.uint8), empty, empty.clone()
    lo, hi = x.amin(-1), x.amax(-1)
    m16 = lo.half()
    m16 = torch.where(m16.float() > lo, torch.nextafter(m16, torch.full_like(m16, -float("inf"))), m16)
    step = (hi - m16.float()) / levels
    s16 = step.half()
    s16 = torch.where(s16.float() < step, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    s16 = s16.clamp_min(_TINY_STEP)
    codes = torch.round((x - m16.float()[..., None]) / s16.float()[..., None]).clamp_(0, levels).to(torch.uint8)
    return codes, s16, m16


def dequantize_groups(codes: torch.Tensor, step: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_groups, in float32: codes [..., groups, group] -> values."""
    return codes.float() * step.float()[..., None] + mn.float()[..., None]


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, any shape -> [ceil(n/2)] uint8, two codes per byte (low nibble first)."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[m] uint8 -> [n] uint8 codes (n <= 2m)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)[:n]


def kv_groups(kv: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """kv [L, 2, H, T, D] -> (K [L, H, D, gK, group_k] grouped along tokens,
    V [L, H, T, gV, group_v] grouped along channels, (group_k, group_v)).
    ``group=None`` means the whole axis (one group)."""
    k = kv[:, 0].transpose(-1, -2)  # [L, H, D, T]
    v = kv[:, 1]  # [L, H, T, D]
    t, d = kv.shape[3], kv.shape[4]
    gk = max(1, t if group is None else min(group, t))
    gv = max(1, d if group is None else min(group, d))
    return _to_groups(k, gk), _to_groups(v, gv), (gk, gv)


def kv_from_groups(k: torch.Tensor, v: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of kv_groups: K [L, H, D, gK, gk], V [L, H, T, gV, gv] float -> kv [L, 2, H, T, D] of ``dtype``."""
    t, d = shape[3], shape[4]
    k = _from_groups(k, t).transpose(-1, -2)
    v = _from_groups(v, d)
    return torch.stack([k, v], dim=1).to(dtype)


def _grouped_shapes(shape: tuple[int, ...], groups: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    L, _, H, T, D = shape
    gk, gv = groups
    if gk < 1 or gv < 1:
        raise CorruptEntryError(f"entry has invalid quantization groups {groups}")
    return (L, H, D, -(-T // gk), gk), (L, H, T, -(-D // gv), gv)


def _need(tensors: dict[str, torch.Tensor], names: tuple[str, ...], codec: str) -> None:
    if set(tensors) != set(names):
        raise CorruptEntryError(f"codec {codec!r} expects tensors {sorted(names)}, found {sorted(tensors)}")


_NAMES = ("kv.group", "kv.k.q", "kv.k.step", "kv.k.min", "kv.v.q", "kv.v.step", "kv.v.min")


def _groups_of(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    g = tensors["kv.group"]
    if g.dtype != torch.int64 or tuple(g.shape) != (2,):
        raise CorruptEntryError("entry's kv.group should be int64 [2]")
    return int(g[0]), int(g[1])


def int_codec(name: str, bits: int, group: int | None) -> Codec:
    """A KIVI-style codec of ``bits`` (8 or 4; 4 packs two codes per byte) with ``group`` (None: whole axis)."""

    def encode(kv: torch.Tensor) -> dict[str, torch.Tensor]:
        k, v, groups = kv_groups(kv, group)
        out = {"kv.group": torch.tensor(groups, dtype=torch.int64)}
        for part, x, n in (("k", k, kv.shape[3]), ("v", v, kv.shape[4])):
            codes, step, mn = quantize_groups(x, bits)
            codes = _from_groups(codes, n)  # the padding of a last partial group is not stored
            out[f"kv.{part}.q"] = pack4(codes) if bits == 4 else codes.reshape(-1)
            out[f"kv.{part}.step"], out[f"kv.{part}.min"] = step, mn
        return out

    def checked(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]):
        """Per part (K, V): (flat codes, step, min, group, one layer's [H, D, T] / [H, T, D]), checked."""
        _need(tensors, _NAMES, name)
        shapes = _grouped_shapes(shape, _groups_of(tensors))
        L, _, H, T, D = shape
        parts = []
        for part, gshape, real in zip(("k", "v"), shapes, ((H, D, T), (H, T, D))):
            q, step, mn = (tensors[f"kv.{part}.{n}"] for n in ("q", "step", "min"))
            n = L * H * T * D
            expect = (n + 1) // 2 if bits == 4 else n
            if (q.dtype != torch.uint8 or q.numel() != expect
                    or tuple(step.shape) != gshape[:-1] or tuple(mn.shape) != gshape[:-1]):
                raise CorruptEntryError(f"codec {name!r}: stored {part.upper()} tensors disagree with shape {shape}")
            parts.append((q.reshape(-1), step, mn, gshape[-1], real))
        return parts

    def decode(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        L, n = shape[0], shape[0] * shape[2] * shape[3] * shape[4]
        parts = []
        for q, step, mn, group, real in checked(tensors, shape):
            codes = _to_groups((unpack4(q, n) if bits == 4 else q).reshape(L, *real), group)
            parts.append(dequantize_groups(codes, step, mn))
        return kv_from_groups(parts[0], parts[1], shape, dtype)

    def layers(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]):
        # Codes are stored flat in [L, H, D, T] (K) / [L, H, T, D] (V) order, so layer l's codes are the
        # contiguous run [l*m, (l+1)*m), m = H*T*D (the padding to groups runs along T / D, inside a
        # layer, and is not stored). int4 packs two codes a byte over the whole run: a range that starts
        # or ends on an odd code index shares a byte with its neighbour, so whole bytes are read and the
        # extra nibble dropped. Steps / minimums are [L, ...]: sliced.
        parts = checked(tensors, shape)
        L = shape[0]
        m = shape[2] * shape[3] * shape[4]

        def decode_range(start: int, stop: int) -> torch.Tensor:
            if not 0 <= start <= stop <= L:
                raise IndexError(f"layer range [{start}, {stop}) outside [0, {L}]")
            n, first = (stop - start) * m, start * m
            out = []
            for q, step, mn, group, real in parts:
                if bits == 4:
                    b0, b1 = first // 2, (first + n + 1) // 2
                    flat = unpack4(q[b0:b1], 2 * (b1 - b0))[first - 2 * b0 : first - 2 * b0 + n]
                else:
                    flat = q[first : first + n]
                codes = _to_groups(flat.reshape(stop - start, *real), group)
                out.append(dequantize_groups(codes, step[start:stop], mn[start:stop]))
            return kv_from_groups(out[0], out[1], (stop - start, *shape[1:]), dtype)

        return decode_range

    return Codec(encode, decode, lossless=False, layers=layers)


INT8 = register("int8", int_codec("int8", 8, None))
INT4 = register("int4", int_codec("int4", 4, DEFAULT_INT4_GROUP))
FAMILIES[re.compile(r"int4-g(\d+)")] = lambda g: int_codec(f"int4-g{g}", 4, g)
