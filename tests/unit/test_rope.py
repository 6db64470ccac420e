"""RoPE re-rotation against transformers itself, on tiny random models of each RoPE family.

The reference: run the model on the same tokens at positions 0..n-1 and d..d+n-1;
rotating the first cache's K by d must give the second cache's K on every layer.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import transformers as T
from transformers import DynamicCache

from kdn_hf.errors import ConfigError, InputError, UnsupportedRopeError
from kdn_hf.rope import (
    RopeFrequencies, RopeSpec, rerotate, rerotate_layer, rope_spec_from_config, rope_spec_from_model,
)

N = 16  # tokens per forward
OFFSETS = (1, 37, 512, 2048)
TOL = 1e-3
VOCAB = 128
SMALL = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
    intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=4096,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
)


def _tiny(model_cls, config_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(**kw)
    config._attn_implementation = "eager"
    return model_cls(config).eval()


CASES = {
    "llama_default": lambda: _tiny(T.LlamaForCausalLM, T.LlamaConfig, **SMALL),
    "llama_linear": lambda: _tiny(
        T.LlamaForCausalLM, T.LlamaConfig, **SMALL,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ),
    "llama_llama3": lambda: _tiny(
        T.LlamaForCausalLM, T.LlamaConfig, **SMALL,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    ),
    "llama_yarn": lambda: _tiny(
        T.LlamaForCausalLM, T.LlamaConfig, **SMALL,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 1024},
    ),
    "qwen2": lambda: _tiny(T.Qwen2ForCausalLM, T.Qwen2Config, **SMALL),
    "gemma3": lambda: _tiny(
        T.Gemma3ForCausalLM, T.Gemma3TextConfig, **SMALL, head_dim=16, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}},
    ),
    "phi_partial": lambda: _tiny(T.PhiForCausalLM, T.PhiConfig, **SMALL, partial_rotary_factor=0.5),
    "gpt_neox_partial": lambda: _tiny(
        T.GPTNeoXForCausalLM, T.GPTNeoXConfig, **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
        rotary_pct=0.25,
    ),
    "gptj_interleaved": lambda: _tiny(
        T.GPTJForCausalLM, T.GPTJConfig, n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=4096,
        rotary_dim=8, bos_token_id=0, eos_token_id=0,
    ),
    "cohere_interleaved": lambda: _tiny(T.CohereForCausalLM, T.CohereConfig, **SMALL),
    "phi3_longrope": lambda: _tiny(
        T.Phi3ForCausalLM, T.Phi3Config, **{**SMALL, "max_position_embeddings": 16384},
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [2.0 + 0.5 * i for i in range(8)],
                         "original_max_position_embeddings": 4096},
    ),
    "smollm3_no_rope_layer": lambda: _tiny(T.SmolLM3ForCausalLM, T.SmolLM3Config, **SMALL, no_rope_layers=[1, 0]),
}

# (layout, rotary_dim, head_dim, layer_freq_index) each case must be read as
EXPECTED = {
    "llama_default": ("half", 16, 16, (0, 0)),
    "llama_linear": ("half", 16, 16, (0, 0)),
    "llama_llama3": ("half", 16, 16, (0, 0)),
    "llama_yarn": ("half", 16, 16, (0, 0)),
    "qwen2": ("half", 16, 16, (0, 0)),
    "gemma3": ("half", 16, 16, (1, 0)),  # freqs sorted by layer type name: full_attention, sliding_attention
    "phi_partial": ("half", 8, 16, (0, 0)),
    "gpt_neox_partial": ("half", 4, 16, (0, 0)),
    "gptj_interleaved": ("interleaved", 8, 16, (0, 0)),
    "cohere_interleaved": ("interleaved", 16, 16, (0, 0)),
    "phi3_longrope": ("half", 16, 16, (0, 0)),
    "smollm3_no_rope_layer": ("half", 16, 16, (0, -1)),
}


def _make(case: str):
    """Build a case's tiny model; skip where this transformers version models it without a rotary module
    (GPT-J before ~5.10 computes sin/cos inline: rope_spec_from_model refuses it with a clear error)."""
    model = CASES[case]()
    if case.startswith("gptj") and not any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules()):
        with pytest.raises(UnsupportedRopeError, match="no rotary embedding module"):
            rope_spec_from_model(model)
        pytest.skip("this transformers version's GPT-J has no rotary module; refusal checked instead")
    return model


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_kv(model, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [layers, kv_heads, tokens, head_dim] of one forward at ``positions``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[None], position_ids=positions[None], use_cache=True, **{_cache_kwarg(model): cache})
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys, values


@pytest.mark.parametrize("case", sorted(CASES))
def test_rerotated_keys_match_the_model_at_the_new_positions(case):
    model = _make(case)
    spec = rope_spec_from_model(model)
    assert (spec.layout, spec.rotary_dim, spec.head_dim, spec.layer_freq_index) == EXPECTED[case]
    ids = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(1))
    base = torch.arange(N)
    k0, v0 = model_kv(model, ids, base)
    for d in OFFSETS:
        kd, vd = model_kv(model, ids, base + d)
        moved = rerotate(k0, base, base + d, spec)
        assert moved.dtype == k0.dtype and moved.shape == k0.shape
        for layer in range(spec.num_layers):
            err = (moved[layer] - kd[layer]).abs().max().item()
            assert err <= TOL, f"{case} layer {layer} d={d}: max abs error {err:.2e}"
            assert (vd[layer] - v0[layer]).abs().max().item() <= TOL, f"{case} layer {layer}: V moved"
            if spec.layer_freq_index[layer] >= 0:
                # The check can fail: without rotation K is far off.
                assert (k0[layer] - kd[layer]).abs().max().item() > 100 * max(err, 1e-6)


@pytest.mark.parametrize("case", ["llama_llama3", "llama_yarn"])
def test_rerotation_is_exact_against_a_float64_model_with_float64_angles(case):
    # The stock comparison above is limited by HF's float32 angles; with them made exact the
    # remaining difference is float64 noise, which shows the rotation (and yarn's scaling) is exact.
    model = CASES[case]().double()
    rotary = model.model.rotary_emb

    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * rotary.inv_freq.double()
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rotary.attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    rotary.forward = forward
    spec = rope_spec_from_model(model)
    ids = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(3))
    base = torch.arange(N)
    k0, _ = model_kv(model, ids, base)
    kd, _ = model_kv(model, ids, base + 2048)
    assert (rerotate(k0, base, base + 2048, spec) - kd).abs().max().item() <= 1e-10


@pytest.mark.parametrize("case", sorted(CASES))
def test_spec_from_the_config_alone_equals_the_spec_read_from_the_model(case):
    model = _make(case)
    config_before = model.config.to_dict()
    assert rope_spec_from_config(model.config).describe() == rope_spec_from_model(model).describe()
    assert model.config.to_dict() == config_before  # the caller's config is not touched


@pytest.mark.parametrize("rope_type", ["dynamic"])
def test_spec_from_config_refuses_what_the_model_path_refuses(rope_type):
    config = T.LlamaConfig(**SMALL, rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedRopeError, match="dynamic"):
        rope_spec_from_config(config)
    with pytest.raises(UnsupportedRopeError, match="no rotary embedding"):
        rope_spec_from_config(T.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB))


def test_partial_rotary_rotates_only_the_leading_dims_in_half_layout():
    model = CASES["gpt_neox_partial"]()
    spec = rope_spec_from_model(model)
    keys = torch.randn(2, 4, N, 16)
    moved = rerotate(keys, torch.arange(N), torch.arange(N) + 37, spec)
    assert torch.equal(moved[..., 4:], keys[..., 4:])
    # half layout on 4 dims: pairs (0, 2) and (1, 3) keep their norms
    for a, b in ((0, 2), (1, 3)):
        torch.testing.assert_close(moved[..., a] ** 2 + moved[..., b] ** 2, keys[..., a] ** 2 + keys[..., b] ** 2)


def test_gemma3_reads_one_frequency_set_per_layer_type():
    model = CASES["gemma3"]()
    spec = rope_spec_from_model(model)
    by_name = {f.name: f for f in spec.freqs}
    assert set(by_name) == {"sliding_attention", "full_attention"}
    assert by_name["full_attention"].rope_type == "linear" and by_name["sliding_attention"].rope_type == "default"
    assert spec.rope_type == "default+linear"
    rotary = model.model.rotary_emb
    for name, f in by_name.items():
        torch.testing.assert_close(f.inv_freq, getattr(rotary, f"{name}_inv_freq").double())
    assert not torch.allclose(by_name["full_attention"].inv_freq, by_name["sliding_attention"].inv_freq)


def test_yarn_scaling_is_carried_by_stored_k_and_not_applied_again():
    spec = rope_spec_from_model(CASES["llama_yarn"]())
    assert spec.freqs[0].attention_scaling > 1.05  # HF multiplies cos/sin by it ...
    keys = torch.randn(2, 2, N, 16)
    moved = rerotate(keys, torch.arange(N), torch.arange(N) + 512, spec)
    # ... but a rotation by the delta preserves norms (the model test above checks the values)
    torch.testing.assert_close(moved.norm(dim=-1), keys.norm(dim=-1))


def test_layer_without_rope_is_left_alone():
    spec = rope_spec_from_model(CASES["smollm3_no_rope_layer"]())
    keys = torch.randn(2, 2, N, 16)
    moved = rerotate(keys, torch.arange(N), torch.arange(N) + 9, spec)
    assert torch.equal(moved[1], keys[1]) and not torch.allclose(moved[0], keys[0])
    assert spec.inv_freq(1) is None


@pytest.mark.parametrize("case", ["llama_llama3", "gptj_interleaved", "gemma3"])
def test_per_token_deltas_match_the_model_on_layer_zero(case):
    # Layer 0's pre-RoPE K depends on nothing but the token, so any positions can be compared there.
    model = _make(case)
    spec = rope_spec_from_model(model)
    ids = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(2))
    base = torch.arange(N)
    target = torch.cat((torch.arange(8) + 100, torch.arange(8) + 2000))  # two chunks, two offsets
    k0, _ = model_kv(model, ids, base)
    kt, _ = model_kv(model, ids, target)
    moved = rerotate(k0, base, target, spec)
    assert (moved[0] - kt[0]).abs().max().item() <= TOL


def _spec(layout: str = "half", rotary_dim: int = 8, head_dim: int = 12) -> RopeSpec:
    w = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    return RopeSpec((RopeFrequencies(w, "default"), RopeFrequencies(w / 4, "linear")), (0, 1, 0), rotary_dim,
                    head_dim, layout)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_constant_delta_fast_path_equals_the_per_token_path(layout):
    spec = _spec(layout)
    keys = torch.randn(3, 2, 10, 12)
    start, end = torch.arange(10), torch.arange(10) + 777
    fast = rerotate(keys, start, end, spec)
    for layer in range(3):
        per_token = rerotate_layer(keys[layer], end - start, spec, layer)
        torch.testing.assert_close(fast[layer], per_token, rtol=0, atol=1e-6)
        torch.testing.assert_close(rerotate_layer(keys[layer], 777, spec, layer), per_token, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotating_back_recovers_the_original(layout, dtype):
    spec = _spec(layout)
    keys = torch.randn(3, 2, 10, 12).to(dtype)
    pos = torch.arange(10)
    far = pos * 3 + 2048  # per-token deltas, up to 2075
    there = rerotate(keys, pos, far, spec)
    back = rerotate(there, far, pos, spec)
    assert there.dtype == back.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    assert (back.float() - keys.float()).abs().max().item() <= tol
    assert torch.equal(there[..., 8:], keys[..., 8:])


def test_rerotate_a_subset_of_layers():
    spec = _spec()
    keys = torch.randn(3, 2, 5, 12)
    pos = torch.arange(5)
    full = rerotate(keys, pos, pos + 5, spec)
    part = rerotate(keys[1:], pos, pos + 5, spec, layers=[1, 2])
    torch.testing.assert_close(part, full[1:], rtol=0, atol=0)


def test_dynamic_ntk_is_refused_with_a_way_out():
    model = _tiny(T.LlamaForCausalLM, T.LlamaConfig, **SMALL,
                  rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedRopeError, match="dynamic") as err:
        rope_spec_from_model(model)
    assert "mode='full'" in str(err.value) and "sequence length" in str(err.value)


def test_model_without_rotary_embedding_is_refused():
    model = _tiny(T.GPT2LMHeadModel, T.GPT2Config, n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB,
                  bos_token_id=0, eos_token_id=0)
    with pytest.raises(UnsupportedRopeError, match="no rotary embedding"):
        rope_spec_from_model(model)


def test_longrope_is_bounded_by_its_original_context():
    spec = rope_spec_from_model(CASES["phi3_longrope"]())
    assert spec.max_position == 4096
    keys = torch.randn(2, 2, 4, 16)
    rerotate(keys, torch.arange(4), torch.arange(4) + 4092, spec)  # last position 4095: fine
    with pytest.raises(UnsupportedRopeError, match="4096"):
        rerotate(keys, torch.arange(4), torch.arange(4) + 4093, spec)
    with pytest.raises(UnsupportedRopeError):
        spec.check_positions(5000)


def test_describe_is_json_and_tells_specs_apart():
    a = rope_spec_from_model(CASES["llama_default"]())
    b = rope_spec_from_model(CASES["llama_llama3"]())
    text = json.dumps(a.describe(), sort_keys=True)
    assert json.loads(text) == a.describe() == rope_spec_from_model(CASES["llama_default"]()).describe()
    assert a.describe() != b.describe()


def test_bad_inputs_raise_clear_errors():
    spec = _spec()
    keys = torch.randn(3, 2, 5, 12)
    pos = torch.arange(5)
    with pytest.raises(InputError, match="head_dim"):
        rerotate(torch.randn(3, 2, 5, 10), pos, pos, spec)
    with pytest.raises(InputError, match="to_pos"):
        rerotate(keys, pos, pos.float(), spec)
    with pytest.raises(InputError, match="from_pos"):
        rerotate(keys, pos[:4], pos, spec)
    with pytest.raises(InputError, match="layers"):
        rerotate(keys[:2], pos, pos, spec)
    with pytest.raises(ConfigError, match="layout"):
        _spec(layout="gptj")
    with pytest.raises(ConfigError, match="rotary_dim"):
        _spec(rotary_dim=16, head_dim=12)
