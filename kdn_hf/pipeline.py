"""The request flow that prepares a prompt's KV: plan → resolve → compose → blend, per mode.

    cache = prepare_prompt(kdn, request)      # a KDNCache; request.store_back holds what was computed

Stages (one module each):

1. plan      (``kdn_hf.plan``)        prompt → units with ids, context and store key; model-free.
2. resolve   (``kdn_hf.resolve``)     units → a verified store hit or a computed chunk per distinct key.
3. compose   (``kdn_hf.compose``)     sources → one buffer, K re-rotated, layer by layer in the background.
4. blend     (``kdn_hf.blend.stage``) selection + recompute, reading layers as they are composed.
5. first token (``kdn_hf.first_token``) the blend's (or the prefix prefill's) last row picks it under
                                      plain greedy decoding.
6. store-back (``kdn_hf.store_back``) the request's computed chunks, written after its answer.

Statistics are derived from the stages' results at the end (``kdn_hf.ledger``).
Everything per request lives in the :class:`Request` and local variables: the
``KDN`` passed in is only read (model, store, key policy, geometry, RoPE spec),
so one KDN serves many threads at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from kdn_hf.blend import get_selection
from kdn_hf.blend.stage import Blend
from kdn_hf.cache import KDNCache
from kdn_hf.compose import compose
from kdn_hf.compute import compute_chunk_kv, compute_chunks_kv, prefill
from kdn_hf.delivery import start_loading
from kdn_hf.first_token import next_token_logits
from kdn_hf.kernels import describe
from kdn_hf.kv import ChunkKV
from kdn_hf.ledger import count_sources, prepare_stats
from kdn_hf.plan import Unit, plan_chunks, plan_prefix
from kdn_hf.prompt import Prompt
from kdn_hf.resolve import Resolution, Source, computed_source, entry_mismatch, resolve, resolve_prefix
from kdn_hf.result import PrepareStats
from kdn_hf.store_back import StoreBack
from kdn_hf.suffix import prefill_into


@dataclass(frozen=True)
class Request:
    """What to prepare.

    prompt:      the whole prompt (its last chunk may be the question).
    n_chunks:    how many of its chunks the cache covers (the rest: the question, if any).
    mode, ratio, selection: as ``KDN.prepare`` (ratio already 0 outside blend).
    query:       the question's ids (blend: computed with the context), or ().
    keep_query:  the cache also covers the question, all of it but its last token (or all of it, with
                 ``first_token``), else the context only.
    reserve:     spare slots after the cached tokens, filled in place by what generate appends.
    first_token: keep the blend's last row's next-token logits in ``cache.next_logits``.
    store_back:  where this request's computed chunks go.
    """

    prompt: Prompt
    n_chunks: int
    mode: str
    ratio: float
    selection: str
    store_back: StoreBack
    query: tuple[int, ...] = ()
    keep_query: bool = False
    reserve: int = 0
    first_token: bool = False


def _ids_and_context(unit: Unit) -> tuple[torch.Tensor, torch.Tensor | None]:
    context = torch.tensor(unit.context, dtype=torch.long) if unit.context else None
    return torch.tensor(unit.ids, dtype=torch.long), context


def compute_unit(model, unit: Unit) -> ChunkKV:
    """A unit's KV computed on its own, after its context (a miss)."""
    ids, context = _ids_and_context(unit)
    return compute_chunk_kv(model, ids, context=context)


def compute_units(model, units: Sequence[Unit]) -> list[ChunkKV]:
    """Each unit's KV as ``compute_unit`` computes it, in batched forwards where lengths allow
    (``kdn_hf.compute.compute_chunks_kv``); in the order of ``units``."""
    return compute_chunks_kv(model, [_ids_and_context(u) for u in units])


def prepare_prompt(kdn, req: Request) -> KDNCache:
    """The KDNCache of ``req``; ``cache.stats`` says what it cost."""
    t0 = time.perf_counter()
    sub = Prompt(req.prompt.opener, req.prompt.chunk_ids[:req.n_chunks])
    if req.mode == "full":
        cache, stats = _full(kdn, sub)
    elif req.mode == "prefix":
        cache, stats = _prefix(kdn, sub, req)
    else:
        # longrope switches every frequency once a sequence passes a length: check the whole prompt
        kdn.rope_spec.check_positions(len(req.prompt) - 1)
        cache, stats = _reuse(kdn, sub, req)
    cache.chunk_spans = sub.spans
    stats.prepare_s = time.perf_counter() - t0
    cache.stats = stats
    return cache


