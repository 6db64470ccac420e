"""One KDN shared by many threads, the one key policy, and KDNCache(kdn, chunks=...) with stock generate."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch

from kdn_hf import KDN, KDNCache
from kdn_hf.compat import cache_kwarg

SYSTEM = "You are a helpful assistant. Answer the question using the documents.\n\n"
QUESTIONS = ["Question: Who won two Nobel Prizes? Answer:", "Question: Where does the Amazon flow? Answer:"]
MODES = ["full", "prefix", "reuse", "blend"]


def _requests(docs) -> list[tuple[str, list[str]]]:
    """8 requests, two of each mode, documents in different orders and subsets."""
    d = [x + "\n\n" for x in docs]
    orders = [[0, 1, 2], [3, 1], [2, 0, 3], [1, 3, 0], [0, 2], [3, 2, 1], [1, 0], [2, 3, 0, 1]]
    return [(MODES[i % 4], [SYSTEM] + [d[j] for j in order] + [QUESTIONS[i % 2]]) for i, order in enumerate(orders)]


def _stored_units(kdn, mode: str, chunks) -> list:
    """The units a request in ``mode`` looks up (and computes on a miss): all must be stored after it."""
    if mode == "full":
        return []
    return list(kdn.plan(chunks[:-1], mode="prefix" if mode == "prefix" else "reuse"))


def _fresh(smol, path, stored) -> KDN:
    """A KDN on a new store holding the chunks ``stored`` only."""
    model, tok = smol
    kdn = KDN(model, tok, store=path)
    kdn.ingest(stored, progress=False)
    return kdn


def test_threads_share_one_kdn_answers_stats_and_store_writes(smol, docs, tmp_path):
    """8 requests of mixed modes arrive 0.15 s apart on one KDN whose store holds only some of their
    chunks: each answers exactly as it does alone, with its own stats, and every chunk any request
    computed is in the store afterwards."""
    requests = _requests(docs)
    half = [docs[0] + "\n\n", docs[2] + "\n\n"]  # the other documents are missing at first

    alone = []
    for i, (mode, chunks) in enumerate(requests):  # each request alone, on a store in the same starting state
        kdn = _fresh(smol, tmp_path / f"alone{i}", half)
        alone.append(kdn.generate(chunks, max_new_tokens=4, mode=mode))

    shared = _fresh(smol, tmp_path / "shared", half)
    results: list = [None] * len(requests)
    errors: list = []

    def serve(i: int) -> None:
        mode, chunks = requests[i]
        try:
            results[i] = shared.generate(chunks, max_new_tokens=4, mode=mode)
        except BaseException as e:  # reported below, with the request it came from
            errors.append((i, e))

    threads = []
    for i in range(len(requests)):
        t = threading.Thread(target=serve, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.15)
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i, ((mode, chunks), res, ref) in enumerate(zip(requests, results, alone)):
        assert res.token_ids == ref.token_ids, f"request {i} ({mode}) answered differently under sharing"
        assert res.prompt_ids == ref.prompt_ids
        s = res.stats
        assert (s.mode, s.chunks, s.tokens_total) == (mode, len(chunks), len(ref.prompt_ids))
        units = _stored_units(shared, mode, chunks)
        if units:  # its own accounting: every distinct unit either a hit or a miss
            assert s.hit_count + s.misses == len({u.key for u in units}), f"request {i} ({mode}) stats mixed"
        missing = [u.key for u in units if not shared.store.contains(u.key)]
        assert not missing, f"request {i} ({mode}) computed {len(missing)} chunks that never reached the store"


def test_cold_blends_in_threads_answer_by_full_prefill_and_store_their_chunks(smol, docs, tmp_path):
    """4 cold blend requests (none of their documents stored) run at once on one KDN: each is answered
    by full prefill (the same tokens as full prefill alone), its chunks reach the store after its
    answer, and the next request for those documents blends from the store."""
    model, tok = smol
    requests = [[d + "\n\n", d[::-1][:40] + "\n\n", QUESTIONS[i % 2]] for i, d in enumerate(docs[:4])]
    want = [KDN(model, tok, store="memory://").generate(c, max_new_tokens=4, mode="full").token_ids
            for c in requests]
    shared = KDN(model, tok, store=tmp_path / "shared")
    results: list = [None] * len(requests)
    errors: list = []

    def serve(i: int) -> None:
        try:
            results[i] = shared.generate(requests[i], max_new_tokens=4, mode="blend")
        except BaseException as e:  # reported below, with the request it came from
            errors.append((i, e))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i, (res, ref) in enumerate(zip(results, want)):
        assert res.stats.cold_full and res.stats.misses == 2, (i, res.stats)
        assert res.token_ids == ref, f"cold request {i} answered differently from full prefill"
        units = list(shared.plan(requests[i][:-1], mode="reuse"))
        assert all(shared.store.contains(u.key) for u in units), f"cold request {i} lost a chunk"
    warm = shared.generate(requests[0], max_new_tokens=4, mode="blend")
    assert not warm.stats.cold_full and warm.stats.misses == 0 and warm.stats.tokens_recomputed > 0


def test_the_key_policy_is_the_only_place_keys_are_made():
    """Store keys are made by kdn_hf.plan.KeyPolicy only: nothing else in the library, its scripts or its
    integrations calls make_key (so the HF path, the SGLang adapter, bench and demo agree)."""
    root = Path(__file__).resolve().parents[2]
    allowed = {root / "kdn_hf" / "keys.py", root / "kdn_hf" / "plan.py"}
    offenders = []
    for folder in ("kdn_hf", "integrations", "kernels", "scripts", "examples"):
        for path in (root / folder).rglob("*.py"):
            if path not in allowed and re.search(r"\bmake_key\s*\(", path.read_text()):
                offenders.append(str(path.relative_to(root)))
    assert not offenders, f"keys made outside kdn_hf.plan: {offenders}"


def test_kdncache_constructor_prepares_from_the_store_for_stock_generate(kdn, smol, docs):
    """The design's literal usage: model.generate(ids, past_key_values=KDNCache(kdn, chunks=[...]))."""
    model, tok = smol
    ctx = [SYSTEM, docs[1] + "\n\n", docs[0] + "\n\n"]
    kdn.ingest(ctx, progress=False)
    question = QUESTIONS[0]
    ids = kdn.generate(ctx + [question], max_new_tokens=1, mode="full").prompt_ids
    x = torch.tensor([ids])

    def gen(cache):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, **{cache_kwarg(model): cache})
        return out[0, len(ids):].tolist()

    plain = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                           pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    exact = KDNCache(kdn, chunks=ctx, mode="prefix")
    assert exact.token_ids.tolist() == ids[: exact.get_seq_length()] and exact.stats.mode == "prefix"
    assert gen(exact) == plain  # exact prefix KV: the same tokens as plain generate
    blended = KDNCache(kdn, chunks=ctx, query=question)
    assert blended.stats.mode == "blend" and blended.stats.tokens_recomputed > 0
    assert blended.stats.backends == {"kernels": "torch", "attention": "sdpa"}  # CPU: the torch references
    assert gen(blended) == gen(kdn.prepare(ctx, query=question))  # the same cache as kdn.prepare's
    with pytest.raises(TypeError, match="chunks"):
        KDNCache(kdn)
    with pytest.raises(TypeError, match="KDN"):
        KDNCache("not a kdn", chunks=ctx)


def test_chunks_computed_before_a_failure_still_reach_the_store(kdn, docs, monkeypatch):
    """A request that fails after computing its missing chunks (here: in the blend) still stores them:
    they are right, and the next request finds them."""
    from kdn_hf.blend.stage import Blend

    chunks = [SYSTEM, docs[0] + "\n\n", docs[2] + "\n\n", QUESTIONS[0]]

    def broken(self, kv, wait_layer):
        raise RuntimeError("injected blend failure")

    # compute-then-blend on an empty store (the default would answer a cold blend by full prefill)
    kdn = KDN(kdn.model, kdn.tokenizer, store=kdn.store, cold_blend="blend")
    monkeypatch.setattr(Blend, "__call__", broken)
    with pytest.raises(RuntimeError, match="injected"):
        kdn.generate(chunks, max_new_tokens=2)
    assert all(kdn.store.contains(u.key) for u in kdn.plan(chunks[:-1]))
    monkeypatch.undo()
    again = kdn.generate(chunks, max_new_tokens=2)
    assert again.stats.misses == 0 and again.stats.hit_count == len(kdn.plan(chunks[:-1]))
