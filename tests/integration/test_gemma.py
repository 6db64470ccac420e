"""The bundled Gemma-3-270M (15 of its 18 layers attend within a 512-token sliding window, two RoPE
bases, query_pre_attn_scalar scaling, embeddings scaled inside embed_tokens) through the whole
pipeline, with prompts longer than its window: the default generate (blend) runs, ratio-1 blend is
full prefill, and K re-rotation is exact for both RoPE bases."""

from __future__ import annotations

import contextlib
import inspect
import json
from importlib.resources import files

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kdn_hf import KDN
from kdn_hf.blend.runner import layer_runner
from kdn_hf.compat import cache_kwarg
from kdn_hf.compute import stack_cache
from kdn_hf.rope import rerotate, rope_spec_from_model

pytestmark = [pytest.mark.gemma, pytest.mark.slow]

QUESTION = "Question: What is the daily meal allowance abroad?\nAnswer:"


@pytest.fixture(scope="module")
def handbook(gemma):
    """A system line and the four handbook documents (~200 tokens each): ~800 tokens in all."""
    _, tok = gemma
    docs = json.loads(files("kdn_hf").joinpath("data/demo_docs.json").read_text())["documents"]
    return ["The following are pages of a staff handbook.\n\n"] + [d + "\n\n" for d in docs.values()]


@pytest.fixture
def gkdn(gemma, tmp_path):
    model, tok = gemma
    return KDN(model, tok, store=tmp_path / "store")


def _first_logits(model, cache, suffix_ids):
    ctx = cache.get_seq_length()
    x = torch.tensor([suffix_ids])
    pos = torch.arange(ctx, ctx + len(suffix_ids))[None]
    with torch.inference_mode():
        out = model(input_ids=x, position_ids=pos, **{cache_kwarg(model): cache})
    return out.logits[0, -1].float()


def _kl(ref_logits, logits) -> float:
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                          reduction="sum"))


def test_the_runner_reads_gemma(gemma):
    model, _ = gemma
    runner = layer_runner(model)
    runner.require_blendable()  # the self-check against the model's own forward passes
    assert runner.logits_exact
    windows = [p.window for p in runner.plans]
    assert windows.count(512) == 15 and windows.count(None) == 3
    assert {p.rope_key for p in runner.plans} == {"sliding_attention", "full_attention"}
    assert all(p.scored and not p.grouped for p in runner.plans)


def test_default_generate_runs_past_the_window(gkdn, gemma, handbook):
    model, tok = gemma
    cold = gkdn.generate(handbook + [QUESTION], max_new_tokens=8)  # blend, the default; nothing stored yet
    assert len(cold.prompt_ids) > 700 and cold.stats.cold_full  # answered by full prefill
    full = gkdn.generate(handbook + [QUESTION], max_new_tokens=8, mode="full")
    assert cold.token_ids == full.token_ids and cold.stats.misses > 0
    res = gkdn.generate(handbook + [QUESTION], max_new_tokens=8)  # every chunk a hit now: blended
    assert res.stats.first_token == "blend" and res.stats.tokens_recomputed > 0
    assert res.stats.misses == 0 and res.stats.hit_count == cold.stats.misses and res.token_ids
    again = gkdn.generate(handbook + [QUESTION], max_new_tokens=8)
    assert again.token_ids == res.token_ids


def test_ratio_one_blend_is_full_prefill(gkdn, gemma, handbook):
    model, tok = gemma
    q = tok(QUESTION, add_special_tokens=False)["input_ids"]
    full = gkdn.prepare(handbook, mode="full")
    T = full.get_seq_length()
    exact = stack_cache(full)
    assert T > 700
    ref = _first_logits(model, full, q)  # (extends the cache by the question)
    for selection in ("cacheblend", "kdn"):
        blended = gkdn.prepare(handbook, mode="blend", recompute_ratio=1.0, selection=selection)
        assert blended.stats.tokens_recomputed == T
        err = (stack_cache(blended) - exact).abs().max().item()
        kl = _kl(ref, _first_logits(model, blended, q))
        assert kl <= 1e-3 and err <= 1e-3 * max(1.0, exact.abs().max().item()), (selection, kl, err)
    reuse = gkdn.prepare(handbook, mode="reuse")
    assert _kl(ref, _first_logits(model, reuse, q)) > 1e-3  # what the recompute repairs
    # generate at ratio 1 (first token from the blend's last row) answers like full prefill
    got = gkdn.generate(handbook + [QUESTION], max_new_tokens=6, recompute_ratio=1.0)
    want = gkdn.generate(handbook + [QUESTION], max_new_tokens=6, mode="full")
    assert got.stats.first_token == "blend" and got.token_ids == want.token_ids


@contextlib.contextmanager
def _exact_angles(rotary):
    """Give Gemma 3's rotary module (one table per layer type) float64 angles while inside."""

    def forward(x, position_ids, layer_type):
        inv = getattr(rotary, f"{layer_type}_inv_freq").double()
        scale = getattr(rotary, f"{layer_type}_attention_scaling")
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    rotary.forward = forward
    try:
        yield
    finally:
        del rotary.forward


def _kv(model, ids, positions):
    cache = DynamicCache()
    kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(input_ids=ids[None], position_ids=positions[None], use_cache=True, **{kwarg: cache})
    return stack_cache(cache)  # [layers, 2, kv_heads, tokens, head_dim]


def test_rerotation_is_exact_on_both_rope_bases(gemma, handbook):
    model, tok = gemma
    spec = rope_spec_from_model(model)
    ids = torch.tensor(tok(handbook[1], add_special_tokens=False)["input_ids"][:64])
    base = torch.arange(ids.numel())
    with _exact_angles(model.model.rotary_emb):
        kv0 = _kv(model, ids, base)
        for d in (1, 37, 600):
            kvd = _kv(model, ids, base + d)
            moved = rerotate(kv0[:, 0], base, base + d, spec)
            for layer in range(kv0.shape[0]):
                tol = 1e-3 * max(1.0, kvd[layer].abs().max().item())
                assert (moved[layer] - kvd[layer, 0]).abs().max().item() <= tol, (d, layer)
                assert (kv0[layer, 1] - kvd[layer, 1]).abs().max().item() <= tol, (d, layer)
