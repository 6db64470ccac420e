"""RoPE re-rotation on the real SmolLM2 model: K moved from 0.. to d.. equals the model's own K at d..

HF computes each RoPE angle p * w in float32 (relative error 2**-24, ~1e-4 rad near
p = 2100), so the stock model at positions d.. is not exactly a shifted copy of itself at
0..: deeper layers amplify that rounding through attention. The reference forwards here
therefore compute the same angles in float64 (the rotary module's own inv_freq and
attention_scaling, patched for this test only), which leaves only ordinary fp32 noise
between the two runs and makes a 1e-3 bound meaningful on all layers.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import DynamicCache

from kdn_hf.rope import rerotate, rope_spec_from_model

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern, a notebook "
    "and a thermos of strong tea. From the gallery he could see the fishing boats returning to the harbour, "
    "the gulls circling above the breakwater, and far to the west the dark line of the islands where his "
    "grandfather had been born. He wrote down the wind, the swell and the colour of the sky."
)
OFFSETS = (1, 37, 512, 2048)


def _kv(model, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [layers, kv_heads, tokens, head_dim] of one forward at ``positions``."""
    cache = DynamicCache(config=model.config)
    kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(input_ids=ids[None], position_ids=positions[None], use_cache=True, **{kwarg: cache})
    return (torch.stack([layer.keys[0] for layer in cache.layers]),
            torch.stack([layer.values[0] for layer in cache.layers]))


@contextlib.contextmanager
def _exact_angles(rotary):
    """Give a Llama-style rotary module float64 angles (same cos/sin layout) while inside."""

    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * rotary.inv_freq.double()
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rotary.attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    rotary.forward = forward  # an instance attribute shadows the class method ...
    try:
        yield
    finally:
        del rotary.forward  # ... and deleting it restores the shared session model exactly


def test_rerotation_matches_smollm2_up_to_offset_2048(smol):
    model, tokenizer = smol
    spec = rope_spec_from_model(model)
    assert spec.layout == "half" and spec.rotary_dim == spec.head_dim and spec.rope_type == "default"
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq.double().cpu(), spec.freqs[0].inv_freq, rtol=0, atol=0)
    assert spec.num_layers == model.config.num_hidden_layers and spec.max_position is None

    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:64], device=model.device)
    assert ids.numel() >= 48
    base = torch.arange(ids.numel(), device=model.device)
    with _exact_angles(rotary):
        k0, v0 = _kv(model, ids, base)
        kds = {d: _kv(model, ids, base + d) for d in OFFSETS}
    assert "forward" not in vars(rotary)
    assert k0.shape[0] == spec.num_layers and k0.shape[-1] == spec.head_dim
    rel = 1e-3 if model.dtype == torch.float32 else 2e-2
    for d, (kd, vd) in kds.items():
        moved = rerotate(k0, base, base + d, spec)
        for layer in range(spec.num_layers):
            # Relative to the layer's largest value (floor 1e-3 absolute): 30 fp32 layers amplify
            # rounding noise in proportion to the activations, wherever the angles come from.
            k_tol = rel * max(1.0, kd[layer].abs().max().item())
            v_tol = rel * max(1.0, vd[layer].abs().max().item())
            err = (moved[layer] - kd[layer]).abs().max().item()
            assert err <= k_tol, f"layer {layer}, offset {d}: K error {err:.2e} > {k_tol:.1e}"
            v_err = (vd[layer] - v0[layer]).abs().max().item()
            assert v_err <= v_tol, f"layer {layer}, offset {d}: V changed by {v_err:.2e} > {v_tol:.1e}"
        # Without the rotation the check would fail.
        assert (k0 - kd).abs().max().item() > 10 * rel * max(1.0, kd.abs().max().item())
