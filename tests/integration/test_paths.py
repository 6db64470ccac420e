"""The paths that must not cost more than no cache, on the real SmolLM2: ``prefix`` (a suffix prefilled
over cached KV, in place, bottom-right causal), cold ``reuse`` (missing chunks computed in batched
forwards), and the TTFT clock (a model that sleeps a known time per pass brackets it)."""

from __future__ import annotations

import time

import pytest
import torch

from kdn_hf import KDN
from kdn_hf.compat import cache_kwarg
from kdn_hf.compute import batches, compute_chunk_kv, compute_chunks_kv, prefill, stack_cache
from kdn_hf.rope import rerotate

SYSTEM = "You are a helpful assistant. Answer the question using the documents.\n\n"
QUESTION = "Question: Who won two Nobel Prizes? Answer:"


def _kv(cache) -> torch.Tensor:
    return torch.stack([torch.stack([l.keys[0], l.values[0]]) for l in cache.layers])


def test_prefix_suffix_over_cached_kv_equals_full_prefill(kdn, smol, docs):
    """Prefix mode warm for the system prompt only (as ``kdn bench``) at a prompt of ~320 tokens: the
    suffix is prefilled into the cache's buffer with the question but its last token, its KV is full
    prefill's, the answer is full prefill's, generate writes into the reserved room (no copy)."""
    model, tok = smol
    chunks = [SYSTEM] + [d + "\n\n" for d in docs + docs[::-1]] + [QUESTION]
    kdn.generate(chunks[:1] + ["x"], max_new_tokens=1, mode="prefix")  # the system prompt's entries
    full = kdn.generate(chunks, max_new_tokens=8, mode="full")
    res = kdn.generate(chunks, max_new_tokens=8, mode="prefix")
    assert len(res.prompt_ids) > 300  # the older prefix tests run ~120
    assert res.token_ids == full.token_ids
    # plain greedy: the prefill computed the whole question and its last row picked the first token
    assert res.stats.first_token == "prefix" and full.stats.first_token == "generate"
    stock = kdn.generate(chunks, max_new_tokens=8, mode="prefix", repetition_penalty=1.0)
    assert stock.stats.first_token == "generate" and stock.token_ids == full.token_ids
    q_len = len(tok(QUESTION, add_special_tokens=False)["input_ids"])
    assert res.stats.hit_count == 1 + (1 if kdn.opener else 0) and res.stats.misses == 8
    assert res.stats.tokens_computed == len(res.prompt_ids) - res.stats.tokens_reused
    assert res.stats.tokens_reused == len(kdn.opener) + len(tok(SYSTEM, add_special_tokens=False)["input_ids"])
    assert res.stats.tokens_computed > 0.8 * len(res.prompt_ids)  # most of the prompt was prefilled

    # the KV and the next-token logits of the prepared cache are full prefill's
    cache = kdn.prepare(chunks[:-1], mode="prefix", reserve=4)  # now warm: all hits, loaded into one buffer
    assert cache.stats.misses == 0
    kdn2 = KDN(model, tok, store="memory://")
    kdn2.generate(chunks[:1] + ["x"], max_new_tokens=1, mode="prefix")
    cold = kdn2.prepare(chunks[:-1], mode="prefix", reserve=4)
    assert cold.stats.misses == 8
    ids = cold.token_ids
    ref, ref_logits = prefill(model, torch.cat([ids, torch.tensor([198])]), torch.arange(len(ids) + 1))
    for c in (cache, cold):
        assert (_kv(c) - stack_cache(ref)[:, :, :, :len(ids)]).abs().max().item() < 1e-4
        x = torch.tensor([ids.tolist() + [198]])
        with torch.inference_mode():
            logits = model(input_ids=x[:, -1:], position_ids=torch.tensor([[len(ids)]]),
                           **{cache_kwarg(model): c}).logits[0, -1]
        assert (logits - ref_logits).abs().max().item() < 1e-3
        # the token went into the reserved room of the same buffer: no layer was reallocated
        layer = c.layers[3]
        assert layer._spare is not None and layer.keys.data_ptr() == layer._spare[0].data_ptr()
        assert c.get_seq_length() == len(ids) + 1