def _full(kdn, prompt: Prompt) -> tuple[KDNCache, PrepareStats]:
    cache = KDNCache()
    ids = prompt.prompt_ids
    if ids:
        prefill(kdn.model, torch.tensor(ids), torch.arange(len(ids)), cache=cache)
    cache.token_ids = torch.tensor(ids, dtype=torch.long)
    stats = prepare_stats("full", len(prompt.chunk_ids), len(prompt))
    stats.tokens_computed = len(ids)
    return cache, stats


def _prefix(kdn, prompt: Prompt, req: Request) -> tuple[KDNCache, PrepareStats]:
    """Reuse the longest run of exact prefix entries, prefill the rest after it and store it back.

    One buffer holds it all: the entries are written into its first slots, the rest is prefilled into
    the slots after them (``kdn_hf.suffix``: bottom-right causal, in place), with ``keep_query`` the
    question but its last token too (all of it with ``first_token``: its last row's logits then go to
    ``cache.next_logits``), and ``reserve`` slots are left for what generate appends. The
    computed prefix entries are views of the buffer, copied by the store-back after the answer.
    """
    units = plan_prefix(kdn.policy, prompt)
    hits = resolve_prefix(units, lambda key: kdn.store.get(key, kdn.policy.fingerprint), kdn.geometry,
                          kdn.store.note_corrupt)
    first = req.first_token and req.keep_query and bool(req.query)
    # generate feeds the question's last token, unless the prefill picks the first token itself
    query = (list(req.query) if first else list(req.query[:-1])) if req.keep_query else []
    ids = list(prompt.prompt_ids) + query
    n, geo = len(ids), kdn.geometry
    stats = prepare_stats("prefix", len(prompt.chunk_ids), len(prompt))
    if not n:
        return KDNCache(), stats
    buf = torch.empty(geo.num_layers, 2, geo.kv_heads, n + 1 + req.reserve, geo.head_dim, dtype=geo.dtype,
                      device=kdn.model.device)
    for s in hits:
        buf[:, :, :, s.unit.start:s.unit.end] = s.layers(0, geo.num_layers)
    sources: dict[str, Source] = {s.unit.key: s for s in hits}
    hit_len = units[len(hits) - 1].end if hits else 0
    last = prefill_into(kdn.model, buf, hit_len, torch.tensor(ids[hit_len:], dtype=torch.long), last_hidden=first)
    for unit in units[len(hits):]:
        # a view of the buffer: generate writes only the slots after the prompt, the store-back copies it
        chunk = ChunkKV(buf[:, :, :, unit.start:unit.end], torch.arange(unit.start, unit.end),
                        torch.tensor(unit.ids, dtype=torch.long))
        req.store_back.put(unit.key, chunk)
        sources[unit.key] = computed_source(unit, chunk)
    count_sources(stats, units, sources)
    stats.tokens_computed += len(query)
    token_ids = torch.tensor(ids, dtype=torch.long)
    cache = KDNCache(buf[:, :, :, :n], torch.arange(n), token_ids, capacity=buf)
    cache.next_logits = None if last is None else next_token_logits(kdn.model, last)
    return cache, stats


def _blend_variant(ratio: float, name: str, selection) -> str:
    """How a prompt was blended, for its blend key: the ratio, the selection's name and parameters."""
    params = sorted((k, repr(v)) for k, v in vars(selection).items())
    return f"ratio={ratio!r};{name};{params}"


def _blend_hit(kdn, key: str, ids: torch.Tensor, reserve: int) -> tuple[KDNCache, PrepareStats] | None:
    """The stored blended KV of a whole prompt (``store_blends``) as a KDNCache with room for ``reserve``
    more tokens, or None on a miss. An entry that does not hold exactly ``ids`` at positions 0..n-1 in the
    model's geometry is counted corrupt, removed and treated as a miss.

    ids: [n] int64 the prompt's ids but the question's last token.
    """
    n = len(ids)
    entry, tier = kdn.store.get(key, kdn.policy.fingerprint)
    if entry is None:
        return None
    if entry_mismatch(entry, ids.tolist(), torch.arange(n), kdn.geometry) is not None:
        kdn.store.note_corrupt(key)
        return None
    buf = torch.empty(*entry.kv.shape[:3], n + 1 + reserve, entry.kv.shape[4], dtype=entry.kv.dtype,
                      device=kdn.model.device)
    buf[:, :, :, :n] = entry.kv
    stats = PrepareStats(hits={tier: 1}, bytes_loaded=entry.nbytes, tokens_reused=n)
    return KDNCache(buf[:, :, :, :n], torch.arange(n), ids, capacity=buf), stats


