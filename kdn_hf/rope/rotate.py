"""RoPE re-rotation: move cached K from the positions it was computed at to new ones.

Why it is exact. RoPE rotates each pair of K's rotary dims by an angle ``p * w_i``
(``p`` the token position, ``w_i`` the pair's inverse frequency), and
transformers caches K *after* that rotation::

    K_cached(p) = s * R(p * w) @ K_raw          R(a) = [[cos a, -sin a], [sin a, cos a]] per pair

(``s`` is the module's ``attention_scaling``: 1 except for yarn/longrope, where
HF multiplies cos and sin by it). Rotations of a plane compose by adding
angles, so for the same token at position ``p' = p + delta``::

    K_cached(p') = s * R(p' * w) @ K_raw = R(delta * w) @ K_cached(p)

The factor ``s`` is already in the stored K and must not be applied again.
``K_raw`` (the projection of the hidden state) depends on the token and its
context but not on absolute positions (RoPE attention only sees differences),
so a sequence moved as a whole gets exactly this K on every layer; a chunk
moved next to other context keeps its chunk-alone ``K_raw``, which is what
blending (``kdn_hf/blend``) corrects. The identity holds for every layer whose
frequencies ``w`` stay fixed: default, linear, llama3, yarn, proportional,
partial rotary (only the first ``rotary_dim`` dims rotate; the rest pass
through), per-layer-type bases (Gemma3 local/global) and layers without RoPE
(``no_rope_layers``, SmolLM3/Llama4), which are left alone. Longrope is exact
while every position stays below ``original_max_position_embeddings`` (HF then
uses the short factors for the whole sequence); past it the model switches to
the long factors, and :class:`RopeSpec.max_position` records that bound.
Dynamic NTK changes ``w`` with the sequence length, so it is refused.

Precision: the angle is ``delta * w`` computed in float64 from the integer
delta, which is more exact than subtracting two large angles; cos/sin are then
cast to float32 (float64 for float64 K) and the rotation runs in that dtype.
HF itself computes ``p * w`` in float32, so its own K at position p is off by up
to ~p * 2**-24 rad; against a stock model at p ~ 2000 that, not this code, sets
the error floor (~1e-4 relative to |K|).

The pair layout and frequencies come from a :class:`~kdn_hf.rope.spec.RopeSpec`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from kdn_hf.errors import InputError
from kdn_hf.kernels.rotary import reference
from kdn_hf.rope.spec import RopeSpec


# The rotation math itself (angles in float64 from the integer delta, the pair layouts, writing into
# ``out``) is the kernels' torch reference: one implementation, which is also the CPU path of
# ``kdn_hf.kernels.rerotate``.
_compute_dtype = reference.compute_dtype
_cos_sin = reference.cos_sin


def _rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims (2 x cos's last dim) of k [..., tokens, head_dim] by the
    angles of cos/sin."""
    return reference.rotate(k, cos, sin, layout, out=out)


def _as_positions(pos: torch.Tensor, name: str, tokens: int) -> torch.Tensor:
    is_tensor = isinstance(pos, torch.Tensor)
    if not is_tensor or pos.shape != (tokens,) or pos.is_floating_point() or pos.is_complex():
        found = f"shape {tuple(pos.shape)} dtype {pos.dtype}" if is_tensor else type(pos).__name__
        raise InputError(f"{name} must be an integer tensor of shape [{tokens}] (one per token), got {found}")
    return pos.to(torch.int64)


