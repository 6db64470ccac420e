"""First-token KL vs full prefill of blend@0.15 selections (cacheblend-oneshot; kdn at several question-pass
depths and question-token choices), and their prepare time, on the rag workload's dev questions.

    .venv/bin/python scripts/compare_selection.py QUESTIONS DOC_TOKENS [depth|narrow]   # e.g. 16 512 narrow

"depth" (default): question-pass depths and question tokens, without narrowing; "narrow": progressive
narrowing settings (KDNSelection narrow_depths / narrow_keep), with the default kdn among them.

Prints one line per question, then the means (and each one's ratio to cacheblend-oneshot's).
"""
import sys, time, statistics, torch.nn.functional as F
from kdn_hf import KDN
from kdn_hf.bench import rag_cases
from kdn_hf.bench.quality import _forward
from kdn_hf.blend import KDNSelection, OneShotCacheBlendSelection
kdn = KDN.from_pretrained("smollm2-135m", store="memory://")
N = int(sys.argv[1]); DT = int(sys.argv[2])
cases = rag_cases(kdn.tokenizer, k=4, doc_tokens=DT, limit=N)
flat = dict(narrow_depths=())
SETS = {
    "depth": {"cb": OneShotCacheBlendSelection(), "kdn1.0": KDNSelection(**flat), "kdn0.67": KDNSelection(query_depth=0.67, **flat),
              "kdn0.5": KDNSelection(query_depth=0.5, **flat), "kdn0.33": KDNSelection(query_depth=0.34, **flat),
              "kdn-mean": KDNSelection(query_tokens="mean", **flat)},
    "narrow": {"cb": OneShotCacheBlendSelection(), "kdn-flat": KDNSelection(**flat), "kdn": KDNSelection(),
               "n8.16k.75": KDNSelection(narrow_depths=(8 / 30, 16 / 30), narrow_keep=0.75),
               "n15k.7": KDNSelection(narrow_depths=(0.5,), narrow_keep=0.7),
               "n10.20k.6": KDNSelection(narrow_depths=(1 / 3, 2 / 3), narrow_keep=0.6),
               "n5k.6": KDNSelection(narrow_depths=(5 / 30,), narrow_keep=0.6)},
}
sels = SETS[sys.argv[3] if len(sys.argv) > 3 else "depth"]
res = {k: [] for k in sels}; tm = {k: [] for k in sels}
for case in cases:
    ctx = [list(c) for c in case.context]; q = list(case.suffix)
    full = kdn.prepare(ctx, mode="full")
    ref = F.log_softmax(_forward(kdn.model, full, q, full.get_seq_length())[-1], -1)
    kdn.ingest(ctx, progress=False)
    for name, sel in sels.items():
        t = time.perf_counter()
        c = kdn.prepare(ctx, mode="blend", selection=sel, query=q)
        tm[name].append(time.perf_counter() - t)
        lp = F.log_softmax(_forward(kdn.model, c, q, c.get_seq_length())[-1], -1)
        res[name].append(F.kl_div(lp, ref, log_target=True, reduction="sum").item())
    print(" ".join(f"{k}={v[-1]:.4f}" for k, v in res.items()), flush=True)
cb = statistics.fmean(res["cb"])
for k in sels:
    print(f"{k:9s} KL {statistics.fmean(res[k]):.4f} ({statistics.fmean(res[k])/cb:.2f}x cb) prepare {statistics.median(tm[k])*1000:.0f} ms")
