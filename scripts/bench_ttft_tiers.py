"""Interleaved TTFT of reuse (4 x 512-token rag docs) on memory / disk / redis stores, and ingest vs raw prefill.

Usage: python scripts/bench_ttft_tiers.py CODEC REPS [INGEST_CODEC ROUNDS]; needs a redis-server on 127.0.0.1:6391
(redis-server --port 6391 --save "" --appendonly no). Alternates the stores each rep so machine noise hits all alike.
"""
import statistics, time, torch, tempfile, sys
from kdn_hf import models, KDN
from kdn_hf.bench.workload import rag_cases
from kdn_hf.compute import compute_chunk_kv
model, tok = models.load("smollm2-135m")
case = rag_cases(tok, k=4, doc_tokens=512)[0]
chunks = [list(x) for x in case.chunks]; docs = chunks[1:-1]
d = tempfile.mkdtemp()
stores = {"memory": "memory://?budget=8GiB", "disk": d + "/disk", "redis": "redis://127.0.0.1:6391/0?prefix=ttft:"}
codec = sys.argv[1]
ks = {n: KDN(model, tok, store=s, codec=codec) for n, s in stores.items()}
for k in ks.values():
    k.generate(chunks, max_new_tokens=1, mode="reuse"); k.generate(chunks, max_new_tokens=1, mode="reuse")
t = {n: [] for n in ks}
for _ in range(int(sys.argv[2])):
    for n, k in ks.items():
        r = k.generate(chunks, max_new_tokens=1, mode="reuse"); t[n].append(r.stats.ttft_s)
print(codec, "hits", {n: dict(k.generate(chunks, max_new_tokens=1, mode="reuse").stats.hits) for n, k in ks.items()}, "ctx", r.stats.tokens_total)
for n in t: print(codec, n, "TTFT median ms", round(statistics.median(t[n]) * 1000, 1), "min", round(min(t[n]) * 1000, 1), "ratio vs memory (median)", round(statistics.median(t[n]) / statistics.median(t["memory"]), 3), "(min)", round(min(t[n]) / min(t["memory"]), 3), flush=True)
# ingest (int4 on disk) vs raw prefill, alternating
if len(sys.argv) > 3:
    kd = KDN(model, tok, store=d + "/ing", codec=sys.argv[3])
    context = torch.tensor(kd.opener + kd.lead_in) if kd.opener + kd.lead_in else None
    ing, pf = [], []
    for r in range(int(sys.argv[4])):
        for dd in docs:
            kd.store.delete(kd.key_for(dd))
        t0 = time.perf_counter(); kd.ingest(docs, progress=False); ing.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for dd in docs: compute_chunk_kv(model, torch.tensor(dd), context=context)
        pf.append(time.perf_counter() - t0)
    n = sum(map(len, docs))
    print(sys.argv[3], "disk ingest tok/s", round(n / statistics.median(ing)), "prefill tok/s", round(n / statistics.median(pf)), "ratio(median)", round(statistics.median(pf) / statistics.median(ing), 3), "ratio(min)", round(min(pf) / min(ing), 3), ing, pf, flush=True)
