"""The recompute's grouped attention path on other Llama-style families (tiny random-weight models
built from their transformers configs, nothing downloaded): recomputing any rows of an exact cache
leaves it unchanged, with many causal groups and with one."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers

from kdn_hf.blend import recompute
from kdn_hf.compute import stack_cache

rc = importlib.import_module("kdn_hf.blend.recompute")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {"use_sliding_window": False}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16, "use_sliding_window": False}),
}


def _tiny(family: str, **extra):
    cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    cfg = cls(**{**TINY, **kw, **extra})
    cfg._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("group_rows", [3, 10_000])
def test_grouped_recompute_of_an_exact_cache_leaves_it_unchanged(family, group_rows, monkeypatch, fixed_selection):
    model = _tiny(family)
    assert all(rc.groupable(layer) for layer in model.model.layers), family
    monkeypatch.setattr(rc, "GROUP_ROWS", group_rows)
    T = 120
    ids = torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact = stack_cache(model(ids[None], use_cache=True).past_key_values)
    for slots in ([0], list(range(2, T, 4)), list(range(T))):
        kv = exact.clone()
        recompute(model, kv, ids, [(0, T)], 0.5, fixed_selection(slots))
        assert (kv - exact).abs().max().item() <= 1e-5, (family, slots[:4])
    # question rows at the end, question-blind selection: the same
    kv = exact.clone()
    recompute(model, kv, ids, [(0, T - 7)], 0.5, fixed_selection(range(1, T - 7, 5)), query_rows=7)
    assert (kv - exact).abs().max().item() <= 1e-5, family


def test_sliding_window_layers_keep_the_stock_path():
    assert not any(rc.groupable(layer) for layer in _tiny("mistral", sliding_window=32).model.layers)
    assert not any(rc.groupable(layer) for layer in
                   _tiny("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0).model.layers)


@pytest.mark.parametrize("group_rows", [3, 10_000])
def test_selected_attention_call_equals_the_grouped_sdpa_loop(group_rows, monkeypatch):
    """The call CUDA makes (``selected_attention`` over every key, its torch backend here: the Triton
    kernel is checked against it in test_kernels_attention) gives the CPU path's grouped SDPA result:
    the GQA head order, the positions and the output layout agree."""
    import kdn_hf.blend.runner as runner_mod
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _tiny("llama")
    monkeypatch.setattr(rc, "GROUP_ROWS", group_rows)
    layer, T = model.model.layers[1], 90
    attn = layer.self_attn
    g = torch.Generator().manual_seed(2)
    rows = torch.randperm(T, generator=g)[:37].sort().values
    with torch.inference_mode():
        hidden = torch.randn(1, rows.numel(), TINY["hidden_size"], generator=g)
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(1, rows.numel(), -1, attn.head_dim).transpose(1, 2)  # [1, 4, rows, 16]
        tables = model.model.rotary_emb(x, position_ids=torch.arange(T)[None])
        rs = rc._Rows(rows, T, tables, q.dtype, own_causal=True)
        cos, sin = rs.pos_emb_for(None)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        keys, values = torch.randn(2, 1, TINY["num_key_value_heads"], T, attn.head_dim, generator=g)
        calls = []
        real = runner_mod.selected_attention
        monkeypatch.setattr(runner_mod, "selected_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        loop = runner_mod.grouped_attention(q, keys, values, rs, attn.scaling)  # CPU: the grouped SDPA loop
        assert not calls
        kernel_path = runner_mod.grouped_attention(q, keys, values, rs, attn.scaling, backend="torch")
        assert calls
    assert loop.shape == kernel_path.shape == (1, rows.numel(), q.shape[1] * attn.head_dim)
    assert (loop - kernel_path).abs().max().item() <= 1e-5


@pytest.mark.parametrize("group_rows", [3, 10_000])
def test_split_cpu_attention_equals_one_masked_call_per_group(group_rows, monkeypatch):
    """The CPU path splits each group's keys at its first row (unmasked before it, causal from it) and
    merges the two flash calls by log-sum-exp: the same as attending each group's keys with one causal
    mask, including a group whose first row is slot 0 (nothing before it) and GQA folding."""
    import kdn_hf.blend.runner as runner_mod

    assert runner_mod._FLASH_CPU is not None  # the CPU flash op of the pinned torch returns the log-sum-exp
    monkeypatch.setattr(rc, "GROUP_ROWS", group_rows)
    g = torch.Generator().manual_seed(3)
    T, heads, kv_heads, d = 200, 6, 2, 16
    rows = torch.cat([torch.tensor([0]), torch.randperm(T - 1, generator=g)[:40] + 1]).sort().values
    q = torch.randn(1, heads, rows.numel(), d, generator=g)
    keys, values = torch.randn(2, 1, kv_heads, T, d, generator=g) * 3
    rs = rc._Rows(rows, T, (torch.zeros(1, T, d), torch.zeros(1, T, d)), torch.float32, own_causal=True)
    split = runner_mod._split_grouped_attention(q, keys, values, rs, 0.3)
    # the reference: every row over every key, one causal mask, GQA by repeating K/V
    mask = rc.causal_mask(rows, T, torch.float32, "cpu")
    rep = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1), attn_mask=mask, scale=0.3)
    assert split.shape == (1, rows.numel(), heads * d)
    assert (split - ref.transpose(1, 2).reshape(1, rows.numel(), -1)).abs().max().item() <= 1e-5
    assert rs.split_groups_for(rep)[0][2] == 0  # the first group starts at slot 0: no unmasked part
    monkeypatch.setattr(runner_mod, "_FLASH_CPU", None)  # without the op: the masked loop, same result
    assert (runner_mod.grouped_attention(q, keys, values, rs, 0.3) - split).abs().max().item() <= 1e-5
