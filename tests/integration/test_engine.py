"""KDN end to end on the real SmolLM2 model: modes, stock generate, store behaviour."""

from __future__ import annotations

import pytest
import torch

from kdn_hf import KDN, KDNCache
from kdn_hf.errors import ConfigError, KDNCacheError
from kdn_hf.compat import cache_kwarg
from kdn_hf.compute import compute_chunk_kv, prefill, stack_cache
from kdn_hf.pipeline import Request, prepare_prompt
from kdn_hf.rope import rerotate
from kdn_hf.store_back import StoreBack

SYSTEM = "You are a helpful assistant. Answer the question using the documents.\n\n"


def _lead(kdn) -> int:
    """1 if the tokenizer starts sequences with BOS (the lead-in is then one more stored unit)."""
    return 1 if kdn.opener else 0


def _plain_greedy(model, ids, n):
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_single_chunk_and_prefix_mode_match_plain_generate(kdn, smol, docs):
    model, _ = smol
    question = "Question: Which river has the largest discharge? Answer:"
    single = kdn.generate([docs[0] + "\n" + question], max_new_tokens=12, mode="reuse")
    assert single.token_ids == _plain_greedy(model, single.prompt_ids, 12)

    chunks = [SYSTEM, docs[0] + "\n\n", docs[1] + "\n\n", question]
    ref = _plain_greedy(model, kdn.generate(chunks, max_new_tokens=1, mode="full").prompt_ids, 12)
    cold = kdn.generate(chunks, max_new_tokens=12, mode="prefix")
    warm = kdn.generate(chunks, max_new_tokens=12, mode="prefix")
    assert cold.token_ids == ref and warm.token_ids == ref
    units = 3 + _lead(kdn)  # the lead-in (BOS, where the tokenizer adds one) is a prefix unit too
    assert cold.stats.hit_count == 0 and cold.stats.misses == units
    assert warm.stats.hit_count == units and warm.stats.misses == 0
    q_len = len(kdn.tokenizer(question, add_special_tokens=False)["input_ids"])
    assert warm.stats.tokens_computed == q_len
    # a different first chunk invalidates every prefix entry after it
    other = kdn.generate([docs[2] + "\n\n"] + chunks[1:], max_new_tokens=4, mode="prefix")
    assert other.stats.hit_count == _lead(kdn)


