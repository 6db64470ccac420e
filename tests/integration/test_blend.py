"""Blending (selective recompute) on the real SmolLM2 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdn_hf import KDN
from kdn_hf.bench import rag_cases
from kdn_hf.blend import SELECTIONS, get_selection, recompute
from kdn_hf.compat import cache_kwarg
from kdn_hf.compute import stack_cache
from kdn_hf.errors import ConfigError

QUESTION = "Question: Who won two Nobel Prizes? Answer:"


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
def test_recomputing_any_subset_of_an_exact_cache_leaves_it_unchanged(kdn, smol, docs, attn, fixed_selection):
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
            recompute(model, kv, ids, spans, 0.5, fixed_selection(slots))
            assert (kv - exact).abs().max().item() <= 1e-4, (attn, slots[:5])
    finally:
        model.config._attn_implementation = old


def test_progressive_narrowing_keeps_an_exact_cache_and_stops_rows_in_the_upper_layers(kdn, smol, docs):
    """The default kdn selection narrows after layers 4, 8, 12, 16, 20 (of 30): fewer context rows run
    above each, and the rows it still recomputes (and the question) reproduce an exact cache; at ratio 1
    nothing is narrowed."""
    model, tok = smol
    exact_cache = kdn.prepare(_chunks(docs) + [QUESTION], mode="full")
    exact = stack_cache(exact_cache)
    ids, spans = exact_cache.token_ids, exact_cache.chunk_spans
    q_rows = spans[-1][1] - spans[-1][0]
    C = exact.shape[3] - q_rows
    kv = exact.clone()
    res = recompute(model, kv, ids, spans[:-1], 0.15, get_selection("kdn"), query_rows=q_rows)
    assert (kv - exact).abs().max().item() <= 1e-4
    budget = round(0.15 * C)
    expect, n = [], budget
    for i in range(len(model.model.layers)):
        expect.append(n)
        if i in (4, 8, 12, 16, 20):
            n = round(n * 0.85)
    assert list(res.layer_rows) == expect and expect[-1] < budget // 2
    full_ratio = recompute(model, exact.clone(), ids, spans[:-1], 1.0, get_selection("kdn"), query_rows=q_rows)
    assert set(full_ratio.layer_rows) == {C}
    # the stats carry the real share of layer work: below the ratio with narrowing, above it with a probe
    q = tok(QUESTION, add_special_tokens=False)["input_ids"]
    kdn.ingest(_chunks(docs), progress=False)
    for name, share in (("kdn", sum(expect) / (len(expect) * C)),
                        ("cacheblend-oneshot", (C + 29 * budget) / (30 * C))):
        cache = kdn.prepare(_chunks(docs), mode="blend", recompute_ratio=0.15, selection=name, query=q)
        assert cache.stats.recompute_share == pytest.approx(share), name
    assert sum(expect) / (len(expect) * C) < 0.15 < (C + 29 * budget) / (30 * C)


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_layer_rows_are_the_selections_schedule_and_the_paper_cacheblend_filters_gradually(kdn, smol, docs,
                                                                                          selection):
    """What the recompute runs per layer is ``rows_per_layer`` (the pure schedule the bench's equal-work
    mode inverts); the paper's cacheblend starts above the budget at the check layer and shrinks it at
    every filter layer down to the budget, and recomputing an exact cache that way leaves it exact."""
    model, _ = smol
    exact_cache = kdn.prepare(_chunks(docs) + [QUESTION], mode="full")
    exact = stack_cache(exact_cache)
    ids, spans = exact_cache.token_ids, exact_cache.chunk_spans
    q_rows = spans[-1][1] - spans[-1][0]
    C, L = exact.shape[3] - q_rows, exact.shape[0]
    sel = get_selection(selection)
    kv = exact.clone()
    res = recompute(model, kv, ids, spans[:-1], 0.15, sel, query_rows=q_rows)
    assert (kv - exact).abs().max().item() <= 1e-4
    budget = round(0.15 * C)
    if sel.adaptive:  # its own budget, at most the request's
        assert 0 < res.selected.numel() <= budget
        budget = res.selected.numel()
    assert res.layer_rows == sel.rows_per_layer(L, C, budget, query_known=True)
    if selection == "cacheblend":
        steps = [res.layer_rows[i] for i in (1, *(j + 1 for j in sel.narrow_layers(L)))]
        assert steps[0] == min(C, 2 * budget) and steps[-1] == budget
        assert all(a > b for a, b in zip(steps, steps[1:])), steps
        assert res.layer_rows[0] == C and set(res.layer_rows[len(steps):]) == {budget}


@pytest.mark.parametrize("group_rows", [4, 1000])
def test_causal_groups_attend_like_one_masked_call(kdn, smol, docs, group_rows, monkeypatch, fixed_selection):
    """The recompute attends group by group over the keys each group can see (``_Rows.groups``);
    with many groups or one, recomputing an exact cache leaves it unchanged, and later garbage never
    reaches earlier rows."""
    import importlib

    rc = importlib.import_module("kdn_hf.blend.recompute")
    model, _ = smol
    assert all(rc.groupable(layer) for layer in model.model.layers)  # SmolLM2 takes the grouped path
    monkeypatch.setattr(rc, "GROUP_ROWS", group_rows)
    exact_cache = kdn.prepare(_chunks(docs), mode="full")
    exact = stack_cache(exact_cache)
    T = exact.shape[3]
    slots = list(range(1, T, 3))
    rows = rc._Rows(torch.tensor(slots), T, (torch.zeros(1, T, 64), torch.zeros(1, T, 64)), torch.float32, True)
    assert len(rows.groups) == (rc.MAX_GROUPS if group_rows == 4 else 1)
    assert rows.groups[-1][2] == slots[-1] + 1 and rows.groups[0][2] < T  # each group sees up to its last row
    kv = exact.clone()
    recompute(model, kv, exact_cache.token_ids, exact_cache.chunk_spans, 0.5, fixed_selection(slots))
    assert (kv - exact).abs().max().item() <= 1e-4
    i = T // 2
    kv = exact.clone()
    kv[2:, :, :, i + 1:] = torch.randn_like(kv[2:, :, :, i + 1:]) * 10
    early = [s for s in slots if s <= i]
    recompute(model, kv, exact_cache.token_ids, exact_cache.chunk_spans, 0.5, fixed_selection(early))
    assert (kv[:, :, :, : i + 1] - exact[:, :, :, : i + 1]).abs().max().item() <= 1e-4


def test_mask_keeps_later_positions_out_of_recomputed_tokens(kdn, smol, docs, fixed_selection):
    """Garbage KV after slot i (past the check layer) must not reach tokens recomputed at <= i."""
    model, _ = smol
    exact_cache = kdn.prepare(_chunks(docs), mode="full")
    exact = stack_cache(exact_cache)
    T = exact.shape[3]
    i = T // 2
    kv = exact.clone()
    kv[2:, :, :, i + 1:] = torch.randn_like(kv[2:, :, :, i + 1:]) * 10  # layers > check layer 1
    early = list(range(0, i + 1, 3)) + [i]
    recompute(model, kv, exact_cache.token_ids, exact_cache.chunk_spans, 0.5, fixed_selection(set(early)))
    assert (kv[:, :, :, : i + 1] - exact[:, :, :, : i + 1]).abs().max().item() <= 1e-4


def test_blend_is_deterministic_and_counts_recomputed_tokens(kdn, docs):
    ctx = _chunks(docs)
    for selection in SELECTIONS:
        a = kdn.prepare(ctx, mode="blend", recompute_ratio=0.15, selection=selection)
        b = kdn.prepare(ctx, mode="blend", recompute_ratio=0.15, selection=selection)
        assert torch.equal(stack_cache(a), stack_cache(b))
        # the tokens selected at the first recomputed layer: the budget, twice it for the paper's filter
        T = a.get_seq_length()
        assert a.stats.tokens_recomputed == get_selection(selection).first_rows(round(0.15 * T), T)
        assert a.stats.tokens_recomputed == round((2 if selection == "cacheblend" else 1) * 0.15 * T)


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
        cache = kdn.prepare(ctx, query=QUESTION)  # the same (question-aware) selection as generate's
        assert res.stats.tokens_recomputed == cache.stats.tokens_recomputed == round(0.15 * cache.get_seq_length())
        # through stock generate, the same tokens
        x = torch.tensor([res.prompt_ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                             pad_token_id=2, **{cache_kwarg(model): cache})
        assert out[0, x.shape[1]:].tolist() == res.token_ids


def _kl(model, cache, suffix, ref):
    got = F.log_softmax(_first_logits(model, cache, list(suffix)), -1)
    return F.kl_div(got, ref, log_target=True, reduction="sum").item()


def test_blend_has_lower_first_token_kl_than_reuse_on_the_dev_set(smol):
    model, tok = smol
    kdn = KDN(model, tok, store="memory://")
    kl = {"reuse": [], "blend": []}
    for case in rag_cases(tok, k=3, doc_tokens=96, limit=4):
        ctx = [list(c) for c in case.context]
        ref = F.log_softmax(_first_logits(model, kdn.prepare(ctx, mode="full"), list(case.suffix)), -1)
        for mode, values in kl.items():
            values.append(_kl(model, kdn.prepare(ctx, mode=mode), case.suffix, ref))
    mean = {m: sum(v) / len(v) for m, v in kl.items()}
    assert mean["blend"] < mean["reuse"], mean


def test_question_aware_selection_beats_cacheblend_on_the_dev_set(smol):
    """kdn (question-aware) vs one-shot cacheblend at the same ratio: lower mean first-token KL vs full prefill."""
    model, tok = smol
    kdn = KDN(model, tok, store="memory://")
    kl = {"kdn": [], "cacheblend-oneshot": []}
    for case in rag_cases(tok, k=3, doc_tokens=128, limit=6):
        ctx = [list(c) for c in case.context]
        ref = F.log_softmax(_first_logits(model, kdn.prepare(ctx, mode="full"), list(case.suffix)), -1)
        for sel, values in kl.items():
            cache = kdn.prepare(ctx, mode="blend", recompute_ratio=0.15, selection=sel, query=list(case.suffix))
            values.append(_kl(model, cache, case.suffix, ref))
    mean = {s: sum(v) / len(v) for s, v in kl.items()}
    assert mean["kdn"] < mean["cacheblend-oneshot"], mean


def test_question_aware_blend_at_ratio_one_is_full_prefill_and_keeps_the_question(kdn, smol, docs):
    """With the question known, every context token recomputed from layer 0 reproduces full prefill; generate
    computes the question inside the blend and hands stock generate only its last token."""
    model, tok = smol
    ctx = _chunks(docs)
    q = tok(QUESTION, add_special_tokens=False)["input_ids"]
    full = kdn.prepare(ctx, mode="full")
    blended = kdn.prepare(ctx, mode="blend", recompute_ratio=1.0, selection="kdn", query=q)
    assert blended.get_seq_length() == full.get_seq_length() == len(blended.token_ids)
    assert (stack_cache(blended) - stack_cache(full)).abs().max().item() <= 1e-4
    ref = kdn.generate(ctx + [QUESTION], max_new_tokens=8, mode="full")
    got = kdn.generate(ctx + [QUESTION], max_new_tokens=8, mode="blend", recompute_ratio=1.0, selection="kdn")
    assert got.token_ids == ref.token_ids
    assert got.stats.tokens_computed == len(q)  # the question, once (len(q) - 1 in the blend, 1 in generate)
    assert got.stats.tokens_recomputed == full.get_seq_length()


def test_question_aware_selection_follows_the_question(kdn, smol, docs):
    """Same context, different questions: different tokens recomputed; same question: the same ones."""
    model, tok = smol
    ctx = _chunks(docs)
    kdn.ingest(ctx, progress=False)
    q1 = "Question: Who began working on Python? Answer:"
    q2 = "Question: Which countries does the Amazon flow through? Answer:"
    sel = get_selection("kdn")
    picked = {}
    for name, q in (("a", q1), ("b", q1), ("c", q2)):
        cache = kdn.prepare(ctx, mode="reuse")
        kv = stack_cache(cache)
        qids = tok(q, add_special_tokens=False)["input_ids"]
        kv = torch.cat([kv, kv.new_zeros(*kv.shape[:3], len(qids), kv.shape[4])], 3)
        ids = torch.cat([cache.token_ids, torch.tensor(qids)])
        res = recompute(model, kv, ids, cache.chunk_spans, 0.3, sel, query_rows=len(qids))
        assert res.dev_k is None and res.query_attention.shape == (len(model.model.layers), 1, len(cache.token_ids))
        picked[name] = res.selected.tolist()
    assert picked["a"] == picked["b"]
    assert picked["a"] != picked["c"]
    # the Python question looks at the Python document, the Amazon one at the Amazon document
    py_span, amazon_span = cache.chunk_spans[4], cache.chunk_spans[1]
    inside = lambda sel, span: sum(span[0] <= s < span[1] for s in sel)
    assert inside(picked["a"], py_span) > inside(picked["c"], py_span)
    assert inside(picked["c"], amazon_span) > inside(picked["a"], amazon_span)


def test_lead_in_precompute_makes_the_chunk_after_it_exact(smol, docs, tmp_path):
    """Chunks computed after BOS + the system prompt (KDN(lead_in=...)): a prompt [system, doc] composed
    from stored KV is full prefill's KV; keys differ from BOS-only entries, and the system chunk itself is
    computed after BOS only."""
    model, tok = smol
    system = "You are a helpful assistant.\n\n"
    plain = KDN(model, tok, store=tmp_path / "s")
    led = KDN(model, tok, store=tmp_path / "s", lead_in=system)
    doc = docs[1] + "\n\n"
    assert led.ingest([doc]) != plain.ingest([doc])
    sys_ids = tok(system, add_special_tokens=False)["input_ids"]
    assert led.policy.context_of(sys_ids) == led.opener and led.policy.context_of([1, 2]) == led.opener + tuple(sys_ids)
    full = stack_cache(led.prepare([system, doc], mode="full"))
    for k in (led, plain):
        k.ingest([system, doc], progress=False)
    got = led.prepare([system, doc], mode="reuse")
    assert got.stats.misses == 0 and got.stats.tokens_computed == 0
    assert (stack_cache(got) - full).abs().max().item() <= 1e-4
    naive = stack_cache(plain.prepare([system, doc], mode="reuse"))
    assert (naive - full).abs().max().item() > 1e-2  # without the lead-in the doc never saw the system prompt
