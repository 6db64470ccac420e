"""Lossless and cast codecs: ``none`` (model dtype), ``fp16``, ``bf16``.

``none`` stores the kv tensor as is (bit-exact). ``fp16`` / ``bf16`` store it
cast to that dtype and cast back on decode; they are lossless when the model
dtype is that dtype, otherwise the error is the cast's rounding: relative
2^-11 (fp16, values within its range ±65504) or 2^-8 (bf16) of |x|.
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


def _cast_codec(name: str, stored: torch.dtype) -> Codec:
    def encode(kv: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kv": kv.to(stored)}

    def decode(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return _one(tensors, name, stored).to(dtype)

    return Codec(encode, decode, lossless=False)


NONE = register("none", Codec(_none_encode, _none_decode, lossless=True))
FP16 = register("fp16", _cast_codec("fp16", torch.float16))
BF16 = register("bf16", _cast_codec("bf16", torch.bfloat16))