def test_reuse_through_stock_generate_computes_only_the_suffix(kdn, smol, docs):
    model, tok = smol
    question = "Question: Who won two Nobel Prizes? Answer:"
    chunks = [docs[0] + "\n\n", docs[1] + "\n\n", docs[3] + "\n\n", question]
    kdn.ingest(chunks[:-1])
    res = kdn.generate(chunks, max_new_tokens=10, mode="reuse")
    q_len = len(tok(question, add_special_tokens=False)["input_ids"])
    assert res.stats.misses == 0 and res.stats.hit_count == 3 + _lead(kdn)
    assert res.stats.tokens_computed == q_len
    assert res.stats.tokens_reused == len(res.prompt_ids) - q_len
    assert res.stats.bytes_loaded > 0
    # the first token comes after the cache is prepared, and 9 more are decoded after it (the clock itself:
    # test_paths.py::test_ttft_clock_brackets_the_first_token)
    assert res.stats.prepare_s < res.stats.ttft_s < res.stats.total_s

    # the HF way gives the same tokens
    cache = kdn.prepare(chunks[:-1], mode="reuse")
    assert isinstance(cache, KDNCache)
    assert cache.token_ids.tolist() == res.prompt_ids[: cache.get_seq_length()]
    assert cache.get_seq_length() == len(res.prompt_ids) - q_len
    assert [e - s for s, e in cache.chunk_spans] == [len(tok(c, add_special_tokens=False)["input_ids"]) for c in chunks[:-1]]
    x = torch.tensor([res.prompt_ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                         pad_token_id=2, **{cache_kwarg(model): cache})
    assert out[0, x.shape[1]:].tolist() == res.token_ids


def test_reuse_equals_cold_for_any_order_miss_and_repeat(kdn, docs):
    q = "Question: What is the text about? Answer:"
    kdn.ingest([docs[0] + "\n\n", docs[2] + "\n\n"])
    layouts = [
        [docs[2] + "\n\n", docs[0] + "\n\n", q],  # reordered, 100% hit
        [docs[0] + "\n\n", docs[1] + "\n\n", docs[2] + "\n\n", q],  # a miss in the middle
        [docs[0] + "\n\n", docs[0] + "\n\n", q],  # the same chunk twice
    ]
    for chunks in layouts:
        warm = kdn.generate(chunks, max_new_tokens=6, mode="reuse")
        cache = kdn.prepare(chunks[:-1], mode="reuse")
        for (s, e), text in zip(cache.chunk_spans, chunks[:-1]):
            ids = torch.tensor(kdn.tokenizer(text, add_special_tokens=False)["input_ids"])
            if kdn.opener:  # chunks are computed after BOS: compare with that computation, moved to s..e
                ref = compute_chunk_kv(kdn.model, ids, context=torch.tensor(kdn.opener))
                k = rerotate(ref.keys, ref.positions, torch.arange(s, e), kdn.rope_spec)
                want = torch.stack([k, ref.values], dim=1)
            else:  # a chunk alone at s..e: its KV must equal a fresh forward at those positions
                fresh, _ = prefill(kdn.model, ids, torch.arange(s, e))
                want = stack_cache(fresh)
            got = torch.stack([torch.stack([l.keys[0, :, s:e], l.values[0, :, s:e]]) for l in cache.layers])
            assert (got - want).abs().max().item() < 1e-3
        assert warm.stats.misses <= 1


def test_cache_covering_every_input_token_is_refused_clearly(kdn, smol, docs):
    model, _ = smol
    chunks = [docs[0] + "\n\n", "Question: Where does the Amazon flow? Answer:"]
    cache = kdn.prepare(chunks, mode="reuse")  # covers everything: generate would re-feed the whole input
    ids = cache.token_ids.tolist()
    x = torch.tensor([ids])
    with pytest.raises(KDNCacheError, match=r"prepare\(chunks\[:-1\]\)"):
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                       pad_token_id=2, **{cache_kwarg(model): cache})
    # one more token than the cache holds: exact (prefix mode: the KV of full prefill), positions keep counting
    cache = kdn.prepare(chunks, mode="prefix")
    x = torch.tensor([ids + [198]])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                         pad_token_id=2, **{cache_kwarg(model): cache})
    assert out[0, x.shape[1]:].tolist() == _plain_greedy(model, ids + [198], 4)[: out.shape[1] - x.shape[1]]
    assert cache.positions.tolist() == list(range(cache.get_seq_length()))


@pytest.mark.parametrize("reserve", [0, 8])
def test_num_return_sequences_and_beams_with_prepared_cache(kdn, smol, docs, reserve):
    model, _ = smol
    chunks = [docs[1] + "\n\n", "Question: What did Marie Curie research? Answer:"]
    res = kdn.generate(chunks, max_new_tokens=5, mode="reuse")
    x = torch.tensor([res.prompt_ids])
    for extra in ({"num_return_sequences": 2, "do_sample": True, "top_k": 1},
                  {"num_beams": 2, "num_return_sequences": 2, "do_sample": False}):
        cache = kdn.prepare(chunks[:-1], mode="reuse", reserve=reserve)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, pad_token_id=2,
                             **{cache_kwarg(model): cache}, **extra)
        assert out.shape[0] == 2
        if extra.get("top_k") == 1:  # top-1 sampling is greedy: both rows equal the greedy answer
            assert out[0, x.shape[1]:].tolist() == res.token_ids == out[1, x.shape[1]:].tolist()


def test_namespaces_do_not_share_entries(smol, tmp_path, docs):
    model, tok = smol
    a = KDN(model, tok, store=tmp_path / "s", namespace="tenant-a")
    b = KDN(model, tok, store=tmp_path / "s", namespace="tenant-b")
    chunks = [docs[0] + "\n\n", "Question: Which ocean? Answer:"]
    a.ingest(chunks[:1])
    assert b.generate(chunks, max_new_tokens=2, mode="reuse").stats.hit_count == 0
    assert a.generate(chunks, max_new_tokens=2, mode="reuse").stats.hit_count == 1 + _lead(a)


