"""ChunkKV: the KV cache of one chunk of tokens, as stored and composed.

Layout (the one the store, the codecs and the blender agree on)::

    kv: [layers, 2, kv_heads, tokens, head_dim]   index 0 along dim 1 is K, 1 is V

K is post-RoPE (as transformers caches it), computed at ``positions``.
Batch is always 1 here; a cache for generate adds the batch dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkKV:
    """One chunk's KV and the token positions its K was rotated to.

    kv:        [layers, 2, kv_heads, tokens, head_dim], model dtype, any device.
    positions: [tokens] int64, the position of each token when K was computed.
    token_ids: [tokens] int64, the ids the KV belongs to.
    meta:      free-form string metadata carried with a stored entry.
    """

    kv: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ValueError(
                f"ChunkKV.kv must be [layers, 2, kv_heads, tokens, head_dim], got shape {tuple(self.kv.shape)}"
            )
        n = self.kv.shape[3]
        if self.positions.shape != (n,) or self.token_ids.shape != (n,):
            raise ValueError(
                f"ChunkKV has {n} tokens in kv but positions {tuple(self.positions.shape)} and "
                f"token_ids {tuple(self.token_ids.shape)}; all three must agree"
            )

    @property
    def num_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def keys(self) -> torch.Tensor:
        """[layers, kv_heads, tokens, head_dim]"""
        return self.kv[:, 0]

    @property
    def values(self) -> torch.Tensor:
        """[layers, kv_heads, tokens, head_dim]"""
        return self.kv[:, 1]
