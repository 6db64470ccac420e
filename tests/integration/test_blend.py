"""Blending (selective recompute) on the real SmolLM2 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdn_hf import KDN
from kdn_hf.bench import rag_cases
from kdn_hf.blend import SELECTIONS, Selection, SelectionInput, recompute
from kdn_hf.compat import cache_kwarg
from kdn_hf.compute import stack_cache
from kdn_hf.errors import ConfigError

QUESTION = "Question: Who won two Nobel Prizes? Answer:"


class FixedSelection(Selection):
    """Recompute exactly the given slots (to test the recompute, not a strategy)."""

    name = "fixed"

    def __init__(self, slots) -> None:
        self.slots = torch.tensor(sorted(slots), dtype=torch.long)

    def select(self, inp: SelectionInput) -> torch.Tensor:
        return self.slots


def _chunks(docs):
    return ["You are a helpful assistant.\n\n"] + [d + "\n\n" for d in docs]


def _first_logits(model, cache, suffix_ids):
    ctx = cache.get_seq_length()
    x = torch.tensor([suffix_ids])
    pos = torch.arange(ctx, ctx + len(suffix_ids))[None]
    with torch.inference_mode():
        out = model(input_ids=x, position_ids=pos, **{cache_kwarg(model): cache})
    return out.logits[0, -1].float()


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_ratio_one_reproduces_full_prefill_kv_and_logits(kdn, smol, docs, selection):
    model, tok = smol
    ctx = _chunks(docs)
    full = kdn.prepare(ctx, mode="full")
    blended = kdn.prepare(ctx, mode="blend", recompute_ratio=1.0, selection=selection)
    assert blended.stats.tokens_recomputed == full.get_seq_length()
    assert (stack_cache(blended) - stack_cache(full)).abs().max().item() <= 1e-4
    q = tok(QUESTION, add_special_tokens=False)["input_ids"]
    assert (_first_logits(model, blended, q) - _first_logits(model, full, q)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_recomputing_any_subset_of_an_exact_cache_leaves_it_unchanged(kdn, smol, docs, attn):
    """With full prefill's KV in place, any recomputed token reproduces it; a token that
    could see a later position (wrong mask) would not."""
    model, _ = smol
    exact_cache = kdn.prepare(_chunks(docs), mode="full")
    exact = stack_cache(exact_cache)
    ids, spans, T = exact_cache.token_ids, exact_cache.chunk_spans, exact.shape[3]
    g = torch.Generator().manual_seed(0)
    subsets = [[0], [T - 1], list(range(0, T, 7)), torch.randperm(T, generator=g)[: T // 3].tolist()]
    old = model.config._attn_implementation
    model.config._attn_implementation = attn
    try:
        for slots in subsets:
            kv = exact.clone()
            recompute(model, kv, ids, spans, 0.5, FixedSelection(slots))
            assert (kv - exact).abs().max().item() <= 1e-4, (attn, slots[:5])
    finally:
        model.config._attn_implementation = old


def test_mask_keeps_later_positions_out_of_recomputed_tokens(kdn, smol, docs):
    """Garbage KV after slot i (past the check layer) must not reach tokens recomputed at <= i."""
    model, _ = smol
    exact_cache = kdn.prepare(_chunks(docs), mode="full")
    exact = stack_cache(exact_cache)
    T = exact.shape[3]
    i = T // 2
    kv = exact.clone()
    kv[2:, :, :, i + 1:] = torch.randn_like(kv[2:, :, :, i + 1:]) * 10  # layers > check layer 1
    early = list(range(0, i + 1, 3)) + [i]
    recompute(model, kv, exact_cache.token_ids, exact_cache.chunk_spans, 0.5, FixedSelection(set(early)))
    assert (kv[:, :, :, : i + 1] - exact[:, :, :, : i + 1]).abs().max().item() <= 1e-4


def test_blend_is_deterministic_and_counts_recomputed_tokens(kdn, docs):
    ctx = _chunks(docs)
    for selection in SELECTIONS:
        a = kdn.prepare(ctx, mode="blend", recompute_ratio=0.15, selection=selection)
        b = kdn.prepare(ctx, mode="blend", recompute_ratio=0.15, selection=selection)
        assert torch.equal(stack_cache(a), stack_cache(b))
        assert a.stats.tokens_recomputed == round(0.15 * a.get_seq_length())


def test_blend_ratio_zero_is_reuse_and_defaults_are_blend(kdn, docs):
    ctx = _chunks(docs)
    reuse = stack_cache(kdn.prepare(ctx, mode="reuse"))
    assert torch.equal(stack_cache(kdn.prepare(ctx, mode="blend", recompute_ratio=0.0)), reuse)
    res = kdn.generate(ctx + [QUESTION], max_new_tokens=2)
    assert res.stats.mode == "blend" and res.stats.recompute_ratio == 0.15 and res.stats.tokens_recomputed > 0
    assert kdn.generate(ctx + [QUESTION], max_new_tokens=2, mode="reuse").stats.tokens_recomputed == 0
    with pytest.raises(ConfigError, match="cacheblend"):
        kdn.generate(ctx + [QUESTION], selection="best")
    with pytest.raises(ConfigError, match="recompute_ratio"):
        kdn.prepare(ctx, recompute_ratio=1.5)


def test_blend_after_miss_reorder_repeat_and_full_hit(kdn, smol, docs):
    model, _ = smol
    kdn.ingest([docs[0] + "\n\n", docs[2] + "\n\n"])
    layouts = [
        [docs[2] + "\n\n", docs[0] + "\n\n"],  # reordered, 100% hit
        [docs[0] + "\n\n", docs[1] + "\n\n", docs[2] + "\n\n"],  # a miss in the middle
        [docs[0] + "\n\n", docs[0] + "\n\n"],  # the same chunk twice
    ]
    for ctx in layouts:
        res = kdn.generate(ctx + [QUESTION], max_new_tokens=4)
        cache = kdn.prepare(ctx)
        assert res.stats.tokens_recomputed == cache.stats.tokens_recomputed == round(0.15 * cache.get_seq_length())
        # through stock generate, the same tokens
        x = torch.tensor([res.prompt_ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                             pad_token_id=2, **{cache_kwarg(model): cache})
        assert out[0, x.shape[1]:].tolist() == res.token_ids


def test_blend_has_lower_first_token_kl_than_reuse_on_the_dev_set(smol):
    model, tok = smol
    kdn = KDN(model, tok, store="memory://")
    kl = {"reuse": [], "blend": []}
    for case in rag_cases(tok, k=3, doc_tokens=96, limit=4):
        ctx = [list(c) for c in case.context]
        ref = F.log_softmax(_first_logits(model, kdn.prepare(ctx, mode="full"), list(case.suffix)), -1)
        for mode, values in kl.items():
            got = F.log_softmax(_first_logits(model, kdn.prepare(ctx, mode=mode), list(case.suffix)), -1)
            values.append(F.kl_div(got, ref, log_target=True, reduction="sum").item())
    mean = {m: sum(v) / len(v) for m, v in kl.items()}
    assert mean["blend"] < mean["reuse"], mean