def test_corrupted_disk_entry_is_recomputed(kdn, docs):
    chunks = [docs[1] + "\n\n", docs[2] + "\n\n", "Question: Who was Marie Curie? Answer:"]
    cold = kdn.generate(chunks, max_new_tokens=8, mode="reuse")
    files = sorted((kdn.store.tiers[0].root).rglob("*.kdn"), key=lambda f: -f.stat().st_size)
    assert len(files) == 2 + _lead(kdn)
    data = bytearray(files[0].read_bytes())  # the largest: a document, not the lead-in
    data[len(data) // 2] ^= 0x10  # one bit flip inside the tensor data
    files[0].write_bytes(bytes(data))
    again = kdn.generate(chunks, max_new_tokens=8, mode="reuse")
    assert again.stats.misses == 1 and again.stats.hit_count == 1 + _lead(kdn)
    assert again.token_ids == cold.token_ids
    assert kdn.store.stats()["disk"].corrupt == 1
    third = kdn.generate(chunks, max_new_tokens=8, mode="reuse")  # recomputed entry was stored back
    assert third.stats.hit_count == 2 + _lead(kdn) and third.token_ids == cold.token_ids


@pytest.mark.parametrize("mode", ["reuse", "blend"])
def test_reserved_cache_grows_in_place_and_equals_copying_growth(kdn, smol, docs, mode):
    """With ``reserve``, generate writes new tokens into the prepared buffer (no per-step copy of every
    layer); tokens and KV equal those of the copying growth, and past the reserve it grows as usual."""
    model, tok = smol
    ctx = [d + "\n\n" for d in docs[:3]]
    q = tok("Question: Where does the Amazon flow? Answer:", add_special_tokens=False)["input_ids"]
    kdn.ingest(ctx, progress=False)
    runs = {}
    for reserve in (0, 3, len(q) + 12):
        cache = kdn.prepare(ctx, mode=mode, reserve=reserve)
        n0, ptr = cache.get_seq_length(), cache.layers[5].keys.data_ptr()
        x = torch.tensor([cache.token_ids.tolist() + q])
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                 pad_token_id=2, **{cache_kwarg(model): cache})
        grown, new = cache.get_seq_length(), out.shape[1] - x.shape[1]
        assert grown == n0 + len(q) + new - 1  # the last generated token is never fed back
        in_place = cache.layers[5].keys.data_ptr() == ptr
        assert in_place == (reserve >= grown - n0), reserve
        assert cache.positions.tolist() == list(range(grown))
        runs[reserve] = (out[0, x.shape[1]:].tolist(), stack_cache(cache))
    base_tokens, base_kv = runs[0]
    for reserve, (tokens, kv) in runs.items():
        assert tokens == base_tokens, reserve
        assert torch.equal(kv, base_kv), reserve
    if mode == "reuse":  # generate reserves room for the question and every new token itself
        res = kdn.generate(ctx + ["Question: Where does the Amazon flow? Answer:"], max_new_tokens=12, mode=mode)
        assert res.token_ids == base_tokens


def test_bad_reserve_and_capacity_are_refused(kdn, docs):
    with pytest.raises(ConfigError, match="reserve"):
        kdn.prepare([docs[0]], mode="reuse", reserve=-1)
    kv = torch.zeros(2, 2, 3, 10, 8)
    with pytest.raises(ValueError, match="capacity"):
        KDNCache(kv[:, :, :, :4].clone(), torch.arange(4), torch.arange(4), capacity=kv)
    cache = KDNCache(kv[:, :, :, :4], torch.arange(4), torch.arange(4), capacity=kv)
    assert cache.get_seq_length() == 4


