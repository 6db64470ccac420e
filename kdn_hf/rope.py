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

Pair layouts (``RopeSpec.layout``), ``n = rotary_dim // 2``:

- ``"half"`` (rotate_half; Llama, Qwen, Gemma, GPT-NeoX, Phi): pair i is dims (i, i + n).
- ``"interleaved"`` (GPT-J, CodeGen, Cohere): pair i is dims (2i, 2i + 1).

Everything is read (in ``kdn_hf.rope_probe``) from the model's own rotary module (its ``inv_freq``
buffers, and its cos/sin output for the layout), with the config used for
geometry and the rope type; nothing here is a per-architecture table. One
convention cannot be seen in the module's output: a module that returns one
cos/sin per frequency leaves the pairing to the attention code, and a modeling
file defining ``rotate_every_two`` (GPT-J, CodeGen) means neighbours pair up.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kdn_hf.errors import ConfigError, InputError, UnsupportedRopeError

LAYOUTS = ("half", "interleaved")
# Rope types whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn", "proportional"})
# Static below a known position, switching frequencies past it.
BOUNDED_ROPE_TYPES = frozenset({"longrope"})

_REFUSE_HINT = (
    "use mode='full' (ordinary prefill) for this model, or a model with static RoPE "
    f"({', '.join(sorted(STATIC_ROPE_TYPES | BOUNDED_ROPE_TYPES))})"
)


@dataclass(frozen=True, eq=False)
class RopeFrequencies:
    """One set of rotary frequencies, shared by every layer that uses it.

    inv_freq:          [rotary_dim // 2] float64 on CPU, the w_i of each rotated pair.
    rope_type:         the HF rope type that produced them ("default", "llama3", ...).
    attention_scaling: the factor HF multiplies cos/sin by (already inside cached K;
                       kept for the fingerprint, never applied by re-rotation).
    name:              the layer type these belong to ("sliding_attention"), "" when
                       the model has a single set.
    """

    inv_freq: torch.Tensor
    rope_type: str
    attention_scaling: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.inv_freq.dim() != 1 or not self.inv_freq.is_floating_point():
            raise ConfigError(
                f"RopeFrequencies.inv_freq must be a 1-D float tensor, got shape "
                f"{tuple(self.inv_freq.shape)} dtype {self.inv_freq.dtype}"
            )
        object.__setattr__(self, "inv_freq", self.inv_freq.detach().to("cpu", torch.float64))


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """What re-rotation needs to know about a model's RoPE, per layer.

    freqs:            the distinct frequency sets.
    layer_freq_index: per model layer, an index into ``freqs``; -1 = the layer has no RoPE.
    rotary_dim:       number of leading head dims that rotate (even, <= head_dim).
    head_dim:         K's last dim.
    layout:           "half" (rotate_half pairs (i, i+n)) or "interleaved" (pairs (2i, 2i+1)).
    max_position:     positions must stay below this for the frequencies to hold
                      (longrope's original_max_position_embeddings); None = no bound.

    Compare specs with ``describe()``; tensors make dataclass equality meaningless.
    """

    freqs: tuple[RopeFrequencies, ...]
    layer_freq_index: tuple[int, ...]
    rotary_dim: int
    head_dim: int
    layout: str = "half"
    max_position: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"RopeSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(
                f"RopeSpec.rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}"
            )
        for f in self.freqs:
            if f.inv_freq.numel() != self.rotary_dim // 2:
                raise ConfigError(
                    f"frequency set {f.name or f.rope_type!r} has {f.inv_freq.numel()} frequencies, "
                    f"expected rotary_dim // 2 = {self.rotary_dim // 2}"
                )
        bad = [i for i in self.layer_freq_index if not -1 <= i < len(self.freqs)]
        if bad:
            raise ConfigError(
                f"RopeSpec.layer_freq_index entries must be -1 or in [0, {len(self.freqs)}), got {bad}"
            )
        if self.max_position is not None and self.max_position <= 0:
            raise ConfigError(f"RopeSpec.max_position must be positive or None, got {self.max_position}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_freq_index)

    @property
    def rope_type(self) -> str:
        """The rope type, or the distinct types joined by '+' (Gemma3: 'default+linear')."""
        return "+".join(sorted({f.rope_type for f in self.freqs})) or "none"

    def inv_freq(self, layer_idx: int) -> torch.Tensor | None:
        """[rotary_dim // 2] float64 frequencies of one layer; None if it has no RoPE."""
        i = self.layer_freq_index[layer_idx]
        return None if i < 0 else self.freqs[i].inv_freq

    def check_positions(self, max_pos: int) -> None:
        """Raise UnsupportedRopeError if position ``max_pos`` is past ``max_position``.

        Callers that know the whole prompt length should call this with it:
        longrope picks its frequencies from the longest position in the forward.
        """
        if self.max_position is not None and max_pos >= self.max_position:
            raise UnsupportedRopeError(
                f"position {max_pos} is past {self.max_position}, where this model's {self.rope_type} RoPE "
                f"switches to different frequencies for the whole sequence; K stored with the short "
                f"frequencies cannot be re-rotated exactly there. Keep prompts under {self.max_position} "
                f"tokens or {_REFUSE_HINT}"
            )

    def describe(self) -> dict:
        """A JSON-able canonical description (exact float values), for fingerprints."""
        return {
            "layout": self.layout,
            "rotary_dim": self.rotary_dim,
            "head_dim": self.head_dim,
            "num_layers": self.num_layers,
            "max_position": self.max_position,
            "layer_freq_index": list(self.layer_freq_index),
            "freqs": [
                {
                    "name": f.name,
                    "rope_type": f.rope_type,
                    "attention_scaling": float(f.attention_scaling),
                    "inv_freq": [float(x) for x in f.inv_freq.tolist()],
                }
                for f in self.freqs
            ],
        }


# --------------------------------------------------------------------------- re-rotation


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cos_sin(delta: torch.Tensor | int, inv_freq: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """cos/sin of delta * w: [n] for an int delta, [tokens, n] for a [tokens] delta."""
    # float64 is not available on every backend (mps); there the angles are made on CPU.
    where = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    w = inv_freq.to(where, torch.float64)
    if isinstance(delta, int):
        ang = float(delta) * w  # exact: |delta| < 2**53
    else:
        ang = delta.to(where, torch.float64)[:, None] * w
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


def _rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate k [..., tokens, head_dim] by angles whose cos/sin are [n] or [tokens, n].

    out: optional tensor of k's shape and dtype to write the result into (returned). For the common
    case (half layout, whole head rotated, k already in the compute dtype) it is written in place
    with one temporary, the same operations in the same order as the allocating path (bit-identical).
    """
    n = rotary_dim // 2
    if (out is not None and layout == "half" and rotary_dim == k.shape[-1] and k.dtype == cos.dtype
            and out.dtype == k.dtype and out.shape == k.shape):
        x1, x2 = k[..., :n], k[..., n:]
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


# --------------------------------------------------------------------------- reading a model


# Reading the spec from a model lives in its own module; re-exported here for callers.
from kdn_hf.rope_probe import rope_spec_from_config, rope_spec_from_model  # noqa: E402,F401
