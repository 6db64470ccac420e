"""Torch reference of selected-row attention (SDPA with a boolean mask): the CPU path and the
kernel's reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible(q_pos: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """[rows, num_keys] bool: key j (at position j) is visible to the row at position p iff
    j <= p, and p - j < window where a window is given (HF's sliding window)."""
    j = torch.arange(num_keys, device=q_pos.device)
    p = q_pos[:, None]
    mask = j[None, :] <= p
    if window is not None:
        mask &= j[None, :] > p - window
    return mask


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
                       window: int | None) -> torch.Tensor:
    """q [B, Hq, rows, D], k/v [B, Hkv, keys, D] -> [B, Hq, rows, D] (arguments checked by the wrapper)."""
    mask = visible(q_pos, k.shape[2], window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