def test_greedy_blend_takes_its_first_token_from_the_blend(kdn, smol, docs):
    """Plain greedy blend picks the first token from the blend's last row (the question computed once,
    whole); any generation argument sends it down stock generate. Both give the same tokens."""
    model, _ = smol
    chunks = [d + "\n\n" for d in docs] + ["Question: Who won two Nobel Prizes? Answer:"]
    kdn.ingest(chunks[:-1], progress=False)
    fast = kdn.generate(chunks, max_new_tokens=8)
    stock = kdn.generate(chunks, max_new_tokens=8, num_beams=1)  # an explicit argument: stock path
    assert fast.stats.first_token == "blend" and stock.stats.first_token == "generate"
    assert fast.token_ids == stock.token_ids and fast.text == stock.text
    assert fast.stats.tokens_computed == stock.stats.tokens_computed  # question counted once either way
    assert fast.stats.prepare_s < fast.stats.ttft_s < fast.stats.total_s  # 7 tokens decoded after the first
    one = kdn.generate(chunks, max_new_tokens=1)
    assert one.token_ids == fast.token_ids[:1] and one.stats.tokens_generated == 1
    # ratio 1.0: the first token from the blend equals full prefill's
    full = kdn.generate(chunks, max_new_tokens=8, mode="full")
    assert kdn.generate(chunks, max_new_tokens=8, recompute_ratio=1.0).token_ids == full.token_ids
    assert kdn.generate(chunks, max_new_tokens=4, mode="reuse").stats.first_token == "generate"


def test_store_blends_serves_the_same_prompt_as_one_hit(smol, docs, tmp_path):
    """With store_blends, a generate prompt's blended KV is stored under its own key: the same prompt
    again is one hit with no recompute, the same tokens and the same KV; any change to the question,
    ratio or selection blends again; a corrupt blend entry is a counted miss, blended again."""
    from kdn_hf.prompt import build_prompt

    model, tok = smol
    kdn = KDN(model, tok, store=tmp_path / "store", store_blends=True)
    ctx = [SYSTEM] + [d + "\n\n" for d in docs]
    q1, q2 = "Question: Who won two Nobel Prizes? Answer:", "Question: Where does the Amazon flow? Answer:"
    kdn.ingest(ctx, progress=False)
    root = kdn.store.tiers[0].root
    chunk_files = set(root.rglob("*.kdn"))
    first = kdn.generate(ctx + [q1], max_new_tokens=8)
    assert first.stats.tokens_recomputed > 0 and first.stats.hit_count == len(ctx) + _lead(kdn)
    blend_files = set(root.rglob("*.kdn")) - chunk_files
    assert len(blend_files) == 1  # one entry for the whole blended prompt
    again = kdn.generate(ctx + [q1], max_new_tokens=8)
    assert again.stats.tokens_recomputed == 0 and again.stats.misses == 0 and again.stats.hit_count == 1
    assert again.stats.tokens_computed == 1  # the question's last token, fed by generate
    assert again.token_ids == first.token_ids
    # the stored KV is the blend's, bit for bit
    prompt = build_prompt(tok, ctx + [q1], max_positions=kdn.max_positions)
    n = len(prompt.chunk_ids) - 1
    def prepare(k):
        with StoreBack(k.store, k.policy.fingerprint, k.codec) as writes:
            return prepare_prompt(k, Request(prompt, n, "blend", 0.15, "kdn", writes, query=prompt.chunk_ids[-1],
                                             keep_query=True))

    hit = prepare(kdn)
    assert hit.stats.tokens_recomputed == 0
    plain = KDN(model, tok, store=tmp_path / "store")  # store_blends off: blends every time
    fresh = prepare(plain)
    assert fresh.stats.tokens_recomputed > 0
    assert torch.equal(stack_cache(hit), stack_cache(fresh))
    # a different question, ratio or selection is a different prompt or blend
    assert kdn.generate(ctx + [q2], max_new_tokens=2).stats.tokens_recomputed > 0
    assert kdn.generate(ctx + [q1], max_new_tokens=2, recompute_ratio=0.2).stats.tokens_recomputed > 0
    assert kdn.generate(ctx + [q1], max_new_tokens=2, selection="cacheblend").stats.tokens_recomputed > 0
    # a corrupt blend entry: counted, removed, blended again, stored back
    (f,) = blend_files
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    third = kdn.generate(ctx + [q1], max_new_tokens=8)
    assert third.stats.tokens_recomputed > 0 and third.token_ids == first.token_ids
    assert kdn.store.stats()["disk"].corrupt == 1
    assert kdn.generate(ctx + [q1], max_new_tokens=8).stats.tokens_recomputed == 0
    with pytest.raises(ConfigError, match="store_blends"):
        KDN(model, tok, store=tmp_path / "store", store_blends="yes")
