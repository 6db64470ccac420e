"""What re-rotation needs to know about a model's RoPE: :class:`RopeSpec`, per layer.

A spec is read from a loaded model (``kdn_hf.rope.probe``) or from its config
(``kdn_hf.rope.config``); re-rotation (``kdn_hf.rope.rotate``) uses it.

Pair layouts (``RopeSpec.layout``), ``n = rotary_dim // 2``:

- ``"half"`` (rotate_half; Llama, Qwen, Gemma, GPT-NeoX, Phi): pair i is dims (i, i + n).
- ``"interleaved"`` (GPT-J, CodeGen, Cohere): pair i is dims (2i, 2i + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdn_hf.errors import ConfigError, UnsupportedRopeError

LAYOUTS = ("half", "interleaved")
# Rope types whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn", "proportional"})
# Static below a known position, switching frequencies past it.
BOUNDED_ROPE_TYPES = frozenset({"longrope"})

REFUSE_HINT = (
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
                f"tokens or {REFUSE_HINT}"
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
