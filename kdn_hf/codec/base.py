"""The codec contract and registry: how ChunkKV.kv becomes stored tensors and back.

A codec is a pair of pure functions (see :class:`Codec`), plus optionally a
per-layer decoder (``Codec.layers``) so delivery can decode layer l+1 while
layer l is being composed. ``CODECS`` maps a name to a codec; the name is
written into every entry and into every store key (``kdn_hf.keys``), so an
entry is only ever decoded by the codec that wrote it, and changing a store's
codec changes its keys.

Parametrized families (``int4-g<N>``: int4 with group size N) are resolved by
:func:`get_codec`, which builds and registers them on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from kdn_hf.errors import ConfigError

#: Codec.layers: (tensors, dtype, shape) -> decode_range(start, stop) -> kv[start:stop]
LayersFn = Callable[[dict[str, torch.Tensor], torch.dtype, tuple[int, ...]], Callable[[int, int], torch.Tensor]]

@dataclass(frozen=True)
class Codec:
    """How ChunkKV.kv becomes stored tensors and back.

    encode(kv) -> {name: tensor}, names start with "kv"; kv is
        [layers, 2, kv_heads, tokens, head_dim] in model dtype, contiguous, CPU.
    decode(tensors, dtype, shape) -> kv of exactly ``dtype`` and ``shape``
        (raise CorruptEntryError when the tensors cannot make it). Runs in
        torch on whatever device the tensors are on.
    lossless: decode(encode(kv)) is bit-exact for every kv of a stored dtype.
    layers: optional per-layer decode, for layer-wise delivery (``kdn_hf.delivery``):
        layers(tensors, dtype, shape) checks the tensors against ``shape`` (raising
        CorruptEntryError like decode), does any whole-entry work once (entropy: zstd),
        and returns ``decode_range(start, stop)``, which gives kv[start:stop]: layers
        ``start <= l < stop`` only, bit-identical to ``decode(...)[start:stop]``
        (IndexError unless ``0 <= start <= stop <= layers``). None: the
        codec decodes whole entries only (see :func:`layer_decoder` for the fallback).
    """

    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    decode: Callable[[dict[str, torch.Tensor], torch.dtype, tuple[int, ...]], torch.Tensor]
    lossless: bool = True
    layers: LayersFn | None = None


def layer_decoder(codec: Codec, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                  shape: tuple[int, ...]) -> Callable[[int, int], torch.Tensor]:
    """``decode_range(start, stop) -> kv[start:stop]`` for an entry's ``tensors``, decoding only
    those layers when the codec can (``Codec.layers``); otherwise the whole entry is decoded on
    the first call and sliced after. Errors are the codec's (CorruptEntryError and the
    RuntimeError / ValueError / IndexError of a forged entry), raised here or by ``decode_range``."""
    if codec.layers is not None:
        return codec.layers(tensors, dtype, shape)
    whole: list[torch.Tensor] = []

    def decode_range(start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= shape[0]:
            raise IndexError(f"layer range [{start}, {stop}) outside [0, {shape[0]}]")
        if not whole:
            whole.append(codec.decode(tensors, dtype, shape))
        return whole[0][start:stop]

    return decode_range


CODECS: dict[str, Codec] = {}

#: name pattern -> factory(int) -> Codec, for codecs built on demand (``int4-g64``)
FAMILIES: dict[re.Pattern, Callable[[int], Codec]] = {}


def register(name: str, codec: Codec) -> Codec:
    CODECS[name] = codec
    return codec


def get_codec(name: str) -> Codec | None:
    """The codec called ``name`` (building a family member such as ``int4-g32``), or None."""
    codec = CODECS.get(name)
    if codec is not None or not isinstance(name, str):
        return codec
    for pattern, factory in FAMILIES.items():
        m = pattern.fullmatch(name)
        if m:
            n = int(m.group(1))
            if not 2 <= n <= 4096:
                return None
            return register(name, factory(n))
    return None


def check_codec(name: str) -> str:
    """Return ``name`` if it names a codec, else raise ConfigError listing the available ones."""
    if get_codec(name) is None:
        raise ConfigError(
            f"unknown codec {name!r}; available: {sorted(CODECS)} (and int4-g<N>, int8 / int4 group sizes)"
        )
    return name
