"""The layer runner (kdn_hf.blend.runner) on tiny random-weight models of several families, built from
their transformers configs (nothing downloaded), windowed or not: ratio-1 blend is full prefill,
recomputing any rows of an exact cache leaves it unchanged (sliding windows respected), the question
pass's attention weights are the model's own, the logits are the model's, and what the runner cannot
run exactly is refused."""

from __future__ import annotations

import pytest
import torch
import transformers

from transformers import DynamicCache

from kdn_hf.blend import get_selection, recompute
from kdn_hf.blend.runner import LayerRunner, layer_runner
from kdn_hf.compat import cache_kwarg, output_cache
from kdn_hf.compute import stack_cache
from kdn_hf.errors import BlendUnsupportedError, ConfigError

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.05)
WINDOW = 16  # shorter than every prompt below: the windowed layers' masks matter
T = 72
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral-window": (transformers.MistralConfig, {"sliding_window": WINDOW}),
    "qwen2-window": (transformers.Qwen2Config, {"use_sliding_window": True, "sliding_window": WINDOW,
                                                "max_window_layers": 1}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16, "use_sliding_window": False}),
    "gemma3": (transformers.Gemma3TextConfig, {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]}),
    # attention and final logit soft-capping; eager attention only (transformers has no SDPA for it)
    "gemma2": (transformers.Gemma2Config, {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
        "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
}
WINDOWED = ("mistral-window", "qwen2-window", "gemma3", "gemma2")


def _tiny(family: str, attn: str = "sdpa", **extra):
    cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    cfg = cls(**{**TINY, **kw, **extra})
    cfg._attn_implementation = "eager" if family == "gemma2" else attn
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _full(model, ids):
    """(exact KV [layers, 2, kv_heads, T, head_dim], logits [T, vocab] float32) of full prefill."""
    # a plain DynamicCache keeps every slot of the windowed layers too
    out = model(ids[None], use_cache=True, **{cache_kwarg(model): DynamicCache()})
    return stack_cache(output_cache(out)), out.logits[0].float()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_plans_read_each_layers_attention_type_and_rope():
    plans = layer_runner(_tiny("gemma3")).plans
    assert [p.window for p in plans] == [WINDOW, WINDOW, None, WINDOW]
    assert [p.rope_key for p in plans] == ["sliding_attention", "sliding_attention", "full_attention",
                                           "sliding_attention"]
    assert not any(p.grouped for p in plans) and all(p.scored for p in plans)
    assert [p.window for p in layer_runner(_tiny("mistral-window")).plans] == [WINDOW] * 4
    assert [p.window for p in layer_runner(_tiny("qwen2-window")).plans] == [None, WINDOW, WINDOW, WINDOW]
    assert [p.grouped for p in layer_runner(_tiny("qwen2-window")).plans] == [True, False, False, False]
    llama = _tiny("llama")
    assert all(p.grouped and p.window is None for p in layer_runner(llama).plans)
    assert layer_runner(llama) is layer_runner(llama)  # built once per model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ratio_one_blend_is_full_prefill(family, fixed_selection):
    model = _tiny(family)
    ids = _ids()
    exact, logits = _full(model, ids)
    # every slot recomputed from garbage: the result is the prefill KV (probe path, check layer 1)
    kv = torch.randn_like(exact) * 3
    recompute(model, kv, ids, [(0, 30), (30, T)], 1.0, fixed_selection(range(T)))
    assert _max_err(kv, exact) <= 1e-4, family
    # question-aware at ratio 1: the question pass runs over garbage, every slot then runs from layer 0,
    # and the last row's logits are the model's
    q = 6
    kv = torch.randn_like(exact) * 3
    res = recompute(model, kv, ids, [(0, 30), (30, T - q)], 1.0, get_selection("kdn"), query_rows=q,
                    last_hidden=True)
    assert _max_err(kv, exact) <= 1e-4, family
    assert _max_err(layer_runner(model).logits(res.last_hidden), logits[-1]) <= 1e-4, family
    # the paper's cacheblend at ratio 1: every slot at every layer, no filtering
    kv = torch.randn_like(exact) * 3
    res = recompute(model, kv, ids, [(0, 30), (30, T - q)], 1.0, get_selection("cacheblend"), query_rows=q)
    assert _max_err(kv, exact) <= 1e-4 and set(res.layer_rows) == {T - q}, family


@pytest.mark.parametrize("family", WINDOWED)
def test_recomputing_rows_of_an_exact_windowed_cache_leaves_it_unchanged(family, fixed_selection):
    """The bug this runner fixes: the stock-forward path used a full causal mask on windowed layers
    (a tiny Mistral with sliding_window=32 changed by 0.22)."""
    model = _tiny(family)
    ids = _ids()
    exact, _ = _full(model, ids)
    for slots in ([T - 1], list(range(2, T, 4)), list(range(T // 2, T))):
        kv = exact.clone()
        recompute(model, kv, ids, [(0, T)], 0.5, fixed_selection(slots))
        assert _max_err(kv, exact) <= 1e-4, (family, slots[:3])
    # question-aware, with progressive narrowing (ratio < 1)
    kv = exact.clone()
    recompute(model, kv, ids, [(0, 40), (40, T - 8)], 0.3, get_selection("kdn"), query_rows=8)
    assert _max_err(kv, exact) <= 1e-4, family
    # the paper's cacheblend, filtering gradually over the windowed layers
    kv = exact.clone()
    res = recompute(model, kv, ids, [(0, 40), (40, T - 8)], 0.3, get_selection("cacheblend"), query_rows=8)
    assert _max_err(kv, exact) <= 1e-4 and res.layer_rows[1] > res.layer_rows[-1], family


@pytest.mark.parametrize("family", ["llama", "mistral-window", "gemma3", "gemma2"])
def test_question_attention_is_the_models_own(family):
    """query_attention (what question-aware selection ranks by) equals the model's eager attention
    weights: its scaling (Gemma: query_pre_attn_scalar), q_norm, window mask and soft-capping."""
    model = _tiny(family, attn="eager")
    ids = _ids()
    with torch.inference_mode():
        out = model(ids[None], use_cache=True, output_attentions=True, output_hidden_states=True,
                    **{cache_kwarg(model): DynamicCache()})
        kv = stack_cache(output_cache(out))
        runner = layer_runner(model)
        tables = runner.position_tables(out.hidden_states[0], torch.arange(T))
        q_pos = torch.tensor([20, 50, T - 1])
        for i, plan in enumerate(runner.plans):
            got = runner.query_attention(i, out.hidden_states[i][:, q_pos], q_pos, tables[plan.rope_key], kv[i, 0])
            want = out.attentions[i][0][:, q_pos].mean(dim=0).float()  # [q, T]
            assert got is not None and _max_err(got, want) <= 1e-5, (family, i)
            if plan.window is not None:
                assert float(got[:, : int(q_pos[0]) - plan.window + 1].sum()) == 0.0


def test_logits_are_the_models_with_final_soft_capping():
    model = _tiny("gemma2")
    runner = layer_runner(model)
    assert runner.logits_exact
    ids = _ids(20)
    exact, logits = _full(model, ids)
    res = recompute(model, exact.clone(), ids, [(0, 19)], 1.0, get_selection("kdn"), query_rows=1,
                    last_hidden=True)
    got = runner.logits(res.last_hidden)
    assert _max_err(got, logits[-1]) <= 1e-4
    assert got.abs().max() <= 3.0  # soft-capped at final_logit_softcapping


def test_an_unknown_attention_type_is_refused():
    model = _tiny("qwen2-window")
    model.config.layer_types = ["full_attention", "chunked_attention", "sliding_attention", "sliding_attention"]
    runner = LayerRunner(model)  # fresh: the cached one read the config before it was changed
    assert runner.blend_error and "chunked_attention" in runner.blend_error
    with pytest.raises(BlendUnsupportedError, match="chunked_attention.*mode='reuse'"):
        runner.require_blendable()
    assert issubclass(BlendUnsupportedError, ConfigError)


def test_a_forward_the_runner_does_not_model_is_refused(fixed_selection):
    """Granite scales the embeddings in its model's forward (not in embed_tokens): the self-check
    catches the difference and the blend is refused instead of computing something else."""
    torch.manual_seed(0)
    cfg = transformers.GraniteConfig(**TINY, embedding_multiplier=12.0, residual_multiplier=0.5,
                                     attention_multiplier=0.3, logits_scaling=4.0)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = _ids(20)
    exact, _ = _full(model, ids)
    with pytest.raises(BlendUnsupportedError, match="do not reproduce its own forward.*mode='reuse'"):
        recompute(model, exact.clone(), ids, [(0, 20)], 1.0, fixed_selection(range(20)))
    assert not layer_runner(model).logits_exact


def test_bidirectional_attention_is_refused():
    model = _tiny("gemma3", use_bidirectional_attention=True)
    with pytest.raises(BlendUnsupportedError, match="bidirectional"):
        layer_runner(model).require_blendable()
