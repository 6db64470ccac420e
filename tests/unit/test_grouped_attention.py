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
