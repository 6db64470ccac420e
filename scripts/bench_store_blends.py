"""TTFT of a blended prompt the first time vs served again from its stored blend (KDN(store_blends=True)),
against full prefill, on the rag workload (4 x 512 tokens, memory store, 2 prompts x 3 reps; medians).

    .venv/bin/python scripts/bench_store_blends.py

Each repetition uses a recompute ratio not stored yet (0.151, 0.152, ...), so "first time" really blends.
"""
import statistics

from kdn_hf import KDN
from kdn_hf.bench.workload import rag_cases
kdn = KDN.from_pretrained("smollm2-135m", store="memory://?budget=8GiB", store_blends=True)
cases = rag_cases(kdn.tokenizer, k=4, doc_tokens=512)[:2]
res = {"full": [], "blend (first time)": [], "blend (stored, hit)": []}
for c in cases:
    ch = [list(x) for x in c.chunks]; kdn.ingest(ch[:-1], progress=False); kdn.generate(ch, max_new_tokens=1, mode="full")
for rep in range(3):
    for c in cases:
        ch = [list(x) for x in c.chunks]
        res["full"].append(kdn.generate(ch, max_new_tokens=1, mode="full").stats.ttft_s)
        r = kdn.generate(ch, max_new_tokens=1, recompute_ratio=0.15 + 0.001 * (rep + 1))  # a ratio not stored yet
        res["blend (first time)"].append(r.stats.ttft_s)
        r2 = kdn.generate(ch, max_new_tokens=1, recompute_ratio=0.15 + 0.001 * (rep + 1))
        assert r2.stats.tokens_recomputed == 0 and r2.token_ids == r.token_ids
        res["blend (stored, hit)"].append(r2.stats.ttft_s)
f = statistics.median(res["full"])
for k, v in res.items(): print(f"{k:22s} {statistics.median(v)*1000:7.0f} ms  {f/statistics.median(v):5.2f}x")
