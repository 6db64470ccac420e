"""How concentrated the question's attention is: the share of context tokens that holds 50-95% of the
question's last-token attention (averaged over layers, as ``kdn`` ranks), on dev prompts of the long
workload (documents filled to 512 tokens). The basis of ``kdn-adaptive``'s coverage.

    python scripts/experiments/attention_mass.py [--split dev] [--docs 4,8] [--prompts 4]

2026-12-02, dev, 4 prompts of 4 documents and 4 of 8: 90% of the attention sits on 11-13% of the
2.1K-token contexts and on 7-8% of the 4.1K-token ones.
"""

from __future__ import annotations

import argparse
import importlib

from kdn_hf import KDN
from kdn_hf.bench.workload import rag_cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--docs", default="4,8")
    ap.add_argument("--prompts", type=int, default=4)
    args = ap.parse_args()
    rc = importlib.import_module("kdn_hf.blend.recompute")
    kdn = KDN.from_pretrained("smollm2-135m", store="memory://?budget=8GiB")
    seen = []
    question_pass = rc._question_pass

    def recording(*a, **kw):
        seen.append(question_pass(*a, **kw))
        return seen[-1]

    rc._question_pass = recording
    try:
        for k in (int(d) for d in args.docs.split(",")):
            for case in rag_cases(kdn.tokenizer, k=k, doc_tokens=512, fill=True, split=args.split)[:args.prompts]:
                chunks = [list(c) for c in case.chunks]
                kdn.generate(chunks, max_new_tokens=1, mode="reuse")  # every chunk stored
                seen.clear()
                kdn.generate(chunks, max_new_tokens=1, mode="blend")
                score = seen[-1][:, -1].mean(dim=0)  # [context tokens]
                cum = score.sort(descending=True).values.cumsum(0) / score.sum()
                shares = "  ".join(f"{m:.0%}: {(int((cum < m).sum()) + 1) / score.numel():5.1%}"
                                   for m in (0.5, 0.7, 0.8, 0.9, 0.95))
                print(f"{k} docs, {score.numel()} context tokens, {case.qid}:  {shares}", flush=True)
    finally:
        rc._question_pass = question_pass


if __name__ == "__main__":
    main()
