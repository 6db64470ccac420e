"""TTFT of the paths that must not be slower than no cache: prefix (warm for the system prompt only) and
cold reuse/blend (empty store), against full prefill, on the bench's rag prompts.

    python scripts/time_paths.py [--cases 2] [--reps 3] [--threads N]
                                 [--methods full,prefix,prefix-old,reuse-cold,reuse-cold-old,blend-cold,
                                            blend-cold-compute] [--split test]

Methods take turns within each repetition (a change in machine load hits all of them); the figures are
medians over cases x reps of the TTFT (wall clock, ``stats.ttft_s``) and of the CPU time the process
spent in the request up to its answer (the store-back after the answer left out): on a shared machine
the CPU time is the steadier measure of the work. The paired line divides full's TTFT by the method's
within each repetition (the two ran back to back) and gives the median, range and how many were >= 1. Cold methods get a fresh memory store per request;
prefix gets a store warm for the opener and the system prompt only (as ``kdn bench``). ``-old`` runs
the code before the change for comparison in the same run: ``prefix-old`` the suffix through the
model's masked forward, a stacked copy and no reserved room; ``reuse-cold-old`` / ``blend-cold-old``
the missing chunks computed one by one. ``blend-cold`` is the default ``KDN(cold_blend="full")``
(answered by full prefill, chunks computed after the answer); ``blend-cold-compute`` is
``cold_blend="blend"`` (chunks computed in batched forwards, then blended).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import kdn_hf.pipeline as pipeline
from kdn_hf import KDN
from kdn_hf.bench.workload import rag_cases
from kdn_hf.cache import KDNCache
from kdn_hf.compute import prefill, stack_cache
from kdn_hf.kv import ChunkKV
from kdn_hf.ledger import count_sources, prepare_stats
from kdn_hf.plan import plan_prefix
from kdn_hf.resolve import computed_source, resolve_prefix
from kdn_hf.store_back import StoreBack


def _prefix_before(kdn, prompt, req):
    """``pipeline._prefix`` before this change (for comparison only)."""
    units = plan_prefix(kdn.policy, prompt)
    hits = resolve_prefix(units, lambda key: kdn.store.get(key, kdn.policy.fingerprint), kdn.geometry,
                          kdn.store.note_corrupt)
    ids = prompt.prompt_ids
    hit_len = units[len(hits) - 1].end if hits else 0
    if hits:
        kv = torch.cat([s.layers(0, kdn.geometry.num_layers).to(kdn.model.device) for s in hits], dim=3)
        cache = KDNCache(kv, torch.arange(hit_len), torch.tensor(ids[:hit_len], dtype=torch.long))
    else:
        cache = KDNCache()
    sources = {s.unit.key: s for s in hits}
    if hit_len < len(ids):
        prefill(kdn.model, torch.tensor(ids[hit_len:]), torch.arange(hit_len, len(ids)), cache=cache)
        full = stack_cache(cache)
        for unit in units[len(hits):]:
            chunk = ChunkKV(full[:, :, :, unit.start:unit.end].contiguous(), torch.arange(unit.start, unit.end),
                            torch.tensor(unit.ids, dtype=torch.long))
            req.store_back.put(unit.key, chunk)
            sources[unit.key] = computed_source(unit, chunk)
    cache.token_ids = torch.tensor(ids, dtype=torch.long)
    stats = prepare_stats("prefix", len(prompt.chunk_ids), len(prompt))
    count_sources(stats, units, sources)
    return cache, stats


@contextmanager
def _before():
    """The code paths before this change: the old prefix, misses computed one by one."""
    saved = pipeline._prefix, pipeline.compute_units
    pipeline._prefix = _prefix_before
    pipeline.compute_units = lambda model, units: [pipeline.compute_unit(model, u) for u in units]
    try:
        yield
    finally:
        pipeline._prefix, pipeline.compute_units = saved


_flush_cpu = [0.0]
_flush = StoreBack.flush


def _timed_flush(self):
    t = time.process_time()
    try:
        _flush(self)
    finally:
        _flush_cpu[0] += time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--methods",
                    default="full,prefix,prefix-old,reuse-cold,reuse-cold-old,blend-cold,blend-cold-compute")
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    StoreBack.flush = _timed_flush
    base = KDN.from_pretrained(args.model, store="memory://")
    cases = rag_cases(base.tokenizer, k=args.k, doc_tokens=args.doc_tokens, split=args.split)[:args.cases]
    methods = args.methods.split(",")
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    base.generate([list(c) for c in cases[0].chunks], max_new_tokens=1, mode="full")  # warm-up, untimed
    for case in cases:
        chunks = [list(c) for c in case.chunks]
        for _ in range(args.reps):
            for m in methods:
                mode = m.split("-")[0]
                cold = "blend" if m.endswith("-compute") else "full"
                kdn = KDN(base.model, base.tokenizer, "memory://", cold_blend=cold)  # empty store
                if mode == "prefix":
                    kdn.generate(chunks[:1] + ["x"], max_new_tokens=1, mode="prefix")  # system prompt only
                with _before() if m.endswith("-old") else contextmanager(lambda: (yield))():
                    _flush_cpu[0] = 0.0
                    t = time.process_time()
                    res = kdn.generate(chunks, max_new_tokens=1, mode=mode)
                    cpu[m].append(time.process_time() - t - _flush_cpu[0])
                wall[m].append(res.stats.ttft_s)
                print(f"  {m:16s} TTFT {res.stats.ttft_s * 1000:8.1f} ms  CPU {cpu[m][-1] * 1000:8.1f} ms", flush=True)
    print(f"{len(cases)} prompts x {args.reps} reps, {res.stats.tokens_total} tokens, {torch.get_num_threads()} threads")
    f_wall = statistics.median(wall["full"]) if "full" in wall else None
    f_cpu = statistics.median(cpu["full"]) if "full" in cpu else None
    for m in methods:
        w, c = statistics.median(wall[m]), statistics.median(cpu[m])
        ratio = f"  {f_wall / w:5.2f}x full (wall)  {f_cpu / c:5.2f}x full (CPU)" if f_wall else ""
        print(f"  {m:16s} TTFT {w * 1000:8.1f} ms  CPU {c * 1000:8.1f} ms{ratio}")
    if "full" in wall:  # per repetition: full's TTFT over the method's in the same turn (drifting load cancels)
        print("paired (full / method, the same repetition): median [min, max], repetitions at >= 1.0")
        for m in methods:
            if m == "full":
                continue
            pairs = sorted(f / x for f, x in zip(wall["full"], wall[m]))
            print(f"  {m:16s} {statistics.median(pairs):5.2f}x  [{pairs[0]:.2f}, {pairs[-1]:.2f}]  "
                  f"{sum(p >= 1.0 for p in pairs)}/{len(pairs)}")


if __name__ == "__main__":
    main()