def rerotate_layer(k: torch.Tensor, delta: int | torch.Tensor, spec: RopeSpec, layer_idx: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Move one layer's K by ``delta`` positions.

    k:     [..., tokens, head_dim] post-RoPE K of model layer ``layer_idx``, any float dtype/device.
    delta: an int (every token moves the same) or a [tokens] int64 tensor (new - old position).
    out:   optional tensor of k's shape and dtype (on k's device) written with the result, e.g. the
           slot of a prompt buffer; must not overlap k.
    Returns a new tensor (or ``out``), same shape and dtype. Does not check ``spec.max_position``:
    the caller knows the prompt length and calls ``spec.check_positions``.
    """
    if k.shape[-1] != spec.head_dim or k.dim() < 2:
        raise InputError(f"k must be [..., tokens, head_dim={spec.head_dim}], got shape {tuple(k.shape)}")
    if not 0 <= layer_idx < spec.num_layers:
        raise InputError(f"layer_idx must be in [0, {spec.num_layers}), got {layer_idx}")
    if isinstance(delta, torch.Tensor) and delta.dim() == 0:
        delta = int(delta)
    if isinstance(delta, torch.Tensor):
        delta = _as_positions(delta, "delta", k.shape[-2])
    else:
        delta = operator.index(delta)
    if out is not None and (out.shape != k.shape or out.dtype != k.dtype):
        raise InputError(f"out must match k: {tuple(k.shape)} {k.dtype}, got {tuple(out.shape)} {out.dtype}")
    w = spec.inv_freq(layer_idx)
    if w is None or (isinstance(delta, int) and delta == 0):
        return k.clone() if out is None else out.copy_(k)
    cos, sin = _cos_sin(delta, w, k.device, _compute_dtype(k.dtype))
    return _rotate(k, cos, sin, spec.layout, spec.rotary_dim, out=out)


def rerotate(
    keys: torch.Tensor,
    from_pos: torch.Tensor,
    to_pos: torch.Tensor,
    spec: RopeSpec,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Move K computed at ``from_pos`` to ``to_pos``, on every layer.

    keys:     [layers, kv_heads, tokens, head_dim] post-RoPE K (``ChunkKV.keys``, i.e. ``kv[:, 0]``),
              any float dtype and device; no batch dim (use ``rerotate_layer`` for batched caches).
    from_pos: [tokens] int64, the positions K was computed at.
    to_pos:   [tokens] int64, the positions K should have.
    layers:   the model layer index of each ``keys[i]``; default ``range(spec.num_layers)``.
    Returns a new [layers, kv_heads, tokens, head_dim] tensor in keys' dtype. Raises
    UnsupportedRopeError if a position is past ``spec.max_position``.
    """
    if keys.dim() != 4 or keys.shape[-1] != spec.head_dim:
        raise InputError(
            f"keys must be [layers, kv_heads, tokens, head_dim={spec.head_dim}], got shape {tuple(keys.shape)}"
        )
    tokens = keys.shape[2]
    from_pos = _as_positions(from_pos, "from_pos", tokens)
    to_pos = _as_positions(to_pos, "to_pos", tokens)
    layer_ids = list(range(spec.num_layers)) if layers is None else [int(i) for i in layers]
    if len(layer_ids) != keys.shape[0] or any(not 0 <= i < spec.num_layers for i in layer_ids):
        raise InputError(
            f"keys has {keys.shape[0]} layers but layers={layer_ids} (model has {spec.num_layers}); "
            "pass one model layer index per keys[i]"
        )
    if tokens == 0:
        return keys.clone()
    spec.check_positions(int(torch.maximum(from_pos.max(), to_pos.max())))

    delta_t = to_pos - from_pos
    first = int(delta_t[0])
    # Fast path: a chunk moved as a block has one delta; its cos/sin are [n], not [tokens, n].
    delta: int | torch.Tensor = first if bool((delta_t == first).all()) else delta_t
    if isinstance(delta, int) and delta == 0:
        return keys.clone()

    groups: dict[int, list[int]] = {}
    for row, layer in enumerate(layer_ids):
        groups.setdefault(spec.layer_freq_index[layer], []).append(row)
    dtype = _compute_dtype(keys.dtype)
    if len(groups) == 1 and -1 not in groups:
        (fi,) = groups
        cos, sin = _cos_sin(delta, spec.freqs[fi].inv_freq, keys.device, dtype)
        return _rotate(keys, cos, sin, spec.layout, spec.rotary_dim)
    out = keys.clone()
    for fi, rows in groups.items():
        if fi < 0:
            continue
        cos, sin = _cos_sin(delta, spec.freqs[fi].inv_freq, keys.device, dtype)
        idx = torch.tensor(rows, device=keys.device)
        out[idx] = _rotate(keys[idx], cos, sin, spec.layout, spec.rotary_dim)
    return out
