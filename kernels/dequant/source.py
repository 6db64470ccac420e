"""``QuantKV``: an int8 / int4 entry's stored tensors, as ``kdn_hf.codec.quant`` lays them out.

The layout (KIVI-style, see ``kdn_hf/codec/quant.py``), for a kv of shape
[layers L, 2, kv_heads H, tokens T, head_dim D]:

- K per channel: codes in [L, H, D, T] order (token index fastest), one (step, min) per group of
  ``group_k`` neighbouring tokens of a channel: ``k_step`` / ``k_min`` fp16 [L, H, D, ceil(T / group_k)].
- V per token: codes in [L, H, T, D] order, one (step, min) per group of ``group_v`` neighbouring
  channels of a token: ``v_step`` / ``v_min`` fp16 [L, H, T, ceil(D / group_v)].
- Codes are uint8, flat; int4 packs two per byte over the whole flat run, low nibble first (an odd
  count pads the last byte). A value is ``code * step + min`` in float32, then cast to ``dtype``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kdn_hf.errors import CorruptEntryError, InputError

_NAMES = ("kv.group", "kv.k.q", "kv.k.step", "kv.k.min", "kv.v.q", "kv.v.step", "kv.v.min")


def bits_of(codec: str) -> int:
    """8 for "int8", 4 for "int4" / "int4-g<N>"; InputError for any other codec."""
    if codec == "int8":
        return 8
    if codec == "int4" or re.fullmatch(r"int4-g\d+", codec or ""):
        return 4
    raise InputError(f"decode_rerotate_scatter decodes the int8 and int4[-g<N>] codecs, got {codec!r}")


@dataclass(frozen=True, eq=False)
class QuantKV:
    """One entry's quantized kv (see the module docstring for the layout); every tensor on one device.

    bits:     8 or 4.
    shape:    (L, 2, H, T, D) of the decoded kv.
    dtype:    the decoded kv's dtype (the model's).
    k_codes, v_codes:               uint8, flat (int4: packed).
    k_step, k_min / v_step, v_min:  float16 [L, H, D, ceil(T / group_k)] / [L, H, T, ceil(D / group_v)].
    group_k, group_v:               group sizes along tokens (K) and channels (V).
    """

    bits: int
    shape: tuple[int, int, int, int, int]
    dtype: torch.dtype
    k_codes: torch.Tensor
    k_step: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_step: torch.Tensor
    v_min: torch.Tensor
    group_k: int
    group_v: int

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise InputError(f"QuantKV: {problem}")

    def problem(self) -> str | None:
        """What is inconsistent, or None."""
        if self.bits not in (4, 8):
            return f"bits must be 4 or 8, got {self.bits}"
        if len(self.shape) != 5 or self.shape[1] != 2 or min(self.shape) < 0:
            return f"shape must be (layers, 2, kv_heads, tokens, head_dim), got {self.shape}"
        if self.group_k < 1 or self.group_v < 1:
            return f"groups must be >= 1, got ({self.group_k}, {self.group_v})"
        L, _, H, T, D = self.shape
        n = L * H * T * D
        codes = (n + 1) // 2 if self.bits == 4 else n
        gk, gv = -(-T // self.group_k), -(-D // self.group_v)
        device = self.k_codes.device
        for name, t, want_dtype, want_shape in (
            ("k_codes", self.k_codes, torch.uint8, (codes,)), ("v_codes", self.v_codes, torch.uint8, (codes,)),
            ("k_step", self.k_step, torch.float16, (L, H, D, gk)), ("k_min", self.k_min, torch.float16, (L, H, D, gk)),
            ("v_step", self.v_step, torch.float16, (L, H, T, gv)), ("v_min", self.v_min, torch.float16, (L, H, T, gv)),
        ):
            if t.dtype != want_dtype or tuple(t.shape) != want_shape:
                return f"{name} should be {want_dtype} {want_shape} for shape {self.shape}, got {t.dtype} {tuple(t.shape)}"
            if t.device != device:
                return f"{name} is on {t.device}, k_codes on {device}: keep an entry's tensors on one device"
        if not self.dtype.is_floating_point:
            return f"dtype must be a float dtype, got {self.dtype}"
        return None

    @property
    def device(self) -> torch.device:
        return self.k_codes.device

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], codec: str, dtype: torch.dtype,
                     shape: tuple[int, ...]) -> QuantKV:
        """From an entry's codec tensors (``kv.group``, ``kv.k.q``, ...; what ``OpenEntry`` holds) and
        its metadata (codec name, dtype, shape). CorruptEntryError when they disagree (the entry's fault)."""
        bits = bits_of(codec)
        if set(tensors) != set(_NAMES):
            raise CorruptEntryError(f"codec {codec!r} expects tensors {sorted(_NAMES)}, found {sorted(tensors)}")
        g = tensors["kv.group"]
        if g.dtype != torch.int64 or tuple(g.shape) != (2,):
            raise CorruptEntryError("entry's kv.group should be int64 [2]")
        gk, gv = (int(x) for x in g.tolist())
        try:
            return cls(bits=bits, shape=tuple(int(s) for s in shape), dtype=dtype,
                       k_codes=tensors["kv.k.q"].reshape(-1), k_step=tensors["kv.k.step"], k_min=tensors["kv.k.min"],
                       v_codes=tensors["kv.v.q"].reshape(-1), v_step=tensors["kv.v.step"], v_min=tensors["kv.v.min"],
                       group_k=gk, group_v=gv)
        except InputError as e:
            raise CorruptEntryError(f"entry tensors do not make codec {codec!r}'s kv: {e}") from e