def test_prefill_into_last_hidden_gives_full_prefills_next_token_logits(smol, docs):
    """The last row's hidden state after the suffix prefill (the whole layer run for it alone at the last
    layer) gives the model's own next-token logits, over a cached prefix and from an empty buffer."""
    from kdn_hf.blend.runner import layer_runner
    from kdn_hf.suffix import prefill_into

    model, tok = smol
    ids = torch.tensor(tok(docs[0] + " " + docs[1], add_special_tokens=False)["input_ids"])
    n = len(ids)
    ref, ref_logits = prefill(model, ids, torch.arange(n))
    want = stack_cache(ref)
    for start in (0, 37):
        buf = torch.zeros(want.shape[0], 2, want.shape[2], n + 3, want.shape[4])
        buf[:, :, :, :start] = want[:, :, :, :start]
        last = prefill_into(model, buf, start, ids[start:], last_hidden=True)
        assert last.shape == (model.config.hidden_size,)
        assert (layer_runner(model).logits(last) - ref_logits).abs().max().item() < 1e-3
        assert (buf[:, :, :, :n] - want).abs().max().item() < 1e-4
        assert buf[:, :, :, n:].abs().max().item() == 0  # the reserved slots are untouched
    assert prefill_into(model, torch.zeros_like(buf), 0, ids) is None
    with pytest.raises(ValueError, match="at least one"):
        prefill_into(model, buf, n, ids[:0], last_hidden=True)


def test_batches_group_lengths_that_pad_little():
    assert batches([512, 510, 100, 505, 98]) == [[0, 1, 3], [2, 4]]
    assert batches([300, 200, 100]) == [[0], [1], [2]]  # unequal: each alone
    assert batches([600] * 20, max_tokens=2400) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15],
                                                    [16, 17, 18, 19]]
    assert batches([9000, 10]) == [[0], [1]] and batches([]) == []


