"""Per-question answers of full prefill vs reuse and blend selections on the distractor workload:
accuracy, first-token KL, flips against full prefill, and how many wrong answers took a look-alike
value from another document of the prompt.

    .venv/bin/python scripts/distractor_flips.py [--split dev] [--n 40] [--ratio 0.15]
        [--methods reuse,kdn,cacheblend-oneshot,cacheblend]

A method is ``reuse`` or a selection name (blended at ``--ratio`` with the question known). Tune on
``dev`` only. Quality only (no timing): fine on a loaded machine.
"""
import argparse

import torch
import torch.nn.functional as F

from kdn_hf import KDN
from kdn_hf.bench.distractor import distractor_cases, generate
from kdn_hf.bench.quality import _forward
from kdn_hf.blend import KDNSelection
from kdn_hf.bench.workload import _normal, answer_found

ap = argparse.ArgumentParser()
ap.add_argument("--split", default="dev")
ap.add_argument("--n", type=int, default=40)
ap.add_argument("--ratio", type=float, default=0.15)
ap.add_argument("--methods", default="reuse,kdn,cacheblend-oneshot,cacheblend")
ap.add_argument("--tokens", type=int, default=8, help="greedy answer tokens (the answers are short)")
args = ap.parse_args()
torch.set_num_threads(1)  # a loaded machine: threads waiting on each other cost more than they give
#: variants tried on dev (selection instances by name)
VARIANTS = {"kdn-titles": KDNSelection(sink_tokens=8), "kdn-mean": KDNSelection(query_tokens="mean"),
            "kdn-flat": KDNSelection(narrow_depths=())}

kdn = KDN.from_pretrained(store="memory://?budget=8GiB")
tok = kdn.tokenizer
cases = distractor_cases(tok, split=args.split)[: args.n]
questions = {q.qid: q for q in generate(args.split)}
methods = [m for m in args.methods.split(",") if m]


def run(cache, case):
    """(first-token log-probs [vocab], the greedy answer's first line)."""
    start = cache.get_seq_length() + len(case.suffix)
    logits = _forward(kdn.model, cache, list(case.suffix), cache.get_seq_length())[-1]
    first = F.log_softmax(logits, -1)
    out = [int(logits.argmax())]
    while len(out) < args.tokens and out[-1] != tok.eos_token_id:
        out.append(int(_forward(kdn.model, cache, out[-1:], start + len(out) - 1)[-1].argmax()))
    text = tok.decode(out, skip_special_tokens=True)
    return first, text.strip().split("\n")[0]


def lookalike(text, q) -> bool:
    line = _normal(text)
    return any(_normal(str(d.values[q.role]).split(" ")[0]) in line for i, d in enumerate(q.docs) if i != q.gold)


tot = {m: {"ok": 0, "kl": 0.0, "lost": 0, "gained": 0, "look": 0, "share": 0.0} for m in ["full", *methods]}
with torch.inference_mode():
    for n, case in enumerate(cases):
        q = questions[case.qid]
        ctx = [list(c) for c in case.context]
        ref_first, ref_text = run(kdn.prepare(ctx, mode="full"), case)
        ref_ok = answer_found(ref_text, case.answers)
        tot["full"]["ok"] += ref_ok
        tot["full"]["look"] += (not ref_ok) and lookalike(ref_text, q)
        cells = [f"full={int(ref_ok)}"]
        for m in methods:
            if m == "reuse":
                cache = kdn.prepare(ctx, mode="reuse")
            else:
                cache = kdn.prepare(ctx, mode="blend", recompute_ratio=args.ratio, selection=VARIANTS.get(m, m),
                                    query=list(case.suffix))
            share = cache.stats.recompute_share
            first, text = run(cache, case)
            ok = answer_found(text, case.answers)
            kl = float(F.kl_div(first, ref_first, log_target=True, reduction="sum"))
            t = tot[m]
            t["ok"] += ok
            t["kl"] += kl
            t["share"] += share
            t["lost"] += ref_ok and not ok
            t["gained"] += ok and not ref_ok
            look = (not ok) and lookalike(text, q)
            t["look"] += look
            cells.append(f"{m}={int(ok)}{'L' if look else ''} kl={kl:.3f}" + ("" if ok == ref_ok else f" [{text[:30]!r}]"))
        print(f"{case.qid} {q.role:10s} gold={case.gold_index} ans={case.answers[0]!r} full={ref_text[:30]!r} | "
              + " | ".join(cells), flush=True)

N = len(cases)
print(f"\n{N} {args.split} questions, ratio {args.ratio}; L = a wrong answer holding another document's value")
print(f"{'method':22s} {'acc':>6s} {'KL':>7s} {'layer%':>7s} {'lost':>5s} {'gained':>6s} {'lookalike':>9s}")
for m, t in tot.items():
    kl = "-" if m == "full" else f"{t['kl'] / N:.4f}"
    share = "100%" if m == "full" else f"{t['share'] / N:.1%}"
    print(f"{m:22s} {t['ok'] / N:6.1%} {kl:>7s} {share:>7s} {t['lost']:5d} {t['gained']:6d} {t['look']:9d}")
