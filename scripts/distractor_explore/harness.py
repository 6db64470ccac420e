"""Distractor dev harness (the selection ideas tried for issue 13; dev split only): full prefill's answers
cached, blend selections evaluated against them (accuracy, same answer ids, same correctness, layer%,
look-alike values, lost / gained). Results go to bench_out/distractor_explore/ (not committed).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/distractor_explore/harness.py reuse kdn@0.15 win4-2@0.227 ...

CONFIG names are keys of configs.CONFIGS (or 'reuse'); NOTES.md has the table of one run (2026-12-02)."""
import json, os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
from kdn_hf import KDN
from kdn_hf.bench.distractor import distractor_cases, generate
from kdn_hf.bench.quality import greedy, stop_ids, _crop
from kdn_hf.bench.workload import answer_found, _normal

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join("bench_out", "distractor_explore")
NTOK = 16
SPLIT = "dev"


def load():
    kdn = KDN.from_pretrained("smollm2-135m", store="memory://?budget=8GiB")
    cases = distractor_cases(kdn.tokenizer, k=4, doc_tokens=512, split=SPLIT)
    return kdn, cases


def answer(kdn, cache, case, stop, ntok=NTOK):
    with torch.inference_mode():
        out = greedy(kdn.model, cache, list(case.suffix), ntok, stop)
    text = kdn.tokenizer.decode(out, skip_special_tokens=True).strip().split("\n")[0]
    return out, text


def full_answers(kdn, cases, stop):
    path = os.path.join(OUT, f"full_{SPLIT}.json")
    if os.path.exists(path):
        return json.load(open(path))
    res = {}
    for c in cases:
        cache = kdn.prepare([list(x) for x in c.context], mode="full")
        ids, text = answer(kdn, cache, c, stop)
        res[c.qid] = {"ids": ids, "text": text, "ok": answer_found(text, c.answers)}
    json.dump(res, open(path, "w"), indent=1)
    return res


def lookalike(text, q):
    line = _normal(text)
    return any(_normal(str(d.values[q.role]).split(" ")[0]) in line for i, d in enumerate(q.docs) if i != q.gold)


def evaluate(kdn, cases, full, stop, name, sel=None, ratio=0.15, log=True):
    qs = {q.qid: q for q in generate(SPLIT)}
    per = {}
    t0 = time.time()
    for c in cases:
        ctx = [list(x) for x in c.context]
        if hasattr(sel, "set_case"):
            sel.set_case(c)
        if sel is None:
            cache = kdn.prepare(ctx, mode="reuse")
            share = 0.0
        else:
            query = list(c.suffix)
            if getattr(sel, "draft_tokens", 0):  # lookahead: a short greedy draft over the reused KV
                draft, _ = answer(kdn, kdn.prepare(ctx, mode="reuse"), c, stop, sel.draft_tokens)
                draft = [t for t in draft if t not in stop]
                sel.rows = len(draft) + 1
                query = query + draft
            cache = kdn.prepare(ctx, mode="blend", recompute_ratio=ratio, selection=sel, query=query)
            share = cache.stats.recompute_share
        ids, text = answer(kdn, cache, c, stop)
        ok = answer_found(text, c.answers)
        per[c.qid] = {"ids": ids, "text": text, "ok": ok, "share": share, "look": (not ok) and lookalike(text, qs[c.qid])}
    n = len(cases)
    acc = sum(p["ok"] for p in per.values())
    same_ids = sum(per[q]["ids"] == full[q]["ids"] for q in per)
    same_ok = sum(per[q]["ok"] == full[q]["ok"] for q in per)
    lost = [q[-3:] for q in per if full[q]["ok"] and not per[q]["ok"]]
    gained = [q[-3:] for q in per if per[q]["ok"] and not full[q]["ok"]]
    share = sum(p["share"] for p in per.values()) / n
    look = sum(p["look"] for p in per.values())
    row = {"name": name, "ratio": ratio, "acc": acc, "n": n, "same_ids": same_ids, "same_ok": same_ok,
           "share": share, "lost": lost, "gained": gained, "look": look, "secs": time.time() - t0}
    if log:
        print(f"{name:34s} acc {acc:2d}/{n} same_ids {same_ids:2d} same_ok {same_ok:2d} layer% {share:6.1%} "
              f"look {look:2d} lost {lost} gained {gained} ({row['secs']:.0f}s)", flush=True)
    with open(os.path.join(OUT, f"results_{SPLIT}.jsonl"), "a") as f:
        f.write(json.dumps({**row, "per": per}) + "\n")
    return row, per


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    os.makedirs(OUT, exist_ok=True)
    import configs
    kdn, cases = load()
    stop = stop_ids(kdn.model, kdn.tokenizer)
    for c in cases:  # warm the store
        kdn.prepare([list(x) for x in c.context], mode="reuse")
    full = full_answers(kdn, cases, stop)
    print(f"full: {sum(v['ok'] for v in full.values())}/{len(full)}", flush=True)
    for name in sys.argv[1:]:
        if name == "reuse":
            evaluate(kdn, cases, full, stop, "reuse", None)
            continue
        make, ratio = configs.CONFIGS[name]
        evaluate(kdn, cases, full, stop, name, make(), ratio)
