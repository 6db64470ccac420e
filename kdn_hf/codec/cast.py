"""Lossless and cast codecs: ``none`` (model dtype), ``fp16``, ``bf16``.

``none`` stores the kv tensor as is (bit-exact). ``fp16`` / ``bf16`` store it
cast to that dtype and cast back on decode; they are lossless when the model
dtype is that dtype, otherwise the error is the cast's rounding: relative
2^-11 (fp16, values within its range ±65504) or 2^-8 (bf16) of |x|. Per-layer
decode is a slice along layers (then the cast back).
"""

from __future__ import annotations

import torch

from kdn_hf.codec.base import Codec, register
from kdn_hf.errors import CorruptEntryError


def _one(tensors: dict[str, torch.Tensor], codec: str, dtype: torch.dtype | None) -> torch.Tensor:
    if set(tensors) != {"kv"}:
        raise CorruptEntryError(f"codec {codec!r} expects one tensor 'kv', found {sorted(tensors)}")
    t = tensors["kv"]
    if dtype is not None and t.dtype != dtype:
        raise CorruptEntryError(f"codec {codec!r} expects a {dtype} tensor, found {t.dtype}")
    return t


def _none_encode(kv: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"kv": kv}


def _none_decode(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return _one(tensors, "none", None)


def _sliced(codec: str, stored: torch.dtype | None):
    """Per-layer decode of a one-tensor codec: a slice along layers, cast back when ``stored`` is a cast."""

    def layers(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]):
        t = _one(tensors, codec, stored)
        if tuple(t.shape) != tuple(shape):
            raise CorruptEntryError(f"codec {codec!r}: stored kv is {tuple(t.shape)}, the entry says {tuple(shape)}")

        def decode_range(start: int, stop: int) -> torch.Tensor:
            if not 0 <= start <= stop <= shape[0]:
                raise IndexError(f"layer range [{start}, {stop}) outside [0, {shape[0]}]")
            return t[start:stop] if stored is None else t[start:stop].to(dtype)

        return decode_range

    return layers


def _cast_codec(name: str, stored: torch.dtype) -> Codec:
    def encode(kv: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kv": kv.to(stored)}

    def decode(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return _one(tensors, name, stored).to(dtype)

    return Codec(encode, decode, lossless=False, layers=_sliced(name, stored))


NONE = register("none", Codec(_none_encode, _none_decode, lossless=True, layers=_sliced("none", None)))
FP16 = register("fp16", _cast_codec("fp16", torch.float16))
BF16 = register("bf16", _cast_codec("bf16", torch.bfloat16))