def test_batched_chunk_kv_equals_one_by_one(smol, docs):
    model, tok = smol
    ctx = torch.tensor([1, 2, 3])
    ids = [torch.tensor(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    # equal lengths batch together (a short tail of padding is allowed); each row keeps its own context
    chunks = [(ids[0], ctx), (ids[0][:-2], ctx), (ids[0].flip(0), None), (ids[1], ctx)]
    got = compute_chunks_kv(model, chunks)
    for (i, c), kv in zip(chunks, got):
        want = compute_chunk_kv(model, i, context=c)
        assert torch.equal(kv.positions, want.positions) and torch.equal(kv.token_ids, i)
        assert kv.kv.is_contiguous() and (kv.kv - want.kv).abs().max().item() < 1e-4


def test_cold_reuse_computes_missing_chunks_in_batched_forwards(kdn, smol, docs):
    """Every chunk missing: equal-length chunks go through one forward, and each chunk's KV is what it
    is computed alone (after the opener), moved to its place."""
    model, tok = smol
    ids0 = tok(docs[0], add_special_tokens=False)["input_ids"]
    chunks = [ids0, ids0[::-1], ids0[1:] + ids0[:1], ids0[:9]]  # three of one length, one far shorter
    forwards = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: forwards.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        cache = kdn.prepare(chunks, mode="reuse")
    finally:
        hook.remove()
    assert cache.stats.hit_count == 0 and cache.stats.misses == len(cache.chunk_spans)
    assert [shape[0] for shape in forwards].count(3) == 1  # the three of equal length in one forward
    assert len(forwards) == len(cache.chunk_spans) - 2
    ctx = torch.tensor(kdn.opener) if kdn.opener else None
    spans = cache.chunk_spans[len(cache.chunk_spans) - len(chunks):]
    for (s, e), ids in zip(spans, chunks):
        ref = compute_chunk_kv(model, torch.tensor(ids), context=ctx)
        k = rerotate(ref.keys, ref.positions, torch.arange(s, e), kdn.rope_spec)
        want = torch.stack([k, ref.values], dim=1)
        assert (_kv(cache)[:, :, :, s:e] - want).abs().max().item() < 1e-4


def test_ingest_computes_missing_texts_in_batched_forwards(smol, docs):
    """``ingest`` batches missing texts of similar length, computes a text given twice once, skips what
    is stored, and stores each chunk's own KV (as computed alone, after the opener)."""
    model, tok = smol
    kdn = KDN(model, tok, store="memory://")
    ids0 = tok(docs[0], add_special_tokens=False)["input_ids"]
    texts = [ids0, ids0[::-1], ids0, ids0[1:] + ids0[:1], ids0[:9]]  # one given twice, one far shorter
    kdn.ingest(texts[3:4], progress=False)  # stored before: not computed again
    forwards = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: forwards.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        keys = kdn.ingest(texts, progress=False)
    finally:
        hook.remove()
    assert keys[0] == keys[2] and len(set(keys)) == 4
    assert sorted(shape[0] for shape in forwards) == [1, 2]  # the two new texts of equal length together
    ctx = torch.tensor(kdn.opener) if kdn.opener else None
    for key, ids in zip(keys, texts):
        entry, _ = kdn.store.get(key, kdn.policy.fingerprint)
        ref = compute_chunk_kv(model, torch.tensor(ids), context=ctx)
        assert entry.token_ids.tolist() == ids
        assert (entry.kv - ref.kv).abs().max().item() < 1e-4


class _SlowLayer0:
    """Sleeps ``sleep`` s in every pass through decoder layer 0 (its Q projection: the HF forward, the
    layer runner and the blend all call it) and records each pass's (start, end) times."""

    def __init__(self, model, sleep: float) -> None:
        self.sleep, self.passes, self.forwards = sleep, [], []
        proj = model.model.layers[0].self_attn.q_proj
        self._hooks = [proj.register_forward_pre_hook(self._pre), proj.register_forward_hook(self._post),
                       model.register_forward_pre_hook(lambda *a: self.forwards.append(time.perf_counter()))]

    def _pre(self, *args) -> None:
        self.passes.append([time.perf_counter(), None])
        time.sleep(self.sleep)

    def _post(self, *args) -> None:
        self.passes[-1][1] = time.perf_counter()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@pytest.mark.parametrize("mode", ["full", "blend"])
def test_ttft_clock_brackets_the_first_token(kdn, smol, docs, mode):
    """With 0.4 s slept in every pass through layer 0, the first token falls after the last pass that
    makes it and before the first pass that follows: ttft_s and total_s are bracketed by the passes'
    own times, so a clock that stops too early or too late fails."""
    model, _ = smol
    chunks = [docs[0] + "\n\n", docs[1] + "\n\n", QUESTION]
    kdn.ingest(chunks[:-1], progress=False)
    kdn.generate(chunks, max_new_tokens=2, mode=mode)  # lazy initialisation off the clock
    sleep, n_new = 0.4, 3
    slow = _SlowLayer0(model, sleep)
    try:
        called = time.perf_counter()
        res = kdn.generate(chunks, max_new_tokens=n_new, mode=mode)
        returned = time.perf_counter()
    finally:
        slow.remove()
    s = res.stats
    assert res.stats.tokens_generated == n_new
    passes = slow.passes
    # generate's own forwards: every pass from the first one generate makes; passes before are preparing
    first_gen = next(i for i, (start, _) in enumerate(passes) if start >= slow.forwards[0])
    if mode == "full":
        assert first_gen == 0 and len(passes) == n_new  # prefill, then one pass per further token
        before = 1  # the first token comes out of generate's prefill
    else:
        assert s.first_token == "blend" and first_gen >= 1 and len(passes) == first_gen + n_new - 1
        before = first_gen  # the blend's passes make it; generate's passes all come after
    made, after = passes[before - 1], passes[before]
    t0_latest = passes[0][0]  # the clock starts before any pass: called <= t0 <= t0_latest
    # first_at = t0 + ttft lies after the pass that makes the first token ends, before the next starts
    assert s.ttft_s >= made[1] - t0_latest >= before * sleep
    assert s.ttft_s <= after[0] - called
    # total: every pass is inside it; the passes after the first token are inside total - ttft
    assert s.total_s >= passes[-1][1] - t0_latest >= len(passes) * sleep
    assert s.total_s <= returned - called
    assert s.total_s - s.ttft_s >= passes[-1][1] - after[0] >= (len(passes) - before) * sleep


@pytest.mark.gemma
def test_prefix_suffix_on_gemma_layers_the_runner_masks(gemma, docs):
    """Gemma-3's layers (sliding and full attention, not the grouped path) run the suffix with the
    runner's causal masks: the prepared KV and the answer are full prefill's."""
    model, tok = gemma
    kdn = KDN(model, tok, store="memory://")
    chunks = [SYSTEM] + [d + "\n\n" for d in docs] + [QUESTION]
    kdn.generate(chunks[:1] + ["x"], max_new_tokens=1, mode="prefix")
    full = kdn.generate(chunks, max_new_tokens=6, mode="full")
    res = kdn.generate(chunks, max_new_tokens=6, mode="prefix")
    assert res.token_ids == full.token_ids and res.stats.misses == 4
    cache = kdn.prepare(chunks[:-1], mode="prefix")
    ids = cache.token_ids
    ref, _ = prefill(model, ids, torch.arange(len(ids)))
    assert (_kv(cache) - stack_cache(ref)).abs().max().item() < 1e-3


def test_cold_blend_answers_by_full_prefill_and_stores_its_chunks_after(smol, docs, tmp_path):
    """No chunk stored: the blend request is full prefill's (same tokens, exact), its chunks are in the
    store once it returns, and the next request with them blends; with one chunk stored it blends;
    ``cold_blend="blend"`` computes and blends."""
    model, tok = smol
    kdn = KDN(model, tok, store=tmp_path / "s")
    chunks = [SYSTEM, docs[0] + "\n\n", docs[1] + "\n\n", QUESTION]
    full = kdn.generate(chunks, max_new_tokens=6, mode="full")
    assert not full.stats.cold_full
    n_units = len({u.key for u in kdn.plan(chunks[:-1])})  # the opener's (if the model has one) and 3 chunks
    cold = kdn.generate(chunks, max_new_tokens=6, mode="blend")
    assert cold.stats.cold_full and cold.stats.tokens_recomputed == 0 and cold.stats.misses == n_units
    assert cold.token_ids == full.token_ids and cold.prompt_ids == full.prompt_ids
    assert all(kdn.store.contains(u.key) for u in kdn.plan(chunks[:-1]))
    warm = kdn.generate(chunks, max_new_tokens=6, mode="blend")
    assert not warm.stats.cold_full and warm.stats.hit_count == n_units and warm.stats.tokens_recomputed > 0
    # one chunk stored (the system prompt): not cold, the others are computed and blended
    other = [SYSTEM, docs[2] + "\n\n", docs[3] + "\n\n", QUESTION]
    part = kdn.generate(other, max_new_tokens=2, mode="blend")
    assert not part.stats.cold_full and part.stats.misses == 2 and part.stats.tokens_recomputed > 0
    # cold_blend="blend": the old way, on a store of its own
    blend_cold = KDN(model, tok, store="memory://", cold_blend="blend").generate(chunks, max_new_tokens=2)
    assert not blend_cold.stats.cold_full and blend_cold.stats.misses == n_units and blend_cold.stats.tokens_recomputed > 0


def test_cold_blend_option_is_checked(smol):
    from kdn_hf.errors import ConfigError

    with pytest.raises(ConfigError, match="cold_blend must be 'full'"):
        KDN(*smol, store="memory://", cold_blend="fast")
