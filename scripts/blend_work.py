"""How much of full prefill's work one blend does, counted from the rows it really recomputes:
the share of (layer x row) matmul rows and of causal attention (query, key) pairs, against full
prefill of the same prompt (every layer, every row, each row attending to itself and every key
before it). The question pass and the recompute are both counted.

    python scripts/blend_work.py [--docs 8] [--ratio 0.15] [--selection kdn] [--split test]
"""

from __future__ import annotations

import argparse

import kdn_hf.blend.runner as runner_mod
from kdn_hf import KDN
from kdn_hf.bench.workload import rag_cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--selection", default="kdn")
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    args = ap.parse_args()
    kdn = KDN.from_pretrained("smollm2-135m", store="memory://?budget=8GiB")
    case = rag_cases(kdn.tokenizer, k=args.docs, doc_tokens=args.doc_tokens, fill=True, split=args.split)[0]
    chunks = [list(c) for c in case.chunks]
    kdn.generate(chunks, max_new_tokens=1, mode="reuse")  # every chunk stored
    counted = {"rows": 0, "pairs": 0}
    grouped = runner_mod.grouped_attention

    def counting(q, keys, values, rs, scale, backend="auto"):
        counted["rows"] += rs.rows.numel()
        counted["pairs"] += int((rs.rows + 1).sum())  # row at position p sees keys 0..p
        return grouped(q, keys, values, rs, scale, backend)

    runner_mod.grouped_attention = counting
    try:
        res = kdn.generate(chunks, max_new_tokens=1, mode="blend", recompute_ratio=args.ratio,
                           selection=args.selection)
    finally:
        runner_mod.grouped_attention = grouped
    T, L = res.stats.tokens_total, kdn.geometry.num_layers
    print(f"{T} prompt tokens, {L} layers, blend@{args.ratio}/{args.selection}: layer% "
          f"{res.stats.recompute_share:.1%}")
    print(f"matmul rows:      {counted['rows'] / (L * T):.1%} of full prefill's")
    print(f"attention pairs:  {counted['pairs'] / (L * T * (T + 1) / 2):.1%} of full prefill's")


if __name__ == "__main__":
    main()
