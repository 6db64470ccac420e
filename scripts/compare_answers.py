"""Per-question QA correctness of full prefill vs blend@0.15 selections on the rag workload's dev
questions: which questions flip, and in which direction.

    .venv/bin/python scripts/compare_answers.py [QUESTIONS] [DOC_TOKENS]    # default 50 512

Prints one line per question (1 = the greedy 20-token answer contains a gold answer), marks the ones
where the methods differ, then each method's accuracy. Run it alone on the machine (about 11 minutes
for 50 questions on 2 cores).
"""
import sys

import torch

from kdn_hf import KDN
from kdn_hf.bench import rag_cases
from kdn_hf.bench.quality import greedy
from kdn_hf.bench.workload import answer_found

N = int(sys.argv[1]) if len(sys.argv) > 1 else 50
DT = int(sys.argv[2]) if len(sys.argv) > 2 else 512
kdn = KDN.from_pretrained("smollm2-135m", store="memory://?budget=8GiB")
cases = rag_cases(kdn.tokenizer, k=4, doc_tokens=DT, limit=N)
sels = {"kdn": "kdn", "cb1": "cacheblend-oneshot", "cb": "cacheblend"}
tot = {k: 0 for k in ["full", *sels]}


def correct(cache, case) -> bool:
    ids = greedy(kdn.model, cache, list(case.suffix), 20)
    return answer_found(kdn.tokenizer.decode(ids, skip_special_tokens=True), case.answers)


with torch.inference_mode():
    for i, case in enumerate(cases):
        ctx, q = [list(c) for c in case.context], list(case.suffix)
        row = {"full": correct(kdn.prepare(ctx, mode="full"), case)}
        for name, sel in sels.items():
            row[name] = correct(kdn.prepare(ctx, mode="blend", selection=sel, query=q), case)
        for k, v in row.items():
            tot[k] += v
        flag = "" if len(set(row.values())) == 1 else "  <-- differs"
        print(i, case.kind, {k: int(v) for k, v in row.items()}, flag, flush=True)
print({k: v / len(cases) for k, v in tot.items()})
