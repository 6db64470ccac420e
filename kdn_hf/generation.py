"""Answering a prompt: prepare its context's KV, pick the first token, let stock ``generate`` continue.

    res = answer(kdn, chunks, max_new_tokens=64, mode="blend", ratio=0.15, selection="kdn", generate_kwargs={})

The last chunk is the question. In every mode but ``full`` the context's KV
comes from :func:`kdn_hf.pipeline.prepare_prompt`; in ``blend`` the question is
computed with the context, and under plain greedy decoding the blend's last row
picks the first token (``kdn_hf.first_token``); ``prefix`` then prefills the
whole question after its cached prefix and its last row picks it the same way.
Chunks the request computed are stored after the answer is out
(``kdn_hf.store_back``): off the TTFT path, and also when generation fails.

TTFT runs from the call to the first generated token: the prepared row's pick, or the
first token stock ``generate`` streams.

A cold blend (``KDN(cold_blend="full")``, the default): when none of the
prompt's context chunks is stored, blending would compute every chunk on its
own and then recompute a share of them, about 1.2x the cost of a full prefill.
The request is then answered by full prefill instead (exact, at full prefill's
TTFT), and its chunks are computed and stored after the answer, so the next
request with these documents blends (``stats.cold_full``).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from kdn_hf.compat import cache_kwarg
from kdn_hf.first_token import FirstTokenClock, prepare_picks_first_token, eos_ids
from kdn_hf.pipeline import Request, compute_units, prepare_prompt
from kdn_hf.plan import plan_chunks
from kdn_hf.prompt import Prompt, build_prompt
from kdn_hf.result import GenerateResult, GenerateStats
from kdn_hf.store_back import StoreBack


def answer(kdn, chunks: Sequence, *, max_new_tokens: int, mode: str, ratio: float, selection: str,
           generate_kwargs: dict) -> GenerateResult:
    """The answer to the prompt made of ``chunks`` (validated arguments; see ``KDN.generate``)."""
    t0 = time.perf_counter()
    prompt = build_prompt(kdn.tokenizer, chunks, max_positions=kdn.max_positions, reserve=max_new_tokens)
    ids = prompt.prompt_ids
    first_token = prepare_picks_first_token(kdn.model, mode, generate_kwargs)
    with StoreBack(kdn.store, kdn.policy.fingerprint, kdn.codec) as store_back:  # flushed after the answer
        cold = _cold_units(kdn, prompt) if mode == "blend" and kdn.cold_blend == "full" else None
        if mode == "full" or cold:
            cache = None
            stats = GenerateStats(mode=mode, chunks=len(prompt.chunk_ids), tokens_total=len(ids))
            if cold:  # answered by full prefill; the chunks are computed for the store after the answer
                stats.cold_full, stats.misses = True, len(cold)
                store_back.put_later(lambda: zip((u.key for u in cold), compute_units(kdn.model, cold)))
        else:
            # blend computes the question with the context (question-aware selection sees it); the
            # cache then covers all of it (first token taken from the blend) or all but its last token
            question = prompt.chunk_ids[-1]
            cache = prepare_prompt(kdn, Request(
                prompt, len(prompt.chunk_ids) - 1, mode, ratio, selection, store_back, query=question,
                keep_query=True, reserve=max_new_tokens + len(question), first_token=first_token))
            stats = GenerateStats(**vars(cache.stats))
            stats.chunks = len(prompt.chunk_ids)
            stats.tokens_total = len(ids)
        stats.tokens_computed += len(ids) - (cache.get_seq_length() if cache is not None else 0)
        stats.recompute_ratio = ratio
        new, first_at, end = _decode(kdn, ids, cache, max_new_tokens, generate_kwargs, stats)
    stats.tokens_generated = len(new)
    stats.total_s = end - t0
    stats.ttft_s = (first_at - t0) if first_at else stats.total_s
    text = kdn.tokenizer.decode(new, skip_special_tokens=True)
    return GenerateResult(text=text, token_ids=new, prompt_ids=ids, stats=stats)


def _cold_units(kdn, prompt: Prompt):
    """The distinct context units of ``prompt`` (the question left out) that are not stored, when none of
    its chunks is (the opener's entry does not count); else None."""
    units = plan_chunks(kdn.policy, Prompt(prompt.opener, prompt.chunk_ids[:-1]))
    distinct = list({u.key: u for u in units}.values())
    missing = [u for u in distinct if not kdn.store.contains(u.key)]
    chunks = [u for u in distinct if u.ids != prompt.opener or u.context]
    if not chunks or any(u not in missing for u in chunks):
        return None
    return missing


def _decode(kdn, ids: list[int], cache, max_new_tokens: int, generate_kwargs: dict, stats: GenerateStats):
    """Generate after ``ids`` over ``cache``: (new token ids, time of the first one or None, end time)."""
    kwargs: dict | None = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if kdn.tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = kdn.tokenizer.pad_token_id
    kwargs.update(generate_kwargs)
    new: list[int] = []
    first_at = None
    if cache is not None and cache.next_logits is not None:
        # the blend (or the prefix prefill) computed the whole question: its last row's logits give the
        # first token
        new.append(int(cache.next_logits.argmax()))
        first_at = time.perf_counter()
        stats.first_token = stats.mode
        if max_new_tokens == 1 or new[0] in eos_ids(kdn.model):
            kwargs = None  # done: generate would feed nothing new
        else:
            kwargs["max_new_tokens"] = max_new_tokens - 1
    clock = None
    if kwargs is not None and first_at is None and kwargs.get("num_beams", 1) == 1 and "streamer" not in kwargs:
        clock = kwargs["streamer"] = FirstTokenClock()
    if cache is not None and kwargs is not None:
        kwargs[cache_kwarg(kdn.model)] = cache
    fed = ids + new
    if kwargs is not None:
        input_ids = torch.tensor([fed], device=kdn.model.device)
        with torch.inference_mode():
            out = kdn.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new += out[0, len(fed):].tolist()
    end = time.perf_counter()
    if first_at is None and clock is not None:
        first_at = clock.first_token_at
    return new, first_at, end