def _reuse(kdn, prompt: Prompt, req: Request) -> tuple[KDNCache, PrepareStats]:
    """Compose (and, for ratio > 0, blend) the KV of ``prompt`` (the request's context chunks)."""
    mode = "blend" if req.mode == "blend" else "reuse"
    device = kdn.model.device
    query = tuple(req.query) if req.ratio > 0 else ()
    ids = torch.tensor(list(prompt.prompt_ids) + list(query), dtype=torch.long)
    sel = get_selection(req.selection) if req.ratio > 0 else None
    blend_key = None
    if kdn.store_blends and query and req.keep_query and isinstance(req.selection, str):
        # the whole prompt's blended KV, question but its last token included (stock generate feeds that)
        blend_key = kdn.policy.blend_key(ids.tolist(), _blend_variant(req.ratio, req.selection, sel))
        hit = _blend_hit(kdn, blend_key, ids[:-1], req.reserve)
        if hit is not None:
            cache, stats = hit
            stats.mode, stats.chunks, stats.tokens_total = mode, len(prompt.chunk_ids), len(prompt)
            return cache, stats
    units = plan_chunks(kdn.policy, prompt)
    blend = None
    first_layer = 0
    if sel is not None:
        first_layer = sel.fresh_layers(bool(query))  # overwritten for every token: not composed
        blend = Blend(kdn.model, ids, prompt.spans, req.ratio, sel, query_rows=len(query),
                      last_hidden=req.first_token and req.keep_query and bool(query))

    def compute(unit: Unit) -> ChunkKV:
        return compute_unit(kdn.model, unit)

    # fetches start now, in the background; composing then runs layer by layer in the background
    # while the blend reads the layers already composed (kdn_hf.delivery)
    keys = [u.key for u in units]
    resolution = Resolution()
    try:
        with start_loading(kdn.store, keys, kdn.policy.fingerprint, decode=not kdn.layerwise) as loader:
            resolve(units, loader.get, kdn.geometry, compute, kdn.store.note_corrupt, into=resolution,
                    compute_many=lambda missing: compute_units(kdn.model, missing))
        composition = compose(units, resolution, kdn.rope_spec, kdn.geometry, device, compute=compute,
                              note_corrupt=kdn.store.note_corrupt, first_layer=first_layer,
                              extra=len(query) + req.reserve, layerwise=kdn.layerwise)
        kv = None if composition is None else composition.run(blend)
    finally:  # what was computed is right even if the request fails later: it reaches the store
        req.store_back.put_all(resolution.computed)
    stats = prepare_stats(mode, len(prompt.chunk_ids), len(prompt))
    stats.backends = {"kernels": describe(device, kdn.geometry.dtype)["kernels"],
                      "attention": str(getattr(kdn.model.config, "_attn_implementation", None) or "eager")}
    if kv is None:
        return KDNCache(), stats
    count_sources(stats, units, resolution.sources)
    logits = None
    if blend is not None:
        out = blend.outcome
        stats.tokens_recomputed, stats.recompute_share = out.tokens_recomputed, out.recompute_share
        logits = None if out.last_hidden is None else next_token_logits(kdn.model, out.last_hidden)
    at = len(prompt)
    if query and req.keep_query:
        n = len(query) if logits is not None else len(query) - 1
        at += n
        stats.tokens_computed += n
    cache = KDNCache(kv[:, :, :, :at], torch.arange(at), ids[:at], capacity=kv)
    cache.next_logits = logits
    if blend_key is not None:
        # stored after the answer (generate defers it); generate only writes the slots after these
        held = len(ids) - 1
        req.store_back.put(blend_key, ChunkKV(kv[:, :, :, :held], torch.arange(held), ids[:held]))
    return cache, stats

